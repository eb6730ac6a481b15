"""Checks for the chapters and exercises: your code and the reference, on the same inputs.

    >>> from gemma_lite.checks import check_rmsnorm
    >>> check_rmsnorm(RMSNorm)
    ✅ RMSNorm: matches gemma_lite.layers.RMSNorm on fp32 and bf16 inputs

Every check runs the learner's code and the package's reference on the same
seeded inputs, prints one line and returns a ``CheckResult`` (true when it
passed, so tests can ``assert check_...(fn)``). A failure names the first
mismatch (shape, dtype, or the element with expected and actual values) and,
when the output matches a known mistake, its likely cause. Code that still
raises ``NotImplementedError`` gets a "not done yet" line instead of a traceback.

Checks use ``GemmaConfig.tiny()`` and small random tensors, so they take
milliseconds; only ``check_model`` on a loaded model touches the real weights.
Learner modules get the reference's (random) weights copied in by parameter
name, so they must use the same names as ``gemma_lite.layers``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig
from .generate import apply_repetition_penalty, filter_logits
from .layers import (
    Attention,
    Block,
    GeGLU,
    RMSNorm,
    RotaryEmbedding,
    ScaledEmbedding,
    apply_rope,
    attention_mask,
)
from .model import Gemma

PASS, FAIL, TODO = "✅", "❌", "⏳"


# ================================================================ the machinery


@dataclass(frozen=True)
class CheckResult:
    """What a check found: true when it passed; ``done`` is False while a TODO is unfinished."""

    passed: bool
    message: str
    done: bool = True

    def __bool__(self) -> bool:
        return self.passed

    def _ipython_display_(self) -> None:
        """The check has printed its message already: a notebook shows nothing more."""


class Mismatch(AssertionError):
    """The learner's result differs from the reference; the message says where and how."""


def _raised_in(error: BaseException) -> str:
    """The function that raised ``error``: its innermost frame outside torch and this module."""
    torch_dir = os.path.dirname(torch.__file__)
    name, tb = "your code", error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.startswith(torch_dir) and code.co_filename != __file__:
            name = getattr(code, "co_qualname", code.co_name)  # "RMSNorm.forward" (Python 3.11+)
        tb = tb.tb_next
    return name


def _check(title: str):
    """Turn a check body into a check that prints one line and returns a CheckResult.

    The body returns a short description of what passed, or raises Mismatch.
    It runs seeded (without touching the caller's random state) and without autograd.
    """

    def decorate(body: Callable[..., str]) -> Callable[..., CheckResult]:
        @functools.wraps(body)
        def run(*args, **kwargs) -> CheckResult:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)
                try:
                    result = CheckResult(True, f"{PASS} {title}: {body(*args, **kwargs)}")
                except NotImplementedError as e:
                    message = f"{TODO} not done yet: fill in the TODO in {_raised_in(e)}"
                    result = CheckResult(False, message, done=False)
                except Mismatch as e:
                    result = CheckResult(False, f"{FAIL} {title}: {e}")
                except Exception as e:  # the learner's code crashed: one line, no traceback
                    result = CheckResult(
                        False,
                        f"{FAIL} {title}: your code raised {type(e).__name__}: {e} (in {_raised_in(e)})",
                    )
            print(result.message)
            return result

        return run

    return decorate


Cause = tuple[str, Callable[[], object]]  # (likely cause, what that mistake would output)


def _matches(got, variant, atol: float, rtol: float) -> bool:
    tensors = isinstance(got, torch.Tensor), isinstance(variant, torch.Tensor)
    if all(tensors):
        return got.shape == variant.shape and torch.allclose(
            got.float(), variant.float(), atol=atol, rtol=rtol, equal_nan=True
        )
    return not any(tensors) and got == variant


def _likely_cause(got, causes: Sequence[Cause], atol: float = 1e-5, rtol: float = 1e-4) -> str:
    """'; likely cause: ...' for the first known mistake whose output ``got`` matches, else ''."""
    for cause, variant in causes:
        try:
            output = variant()
        except Exception:  # a mistake that cannot even run on these inputs is not the one made
            continue
        if _matches(got, output, atol, rtol):
            return f"; likely cause: {cause}"
    return ""


def _tensor(got, what: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what} should be a torch.Tensor, got {type(got).__name__}")
    return got


def _expect_close(
    got,
    expected: torch.Tensor,
    what: str,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    causes: Sequence[Cause] = (),
    locate: Callable[[], str] | None = None,
) -> None:
    """Raise Mismatch at the first element of ``got`` that is not close to ``expected``.

    ``causes`` are tried in order when the values differ; ``locate`` (called when
    none matches) can say where in a bigger module the difference starts.
    """
    got = _tensor(got, what)
    if got.shape != expected.shape:
        raise Mismatch(
            f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            + _likely_cause(got, causes, atol, rtol)
        )
    if got.dtype != expected.dtype:
        raise Mismatch(f"{what} has dtype {got.dtype}, expected {expected.dtype}")
    close = torch.isclose(got.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=True)
    if bool(close.all()):
        return
    index = tuple(int(i) for i in (~close).nonzero()[0])
    message = (
        f"{what} differs at index {list(index)}: expected {expected[index].item():.6g}, "
        f"got {got[index].item():.6g} ({int((~close).sum())} of {close.numel()} values differ)"
    )
    cause = _likely_cause(got, causes, atol, rtol)
    if not cause and locate is not None:
        cause = locate()
    raise Mismatch(message + cause)


def _expect_equal(got, expected, what: str, causes: Sequence[Cause] = ()) -> None:
    """For plain Python values (ints, floats, lists): exact equality."""
    if got != expected:
        raise Mismatch(f"{what} is {got!r}, expected {expected!r}" + _likely_cause(got, causes))


def _expect_mask(got, expected: torch.Tensor, what: str, causes: Sequence[Cause] = ()) -> None:
    """Boolean masks (True = may attend): name the first (query, key) pair that differs."""
    got = _tensor(got, what)
    if got.dtype != torch.bool:
        raise Mismatch(
            f"{what} has dtype {got.dtype}; return a bool mask (True = may attend), "
            "not 0 / -inf: the attention code turns it into scores later"
        )
    if got.shape != expected.shape:
        raise Mismatch(
            f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)} (queries, keys)"
        )
    if torch.equal(got, expected):
        return
    q, k = (int(i) for i in (got != expected).nonzero()[0][-2:])
    index = (*[0] * (got.dim() - 2), q, k)
    yours = "may attend" if got[index] else "may not attend"
    ref = "may" if expected[index] else "may not"
    raise Mismatch(
        f"{what}: in yours query {q} {yours} to key {k}; in the reference it {ref}"
        + _likely_cause(got, causes)
    )


def _build(cls, *args) -> nn.Module:
    module = cls(*args)
    if not isinstance(module, nn.Module):
        raise Mismatch(f"{getattr(cls, '__name__', cls)}(...) should build a torch.nn.Module")
    return module


def _names(params: dict) -> str:
    names = list(params)
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _copy_weights(reference: nn.Module, mine: nn.Module) -> nn.Module:
    """Give ``mine`` the reference's parameters, matched by name (same names as gemma_lite)."""
    ref, got = dict(reference.named_parameters()), dict(mine.named_parameters())
    name = type(mine).__name__
    missing = [n for n in ref if n not in got]
    if missing:
        raise Mismatch(
            f"your {name} has no parameter '{missing[0]}'; the checks copy weights by name, "
            f"and the reference has: {_names(ref)}"
        )
    extra = [n for n in got if n not in ref]
    if extra:
        tied = (
            " (the output head is tied to the embedding: reuse tok_embed.weight)"
            if "head" in extra[0]
            else ""
        )
        raise Mismatch(f"your {name} has a parameter '{extra[0]}' that the reference does not have{tied}")
    for n, p in ref.items():
        if got[n].shape != p.shape:
            raise Mismatch(f"your parameter '{n}' has shape {tuple(got[n].shape)}, expected {tuple(p.shape)}")
        got[n].copy_(p)
    return mine.eval()


