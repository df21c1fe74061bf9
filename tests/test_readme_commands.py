"""The README's two fresh-machine commands, run as a newcomer runs them.

A fresh clone of the repository (the committed HEAD), no virtual environment
active, the interpreter running this suite as the ``python3`` that
``scripts/demo`` and ``scripts/test`` build their virtual environment from.
The second command normally runs the whole suite, which would include this
test: here it is given one test module, so the run is bounded (about a
minute, most of it installing packages into the new environment).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.services import unavailable

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def readme_commands() -> list[str]:
    """The indented commands of the README's "On a fresh machine" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("On a fresh machine\n==================\n", 1)[1].split("\n=====", 1)[0]
    return re.findall(r"^ {6}(bash scripts/\S+)\s*$", section, flags=re.MULTILINE)


def test_the_readme_names_two_commands() -> None:
    assert readme_commands() == ["bash scripts/demo", "bash scripts/test"]


def base_python() -> str:
    # the interpreter this virtual environment was made from, like a system python3
    return str(Path(getattr(sys, "_base_executable", sys.executable)).resolve())


def fresh_clone(tmp_path: Path) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        unavailable("needs git and a git checkout to clone")
    clone = tmp_path / "stockpyle"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    return clone


def newcomer_env() -> dict[str, str]:
    """This process's environment without any virtual environment or test-run settings in it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "STOCKPYLE_VENV", "PYTEST_ADDOPTS")
        and not name.startswith("PYTEST_")
    }
    env["PYTHON"] = base_python()
    return env


def run(command: str, clone: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*command.split(), *extra],
        cwd=clone,
        env=newcomer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_both_commands_work_in_a_fresh_clone(tmp_path: Path) -> None:
    demo, tests = readme_commands()
    clone = fresh_clone(tmp_path)
    assert not (clone / ".venv").exists()

    result = run(demo, clone, timeout=600)
    assert f"creating the virtual environment .venv with {base_python()}" in result.stderr
    assert "Per-layer statistics" in result.stdout
    assert "agree with the database" in result.stdout
    venv_python = clone / ".venv" / "bin" / "python"
    where = subprocess.run(
        [str(venv_python), "-c", "import stockpyle, pip; print(stockpyle.__file__); print(pip.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not this checkout, which python -c would put first on sys.path
        env=newcomer_env(),
    ).stdout.split()
    assert where[0] == str(clone / "stockpyle" / "__init__.py")  # installed from the clone, editable
    assert tuple(int(part) for part in where[1].split(".")[:2]) >= (25, 1)  # knows --group

    # the suite's own command, on one module so that it does not run this test again
    result = run(tests, clone, "tests/test_public_api.py", "-q", "-p", "no:cacheprovider", timeout=600)
    assert "creating the virtual environment" not in result.stderr  # the demo's environment is reused
    assert re.search(r"^\d+ passed", result.stdout.strip().splitlines()[-1]), result.stdout
