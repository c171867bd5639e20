"""Does dropout help when fine-tuning a pretrained base on little data, and which policy?

    python3 examples/digits_transfer.py                        # about 10 CPU-minutes, one thread
    python3 examples/digits_transfer.py --tiny                 # a quick look (and the test)
    python3 examples/digits_transfer.py --out examples/results # replace the reference results

Offline: scikit-learn's bundled digits (1,797 8x8 grey images). A small residual CNN with
BatchNormalization is pretrained on the digits 0-4 (the "pretrained base"), then fine-tuned
on the digits 5-9 with 10 labelled images per class, validated on all the other images of
5-9 (about 850). Two ways to fine-tune, each a `regularize sweep` over policies with 5 seeds:

- frozen: the base frozen (its BatchNormalization layers in inference mode), a new head;
- unfrozen: after that head was trained on the frozen base without dropout, every layer is
  unfrozen (BatchNormalization then normalizes with batch statistics while training) and the
  whole model fine-tuned at a lower learning rate.

Policies compared: none (the baseline), head (dropout only after the last normalization
layer), blocks (after each residual block) and all (after every activation, so also before
the BatchNormalization layers of the base), each at rate 0.3; and drop path when this
version's `Policy` has a `drop_path` setting. Every variant of a seed starts from the same
weights with the same batch order; the tables give mean ± std over seeds and each variant's
difference to `none`, paired by seed, with its 95 % t interval. `all - head` is measured the
same way: the BatchNormalization effect the `head` preset exists for.

The same sweep from the command line, on the files this script writes with `--work DIR`:

    regularize sweep DIR/unfrozen.keras --data DIR/digits_5to9.npz \\
        --policies none,head,blocks,all --rates 0.3 --seeds 0,1,2,3,4 --epochs 30 --batch-size 16

Writes digits_transfer.json (every number of every seed, the intervals) and
digits_transfer_frozen.png / digits_transfer_unfrozen.png to `--out` (default:
regularize-results/digits_transfer in the working folder). Runs are reproducible: the same
command gives the same numbers on the same CPU with the same library versions (one thread per
TensorFlow pool and op determinism, see `common.make_reproducible`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
from common import cpu_seconds
from common import make_reproducible
from sklearn.datasets import load_digits

from regularize import Policy
from regularize.sweep import paired_difference
from regularize.sweep import policy_variants
from regularize.sweep import run_sweep
from regularize.sweep import setting_variants

NAME = "digits_transfer"
DEFAULT_OUT = Path("regularize-results") / NAME
POLICIES = ("none", "head", "blocks", "all")
RATE = 0.3
DROP_PATH = 0.1
PER_CLASS = 10  # labelled images per new class
FULL = {"pretrain_epochs": 20, "epochs": 30, "seeds": [0, 1, 2, 3, 4], "policies": POLICIES}
TINY = {"pretrain_epochs": 2, "epochs": 2, "seeds": [0, 1], "policies": ("none", "all")}
KEYS = ("val_accuracy", "best_val_accuracy")


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (8, 8, 1) float32 images in [0, 1], and their labels."""
    data = load_digits()
    return (data.images / 16.0).astype("float32")[..., None], data.target.astype("int32")


def split(x: np.ndarray, y: np.ndarray, per_class: int) -> dict[str, np.ndarray]:
    """The digits 5-9 as classes 0-4: `per_class` images of each to train on, the rest to
    validate on (a fixed draw, the same for every seed)."""
    rng = np.random.default_rng(0)
    train = []
    for digit in range(5, 10):
        train += list(rng.choice(np.flatnonzero(y == digit), per_class, replace=False))
    train = np.sort(np.array(train))
    val = np.setdiff1d(np.flatnonzero(y >= 5), train)
    return {
        "x_train": x[train],
        "y_train": y[train] - 5,
        "x_val": x[val],
        "y_val": y[val] - 5,
    }


def build_base() -> keras.Model:
    """A small residual CNN with BatchNormalization after every convolution."""
    layers = keras.layers

    def conv_bn(x, filters, name, kernel=3):
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
        return layers.BatchNormalization(name=f"{name}_bn")(x)

    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.ReLU(name="stem_relu")(conv_bn(inputs, 16, "stem"))
    y = layers.ReLU(name="b1_relu")(conv_bn(x, 16, "b1a"))
    x = layers.ReLU(name="b1_out")(layers.Add(name="b1_add")([x, conv_bn(y, 16, "b1b")]))
    x = layers.MaxPooling2D(name="pool")(x)
    y = layers.ReLU(name="b2_relu")(conv_bn(x, 32, "b2a"))
    shortcut = conv_bn(x, 32, "b2s", kernel=1)
    x = layers.ReLU(name="b2_out")(layers.Add(name="b2_add")([shortcut, conv_bn(y, 32, "b2b")]))
    features = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, features, name="base")


