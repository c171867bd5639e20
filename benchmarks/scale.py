"""Measures regularize at scale: rewrite time against depth, extra peak memory on large models.

Run from the repository root:

    python benchmarks/scale.py              # full mode, about 6 minutes on 2 cores
    python benchmarks/scale.py --quick      # 3 timing repeats instead of 5, about 5 minutes
    python benchmarks/scale.py --json scale.json
    python benchmarks/scale.py --part memory --models chain EfficientNetV2L

Two measurements, each sample in a fresh interpreter so that no run inherits another's garbage
(every rewrite adds a call node to each reused layer, and Keras keeps those alive):

1. Time against depth: `regularize.add_dropout` on a chain of N and of 2N `Dense(relu)` layers
   (N = 1,000 by default), interleaved N, 2N, N, 2N, ...; the ratio of the medians should stay
   <= 2.2 (linear growth). Keras' own time to build the same chain is printed for reference.
2. Extra peak memory of one rewrite, above the loaded model: a 2N-layer chain and the largest
   Keras Applications (EfficientNetV2L, NASNetLarge, ConvNeXtXLarge; `weights=None`, 64x64
   inputs, 1,000 classes: full-size weights, logits out). Each child builds its model, pays
   one-time costs on a tiny model first, returns freed heap to the OS (`malloc_trim`), resets
   the kernel's high-water mark (`/proc/self/clear_refs`), rewrites, and reads VmHWM. The
   target is <= 10 % of the weight bytes; each child also checks that the variables are shared
   and that inference is bit-identical on one input. The extra memory grows with the number
   of inserted layers, not with the weights (on TensorFlow each Keras `Dropout` holds a seed
   variable: about 55 KiB per inserted layer in all), so the chain's ratio depends on its width
   (`--chain-width`, default 256).

Every number is measured in this run and printed as measured, with "met" or "NOT met" against
its target. A missed target is reported, never asserted: the script exits 0 unless it cannot
measure at all.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench import CHILD_ENV
from bench import _mib
from bench import _seconds

ROOT = Path(__file__).resolve().parents[1]
RATE = 0.3
N = 1000
TIME_WIDTH = 16
CHAIN_WIDTH = 256
IMAGE_SIZE = 64
TARGET_RATIO = 2.2
TARGET_MEMORY = 0.10
APPLICATIONS = ("EfficientNetV2L", "NASNetLarge", "ConvNeXtXLarge")
MODELS = ("chain", *APPLICATIONS)
# The children import this checkout's `regularize`, whatever is installed.
ENV = {
    **CHILD_ENV,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timing repeats instead of 5.")
    parser.add_argument("--json", type=Path, help="Write the results here as JSON.")
    parser.add_argument("--n", type=int, default=N, help=f"Chain depth N (default {N}).")
    parser.add_argument("--reps", type=int, help="Timing repeats per depth (default 5, quick 3).")
    parser.add_argument(
        "--chain-width",
        type=int,
        default=CHAIN_WIDTH,
        help=f"Units per Dense layer of the memory chain (default {CHAIN_WIDTH}).",
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="Memory models."
    )
    parser.add_argument("--part", choices=("all", "time", "memory"), default="all")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)
    if args.n < 1 or args.chain_width < 1:
        parser.error(f"Expected positive sizes. Received: n={args.n}, width={args.chain_width}")
    reps = args.reps or (3 if args.quick else 5)

    results: dict = {"mode": "quick" if args.quick else "full", "machine": _machine()}
    machine = results["machine"]
    print(f"regularize scale benchmark ({results['mode']} mode)")
    print(
        f"machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
        f"{machine['platform']}, Python {machine['python']}, load average "
        f"{machine['load_average']}"
    )
    if args.part in ("all", "time"):
        results["time_vs_depth"] = _bench_time(args.n, reps)
    if args.part in ("all", "memory"):
        specs = [
            f"chain:{2 * args.n}:{args.chain_width}" if name == "chain" else f"app:{name}"
            for name in args.models
        ]
        results["extra_peak_memory"] = _bench_memory(specs)
        results["versions"] = results["extra_peak_memory"][0].get("versions")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
    }


# -- parent: time against depth ----------------------------------------------


def _bench_time(n: int, reps: int) -> dict:
    """Rewrite time of an N- and a 2N-layer chain, one fresh process per sample."""
    depths = (n, 2 * n)
    samples: dict[int, list[dict]] = {d: [] for d in depths}
    print(
        f"\nrewrite time against depth: Dense({TIME_WIDTH}, relu) chains, "
        f"{reps} samples per depth, each in a fresh process (interleaved)"
    )
    for _ in range(reps):
        for depth in depths:
            samples[depth].append(_run_child("time", f"chain:{depth}:{TIME_WIDTH}"))

    def median(depth, key):
        return statistics.median(s[key] for s in samples[depth])

    rows = {}
    print(f"  {'layers':>7}  {'add_dropout wall':>16}  {'cpu':>7}  {'keras build':>11}  inserted")
    for depth in depths:
        rows[depth] = {
            "wall_s": median(depth, "seconds"),
            "cpu_s": median(depth, "cpu_seconds"),
            "keras_build_s": median(depth, "build_seconds"),
            "inserted": samples[depth][0]["inserted"],
            "samples_wall_s": [s["seconds"] for s in samples[depth]],
            "samples_cpu_s": [s["cpu_seconds"] for s in samples[depth]],
        }
        row = rows[depth]
        print(
            f"  {depth:>7,}  {row['wall_s']:>14.2f} s  {row['cpu_s']:>5.2f} s  "
            f"{row['keras_build_s']:>9.2f} s  {row['inserted']:,}"
        )
    small, large = rows[n], rows[2 * n]
    ratio = large["wall_s"] / small["wall_s"]
    cpu_ratio = large["cpu_s"] / small["cpu_s"]
    build_ratio = large["keras_build_s"] / small["keras_build_s"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(
        f"  ratio {2 * n:,}/{n:,}: wall {ratio:.2f} (target <= {TARGET_RATIO}: {verdict}), "
        f"cpu {cpu_ratio:.2f}, Keras' own build {build_ratio:.2f} (reference)"
    )
    for depth in depths:
        print(f"  samples at {depth:,}: wall {_seconds(rows[depth]['samples_wall_s'])}")
    return {
        "n": n,
        "width": TIME_WIDTH,
        "reps": reps,
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "keras_build_ratio": build_ratio,
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "depths": {str(d): rows[d] for d in depths},
    }


# -- parent: extra peak memory -----------------------------------------------


def _bench_memory(specs: list[str]) -> list[dict]:
    print(
        "\nextra peak memory of one add_dropout, above the loaded model "
        "(each model in a fresh process)"
    )
    header = (
        f"  {'model':<22}{'layers':>7}{'+drop':>7}{'params':>14}{'weights':>12}"
        f"{'extra peak':>13}{'of weights':>11}{'time':>9}  exact  shared  verdict"
    )
    print(header)
    runs = []
    for spec in specs:
        run = _run_child("memory", spec)
        run["ratio"] = run["extra_peak"] / run["weight_bytes"]
        run["target"] = TARGET_MEMORY
        run["met"] = run["ratio"] <= TARGET_MEMORY
        runs.append(run)
        print(
            f"  {run['name']:<22}{run['layers_before']:>7,}{run['inserted']:>7,}"
            f"{run['params']:>14,}{_mib(run['weight_bytes']):>12}{_mib(run['extra_peak']):>13}"
            f"{run['ratio']:>10.1%} {run['seconds']:>7.1f} s  "
            f"{_yes(run['bit_exact']):<5}  {_yes(run['shares_variables']):<6}"
            f"  {'met' if run['met'] else 'NOT met'}",
            flush=True,
        )
    methods = sorted({run["method"] for run in runs})
    print(
        f"  target: extra peak <= {TARGET_MEMORY:.0%} of weight bytes; method: {'; '.join(methods)}"
    )
    for run in runs:
        per_layer = run["extra_peak"] / max(run["inserted"], 1)
        print(
            f"  {run['name']}: {_mib(run['extra_peak'])} extra = "
            f"{per_layer / 1024:.0f} KiB per inserted layer; RSS after "
            f"{_mib(run['rss_after'] - run['rss_before'])} above before; "
            f"output {run['output']}"
        )
    return runs


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _run_child(kind: str, spec: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, spec]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"error: {kind} child for {spec} exited {done.returncode}:\n"
            f"{done.stderr.strip()[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- children ----------------------------------------------------------------


def _child(kind: str, spec: str) -> int:
    from regularize.cli import import_keras_quietly

    import_keras_quietly()
    warnings.simplefilter("ignore")  # the >2,500-node note of add_dropout, Keras' notes
    # The harness's own 2,000-layer model: Keras builds it recursively.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
    result = _child_time(spec) if kind == "time" else _child_memory(spec)
    print(json.dumps(result))
    return 0


def _build(spec: str):
    """The model named by `spec` ("chain:DEPTH:WIDTH" or "app:NAME") and one input."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    kind, *rest = spec.split(":")
    if kind == "chain":
        depth, width = int(rest[0]), int(rest[1])
        inputs = keras.Input((width,))
        x = inputs
        for i in range(depth):
            # He init keeps a deep ReLU chain's activations from vanishing, so the
            # bit-exact check compares non-zero outputs.
            x = keras.layers.Dense(
                width, activation="relu", kernel_initializer="he_normal", name=f"d{i}"
            )(x)
        outputs = keras.layers.Dense(1, name="out")(x)
        model = keras.Model(inputs, outputs, name=f"chain{depth}")
        x = rng.normal(size=(1, width)).astype("float32")
        return f"chain {depth}x{width}", model, x
    name = rest[0]
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    # Logits, not softmax: random weights saturate a softmax into one-hot rows, which would
    # make the bit-exact check weak.
    model = getattr(keras.applications, name)(
        weights=None, input_shape=shape, classifier_activation=None
    )
    x = rng.uniform(0, 255, size=(1, *shape)).astype("float32")
    return name, model, x


