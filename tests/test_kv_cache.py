"""The static KV cache: same logits as recomputing everything, ring buffer, rollback, compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import max_abs_diff, random_model

from gemma_lite import GemmaConfig, KVCache
from gemma_lite.generate import Generator, decode_one
from gemma_lite.kv_cache import RingCache
from gemma_lite.layers import RotaryEmbedding

TOL = 1e-4
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny():
    return random_model()


def run_cached(model, ids, cache, prefill: int, chunk: int = 1):
    """Logits for every position: prefill the first ``prefill`` tokens, then ``chunk`` at a time."""
    out = [model(ids[:, :prefill], torch.arange(prefill), cache)]
    for start in range(prefill, ids.shape[1], chunk):
        stop = min(start + chunk, ids.shape[1])
        out.append(model(ids[:, start:stop], torch.arange(start, stop), cache))
    return torch.cat(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("prefill,chunk", [(1, 1), (5, 1), (20, 1), (5, 3), (3, 9)])
def test_cached_logits_match_recomputing_every_step(tiny, prefill, chunk):
    """Window 8, 40 tokens: the ring wraps many times, in single steps and in chunks."""
    ids = torch.randint(0, tiny.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full = tiny(ids)
    cached = run_cached(tiny, ids, tiny.new_cache(2, 64), prefill, chunk)
    assert max_abs_diff(full, cached) <= TOL


@torch.no_grad()
def test_ring_buffer_holds_exactly_the_last_window_positions(tiny):
    cfg = tiny.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 29), generator=torch.Generator().manual_seed(2))
    cache = tiny.new_cache(1, 64)
    all_global = KVCache(cfg.replace(global_every=1), 1, 64)  # every layer keeps every position
    run_cached(tiny, ids, cache, prefill=11)
    run_cached(tiny, ids, all_global, prefill=11)
    for i, layer in enumerate(cache.layers):
        if cfg.is_global(i):
            continue
        assert isinstance(layer, RingCache) and layer.size == cfg.sliding_window
        positions = sorted(layer.slot_pos.tolist())
        assert positions == list(range(29 - cfg.sliding_window, 29))
        for slot, pos in enumerate(layer.slot_pos.tolist()):  # slot i holds position p, p % 8 == i
            assert pos % layer.size == slot
            # same keys up to float rounding (the two caches attend over different slot counts)
            assert max_abs_diff(layer.k[:, :, slot], all_global.layers[i].k[:, :, pos]) <= TOL
            assert max_abs_diff(layer.v[:, :, slot], all_global.layers[i].v[:, :, pos]) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_hold_the_values_computed_directly(dtype):
    """Gemma's head dim and both bases: the rows read from the tables are bit for bit the same."""
    cfg = GemmaConfig()
    for base in (cfg.rope_local_base, cfg.rope_global_base):
        rope = RotaryEmbedding(cfg.head_dim, base)
        rope.build_tables(4096)
        per_row = torch.tensor([[3, 7], [0, 4]])  # (B, T): a left-padded batch
        for positions in (torch.arange(300), torch.tensor([0]), torch.tensor([4095]), per_row):
            direct = RotaryEmbedding(cfg.head_dim, base)(positions, dtype)
            read = rope(positions, dtype, max_len=4096)
            assert all(torch.equal(a, b) for a, b in zip(direct, read, strict=True))


def test_real_sized_cache_costs_global_layers_only():
    """At a 32k context, the 15 local layers cost a 512-slot ring each; 3 global layers pay for 32k."""
    cfg = GemmaConfig()
    per_slot = 2 * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16
    with torch.device("meta"):
        cache = KVCache(cfg, 1, cfg.max_seq_len, dtype=torch.bfloat16, device="meta")
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layers))
    expected = per_slot * (n_global * cfg.max_seq_len + (cfg.n_layers - n_global) * cfg.sliding_window)
    assert (
        cache.nbytes() - sum(b.numel() * 8 for n, b in cache.named_buffers() if n.endswith("slot_pos"))
        == expected
    )


