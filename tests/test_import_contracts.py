"""The layering contracts of pyproject.toml's [tool.importlinter], run as part of the tests.

Keras-free modules stay Keras-free, the CLI never imports Keras itself, and no two of
regularize's modules or packages import each other in a cycle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports")
    assert command, "import-linter is not installed: pip install -e '.[test]'"
    return subprocess.run(
        [command, "--no-cache", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
    )


def test_every_layering_contract_is_kept():
    run = _lint_imports()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BROKEN" not in run.stdout
    assert "Contracts: 3 kept, 0 broken." in run.stdout


def test_the_contracts_see_a_violation(tmp_path):
    """A copy of the package whose core imports Keras breaks the first contract."""
    shutil.copytree(ROOT / "regularize", tmp_path / "regularize")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    actions = tmp_path / "regularize" / "core" / "actions.py"
    actions.write_text(actions.read_text() + "\nimport keras  # noqa\n")
    run = subprocess.run(
        [shutil.which("lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)},
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "regularize.core.actions -> keras" in run.stdout
    assert "import no Keras or TensorFlow BROKEN" in run.stdout
