"""The learner's workbook: the pieces of Gemma they wrote in the exercises, kept as plain files.

When a check passes on a piece written in a notebook cell (``check_rmsnorm(RMSNorm)``),
the definitions of that cell are saved as ``RMSNorm.py`` in the workbook folder, and
``workbook.json`` records that its check passed. A later exercise asks for earlier pieces
by name::

    RMSNorm, Attention = use("RMSNorm", "Attention")

and gets, for each, the learner's own piece when its file exists and its check passed,
otherwise the package's reference; one printed line per piece says which. So any exercise
runs on its own, in any order, after a kernel restart, and uses as much of the learner's
own model as they have written so far.

A saved piece runs on its own: it sees ``math``, ``re``, ``torch``, ``nn``, ``F``,
``GemmaConfig`` and ``pairwise`` (what the exercises import) and the other pieces it names
(each resolved by ``use``), nothing else of the notebook.

Where: the folder ``$GEMMA_LITE_WORKBOOK`` names, else ``~/gemma-lite-workbook``.
Notebooks run from the course's own ``solutions/`` folder keep their pieces in a
``solutions`` subfolder of it, so running a solution never replaces a learner's piece.
``python -m gemma_lite workbook`` lists the pieces, ``--diff NAME`` compares one with the
solution, and ``--reset`` deletes them (after asking).
"""

from __future__ import annotations

import ast
import builtins
import difflib
import hashlib
import importlib
import inspect
import itertools
import json
import linecache
import math
import os
import re
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig

COURSE = Path(__file__).resolve().parents[1]  # the course checkout (exercises/, solutions/)
STATUS_FILE = "workbook.json"


@dataclass(frozen=True)
class Piece:
    """One piece of Gemma the learner writes: in which exercise, checked by what, replaced by what."""

    name: str  # the function or class the exercise asks for
    exercise: str  # the exercise notebook's stem, "02_embeddings_rmsnorm"
    check: str  # the check whose pass saves it, "check_rmsnorm"
    reference: str  # the package's version, "gemma_lite.layers:RMSNorm"

    @property
    def chapter(self) -> str:
        return self.exercise[:2]

    def load_reference(self):
        module, _, attr = self.reference.partition(":")
        return getattr(importlib.import_module(module), attr)


PIECES = {
    p.name: p
    for p in (
        Piece("bpe_encode", "01_tokenizer", "check_bpe_encode", "gemma_lite.tokenizer:bpe_encode"),
        Piece(
            "ScaledEmbedding", "02_embeddings_rmsnorm", "check_embedding", "gemma_lite.layers:ScaledEmbedding"
        ),
        Piece("RMSNorm", "02_embeddings_rmsnorm", "check_rmsnorm", "gemma_lite.layers:RMSNorm"),
        Piece("RotaryEmbedding", "03_rope", "check_rotary_embedding", "gemma_lite.layers:RotaryEmbedding"),
        Piece("apply_rope", "03_rope", "check_apply_rope", "gemma_lite.layers:apply_rope"),
        Piece("causal_mask", "04_attention", "check_causal_mask", "gemma_lite.layers:causal_mask"),
        Piece(
            "sliding_window_mask",
            "04_attention",
            "check_sliding_window_mask",
            "gemma_lite.layers:sliding_window_mask",
        ),
        Piece("window_mask", "04_attention", "check_window_mask", "gemma_lite.layers:window_mask"),
        Piece("Attention", "04_attention", "check_attention", "gemma_lite.layers:Attention"),
        Piece("GeGLU", "05_feedforward_block", "check_geglu", "gemma_lite.layers:GeGLU"),
        Piece("Block", "05_feedforward_block", "check_block", "gemma_lite.layers:Block"),
        Piece("Gemma3", "06_model_weights", "check_model", "gemma_lite.model:Gemma"),
        Piece("gguf_name", "06_model_weights", "check_gguf_name", "gemma_lite.weights:gguf_name"),
        Piece(
            "load_from_gguf", "06_model_weights", "check_my_gemma", "gemma_lite.gguf_file:load_gguf_weights"
        ),
        Piece("next_token_probs", "07_generation", "check_sampling", "gemma_lite.generate:next_token_probs"),
        Piece("generate", "07_generation", "check_generate", "gemma_lite.generate:generate_ids"),
        Piece("StaticCache", "09_kv_cache", "check_static_cache", "gemma_lite.kv_cache:GlobalCache"),
        Piece("RingCache", "09_kv_cache", "check_ring_cache", "gemma_lite.kv_cache:RingCache"),
        Piece(
            "cached_attention", "09_kv_cache", "check_cached_attention", "gemma_lite.layers:cached_attention"
        ),
        Piece("decode_step", "10_torch_compile", "check_decode_step", "gemma_lite.generate:decode_step"),
    )
}

