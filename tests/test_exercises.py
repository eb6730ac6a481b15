"""Exercise notebooks and their solutions: same cells, and the exercises run as handed out.

An exercise notebook and its solution are the same notebook cell for cell; only
the TODO cells (those that ``raise NotImplementedError``) differ. Unsolved, an
exercise notebook runs top to bottom without an error, every check says
"not done yet", and the package's pieces stand in for the learner's (and it says
so); solved, every check passes (the solutions also run under nbval, in order,
each one using the pieces the earlier ones saved).

Every piece of the model (``gemma_lite.workbook.PIECES``) is a TODO of its
exercise, followed by its check, after three hints that do not give it away.
"""

from __future__ import annotations

import re
from pathlib import Path

import ipykernel.kernelspec
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from gemma_lite import workbook
from gemma_lite.checks import FAIL, PASS, TODO

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))
TODO_MARK = "raise NotImplementedError"
NOT_DONE = f"{TODO} not done yet"


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def solution_of(exercise: Path) -> Path:
    return ROOT / "solutions" / exercise.name


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def ids(paths):
    return [p.stem for p in paths]


def test_every_chapter_so_far_has_exercises():
    chapters = {p.name for p in (ROOT / "notebooks").glob("0[0-7]_*.ipynb")}
    assert chapters <= {p.name for p in EXERCISES}


@pytest.mark.parametrize("exercise", EXERCISES, ids=ids(EXERCISES))
def test_solution_has_the_same_cells(exercise):
    solution = solution_of(exercise)
    assert solution.is_file(), f"{exercise.name} has no solution in solutions/"
    ex_cells, sol_cells = read(exercise).cells, read(solution).cells
    assert len(ex_cells) == len(sol_cells), "exercise and solution differ in their number of cells"
    todos = 0
    for i, (ex, sol) in enumerate(zip(ex_cells, sol_cells, strict=True)):
        assert ex.cell_type == sol.cell_type, f"cell {i}: {ex.cell_type} vs {sol.cell_type} in the solution"
        if ex.cell_type == "code" and TODO_MARK in ex.source:
            todos += 1
            assert TODO_MARK not in sol.source, f"cell {i} is still a TODO in the solution"
        else:
            assert ex.source == sol.source, f"cell {i} differs but is not a TODO cell"
    assert todos, f"{exercise.name} has no TODO cell"


@pytest.mark.parametrize("exercise", EXERCISES, ids=ids(EXERCISES))
def test_exercises_are_handed_out_without_outputs(exercise):
    assert all(not cell.get("outputs") for cell in read(exercise).cells if cell.cell_type == "code")


@pytest.mark.parametrize("exercise", EXERCISES, ids=ids(EXERCISES))
def test_solution_outputs_pass_every_check(exercise):
    text = "".join(stream_text(cell) for cell in read(solution_of(exercise)).cells)
    assert PASS in text, "the solution shows no passing check: run it and save its outputs"
    assert FAIL not in text and TODO not in text, "a check in the stored solution did not pass"


class CurrentEnvironment(KernelSpecManager):
    """Kernels that run this test's own Python (like nbval's --nbval-current-env)."""

    def get_kernel_spec(self, kernel_name):
        return self.kernel_spec_class(
            resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict()
        )


def defining_cell(cells, name: str) -> int:
    defines = re.compile(rf"^(class|def) {re.escape(name)}\b", re.MULTILINE)
    found = [i for i, c in enumerate(cells) if c.cell_type == "code" and defines.search(c.source)]
    assert len(found) == 1, f"{name} should be defined in exactly one cell, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("name", list(workbook.PIECES))
def test_every_piece_of_the_model_is_an_exercise_with_its_check(name):
    piece = workbook.PIECES[name]
    cells = read(ROOT / "exercises" / f"{piece.exercise}.ipynb").cells
    i = defining_cell(cells, name)
    assert TODO_MARK in cells[i].source, f"{name} is not a TODO in exercise {piece.exercise}"
    later = "".join(c.source for c in cells[i + 1 :] if c.cell_type == "code")
    called = re.search(rf"{piece.check}\((\w+, )*{name}\b", later)
    assert called, f"no {piece.check}(..., {name}, ...) after the TODO"


@pytest.mark.parametrize("name", list(workbook.PIECES))
def test_pieces_have_three_hints_that_do_not_give_the_solution(name):
    piece = workbook.PIECES[name]
    cells = read(ROOT / "exercises" / f"{piece.exercise}.ipynb").cells
    i = defining_cell(cells, name)
    text = next(c.source for c in reversed(cells[:i]) if c.cell_type == "markdown")
    summaries = re.findall(r"<summary>(.*?)</summary>", text)
    assert [s.split(":")[0] for s in summaries] == ["Hint 1", "Hint 2", "Hint 3"]
    solution = workbook.solution_source(name)
    body = [
        line.strip()
        for line in solution.splitlines()
        if line.strip() and not line.strip().startswith(('"""', "#"))
    ]
    hints = text[text.index("<details>") :]
    given = [line for line in body if line in hints]
    assert len(given) <= max(1, len(body) // 4), f"the hints give {len(given)} lines of the solution: {given}"


@pytest.mark.slow
@pytest.mark.parametrize("exercise", EXERCISES, ids=ids(EXERCISES))
def test_unsolved_exercise_runs_and_says_not_done(exercise, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_LITE_WORKBOOK", str(tmp_path))  # an empty workbook: nothing written yet
    nb = read(exercise)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=CurrentEnvironment())
    NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(exercise.parent)}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    text = "".join(stream_text(cell) for cell in nb.cells if cell.cell_type == "code")
    todo_cells = sum(TODO_MARK in cell.source for cell in nb.cells if cell.cell_type == "code")
    assert text.count(NOT_DONE) == todo_cells, "every TODO should have a check that says 'not done yet'"
    assert FAIL not in text, "an unsolved exercise should say 'not done yet', not fail"
    calls = [
        args
        for cell in nb.cells
        if cell.cell_type == "code"
        for args in re.findall(r"\buse\(([^)]*)\)", cell.source)
    ]
    used = [name for args in calls for name in re.findall(r'"(\w+)"', args)]
    if "03" <= exercise.name[:2] <= "07":  # they build on pieces written before
        assert used, "the exercise asks for no earlier piece"
    for name in used:
        assert f"{name:20} the package's" in text, (
            f"the exercise does not say that the package's {name} stands in"
        )
    assert not list(tmp_path.glob("*.py")), "an unsolved exercise saved a piece"