def _randomize_norms(module: nn.Module) -> nn.Module:
    """Give every RMSNorm a random weight, so that x * w and x * (1 + w) differ."""
    for m in module.modules():
        if isinstance(m, RMSNorm):
            m.weight.normal_(0.0, 0.5)
    return module.eval()


def _outputs_by_module(model: nn.Module, names: set[str], run: Callable[[], object]) -> dict[str, list]:
    """Run ``run()`` and record, per named submodule, its outputs in call order."""
    seen: dict[str, list] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in names:

            def hook(_m, _args, out, name=name):
                seen.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)

            hooks.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _first_divergence(reference: nn.Module, mine: nn.Module, run_ref, run_mine) -> str:
    """'; ... first differs at <submodule>' in the reference's call order."""
    shared = {n for n, _ in reference.named_modules() if n} & {n for n, _ in mine.named_modules() if n}
    ref_out = _outputs_by_module(reference, shared, run_ref)
    my_out = _outputs_by_module(mine, shared, run_mine)
    for name, outputs in ref_out.items():
        mine_outputs = my_out.get(name, [])
        for ref_o, my_o in zip(outputs, mine_outputs, strict=False):
            if not isinstance(ref_o, torch.Tensor):
                continue
            if not _matches(my_o, ref_o, 1e-4, 1e-4):
                return f"; the first submodule whose output differs is '{name}'"
    return "; every submodule's output agrees, so look at how your forward connects them"


@contextlib.contextmanager
def _patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


# ================================================================ 00 setup


@_check("pick_device")
def check_pick_device(fn: Callable[[], torch.device | str]) -> str:
    """fn() -> the best device: cuda, then mps, then cpu. Tried on four simulated machines."""
    for cuda in (True, False):
        for mps in (True, False):
            with (
                mock.patch("torch.cuda.is_available", return_value=cuda),
                mock.patch("torch.backends.mps.is_available", return_value=mps),
            ):
                got = fn()
            if not isinstance(got, (str, torch.device)):
                raise Mismatch(f"return a torch.device or a name like 'cpu', got {type(got).__name__}")
            got = torch.device(got).type
            expected = "cuda" if cuda else "mps" if mps else "cpu"
            if got != expected:
                machine = f"CUDA {'yes' if cuda else 'no'}, MPS {'yes' if mps else 'no'}"
                raise Mismatch(
                    f"on a machine with {machine} you picked '{got}', expected '{expected}' "
                    "(prefer cuda, then mps, then cpu; ask torch.cuda.is_available() and "
                    "torch.backends.mps.is_available())"
                )
    return "prefers cuda, then mps, then cpu, on all four kinds of machine"


# ================================================================ 01 tokenizer

TOKENIZER_SAMPLES = (
    "Hello world",
    "naïve café",
    "Selamat pagi, apa kabar?",
    "สวัสดีครับ ภาษาไทย",
    "  two spaces",
    "𓀀 hieroglyph",
    "tokenization 🦜",
)


def _pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.id_to_token(i) for i in ids]


@_check("bpe_encode")
def check_bpe_encode(fn: Callable[[str, dict], list[int]], tokenizer) -> str:
    """fn(text, vocab) -> token ids, as the tokenizer encodes text (no <bos>)."""
    vocab = tokenizer.backend.get_vocab()
    for text in TOKENIZER_SAMPLES:
        expected = tokenizer.encode(text, add_bos=False)
        got = fn(text, vocab)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        if any(not isinstance(i, int) for i in got):
            raise Mismatch("return token ids (ints, e.g. vocab[piece]), not the pieces themselves")
        if got == expected:
            continue
        i = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        yours = repr(tokenizer.id_to_token(got[i])) if i < len(got) else "nothing"
        ref = repr(tokenizer.id_to_token(expected[i])) if i < len(expected) else "nothing"
        hint = "always merge the adjacent pair whose merged piece has the smallest id"
        if " " in text and "▁" not in "".join(_pieces(tokenizer, got)):
            hint = "SentencePiece writes a space as '▁' before merging: text.replace(' ', '▁')"
        elif any(tokenizer.token_to_id(c) is None for c in text.replace(" ", "▁")):
            hint = "a character missing from the vocabulary becomes one <0xXX> piece per UTF-8 byte"
        raise Mismatch(
            f"on {text!r}, token {i} is {yours}, expected {ref}; expected pieces "
            f"{_pieces(tokenizer, expected)}; hint: {hint}"
        )
    return f"agrees with the tokenizer on {len(TOKENIZER_SAMPLES)} texts (English, Indonesian, Thai, bytes)"


# ================================================================ 02 embeddings and RMSNorm


@_check("ScaledEmbedding")
def check_embedding(cls) -> str:
    """cls(vocab_size, dim): lookup times sqrt(dim), the scale rounded to the weight dtype."""
    V, C = 512, 640  # a real width: sqrt(640) is not a round number in bf16
    ref = ScaledEmbedding(V, C)
    mine = _copy_weights(ref, _build(cls, V, C))
    ids = torch.randint(0, V, (2, 7))
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 0.0)):
        ref, mine = ref.to(dtype), mine.to(dtype)
        rows = ref.weight[ids]
        causes = [
            ("the sqrt(d_model) scale is missing", lambda rows=rows: rows),
            ("scaled by d_model instead of sqrt(d_model)", lambda rows=rows: rows * C),
            (
                "the scale is not rounded to the weight dtype: in bf16 sqrt(640) = 25.298 becomes "
                "25.25 (use torch.tensor(scale, dtype=weight.dtype))",
                lambda rows=rows, dtype=dtype: (rows.float() * math.sqrt(C)).to(dtype),
            ),
        ]
        name = "fp32" if dtype == torch.float32 else "bf16"
        _expect_close(mine(ids), ref(ids), f"{name} output", atol=atol, rtol=atol, causes=causes)
    return "lookup times sqrt(640), rounded to the weight dtype (fp32 and bf16)"


def _rms_variants(x: torch.Tensor, w: torch.Tensor, eps: float) -> list[Cause]:
    x32, w32 = x.float(), w.float()
    ms = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(ms + eps)

    def out(t):
        return t.to(x.dtype)

    return [
        (
            "you scaled by w; Gemma scales by (1 + w) (its norm weights are offsets from 1)",
            lambda: out(normed * w32),
        ),
        (
            "eps belongs inside the square root: x / sqrt(mean(x²) + eps)",
            lambda: out(x32 / (ms.sqrt() + eps) * (1 + w32)),
        ),
        ("eps is missing: x / sqrt(mean(x²) + eps)", lambda: out(x32 * torch.rsqrt(ms) * (1 + w32))),
        (
            "you subtracted the mean (that is LayerNorm); RMSNorm only divides by the root mean square",
            lambda: out(F.layer_norm(x32, x32.shape[-1:], eps=eps) * (1 + w32)),
        ),
        (
            "computed in bf16: convert x to fp32 first (x.float()) and cast the result back at the end",
            lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w),
        ),
        (
            "(1 + w) computed in bf16 loses precision: use 1.0 + self.weight.float()",
            lambda: out(normed * (1 + w).float()),
        ),
    ]


