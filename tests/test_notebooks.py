"""The course's notebooks as a learner reads them, and as they replay on other machines.

* What the learner reads speaks of Gemma, PyTorch and their machine: no test tooling
  (nbval markers, lint pragmas, the test suite) in any cell. nbval's options live in
  cell tags (``nbval-ignore-output``, ...) and in ``tests/nbval_sanitize.cfg``.
* Stored outputs hold no noise of one machine's arithmetic: the notebooks replay
  under nbval on other CPU code paths and thread counts (``-m portability``; the
  README's test command runs a representative subset, ``bash course portable`` all).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for folder in ("notebooks", "exercises", "solutions") for p in (ROOT / folder).glob("*.ipynb")
)
NBVAL_TAGS = {"nbval-ignore-output", "nbval-check-output", "nbval-skip", "nbval-raises-exception"}

TOOLING = {
    "an nbval marker": re.compile(r"NBVAL_|nbval", re.IGNORECASE),
    "a lint pragma": re.compile(r"#\s*(noqa|type:\s*ignore|fmt:\s*(off|on|skip)|pragma|pylint|ruff)\b"),
    "the test suite": re.compile(r"\btests?/|pytest|test suite|course's tests|\bRATE\b"),
    "the seed article instead of its title and author": re.compile(r"seed article", re.IGNORECASE),
}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[rel(p) for p in NOTEBOOKS])
def test_course_text_holds_no_tooling(notebook):
    for i, cell in enumerate(nbformat.read(notebook, as_version=4).cells):
        for what, pattern in TOOLING.items():
            found = pattern.search(cell.source)
            assert not found, f"cell {i} ({cell.cell_type}) mentions {what}: {found.group(0)!r}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[rel(p) for p in NOTEBOOKS])
def test_nbval_options_are_known_cell_tags(notebook):
    for i, cell in enumerate(nbformat.read(notebook, as_version=4).cells):
        tags = set(cell.get("metadata", {}).get("tags", []))
        unknown = {t for t in tags if t.startswith("nbval")} - NBVAL_TAGS
        assert not unknown, f"cell {i}: nbval does not know the tag(s) {sorted(unknown)}"


# ---------------------------------------------------------------- other arithmetic paths

# CPU code paths other than the default one: AVX2 kernels in ATen, MKL and oneDNN (the
# default is AVX-512 on this project's machines), one thread; and the default kernels
# split over three threads. A stored output that prints rounding noise differs on one
# of them, as it would on a learner's laptop or GPU.
ARITHMETIC_PATHS = {
    "avx2-1-thread": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": "1",
    },
    "default-3-threads": {"OMP_NUM_THREADS": "3"},
}

# The chapters whose outputs are most sensitive to the arithmetic (norms, attention, logits,
# sampled texts, cached vs recomputed) and quick to replay; `bash course portable` runs all.
REPRESENTATIVE = [
    "notebooks/02_embeddings_rmsnorm.ipynb",
    "notebooks/04_attention.ipynb",
    "notebooks/06_model_weights.ipynb",
    "notebooks/07_generation.ipynb",
    "notebooks/09_kv_cache.ipynb",
]


def notebooks_to_replay() -> list[str]:
    if os.environ.get("GEMMA_LITE_PORTABLE_ALL"):
        return ["notebooks", "solutions"]
    return REPRESENTATIVE


@pytest.mark.slow
@pytest.mark.portability
@pytest.mark.parametrize("path", ARITHMETIC_PATHS)
def test_notebooks_replay_on_another_arithmetic_path(path):
    env = {**os.environ, **ARITHMETIC_PATHS[path]}
    command = [
        sys.executable, "-m", "pytest", *notebooks_to_replay(),
        "--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", "--nbval-current-env",
        "-p", "no:cacheprovider", "-q", "--no-header",
    ]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    print(f"{path}: {summary}")
    assert out.returncode == 0, f"notebooks differ on the {path} path:\n{out.stdout[-6000:]}"
