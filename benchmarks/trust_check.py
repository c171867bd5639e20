"""What the model-file check costs: `trust.check_file` against a plain `keras.saving.load_model`.

Run from the repository root:

    python benchmarks/trust_check.py            # ResNet50 and InceptionResNetV2, 3 runs each
    python benchmarks/trust_check.py --runs 1

The check reads the config as data, then builds the model from its config
without allocating any weight (a `StatelessScope` that initializes nothing)
to compare the weights it would allocate with what the file stores. Target:
the check costs at most 0.5x a plain load of the same file. Printed as
measured, with "met" or "NOT met"; the script exits 0 unless it cannot measure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TARGET = 0.5


def _median_seconds(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import keras

    from regularize.keras3 import trust

    with tempfile.TemporaryDirectory() as folder:
        for name in ("ResNet50", "InceptionResNetV2"):
            path = Path(folder) / f"{name}.keras"
            getattr(keras.applications, name)(weights=None).save(path)
            keras.saving.load_model(path)  # warm the import and caches once
            load = _median_seconds(lambda p=path: keras.saving.load_model(p), args.runs)
            check = _median_seconds(lambda p=path: trust.check_file(p), args.runs)
            ratio = check / load
            verdict = "met" if ratio <= TARGET else "NOT met"
            print(
                f"{name}: load {load:.2f} s, check {check:.2f} s, "
                f"check/load {ratio:.2f} (target <= {TARGET}: {verdict})"
            )


if __name__ == "__main__":
    main()