@torch.no_grad()
def test_rollback_forgets_drafted_tokens(tiny):
    """Speculative decoding writes drafts, then keeps only some: rolling back must be exact."""
    ids = torch.randint(0, tiny.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    full = tiny(ids)
    cache = tiny.new_cache(1, 64, slack=4)
    tiny(ids[:, :20], torch.arange(20), cache)
    drafts = torch.randint(0, tiny.cfg.vocab_size, (1, 4))
    tiny(drafts, torch.arange(20, 24), cache)  # 4 wrong tokens
    cache.rollback(20)
    out = [tiny(ids[:, t : t + 1], torch.tensor([t]), cache) for t in range(20, 30)]
    assert max_abs_diff(full[:, 20:], torch.cat(out, 1)) <= TOL


def test_cache_rejects_positions_beyond_its_length(tiny):
    cache = tiny.new_cache(1, 16)
    with pytest.raises(ValueError, match="beyond the cache's max_len"):
        tiny(torch.zeros(1, 1, dtype=torch.long), torch.tensor([16]), cache)
    with pytest.raises(ValueError, match="pass input_pos"):
        tiny(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(tiny.cfg, 1, tiny.cfg.max_seq_len + 1)


@pytest.mark.compile
@torch.no_grad()
def test_compiled_decode_step_matches_eager_and_compiles_once(tiny):
    """fullgraph=True (no graph breaks), one graph for every step, no recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(decode_one, fullgraph=True, dynamic=False)
    ids = torch.randint(0, tiny.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    eager_cache, compiled_cache = tiny.new_cache(1, 32), tiny.new_cache(1, 32)
    tiny(ids[:, :4], torch.arange(4), eager_cache)
    tiny(ids[:, :4], torch.arange(4), compiled_cache)
    for t in range(4, 30):  # past the window of 8: the ring wraps three times
        pos = torch.tensor([t])
        expected = decode_one(tiny, ids[:, t : t + 1], pos, eager_cache, None)
        got = step(tiny, ids[:, t : t + 1], pos, compiled_cache, None)
        assert max_abs_diff(expected, got) <= TOL
    assert counters["stats"]["unique_graphs"] == 1  # a recompile would add a graph
    assert not counters["graph_break"]


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
@torch.no_grad()
def test_real_cached_logits_match_at_every_step_past_the_window(real):
    """Greedy decode 300 tokens after a 260-token prose prompt (to position 560 > 512).

    Compares every step's logits with one uncached forward over the whole text.
    The remaining differences are fp32 rounding from different matmul kernels
    (one row vs many): about 5e-6 relative to the largest logit (~33).
    """
    model, tokenizer = real
    text = (DATA / "printing_press.txt").read_text()
    prompt = torch.tensor([tokenizer.encode(text)[:260]])
    cache = model.new_cache(1, 600)
    step_logits = [model(prompt, torch.arange(260), cache, last_only=True)[:, -1]]
    ids = prompt
    for t in range(260, 560):
        token = step_logits[-1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        step_logits.append(model(token, torch.tensor([t]), cache)[:, -1])
    full = model(ids)[0, 259:]  # logits that predicted each generated token, and one more
    cached = torch.cat(step_logits)
    diff = max_abs_diff(full, cached)
    print(f"cached vs uncached, 301 steps to position 560: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_generator_matches_eager_on_real_weights(real):
    model, tokenizer = real
    eager = Generator(model, tokenizer)("Water boils at", 12)
    gen = Generator(model, tokenizer, compile=True)
    compiled, again = gen("Water boils at", 12), gen("Water boils at", 12)
    assert compiled.new_ids == eager.new_ids == again.new_ids
    assert compiled.compile_s > 0.5 and again.compile_s == 0  # the first call compiled, the second did not
