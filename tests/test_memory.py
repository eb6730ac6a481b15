"""Memory predictions (gemma_lite.memory) against measurements.

Tolerances, and what was measured when they were set (2-core CPU, torch 2.13):

* parameter count, model bytes, KV cache bytes: exact.
* activations saved for backward vs ``saved_tensors_hooks``: 1 %
  (measured 0.01-0.1 %: the formula leaves out the (1 + w) norm scales).
* a training step's peak vs ``TensorMemory``: 2 % (measured 0.0 %).
* a real training step (270M, fp32, batch 1 x 64 tokens) vs VmHWM of a fresh
  process: 5 % (measured -0.8 %: 2,396 MB for 2,415 MB predicted).
* a decode step's working memory vs ``TensorMemory``: 5 % in fp32 (measured
  -2.8 %), 0.1 % in bf16 (measured: 8 bytes, the argmax); a 256-token prefill,
  fp32: 2 % (measured 0 %).
* resident memory after ``load()`` vs runtime + tokenizer + weights, VmHWM of
  fresh processes: 6 % (measured +2.4 % fp32, +4.0 % bf16: the loader's
  dequantization buffers).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from helpers import PYTHON, REPO_ROOT, python_env

from gemma_lite import Gemma, GemmaConfig, KVCache
from gemma_lite.devices import dtype_name
from gemma_lite.measure import TensorMemory
from gemma_lite.memory import (
    activation_bytes,
    inference_bytes,
    kv_cache_bytes,
    model_bytes,
    parameter_count,
    training_memory,
)

REAL = GemmaConfig.gemma3_270m()
# Small enough for a quick step, large enough that activations dominate a long sequence.
SMALL = GemmaConfig.tiny(
    vocab_size=4096,
    d_model=128,
    n_heads=4,
    n_kv_heads=1,
    head_dim=64,
    d_ff=512,
    n_layers=6,
    sliding_window=64,
    max_seq_len=2048,
)


def meta_model(cfg: GemmaConfig, dtype=torch.float32) -> Gemma:
    with torch.device("meta"):
        return Gemma(cfg).to(dtype)


def small_model(cfg: GemmaConfig = SMALL, dtype=torch.float32) -> Gemma:
    torch.manual_seed(0)
    return Gemma(cfg).to(dtype)


# ---------------------------------------------------------------- exact formulas


@pytest.mark.parametrize("cfg", [REAL, GemmaConfig.tiny(), SMALL], ids=["270m", "tiny", "small"])
def test_parameter_count_is_exact_per_component(cfg):
    model = meta_model(cfg)
    counts = parameter_count(cfg)

    def n(name_part):
        return sum(p.numel() for name, p in model.named_parameters() if name_part in name)

    assert counts.embedding == n("tok_embed")
    assert counts.attention == n(".attn.")
    assert counts.feed_forward == n(".ffn.")
    norms = ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm")
    assert counts.block_norms == sum(n(f".{k}.") for k in norms)
    assert counts.final_norm == n("final_norm")
    assert counts.total == model.num_parameters()


def test_real_parameter_count():
    assert parameter_count(REAL).total == 268_098_176


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_bytes_is_the_sum_of_parameter_bytes(dtype):
    model = meta_model(REAL, dtype)
    assert model_bytes(REAL, dtype) == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("context", [1, 100, 511, 512, 513, 8192, 32_768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,slack", [(1, 0), (3, 4)])
def test_kv_cache_formula_equals_the_allocation(context, dtype, batch, slack):
    cache = KVCache(REAL, batch, context, dtype, "meta", slack=slack)
    assert kv_cache_bytes(REAL, context, dtype, batch, slack=slack) == cache.nbytes()
    every_layer_global = KVCache(REAL.replace(global_every=1), batch, context, dtype, "meta", slack=slack)
    assert kv_cache_bytes(REAL, context, dtype, batch, ring=False, slack=slack) == every_layer_global.nbytes()


def test_ring_buffer_saves_most_of_a_long_context():
    ring, flat = (kv_cache_bytes(REAL, 32_768, torch.bfloat16, ring=r) for r in (True, False))
    assert 0.15 < ring / flat < 0.2  # 3 of 18 layers keep everything, 15 keep 512 slots


# ---------------------------------------------------------------- activations and training


def saved_for_backward(model: Gemma, ids: torch.Tensor) -> int:
    """Bytes of the floating-point tensors autograd saves (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(model, ids)
    return sum(saved.values())


def loss(model: Gemma, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


def train_step(model: Gemma, optimizer, ids: torch.Tensor) -> None:
    loss(model, ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [SMALL, GemmaConfig.tiny()], ids=["small", "tiny"])
def test_activation_formula_matches_saved_tensors(cfg, dtype):
    model = small_model(cfg, dtype)
    for batch, seq in ((2, 100), (3, 200)):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        measured = saved_for_backward(model, ids)
        assert activation_bytes(cfg, dtype, batch, seq) == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("batch,seq,phase", [(2, 256, "backward starts"), (1, 32, "optimizer step")])
def test_training_step_peak_matches_tensor_memory(batch, seq, phase):
    model = small_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SMALL.vocab_size, (batch, seq + 1))
    train_step(model, optimizer, ids)  # creates Adam's moments: from now on they live between steps
    with TensorMemory() as mem:
        train_step(model, optimizer, ids)
    predicted = training_memory(SMALL, batch, seq)
    assert predicted.peak_phase == phase
    assert predicted.transient_peak == pytest.approx(mem.peak, rel=0.02)


def test_sixteen_bytes_per_parameter():
    for dtype in (torch.float32, torch.bfloat16):
        assert training_memory(REAL, 1, 1, dtype).per_parameter == 16


def run_python(code: str, *args: str, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh interpreter and parse the JSON it prints last."""
    out = subprocess.run(
        [PYTHON, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=python_env(),
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


TRAIN_STEP = """
import json, torch, torch.nn.functional as F
from gemma_lite import GemmaConfig
from gemma_lite.measure import ResidentPeak
from gemma_lite.weights import empty_model

torch.manual_seed(0)
model = empty_model(GemmaConfig.gemma3_270m(), torch.device("cpu"), torch.float32).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(0, model.cfg.vocab_size, (1, 65))

def step():
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
    del logits
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

step()
with ResidentPeak() as peak:
    step()
print(json.dumps({"growth": peak.growth}))
"""


@pytest.mark.slow
def test_real_training_step_resident_peak():
    """fp32, batch 1 x 64 tokens: gradients + Adam's temporaries on the 262144 x 640 embedding."""
    measured = run_python(TRAIN_STEP)["growth"]
    predicted = training_memory(REAL, 1, 64)
    assert predicted.peak_phase == "optimizer step"
    assert measured == pytest.approx(predicted.transient_peak, rel=0.05)


# ---------------------------------------------------------------- inference


@torch.inference_mode()
def step_peak(model: Gemma, tokens: int, context: int) -> int:
    """TensorMemory peak of one cached forward of ``tokens`` tokens ending at ``context``."""
    cache = model.new_cache(1, context)
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens))
    pos = torch.arange(context - tokens, context)
    with TensorMemory() as mem:
        logits = model(ids, pos, cache, last_only=True)[:, -1]
        logits.float().argmax(-1)
    return mem.peak


