"""Checks of the chapter 13 exercises (export): a branch on a tensor's value rewritten so that
``torch.export`` can trace it, and the decode step with its KV cache as explicit tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import GemmaConfig
from ..export import ExplicitCacheStep, quiet
from ..model import Gemma
from .core import Mismatch, check, expect_close, randomize_norms

EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export")


def halve_large_logits_by_branch(logits: torch.Tensor) -> torch.Tensor:
    """The behaviour to keep, written with a Python ``if`` that ``torch.export`` cannot trace."""
    if logits.max() > 10:
        return logits / 2
    return logits


class _Call(nn.Module):
    """A function as a module: what ``torch.export.export`` takes."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _export(module: nn.Module, args: tuple, advice: str) -> torch.export.ExportedProgram:
    try:
        with quiet(*EXPORT_LOGGERS):
            return torch.export.export(module, args)
    except Exception as error:  # the tracer's own error, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise Mismatch(
            f"torch.export could not trace it ({type(error).__name__}: {first[:160]}); {advice}"
        ) from None


@check("branch without if")
def check_branch_free(fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """fn(logits) halves the logits when their largest is above 10, without a Python branch."""
    large, small = torch.randn(2, 8) * 20, torch.randn(2, 8)  # largest above 10, and below
    for x, what in ((large, "logits whose largest is above 10"), (small, "logits all below 10")):
        expect_close(fn(x), halve_large_logits_by_branch(x), f"the output for {what}", atol=1e-6)
    advice = (
        "an `if` on a tensor's value (or .item(), bool(), float()) needs the value while tracing; "
        "compute both results and choose with torch.where(condition, a, b)"
    )
    program = _export(_Call(fn), (large,), advice).module()
    for x, what in ((large, "large"), (small, "small")):
        expect_close(
            program(x),
            halve_large_logits_by_branch(x),
            f"the exported graph's output for the {what} logits",
            atol=1e-6,
            causes=[
                ("the graph took one side for good when it was traced: choose inside it", lambda: fn(large))
            ],
        )
    return "the same outputs as the branch, and torch.export traces one graph that chooses by value"


@check("explicit-cache decode step")
def check_explicit_step(cls) -> str:
    """cls(model, cache) is an nn.Module whose forward(token, input_pos, *state) is ExplicitCacheStep's.

    On the tiny config (window 8): 14 tokens one at a time, so the ring caches wrap;
    every output compared, the inputs must come back unchanged; then ``torch.export``.
    """
    model = randomize_norms(Gemma(GemmaConfig.tiny()))
    cache = model.new_cache(1, 32)
    ref = ExplicitCacheStep(model, cache)
    mine = cls(model, cache)
    if not isinstance(mine, nn.Module):
        raise Mismatch(f"{getattr(cls, '__name__', cls)}(model, cache) should build a torch.nn.Module")
    input_names, names = ref.names()
    tokens = torch.randint(0, model.cfg.vocab_size, (14,))
    state = ref.initial_state()
    for position, token in enumerate(tokens.tolist()):
        inputs = (torch.tensor([[token]]), torch.tensor([position]), *state)
        before = [t.clone() for t in inputs]
        got = mine(*inputs)
        if not isinstance(got, (tuple, list)) or len(got) != len(names):
            raise Mismatch(
                f"forward should return a tuple of {len(names)} tensors: the logits (B, V), then each "
                f"layer's new k, v and slot_pos; got {type(got).__name__}"
                + (f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
            )
        changed = [i for i, (a, b) in enumerate(zip(inputs, before, strict=True)) if not torch.equal(a, b)]
        if changed:
            raise Mismatch(
                f"the step at position {position} changed its input {input_names[changed[0]]}: write into "
                "copies (t.clone()) and return them; an exported graph's inputs are not its to change"
            )
        expected = ref(*inputs)
        for name, g, e in zip(names, got, expected, strict=True):
            expect_close(g, e, f"{name} after position {position}", atol=1e-5)
        state = tuple(got[1:])  # equal to the reference's: the next step starts from it
    program = _export(
        mine, ref.example_inputs(), "the step must be one graph: no Python state, no branch on a value"
    ).module()
    expect_close(
        program(*ref.example_inputs())[0],
        ref(*ref.example_inputs())[0],
        "the exported step's logits",
        atol=1e-5,
    )
    return (
        "the logits and every layer's new cache match ExplicitCacheStep over 14 tokens (the rings wrap), "
        "the inputs come back unchanged, and torch.export traces it"
    )
