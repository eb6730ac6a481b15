"""Exercise notebooks and their solutions: same cells, and the exercises run as handed out.

An exercise notebook and its solution are the same notebook cell for cell; only
the TODO cells (those that ``raise NotImplementedError``) differ. Unsolved, an
exercise notebook runs top to bottom without an error and every check says
"not done yet"; solved, every check passes (the solutions also run under nbval).
"""

from __future__ import annotations

from pathlib import Path

import ipykernel.kernelspec
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

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


@pytest.mark.slow
@pytest.mark.parametrize("exercise", EXERCISES, ids=ids(EXERCISES))
def test_unsolved_exercise_runs_and_says_not_done(exercise):
    nb = read(exercise)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=CurrentEnvironment())
    NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(exercise.parent)}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    text = "".join(stream_text(cell) for cell in nb.cells if cell.cell_type == "code")
    todo_cells = sum(TODO_MARK in cell.source for cell in nb.cells if cell.cell_type == "code")
    assert text.count(NOT_DONE) == todo_cells, "every TODO should have a check that says 'not done yet'"
    assert FAIL not in text, "an unsolved exercise should say 'not done yet', not fail"
