"""The machinery every check uses: run the learner's code and the reference, say what differs.

A check is a function decorated with ``@check(title)``: its body compares the
learner's output with the reference's through ``expect_close``, ``expect_equal``
or ``expect_mask`` and returns a short description of what passed; a
``Mismatch`` it raises becomes the one printed line. Each comparison takes
``causes``, known mistakes as ``(likely cause, what that mistake outputs)``:
when the learner's output matches one, the line names it.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import workbook
from ..layers import RMSNorm

PASS, FAIL, TODO = "✅", "❌", "⏳"


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
    """The function that raised ``error``: its innermost frame outside torch and the checks."""
    ours = (os.path.dirname(torch.__file__), os.path.dirname(__file__) + os.sep)
    name, tb = "your code", error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.startswith(ours):
            name = getattr(code, "co_qualname", code.co_name)  # "RMSNorm.forward" (Python 3.11+)
        tb = tb.tb_next
    return name


def check(title: str):
    """Turn a check body into a check that prints one line and returns a CheckResult.

    The body returns a short description of what passed, or raises Mismatch.
    It runs seeded (without touching the caller's random state) and without autograd.
    When it passes on a piece of the learner's model written in a notebook cell, the
    piece is saved in their workbook (``gemma_lite.workbook``).
    """

    def decorate(body: Callable[..., str]) -> Callable[..., CheckResult]:
        @functools.wraps(body)
        def run(*args, **kwargs) -> CheckResult:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)
                try:
                    passed = body(*args, **kwargs)
                    result = CheckResult(
                        True, f"{PASS} {title}: {passed}{workbook.keep_passed(body.__name__, args)}"
                    )
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
    """Same shape and values within tolerance for tensors; equality for anything else."""
    tensors = isinstance(got, torch.Tensor), isinstance(variant, torch.Tensor)
    if all(tensors):
        return got.shape == variant.shape and torch.allclose(
            got.float(), variant.float(), atol=atol, rtol=rtol, equal_nan=True
        )
    return not any(tensors) and got == variant


def likely_cause(got, causes: Sequence[Cause], atol: float = 1e-5, rtol: float = 1e-4) -> str:
    """'; likely cause: ...' for the first known mistake whose output ``got`` matches, else ''."""
    for cause, variant in causes:
        try:
            output = variant()
        except Exception:  # a mistake that cannot even run on these inputs is not the one made
            continue
        if _matches(got, output, atol, rtol):
            return f"; likely cause: {cause}"
    return ""


def expect_tensor(got, what: str) -> torch.Tensor:
    """``got`` itself when it is a tensor; a Mismatch naming ``what`` otherwise."""
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what} should be a torch.Tensor, got {type(got).__name__}")
    return got


def expect_close(
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
    got = expect_tensor(got, what)
    if got.shape != expected.shape:
        raise Mismatch(
            f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            + likely_cause(got, causes, atol, rtol)
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
    cause = likely_cause(got, causes, atol, rtol)
    if not cause and locate is not None:
        cause = locate()
    raise Mismatch(message + cause)


def expect_equal(got, expected, what: str, causes: Sequence[Cause] = ()) -> None:
    """For plain Python values (ints, floats, lists): exact equality."""
    if got != expected:
        raise Mismatch(f"{what} is {got!r}, expected {expected!r}" + likely_cause(got, causes))


def expect_mask(got, expected: torch.Tensor, what: str, causes: Sequence[Cause] = ()) -> None:
    """Boolean masks (True = may attend): name the first (query, key) pair that differs."""
    got = expect_tensor(got, what)
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
        + likely_cause(got, causes)
    )


def build_like(reference: nn.Module, cls, *args) -> nn.Module:
    """The learner's ``cls(*args)``, given ``reference``'s parameters (matched by name), in eval mode."""
    module = cls(*args)
    if not isinstance(module, nn.Module):
        raise Mismatch(f"{getattr(cls, '__name__', cls)}(...) should build a torch.nn.Module")
    return _copy_weights(reference, module)


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


def randomize_norms(module: nn.Module) -> nn.Module:
    """Give every RMSNorm a random weight, so that x * w and x * (1 + w) differ."""
    for m in module.modules():
        if isinstance(m, RMSNorm):
            m.weight.normal_(0.0, 0.5)
    return module.eval()


def outputs_by_module(model: nn.Module, names: set[str], run: Callable[[], object]) -> dict[str, list]:
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


def describe(model: nn.Module, name: str) -> str:
    """Who wrote submodule ``name``: " (your Attention, which calls your ...)" or " (the package's RMSNorm)".

    A plain layer (a Linear inside a GeGLU) is described by the piece it belongs to.
    """
    owner = name
    while "." in owner and not _is_piece(type(model.get_submodule(owner))):
        owner = owner.rpartition(".")[0]
    cls = type(model.get_submodule(owner))
    inside = f", inside '{owner}'" if owner != name else ""
    if not workbook.is_learners(cls):
        return f"{inside} (the package's {cls.__name__})"
    called = [n for n, fn in workbook.functions_used(cls).items() if workbook.is_learners(fn)]
    calls = f", which calls your {', '.join(called)}" if called else ""
    return f"{inside} (your {cls.__name__}{calls})"


def _is_piece(cls) -> bool:
    return cls.__name__ in workbook.PIECES or workbook.is_learners(cls)


def _first_divergence(reference: nn.Module, mine: nn.Module, run_ref, run_mine) -> str:
    """'; ... first differs at <submodule>' in the reference's call order."""
    shared = {n for n, _ in reference.named_modules() if n} & {n for n, _ in mine.named_modules() if n}
    ref_out = outputs_by_module(reference, shared, run_ref)
    my_out = outputs_by_module(mine, shared, run_mine)
    for name, outputs in ref_out.items():
        mine_outputs = my_out.get(name, [])
        for ref_o, my_o in zip(outputs, mine_outputs, strict=False):
            if not isinstance(ref_o, torch.Tensor):
                continue
            if not _matches(my_o, ref_o, 1e-4, 1e-4):
                who = describe(mine, name)
                return f"; the first submodule whose output differs is '{name}'{who}"
    return "; every submodule's output agrees, so look at how your forward connects them"


def compare_modules(
    mine: nn.Module,
    ref: nn.Module,
    args: tuple,
    what: str,
    causes: Sequence[Cause],
    *,
    atol: float | Callable[[torch.Tensor], float] = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Same output for the same ``args``; on a mismatch, name the first submodule that diverges.

    ``atol`` may be a function of the reference's output (a tolerance scaled to its values).
    """
    expected = ref(*args)
    expect_close(
        mine(*args),
        expected,
        what,
        atol=atol(expected) if callable(atol) else atol,
        rtol=rtol,
        causes=causes,
        locate=lambda: _first_divergence(ref, mine, lambda: ref(*args), lambda: mine(*args)),
    )


def fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with code objects of its own, for a check to torch.compile.

    Dynamo keeps compiled code per code object: compiling the copy neither reuses
    nor disturbs what the learner compiled from ``fn``, and no ``torch._dynamo.reset()``
    throws their compiled functions away. A function under ``torch.compile`` (or any
    ``functools.wraps`` decorator) is unwrapped first; partials, methods and callable
    objects get a copy of the function they call. A builtin is returned as it is.
    """
    fn = inspect.unwrap(fn)
    if isinstance(fn, functools.partial):
        return functools.partial(fresh_function(fn.func), *fn.args, **fn.keywords)
    if inspect.ismethod(fn):
        return types.MethodType(fresh_function(fn.__func__), fn.__self__)
    if not inspect.isfunction(fn):  # a callable object, or a builtin
        call = type(fn).__call__
        return types.MethodType(fresh_function(call), fn) if inspect.isfunction(call) else fn
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
