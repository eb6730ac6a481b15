"""GPTQ and SpQR: the error feedback, outliers, quantized statistics, bits per parameter, save and load."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import max_abs_diff, random_model, tiny_tokenizer

import gemma_lite
from gemma_lite.gptq import Hessian, MinMaxFit, gptq, relative_output_error
from gemma_lite.quantize import (
    GroupLinear,
    QuantizedLinear,
    bits_per_param,
    buffer_bits,
    quant_scheme,
    quantize,
    save_quantized,
    weight_layers,
)
from gemma_lite.spqr import SpQRFit, SpQRLinear, StatisticsGrid, leave_one_out_gain


def correlated_inputs(features: int, samples: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs (n, I) whose columns are strongly correlated, as activations are, with a few loud ones."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    loud = torch.ones(features)
    loud[:4] = 8.0
    shared = torch.randn(samples, 16, generator=g) @ torch.randn(16, features, generator=g)
    return (shared + 0.3 * torch.randn(samples, features, generator=g) @ mixing) * loud


def test_hessian_is_the_mean_outer_product_of_the_inputs():
    x = torch.randn(3, 5, 8)
    h = Hessian(8)
    h.add(x[:1])
    h.add(x[1:])
    rows = x.reshape(-1, 8)
    assert torch.allclose(h.value(), rows.T @ rows / 15, atol=1e-6)


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    weight = torch.randn(24, 64)
    rounded = gptq(weight, torch.eye(64), partial(MinMaxFit, bits=4), 16, act_order=False)
    rtn = GroupLinear.round_to_nearest(weight, 4, 16)
    assert torch.equal(rounded.values, rtn.dequantize())  # nothing to feed forward: each column on its own


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_has_a_smaller_output_error_than_round_to_nearest(bits):
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    h = Hessian(128)
    h.add(correlated_inputs(128))
    rtn = GroupLinear.round_to_nearest(weight, bits, 32).dequantize()
    for act_order in (False, True):
        rounded = gptq(weight, h.value(), partial(MinMaxFit, bits=bits), 32, act_order=act_order)
        values = rounded.values[:, torch.argsort(rounded.perm)]  # back to the input's column order
        assert relative_output_error(weight, values, h.value()) < 0.7 * relative_output_error(
            weight, rtn, h.value()
        )
    assert not torch.equal(rounded.perm, torch.arange(128))  # act_order moved the loud columns first
    assert set(rounded.perm[:4].tolist()) == {0, 1, 2, 3}


def test_a_gptq_layer_stores_its_column_order_and_permutes_its_inputs():
    weight = torch.randn(32, 64)
    h = Hessian(64)
    h.add(correlated_inputs(64))
    rounded = gptq(weight, h.value(), partial(MinMaxFit, bits=4), 16)
    layer = GroupLinear(rounded.codes, rounded.scale, rounded.offset, 4, rounded.perm)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ layer.dequantize().T, atol=1e-5)
    assert torch.equal(layer.dequantize(), rounded.values[:, torch.argsort(rounded.perm)])


def test_gptq_refuses_a_group_size_that_does_not_divide_the_row():
    with pytest.raises(ValueError, match="group_size 24 must divide the input width 64"):
        gptq(torch.randn(4, 64), torch.eye(64), partial(MinMaxFit, bits=4), 24)


def test_leaving_out_an_extreme_weight_gains_most():
    w = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 5.0]])  # one weight stretches the grid
    gain = leave_one_out_gain(w, torch.ones(8), bits=3)
    assert gain.argmax() == 7
    assert gain[0, 7] > 2.5 * gain[0, :7].max()  # without it, the others fit a grid of step 0.1


def test_statistics_are_rounded_to_three_bits_within_half_a_step_of_their_group():
    values = torch.rand(40) * 3 + 0.1  # 40: the last group of 16 is padded
    grid = StatisticsGrid(values, bits=3, group=16)
    assert grid.codes.max() <= 7 and grid.step.shape == (3,)
    step = grid.step.repeat_interleave(16)[:40]
    assert ((grid.decoded() - values).abs() <= step / 2 + 1e-3).all()


def test_spqr_keeps_planted_outliers_exact_and_rounds_the_rest_on_a_tight_grid():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=g) * 0.05
    planted = [(3, 10), (17, 40), (50, 5)]
    for r, c in planted:
        weight[r, c] = 2.0
    fit = partial(SpQRFit, bits=3, threshold=20.0, stat_bits=3, stat_group=16)
    layer = SpQRLinear(gptq(weight, torch.eye(64), fit, 16, act_order=False), 3, 16, 3, 16)
    found = set(zip(layer.outlier_rows.tolist(), layer.outlier_cols.tolist(), strict=True))
    assert set(planted) <= found and len(found) < 0.03 * weight.numel()
    restored = layer.dequantize()
    for r, c in planted:
        assert abs(restored[r, c] - 2.0) < 2e-3  # fp16
    others = torch.ones_like(weight, dtype=torch.bool)
    others[tuple(zip(*planted, strict=True))] = False
    assert (restored - weight)[others].abs().max() < 0.05  # the planted 2.0s did not stretch the grid
    assert torch.equal(layer.dequantize(torch.tensor([[3, 50]])), restored[[3, 50]][None])


@pytest.mark.parametrize(
    "method, options", [("int4", {"group_size": 32}), ("gptq", {"bits": 3, "group_size": 32}), ("spqr", {})]
)
def test_bits_per_param_counts_every_stored_byte(method, options):
    model = random_model()
    ids = torch.randint(3, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name)
    quantize(model, method, calibration=ids, progress=False, **options)
    stored = sum(buffer_bits(layer) for layer in weight_layers(model).values())
    assert bits_per_param(model) * weights == pytest.approx(stored)
    if method == "int4":
        assert bits_per_param(model) == 4 + 2 * 16 / 32  # codes + fp16 scale and offset per 32
    if method == "spqr":
        layers = [m for m in weight_layers(model).values() if isinstance(m, SpQRLinear)]
        outliers = sum(m.outlier_values.numel() for m in layers)
        rows = sum(m.out_features + 1 for m in layers)
        columns = sum(m.in_features for m in layers)
        row_groups = sum(-(-m.out_features // 16) * m.in_features // 16 for m in layers)
        expected = (
            3 * weights  # codes
            + 2 * 3 * weights / 16  # a 3-bit scale and zero point per 16 weights
            + 2 * 2 * 16 * row_groups  # fp16 step and start for each 16 of those
            + 32 * outliers
            + 32 * rows  # a 16-bit column and value per outlier, a 32-bit row pointer
            + 32 * columns  # the column order
        ) / weights
        assert bits_per_param(model) == pytest.approx(expected)


@torch.no_grad()
@pytest.mark.parametrize(
    "method, options",
    [
        ("int8", {}),
        ("gptq", {"bits": 4, "group_size": 16}),
        ("spqr", {"outlier_threshold": 5.0}),
        ("spqr", {"bits": 4}),
        ("int4", {"head": "none"}),
    ],
)
def test_a_saved_quantized_model_loads_back_with_identical_logits(tmp_path, method, options):
    model = random_model()
    ids = torch.randint(3, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, method, calibration=ids, progress=False, **options)
    tokenizer = tiny_tokenizer()
    save_quantized(model, tokenizer, tmp_path / "saved")
    loaded, loaded_tokenizer = gemma_lite.load(tmp_path / "saved", device="cpu", progress=False)
    assert quant_scheme(loaded) == method
    assert bits_per_param(loaded) == bits_per_param(model)
    assert max_abs_diff(loaded(ids), model(ids)) == 0
    assert loaded_tokenizer.encode("hello world") == tokenizer.encode("hello world")


def test_a_damaged_quantized_directory_is_a_clear_error(tmp_path):
    model = quantize(random_model(), "int8")
    save_quantized(model, tiny_tokenizer(), tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        gemma_lite.load(tmp_path / "saved", device="cpu")


def test_calibrated_methods_need_calibration_text_and_check_their_options():
    model = random_model()
    with pytest.raises(ValueError, match="gptq needs calibration text: pass tokenizer="):
        quantize(model, "gptq")
    with pytest.raises(ValueError, match="gptq bits=5: choose 3 or 4"):
        quantize(model, "gptq", bits=5)
    ids = torch.randint(3, 100, (2, 16))
    with pytest.raises(ValueError, match="spqr has no options \\['threshold'\\]"):
        quantize(model, "spqr", calibration=ids, threshold=3)


def test_the_head_is_its_own_decision():
    model = quantize(random_model(), "int4", group_size=16, head="int8")
    assert weight_layers(model)["tok_embed"].weight_format == "int8"
    assert weight_layers(model)["blocks.0.attn.q_proj"].weight_format == "int4"
    dense_head = quantize(random_model(), "int4", group_size=16, head="none")
    assert not isinstance(weight_layers(dense_head)["tok_embed"], QuantizedLinear)


@torch.no_grad()
def test_a_saved_model_can_run_its_activations_in_another_dtype(tmp_path):
    model = quantize(random_model(), "int4", group_size=16)
    save_quantized(model, tiny_tokenizer(), tmp_path / "saved")
    loaded, _ = gemma_lite.load(tmp_path / "saved", device="cpu", dtype="bfloat16", progress=False)
    assert loaded.dtype == torch.bfloat16
    layer = weight_layers(loaded)["blocks.0.attn.q_proj"]
    assert layer.scale.dtype == torch.float16  # the stored format is unchanged
    assert torch.equal(layer.packed, weight_layers(model)["blocks.0.attn.q_proj"].packed)
    ids = torch.randint(3, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = loaded(ids)
    assert logits.dtype == torch.bfloat16
    assert max_abs_diff(logits, model(ids)) < 0.05 * model(ids).abs().max()
