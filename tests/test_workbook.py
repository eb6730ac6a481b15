"""The learner's workbook: pieces saved when their check passes, used by later exercises, reset on request.

Notebook cells are imitated as IPython runs them: source code compiled under a file
name that exists only in ``linecache``. Each test has its own workbook folder.
"""

from __future__ import annotations

import itertools
import linecache

import pytest
import torch

from gemma_lite import Gemma, GemmaConfig, checks, layers, workbook
from gemma_lite.__main__ import main

_cells = itertools.count()

RMSNORM = '''
class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


print("a call the saved piece leaves out")
'''


def run_cell(source: str, namespace: dict | None = None) -> dict:
    """Execute source as a notebook cell: its code's file name lives only in linecache."""
    filename = f"/nonexistent/ipykernel_0/{next(_cells)}.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = namespace if namespace is not None else {"__name__": "__main__", **workbook.BASE_NAMES}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_LITE_WORKBOOK", str(tmp_path / "book"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "book"


def solution_pieces(folder, names) -> None:
    """Save the solutions' pieces in ``folder`` as if their checks had passed."""
    for name in names:
        workbook.save(name, workbook.solution_source(name), folder)


def test_a_passing_check_saves_the_cell_and_later_use_loads_it(book, capsys):
    cell = run_cell(RMSNORM)
    assert checks.check_rmsnorm(cell["RMSNorm"])
    assert "saved as RMSNorm.py in your workbook" in capsys.readouterr().out
    text = (book / "RMSNorm.py").read_text()
    assert "class RMSNorm" in text and "print(" not in text, "the definitions are saved, calls are not"

    mine = workbook.use("RMSNorm")
    out = capsys.readouterr().out
    assert "RMSNorm" in out and "yours, from exercise 02" in out
    assert mine.__module__ == "workbook.RMSNorm" and workbook.is_learners(mine)
    x = torch.randn(2, 3, 8)
    ref = layers.RMSNorm(8)
    torch.nn.init.normal_(ref.weight)
    norm = mine(8)
    norm.load_state_dict(ref.state_dict())
    torch.testing.assert_close(norm(x), ref(x), rtol=0, atol=0)


def test_unwritten_failed_and_edited_pieces_fall_back_to_the_package(book, capsys):
    assert workbook.use("Attention", quiet=True) is layers.Attention
    assert "yours is not done yet (exercise 04)" in workbook.choose("Attention").why

    broken = run_cell(RMSNORM.replace("1.0 + self.weight", "self.weight"))
    assert not checks.check_rmsnorm(broken["RMSNorm"])
    assert not (book / "RMSNorm.py").exists(), "a failing check saves nothing"
    assert workbook.use("RMSNorm", quiet=True) is layers.RMSNorm

    assert checks.check_rmsnorm(run_cell(RMSNORM)["RMSNorm"])
    path = book / "RMSNorm.py"
    path.write_text(path.read_text() + "\n# changed by hand\n")
    choice = workbook.choose("RMSNorm")
    assert choice.value is layers.RMSNorm and "changed since its check passed" in choice.why
    capsys.readouterr()


def test_the_package_itself_and_test_code_are_never_saved(book):
    assert checks.check_rmsnorm(layers.RMSNorm)
    assert checks.check_causal_mask(layers.causal_mask)
    assert not book.exists() or not list(book.iterdir())


def test_a_piece_that_needs_another_cell_is_refused_with_the_reason(book, capsys):
    helper = run_cell("def mean_square(x):\n    return x.pow(2).mean(-1, keepdim=True)\n")
    cell = run_cell(RMSNORM.replace("x32.pow(2).mean(-1, keepdim=True)", "mean_square(x32)"), helper)
    assert checks.check_rmsnorm(cell["RMSNorm"])
    out = capsys.readouterr().out
    assert "not saved: your RMSNorm uses mean_square, defined in another cell" in out
    assert not (book / "RMSNorm.py").exists()


def test_pieces_load_the_earlier_pieces_they_name(book):
    solution_pieces(book, ["RMSNorm", "apply_rope", "causal_mask", "sliding_window_mask", "Attention"])
    attention = workbook.use("Attention", quiet=True)
    assert attention.__module__ == "workbook.Attention"
    used = workbook.functions_used(attention)
    assert set(used) == {"apply_rope", "causal_mask", "sliding_window_mask"}
    assert all(workbook.is_learners(fn) for fn in used.values())
    assert checks.check_attention(attention)

    (book / "causal_mask.py").unlink()  # gone: the package's mask stands in, the rest are still theirs
    attention = workbook.use("Attention", quiet=True)
    assert workbook.functions_used(attention)["causal_mask"] is layers.causal_mask
    assert checks.check_attention(attention)


def test_solutions_run_from_the_course_keep_their_pieces_apart(book, monkeypatch):
    monkeypatch.chdir(workbook.COURSE / "solutions")
    assert workbook.location() == book / "solutions"
    monkeypatch.chdir(workbook.COURSE / "exercises")
    assert workbook.location() == book


def test_a_workbook_folder_that_cannot_be_written_says_what_to_do(tmp_path, monkeypatch, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    monkeypatch.setenv("GEMMA_LITE_WORKBOOK", str(taken))
    assert checks.check_rmsnorm(run_cell(RMSNORM)["RMSNorm"])
    out = capsys.readouterr().out
    assert f"cannot save your RMSNorm in {taken}" in out
    assert "set GEMMA_LITE_WORKBOOK to a folder you can write" in out


def test_the_capstone_names_the_broken_piece_tiny(book, capsys):
    pieces = ["ScaledEmbedding", "RMSNorm", "RotaryEmbedding", "apply_rope", "causal_mask"]
    solution_pieces(book, [*pieces, "sliding_window_mask", "Attention", "GeGLU", "Block", "Gemma3"])
    # a GeGLU that passed its check once, then broken by hand and recorded as passed again
    path = book / "GeGLU.py"
    workbook.save("GeGLU", path.read_text().replace('approximate="tanh"', 'approximate="none"'), book)
    model = workbook.use("Gemma3", quiet=True)
    assert not checks.check_model(model)
    out = capsys.readouterr().out
    assert "inside 'blocks.0.ffn' (your GeGLU)" in out


@pytest.mark.slow
def test_the_capstone_passes_on_the_solution_pieces_and_names_a_broken_one(book, capsys):
    solution_pieces(book, [n for n, p in workbook.PIECES.items() if p.chapter <= "06"])
    model, loader = workbook.use("Gemma3", "load_from_gguf", quiet=True)
    assert checks.check_my_gemma(model, loader)
    out = capsys.readouterr().out
    assert "built from your ScaledEmbedding, RMSNorm, RotaryEmbedding, apply_rope" in out
    assert "the package's" not in out

    path = book / "apply_rope.py"
    broken = path.read_text().replace("torch.cat([-x2, x1], dim=-1)", "torch.cat([x2, -x1], dim=-1)")
    workbook.save("apply_rope", broken, book)
    model, loader = workbook.use("Gemma3", "load_from_gguf", quiet=True)
    assert not checks.check_my_gemma(model, loader)
    out = capsys.readouterr().out
    assert "(your Attention, which calls your apply_rope" in out


def test_cli_lists_diffs_and_resets_with_confirmation(book, capsys, monkeypatch):
    solution_pieces(book, ["RMSNorm", "GeGLU"])
    assert main(["workbook"]) == 0
    out = capsys.readouterr().out
    assert f"Your workbook: {book}" in out and "RMSNorm              passed" in out
    assert "Attention            not done" in out

    assert main(["workbook", "--diff", "RMSNorm"]) == 0
    assert "RMSNorm: the same as the solution" in capsys.readouterr().out
    path = book / "RMSNorm.py"
    path.write_text(path.read_text().replace("1.0 + self.weight", "self.weight"))
    assert main(["workbook", "--diff", "RMSNorm"]) == 0
    assert "+        return (normed * (1.0 + self.weight.float())).type_as(x)" in capsys.readouterr().out

    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["workbook", "--reset"]) == 1
    assert path.exists() and "Nothing deleted" in capsys.readouterr().out
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["workbook", "--reset", "GeGLU"]) == 0
    assert not (book / "GeGLU.py").exists() and path.exists()
    assert main(["workbook", "--reset", "--yes"]) == 0
    assert not path.exists() and "Deleted 1 piece(s)" in capsys.readouterr().out
    assert main(["workbook", "--reset", "NoSuchPiece", "--yes"]) == 2
    assert "no piece named 'NoSuchPiece'" in capsys.readouterr().err


