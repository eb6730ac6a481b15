# Thin wrappers around the `course` script (the README commands).
.PHONY: lab test quick portable bench lint

lab:
	bash course lab

test:
	bash course test

quick:
	bash course quick

portable:
	bash course portable

bench:
	bash course bench --compare-hf --dtypes float32 bfloat16

lint:
	.venv/bin/ruff check gemma_lite tests notebooks exercises solutions
