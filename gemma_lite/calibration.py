"""Calibration for GPTQ and SpQR: the texts, and quantizing the model one block at a time.

Two texts ship with the package, both written for this course and under its
licence (Apache-2.0), so that they are the same on every machine:

* ``data/calibration.txt``: the narrative text of chapters 00-10 (about 18k
  tokens): what the calibrated methods see.
* ``data/heldout.txt``: short essays on everyday topics (about 2.3k tokens),
  never used for calibration: what perplexity is measured on (``evaluate.py``).

``calibrated_quantize`` follows GPTQ's recipe: run the calibration tokens
through the model block by block; for each block, collect each weight
matrix's input statistics (``gptq.Hessian``), round its matrices, then run the
block again, now quantized, to get the next block's inputs. So each block is
calibrated on what the already-quantized blocks before it really produce.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .gptq import Hessian, MinMaxFit, gptq
from .layers import Linear
from .model import Gemma
from .quantize import GroupLinear, Int8Linear, replace_layer

DATA = Path(__file__).parent / "data"
CALIBRATION_TEXT = DATA / "calibration.txt"
HELDOUT_TEXT = DATA / "heldout.txt"


def token_windows(tokenizer, text: str, length: int, count: int | None = None) -> torch.Tensor:
    """The text's tokens cut into windows of ``length`` tokens, each starting with BOS: (N, length).

    Tokenized once as a whole; the tail that does not fill a window is dropped.
    """
    ids = tokenizer.encode(text, add_bos=False)
    step = length - 1
    windows = [[tokenizer.bos_id, *ids[i : i + step]] for i in range(0, len(ids) - step + 1, step)]
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(windows[:count])


def calibration_tokens(tokenizer, samples: int = 64, length: int = 256) -> torch.Tensor:
    """``samples`` windows of ``length`` tokens of the bundled calibration text: (N, T)."""
    return token_windows(tokenizer, CALIBRATION_TEXT.read_text(), length, samples)


def layer_maker(method: str, bits: int | None, group_size: int | None, options: dict):
    """(group_size, fit, build): how the chosen method rounds a group and stores a rounded matrix."""
    solver = {k: options.pop(k) for k in ("damp", "act_order", "block_size") if k in options}
    if method == "gptq":
        bits = bits or 4
        group_size = group_size or 128
        if options:
            raise ValueError(f"gptq has no options {sorted(options)}; it takes damp, act_order, block_size")
        fit = partial(MinMaxFit, bits=bits)

        def build(rounded):
            return GroupLinear(rounded.codes, rounded.scale, rounded.offset, bits, rounded.perm)

        return group_size, fit, build, solver
    from .spqr import SpQRFit, SpQRLinear

    bits = bits or 3
    group_size = group_size or 16
    threshold = options.pop("outlier_threshold", 20.0)
    stat_bits, stat_group = options.pop("stat_bits", 3), options.pop("stat_group", 16)
    if options:
        raise ValueError(
            f"spqr has no options {sorted(options)}; it takes outlier_threshold, stat_bits, stat_group, "
            "damp, act_order, block_size"
        )
    fit = partial(SpQRFit, bits=bits, threshold=threshold, stat_bits=stat_bits, stat_group=stat_group)

    def build(rounded):
        return SpQRLinear(rounded, bits, group_size, stat_bits, stat_group)

    return group_size, fit, build, solver


@torch.no_grad()
def calibrated_quantize(
    model: Gemma,
    method: str,
    tokenizer,
    calibration: torch.Tensor | None,
    bits: int | None,
    group_size: int | None,
    head: str,
    progress: bool = True,
    batch: int = 8,
    **options,
) -> None:
    """Quantize every weight matrix of ``model`` with GPTQ or SpQR, in place (see the module doc)."""
    if calibration is None:
        if tokenizer is None:
            raise ValueError(f"{method} needs calibration text: pass tokenizer=... (or calibration=ids)")
        calibration = calibration_tokens(tokenizer)
    group_size, fit, build, solver = layer_maker(method, bits, group_size, dict(options))
    ids = calibration.to(model.device)
    positions = torch.arange(ids.shape[1], device=model.device)
    rope = {kind: model.rope[kind](positions, model.dtype) for kind in ("local", "global")}

    def quantize_matrix(name: str, weight: torch.Tensor, hessian: Hessian):
        layer = build(gptq(weight, hessian.value(), fit, group_size, **solver))
        replace_layer(model, name, layer)

    x = torch.cat([model.tok_embed(ids[i : i + batch]) for i in range(0, len(ids), batch)])  # (N, T, C)
    blocks = tqdm(list(enumerate(model.blocks)), desc=f"{method}: blocks", disable=not progress)
    for index, block in blocks:
        linears = {name: m for name, m in block.named_modules() if isinstance(m, Linear)}
        hessians = {name: Hessian(m.in_features, model.device) for name, m in linears.items()}
        hooks = [
            m.register_forward_pre_hook(lambda _m, args, h=hessians[name]: h.add(args[0]))
            for name, m in linears.items()
        ]

        def run(x, block=block):
            return torch.cat(
                [block(x[i : i + batch], rope[block.kind], positions) for i in range(0, len(x), batch)]
            )

        run(x)
        for hook in hooks:
            hook.remove()
        for name, m in linears.items():
            quantize_matrix(f"blocks.{index}.{name}", m.weight, hessians[name])
            m.weight = None
        x = run(x)  # the next block's inputs, through this block quantized

    embed = model.tok_embed
    if head == "int8":
        replace_layer(model, "tok_embed", Int8Linear(embed.weight, model.dtype))
    elif head == "same":
        hessian = Hessian(model.cfg.d_model, model.device)
        hessian.add(model.final_norm(x))
        quantize_matrix("tok_embed", embed.weight, hessian)
    if head != "none":
        embed.weight = None
