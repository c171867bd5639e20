"""Compiling a model from a saved compile config, without building the optimizer."""

from __future__ import annotations

import keras


def compile_from_config(model: keras.Model, config: dict | None) -> None:
    """Compiles `model` like `model.compile_from_config(config)`, minus one step.

    Keras' own `compile_from_config` also builds the optimizer right away,
    i.e. creates its slot variables (two per weight for Adam: twice the
    model's size in memory). `fit()` builds them when it needs them, so this
    leaves them out: a 1 GB model stays a 1 GB model until training starts.
    """
    if not config:
        return
    model.compile(**keras.saving.deserialize_keras_object(config))
