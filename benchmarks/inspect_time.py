"""Times `regularize inspect` against loading the model, on the Keras Applications.

Run from the repository root:

    python benchmarks/inspect_time.py          # the 8 Applications of the tests
    python benchmarks/inspect_time.py --json results.json

Target: planning (what `inspect` does after loading) takes less time
than loading the model, i.e. the ratio plan / load is below 1. Each model is
built with random weights (weights=None, offline) and saved as `.keras` once;
then, in this process, the best of 3 of `regularize.load_model(path)` and of
`regularize.plan(model)` are compared. A missed target is printed as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The same models and input shapes as tests/test_applications.py.
MODELS = {
    "ResNet50": (32, 32, 3),
    "MobileNetV2": (32, 32, 3),
    "MobileNetV3Small": (32, 32, 3),
    "EfficientNetB0": (32, 32, 3),
    "DenseNet121": (32, 32, 3),
    "InceptionV3": (75, 75, 3),
    "ConvNeXtTiny": (32, 32, 3),
    "NASNetMobile": (32, 32, 3),
}
REPEATS = 3


def _best(fn, repeats: int = REPEATS) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(name: str, shape: tuple, folder: Path) -> dict:
    import keras

    import regularize

    build = getattr(keras.applications, name)
    model = build(weights=None, input_shape=shape, include_top=False)
    path = folder / f"{name}.keras"
    model.save(path)
    load_s, loaded = _best(lambda: regularize.load_model(path))
    plan_s, sites = _best(lambda: regularize.plan(loaded, rate=0.3))
    return {
        "model": name,
        "layers": len(loaded.layers),
        "sites": len(sites),
        "load_s": round(load_s, 3),
        "plan_s": round(plan_s, 3),
        "ratio": round(plan_s / load_s, 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated names.")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(measure(name, MODELS[name], Path(tmp)))
            r = rows[-1]
            verdict = "met" if r["ratio"] < 1 else "NOT met"
            print(
                f"{r['model']:<17} {r['layers']:>4} layers {r['sites']:>4} sites  "
                f"load {r['load_s']:.3f} s  inspect {r['plan_s']:.3f} s  "
                f"ratio {r['ratio']:.3f}  ({verdict})",
                flush=True,
            )
    worst = max(r["ratio"] for r in rows)
    verdict = "met" if worst < 1 else "NOT met"
    print(f"worst ratio inspect/load: {worst:.3f} (target < 1: {verdict})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "worst_ratio": worst}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
