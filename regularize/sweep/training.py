"""Fine-tuning one variant: rewrite, compile like the model, fit with a fixed seed.

Every variant of a sweep starts from the same weights (the model's variables, restored before
each run), with `keras.utils.set_random_seed(seed)` before the rewrite and before `fit()`, and
datasets made anew with the same seed, so each variant of a seed sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from regularize.sweep.data import DataSpec
from regularize.sweep.data import naming_bad_images
from regularize.sweep.errors import SweepError
from regularize.sweep.progress import Display
from regularize.sweep.results import VariantResult
from regularize.sweep.resume import jsonable
from regularize.sweep.resume import stem
from regularize.sweep.resume import write_marker
from regularize.sweep.variants import Variant


@dataclasses.dataclass
class Run:
    """What every variant of one sweep shares."""

    model: object
    spec: DataSpec
    compile_config: dict
    recurrent_rate: float | str | None
    epochs: int
    write_dir: Path
    strategy: str | None

    def settings(self) -> dict:
        """What a resumed run must share with this one (JSON-able)."""
        return {
            "model": {"name": self.model.name, "weights_sha256": weights_digest(self.model)},
            "data": self.spec.describe(),
            "epochs": self.epochs,
            "batch_size": self.spec.batch_size,
            "recurrent_rate": self.recurrent_rate,
            "compile": _without_optimizer_name(self.compile_config),
            "strategy": self.strategy,
        }


def train_variant(
    run: Run, variant: Variant, seed: int, start: list, display: Display, settings: dict
) -> VariantResult:
    """Rewrites, compiles and fine-tunes one variant with one seed; writes its files."""
    import keras

    from regularize import api
    from regularize.core.report import Report
    from regularize.keras3.io import save_model

    # Same starting weights, seed and batch order for every variant: the
    # variants share the model's variables, so training one changes them.
    assign(run.model, start)
    keras.utils.set_random_seed(seed)
    report = Report()
    with warnings.catch_warnings():
        # The report keeps the rewrite's warnings; they go into the results.
        warnings.simplefilter("ignore")
        policy = variant.policy_for(run.recurrent_rate)
        model = api.add_dropout(run.model, policy=policy, report=report)
    model.compile(**keras.saving.deserialize_keras_object(run.compile_config))
    keras.utils.set_random_seed(seed)
    train, val = run.spec.datasets(seed)
    tracker = _Tracker(model, display, (variant.label, seed))
    callback = keras.callbacks.LambdaCallback(on_epoch_end=tracker.on_epoch_end)
    began = time.perf_counter()
    with naming_bad_images(run.spec):
        model.fit(
            train,
            validation_data=val,
            epochs=run.epochs,
            shuffle=False,  # the dataset shuffles, seeded
            verbose=0,
            callbacks=[callback],
        )
        seconds = time.perf_counter() - began
        # On equal terms with the validation accuracy: no dropout, last weights.
        scores = model.evaluate(train, verbose=0, return_dict=True)
    history = tracker.history
    train_accuracy = float(scores[tracker.metric])
    path = run.write_dir / f"{stem(variant.label, seed)}.keras"
    if tracker.best_weights is not None:
        model.set_weights(tracker.best_weights)
    save_model(model, path, overwrite=True)
    best = int(np.argmax(history["val_accuracy"]))
    result = VariantResult(
        label=variant.label,
        seed=seed,
        rate=variant.rate,
        history=history,
        metric=tracker.metric,
        train_accuracy=train_accuracy,
        val_accuracy=history["val_accuracy"][-1],
        best_val_accuracy=history["val_accuracy"][best],
        best_epoch=best + 1,
        gap=train_accuracy - history["val_accuracy"][-1],
        epochs=len(history["accuracy"]),
        seconds=round(seconds, 3),
        sites=report.summary_lines() + [f"warning: {note}" for note in report.warnings],
        model_file=path.name,
    )
    write_marker(run.write_dir, variant, settings, result)
    return result


# -- compiling ----------------------------------------------------------------


def compile_config(model, spec: DataSpec) -> tuple[dict, str]:
    """The compile config for every variant, and how it was chosen."""
    import keras

    if getattr(model, "compiled", False):
        config = model.get_compile_config()
        note = "compiled like the model"
    else:
        from_logits = _output_activation(model) not in ("softmax", "sigmoid")
        loss = {
            "sparse": keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            "onehot": keras.losses.CategoricalCrossentropy(from_logits=from_logits),
            "binary": keras.losses.BinaryCrossentropy(from_logits=from_logits),
        }[spec.labels]
        config = {
            "optimizer": keras.saving.serialize_keras_object(keras.optimizers.Adam(1e-3)),
            "loss": keras.saving.serialize_keras_object(loss),
            "metrics": ["accuracy"],
        }
        note = (
            "the model is not compiled: using the default Adam(learning_rate=0.001), "
            f"{type(loss).__name__}(from_logits={from_logits}), metrics=['accuracy']"
        )
    metrics = config.get("metrics")
    if isinstance(metrics, Mapping) or (metrics and _has_accuracy(metrics)):
        return config, note
    config = {**config, "metrics": [*(metrics or []), "accuracy"]}
    return config, note + " (accuracy added to the metrics)"


def _without_optimizer_name(config: dict) -> dict:
    # Keras numbers optimizer names per process ("adam", "adam_1"): not a setting.
    config = jsonable(config)
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("config"), dict):
        optimizer["config"].pop("name", None)
    return config


def _has_accuracy(metrics) -> bool:
    text = json.dumps(metrics).lower()
    return "acc" in text


def _output_activation(model) -> str | None:
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        return None
    layer = outputs[0]._keras_history.operation
    import keras

    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", None)


# -- weights and epochs -------------------------------------------------------


def variables(model) -> list[np.ndarray]:
    # Every variable, seed states of the model's own dropout layers included,
    # so that each variant draws the same masks there too.
    return [np.array(v) for v in model.variables]


def assign(model, values: list[np.ndarray]) -> None:
    for variable, value in zip(model.variables, values, strict=True):
        variable.assign(value)


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(np.array(variable)).tobytes())
    return digest.hexdigest()


class _Tracker:
    """Per epoch: the history under fixed names, best-epoch weights, progress."""

    def __init__(self, model, display: Display, run: tuple[str, int]):
        self.model = model
        self.display = display
        self.run = run
        self.history = {"loss": [], "val_loss": [], "accuracy": [], "val_accuracy": []}
        self.metric = None
        self.best_weights = None
        self._best = -math.inf

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        logs = logs or {}
        if self.metric is None:
            self.metric = _accuracy_key(logs)
        values = {
            "loss": logs.get("loss", math.nan),
            "val_loss": logs.get("val_loss", math.nan),
            "accuracy": logs[self.metric],
            "val_accuracy": logs[f"val_{self.metric}"],
        }
        for key, value in values.items():
            self.history[key].append(float(value))
        if values["val_accuracy"] > self._best:
            self._best = values["val_accuracy"]
            self.best_weights = self.model.get_weights()
        self.display.epoch(self.run, epoch + 1, values)


def _accuracy_key(logs: Mapping) -> str:
    names = [k for k in logs if not k.startswith("val_") and f"val_{k}" in logs]
    for name in names:
        if name in ("accuracy", "acc") or name.endswith("accuracy"):
            return name
    raise SweepError(
        "The variants report no accuracy: add an accuracy metric to the model's "
        f"compile config. Received: metrics {sorted(names)}"
    )
