"""Every check both ways: the reference passes, known mistakes fail and are named.

Each wrong variant below is a mistake a learner is likely to make; the test
asserts that the check fails and that its message names the cause.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import struct

import pytest
import torch
import torch.nn.functional as F
from helpers import fails, passes, tiny_model_for, todo

from gemma_lite import checks
from gemma_lite.checks import ch06_model, ch13_export
from gemma_lite.config import GemmaConfig
from gemma_lite.generate import Generator, StepGenerator, apply_repetition_penalty, filter_logits
from gemma_lite.layers import (
    Attention,
    Block,
    GeGLU,
    RMSNorm,
    RotaryEmbedding,
    ScaledEmbedding,
    apply_rope,
    attention_mask,
    rotate_half,
)
from gemma_lite.model import Gemma

# ---------------------------------------------------------------- not done yet


class TodoNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        raise NotImplementedError


def test_every_chapter_check_is_exported():
    for info in pkgutil.iter_modules(checks.__path__):
        module = importlib.import_module(f"{checks.__name__}.{info.name}")
        for name in (n for n in dir(module) if n.startswith("check_")):
            assert getattr(checks, name, None) is getattr(module, name), f"{info.name}.{name} is not exported"


CHECKS_WITH_TOKENIZER = {"check_bpe_encode", "check_byte_fallback_chars", "check_pieces_to_text"}
ALL_CHECKS = sorted(name for name in dir(checks) if name.startswith("check_"))


@pytest.mark.parametrize("name", ALL_CHECKS)
def test_unfinished_code_is_not_done_yet(name, tokenizer, capsys):
    args = (todo,) + ((tokenizer,) if name in CHECKS_WITH_TOKENIZER else ())
    if name == "check_my_gemma":  # the capstone: the learner's model class and their loader
        args = (todo, todo)
    if name == "check_my_cache":  # the capstone: a model, then the learner's two caches and attention
        args = (Gemma(GemmaConfig.tiny()), todo, todo, todo, tokenizer)
    if name == "check_my_compiled_gemma":  # the capstone: a generator around the learner's step
        model, chars = tiny_model_for()
        caches = lambda batch, max_len: list(model.new_cache(batch, max_len).layers)  # noqa: E731
        args = (StepGenerator(model, chars, todo, caches), Generator(model, chars), "hello")
    result = getattr(checks, name)(*args)
    out = capsys.readouterr().out
    assert not result and not result.done
    assert out == f"{checks.TODO} not done yet: fill in the TODO in todo\n"


def test_not_done_names_the_method(capsys):
    assert not checks.check_rmsnorm(TodoNorm)
    assert "fill in the TODO in TodoNorm.forward" in capsys.readouterr().out


def test_a_crash_is_one_line_without_traceback(capsys):
    def crashes(x, positions, base):
        return x @ x  # wrong shapes

    fails(checks.check_rope(crashes), capsys, "your code raised RuntimeError", "in test_a_crash")


def test_a_crash_on_what_your_code_returned_names_no_check_internals(capsys):
    fails(checks.check_bf16_round(lambda x: "a string"), capsys, "raised ValueError", "(in your code)")


def test_checks_leave_the_global_random_state_alone(capsys):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    checks.check_gelu_tanh(lambda x: F.gelu(x, approximate="tanh"))
    assert torch.equal(before, torch.random.get_rng_state())


# ---------------------------------------------------------------- 00 setup


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def test_pick_device(capsys):
    passes(checks.check_pick_device(pick_device), capsys)
    fails(checks.check_pick_device(lambda: "cpu"), capsys, "expected 'cuda'")
    mps_first = lambda: "mps" if torch.backends.mps.is_available() else pick_device()  # noqa: E731
    fails(checks.check_pick_device(mps_first), capsys, "CUDA yes, MPS yes you picked 'mps'")


# ---------------------------------------------------------------- 01 tokenizer


def bpe_encode(text, vocab, space="▁", fallback=True):
    symbols = []
    for ch in text.replace(" ", space):
        if ch in vocab or not fallback:
            symbols.append(ch)
        else:
            symbols += [f"<0x{b:02X}>" for b in ch.encode()]
    while True:
        pairs = [
            (vocab[a + b], i)
            for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
            if a + b in vocab
        ]
        if not pairs:
            return [vocab.get(s, 3) for s in symbols]
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def test_bpe_encode(tokenizer, capsys):
    passes(checks.check_bpe_encode(bpe_encode, tokenizer), capsys)
    fails(checks.check_bpe_encode(lambda t, v: bpe_encode(t, v, space=" "), tokenizer), capsys, "'▁'")
    fails(
        checks.check_bpe_encode(lambda t, v: bpe_encode(t, v, fallback=False), tokenizer),
        capsys,
        "UTF-8 byte",
    )
    fails(checks.check_bpe_encode(lambda t, v: list(t), tokenizer), capsys, "token ids")


# ---------------------------------------------------------------- 02 embeddings and RMSNorm


class UnscaledEmbedding(ScaledEmbedding):
    def forward(self, ids):
        return self.weight[ids]


class UnroundedScale(ScaledEmbedding):
    def forward(self, ids):
        return self.weight[ids] * self.scale


def test_embedding(capsys):
    passes(checks.check_embedding(ScaledEmbedding), capsys)
    fails(checks.check_embedding(UnscaledEmbedding), capsys, "fp32", "scale is missing")
    fails(checks.check_embedding(UnroundedScale), capsys, "bf16", "25.25")


def norm_class(formula):
    class Norm(RMSNorm):
        def forward(self, x):
            return formula(x, self.weight, self.eps)

    return Norm


def _normed(x, eps=1e-6):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(
    "formula, cause",
    [
        (lambda x, w, eps: (_normed(x) * w.float()).type_as(x), "(1 + w)"),
        (
            lambda x, w, eps: (x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * (1 + w)).type_as(x),
            "inside",
        ),
        (
            lambda x, w, eps: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * (1 + w)).type_as(x),
            "missing",
        ),
        (lambda x, w, eps: F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + w), "LayerNorm"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w), "fp32"),
        (lambda x, w, eps: (_normed(x) * (1 + w).float()).type_as(x), "1.0 + self.weight.float()"),
        (lambda x, w, eps: _normed(x) * (1 + w.float()), "dtype"),
    ],
)
def test_rmsnorm(formula, cause, capsys):
    fails(checks.check_rmsnorm(norm_class(formula)), capsys, cause)


def test_rmsnorm_reference_passes(capsys):
    passes(checks.check_rmsnorm(RMSNorm), capsys)


def test_rmsnorm_with_other_parameter_names(capsys):
    class Named(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(dim))

    fails(checks.check_rmsnorm(Named), capsys, "no parameter 'weight'")


# ---------------------------------------------------------------- 03 RoPE


def rope(x, positions, base):
    return apply_rope(x, *RotaryEmbedding(x.shape[-1], base)(positions, x.dtype))


def rope_complex(x, positions, base):
    D = x.shape[-1]
    angles = positions.float()[:, None] * RotaryEmbedding(D, base).inv_freq()[None, :]  # (T, D/2)
    pairs = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([pairs.real, pairs.imag], dim=-1)


def test_rope(capsys):
    passes(checks.check_rope(rope), capsys)
    passes(checks.check_rope_complex(rope_complex), capsys)
    fails(checks.check_rope(lambda x, p, base: rope(x, p, 10_000.0)), capsys, "wrong base")
    fails(
        checks.check_rope(lambda x, p, base: rope(x, torch.arange(x.shape[-2]), base)),
        capsys,
        "positions ignored",
    )
    fails(checks.check_rope(lambda x, p, base: rope(x, -p, base)), capsys, "wrong way")
    fails(
        checks.check_rope_complex(
            lambda x, p, base: torch.view_as_real(
                torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
                * torch.polar(
                    torch.ones(len(p), x.shape[-1] // 2),
                    p.float()[:, None] * RotaryEmbedding(x.shape[-1], base).inv_freq(),
                )
            ).flatten(-2)
        ),
        capsys,
        "2i + 1",
    )

    def slow_freq(x, p, base):
        D = x.shape[-1]
        angles = p.float()[:, None] * base ** (-torch.arange(D // 2).float() / D)
        angles = torch.cat([angles, angles], -1)
        return x * angles.cos() + rotate_half(x) * angles.sin()

    fails(checks.check_rope(slow_freq), capsys, "-2i / D")


def test_wavelengths_and_scores(capsys):
    inv = lambda D, base: RotaryEmbedding(D, base).inv_freq()  # noqa: E731
    passes(checks.check_wavelengths(lambda D, base: 2 * math.pi / inv(D, base)), capsys)
    fails(checks.check_wavelengths(lambda D, base: 1 / inv(D, base)), capsys, "2π")

    def rope_matrix(position, head_dim, base):
        eye = torch.eye(head_dim).view(head_dim, 1, 1, head_dim)  # each basis vector as a (1, 1, D) tensor
        return rope(eye, torch.tensor([position]), base).view(head_dim, head_dim).T

    passes(checks.check_rope_matrix(rope_matrix), capsys)
    fails(checks.check_rope_matrix(lambda p, d, b: rope_matrix(p, d, b).T), capsys, "transpose")


# ---------------------------------------------------------------- 04 attention


def causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def sliding_window_mask(T, window, extra=0):
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (k <= q) & (q - k < window + extra)


def test_masks(capsys):
    passes(checks.check_causal_mask(causal_mask), capsys)
    fails(checks.check_causal_mask(lambda T: causal_mask(T).T), capsys, "transpose")
    fails(checks.check_causal_mask(lambda T: causal_mask(T).float()), capsys, "bool mask")
    fails(checks.check_causal_mask(lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1)), capsys, "itself")
    passes(checks.check_sliding_window_mask(sliding_window_mask), capsys)
    out = fails(
        checks.check_sliding_window_mask(lambda T, w: sliding_window_mask(T, w, 1)), capsys, "off by one"
    )
    assert "query 4 may attend to key 0" in out
    fails(checks.check_sliding_window_mask(lambda T, w: sliding_window_mask(T, w, -1)), capsys, "off by one")


def window_mask(query_pos, key_pos, window, empty_ok=False):
    q, k = query_pos[:, None], key_pos[None, :]
    allowed = (k <= q) & (empty_ok | (k >= 0))
    return allowed if window is None else allowed & (q - k < window)


def test_window_mask(capsys):
    passes(checks.check_window_mask(window_mask), capsys)
    fails(
        checks.check_window_mask(lambda q, k, w: window_mask(q, k, w, empty_ok=True)), capsys, "empty slots"
    )
    fails(checks.check_window_mask(lambda q, k, w: window_mask(q, torch.arange(len(k)), w)), capsys, "slot")


class NoQKNorm(Attention):
    def __init__(self, cfg, is_global):
        super().__init__(cfg, is_global)
        self.q_norm.forward = self.k_norm.forward = lambda x: x


class NoWindow(Attention):
    def __init__(self, cfg, is_global):
        super().__init__(cfg, is_global)
        self.window = None


class HeadDimScale(Attention):
    def __init__(self, cfg, is_global):
        super().__init__(cfg, is_global)
        self.scale = cfg.head_dim**-0.5


class TiledHeads(Attention):
    def forward(self, x, rope, input_pos):
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, H, D)).transpose(1, 2), *rope)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, K, D)).transpose(1, 2), *rope)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        k, v = k.repeat(1, H // K, 1, 1), v.repeat(1, H // K, 1, 1)
        mask = attention_mask(input_pos, input_pos, self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize(
    "cls, cause",
    [
        (NoQKNorm, "QK-norm"),
        (NoWindow, "sliding window"),
        (HeadDimScale, "query_pre_attn_scalar"),
        (TiledHeads, "repeat_interleave"),
    ],
)
def test_attention_mistakes(cls, cause, capsys):
    fails(checks.check_attention(cls), capsys, cause)


def test_attention_reference_passes(capsys):
    passes(checks.check_attention(Attention), capsys)


def test_grouped_attention(capsys):
    def gqa(q, k, v, mask, scale, expand=torch.repeat_interleave):
        G = q.shape[1] // k.shape[1]
        k, v = expand(k, G, dim=1), expand(v, G, dim=1)
        return (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1) @ v

    passes(checks.check_grouped_attention(gqa), capsys)
    tile = lambda t, G, dim: t.repeat(1, G, 1, 1)  # noqa: E731
    fails(checks.check_grouped_attention(lambda *a: gqa(*a, expand=tile)), capsys, "consecutive query heads")


def test_kv_cache_bytes(capsys):
    def kv_bytes(cfg, context, dtype, window=True):
        size = torch.empty((), dtype=dtype).element_size()
        kept = sum(
            context if cfg.is_global(i) or not window else min(context, cfg.sliding_window)
            for i in range(cfg.n_layers)
        )
        return 2 * cfg.n_kv_heads * cfg.head_dim * size * kept

    passes(checks.check_kv_cache_bytes(kv_bytes), capsys)
    fails(checks.check_kv_cache_bytes(lambda *a: kv_bytes(*a, window=False)), capsys, "min(context, window)")
    fails(checks.check_kv_cache_bytes(lambda *a: kv_bytes(*a) // 2), capsys, "two tensors")


# ---------------------------------------------------------------- 05 feed-forward and block


def geglu_class(act):
    class Variant(GeGLU):
        def forward(self, x):
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))

    return Variant


def test_geglu(capsys):
    passes(checks.check_geglu(GeGLU), capsys)
    fails(checks.check_geglu(geglu_class(F.gelu)), capsys, "tanh")
    fails(checks.check_geglu(geglu_class(F.silu)), capsys, "SwiGLU")


def block_class(mode):
    class Variant(Block):
        def forward(self, x, rope, input_pos):
            if mode == "pre_norm_only":
                x = x + self.attn(self.attn_norm(x), rope, input_pos)
                return x + self.ffn(self.ffn_norm(x))
            # parallel
            h = self.post_attn_norm(self.attn(self.attn_norm(x), rope, input_pos))
            return x + h + self.post_ffn_norm(self.ffn(self.ffn_norm(x)))

    return Variant


class AllLocal(Block):
    def __init__(self, cfg, layer):
        super().__init__(cfg, 0)


def test_block(capsys):
    passes(checks.check_block(Block), capsys)
    fails(checks.check_block(block_class("pre_norm_only")), capsys, "post-norms are missing")
    fails(checks.check_block(block_class("parallel")), capsys, "after the attention residual")
    fails(checks.check_block(AllLocal), capsys, "layer 2 is global")


def test_block_parameters_and_gelu(capsys):
    def count(cfg, norms=True):
        C, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        attn = C * H * D * 2 + C * K * D * 2
        return attn + 3 * C * cfg.d_ff + (4 * C + 2 * D if norms else 0)

    passes(checks.check_block_parameters(count), capsys)
    fails(checks.check_block_parameters(lambda cfg: count(cfg, norms=False)), capsys, "norms count")
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    passes(checks.check_gelu_tanh(gelu), capsys)
    fails(checks.check_gelu_tanh(F.gelu), capsys, "erf")


def test_block_macs(capsys):
    def macs(cfg, layer, T, window=True):
        C, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        keys = min(T, cfg.sliding_window) if window and not cfg.is_global(layer) else T
        return 2 * C * H * D + 2 * C * K * D + 2 * H * D * keys + 3 * C * cfg.d_ff

    passes(checks.check_block_macs(macs), capsys)
    fails(checks.check_block_macs(lambda *a: macs(*a, window=False)), capsys, "min(T, window)")


# ---------------------------------------------------------------- 06 the full model


class NoFinalNorm(Gemma):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.final_norm.forward = lambda x: x


class UntiedHead(Gemma):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)


class SameRope(Gemma):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.rope["local"] = RotaryEmbedding(cfg.head_dim, cfg.rope_global_base)


def test_model_class(capsys):
    passes(checks.check_model(Gemma), capsys)
    fails(checks.check_model(NoFinalNorm), capsys, "final norm")
    fails(checks.check_model(UntiedHead), capsys, "lm_head", "tied")
    fails(checks.check_model(SameRope), capsys, "first submodule whose output differs is 'rope.local'")


@pytest.mark.slow
def test_model_with_real_weights(real, capsys):
    model, _ = real
    copy = Gemma(model.cfg)
    copy.load_state_dict(model.state_dict())
    passes(checks.check_model(copy, reference=model), capsys)
    with torch.no_grad():
        copy.blocks[0].attn_norm.weight += 1.0
    fails(checks.check_model(copy, reference=model), capsys, "blocks.0.attn_norm.weight", "w + 1")


def test_a_loaded_model_is_compared_with_the_bundled_weights(monkeypatch, capsys):
    reference = Gemma(GemmaConfig.tiny())
    loads = []

    def load(**kwargs):
        loads.append(kwargs)
        return reference, None

    monkeypatch.setattr(ch06_model, "load", load)
    copy = Gemma(reference.cfg)
    copy.load_state_dict(reference.state_dict())
    passes(checks.check_model(copy), capsys)
    assert loads == [{"device": "cpu", "dtype": torch.float32, "progress": False}]


def test_parameter_count(capsys):
    def count(cfg, tied=True):
        C, V = cfg.d_model, cfg.vocab_size
        block = sum(p.numel() for p in Block(cfg, 0).parameters())
        return V * C * (1 if tied else 2) + cfg.n_layers * block + C

    passes(checks.check_parameter_count(count), capsys)
    fails(
        checks.check_parameter_count(lambda cfg, tied=True: count(cfg, tied=False)), capsys, "count it once"
    )


def test_logit_lens(capsys):
    def lens(model, ids, layer, norm=True):
        x = model.tok_embed(ids)
        pos = torch.arange(ids.shape[1])
        for block in model.blocks[: layer + 1]:
            x = block(x, model.rope[block.kind](pos, x.dtype), pos)
        return model.output_head(model.final_norm(x) if norm else x)

    passes(checks.check_logit_lens(lens), capsys)
    fails(checks.check_logit_lens(lambda m, i, la: lens(m, i, la, norm=False)), capsys, "final norm")


# ---------------------------------------------------------------- 07 generation


def probs(logits, temperature, top_k, top_p):
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


def test_sampling(capsys):
    passes(checks.check_sampling(probs), capsys)
    fails(checks.check_sampling(lambda lg, t, k, p: probs(lg * t, 1.0, k, p)), capsys, "divide the logits")
    fails(
        checks.check_sampling(lambda lg, t, k, p: (filter_logits(lg, k, p) / t).softmax(-1)),
        capsys,
        "temperature first",
    )
    fails(checks.check_sampling(lambda lg, t, k, p: probs(lg, t, k and k + 1, p)), capsys, "kept 6")
    fails(checks.check_sampling(lambda lg, t, k, p: filter_logits(lg / t, k, p).exp()), capsys, "sums to")

    def strict_top_p(lg, t, k, p):
        pr = probs(lg, t, k, None)
        if p is None:
            return pr
        sorted_p, order = pr.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) > p
        kept = pr.masked_fill(drop.scatter(-1, order, drop), 0)
        return kept / kept.sum(-1, keepdim=True)

    fails(checks.check_sampling(strict_top_p), capsys, "crosses p")


def generate(model, ids, max_new_tokens, stop_ids=(), extra=0, keep_stop=False):
    new = []
    for _ in range(max_new_tokens + extra):
        token = int(model(ids)[0, -1].argmax())
        if token in stop_ids and not keep_stop:
            break
        new.append(token)
        if token in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_generate(capsys):
    passes(checks.check_generate(generate), capsys)
    fails(checks.check_generate(lambda *a, **k: generate(*a, **k, extra=1)), capsys, "one token too many")
    fails(checks.check_generate(lambda *a, **k: generate(*a, **k, keep_stop=True)), capsys, "not part of it")


def test_repetition_penalty(capsys):
    def penalize(logits, seen, penalty):
        return apply_repetition_penalty(logits[None], [torch.tensor(seen)], penalty)[0]

    passes(checks.check_repetition_penalty(penalize), capsys)

    def divide_all(logits, seen, penalty):
        logits = logits.clone()
        logits[sorted(set(seen))] /= penalty
        return logits

    fails(checks.check_repetition_penalty(divide_all), capsys, "multiplied")

    def in_place(logits, seen, penalty):
        logits[seen] = 0.0
        return logits

    fails(checks.check_repetition_penalty(in_place), capsys, "in place")


def test_min_p(capsys):
    def min_p(logits, m, relative=True):
        p = logits.softmax(-1)
        kept = p.masked_fill(p < (m * p.max(-1, keepdim=True).values if relative else m), 0)
        return kept / kept.sum(-1, keepdim=True)

    passes(checks.check_min_p(min_p), capsys)
    fails(checks.check_min_p(lambda lg, m: min_p(lg, m, relative=False)), capsys, "relative")


def test_sequence_logprob(capsys):
    def logprob(model, ids, prompt_len, shift=1):
        logp = model(ids)[0].log_softmax(-1)
        return sum(float(logp[t - shift, ids[0, t]]) for t in range(prompt_len, ids.shape[1]))

    passes(checks.check_sequence_logprob(logprob), capsys)
    fails(checks.check_sequence_logprob(lambda m, i, s: logprob(m, i, s, shift=0)), capsys, "t - 1")


# ---------------------------------------------------------------- exercises 00-02


def test_bf16_round(capsys):
    def bf16_round(x, ties_to_even=True):
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        bias = 0x7FFF + ((bits >> 16) & 1) if ties_to_even else 0x8000
        return struct.unpack("<f", struct.pack("<I", ((bits + bias) & 0xFFFF0000) & 0xFFFFFFFF))[0]

    passes(checks.check_bf16_round(bf16_round), capsys)
    fails(checks.check_bf16_round(lambda x: bf16_round(x, ties_to_even=False)), capsys, "even")
    fails(
        checks.check_bf16_round(
            lambda x: struct.unpack(
                "<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0] & 0xFFFF0000)
            )[0]
        ),
        capsys,
        "cut off",
    )


def test_weight_bytes(capsys):
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    passes(checks.check_weight_bytes(lambda n, dtype: n * size(dtype)), capsys)
    fails(checks.check_weight_bytes(lambda n, dtype: n * size(dtype) * 8), capsys, "bits")


def test_tokenizer_exercises(tokenizer, capsys):
    def fallback(text, tok):
        return [
            c
            for c in dict.fromkeys(text)
            if any(tok.id_to_token(i).startswith("<0x") for i in tok.encode(c, add_bos=False))
        ]

    passes(checks.check_byte_fallback_chars(fallback, tokenizer), capsys)
    fails(
        checks.check_byte_fallback_chars(lambda t, tok: [c for c in t if c in fallback(t, tok)], tokenizer),
        capsys,
        "once",
    )

    def pieces_to_text(pieces):
        out, pending = "", b""
        for p in pieces:
            if p.startswith("<0x") and p.endswith(">"):
                pending += bytes([int(p[3:-1], 16)])
                continue
            out += pending.decode("utf-8", errors="replace") + p.replace("▁", " ")
            pending = b""
        return out + pending.decode("utf-8", errors="replace")

    passes(checks.check_pieces_to_text(pieces_to_text, tokenizer), capsys)
    fails(checks.check_pieces_to_text(lambda p: "".join(p), tokenizer), capsys, "'▁' is a space")


def test_embedding_exercises(capsys):
    passes(checks.check_embed_by_onehot(lambda ids, w: F.one_hot(ids, w.shape[0]).to(w.dtype) @ w), capsys)
    fails(checks.check_embed_by_onehot(lambda ids, w: w[ids] * 2), capsys, "differs at index")

    def neighbours(weight, token_id, k, cosine=True):
        w = F.normalize(weight, dim=-1) if cosine else weight
        sims = w @ w[token_id]
        sims[token_id] = -math.inf
        return sims.topk(k).indices.tolist()

    passes(checks.check_cosine_neighbours(neighbours), capsys)
    fails(
        checks.check_cosine_neighbours(lambda w, t, k: neighbours(w, t, k, cosine=False)), capsys, "normalize"
    )


# ---------------------------------------------------------------- chapter 11: quantization


def test_pack_int4_check_passes_the_package_layout_and_names_swapped_nibbles(capsys):
    from gemma_lite.kernels import pack_int4, unpack_int4

    passes(checks.check_pack_int4(pack_int4, unpack_int4), capsys)

    def swapped(codes):
        half = codes.shape[-1] // 2
        return (codes[..., half:] | (codes[..., :half] << 4)).to(torch.uint8)

    fails(checks.check_pack_int4(swapped, unpack_int4), capsys, "nibbles are swapped")

    def adjacent(codes):
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)

    fails(checks.check_pack_int4(adjacent, unpack_int4), capsys, "adjacent pairs")


def test_spqr_bits_check_names_the_missing_term(capsys):
    def right(bits, group, stat_bits, stat_group, outliers):
        return bits + 2 * stat_bits / group + 64 / (group * stat_group) + 32 * outliers

    passes(checks.check_spqr_bits(right), capsys)

    def one_statistic(bits, group, stat_bits, stat_group, outliers):
        return bits + stat_bits / group + 64 / (group * stat_group) + 32 * outliers

    fails(checks.check_spqr_bits(one_statistic), capsys, "a scale and a zero point")

    def no_outliers(bits, group, stat_bits, stat_group, outliers):
        return bits + 2 * stat_bits / group + 64 / (group * stat_group)

    fails(checks.check_spqr_bits(no_outliers), capsys, "outliers are missing")


def test_gptq_column_step_check_names_a_missing_division(capsys):
    def right(block, u, i, rounded):
        error = (block[:, i] - rounded) / u[i, i]
        block[:, i:] -= error[:, None] * u[i, i:][None, :]
        return error

    passes(checks.check_gptq_column_step(right), capsys)

    def undivided(block, u, i, rounded):
        error = block[:, i] - rounded
        block[:, i:] -= error[:, None] * u[i, i:][None, :] / u[i, i]
        return error

    fails(checks.check_gptq_column_step(undivided), capsys, "divide the rounding error by u[i, i]")

    def after_column_i(block, u, i, rounded):
        error = (block[:, i] - rounded) / u[i, i]
        block[:, i + 1 :] -= error[:, None] * u[i, i + 1 :][None, :]
        return error

    fails(checks.check_gptq_column_step(after_column_i), capsys, "update column i too")


def test_leave_one_out_gain_check_names_a_forgotten_hessian_weight(capsys):
    from gemma_lite.spqr import leave_one_out_gain

    passes(checks.check_leave_one_out_gain(leave_one_out_gain), capsys)

    def unweighted(w, d, bits):
        return leave_one_out_gain(w, torch.ones_like(d), bits)

    fails(checks.check_leave_one_out_gain(unweighted), capsys, "divide each squared error by d")


# ---------------------------------------------------------------- chapter 13: export


def test_branch_free_check_passes_torch_where_and_names_the_python_branch(capsys):
    passes(checks.check_branch_free(lambda x: torch.where(x.max() > 10, x / 2, x)), capsys)
    branch = ch13_export.halve_large_logits_by_branch
    fails(checks.check_branch_free(branch), capsys, "choose with torch.where")

    def always_halved(x):
        return x / 2

    fails(checks.check_branch_free(always_halved), capsys, "logits all below 10")


def test_explicit_step_check_passes_the_package_step_and_names_an_input_written_in_place(capsys):
    from gemma_lite.export import ExplicitCacheStep
    from gemma_lite.generate import decode_step

    passes(checks.check_explicit_step(ExplicitCacheStep), capsys)

    class InPlace(ExplicitCacheStep):
        def forward(self, token, input_pos, *state):
            caches = [layer.over(*state[3 * i : 3 * i + 3]) for i, layer in enumerate(self.templates)]
            logits = decode_step(self.model, token, input_pos, caches)
            return (logits, *(t for cache in caches for t in cache.state()))

    fails(checks.check_explicit_step(InPlace), capsys, "changed its input k0: write into copies")

    class LogitsOnly(ExplicitCacheStep):
        def forward(self, token, input_pos, *state):
            return super().forward(token, input_pos, *state)[0]

    fails(checks.check_explicit_step(LogitsOnly), capsys, "should return a tuple of")
