"""The set-up commands: CI runs exactly what the README tells a person to run."""

from __future__ import annotations

import re
import subprocess

from helpers import REPO_ROOT
from packaging.requirements import Requirement


def readme_commands() -> list[str]:
    block = re.search(r"## Two commands\n\n```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert block, "README lost its '## Two commands' block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    lab, test = readme_commands()
    assert lab == "bash course lab" and test == "bash course test"
    ci = [
        line
        for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ci[-1] == test


def test_course_script_is_valid_bash_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "course")]).returncode == 0
    out = subprocess.run(["bash", str(REPO_ROOT / "course"), "help"], capture_output=True, text=True)
    assert out.returncode == 1 and "bash course test" in out.stdout and "bash course lab" in out.stdout


def test_the_script_takes_the_torch_range_from_the_project_and_its_cpu_build_is_in_it():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1)
    (wanted,) = [Requirement(d) for d in re.findall(r'"([^"]+)"', dependencies) if d.startswith("torch")]
    script = (REPO_ROOT / "course").read_text()
    (line,) = [line for line in script.splitlines() if line.startswith("TORCH_RANGE=")]
    out = subprocess.run(["bash", "-c", f'{line}\necho "$TORCH_RANGE"'], cwd=REPO_ROOT, capture_output=True,
                         text=True)
    assert Requirement(out.stdout.strip()) == wanted
    (pin,) = re.findall(r'TORCH_CPU_PIN="torch==([^"]+)"', script)
    assert wanted.specifier.contains(pin)
