"""Chapter 13: the decode step with an explicit KV cache, exported, run by onnxruntime and AOTInductor."""

from __future__ import annotations

import pytest
import torch

from gemma_lite import export
from gemma_lite.export import ExplicitCacheStep, ExportedGenerator, OnnxStep
from gemma_lite.generate import Generator
from tests.helpers import CharTokenizer, random_model, tiny_model_for

PROMPT = "a tiny prompt"  # 14 ids with <bos>: past the tiny model's window of 8
MAX_LEN = 32


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model_for()
    return model, tokenizer, ExplicitCacheStep(model, model.new_cache(1, MAX_LEN))


def run(runner, step: ExplicitCacheStep, n: int = 12) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of PROMPT through ``runner``, and the logits each was chosen from."""
    gen = ExportedGenerator(step.model, CharTokenizer(), step, runner, keep_logits=True)
    return gen(PROMPT, n, stop_at_eos=False).new_ids[0], gen.logits


def test_the_explicit_step_writes_the_generators_tokens_and_logits(tiny):
    model, tokenizer, step = tiny
    with torch.no_grad():
        tokens, logits = run(step, step)
        reference = Generator(model, tokenizer)(PROMPT, 12, stop_at_eos=False).new_ids[0]
        ids = torch.tensor([CharTokenizer().encode(PROMPT) + tokens[:-1]])
        full = model(ids)[0, -12:]  # the whole sequence at once: the logits of each new token
    assert tokens == reference
    assert torch.allclose(torch.stack(logits), full, atol=1e-5, rtol=1e-5)


def test_the_explicit_step_leaves_its_inputs_alone(tiny):
    _, _, step = tiny
    inputs = step.example_inputs()
    before = [t.clone() for t in inputs]
    with torch.no_grad():
        logits, *state = step(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before, strict=True))
    assert len(state) == 3 * step.model.cfg.n_layers and logits.shape == (1, step.model.cfg.vocab_size)
    assert not torch.equal(state[0], inputs[2]), "the new token's key was written into the returned copy"


def test_an_exported_step_round_trips_through_a_file(tiny, tmp_path):
    _, _, step = tiny
    program = export.export_step(step)
    torch.export.save(program, tmp_path / "step.pt2")
    loaded = torch.export.load(tmp_path / "step.pt2").module()
    with torch.no_grad():
        eager, exported = run(step, step), run(loaded, step)
    assert exported[0] == eager[0]
    assert max(export.relative_error(a, b) for a, b in zip(exported[1], eager[1], strict=True)) < 1e-5


def test_the_exported_full_forward_takes_any_length_in_its_range(tiny):
    model, _, _ = tiny
    program = export.export_forward(model, max_len=64).module()
    for length in (2, 5, 40):
        ids = torch.randint(0, model.cfg.vocab_size, (1, length))
        with torch.no_grad():
            assert torch.allclose(program(ids), model(ids), atol=1e-5, rtol=1e-5), length


def test_onnxruntime_gives_pytorchs_logits_and_tokens(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    _, _, step = tiny
    path = export.to_onnx(step, tmp_path / "step.onnx")
    with torch.no_grad():
        eager, onnx = run(step, step), run(OnnxStep(path), step)
    assert onnx[0] == eager[0]
    # fp32 in both, summed in another order by other kernels: a few units of float32's 1.2e-7 per
    # operation, grown over the layers; 1e-5 of the largest logit is far below the gap between tokens
    worst = max(export.relative_error(a, b) for a, b in zip(onnx[1], eager[1], strict=True))
    assert worst < 1e-5


def test_an_onnx_step_checks_its_file_and_its_inputs(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OnnxStep(tmp_path / "nothing.onnx")
    _, _, step = tiny
    onnx = OnnxStep(export.to_onnx(step, tmp_path / "step.onnx"))
    with pytest.raises(ValueError, match=f"takes {2 + 3 * step.model.cfg.n_layers} inputs, got 2"):
        onnx(*step.example_inputs()[:2])


@pytest.mark.compile
def test_an_aotinductor_package_runs_the_step_without_the_model_code(tiny, tmp_path):
    _, _, step = tiny
    package = export.aoti_package(export.export_step(step), tmp_path / "step.pt2")
    with torch.no_grad():
        eager, compiled = run(step, step), run(export.load_aoti(package), step)
    assert compiled[0] == eager[0]
    assert max(export.relative_error(a, b) for a, b in zip(compiled[1], eager[1], strict=True)) < 1e-5


def test_exported_generation_says_what_is_wrong(tiny, tmp_path):
    model, tokenizer, step = tiny
    gen = ExportedGenerator(model, tokenizer, step)
    with pytest.raises(ValueError, match="need 41 cache positions; this step's cache has 32"):
        gen(list(range(3, 23)), 21)
    with pytest.raises(ValueError, match="runs 1 prompt\\(s\\) at a time, got 2"):
        gen(["ab", "cd"], 4)
    with pytest.raises(ValueError, match="at least one token"):
        gen([], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        gen([2], 0)
    with pytest.raises(FileNotFoundError, match="no AOTInductor package"):
        export.load_aoti(tmp_path / "nothing.pt2")


def test_a_missing_optional_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(export.OPTIONAL, "onnx", ["onnx", "no_such_package_xyz"])
    assert export.missing("onnx") == ["no_such_package_xyz"]
    with pytest.raises(ModuleNotFoundError, match="pip install no_such_package_xyz"):
        export.require("onnx")
    monkeypatch.setitem(export.OPTIONAL, "coreml", ["no_such_package_xyz"])
    assert "(pip install no_such_package_xyz): CoreML skipped" in export.coreml_status()


def test_a_bfloat16_step_keeps_its_cache_in_bfloat16():
    model = random_model(dtype=torch.bfloat16)
    step = ExplicitCacheStep(model, model.new_cache(1, 16))
    with torch.no_grad():
        logits, *state = step(*step.example_inputs())
    assert (
        logits.dtype == torch.bfloat16 and state[0].dtype == torch.bfloat16 and state[2].dtype == torch.long
    )


def test_a_torchscript_trace_writes_the_same_tokens_and_says_its_standing(tiny):
    _, _, step = tiny
    traced, standing = export.to_torchscript(step)
    if traced is None:
        assert "no longer has TorchScript" in standing
        return
    with torch.no_grad():
        assert run(traced, step)[0] == run(step, step)[0]
    assert "deprecat" in standing.lower() or "no deprecation warning" in standing


def test_an_exported_step_holds_pytorchs_own_operations_whatever_kernels_the_model_chose(tiny):
    from gemma_lite.kernels import KernelChoice

    model, _, step = tiny
    layers = [m for m in model.modules() if isinstance(m, KernelChoice)]
    assert layers
    for layer in layers:  # what optimize_for_decode may choose: the course's own operations
        layer.eager_kernel, layer.compiled_kernel = "gemv", "reduce"
    try:
        program = export.export_step(step)
    finally:
        for layer in layers:
            layer.eager_kernel = layer.compiled_kernel = "linear"
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "gemma_lite" in t], sorted(targets)  # aten operations and getitem


def test_coreml_converts_the_step_and_runs_it_only_on_macos(tiny, tmp_path):
    pytest.importorskip("coremltools")
    import platform

    _, _, step = tiny
    converted = export.to_coreml(export.export_step(step), tmp_path / "step.mlpackage")
    description = converted.get_spec().description
    inputs, outputs = step.names()
    assert [i.name for i in description.input][:2] == ["token", "input_pos"]
    assert len(description.input) == len(inputs) and len(description.output) == len(outputs)
    assert (tmp_path / "step.mlpackage").is_dir()
    if platform.system() != "Darwin":
        with pytest.raises(RuntimeError, match="needs macOS"):
            export.CoreMLStep(converted)
        assert "prediction skipped" in export.coreml_status()
        return
    coreml = export.CoreMLStep(converted)  # a Mac: the same tokens as PyTorch, fp32 on Core ML
    assert run(coreml, step)[0] == run(step, step)[0]