def test_reference_pieces_with_the_exercises_signatures_agree_with_the_package():
    from helpers import random_model

    from gemma_lite.generate import generate_ids, next_token_probs
    from gemma_lite.tokenizer import bpe_encode

    positions = torch.arange(7)
    torch.testing.assert_close(layers.causal_mask(7), layers.attention_mask(positions, positions)[0, 0])
    assert layers.sliding_window_mask(7, 3).sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3]
    model = random_model()
    ids = torch.tensor([[5, 6, 7]])
    new = generate_ids(model, ids, 5)
    greedy = ids
    for _ in range(5):
        greedy = torch.cat([greedy, model(greedy)[:, -1:].argmax(-1)], dim=1)
    assert new == greedy[0, 3:].tolist()
    probs = next_token_probs(torch.tensor([[2.0, 1.0, 0.0, -5.0]]), temperature=1.0, top_k=2)
    assert probs[0, 2:].tolist() == [0.0, 0.0] and abs(probs.sum().item() - 1) < 1e-6
    vocab = {"a": 0, "b": 1, "ab": 2, "▁": 3, "<0x21>": 4}
    assert bpe_encode("ab !", vocab) == [2, 3, 4]


def test_attention_weights_are_the_rows_the_output_averages_over():
    cfg = GemmaConfig.tiny()
    torch.manual_seed(0)
    for is_global in (False, True):
        attention = layers.Attention(cfg, is_global).eval()
        x, positions = torch.randn(2, 20, cfg.d_model), torch.arange(20)
        rope = layers.RotaryEmbedding(cfg.head_dim, 1e4)(positions, x.dtype)
        weights = attention.weights(x, rope, positions)  # (B, H, T, T)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, cfg.n_heads, 20))
        assert (weights[..., 0, 1:] == 0).all(), "causal: the first token sees only itself"
        if not is_global:
            assert (weights[..., -1, : 20 - cfg.sliding_window] == 0).all(), "the window hides old keys"
        _, _, v = layers.attention_heads(attention, x, rope)
        v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
        out = attention.o_proj((weights @ v).transpose(1, 2).reshape(2, 20, -1))
        torch.testing.assert_close(out, attention(x, rope, positions), atol=1e-5, rtol=1e-4)