@_check("RMSNorm")
def check_rmsnorm(cls) -> str:
    """cls(dim) with a ``weight`` of zeros: x / rms(x) * (1 + w), computed in fp32."""
    C, eps = 64, 1e-6
    ref = _randomize_norms(RMSNorm(C, eps))
    mine = _copy_weights(ref, _build(cls, C))
    inputs = {
        "fp32 input": torch.randn(2, 5, C) * 3,
        "fp32 input with tiny values": torch.randn(2, 5, C) * 1e-3,
    }
    for what, x in inputs.items():
        causes = _rms_variants(x, ref.weight, eps)
        _expect_close(mine(x), ref(x), f"output for {what}", atol=1e-6, rtol=1e-5, causes=causes)

    ref, mine = ref.to(torch.bfloat16), mine.to(torch.bfloat16)
    x = inputs["fp32 input"].to(torch.bfloat16)
    got, expected = mine(x), ref(x)
    causes = _rms_variants(x, ref.weight, eps)
    _expect_close(got, expected, "output for a bf16 input", atol=0.0, rtol=2**-7, causes=causes)
    exact = (got == expected).float().mean().item()
    if exact < 0.99:  # within one bf16 step, but rounded differently too often
        cause = _likely_cause(got, causes, atol=0.0, rtol=0.0) or "; compute in fp32 and cast back once"
        raise Mismatch(f"bf16 output: only {exact:.0%} of the values equal the reference's" + cause)
    return "matches gemma_lite.layers.RMSNorm on fp32 and bf16 inputs"


