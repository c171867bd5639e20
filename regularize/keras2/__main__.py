"""`python -m regularize.keras2 [REQUEST [RESULT]]`: the Keras 2 engine's entry point.

Reads a JSON request from the file REQUEST (or stdin, for "-" or none) and
writes a JSON answer to the file RESULT (or stdout). A request is one job
(see `regularize.keras2.run`) or `{"requests": [job, ...], "debug": bool}`;
the answer is then `{"results": [result or error, ...]}`. Each error, and a
request that cannot be read at all, is one line of JSON:
`{"error": "...", "type": "ModelLoadError"}`.

Run it with `TF_USE_LEGACY_KERAS=1` (`regularize.keras2.run` does): the
engine imports tf_keras and tensorflow-model-optimization.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from regularize.core import atomic
from regularize.core.errors import first_line as _first_line


def main(argv: list[str]) -> int:
    # SIGTERM unwinds like Ctrl-C, so that an atomic save removes its
    # temporary file or folder (the parent sends it when it is interrupted).
    signal.signal(signal.SIGTERM, _interrupt)
    source = argv[0] if argv else "-"
    target = argv[1] if len(argv) > 1 else "-"
    # Whatever TensorFlow prints to stdout goes to stderr: stdout may carry
    # the answer.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        answer = _answer(source)
    except BaseException as err:  # the answer must be written, whatever happened
        answer = _error(err, debug=True)
    text = json.dumps(answer)
    if target == "-":
        with os.fdopen(answer_fd, "w") as out:
            out.write(text + "\n")
    else:
        os.close(answer_fd)
        # The parent reads the answer only once it is whole.
        atomic.write_file(Path(target), lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0 if "error" not in answer else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _answer(source: str) -> dict:
    try:
        text = sys.stdin.read() if source == "-" else open(source).read()
        payload = json.loads(text)
    except (OSError, ValueError) as err:
        return {"error": f"Cannot read the request: {_first_line(err)}", "type": "RegularizeError"}
    batch = isinstance(payload, dict) and "requests" in payload
    jobs = payload["requests"] if batch else [payload]
    debug = bool(payload.get("debug")) if isinstance(payload, dict) else False
    if not all(isinstance(job, dict) for job in jobs):
        return {
            "error": "Cannot read the request: expected JSON objects.",
            "type": "RegularizeError",
        }
    from regularize.keras2 import engine
    from regularize.keras2.protocol import Job

    results = []
    for data in jobs:
        try:
            results.append(engine.handle(Job.from_dict(data)).to_dict())
        except Exception as err:
            results.append(_error(err, debug=debug))
        finally:
            engine.tf_keras.backend.clear_session()
    return {"results": results} if batch else results[0]


def _error(err: BaseException, *, debug: bool) -> dict:
    from regularize.core.errors import RegularizeError
    from regularize.keras2.protocol import Failure

    if isinstance(err, RegularizeError):
        return Failure(str(err), type(err).__name__).to_dict()
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    return Failure(
        f"internal error in the Keras 2 engine: {type(err).__name__}: "
        f"{_first_line(err)} (run again with `debug=True` for the traceback)"
    ).to_dict()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
