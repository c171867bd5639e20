"""Measures regularize against plain Keras: rewrite time, CLI time, extra peak memory.

Run from the repository root:

    python benchmarks/bench.py            # full mode, about 2 minutes on 2 cores
    python benchmarks/bench.py --quick    # fewer repetitions, about 1 minute
    python benchmarks/bench.py --json results.json

Every number is measured in this run and printed as measured, with "met" or "NOT met" against
its target. A missed target is reported, never asserted: the script exits 0 unless it cannot
measure at all.

The model is `keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)`,
built offline with random weights (23.6 M parameters, about 94 MB of float32). The input shape
changes neither the number of layers nor the number of weights, and only those matter here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

RATE = 0.3
INPUT_SHAPE = (64, 64, 3)
TARGET_REWRITE = 0.25
TARGET_CLI = 1.10
TARGET_MEMORY = 0.10
# Child processes inherit this; it hides TensorFlow's C++ INFO/WARNING lines
# so that a failure's stderr shows the error, not the oneDNN banner.
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

PLAIN_KERAS = "import keras; m = keras.models.load_model('{}'); m.save('plain.keras')"

# Runs in a fresh interpreter (argv: model path, "regularize" or "clone_model") and prints one
# JSON line. Everything that is not the rewrite itself (imports, loading, the lazy import of
# `regularize.api`, the weight count) happens before the peak is reset, so the peak covers only
# the rewrite.
MEMORY_CHILD = r"""
import gc
import json
import sys
import threading
import time

import keras
import regularize

path, mode = sys.argv[1], sys.argv[2]


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def add_dropout_after_activation(layer, *args, **kwargs):
    out = layer(*args, **kwargs)
    activation = getattr(layer, "activation", None)
    if activation is not None and activation is not keras.activations.linear:
        out = keras.layers.Dropout(0.3)(out)
    return out


model = keras.saving.load_model(path)
weight_bytes = sum(v.numpy().nbytes for v in model.weights)
add_dropout = regularize.add_dropout
gc.collect()

reset_error = None
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError as err:
    reset_error = f"{type(err).__name__}: {err}"

# Fallback for kernels or sandboxes that refuse clear_refs: sample VmRSS from a thread.
samples = []
stop = threading.Event()


def sample():
    while not stop.is_set():
        samples.append(status("VmRSS"))
        time.sleep(0.001)


rss_before = status("VmRSS")
hwm_before = status("VmHWM")
sampler = None
if reset_error is not None:
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
start = time.perf_counter()
if mode == "regularize":
    new = add_dropout(model, 0.3)
else:
    new = keras.models.clone_model(model, call_function=add_dropout_after_activation)
    new.set_weights(model.get_weights())
seconds = time.perf_counter() - start
hwm_after = status("VmHWM")
rss_after = status("VmRSS")
if sampler is not None:
    stop.set()
    sampler.join()

if reset_error is None:
    peak, method = hwm_after, "VmHWM after clear_refs reset"
elif hwm_after > hwm_before:
    # The old high-water mark was exceeded during the rewrite: it is the rewrite's peak.
    peak, method = hwm_after, "VmHWM (exceeded the pre-rewrite peak)"
else:
    peak = max(samples + [rss_after])
    method = "sampled VmRSS every ~1 ms (clear_refs not writable; may miss short peaks)"
