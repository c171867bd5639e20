"""Dropout in a stacked LSTM: between the recurrent layers and on the recurrent state, 3 seeds.

    python3 examples/digits_lstm.py                     # 4.4 CPU-minutes, one thread
    python3 examples/digits_lstm.py --recurrent none    # dropout between the layers only
    python3 examples/digits_lstm.py --seeds 0 --epochs 5
    python3 examples/digits_lstm.py --out examples/results  # replace the reference results

Data: scikit-learn's bundled digits (1,797 8x8 images; no download). The LSTM reads each image
as a sequence of 8 rows of 8 values. Each seed draws its own split, written as an `.npz` file
(x_train, y_train, x_val, y_val): 300 images to train on, so the model overfits, 600 to
validate on.

The sweep (rates 0, 0.2, 0.3, 0.5) goes through a policy file: at rate r the second LSTM gets
input dropout r, which is dropout between the two recurrent layers, both LSTMs get
recurrent_dropout r (`recurrent_rate="same"`), and the dense layer of the head gets a Dropout
after it. The first LSTM gets no input dropout: it reads the raw pixel rows. The same sweep
from the command line:

    regularize sweep digits_lstm.keras --data digits-seed0.npz --rates 0,0.2,0.3,0.5 \\
        --epochs 50 --policy lstm_policy.toml --recurrent-rate same --seed 0

Writes digits_lstm.json and digits_lstm.png (digits_lstm_between.* with --recurrent none) to
`--out` (default: regularize-results/<that name> in the working folder). Runs are reproducible
on the same CPU with the same library versions, as in digits_cnn.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np
from common import add_options
from common import make_reproducible
from common import out_folder
from common import parse_rates
from common import report
from sklearn.datasets import load_digits

from regularize.sweep import run_sweep

TRAIN, VAL = 300, 600
# Rules keep their own rate while the sweep sets `rate`: no input dropout on the pixel rows.
POLICY = """\
[[rule]]
match = "lstm_1"
rate = 0.0
"""


def write_npz(path: Path, seed: int) -> Path:
    """A seeded train / validation split of the digits, each image as 8 rows of 8 values."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")  # (1797, 8, 8), values in [0, 1]
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    train, val = order[:TRAIN], order[TRAIN : TRAIN + VAL]
    np.savez(path, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])
    return path


def build_model(seed: int) -> keras.Model:
    """Two stacked LSTMs and a dense head; unrolled (8 steps), which is faster on CPU."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8), name="rows"),
            layers.LSTM(48, return_sequences=True, unroll=True, name="lstm_1"),
            layers.LSTM(48, unroll=True, name="lstm_2"),
            layers.Dense(64, activation="relu", name="fc"),
            layers.Dense(10, activation="softmax", name="digit"),
        ],
        name="digits_lstm",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recurrent",
        choices=("same", "none"),
        default="same",
        help="recurrent_dropout at the swept rate (same) or left at 0 (none).",
    )
    add_options(parser, epochs=50, name="digits_lstm")
    args = parser.parse_args()
    make_reproducible(args.threads, op_determinism=not args.no_op_determinism)
    name = "digits_lstm" if args.recurrent == "same" else "digits_lstm_between"
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        policy = work / "lstm_policy.toml"
        policy.write_text(POLICY)
        results = []
        for seed in args.seeds:
            data = write_npz(work / f"digits-seed{seed}.npz", seed)
            model_path = work / f"digits_lstm-seed{seed}.keras"
            build_model(seed).save(model_path)
            result = run_sweep(
                model_path,
                data,
                parse_rates(args.rates),
                epochs=args.epochs,
                policy=policy,
                recurrent_rate="same" if args.recurrent == "same" else None,
                seeds=seed,
                out=work / f"{name}-seed-{seed}",
                batch_size=32,
            )
            print(f"seed {seed} ({result.compile_note})\n{result.table()}\n")
            results.append(result)
        what = "input dropout of lstm_2" + (
            " and recurrent_dropout of both LSTMs" if args.recurrent == "same" else ""
        )
        report(
            name,
            results,
            out_folder(args, name),
            description=f"scikit-learn digits (1,797 8x8 images) as 8 rows of 8 values, "
            f"{TRAIN} train / {VAL} validation images per seed in an .npz; dropout: {what}, "
            "Dropout after the dense head layer",
            title="Stacked LSTM on digits, "
            + (
                "dropout between layers + recurrent"
                if args.recurrent == "same"
                else "dropout between layers"
            ),
            run_settings={"threads": args.threads, "op_determinism": not args.no_op_determinism},
        )


if __name__ == "__main__":
    main()
