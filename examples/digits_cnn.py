"""Does dropout help a small CNN that overfits? A dropout sweep on real digits, 3 seeds.

    python3 examples/digits_cnn.py                        # 2.3 CPU-minutes; 4 min on 2 busy cores
    python3 examples/digits_cnn.py --seeds 0 --epochs 5   # a quick look

Data: scikit-learn's bundled digits (1,797 8x8 grey images of handwritten digits; no download),
written here as an image folder with one subfolder per class, the layout `regularize sweep
--data` reads with `keras.utils.image_dataset_from_directory`. Each seed splits the folder
differently: 20% (about 360 images) to train on, so the CNN overfits, 80% to validate on.

For every seed the model is built and saved, then `regularize.sweep` rewrites it at rates 0
(the baseline), 0.2, 0.3 and 0.5 (SpatialDropout2D after the conv activations, Dropout after
the dense one) and fine-tunes each variant from the same weights, seed and batch order. The
same sweep from the command line:

    regularize sweep digits_cnn.keras --data digits_images/ --rates 0,0.2,0.3,0.5 \\
        --epochs 30 --validation-split 0.8 --seed 0

Writes examples/results/digits_cnn.json (every number, mean and std over seeds) and
examples/results/digits_cnn.png (curves, mean and a one-std band over seeds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits

from regularize.sweep import plot_curves
from regularize.sweep import summarize
from regularize.sweep import sweep

NAME = "digits_cnn"
RATES = (0.0, 0.2, 0.3, 0.5)
RESULTS = Path(__file__).resolve().parent / "results"


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--work", type=Path, help="Keep data, models and sweeps here (resumable).")
    args = parser.parse_args()
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
            result = sweep(
                model_path,
                images,
                RATES,
                epochs=args.epochs,
                seed=seed,
                out=work / f"seed-{seed}",
                validation_split=0.8,
                batch_size=32,
            )
            print(f"seed {seed} ({result.compile_note})\n{result.table()}\n")
            results.append(result)
        report(
            NAME,
            results,
            description="scikit-learn digits (1,797 8x8 images) as an image folder, "
            "validation_split=0.8 by seed",
            title="Small CNN on digits",
        )


def report(name: str, results: list, *, description: str, title: str) -> None:
    """Writes results/<name>.json and .png, and prints the Markdown table."""
    RESULTS.mkdir(exist_ok=True)
    summary = summarize(results)
    first = results[0]
    settings = first.settings
    data = {
        "experiment": name,
        "data": description,
        "train_samples": settings["data"]["train"],
        "val_samples": settings["data"]["val"],
        "epochs": settings["epochs"],
        "seeds": [r.settings["seed"] for r in results],
        "compile": first.compile_note,
        "sites": {str(v.rate): v.sites for v in first.variants},
        "summary": {str(rate): numbers for rate, numbers in summary.items()},
        "best_rate_per_seed": [r.best_rate for r in results],
        "runs": [
            {
                "seed": r.settings["seed"],
                "best_rate": r.best_rate,
                "variants": [v.to_dict() for v in r.variants],
            }
            for r in results
        ],
    }
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    runs = {v.rate: [] for v in first.variants}
    for result in results:
        for variant in result.variants:
            runs[variant.rate].append(variant.history)
    png_path = plot_curves(
        runs,
        RESULTS / f"{name}.png",
        title=f"{title} ({data['train_samples']} train samples): "
        f"mean ± std over {len(results)} seed(s)",
    )
    print(markdown_table(summary))
    print(f"\nwrote {json_path} and {png_path}")


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


if __name__ == "__main__":
    main()