print(json.dumps({
    "mode": mode,
    "layers_before": len(model.layers),
    "layers_after": len(new.layers),
    "weight_bytes": weight_bytes,
    "rss_before": rss_before,
    "peak": peak,
    "rss_after": rss_after,
    "extra_peak": peak - rss_before,
    "seconds": seconds,
    "method": method,
    "reset_error": reset_error,
}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer repetitions (about 1 min).")
    parser.add_argument("--json", type=Path, help="Write the results here instead of stdout.")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else 7
    cli_runs = 3 if args.quick else 7

    keras, tf = _import_quietly()
    import regularize

    machine = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "regularize": regularize.__version__,
    }
    mode = "quick" if args.quick else "full"
    print(f"regularize benchmark ({mode} mode)")
    print(
        f"machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
        f"{machine['platform']}, Python {machine['python']}"
    )
    print(
        f"versions: keras {machine['keras']}, tensorflow {machine['tensorflow']}, "
        f"regularize {machine['regularize']}"
    )

    model = keras.applications.ResNet50(weights=None, input_shape=INPUT_SHAPE, classes=10)
    weight_bytes = sum(v.numpy().nbytes for v in model.weights)
    print(
        f"model: ResNet50(weights=None, input_shape={INPUT_SHAPE}, classes=10), "
        f"{len(model.layers)} layers, {model.count_params():,} params, "
        f"{weight_bytes / 2**20:.1f} MiB of weights"
    )
    print()

    results = {"mode": mode, "machine": machine, "model": _describe(model, weight_bytes)}
    results["rewrite_time"] = _bench_rewrite(model, reps)
    with tempfile.TemporaryDirectory(prefix="regularize-bench-") as tmp:
        folder = Path(tmp)
        model.save(folder / "model.keras")
        del model
        gc.collect()
        results["cli_time"] = _bench_cli(folder, cli_runs)
        results["extra_peak_memory"] = _bench_memory(folder / "model.keras")
        # Most saved models are compiled. Keras' own loader then builds the optimizer (Adam: two
        # slot variables per weight) and saves them again; regularize compiles without building.
        compiled = keras.models.load_model(folder / "model.keras")
        compiled.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        compiled.save(folder / "compiled.keras")
        del compiled
        gc.collect()
        print("\nsame model, compiled with Adam:")
        results["cli_time_compiled"] = _bench_cli(
            folder, cli_runs, "compiled.keras", "CLI end to end"
        )
        results["extra_peak_memory_compiled"] = _bench_memory(folder / "compiled.keras")

    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
        print(f"\nwrote {args.json}")
    else:
        print()
        print(text)
    return 0


def _import_quietly():
    """Imports keras and tensorflow without TensorFlow's import-time banner on stderr."""
    from regularize.cli import import_keras_quietly

    import_keras_quietly()
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return keras, tf


def _describe(model, weight_bytes: int) -> dict:
    return {
        "name": "ResNet50",
        "input_shape": list(INPUT_SHAPE),
        "layers": len(model.layers),
        "params": model.count_params(),
        "weight_bytes": weight_bytes,
    }


def _add_dropout_after_activation(layer, *args, **kwargs):
    """The `call_function` of `keras.models.clone_model`'s docstring, for any activation."""
    import keras

    out = layer(*args, **kwargs)
    activation = getattr(layer, "activation", None)
    if activation is not None and activation is not keras.activations.linear:
        out = keras.layers.Dropout(RATE)(out)
    return out


def _clone_baseline(model):
    import keras

    new = keras.models.clone_model(model, call_function=_add_dropout_after_activation)
    new.set_weights(model.get_weights())
    return new


def _bench_rewrite(model, reps: int) -> dict:
    """Times `add_dropout` against the clone_model baseline, interleaved, after one warm-up."""
    import regularize

    def timed(fn):
        gc.collect()
        start = time.perf_counter()
        new = fn()
        seconds = time.perf_counter() - start
        return seconds, len(new.layers)

    def ours():
        return regularize.add_dropout(model, RATE)

    def baseline():
        return _clone_baseline(model)

    # The first call of each pays one-time costs (lazy imports in regularize and Keras) that a
    # long-lived process pays once; the warm-up keeps them out of the median.
    _, ours_layers = timed(ours)
    _, base_layers = timed(baseline)
    ours_times, base_times = [], []
    for _ in range(reps):
        ours_times.append(timed(ours)[0])
        base_times.append(timed(baseline)[0])
    return _report(
        "rewrite time",
        f"add_dropout (+{ours_layers - len(model.layers)} layers)",
        ours_times,
        f"clone_model+set_weights (+{base_layers - len(model.layers)} layers)",
        base_times,
        TARGET_REWRITE,
        extra={"warmup_excluded": True},
    )


def _regularize_command() -> list[str]:
    # The console script next to this interpreter, not a pyenv/asdf shim found on PATH: a shim
    # starts bash and pyenv first, a cost the plain `python -c` baseline would not pay.
    script = Path(sysconfig.get_path("scripts")) / "regularize"
    if script.is_file():
        return [str(script)]
    found = shutil.which("regularize")
    return [found] if found else [sys.executable, "-m", "regularize"]


def _bench_cli(folder: Path, runs: int, name: str = "model.keras", title: str = "") -> dict:
    """Times the CLI against plain Keras load+save, in alternating order, same model file."""
    ours_cmd = [
        *_regularize_command(),
        "add-dropout",
        name,
        "--rate",
        str(RATE),
        "-o",
        "out.keras",
        "--force",
    ]
    base_cmd = [sys.executable, "-c", PLAIN_KERAS.format(name)]
    ours_times, base_times = [], []
    for i in range(runs):
        # Alternate who goes first so that neither always inherits the other's warm caches.
        order = [(ours_cmd, ours_times), (base_cmd, base_times)]
        for cmd, times in order if i % 2 == 0 else reversed(order):
            times.append(_run_timed(cmd, folder))
    return _report(
        title or "CLI end to end",
        "regularize add-dropout",
        ours_times,
        "python -c keras load+save",
        base_times,
        TARGET_CLI,
        extra={
            "command": ours_cmd,
            "baseline_command": base_cmd,
            "output_bytes": (folder / "out.keras").stat().st_size,
            "plain_output_bytes": (folder / "plain.keras").stat().st_size,
        },
    )


def _run_timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=CHILD_ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"error: {cmd[0]} ... exited {done.returncode}:\n{done.stderr.strip()[-2000:]}"
        )
    return seconds


