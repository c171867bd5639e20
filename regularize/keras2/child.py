"""The Keras 2 engine's child process: how it starts, what it may see, how it ends.

`python -I -m regularize.keras2` with `TF_USE_LEGACY_KERAS=1` from the start, a
`sys.path` that never holds the working folder, the requests on stdin and each answer
in a file; a crash becomes one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from regularize.core.errors import RegularizeError
from regularize.core.errors import first_line as _first_line
from regularize.keras2.protocol import Failure
from regularize.keras2.protocol import answer_from_dict


def call_engine(requests: list[dict], *, debug: bool) -> list[dict]:
    """Runs the engine on `requests`; returns its answers (results or errors)."""
    env = dict(os.environ)
    env["TF_USE_LEGACY_KERAS"] = "1"
    if not debug:
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    payload = {"requests": [job.to_dict() for job in requests], "debug": debug}
    with tempfile.TemporaryDirectory(prefix="regularize-legacy-") as tmp:
        result_path = Path(tmp) / "result.json"
        # `-I`: no working folder, no user site, no PYTHON* variables on the
        # child's path (a `json.py` beside the model is not imported). What
        # the child needs, this package and the libraries it imports, goes
        # along explicitly, from where this process finds them.
        command = [sys.executable, "-I", "-c", _BOOT, json.dumps(_child_path()), "-"]
        command.append(str(result_path))
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=None if debug else subprocess.DEVNULL,
                stderr=None if debug else subprocess.PIPE,
                text=True,
                env=env,
                cwd=tmp,
            )
        except OSError as err:
            raise RegularizeError(
                f"Cannot start the Keras 2 engine ({sys.executable} -I): {_first_line(err)}"
            ) from err
        try:
            _, stderr = proc.communicate(json.dumps(payload))
        except BaseException:
            # Ctrl-C, SIGTERM: let the child unwind too (it removes its
            # temporary output) before giving up on it.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        answer = _read_answer(result_path)
    if answer is None:
        raise RegularizeError(_crash_message(proc.returncode, stderr or ""))
    if "error" in answer:  # the request as a whole was refused
        return [Failure.from_dict(answer)] * len(requests)
    return [answer_from_dict(one) for one in answer.get("results", [])]


# The child's first lines: add the explicit folders to its path (after the
# standard library's), then run `regularize.keras2.__main__`.
_BOOT = (
    "import json, sys; "
    "sys.path += [p for p in json.loads(sys.argv.pop(1)) if p not in sys.path]; "
    "from regularize.keras2.__main__ import main; "
    "sys.exit(main(sys.argv[1:]))"
)
# Top-level packages the child imports; each is taken from where this
# process would import it.
_CHILD_PACKAGES = ("regularize", "tensorflow", "tf_keras", "tensorflow_model_optimization")


def _child_path() -> list[str]:
    """The folders the isolated child needs on `sys.path` (never the working folder)."""
    import importlib.machinery

    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was removed
        cwd = None
    folders = [str(Path(__file__).resolve().parents[2])]
    # Relative entries ('' and the like) mean the working folder: left out.
    entries = [p for p in sys.path if os.path.isabs(p) and os.path.normpath(p) != cwd]
    for name in _CHILD_PACKAGES[1:]:
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, entries)
        except (ImportError, ValueError, OSError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations:
            folders.append(str(Path(locations[0]).parent))
    return list(dict.fromkeys(folders))


def _read_answer(path: Path) -> dict | None:
    try:
        answer = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def _crash_message(code: int, stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # TensorFlow's C++ log lines ("I0000 ...", "W0000 ...") are not last words.
    words = [line for line in lines if line[:1] not in "IWE" or not line[1:5].isdigit()]
    last = (words or lines or ["no message"])[-1]
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return (
        f"The Keras 2 engine (python -m regularize.keras2) {how} without a result: {last} "
        "(run again with `debug=True` for its full output)"
    )
