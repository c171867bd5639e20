"""Transfer learning with dropout: a pretrained Keras Application, a new head, one rewrite.

    python3 examples/transfer_learning.py                 # ImageNet weights (downloaded once)
    python3 examples/transfer_learning.py --weights none  # random weights, no network

The data here is a tiny random in-memory set; put your own `x_train` / `y_train` in its place.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

import regularize


def build(weights: str | None = "imagenet", image_size: int = 96, classes: int = 3) -> keras.Model:
    """A frozen MobileNetV2 base (no top) in inference mode, under a new classifier head."""
    base = regularize.load_model(
        "keras.applications.MobileNetV2",
        weights=weights,
        include_top=False,
        input_shape=(image_size, image_size, 3),
    )
    base.trainable = False
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNetV2 expects [-1, 1]
    x = base(x, training=False)  # BatchNormalization stays in inference mode
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(64, activation="relu", name="head_fc")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="head_out")(x)
    return keras.Model(inputs, outputs)


def main(weights: str | None = "imagenet", image_size: int = 96, epochs: int = 1):
    """Builds, adds dropout, compiles and fits; returns the model and its history."""
    model = build(weights, image_size)
    report = regularize.Report()
    # Dropout in the head only ("head" preset), also once you unfreeze the base
    # to fine-tune it. While frozen and called with training=False the base is
    # left alone anyway: dropout there would never fire.
    policy = regularize.Policy(rate=0.2, preset="head")
    model = regularize.add_dropout(model, policy=policy, report=report)
    print("\n".join(report.summary_lines()))

    rng = np.random.default_rng(0)
    x_train = rng.uniform(0, 255, size=(32, image_size, image_size, 3)).astype("float32")
    y_train = rng.integers(0, 3, size=32)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x_train, y_train, batch_size=8, epochs=epochs, verbose=2)
    return model, history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="imagenet", help="imagenet, none, or a weights file")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    weights = None if args.weights.lower() == "none" else args.weights
    main(weights, args.image_size, args.epochs)