def _bench_memory(path: Path, title: str = "extra peak memory") -> dict:
    """Extra peak RSS of one rewrite, each tool in its own fresh process."""
    runs = {}
    for mode in ("regularize", "clone_model"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(path), mode],
            env=CHILD_ENV,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(
                f"error: memory child ({mode}) exited {done.returncode}:\n"
                f"{done.stderr.strip()[-2000:]}"
            )
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, base = runs["regularize"], runs["clone_model"]
    weight_bytes = ours["weight_bytes"]
    ratio = ours["extra_peak"] / weight_bytes
    base_ratio = base["extra_peak"] / weight_bytes
    verdict = "met" if ratio <= TARGET_MEMORY else "NOT met"
    print(
        f"{title:<19}add_dropout {_mib(ours['extra_peak'])} = {ratio:.1%} of "
        f"{_mib(weight_bytes)} weights  target <= {TARGET_MEMORY:.0%}  {verdict}"
    )
    print(
        f"                   clone_model+set_weights {_mib(base['extra_peak'])} = "
        f"{base_ratio:.1%} of weights (baseline, no target)"
    )
    print(f"                   method: {ours['method']}")
    if base["method"] != ours["method"]:
        print(f"                   method (baseline): {base['method']}")
    if ours["reset_error"]:
        print(f"                   clear_refs not writable: {ours['reset_error']}")
    return {
        "ratio": ratio,
        "target": TARGET_MEMORY,
        "met": ratio <= TARGET_MEMORY,
        "baseline_ratio": base_ratio,
        "weight_bytes": weight_bytes,
        "regularize": ours,
        "clone_model": base,
    }


def _report(title, ours_name, ours_times, base_name, base_times, target, extra) -> dict:
    ours = statistics.median(ours_times)
    base = statistics.median(base_times)
    ratio = ours / base
    verdict = "met" if ratio <= target else "NOT met"
    width = 19
    print(
        f"{title:<{width}}{ours_name} {ours:.3f} s / {base_name} {base:.3f} s "
        f"= {ratio:.3f}  target <= {target:.2f}  {verdict}"
    )
    print(
        f"{'':<{width}}medians of {len(ours_times)}; "
        f"ours {_seconds(ours_times)}; baseline {_seconds(base_times)}"
    )
    return {
        "ratio": ratio,
        "target": target,
        "met": ratio <= target,
        "median_s": ours,
        "baseline_median_s": base,
        "samples_s": ours_times,
        "baseline_samples_s": base_times,
        **extra,
    }


def _seconds(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
