"""Import contract: the rewrite core (`regularize/core/`) imports no Keras API.

The decisions live once, in code both adapters share: the Keras 3 one in
this process, the tf_keras one in the Keras 2 engine's child, where Keras 3
must never load. Checked two ways: every import statement of the core's
files (lazy ones inside functions too), and `sys.modules` of a fresh
process that imports every core module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "regularize" / "core"
FORBIDDEN = ("keras", "tensorflow", "tf_keras", "tensorflow_model_optimization", "jax", "torch")


def _core_modules() -> list[str]:
    return sorted(f"regularize.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")


def _is_forbidden(name: str) -> bool:
    return name.split(".")[0] in FORBIDDEN


def test_core_files_import_no_keras_api():
    found = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}:{node.lineno}: {n}" for n in names if _is_forbidden(n)]
    assert found == []


def test_core_loads_without_keras_api():
    code = (
        "import json, sys\n"
        f"for name in {_core_modules()!r}:\n"
        "    __import__(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = [m for m in json.loads(done.stdout) if _is_forbidden(m)]
    assert loaded == []
    assert "regularize.core.walk" in json.loads(done.stdout)
