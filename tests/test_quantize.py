"""Round-to-nearest int8, int4 and int3: round trips, real packed storage, the same model computed."""

from __future__ import annotations

import pytest
import torch
from helpers import max_abs_diff, random_model, tiny_bench_model

from gemma_lite.generate import Generator
from gemma_lite.kernels import KernelChoice
from gemma_lite.layers import Linear, ScaledEmbedding
from gemma_lite.measure import stored_bytes
from gemma_lite.quantize import GroupLinear, Int8Linear, QuantizedEmbedding, quant_scheme, quantize


def test_int8_round_trip_is_within_half_a_step_of_each_row():
    weight = torch.randn(32, 48) * torch.linspace(0.01, 2, 32)[:, None]  # rows of very different ranges
    layer = Int8Linear(weight)
    assert layer.q.dtype == torch.int8 and layer.q.abs().max() <= 127
    assert torch.allclose(layer.scale, weight.abs().amax(1) / 127)
    error = (layer.dequantize() - weight).abs()
    assert (error <= layer.scale[:, None] / 2 + 1e-7).all()


def test_int4_round_trip_is_within_half_a_step_of_each_group():
    weight = torch.randn(8, 64)
    layer = GroupLinear.round_to_nearest(weight, 4, group_size=16)
    assert layer.packed.shape == (8, 4, 8) and layer.packed.dtype == torch.uint8
    assert layer.scale.shape == layer.offset.shape == (8, 4) and layer.scale.dtype == torch.float16
    step = layer.scale.float().repeat_interleave(16, dim=1)  # (8, 64): each weight's group step
    error = (layer.dequantize().float() - weight).abs()
    assert (error <= step / 2 + 2e-3 * weight.abs().max()).all()  # + fp16 rounding of scale and offset
    rows = torch.tensor([[5, 0], [7, 7]])
    assert torch.equal(layer.dequantize(rows), layer.dequantize()[rows])


def test_group_size_must_tile_the_row_in_whole_bytes():
    assert GroupLinear.round_to_nearest(torch.randn(4, 640), 4, group_size=128).packed.shape == (4, 5, 64)
    with pytest.raises(ValueError, match="group_size 48 must be a multiple of 2 that divides .* try one of"):
        GroupLinear.round_to_nearest(torch.randn(4, 640), 4, group_size=48)
    with pytest.raises(ValueError, match="int3 group_size 20 must be a multiple of 8"):
        GroupLinear.round_to_nearest(torch.randn(4, 640), 3, group_size=20)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int3"])
def test_quantize_swaps_every_matrix_and_stores_only_packed_bytes(scheme):
    model = random_model()
    cfg, dense_bytes = model.cfg, stored_bytes(model)
    quantize(model, scheme, group_size=16)
    assert quant_scheme(model) == scheme
    assert not any(isinstance(m, (Linear, ScaledEmbedding)) for m in model.modules())
    assert isinstance(model.tok_embed, QuantizedEmbedding)
    matrices = [m for m in model.modules() if isinstance(m, KernelChoice)]
    assert len(matrices) == 7 * cfg.n_layers + 1
    norms = sum(p.numel() * 4 for p in model.parameters())  # all that is left as parameters
    weights = sum(m.in_features * m.out_features for m in matrices)
    if scheme == "int8":
        expected = weights + 4 * sum(m.out_features for m in matrices)  # one fp32 scale per row
    else:  # codes + fp16 scale and offset per 16
        expected = weights * int(scheme[-1]) // 8 + 2 * 2 * weights // 16
    assert stored_bytes(model) == norms + expected
    assert stored_bytes(model) < dense_bytes / (3 if scheme == "int8" else 5)


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["int8", "int4", "int3"])
def test_a_quantized_model_computes_what_a_dense_model_with_its_dequantized_weights_computes(scheme):
    model = random_model()
    reference = random_model()
    quantize(model, scheme, group_size=16)
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, GroupLinear)):  # the embedding's matrix is tok_embed.matrix
            dense = reference.get_submodule(name.removesuffix(".matrix"))
            dense.weight.copy_(module.dequantize())
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    assert max_abs_diff(model(ids), reference(ids)) <= 1e-4
    cache, ref_cache = model.new_cache(2, 16), reference.new_cache(2, 16)
    model(ids, torch.arange(10), cache)
    reference(ids, torch.arange(10), ref_cache)
    step = ids[:, :1]
    assert (
        max_abs_diff(model(step, torch.tensor([10]), cache), reference(step, torch.tensor([10]), ref_cache))
        <= 1e-4
    )


def test_quantize_refuses_unknown_schemes_and_a_second_pass():
    model = random_model()
    with pytest.raises(ValueError, match="unknown quantization method 'int2'; choose from int8, int4, int3"):
        quantize(model, "int2")
    with pytest.raises(ValueError, match="gptq and spqr"):
        quantize(model, "int4", damp=0.1)
    quantize(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int4")


@pytest.mark.compile
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_decode_of_a_quantized_model_gives_the_eager_tokens(scheme):
    model, tokenizer = tiny_bench_model(torch.float32, scheme)
    eager = Generator(model, tokenizer)("hello world", 12, stop_at_eos=False)
    for layer in model.modules():
        if isinstance(layer, KernelChoice):
            layer.compiled_kernel = "reduce"
    compiled = Generator(model, tokenizer, compile=True)("hello world", 12, stop_at_eos=False)
    assert compiled.new_ids == eager.new_ids


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Water boils at",
    "The best way to learn a language is",
    "In 1969, the first",
    "import numpy as np\n",
    "My favourite food is",
]


@pytest.mark.slow
@torch.no_grad()
def test_int8_mostly_picks_the_tokens_fp32_picks_on_the_real_model():
    """Per-channel int8 moves each weight by at most half a step (1/254 of its row's largest).

    Greedy texts still part ways where two tokens are close: then one different
    token changes everything after it. So the test feeds both models the fp32
    model's own 32-token continuations and compares their top-1 token at every
    position (teacher forcing): 94 % agree on this machine, and every first token does.
    """
    import gemma_lite

    model, tokenizer = gemma_lite.load("bundled", device="cpu", dtype=torch.float32, progress=False)
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        continuation = Generator(model, tokenizer)(prompt, 32, stop_at_eos=False).new_ids[0]
        texts.append((len(ids), torch.tensor([ids + continuation])))
    expected = [model(ids)[0, n - 1 : -1].argmax(-1) for n, ids in texts]  # (32,) each: the greedy tokens
    quantize(model, "int8")
    got = [model(ids)[0, n - 1 : -1].argmax(-1) for n, ids in texts]
    assert all(a[0] == b[0] for a, b in zip(expected, got, strict=True))
    agreement = torch.cat([a == b for a, b in zip(expected, got, strict=True)]).float().mean()
    assert agreement >= 0.9
