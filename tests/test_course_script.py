"""The set-up commands: CI runs exactly what the README tells a person to run."""

from __future__ import annotations

import re
import subprocess

from helpers import REPO_ROOT


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


def test_torch_range_is_the_same_in_the_script_and_the_project():
    script = (REPO_ROOT / "course").read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    (script_range,) = re.findall(r'TORCH_RANGE="(torch[^"]+)"', script)
    assert f'"{script_range}"' in pyproject
    assert "2.13" in script  # the CPU build this project is tested with satisfies the range
