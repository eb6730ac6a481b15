"""Checks of chapter 06 (the full model): the model, as a class or loaded; for the exercises, the
parameter count and the logit lens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .. import workbook
from ..config import GemmaConfig
from ..generate import generate_ids
from ..gguf_file import bundled_gguf_path, open_gguf
from ..loading import load
from ..model import Gemma
from ..weights import external_name, gguf_name
from .core import (
    Cause,
    Mismatch,
    build_like,
    check,
    compare_modules,
    expect_close,
    expect_equal,
    outputs_by_module,
    randomize_norms,
)

LOGIT_TOLERANCE = 1e-5
"""Real-weight logits agree within this share of the largest |logit|: fp32 keeps 7
significant digits, and 18 layers summing in another order than the reference lose one
or two of them, on small logits as on large ones alike."""


def _real_logit_atol(logits: torch.Tensor) -> float:
    """LOGIT_TOLERANCE times the largest |logit| (about 1e-3 for Gemma 3 270M)."""
    return LOGIT_TOLERANCE * float(logits.abs().max())


@contextlib.contextmanager
def _patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


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


@check("Gemma")
def check_model(model_or_cls, reference: Gemma | None = None) -> str:
    """A model class (checked on the tiny config, random weights) or a loaded model.

    A loaded model is compared with ``reference`` (default: the bundled weights,
    loaded here), first weight by weight, then logits on 40 random tokens.
    """
    if not isinstance(model_or_cls, nn.Module):  # a class (or factory) to build
        cfg = GemmaConfig.tiny()
        ref = randomize_norms(Gemma(cfg))
        mine = build_like(ref, model_or_cls, cfg)
        ids = torch.randint(0, cfg.vocab_size, (2, 20))
        what, done = "logits (tiny config, random weights)", "the tiny model's logits match gemma_lite.Gemma"
        atol = 1e-4
    else:
        mine = model_or_cls.eval()
        if reference is None:
            reference, _ = load(device="cpu", dtype=torch.float32, progress=False)
        ref = reference.eval()
        problem = _parameter_difference(mine, ref)
        if problem:
            raise Mismatch(problem)
        ids = torch.randint(3, ref.cfg.vocab_size, (1, 40))
        what, done = "logits (real weights)", "every weight and the logits match the reference model"
        atol = _real_logit_atol
    compare_modules(mine, ref, (ids,), what, _model_causes(ref, ids), atol=atol, rtol=1e-4)
    return done


@check("parameter_count")
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
        expect_equal(fn(cfg, tied=tied), expected, f"parameter_count({name}, tied={tied})", causes)
    return f"{real_count:,} tied, {real_count + head:,} with a separate head"


def _logit_lens(model: Gemma, ids: torch.Tensor, layer: int, final_norm: bool = True) -> torch.Tensor:
    hidden = outputs_by_module(model, {f"blocks.{layer}"}, lambda: model(ids))[f"blocks.{layer}"][0]
    return model.output_head(model.final_norm(hidden) if final_norm else hidden)


@check("logit_lens")
def check_logit_lens(fn) -> str:
    """fn(model, ids (B, T), layer) -> logits (B, T, V) read from the output of blocks[layer]."""
    model = randomize_norms(Gemma(GemmaConfig.tiny()))
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
        expect_close(
            fn(model, ids, layer),
            _logit_lens(model, ids, layer),
            f"logit_lens(model, ids, {layer})",
            causes=causes,
        )
    return "reads the residual stream after any layer through the final norm and the tied head"


@check("gguf_name")
def check_gguf_name(fn: Callable[[str], str]) -> str:
    """fn(our parameter name) -> the tensor's name in the GGUF file, for every parameter of Gemma."""
    cfg = GemmaConfig.tiny()
    names = [n for n, _ in Gemma(cfg).named_parameters()]
    for name in names:
        expected = gguf_name(name)
        causes = [
            (
                "layers are 'blk.N.' in the GGUF, not 'blocks.N.'",
                lambda e=expected: e.replace("blk.", "blocks.", 1),
            ),
            ("keep the '.weight' at the end", lambda e=expected: e.removesuffix(".weight")),
            ("those are Hugging Face's names; the GGUF has its own", lambda n=name: external_name(n, "hf")),
        ]
        expect_equal(fn(name), expected, f"gguf_name({name!r})", causes)
    return f"all {len(names)} parameter names map to the GGUF's tensor names"


def _greedy_text(model: nn.Module, tokenizer, prompt: str, n: int) -> tuple[list[int], str]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    new = generate_ids(model, ids, n, stop_ids={tokenizer.eos_id})
    return new, tokenizer.decode(new)


@check("your Gemma 3")
def check_my_gemma(cls, load_fn: Callable, prompt: str = "The capital of France is") -> str:
    """The capstone: cls(cfg) loaded by load_fn(model, gguf) from the bundled weights is the reference model.

    Weight by weight, then the logits of 40 random tokens within 1e-5 of the largest one (fp32), naming the
    first layer whose output differs and whose piece it is; then both continue ``prompt``
    greedily and must choose the same tokens.
    """
    cfg = GemmaConfig.gemma3_270m()
    mine = cls(cfg)
    if not isinstance(mine, nn.Module):
        raise Mismatch(f"{getattr(cls, '__name__', cls)}(cfg) should build a torch.nn.Module")
    load_fn(mine, open_gguf(bundled_gguf_path()))
    mine = mine.float().eval()
    reference, tokenizer = load(device="cpu", dtype=torch.float32, progress=False)
    problem = _parameter_difference(mine, reference)
    if problem:
        raise Mismatch(f"{problem} (after your {getattr(load_fn, '__name__', 'loader')})")
    ids = torch.randint(3, cfg.vocab_size, (1, 40))
    compare_modules(
        mine,
        reference,
        (ids,),
        "logits (real weights, fp32)",
        _model_causes(reference, ids),
        atol=_real_logit_atol,
    )
    new, text = _greedy_text(mine, tokenizer, prompt, 8)
    expected, _ = _greedy_text(reference, tokenizer, prompt, 8)
    expect_equal(new, expected, f"the greedy continuation of {prompt!r}")
    parts = workbook.pieces_of(mine, load_fn)
    yours = [n for n, learner in parts.items() if learner]
    theirs = [n for n, learner in parts.items() if not learner]
    built = f"built from your {', '.join(yours)}" if yours else "built from the package's pieces only"
    rest = f"; the package's: {', '.join(theirs)}" if theirs and yours else ""
    return (
        f"{built}{rest}. It loads the real weights, its logits match the reference within 1e-5 of "
        f"the largest logit, and it continues {prompt!r} with {text!r}"
    )
