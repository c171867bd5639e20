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
    assert "Contracts: 6 kept, 0 broken." in run.stdout


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
    assert "The core imports no Keras or TensorFlow BROKEN" in run.stdout


_IMPORTED = """
import json, runpy, sys
sys.argv = ["regularize", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("regularize", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code or 0
print(json.dumps([code, sorted(m for m in sys.modules if m.split(".")[0] in
    ("regularize", "tf_keras", "tensorflow_model_optimization"))]))
"""


def _modules_imported_by(*args: str, cwd: Path) -> tuple[int, list[str]]:
    import json

    run = subprocess.run(
        [sys.executable, "-P", "-c", _IMPORTED, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    code, modules = json.loads(run.stdout.strip().splitlines()[-1])
    return code, modules


def test_an_add_dropout_of_a_keras_file_imports_nothing_of_the_keras2_adapter(tmp_path):
    """One `add-dropout model.keras` loads the core and the Keras 3 adapter only."""
    source = ROOT / "fixtures" / "cnn.keras"
    code, modules = _modules_imported_by(
        "add-dropout", str(source), "--rate", "0.3", "-o", str(tmp_path / "out.keras"), cwd=tmp_path
    )
    assert code == 0
    assert (tmp_path / "out.keras").is_file()
    assert "regularize.keras3.rewrite" in modules
    assert [
        m for m in modules if m.startswith(("regularize.keras2", "tf_keras", "tensorflow_m"))
    ] == []
    assert "regularize.mc" not in modules


def test_the_import_check_sees_the_keras2_adapter_when_it_is_used(tmp_path):
    """The same probe on a Keras 2 SavedModel does load the Keras 2 adapter (its parent side)."""
    source = ROOT / "fixtures" / "keras2" / "savedmodel"
    code, modules = _modules_imported_by("inspect", str(source), cwd=tmp_path)
    assert code == 0
    assert "regularize.keras2" in modules
    # The child imports tf_keras and tfmot; the parent never does.
    assert [m for m in modules if m.startswith(("tf_keras", "tensorflow_m"))] == []