def compile_with(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def pretrain(x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[keras.Model, dict]:
    """The base, trained on the digits 0-4 (80 % of them; 20 % held out)."""
    keras.utils.set_random_seed(0)
    base = build_base()
    logits = keras.layers.Dense(5, activation="softmax", name="digits_0to4")(base.output)
    model = keras.Model(base.input, logits, name="pretraining")
    compile_with(model, 1e-3)
    mask = y < 5
    order = np.random.default_rng(0).permutation(np.flatnonzero(mask))
    cut = int(0.8 * len(order))
    train, held = np.sort(order[:cut]), np.sort(order[cut:])
    model.fit(x[train], y[train], batch_size=32, epochs=epochs, verbose=0, shuffle=True)
    _, accuracy = model.evaluate(x[held], y[held], verbose=0)
    info = {"epochs": epochs, "train": len(train), "held_out": len(held), "accuracy": accuracy}
    return base, info


def with_new_head(base: keras.Model, *, frozen: bool, learning_rate: float) -> keras.Model:
    """The base (frozen or not) under a new classifier head for the digits 5-9."""
    keras.utils.set_random_seed(1)
    for layer in base.layers:
        layer.trainable = not frozen
    x = keras.layers.Dense(32, activation="relu", name="head_fc")(base.output)
    outputs = keras.layers.Dense(5, activation="softmax", name="head_out")(x)
    model = keras.Model(base.input, outputs, name="frozen" if frozen else "unfrozen")
    compile_with(model, learning_rate)
    return model


def unfrozen_after_warmup(frozen: keras.Model, data: dict, epochs: int) -> keras.Model:
    """The frozen model's head trained without dropout, then every layer unfrozen."""
    model = keras.models.clone_model(frozen)
    model.set_weights(frozen.get_weights())
    compile_with(model, 1e-3)
    keras.utils.set_random_seed(0)
    model.fit(data["x_train"], data["y_train"], batch_size=16, epochs=epochs, verbose=0)
    for layer in model.layers:
        layer.trainable = True
    unfrozen = keras.Model(model.inputs, model.outputs, name="unfrozen")
    compile_with(unfrozen, 3e-4)
    return unfrozen


def variants(policies) -> tuple[list, list[str]]:
    """The policies at RATE, and drop path where `Policy` has it (detected, not assumed)."""
    chosen, _ = policy_variants(list(policies), [RATE])
    notes = []
    if "drop_path" in {field.name for field in dataclasses.fields(Policy)}:
        chosen += setting_variants("drop_path", [DROP_PATH])
    else:
        notes.append("drop path not compared: this version's Policy has no `drop_path`")
    return chosen, notes


def compare(result, a: str, b: str) -> dict:
    """`a - b` paired by seed, for each of KEYS."""
    runs = {label: {v.seed: v for v in result.runs(label)} for label in (a, b)}
    return {
        key: paired_difference(
            [getattr(runs[a][s], key) for s in result.seeds],
            [getattr(runs[b][s], key) for s in result.seeds],
        ).to_dict()
        for key in KEYS
    }


def variance_ratios(result, x: np.ndarray) -> dict[str, dict[str, list[float]]]:
    """Per variant and BatchNormalization layer, per seed: moving variance / input variance.

    The moving variance is what the layer divides by at inference; the input variance is
    measured here, at inference (no dropout), over `x`. Near 1: the layer's statistics fit
    its inference-time input. Dropout just before the layer while it trains with batch
    statistics makes the moving variance the variance *with* dropout, larger: a ratio above 1
    (the "variance shift" the `head` preset avoids). The mean over channels.
    """
    ratios: dict[str, dict[str, list[float]]] = {}
    for variant in result.variants:
        model = keras.models.load_model(result.out / variant.model_file)
        norm = keras.layers.BatchNormalization
        norms = [layer for layer in model.layers if isinstance(layer, norm)]
        probe = keras.Model(model.inputs, [layer.input for layer in norms])
        inputs = probe(x, training=False)
        for layer, values in zip(norms, inputs, strict=True):
            values = np.asarray(values).reshape(-1, values.shape[-1])
            ratio = np.asarray(layer.moving_variance) / (values.var(axis=0) + layer.epsilon)
            by_layer = ratios.setdefault(variant.label, {})
            by_layer.setdefault(layer.name, []).append(float(ratio.mean()))
    return ratios


def variance_table(ratios: dict[str, dict[str, list[float]]]) -> str:
    """Mean over seeds of `variance_ratios`, one row per variant, as Markdown."""
    names = list(next(iter(ratios.values())))
    lines = [
        "| variant | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, by_layer in ratios.items():
        cells = [f"{np.mean(by_layer[name]):.2f}" for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(name: str, result, all_vs_head: dict | None) -> str:
    """Mean ± std per variant and the paired differences to `none`, as a Markdown table."""
    summary, diffs = result.summary(), result.differences()

    def cell(numbers):
        return f"{numbers['mean']:.3f} ± {numbers['std']:.3f}"

    def interval(d):
        verdict = "not distinguishable" if not d.distinguishable else "distinguishable"
        return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] ({verdict})"

    lines = [
        f"**{name}** ({len(result.seeds)} seeds; best: {result.best_label})",
        "",
        "| variant | val acc | best val acc | gap (train − val) | Δ val acc vs none [95 % CI] "
        "| Δ best val acc vs none [95 % CI] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, numbers in summary.items():
        if label in diffs:
            deltas = [interval(diffs[label][key]) for key in KEYS]
        else:
            deltas = ["(baseline)", "(baseline)"]
        lines.append(
            f"| {label} | {cell(numbers['val_accuracy'])} | {cell(numbers['best_val_accuracy'])} "
            f"| {cell(numbers['gap'])} | {deltas[0]} | {deltas[1]} |"
        )
    if all_vs_head is not None:
        lines.append("")
        for key in KEYS:
            d = all_vs_head[key]
            low, high = d["ci95"]
            lines.append(
                f"all − head, {key.replace('_', ' ')}: {d['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 seeds, 2 epochs, none and all.")
    parser.add_argument("--out", type=Path, help=f"Results folder (default: {DEFAULT_OUT}).")
    parser.add_argument("--work", type=Path, help="Keep data, models and sweeps here.")
    args = parser.parse_args()
    make_reproducible(threads=1, op_determinism=True)
    size = TINY if args.tiny else FULL
    out = args.out or DEFAULT_OUT
    x, y = digits()
    data = split(x, y, PER_CLASS)
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        npz = work / "digits_5to9.npz"
        np.savez(npz, **data)
        base, pretrained = pretrain(x, y, size["pretrain_epochs"])
        base.save(work / "base.keras")
        frozen = with_new_head(base, frozen=True, learning_rate=1e-3)
        unfrozen = unfrozen_after_warmup(frozen, data, size["epochs"])
        chosen, notes = variants(size["policies"])
        report = {
            "experiment": NAME,
            "tiny": args.tiny,
            "data": {
                "pretrain": "digits 0-4",
                "fine_tune": f"digits 5-9, {PER_CLASS} per class",
                "train": len(data["x_train"]),
                "val": len(data["x_val"]),
            },
            "pretrained": pretrained,
            "rate": RATE,
            "notes": notes,
        }
        tables = []
        out.mkdir(parents=True, exist_ok=True)
        for name, model in (("frozen", frozen), ("unfrozen", unfrozen)):
            path = work / f"{name}.keras"
            model.save(path)
            result = run_sweep(
                path,
                npz,
                chosen,
                epochs=size["epochs"],
                seeds=size["seeds"],
                out=work / f"sweep-{name}",
                batch_size=16,
            )
            print(f"{name}:\n{result.table()}\n")
            labels = result.labels
            heads = [label for label in labels if label.startswith("head@")]
            alls = [label for label in labels if label.startswith("all@")]
            versus = compare(result, alls[0], heads[0]) if heads and alls else None
            saved = result.to_dict()
            for key in ("plot", "best_model"):
                saved.pop(key)
            ratios = variance_ratios(result, data["x_val"])
            report[name] = {**saved, "all_minus_head": versus, "bn_variance_ratio": ratios}
            shutil.copyfile(result.plot_path, out / f"{NAME}_{name}.png")
            tables.append(markdown(name, result, versus))
            tables.append(
                f"BatchNormalization moving variance / inference input variance ({name}, mean "
                f"over seeds and channels):\n\n{variance_table(ratios)}"
            )
    # Varies from run to run; the tests leave it out of the comparison.
    report["cpu_seconds"] = round(cpu_seconds(), 1)
    json_path = out / f"{NAME}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print("\n\n".join(tables))
    print(
        f"\npretrained base: {pretrained['accuracy']:.3f} on {pretrained['held_out']} held-out "
        f"images of 0-4\nwrote {json_path}; {report['cpu_seconds']:.0f} s of CPU time"
    )


if __name__ == "__main__":
    main()
