"""What the digits examples share: options, reproducible runs, and the report they write.

Not an example itself; `digits_cnn.py` and `digits_lstm.py` import it.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

DEFAULT_OUT = Path("regularize-results")


def add_options(parser: argparse.ArgumentParser, *, epochs: int, name: str) -> None:
    """The options every digits example takes."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument(
        "--rates",
        default="0,0.2,0.3,0.5",
        help="Dropout rates to sweep, comma-separated (default: %(default)s).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"Write {name}.json and .png here (default: {DEFAULT_OUT}/{name} in the working "
        "folder; `--out examples/results` replaces the reference results).",
    )
    parser.add_argument("--work", type=Path, help="Keep data, models and sweeps here (resumable).")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="TensorFlow threads per pool (default 1: the same numbers whatever the number of "
        "cores; 0: TensorFlow's default, one per core, and numbers that may depend on it).",
    )
    parser.add_argument(
        "--no-op-determinism",
        action="store_true",
        help="Skip tf.config.experimental.enable_op_determinism() (to measure its cost).",
    )


def make_reproducible(threads: int = 1, op_determinism: bool = True) -> None:
    """The same numbers on every run of the same command on the same CPU and versions.

    Must run before TensorFlow executes anything: its thread pools are made once. The sweep
    itself calls `keras.utils.set_random_seed(seed)` before each variant (weights, dropout
    masks, batch order).

    Args:
        threads: Threads of TensorFlow's intra-op and inter-op pools; 0 keeps TensorFlow's
            default (one per core), and with it results that depend on the number of cores,
            since the way a sum is split over threads changes its rounding.
        op_determinism: Call `tf.config.experimental.enable_op_determinism()`: ops without a
            deterministic implementation raise instead of varying, and tf.data keeps its order.
    """
    import tensorflow as tf

    if op_determinism:
        tf.config.experimental.enable_op_determinism()
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def parse_rates(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def out_folder(args: argparse.Namespace, name: str) -> Path:
    return args.out if args.out is not None else DEFAULT_OUT / name


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, every thread, TensorFlow's import too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report(
    name: str,
    results: list,
    out: Path,
    *,
    description: str,
    title: str,
    run_settings: dict,
) -> None:
    """Writes <out>/<name>.json and .png, and prints the Markdown tables."""
    from regularize.sweep import plot_curves

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    first = results[0]
    settings = first.settings
    per_seed = {
        str(v.rate): {
            key: [next(x for x in r.variants if x.rate == v.rate).to_dict()[key] for r in results]
            for key in ("train_accuracy", "val_accuracy", "best_val_accuracy", "gap")
        }
        for v in first.variants
    }
    data = {
        "experiment": name,
        "data": description,
        "train_samples": settings["data"]["train"],
        "val_samples": settings["data"]["val"],
        "epochs": settings["epochs"],
        "seeds": [r.seeds[0] for r in results],
        "compile": first.compile_note,
        "run": run_settings,
        "sites": {str(v.rate): v.sites for v in first.variants},
        "summary": {str(rate): numbers for rate, numbers in summary.items()},
        "per_seed": per_seed,
        "best_rate_per_seed": [r.best_rate for r in results],
        "runs": [
            {
                "seed": r.seeds[0],
                "best_rate": r.best_rate,
                "variants": [v.to_dict() for v in r.variants],
            }
            for r in results
        ],
        # Varies from run to run; the tests leave it out of the comparison.
        "cpu_seconds": round(cpu_seconds(), 1),
    }
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    runs = {v.rate: [] for v in first.variants}
    for result in results:
        for variant in result.variants:
            runs[variant.rate].append(variant.history)
    png_path = plot_curves(
        runs,
        out / f"{name}.png",
        title=f"{title} ({data['train_samples']} train samples): "
        f"mean ± std over {len(results)} seed(s)",
    )
    print(markdown_table(summary))
    print()
    print(per_seed_table(data))
    print(f"\nwrote {json_path} and {png_path}; {data['cpu_seconds']:.0f} s of CPU time")


SUMMARY_KEYS = ("train_accuracy", "val_accuracy", "best_val_accuracy", "gap")


def summarize(results: list) -> dict[float, dict[str, dict]]:
    """Mean and standard deviation per rate over several sweeps (one per seed and model).

    Returns:
        rate -> {"train_accuracy" | "val_accuracy" | "best_val_accuracy" |
        "gap": {"mean", "std", "values"}}, rates ascending. `std` is the
        sample standard deviation (n - 1), 0 for a single run.
    """
    from regularize.sweep.stats import mean_std

    by_rate: dict[float, list] = {}
    for result in results:
        for variant in result.variants:
            by_rate.setdefault(variant.rate, []).append(variant)
    summary = {}
    for rate in sorted(by_rate):
        summary[rate] = {}
        for key in SUMMARY_KEYS:
            values = [float(getattr(v, key)) for v in by_rate[rate]]
            mean, std = mean_std(values)
            summary[rate][key] = {"mean": mean, "std": std, "values": values}
    return summary


def markdown_table(summary: dict) -> str:
    """Mean ± std per rate, as a Markdown table."""

    def cell(numbers: dict) -> str:
        return f"{numbers['mean']:.3f} ± {numbers['std']:.3f}"

    lines = [
        "| rate | train acc | val acc | best val acc | gap (train − val) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for rate, numbers in summary.items():
        lines.append(
            f"| {rate:g} | {cell(numbers['train_accuracy'])} | {cell(numbers['val_accuracy'])} "
            f"| {cell(numbers['best_val_accuracy'])} | {cell(numbers['gap'])} |"
        )
    return "\n".join(lines)


def per_seed_table(data: dict) -> str:
    """Val acc and best val acc per rate and seed, and the best rate of each seed."""
    seeds = data["seeds"]
    lines = [
        "| rate | " + " | ".join(f"seed {s}: val acc / best" for s in seeds) + " |",
        "|---:|" + "---:|" * len(seeds),
    ]
    for rate, numbers in data["per_seed"].items():
        cells = [
            f"{val:.4f} / {best:.4f}"
            for val, best in zip(numbers["val_accuracy"], numbers["best_val_accuracy"], strict=True)
        ]
        lines.append(f"| {float(rate):g} | " + " | ".join(cells) + " |")
    best = ", ".join(f"{rate:g}" for rate in data["best_rate_per_seed"])
    lines.append(f"\nbest rate per seed: {best}")
    return "\n".join(lines)