def test_the_cache_checks_pass_the_solutions_and_name_the_usual_mistakes(book, capsys):
    names = ["StaticCache", "RingCache", "cached_attention"]
    sources = {n: workbook.solution_source(n) for n in names}
    ns = {"__name__": "__main__", **workbook.BASE_NAMES, "apply_rope": layers.apply_rope}
    ns["window_mask"] = layers.window_mask
    for source in sources.values():
        run_cell(source, ns)
    assert checks.check_static_cache(ns["StaticCache"])
    assert checks.check_ring_cache(ns["RingCache"])
    assert checks.check_cached_attention(ns["cached_attention"])
    assert all((book / f"{n}.py").is_file() for n in names)
    capsys.readouterr()

    only_new = run_cell(
        sources["StaticCache"].replace("return self.k, self.v, self.slot_pos", "return k, v, input_pos")
    )
    assert not checks.check_static_cache(only_new["StaticCache"])
    assert "return the whole buffer" in capsys.readouterr().out
    ring = sources["RingCache"]
    start, end = ring.index("        keys = torch.cat"), ring.index("        n = min")
    overwrites = run_cell(
        (ring[:start] + ring[end:]).replace(
            "return keys, values, key_pos", "return self.k, self.v, self.slot_pos"
        ),
        dict(ns),
    )
    assert not checks.check_ring_cache(overwrites["RingCache"])
    assert "a prefill longer than the ring overwrites keys" in capsys.readouterr().out
    ignores = sources["cached_attention"].replace(
        "keys, values, key_pos = cache.update(k, v, input_pos)", "keys, values, key_pos = k, v, input_pos"
    )
    assert not checks.check_cached_attention(run_cell(ignores, dict(ns))["cached_attention"])
    assert "attend over what cache.update returns" in capsys.readouterr().out


@pytest.mark.compile
def test_the_decode_step_check_passes_the_solution_and_its_saved_pieces_compile(book, capsys):
    source = workbook.solution_source("decode_step")
    ns = run_cell(
        source, {"__name__": "__main__", **workbook.BASE_NAMES, "cached_attention": layers.cached_attention}
    )
    assert checks.check_decode_step(ns["decode_step"])
    assert (book / "decode_step.py").is_file()
    capsys.readouterr()
    whole = run_cell(source.replace("x[:, -1]", "x"), dict(ns))
    assert not checks.check_decode_step(whole["decode_step"])
    assert "the logits of the last position only" in capsys.readouterr().out

    # Saved pieces are modules torch.compile can import by name: the cache and the step compile.
    solution_pieces(book, ["cached_attention", "StaticCache"])
    StaticCache, decode_step = workbook.use("StaticCache", "decode_step", quiet=True)
    assert decode_step.__module__ == "workbook.decode_step"
    with torch.no_grad():
        model = checks.core.randomize_norms(Gemma(GemmaConfig.tiny()))
    caches = [
        StaticCache(1, model.cfg.n_kv_heads, 16, model.cfg.head_dim, torch.float32, "cpu")
        for _ in range(model.cfg.n_layers)
    ]
    step = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(ids)[0, -1]
        decode_step(model, ids[:, :2], torch.arange(2), caches)
        got = step(model, ids[:, 2:], torch.tensor([2]), caches)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