# What a saved piece sees besides the builtins and the other pieces: what the exercises import.
BASE_NAMES = {
    "math": math,
    "re": re,
    "torch": torch,
    "nn": nn,
    "F": F,
    "GemmaConfig": GemmaConfig,
    "pairwise": itertools.pairwise,
}


class WorkbookError(RuntimeError):
    """The workbook folder cannot be used (not writable), or a piece cannot be saved or loaded."""


def root() -> Path:
    """The folder of the learner's workbook: $GEMMA_LITE_WORKBOOK, else ~/gemma-lite-workbook."""
    configured = os.environ.get("GEMMA_LITE_WORKBOOK")
    return Path(configured).expanduser() if configured else Path.home() / "gemma-lite-workbook"


def location() -> Path:
    """Where this process keeps pieces: ``root()``; its ``solutions`` subfolder in the course's solutions/."""
    cwd = Path.cwd()
    in_solutions = cwd.name == "solutions" and (cwd.parent / "exercises").is_dir()
    return root() / "solutions" if in_solutions else root()


def _status(folder: Path) -> dict[str, dict]:
    path = folder / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # damaged: start again rather than fail every exercise
        return {}


def _write_status(folder: Path, status: dict[str, dict]) -> None:
    tmp = folder / f".{STATUS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True) + "\n")
    tmp.replace(folder / STATUS_FILE)  # atomic: a reader sees the old or the new file


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- saving a piece


def cell_source(obj) -> str | None:
    """The source of the notebook cell that defined ``obj`` (a function or class), or None.

    IPython keeps each executed cell in ``linecache`` under a file name that does not
    exist on disk; functions and methods defined there carry that name in their code.
    """
    functions = [obj] if inspect.isfunction(inspect.unwrap(obj)) else list(vars(obj).values())
    for fn in functions:
        fn = inspect.unwrap(fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn)
        if inspect.isfunction(fn):
            filename = fn.__code__.co_filename
            if filename in linecache.cache and not os.path.isfile(filename):
                return "".join(linecache.getlines(filename))
            return None  # defined in a real file: a module, not a cell
    return None


_KEPT_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def definitions(source: str) -> str:
    """The top-level imports, definitions and assignments of a cell; calls and prints are left out."""
    tree = ast.parse(source)
    lines = source.splitlines()
    kept = []
    for node in tree.body:
        if isinstance(node, _KEPT_NODES):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[start - 1 : node.end_lineno]))
    return "\n\n\n".join(kept) + "\n"


def global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


def needs(source: str) -> list[str]:
    """The other pieces a piece's source refers to, in the order of PIECES."""
    used = global_names(compile(source, "<piece>", "exec"))
    return [name for name in PIECES if name in used]


