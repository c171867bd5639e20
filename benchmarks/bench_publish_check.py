"""Measures what the reload check before publishing costs the CLI, end to end.

Run from the repository root:

    python benchmarks/bench_publish_check.py             # 3 rounds, about 3 minutes on 2 cores
    python benchmarks/bench_publish_check.py --repeat 1  # one round
    python benchmarks/bench_publish_check.py --json results.json

Three commands, each in a fresh interpreter, interleaved round by round so that a busy machine
slows all three alike; the median of each is reported:

- plain: `keras.applications.ResNet50(weights=None)` built and saved with plain Keras;
- CLI without check: `regularize add-dropout keras.applications.ResNet50 --weights none`
  with `io.check_reloads` replaced by a no-op (what the CLI cost before the check);
- CLI: the same command as shipped, the check included.

Target: CLI <= 1.10 x plain. Every number is printed as measured with "met" or "NOT met"; a
missed target is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.10
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}

PLAIN = "import keras; keras.applications.ResNet50(weights=None).save('plain.keras')"
# The CLI's own entry point with the reload check switched off.
NO_CHECK = (
    "import sys; from regularize.keras3 import io; io.check_reloads = lambda *a, **k: None; "
    "from regularize.cli import main; sys.argv[0] = 'regularize'; main()"
)
CLI_ARGS = ["add-dropout", "keras.applications.ResNet50", "--weights", "none", "--force"]


def timed(command: list[str], cwd: str) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed:\n{run.stderr[-2000:]}")
    return seconds


def measure(repeat: int) -> dict:
    commands = {
        "plain": [sys.executable, "-c", PLAIN],
        "cli_no_check": [sys.executable, "-c", NO_CHECK, *CLI_ARGS, "-o", "nocheck.keras"],
        "cli": [sys.executable, "-m", "regularize", *CLI_ARGS, "-o", "cli.keras"],
    }
    times = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(repeat):
            for name, command in commands.items():
                times[name].append(timed(command, folder))
                print(f"round {round_ + 1}: {name:<13} {times[name][-1]:6.2f} s", flush=True)
        check_alone = _check_alone(folder)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "times": times,
        "median": medians,
        "check_alone_s": check_alone,
        "ratio_cli_vs_plain": medians["cli"] / medians["plain"],
        "ratio_no_check_vs_plain": medians["cli_no_check"] / medians["plain"],
        "check_share_s": medians["cli"] - medians["cli_no_check"],
    }


CHECK_ALONE = r"""
import json, time, keras
from regularize.keras3 import io
model = keras.saving.load_model("cli.keras", compile=False)
start = time.perf_counter()
io.check_reloads(model, "cli.keras")
print(json.dumps(time.perf_counter() - start))
"""


def _check_alone(folder: str) -> float:
    """The check by itself, in-process, on the CLI's output (core Keras: layer by layer)."""
    run = subprocess.run(
        [sys.executable, "-c", CHECK_ALONE], cwd=folder, env=ENV, capture_output=True, text=True
    )
    if run.returncode != 0:
        sys.exit(f"the check alone failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.repeat)
    median = result["median"]
    ratio = result["ratio_cli_vs_plain"]
    print()
    print(f"plain load + save (ResNet50):  {median['plain']:6.2f} s (median of {args.repeat})")
    print(f"CLI without the reload check:  {median['cli_no_check']:6.2f} s")
    print(f"CLI with the reload check:     {median['cli']:6.2f} s")
    print(f"the check alone, in-process:   {result['check_alone_s']:6.2f} s")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"CLI / plain = {ratio:.3f} (target <= {TARGET:.2f}: {verdict})")
    print(f"CLI without check / plain = {result['ratio_no_check_vs_plain']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
