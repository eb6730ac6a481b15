"""The set-up commands: CI runs exactly what the README tells a person to run."""

from __future__ import annotations

import re
import subprocess

import pytest
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
    out = subprocess.run(
        ["bash", "-c", f'{line}\necho "$TORCH_RANGE"'], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert Requirement(out.stdout.strip()) == wanted
    (pin,) = re.findall(r'TORCH_CPU_PIN="torch==([^"]+)"', script)
    assert wanted.specifier.contains(pin)


def test_environment_yml_installs_what_pyproject_says_and_nothing_else():
    """Binder and conda read environment.yml; it defers every package to pyproject.toml, so the two
    cannot drift apart: only Python and pip from conda, then this package with the extras the
    course script installs."""
    from packaging.specifiers import SpecifierSet

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    env = yaml_of(REPO_ROOT / "environment.yml")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(c.split("=")[0] for c in conda) == ["pip", "python"]
    python = next(c.split("=", 1)[1] for c in conda if c.startswith("python="))
    assert SpecifierSet(project["requires-python"]).contains(python + ".0")
    installs = [line for line in pip if not line.startswith("--")]
    extras = re.search(r'pip install -q -e "\.\[(\w+)\]"', (REPO_ROOT / "course").read_text()).group(1)
    assert installs == [f"-e .[{extras}]"] and extras in project["optional-dependencies"]
    assert all(
        line == "--extra-index-url https://download.pytorch.org/whl/cpu"
        for line in pip
        if line.startswith("--")
    )


def test_binder_readies_the_weights_and_the_lab_settings_at_build_time():
    post_build = (REPO_ROOT / "postBuild").read_text()
    assert post_build.startswith("#!/usr/bin/env bash") and (REPO_ROOT / "postBuild").stat().st_mode & 0o111
    commands = [line.split("#")[0].strip() for line in post_build.splitlines() if not line.startswith("#")]
    assert "python -m gemma_lite fetch" in commands and "python -m gemma_lite lab-settings" in commands
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "postBuild")]).returncode == 0


def test_the_workflow_for_forks_runs_the_readme_test_command():
    workflow = yaml_of(REPO_ROOT / ".github" / "workflows" / "course.yml")
    steps = workflow["jobs"]["test"]["steps"]
    assert steps[-1]["run"] == "bash course test"
    assert "bash course test" in (REPO_ROOT / "README.md").read_text()


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())