@pytest.mark.slow
@pytest.mark.parametrize("tokens,rel", [(1, 0.05), (256, 0.02)], ids=["decode", "prefill-256"])
def test_real_step_working_memory(real, tokens, rel):
    """fp32: a decode step is its logits; a 256-token prefill peaks in the GeGLU of a layer."""
    model, _ = real
    predicted = inference_bytes(REAL, torch.float32, tokens=tokens)["peak"]
    assert step_peak(model, tokens, 1024) == pytest.approx(predicted, rel=rel)


def test_bf16_decode_step_working_memory():
    """bf16 logits (B, V) and their fp32 copy for sampling."""
    model = small_model(SMALL.replace(vocab_size=262_144), torch.bfloat16).eval()
    predicted = inference_bytes(model.cfg, torch.bfloat16)["peak"]
    assert step_peak(model, 1, 1024) == pytest.approx(predicted, rel=0.001)  # + the argmax id


LOAD = """
import json, sys, torch, gemma_lite
from gemma_lite.loading import release_freed_memory
from gemma_lite.measure import peak_resident_bytes, resident_bytes
from gemma_lite.tokenizer import GemmaTokenizer
from gemma_lite.gguf_file import bundled_gguf_path, open_gguf

start = resident_bytes()
if sys.argv[1] == "tokenizer":
    gguf = open_gguf(bundled_gguf_path())
    tokenizer = GemmaTokenizer.from_gguf(gguf.metadata)
    gguf.drop_vocabulary()
    release_freed_memory()
    print(json.dumps({"start": start, "end": resident_bytes()}))
else:
    model, tokenizer = gemma_lite.load(bundled_gguf_path(), device="cpu", dtype=sys.argv[1], progress=False)
    print(json.dumps({"start": start, "peak": peak_resident_bytes()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_memory_after_loading(dtype):
    """Peak resident memory of a fresh process that dequantizes the GGUF into its own copy of the weights
    = runtime + tokenizer (measured) + weights (predicted)."""
    tokenizer = run_python(LOAD, "tokenizer")
    load = run_python(LOAD, dtype_name(dtype))
    predicted = load["start"] + (tokenizer["end"] - tokenizer["start"]) + model_bytes(REAL, dtype)
    assert load["peak"] == pytest.approx(predicted, rel=0.06)


def test_cli_memory_table():
    out = subprocess.run(
        [PYTHON, "-m", "gemma_lite", "memory", "--dtype", "bfloat16", "--context", "8192"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=python_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "268,098,176" in out.stdout
    kv = kv_cache_bytes(REAL, 8192, torch.bfloat16) / 1e6
    assert "KV cache (ring buffer)" in out.stdout and f"{kv:,.2f} MB" in out.stdout
    assert "   8,192" in out.stdout.splitlines()[-1]


def test_cli_memory_rejects_a_context_beyond_the_model():
    out = subprocess.run(
        [PYTHON, "-m", "gemma_lite", "memory", "--context", "40000"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=python_env(),
        timeout=120,
    )
    assert out.returncode == 2
    assert "error: --context 40000 is beyond the model's 32768 tokens" in out.stderr