# ================================================================ 03 RoPE


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by positions (T,) times inv_freq (D/2,)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return apply_rope(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    return apply_rope(x, *RotaryEmbedding(x.shape[-1], base)(positions, x.dtype))


def _rope_interleaved(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """The other RoPE convention: rotate neighbours (2i, 2i + 1)."""
    angles = positions.float()[:, None] * RotaryEmbedding(x.shape[-1], base).inv_freq()[None, :]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _rope_causes(x: torch.Tensor, positions: torch.Tensor, base: float) -> list[Cause]:
    D = x.shape[-1]
    other = 1_000_000.0 if base == 10_000.0 else 10_000.0
    return [
        (
            f"wrong base: you rotated with base {other:,.0f} where {base:,.0f} was asked",
            lambda: _rope(x, positions, other),
        ),
        (
            "positions ignored: rotate by the positions given, not by 0..T-1",
            lambda: _rope(x, torch.arange(x.shape[-2]), base),
        ),
        (
            "Gemma pairs dimension i with i + D/2 (rotate_half), not neighbours 2i and 2i + 1",
            lambda: _rope_interleaved(x, positions, base),
        ),
        (
            "rotated the wrong way: rotate_half(x) is (-x2, x1), not (x2, -x1)",
            lambda: _rope(x, -positions, base),
        ),
        (
            "frequencies: inv_freq = base ** (-2i / D) for i = 0 .. D/2 - 1",
            lambda: _rotate(x, positions, base ** (-torch.arange(D // 2).float() / D)),
        ),
    ]


def _rope_cases():
    x = torch.randn(2, 3, 6, 16)  # (B, H, T, D)
    for base in (10_000.0, 1_000_000.0):
        for positions in (torch.arange(6), torch.tensor([3, 4, 5, 40, 41, 200])):
            yield x, positions, base


def _compare_rotations(fn) -> None:
    """fn's rotations against gemma_lite.layers' on every case of ``_rope_cases``."""
    for x, positions, base in _rope_cases():
        _expect_close(
            fn(x, positions, base),
            _rope(x, positions, base),
            f"rotated x (base {base:,.0f}, positions {positions.tolist()})",
            causes=_rope_causes(x, positions, base),
        )


def _compare_modules(mine: nn.Module, ref: nn.Module, args: tuple, what: str, causes) -> None:
    """Same output for the same ``args``; on a mismatch, name the first submodule that diverges."""
    _expect_close(
        mine(*args),
        ref(*args),
        what,
        causes=causes,
        locate=lambda: _first_divergence(ref, mine, lambda: ref(*args), lambda: mine(*args)),
    )


@_check("rope")
def check_rope(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> str:
    """fn(x (B, H, T, D), positions (T,), base) -> x rotated, as gemma_lite.layers does it."""
    _compare_rotations(fn)
    return "rotations match gemma_lite.layers for both bases (10,000 and 1,000,000)"


# ================================================================ 04 attention


@_check("causal_mask")
def check_causal_mask(fn: Callable[[int], torch.Tensor]) -> str:
    """fn(T) -> (T, T) bool, True where query q may attend to key k (k <= q)."""
    for T in (1, 6):
        expected = attention_mask(torch.arange(T), torch.arange(T))[0, 0]
        causes = [
            ("rows are queries and columns keys: you built the transpose", lambda e=expected: e.T),
            ("a token also attends to itself: key <= query", lambda e=expected: e.tril(-1)),
        ]
        _expect_mask(fn(T), expected, f"causal_mask({T})", causes)
    return "each query sees itself and every earlier key"


@_check("sliding_window_mask")
def check_sliding_window_mask(fn: Callable[[int, int], torch.Tensor]) -> str:
    """fn(T, window) -> (T, T) bool: causal, and query - key < window."""
    for T, window in ((10, 4), (6, 1), (5, 8)):
        pos = torch.arange(T)
        causes = [
            (
                f"off by one: a window of {window} is the current token and the {window - 1} before it "
                f"(query - key < window); yours lets each query see {window + 1} keys",
                functools.partial(_window_variant, pos, pos, window, shift=1),
            ),
            (
                f"off by one: a window of {window} lets a query see {window} keys, itself included",
                functools.partial(_window_variant, pos, pos, window, shift=-1),
            ),
            (
                "not causal: the window must not reach future keys",
                functools.partial(lambda p, w: (p[:, None] - p[None, :]).abs() < w, pos, window),
            ),
            (
                "rows are queries and columns keys: you built the transpose",
                functools.partial(lambda p, w: _window_variant(p, p, w).T, pos, window),
            ),
        ]
        expected = attention_mask(pos, pos, window)[0, 0]
        _expect_mask(fn(T, window), expected, f"sliding_window_mask({T}, {window})", causes)
    return "causal, and each query sees exactly `window` keys (itself included)"


def _window_variant(query_pos, key_pos, window, *, skip_empty=True, shift=0) -> torch.Tensor:
    """attention_mask with switches for the usual mistakes. (T, S) bool."""
    q, k = query_pos[:, None], key_pos[None, :]
    allowed = k <= q
    if skip_empty:
        allowed = allowed & (k >= 0)
    if window is not None:
        allowed = allowed & (q - k < window + shift)
    return allowed


def _naive_attention(
    ref: Attention,
    x,
    rope,
    positions,
    *,
    window="same",
    scale=None,
    qk_norm=True,
    kv_heads="interleave",
    rope_first=False,
) -> torch.Tensor:
    """Attention written out plainly, with switches for the usual mistakes. x (B, T, C) -> (B, T, C)."""
    B, T, _ = x.shape
    H, K, D = ref.n_heads, ref.n_kv_heads, ref.head_dim
    window = ref.window if window == "same" else window
    q = ref.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = ref.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
    v = ref.v_proj(x).view(B, T, K, D).transpose(1, 2)
    norm_q, norm_k = (ref.q_norm, ref.k_norm) if qk_norm else (nn.Identity(), nn.Identity())
    if rope_first:
        q, k = norm_q(apply_rope(q, *rope)), norm_k(apply_rope(k, *rope))
    else:
        q, k = apply_rope(norm_q(q), *rope), apply_rope(norm_k(k), *rope)
    expand = torch.repeat_interleave if kv_heads == "interleave" else (lambda t, n, dim: t.repeat(1, n, 1, 1))
    k, v = expand(k, H // K, dim=1), expand(v, H // K, dim=1)  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) * (ref.scale if scale is None else scale)  # (B, H, T, T)
    allowed = attention_mask(positions, positions, window)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
    return ref.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@_check("Attention")
def check_attention(cls) -> str:
    """cls(cfg, is_global), forward(x (B, T, C), rope=(cos, sin), input_pos (T,)) -> (B, T, C)."""
    cfg = GemmaConfig.tiny()  # 4 query heads share 2 KV heads; window 8
    T = 20
    x, positions = torch.randn(2, T, cfg.d_model), torch.arange(T)
    for is_global in (False, True):
        kind = "global" if is_global else "local"
        ref = _randomize_norms(Attention(cfg, is_global))
        mine = _copy_weights(ref, _build(cls, cfg, is_global))
        base = cfg.rope_global_base if is_global else cfg.rope_local_base
        rope = RotaryEmbedding(cfg.head_dim, base)(positions, x.dtype)

        def variant(ref=ref, rope=rope, **change):
            return lambda: _naive_attention(ref, x, rope, positions, **change)

        causes = [
            ("the local layer ignores the sliding window", variant(window=None)),
            ("a global layer must not use the sliding window", variant(window=cfg.sliding_window)),
            ("QK-norm is missing: apply q_norm and k_norm to each head before RoPE", variant(qk_norm=False)),
            ("QK-norm goes before RoPE, not after", variant(rope_first=True)),
            (
                f"scale: Gemma scales scores by query_pre_attn_scalar ** -0.5 "
                f"({cfg.query_pre_attn_scalar:g} ** -0.5), not head_dim ** -0.5",
                variant(scale=cfg.head_dim**-0.5),
            ),
            (
                "query heads 0..G-1 share KV head 0: expand KV heads with repeat_interleave, not repeat",
                variant(kv_heads="tile"),
            ),
        ]
        _compare_modules(mine, ref, (x, rope, positions), f"{kind} attention output", causes)
    return "local (sliding window) and global layers match gemma_lite.layers.Attention (GQA, QK-norm)"


# ================================================================ 05 feed-forward and block


@_check("GeGLU")
def check_geglu(cls) -> str:
    """cls(d_model, d_ff): down(gelu_tanh(gate(x)) * up(x))."""
    C, Fw = 64, 128
    ref = GeGLU(C, Fw)
    mine = _copy_weights(ref, _build(cls, C, Fw))
    x = torch.randn(2, 5, C) * 2
    gate, up = ref.gate_proj(x), ref.up_proj(x)
    causes = [
        (
            "GELU approximation: Gemma uses the tanh one, F.gelu(x, approximate='tanh')",
            lambda: ref.down_proj(F.gelu(gate) * up),
        ),
        (
            "gate and up are swapped: GELU goes on gate_proj(x)",
            lambda: ref.down_proj(F.gelu(up, approximate="tanh") * gate),
        ),
        ("SiLU is SwiGLU (Llama); Gemma's GeGLU uses GELU", lambda: ref.down_proj(F.silu(gate) * up)),
        (
            "the gate is missing: multiply by up_proj(x)",
            lambda: ref.down_proj(F.gelu(gate, approximate="tanh")),
        ),
    ]
    _expect_close(mine(x), ref(x), "GeGLU output", causes=causes)
    return "down(gelu_tanh(gate(x)) * up(x)) matches gemma_lite.layers.GeGLU"


def _block_variant(ref: Block, x, rope, positions, mode: str) -> torch.Tensor:
    """How Block.forward comes out with a common mistake ("no_post", "norm_after_add", "parallel")."""

    def attn(h):
        return ref.attn(ref.attn_norm(h), rope, positions)

    if mode == "no_post":
        h = x + attn(x)
        return h + ref.ffn(ref.ffn_norm(h))
    if mode == "norm_after_add":
        h = ref.post_attn_norm(x + attn(x))
        return ref.post_ffn_norm(h + ref.ffn(ref.ffn_norm(h)))
    # parallel: both branches read the block input
    return x + ref.post_attn_norm(attn(x)) + ref.post_ffn_norm(ref.ffn(ref.ffn_norm(x)))


@_check("Block")
def check_block(cls) -> str:
    """cls(cfg, layer), forward(x (B, T, C), rope, input_pos) -> (B, T, C), sandwich norms."""
    cfg = GemmaConfig.tiny()  # global_every=3: layer 2 is global
    T = 20
    x, positions = torch.randn(2, T, cfg.d_model), torch.arange(T)
    for layer in (0, 2):
        ref = _randomize_norms(Block(cfg, layer))
        mine = _copy_weights(ref, _build(cls, cfg, layer))
        base = cfg.rope_global_base if ref.kind == "global" else cfg.rope_local_base
        rope = RotaryEmbedding(cfg.head_dim, base)(positions, x.dtype)
        other = Block(cfg, 1 if ref.kind == "global" else 2)
        other.load_state_dict(ref.state_dict())

        def variant(mode, ref=ref, rope=rope):
            return lambda: _block_variant(ref, x, rope, positions, mode)

        causes = [
            (
                "the post-norms are missing: normalize each branch's output (post_attn_norm, post_ffn_norm) "
                "before adding it to x",
                variant("no_post"),
            ),
            (
                "a norm was applied after the residual add: normalize the branch output, then add",
                variant("norm_after_add"),
            ),
            (
                "the feed-forward must read x after the attention residual, not the block input",
                variant("parallel"),
            ),
            (
                f"layer {layer} is {ref.kind}: use cfg.is_global(layer) to pick the attention kind",
                lambda other=other, rope=rope: other(x, rope, positions),
            ),
        ]
        _compare_modules(mine, ref, (x, rope, positions), f"layer {layer} ({ref.kind}) output", causes)
    return "local and global blocks match gemma_lite.layers.Block (four sandwich norms)"


# ================================================================ 06 the full model


def _parameter_difference(mine: nn.Module, ref: nn.Module) -> str | None:
    """Why the learner's loaded weights differ from the reference's, or None if they agree."""
    ref_params = dict(ref.named_parameters())
    for name, p in mine.named_parameters():
        if name not in ref_params:
            return f"the reference has no parameter '{name}'"
        r = ref_params[name]
        if p.shape != r.shape:
            return f"parameter '{name}' has shape {tuple(p.shape)}, expected {tuple(r.shape)}"
        if not torch.equal(p.to(r.dtype), r):
            offset = (p.float() - r.float()).mean().item()
            hint = ""
            if name.endswith("norm.weight") and abs(offset - 1.0) < 1e-3:
                hint = " by 1.0 everywhere: the GGUF stores norm weights as w + 1, subtract 1 when loading"
            return f"parameter '{name}' differs from the reference's{hint}"
    missing = [n for n in ref_params if n not in dict(mine.named_parameters())]
    return f"your model has no parameter '{missing[0]}'" if missing else None


def _model_causes(ref: Gemma, ids: torch.Tensor) -> list[Cause]:
    def without_final_norm():
        with _patched(ref, "final_norm", nn.Identity()):
            return ref(ids)

    def unscaled_embedding():
        with _patched(ref.tok_embed, "scale", 1.0):
            return ref(ids)

    def swapped_rope():
        swapped = nn.ModuleDict({"local": ref.rope["global"], "global": ref.rope["local"]})
        with _patched(ref, "rope", swapped):
            return ref(ids)

    return [
        ("the final norm is missing before the output head", without_final_norm),
        ("the embedding is not scaled by sqrt(d_model)", unscaled_embedding),
        (
            "local and global layers got each other's RoPE: local uses base 10,000, global 1,000,000",
            swapped_rope,
        ),
    ]


@_check("Gemma")
def check_model(model_or_cls, reference: Gemma | None = None) -> str:
    """A model class (checked on the tiny config, random weights) or a loaded model.

    A loaded model is compared with ``reference`` (default: the bundled weights,
    loaded here), first weight by weight, then logits on 40 random tokens.
    """
    if not isinstance(model_or_cls, nn.Module):  # a class (or factory) to build
        cfg = GemmaConfig.tiny()
        ref = _randomize_norms(Gemma(cfg))
        mine = _copy_weights(ref, _build(model_or_cls, cfg))
        ids = torch.randint(0, cfg.vocab_size, (2, 20))
        what, done = "logits (tiny config, random weights)", "the tiny model's logits match gemma_lite.Gemma"
    else:
        mine = model_or_cls.eval()
        if reference is None:
            from .loading import load

            reference, _ = load(device="cpu", dtype=torch.float32, progress=False)
        ref = reference.eval()
        problem = _parameter_difference(mine, ref)
        if problem:
            raise Mismatch(problem)
        ids = torch.randint(3, ref.cfg.vocab_size, (1, 40))
        what, done = "logits (real weights)", "every weight and the logits match the reference model"
    _expect_close(
        mine(ids),
        ref(ids),
        what,
        atol=1e-4,
        rtol=1e-4,
        causes=_model_causes(ref, ids),
        locate=lambda: _first_divergence(ref, mine, lambda: ref(ids), lambda: mine(ids)),
    )
    return done


# ================================================================ 07 generation


def _reference_probs(logits, temperature, top_k, top_p):
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


def _top_p_without_crossing(logits, temperature, top_k, top_p) -> torch.Tensor:
    """Top-p that keeps only tokens with cumulative probability <= p (drops the one crossing p)."""
    probs = _reference_probs(logits, temperature, top_k, None)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop_sorted = sorted_probs.cumsum(-1) > top_p
    kept = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return kept / kept.sum(-1, keepdim=True)


def _sampling_causes(logits, temperature, top_k, top_p) -> list[Cause]:
    causes = [
        (
            "temperature: divide the logits by it (you multiplied)",
            lambda: filter_logits(logits * temperature, top_k, top_p).softmax(-1),
        ),
        (
            "filter after the temperature: divide by the temperature first, then apply top-k / top-p",
            lambda: (filter_logits(logits, top_k, top_p) / temperature).softmax(-1),
        ),
    ]
    if top_p is not None:
        causes.append(
            (
                "top-p keeps the smallest set of tokens whose probability reaches p, including the token "
                "that crosses p",
                lambda: _top_p_without_crossing(logits, temperature, top_k, top_p),
            )
        )
    if top_k is not None:
        for k in (top_k - 1, top_k + 1):
            causes.append(
                (
                    f"top-k: keep exactly k = {top_k} tokens (you kept {k})",
                    lambda k=k: _reference_probs(logits, temperature, k, top_p),
                )
            )
    return causes


@_check("next_token_probs")
def check_sampling(fn) -> str:
    """fn(logits (B, V), temperature, top_k, top_p) -> probabilities (B, V) to sample from."""
    logits = torch.randn(3, 64) * 2
    cases = (
        (1.0, None, None),
        (0.7, None, None),
        (1.0, 5, None),
        (1.0, None, 0.9),
        (1.5, 20, 0.8),
        (0.5, None, 0.5),
    )
    for temperature, top_k, top_p in cases:
        what = f"probabilities for temperature={temperature}, top_k={top_k}, top_p={top_p}"
        got = _tensor(fn(logits.clone(), temperature, top_k, top_p), what)
        if got.shape == logits.shape:
            sums = got.float().sum(-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                row = int((sums - 1).abs().argmax())
                raise Mismatch(
                    f"{what}: row {row} sums to {sums[row].item():.4f}, not 1; renormalize "
                    "after filtering (the softmax of the filtered logits)"
                )
        _expect_close(
            got,
            _reference_probs(logits, temperature, top_k, top_p),
            what,
            atol=1e-6,
            causes=_sampling_causes(logits, temperature, top_k, top_p),
        )
    return "temperature, top-k and top-p give the reference probabilities"


def _greedy(model: Gemma, ids: torch.Tensor, n: int, last_only: bool = False) -> list[int]:
    seq, new = ids, []
    for _ in range(n):
        token = int(model(seq[:, -1:] if last_only else seq)[0, -1].argmax())
        new.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return new


@_check("generate")
def check_generate(fn) -> str:
    """fn(model, ids (1, T), max_new_tokens, stop_ids=()) -> the new token ids (greedy)."""
    cfg = GemmaConfig.tiny()
    model = _randomize_norms(Gemma(cfg))
    model.tok_embed.weight.mul_(0.05)  # else a random tied model just repeats its last token
    ids = torch.randint(3, cfg.vocab_size, (1, 6))
    expected = _greedy(model, ids, 12)
    got = fn(model, ids.clone(), 12)
    got = got.tolist() if isinstance(got, torch.Tensor) else [int(t) for t in got]
    causes = [
        ("one token too many: stop after max_new_tokens", lambda: _greedy(model, ids, 13)),
        ("one token too few: produce max_new_tokens", lambda: expected[:-1]),
        (
            "without a cache, feed the whole sequence at every step, not only the newest token",
            lambda: _greedy(model, ids, 12, last_only=True),
        ),
    ]
    _expect_equal(got, expected, "the greedy continuation", causes)

    k = next(i for i, t in enumerate(expected) if i and t not in expected[:i])
    stop = expected[k]
    got = fn(model, ids.clone(), 12, stop_ids={stop})
    got = got.tolist() if isinstance(got, torch.Tensor) else [int(t) for t in got]
    causes = [("the stop token ends the text and is not part of it", lambda: expected[: k + 1])]
    _expect_equal(got, expected[:k], f"the continuation with stop_ids={{{stop}}}", causes)
    return "greedy decoding, max_new_tokens and stop tokens behave like the reference loop"


# ================================================================ exercises 00: setup


@_check("bf16_round")
def check_bf16_round(fn: Callable[[float], float]) -> str:
    """fn(x) -> x rounded to bf16 (x first stored as fp32), by bit manipulation."""
    values = (25.298221281347036, 1.0, 0.1, -3.14159265, 1e-3, 1.00390625, 1.01171875, 65504.0, 3e38)

    def bits(x):
        return struct.unpack("<I", struct.pack("<f", x))[0]

    def from_bits(b):
        return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]

    for x in values:
        expected = torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()
        causes = [
            (
                "you cut off the low 16 bits; bf16 rounds to the nearest value",
                lambda x=x: from_bits(bits(x) & 0xFFFF0000),
            ),
            (
                "a tie (low bits exactly 0x8000) rounds to the even neighbour, not up",
                lambda x=x: from_bits((bits(x) + 0x8000) & 0xFFFF0000),
            ),
        ]
        _expect_equal(float(fn(x)), expected, f"bf16_round({x!r})", causes)
    return "rounds to nearest, ties to even, like x.to(torch.bfloat16)"


@_check("weight_bytes")
def check_weight_bytes(fn: Callable[[int, torch.dtype], int]) -> str:
    """fn(n_params, dtype) -> bytes to store that many values of that dtype."""
    for n, dtype in (
        (268_098_176, torch.float32),
        (268_098_176, torch.bfloat16),
        (268_098_176, torch.float16),
        (1000, torch.int8),
    ):
        size = torch.empty((), dtype=dtype).element_size()
        causes = [("that is bits: divide by 8", lambda n=n, size=size: n * size * 8)]
        _expect_equal(fn(n, dtype), n * size, f"weight_bytes({n:_}, {dtype})", causes)
    return "4 bytes per fp32 value, 2 per bf16 and fp16, 1 per int8"


# ================================================================ exercises 01: tokenizer

FALLBACK_TEXT = "Gemma reads 𓀀 and ꦲꦤ, naïve café, 🦩🦜 and สวัสดี, and 𓀀 again"


def _needs_bytes(tokenizer, char: str) -> bool:
    return any(p.startswith("<0x") for p in _pieces(tokenizer, tokenizer.encode(char, add_bos=False)))


@_check("byte_fallback_chars")
def check_byte_fallback_chars(fn, tokenizer) -> str:
    """fn(text, tokenizer) -> the characters spelled with <0xXX> byte pieces, first occurrence order."""
    expected = [c for c in dict.fromkeys(FALLBACK_TEXT) if _needs_bytes(tokenizer, c)]
    got = fn(FALLBACK_TEXT, tokenizer)
    causes = [("list each character once", lambda: [c for c in FALLBACK_TEXT if _needs_bytes(tokenizer, c)])]
    _expect_equal(list(got), expected, f"byte_fallback_chars({FALLBACK_TEXT!r})", causes)
    return f"finds the {len(expected)} characters that fall back to bytes"


@_check("pieces_to_text")
def check_pieces_to_text(fn: Callable[[list[str]], str], tokenizer) -> str:
    """fn(pieces) -> the text, like tokenizer.decode: '▁' is a space, <0xXX> runs are UTF-8 bytes."""
    for text in ("Hello world", "naïve café", "  two spaces", "𓀀 hieroglyph", "สวัสดี 🦩", "ꦲꦤ"):
        pieces = _pieces(tokenizer, tokenizer.encode(text, add_bos=False))
        causes = [
            ("'▁' is a space: replace it with ' '", lambda p=pieces: "".join(p)),
            (
                "byte pieces: gather consecutive <0xXX> pieces into bytes and decode them together as UTF-8",
                lambda p=pieces: "".join(
                    chr(int(x[3:5], 16)) if x.startswith("<0x") else x for x in p
                ).replace("▁", " "),
            ),
        ]
        _expect_equal(fn(pieces), text, f"pieces_to_text({pieces})", causes)
    return "decodes spaces and byte pieces like tokenizer.decode"


# ================================================================ exercises 02: embeddings


@_check("embed_by_onehot")
def check_embed_by_onehot(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """fn(ids (B, T), weight (V, C)) -> (B, T, C) as one_hot(ids) @ weight."""
    weight = torch.randn(50, 8)
    ids = torch.randint(0, 50, (2, 5))
    _expect_close(fn(ids, weight), weight[ids], "embed_by_onehot(ids, weight)", atol=1e-6)
    return "one_hot(ids) @ weight picks the same rows as weight[ids]"


def _neighbours(weight: torch.Tensor, token_id: int, k: int, cosine: bool = True, keep_self: bool = False):
    w = F.normalize(weight, dim=-1) if cosine else weight
    sims = w @ w[token_id]
    if not keep_self:
        sims[token_id] = float("-inf")
    return sims.topk(k).indices.tolist()


@_check("cosine_neighbours")
def check_cosine_neighbours(fn) -> str:
    """fn(weight (V, C), token_id, k) -> the k most cosine-similar other tokens, most similar first."""
    weight = torch.randn(200, 16) * torch.rand(200, 1) * 3  # rows of very different lengths
    for token_id in (3, 77):
        got = fn(weight, token_id, 5)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        causes = [
            (
                "the token itself is always its own nearest neighbour: leave it out",
                lambda t=token_id: _neighbours(weight, t, 5, keep_self=True),
            ),
            (
                "that is the dot product: normalize the rows first for cosine similarity",
                lambda t=token_id: _neighbours(weight, t, 5, cosine=False),
            ),
        ]
        _expect_equal(
            got, _neighbours(weight, token_id, 5), f"cosine_neighbours(weight, {token_id}, 5)", causes
        )
    return "ranks tokens by cosine similarity, leaving the token itself out"


# ================================================================ exercises 03: RoPE


@_check("rope_complex")
def check_rope_complex(fn) -> str:
    """fn(x (B, H, T, D), positions (T,), base) -> rotated x, computed with complex numbers."""
    _compare_rotations(fn)
    return "complex multiplication gives the same rotation as rotate_half"


@_check("wavelengths")
def check_wavelengths(fn: Callable[[int, float], torch.Tensor]) -> str:
    """fn(head_dim, base) -> (D/2,) tokens per full turn of each rotating pair."""
    for D, base in ((256, 10_000.0), (256, 1_000_000.0), (16, 10_000.0)):
        inv_freq = RotaryEmbedding(D, base).inv_freq()
        causes = [
            ("a full turn is 2π radians: wavelength = 2π / inv_freq", lambda f=inv_freq: 1 / f),
            ("that is the angular speed; the wavelength is its inverse times 2π", lambda f=inv_freq: f),
        ]
        _expect_close(
            fn(D, base), 2 * math.pi / inv_freq, f"wavelengths({D}, {base:,.0f})", rtol=1e-4, causes=causes
        )
    return "wavelength = 2π / inv_freq, from 2π tokens up to about 2π × base"


@_check("rope_matrix")
def check_rope_matrix(fn: Callable[[int, int, float], torch.Tensor]) -> str:
    """fn(position, head_dim, base) -> (D, D) matrix R with R @ x = x rotated for that position."""
    D = 16
    x = torch.randn(D, 5)  # five column vectors
    for base in (10_000.0, 1_000_000.0):
        for position in (0, 3, 200):

            def rotated(p, base=base):
                return _rope(x.T.reshape(1, 1, 5, D), torch.full((5,), p), base)[0, 0].T  # (D, 5)

            got = _tensor(fn(position, D, base), f"rope_matrix({position}, {D}, {base:,.0f})")
            if got.shape != (D, D):
                raise Mismatch(
                    f"rope_matrix({position}, {D}, {base:,.0f}) has shape {tuple(got.shape)}, "
                    f"expected ({D}, {D})"
                )
            causes = [
                (
                    "R @ x rotates backwards: you built the transpose (the rotation by -position)",
                    lambda p=position, rotated=rotated: rotated(-p),
                ),
                (
                    "Gemma pairs dimension i with i + D/2, not neighbours 2i and 2i + 1",
                    lambda p=position, base=base: (
                        _rope_interleaved(x.T.reshape(1, 1, 5, D), torch.full((5,), p), base)[0, 0].T
                    ),
                ),
            ]
            _expect_close(
                got.float() @ x,
                rotated(position),
                f"rope_matrix({position}, {D}, {base:,.0f}) @ x",
                causes=causes,
            )
    return "R(p) @ x rotates x exactly like rope(x, p)"


# ================================================================ exercises 04: attention


@_check("window_mask")
def check_window_mask(fn) -> str:
    """fn(query_pos (T,), key_pos (S,), window or None) -> (T, S) bool; key_pos -1 marks an empty slot."""
    cases = (
        (torch.tensor([10, 11, 12]), torch.tensor([8, 9, 10, 11, 12, 5, 6, 7]), 4),  # a ring of 8 slots
        (torch.tensor([2]), torch.tensor([0, 1, 2, -1, -1, -1]), 4),  # a cache still filling up
        (torch.tensor([3, 4]), torch.tensor([0, 1, 2, 3, 4, -1]), None),  # a global layer
    )
    for query_pos, key_pos, window in cases:
        slots = torch.arange(len(key_pos))
        causes = [
            (
                "empty slots (position -1) must never be attended",
                lambda q=query_pos, k=key_pos, w=window: _window_variant(q, k, w, skip_empty=False),
            ),
            (
                "compare positions, not slot indices: slot i holds position key_pos[i]",
                lambda q=query_pos, w=window, s=slots: _window_variant(q, s, w),
            ),
            (
                "off by one: a query sees keys with query - key < window",
                lambda q=query_pos, k=key_pos, w=window: _window_variant(q, k, w, shift=1),
            ),
        ]
        what = f"window_mask({query_pos.tolist()}, {key_pos.tolist()}, {window})"
        _expect_mask(
            fn(query_pos, key_pos, window), attention_mask(query_pos, key_pos, window)[0, 0], what, causes
        )
    return "works on any positions: ring slots, empty slots and global layers"


def _grouped_sdpa(q, k, v, mask, scale):
    """The package's way: G query heads stacked as G*T rows against their KV head."""
    B, H, T, D = q.shape
    K = k.shape[1]
    out = F.scaled_dot_product_attention(
        q.reshape(B, K, H // K * T, D), k, v, attn_mask=mask.repeat(H // K, 1), scale=scale
    )
    return out.view(B, H, T, D)


@_check("grouped_attention")
def check_grouped_attention(fn) -> str:
    """fn(q (B, H, T, D), k, v (B, K, S, D), mask (T, S) bool, scale) -> (B, H, T, D)."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = attention_mask(torch.arange(2, 7), torch.arange(7), 3)[0, 0]
    scale = 0.3

    def plain(kv_map, use_mask=True, s=scale):
        kk, vv = kv_map(k), kv_map(v)
        scores = q @ kk.transpose(-1, -2) * s
        if use_mask:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ vv

    causes = [
        (
            "consecutive query heads form a group: heads 0 and 1 share KV head 0, not heads 0 and 2 "
            "(view q as (B, K, G, T, D), or use repeat_interleave, not repeat)",
            lambda: plain(lambda t: t.repeat(1, 2, 1, 1)),
        ),
        ("the mask is not applied", lambda: plain(lambda t: t.repeat_interleave(2, 1), use_mask=False)),
        ("the scores must be multiplied by scale", lambda: plain(lambda t: t.repeat_interleave(2, 1), s=1.0)),
    ]
    _expect_close(
        fn(q, k, v, mask, scale),
        _grouped_sdpa(q, k, v, mask, scale),
        "grouped_attention output",
        causes=causes,
    )
    return "each group of query heads attends with its own KV head, like the package"


def _kv_bytes(cfg: GemmaConfig, context: int, dtype: torch.dtype, all_global=False, heads=None, tensors=2):
    size = torch.empty((), dtype=dtype).element_size()
    per_pos = tensors * (heads or cfg.n_kv_heads) * cfg.head_dim * size
    kept = [
        context if (all_global or cfg.is_global(i)) else min(context, cfg.sliding_window)
        for i in range(cfg.n_layers)
    ]
    return per_pos * sum(kept)


@_check("kv_cache_bytes")
def check_kv_cache_bytes(fn) -> str:
    """fn(cfg, context, dtype) -> bytes of keys and values all layers keep for ``context`` tokens."""
    real, tiny = GemmaConfig.gemma3_270m(), GemmaConfig.tiny()
    for cfg, context, dtype in (
        (real, 100, torch.bfloat16),
        (real, 32_768, torch.bfloat16),
        (real, 512, torch.float32),
        (tiny, 20, torch.float32),
    ):
        causes = [
            (
                "local layers keep only the last sliding_window positions: min(context, window)",
                lambda c=cfg, t=context, d=dtype: _kv_bytes(c, t, d, all_global=True),
            ),
            (
                "keys and values: two tensors per layer",
                lambda c=cfg, t=context, d=dtype: _kv_bytes(c, t, d, tensors=1),
            ),
            (
                "the cache stores n_kv_heads heads (GQA), not n_heads",
                lambda c=cfg, t=context, d=dtype: _kv_bytes(c, t, d, heads=c.n_heads),
            ),
        ]
        name = "270m" if cfg == real else "tiny"
        _expect_equal(
            fn(cfg, context, dtype),
            _kv_bytes(cfg, context, dtype),
            f"kv_cache_bytes({name}, {context}, {dtype})",
            causes,
        )
    return "2 × K × D × bytes per position, full context for global layers, the window for local ones"


# ================================================================ exercises 05: block


@_check("block_parameters")
def check_block_parameters(fn: Callable[[GemmaConfig], int]) -> str:
    """fn(cfg) -> the number of parameters of one Block, counted by hand."""
    for name, cfg in (("tiny", GemmaConfig.tiny()), ("270m", GemmaConfig.gemma3_270m())):
        C, D = cfg.d_model, cfg.head_dim
        expected = sum(p.numel() for p in Block(cfg, 0).parameters())
        causes = [
            (
                "the norms count too: four of width d_model and the two QK-norms of width head_dim",
                lambda e=expected, C=C, D=D: e - 4 * C - 2 * D,
            ),
            ("the QK-norms (q_norm, k_norm: head_dim each) are missing", lambda e=expected, D=D: e - 2 * D),
            (
                "K and V have n_kv_heads × head_dim outputs each, not n_heads × head_dim",
                lambda e=expected, c=cfg: e + 2 * c.d_model * (c.n_heads - c.n_kv_heads) * c.head_dim,
            ),
            ("GeGLU has three matrices: gate, up and down", lambda e=expected, c=cfg: e - c.d_model * c.d_ff),
        ]
        _expect_equal(fn(cfg), expected, f"block_parameters({name})", causes)
    return "matches the parameter count of gemma_lite.layers.Block"


@_check("gelu_tanh")
def check_gelu_tanh(fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """fn(x) -> 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))."""
    x = torch.linspace(-6, 6, 101)
    causes = [("that is the exact (erf) GELU; write the tanh formula", lambda: F.gelu(x))]
    _expect_close(fn(x), F.gelu(x, approximate="tanh"), "gelu_tanh(x)", atol=1e-6, causes=causes)
    return "matches F.gelu(x, approximate='tanh')"


def _block_macs(cfg: GemmaConfig, layer: int, T: int, *, window=True, kv_heads=None, ffn_mats=3, attn=2):
    """Multiply-adds of one block for the last of T tokens, with switches for the usual mistakes."""
    C, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
    K = kv_heads or cfg.n_kv_heads
    keys = T if (cfg.is_global(layer) or not window) else min(T, cfg.sliding_window)
    projections = C * H * D + 2 * C * K * D + H * D * C  # q, k and v, o
    return projections + attn * H * D * keys + ffn_mats * C * cfg.d_ff


@_check("block_macs")
def check_block_macs(fn: Callable[[GemmaConfig, int, int], int]) -> str:
    """fn(cfg, layer, T) -> multiply-adds one block spends on the last of T tokens (norms aside)."""
    real, tiny = GemmaConfig.gemma3_270m(), GemmaConfig.tiny()
    for name, cfg, layer, T in (
        ("270m", real, 0, 100),
        ("270m", real, 0, 4096),
        ("270m", real, 5, 4096),
        ("tiny", tiny, 1, 20),
        ("tiny", tiny, 2, 20),
    ):
        args = (cfg, layer, T)
        causes = [
            (
                "a local layer attends to at most sliding_window keys: min(T, window)",
                lambda a=args: _block_macs(*a, window=False),
            ),
            (
                "the key and value projections have n_kv_heads × head_dim outputs, not n_heads × head_dim",
                lambda a=args: _block_macs(*a, kv_heads=a[0].n_heads),
            ),
            (
                "GeGLU has three matrices (gate, up, down), each d_model × d_ff",
                lambda a=args: _block_macs(*a, ffn_mats=2),
            ),
            (
                "attention over S keys costs H × D × S twice: the scores, then the weighted sum of values",
                lambda a=args: _block_macs(*a, attn=1),
            ),
        ]
        _expect_equal(fn(*args), _block_macs(*args), f"block_macs({name}, layer {layer}, T={T})", causes)
    return "projections, attention over the keys in view, and the three GeGLU matrices"


# ================================================================ exercises 06: the full model


@_check("parameter_count")
def check_parameter_count(fn: Callable[..., int]) -> str:
    """fn(cfg, tied=True) -> parameters of the whole model; tied=False counts a separate output head."""
    tiny = GemmaConfig.tiny()
    tiny_count = Gemma(tiny).num_parameters()
    real_count = 268_098_176
    head = GemmaConfig.gemma3_270m().vocab_size * GemmaConfig.gemma3_270m().d_model
    for name, cfg, tied, expected, extra in (
        ("tiny", tiny, True, tiny_count, tiny.vocab_size * tiny.d_model),
        ("tiny", tiny, False, tiny_count + tiny.vocab_size * tiny.d_model, tiny.vocab_size * tiny.d_model),
        ("270m", GemmaConfig.gemma3_270m(), True, real_count, head),
        ("270m", GemmaConfig.gemma3_270m(), False, real_count + head, head),
    ):
        causes = [
            ("the tied output head reuses the embedding: count it once", lambda e=expected, x=extra: e + x),
            ("an untied head is a second vocab_size × d_model matrix", lambda e=expected, x=extra: e - x),
            ("the final norm (d_model weights) is missing", lambda e=expected, c=cfg: e - c.d_model),
        ]
        _expect_equal(fn(cfg, tied=tied), expected, f"parameter_count({name}, tied={tied})", causes)
    return f"{real_count:,} tied, {real_count + head:,} with a separate head"


def _logit_lens(model: Gemma, ids: torch.Tensor, layer: int, final_norm: bool = True) -> torch.Tensor:
    hidden = _outputs_by_module(model, {f"blocks.{layer}"}, lambda: model(ids))[f"blocks.{layer}"][0]
    return model.output_head(model.final_norm(hidden) if final_norm else hidden)


@_check("logit_lens")
def check_logit_lens(fn) -> str:
    """fn(model, ids (B, T), layer) -> logits (B, T, V) read from the output of blocks[layer]."""
    model = _randomize_norms(Gemma(GemmaConfig.tiny()))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 10))
    for layer in (0, 3, model.cfg.n_layers - 1):
        causes = [
            (
                "apply the final norm before the output head",
                lambda la=layer: _logit_lens(model, ids, la, False),
            ),
            (
                "off by one: read the output of blocks[layer]",
                lambda la=layer: _logit_lens(model, ids, la - 1) if la else _logit_lens(model, ids, 1),
            ),
        ]
        _expect_close(
            fn(model, ids, layer),
            _logit_lens(model, ids, layer),
            f"logit_lens(model, ids, {layer})",
            causes=causes,
        )
    return "reads the residual stream after any layer through the final norm and the tied head"


# ================================================================ exercises 07: generation


@_check("repetition_penalty")
def check_repetition_penalty(fn) -> str:
    """fn(logits (V,), seen_ids (list of ints), penalty) -> new logits; the input is left unchanged."""
    logits = torch.randn(32) * 3
    seen = [3, 7, 7, 12, 20]
    for penalty in (1.3, 2.0):
        original = logits.clone()
        got = fn(logits, seen, penalty)
        if not torch.equal(logits, original):
            raise Mismatch("you changed the caller's logits in place: work on logits.clone()")
        expected = apply_repetition_penalty(logits[None], [torch.tensor(seen)], penalty)[0]
        causes = [
            (
                "negative logits must be multiplied by the penalty (dividing them would raise them)",
                lambda p=penalty: torch.where(
                    torch.isin(torch.arange(32), torch.tensor(seen)), logits / p, logits
                ),
            ),
            (
                "a token seen twice is penalized once",
                lambda p=penalty: apply_repetition_penalty(
                    apply_repetition_penalty(logits[None], [torch.tensor(seen)], p), [torch.tensor([7])], p
                )[0],
            ),
        ]
        _expect_close(
            _tensor(got, "penalized logits"), expected, f"penalized logits (penalty {penalty})", causes=causes
        )
    return "seen tokens become less likely, positive and negative logits alike"


def _min_p(logits: torch.Tensor, min_p: float, relative: bool = True) -> torch.Tensor:
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values if relative else min_p
    kept = probs.masked_fill(probs < threshold, 0.0)
    return kept / kept.sum(-1, keepdim=True)


@_check("min_p_probs")
def check_min_p(fn) -> str:
    """fn(logits (B, V), min_p) -> probabilities keeping tokens with p >= min_p * max p."""
    logits = torch.randn(3, 64) * 2
    for min_p in (0.05, 0.2, 0.5):
        causes = [
            (
                "the threshold is relative: min_p × the top token's probability",
                lambda m=min_p: _min_p(logits, m, relative=False),
            ),
            (
                "renormalize the kept probabilities so they sum to 1",
                lambda m=min_p: logits.softmax(-1).masked_fill(
                    logits.softmax(-1) < m * logits.softmax(-1).max(-1, keepdim=True).values, 0.0
                ),
            ),
        ]
        _expect_close(
            fn(logits.clone(), min_p),
            _min_p(logits, min_p),
            f"min_p_probs(logits, {min_p})",
            atol=1e-6,
            causes=causes,
        )
    return "keeps the tokens within min_p of the top one and renormalizes"


def _logprob(model: Gemma, ids: torch.Tensor, start: int, shift: int = 1) -> float:
    logp = model(ids)[0].float().log_softmax(-1)  # (T, V)
    return sum(float(logp[t - shift, ids[0, t]]) for t in range(max(start, shift), ids.shape[1]))


@_check("sequence_logprob")
def check_sequence_logprob(fn) -> str:
    """fn(model, ids (1, T), prompt_len) -> sum of log p(ids[t] | ids[:t]) for t >= prompt_len."""
    model = _randomize_norms(Gemma(GemmaConfig.tiny()))
    ids = torch.randint(3, model.cfg.vocab_size, (1, 12))
    for prompt_len in (4, 1):
        expected = _logprob(model, ids, prompt_len)
        got = float(fn(model, ids, prompt_len))
        causes = [
            ("the logits at position t - 1 predict token t", lambda s=prompt_len: _logprob(model, ids, s, 0)),
            ("count only the tokens after the prompt", lambda: _logprob(model, ids, 1)),
        ]
        if not math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-3):
            cause = next((c for c, v in causes if math.isclose(got, v(), rel_tol=1e-4, abs_tol=1e-3)), None)
            raise Mismatch(
                f"sequence_logprob(model, ids, {prompt_len}) is {got:.4f}, expected {expected:.4f}"
                + (f"; likely cause: {cause}" if cause else "")
            )
    return "sums the log-probabilities of the continuation"