def _child_time(spec: str) -> dict:
    import regularize

    _warm_up()
    start = time.perf_counter()
    _, model, _ = _build(spec)
    build_seconds = time.perf_counter() - start
    gc.collect()
    report = regularize.Report()
    start, cpu = time.perf_counter(), time.process_time()
    new = regularize.add_dropout(model, RATE, report=report)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {
        "spec": spec,
        "layers_before": len(model.layers),
        "layers_after": len(new.layers),
        "inserted": sum(site.action == "insert" for site in report.sites),
        "build_seconds": build_seconds,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def _child_memory(spec: str) -> dict:
    import keras
    import numpy as np

    import regularize

    name, model, x = _build(spec)
    # From shapes, not `v.numpy()`: a copy of 1.4 GB of weights would leave freed heap
    # behind for the rewrite to reuse unseen.
    weight_bytes = sum(
        math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in model.weights
    )
    _warm_up()
    report = regularize.Report()
    gc.collect()
    _malloc_trim()
    with _PeakMemory() as peak:
        start = time.perf_counter()
        new = regularize.add_dropout(model, RATE, report=report)
        seconds = time.perf_counter() - start
    shares = {id(v) for v in new.weights} == {id(v) for v in model.weights}
    expected = np.asarray(model(x, training=False))
    received = np.asarray(new(x, training=False))
    return {
        "spec": spec,
        "name": name,
        "layers_before": len(model.layers),
        "layers_after": len(new.layers),
        "inserted": sum(site.action == "insert" for site in report.sites),
        "params": model.count_params(),
        "weight_bytes": weight_bytes,
        "seconds": seconds,
        "shares_variables": shares,
        "bit_exact": bool(np.array_equal(expected, received)),
        "output": (
            f"shape {expected.shape}, {np.count_nonzero(expected)} non-zero, "
            f"max |y| {np.abs(expected).max():.3g}, all finite {bool(np.isfinite(expected).all())}"
        ),
        "versions": {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "regularize": regularize.__version__,
        },
        **peak.result,
    }


def _warm_up() -> None:
    """Pays one-time costs (lazy imports, first symbolic calls) on a tiny model."""
    import keras

    import regularize

    inputs = keras.Input((4,))
    hidden = keras.layers.Conv1D(2, 1, activation="relu")(keras.layers.Reshape((4, 1))(inputs))
    hidden = keras.layers.Dense(3, activation="relu")(keras.layers.Flatten()(hidden))
    regularize.add_dropout(keras.Model(inputs, keras.layers.Dense(1)(hidden)), RATE)
    gc.collect()


def _malloc_trim() -> None:
    """Returns freed heap to the OS, so the rewrite cannot hide in memory freed earlier."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


class _PeakMemory:
    """Peak RSS inside the block: VmHWM after a clear_refs reset, else sampled VmRSS."""

    def __enter__(self):
        self.reset_error = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as err:
            self.reset_error = f"{type(err).__name__}: {err}"
        self.samples: list[int] = []
        self.thread = None
        if self.reset_error is not None:
            import threading

            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        self.rss_before = _status("VmRSS")
        self.hwm_before = _status("VmHWM")
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.samples.append(_status("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        hwm, rss = _status("VmHWM"), _status("VmRSS")
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
        if self.reset_error is None:
            peak, method = hwm, "VmHWM after clear_refs reset"
        elif hwm > self.hwm_before:
            peak, method = hwm, "VmHWM (exceeded the earlier peak)"
        else:
            peak = max([*self.samples, rss])
            method = "VmRSS sampled every ~1 ms (clear_refs not writable)"
        self.result = {
            "rss_before": self.rss_before,
            "peak": peak,
            "rss_after": rss,
            "extra_peak": peak - self.rss_before,
            "method": method,
            "reset_error": self.reset_error,
        }
        return False


if __name__ == "__main__":
    sys.exit(main())
