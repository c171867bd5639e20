"""How fast the command answers: first visible output, usage errors, bad files, against Python.

Run from the repository root:

    python benchmarks/cli_latency.py            # 5 runs of each, the fastest counts
    python benchmarks/cli_latency.py --runs 10

Targets, past a bare `python -c pass` measured in the same run (so that a slow
machine slows both): the progress line shows within 0.3 s on a terminal; a bad
argument or a file that is not a model is said within 0.5 s, before TensorFlow
is imported. The tests check the order (tests/test_terminal.py); this prints
the times, with "met" or "NOT met". Exits 0 unless it cannot measure.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_OUTPUT = 0.3
USAGE_ERROR = 0.5
ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="120", TERM="xterm")


def _fastest(action, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.monotonic()
        action()
        best = min(best, time.monotonic() - start)
    return best


def _first_output(args: list[str], cwd: Path) -> None:
    """Runs `args` with stderr on a pseudo-terminal until it shows a visible character."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd, env=ENV
    )
    os.close(slave)
    seen = b""
    try:
        while not any(c.isalpha() for c in seen.decode(errors="ignore").replace("[2K", "")):
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                raise RuntimeError(f"no output within 60 s: {seen!r}")
            seen += os.read(master, 4096)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    regularize = [sys.executable, "-m", "regularize"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shutil.copy(ROOT / "fixtures" / "cnn.keras", work / "cnn.keras")
        (work / "bad.keras").write_bytes(b"not a zip")
        python = _fastest(
            lambda: subprocess.run([sys.executable, "-c", "pass"], env=ENV), args.runs
        )
        print(f"python -c pass: {python:.3f} s")
        cases = [
            (
                "first output, add-dropout",
                FIRST_OUTPUT,
                lambda: _first_output(
                    [*regularize, "add-dropout", "cnn.keras", "-o", "o.keras"], work
                ),
            ),
            (
                "usage error, missing file",
                USAGE_ERROR,
                lambda: subprocess.run(
                    [*regularize, "add-dropout", "nope.keras"],
                    cwd=work,
                    env=ENV,
                    capture_output=True,
                ),
            ),
            (
                "not a model, bad.keras",
                USAGE_ERROR,
                lambda: subprocess.run(
                    [*regularize, "add-dropout", "bad.keras"],
                    cwd=work,
                    env=ENV,
                    capture_output=True,
                ),
            ),
        ]
        for name, target, action in cases:
            extra = _fastest(action, args.runs) - python
            verdict = "met" if extra <= target else "NOT met"
            print(f"{name}: {extra:.3f} s past Python's start-up (target <= {target} s: {verdict})")


if __name__ == "__main__":
    main()
