"""Does dropout help a small CNN that overfits? A dropout sweep on real digits, 3 seeds.

    python3 examples/digits_cnn.py                        # 3.2 CPU-minutes, one thread
    python3 examples/digits_cnn.py --seeds 0 --epochs 5   # a quick look
    python3 examples/digits_cnn.py --out examples/results # replace the reference results

Data: scikit-learn's bundled digits (1,797 8x8 grey images of handwritten digits; no download),
written here as an image folder with one subfolder per class, the layout `regularize sweep
--data` reads with `keras.utils.image_dataset_from_directory`. Each seed splits the folder
differently: 20% (about 360 images) to train on, so the CNN overfits, 80% to validate on.

For every seed the model is built and saved, then `regularize.sweep.run_sweep` rewrites it at
rates 0 (the baseline), 0.2, 0.3 and 0.5 (SpatialDropout2D after the conv activations, Dropout
after the dense one) and fine-tunes each variant from the same weights, seed and batch order. The
same sweep from the command line:

    regularize sweep digits_cnn.keras --data digits_images/ --rates 0,0.2,0.3,0.5 \\
        --epochs 30 --validation-split 0.8 --seed 0

Writes digits_cnn.json (every number, mean and std over seeds) and digits_cnn.png (curves, mean
and a one-std band over seeds) to `--out` (default: regularize-results/digits_cnn in the working
folder). Runs are reproducible: the same command gives the same numbers on the same CPU with
the same library versions (one thread per TensorFlow pool and op determinism, see
`common.make_reproducible`).
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

NAME = "digits_cnn"


def write_image_folder(root: Path) -> Path:
    """scikit-learn's digits as PNG files, one subfolder per digit."""
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255 / 16)).astype("uint8")[..., None]  # 0..16 -> 0..255
        keras.utils.save_img(folder / f"{i:04d}.png", pixels, scale=False)
    return root


def build_model(seed: int) -> keras.Model:
    """A small CNN, big enough to memorize 360 images."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="image"),
            layers.Rescaling(1 / 255, name="scale"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool"),
            layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
            layers.Flatten(name="flat"),
            layers.Dense(128, activation="relu", name="fc"),
            layers.Dense(10, activation="softmax", name="digit"),
        ],
        name=NAME,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, epochs=30, name=NAME)
    args = parser.parse_args()
    make_reproducible(args.threads, op_determinism=not args.no_op_determinism)
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        images = work / "digits_images"
        if not images.is_dir():
            write_image_folder(images)
        results = []
        for seed in args.seeds:
            model_path = work / f"{NAME}-seed{seed}.keras"
            build_model(seed).save(model_path)
            result = run_sweep(
                model_path,
                images,
                parse_rates(args.rates),
                epochs=args.epochs,
                seeds=seed,
                out=work / f"seed-{seed}",
                validation_split=0.8,
                batch_size=32,
            )
            print(f"seed {seed} ({result.compile_note})\n{result.table()}\n")
            results.append(result)
        report(
            NAME,
            results,
            out_folder(args, NAME),
            description="scikit-learn digits (1,797 8x8 images) as an image folder, "
            "validation_split=0.8 by seed",
            title="Small CNN on digits",
            run_settings={"threads": args.threads, "op_determinism": not args.no_op_determinism},
        )


if __name__ == "__main__":
    main()