def unknown_names(source: str) -> list[str]:
    """Names the source reads that a saved piece would not see (defined in another cell)."""
    tree = ast.parse(source)
    defined = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    defined |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {
        (a.asname or a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    defined |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    top = set(global_names(compile(source, "<piece>", "exec")))
    loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    known = set(dir(builtins)) | set(BASE_NAMES) | set(PIECES) | defined
    return sorted((top & loads) - known)


def header(piece: Piece) -> str:
    return (
        f"# {piece.name}: your code from exercises/{piece.exercise}.ipynb, saved when {piece.check} passed.\n"
        f"# Later exercises use it (`use({piece.name!r})`). Change it in the notebook, run the check again;\n"
        f"# `python -m gemma_lite workbook --diff {piece.name}` compares it with the solution.\n\n"
    )


def save(name: str, source: str, folder: Path | None = None) -> Path:
    """Write a passing piece's definitions to ``<folder>/<name>.py`` and mark it as passed."""
    piece = PIECES[name]
    folder = folder or location()
    code = definitions(source)
    missing = unknown_names(code)
    if missing:
        raise WorkbookError(
            f"not saved: your {name} uses {', '.join(missing)}, defined in another cell; "
            "import or define it in the same cell so the piece runs on its own"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = header(piece) + code
        path = folder / f"{name}.py"
        tmp = folder / f".{name}.py.{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(path)
        status = _status(folder)
        status[name] = {"sha256": _digest(text), "exercise": piece.exercise, "check": piece.check}
        _write_status(folder, status)
    except OSError as e:
        raise WorkbookError(
            f"cannot save your {name} in {folder} ({e.strerror}); "
            "set GEMMA_LITE_WORKBOOK to a folder you can write"
        ) from e
    return path


def keep_passed(check_name: str, args: tuple) -> str:
    """After ``check_name`` passed on ``args``: save each argument that is a piece it checks, from a cell.

    Returns what to add to the check's line (" (saved as RMSNorm.py in your workbook)"), or "".
    """
    notes = []
    for obj in args:
        name = getattr(obj, "__name__", None)
        piece = PIECES.get(name) if isinstance(name, str) else None
        if piece is None or piece.check != check_name:
            continue
        source = cell_source(obj)
        if source is None:
            continue
        try:
            notes.append(f"saved as {save(name, source).name} in your workbook")
        except (WorkbookError, SyntaxError) as e:
            notes.append(str(e))
    return f" ({'; '.join(notes)})" if notes else ""


# ---------------------------------------------------------------- using pieces


@dataclass(frozen=True)
class Choice:
    """Which version of a piece ``use`` returns, and why."""

    piece: Piece
    value: object
    yours: bool
    why: str

    def line(self) -> str:
        return f"  {self.piece.name:20} {self.why}"


def _load_file(piece: Piece, path: Path, folder: Path, loading: tuple[str, ...]):
    source = path.read_text()
    # A real module in sys.modules: torch.compile imports a function's module by its name.
    module = types.ModuleType(f"workbook.{piece.name}")
    module.__file__ = str(path)
    namespace = vars(module)
    namespace.update(BASE_NAMES)
    for dep in needs(source):
        if dep != piece.name:
            namespace[dep] = choose(dep, folder, loading + (piece.name,)).value
    sys.modules.setdefault("workbook", types.ModuleType("workbook"))
    sys.modules[module.__name__] = module
    exec(compile(source, str(path), "exec"), namespace)
    if piece.name not in namespace:
        raise WorkbookError(f"{path} does not define {piece.name}")
    return namespace[piece.name]


def choose(name: str, folder: Path | None = None, loading: tuple[str, ...] = ()) -> Choice:
    """The learner's piece if saved and passed (and not edited since), else the package's reference."""
    if name not in PIECES:
        raise KeyError(f"no piece named {name!r}; the pieces are: {', '.join(PIECES)}")
    piece, folder = PIECES[name], folder or location()
    reference = piece.load_reference()
    where = f"the package's {piece.reference.replace(':', '.')}"
    path, record = folder / f"{name}.py", _status(folder).get(name)
    if name in loading:
        return Choice(piece, reference, False, f"{where}: yours refers to itself")
    if not path.is_file() or record is None:
        return Choice(piece, reference, False, f"{where}: yours is not done yet (exercise {piece.chapter})")
    if _digest(path.read_text()) != record["sha256"]:
        return Choice(
            piece,
            reference,
            False,
            f"{where}: {path.name} changed since its check passed; run {piece.check} again",
        )
    try:
        value = _load_file(piece, path, folder, loading)
    except Exception as e:  # a saved piece that no longer loads must not stop the exercise
        return Choice(
            piece, reference, False, f"{where}: {path.name} does not load ({type(e).__name__}: {e})"
        )
    return Choice(piece, value, True, f"yours, from exercise {piece.chapter}")


def use(*names: str, quiet: bool = False):
    """Each named piece: the learner's when it passed its check, else the package's. Prints which.

    ``use("RMSNorm")`` returns the one piece, ``use("RMSNorm", "Attention")`` a tuple.
    """
    choices = [choose(n) for n in names]
    if not quiet:
        print("\n".join(c.line() for c in choices))
    values = tuple(c.value for c in choices)
    return values[0] if len(values) == 1 else values


def calls(functions) -> dict[str, object]:
    """The function pieces these functions call (names in their code, bound in their globals), by name."""
    found = {}
    for fn in functions:
        names = global_names(fn.__code__)
        found.update(
            {n: fn.__globals__[n] for n in PIECES if n in names and inspect.isfunction(fn.__globals__.get(n))}
        )
    return {n: found[n] for n in PIECES if n in found}


def functions_used(cls) -> dict[str, object]:
    """The function pieces a class's methods call, by name."""
    return calls(f for f in vars(cls).values() if inspect.isfunction(f))


def pieces_of(model: nn.Module, *functions) -> dict[str, bool]:
    """Every piece a model (and the given functions) is made of: name -> written by the learner."""
    found = {getattr(fn, "__name__", repr(fn)): is_learners(fn) for fn in functions}
    called = calls(fn for fn in functions if inspect.isfunction(fn))
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in PIECES or is_learners(cls):
            found.setdefault(cls.__name__, is_learners(cls))
            called = {**functions_used(cls), **called}
    for name, fn in called.items():
        found.setdefault(name, is_learners(fn))
    return {n: found[n] for n in [*PIECES, *found] if n in found}


def is_learners(obj) -> bool:
    """True for a class or function the learner wrote: in a notebook cell or a workbook file."""
    module = getattr(obj, "__module__", "") or ""
    return module == "__main__" or module.startswith("workbook.")


# ---------------------------------------------------------------- the command line


def summary(folder: Path | None = None) -> list[tuple[Piece, str]]:
    """Each piece and its state in the workbook: 'passed', 'changed since its check', or 'not done'."""
    folder = folder or location()
    status, rows = _status(folder), []
    for piece in PIECES.values():
        path = folder / f"{piece.name}.py"
        if not path.is_file() or piece.name not in status:
            state = "not done"
        elif _digest(path.read_text()) != status[piece.name]["sha256"]:
            state = "changed since its check"
        else:
            state = "passed"
        rows.append((piece, state))
    return rows


def solution_source(name: str) -> str:
    """The solution's definition of a piece: its cell in ``solutions/<exercise>.ipynb``."""
    import nbformat

    piece = PIECES[name]
    notebook = COURSE / "solutions" / f"{piece.exercise}.ipynb"
    if not notebook.is_file():
        raise WorkbookError(f"no solutions folder next to the package ({notebook} is missing)")
    defines = re.compile(rf"^(class|def) {re.escape(name)}\b", re.MULTILINE)
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and defines.search(cell.source):
            return definitions(cell.source)
    raise WorkbookError(f"{notebook.name} has no cell that defines {name}")


def diff(name: str, folder: Path | None = None) -> str:
    """A unified diff of the learner's piece against the solution's."""
    path = (folder or location()) / f"{name}.py"
    if not path.is_file():
        raise WorkbookError(
            f"{path} does not exist: {name} is not done yet (exercise {PIECES[name].chapter})"
        )
    yours = path.read_text().split("\n\n", 1)[-1]  # without the header comment
    lines = difflib.unified_diff(
        yours.splitlines(keepends=True),
        solution_source(name).splitlines(keepends=True),
        fromfile=str(path),
        tofile=f"solutions/{PIECES[name].exercise}.ipynb",
    )
    return "".join(lines) or f"{name}: the same as the solution\n"


def reset(names: list[str] | None = None, folder: Path | None = None) -> list[str]:
    """Delete the named pieces (all when None) from the workbook; returns the names deleted."""
    folder = folder or location()
    unknown = [n for n in names or [] if n not in PIECES]
    if unknown:
        raise WorkbookError(f"no piece named {unknown[0]!r}; the pieces are: {', '.join(PIECES)}")
    status = _status(folder)
    deleted = []
    for name in names or list(PIECES):
        path = folder / f"{name}.py"
        if path.is_file() or name in status:
            path.unlink(missing_ok=True)
            status.pop(name, None)
            deleted.append(name)
    if names is None and (folder / "solutions").is_dir():
        shutil.rmtree(folder / "solutions")
    if status or (folder / STATUS_FILE).is_file():
        _write_status(folder, status)
    return deleted
