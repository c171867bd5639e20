"""Fine-tuning one model at several dropout rates, to see what dropout buys.

`sweep` rewrites the model once per rate (`add_dropout`), always from the same
starting weights, and fine-tunes each variant with the same seed and the same
order of training batches; rate 0 is the baseline. It records per epoch the
train and validation accuracy, and writes to the output folder:

    variant-<rate>.json   one per finished variant (the resume marker)
    variant-<rate>.keras  that variant at its best validation epoch
    results.json          every number of every variant, settings, best rate
    curves.png            train / validation curves of every rate

A sweep that is stopped and started again with the same folder trains only
the variants without a `variant-<rate>.json`; the folder remembers the
settings (model weights, data, epochs, seed, ...) and refuses to mix results
of different sweeps.

More than one device: `strategy="mirrored"` trains each variant
data-parallel on every GPU of this machine (`tf.distribute.MirroredStrategy`;
the model is loaded inside its scope and `batch_size` is the global batch).

More than one machine: `keras_tuner=True` runs the variants as KerasTuner
trials (a `GridSearch` over the rates). Started with KerasTuner's
environment variables (`KERASTUNER_TUNER_ID` = "chief" or "tuner0",
"tuner1", ...; `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`), the same
command becomes the chief, which hands out the rates and, once every
variant is done, writes results.json and curves.png, or a worker, which
trains the rates it is given. `out` must be a folder every machine sees
(the workers write their variants there, the chief reads them). Why not
`tf.distribute.MultiWorkerMirroredStrategy`: `fit()` fails under it in
Keras 3 (keras-team/keras#20585, open; tried here with Keras 3.15 and TF
2.21: "Attempt to convert a value (PerReplica ...) to a Tensor").

Keras is imported inside the functions that need it, so the checks of rates
and data run before the slow TensorFlow import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from regularize.errors import PolicyError
from regularize.errors import RegularizeError
from regularize.policy import Policy
from regularize.policy import validate_rate
from regularize.text import short_repr

DEFAULT_RATES = (0.0, 0.2, 0.3, 0.5)
NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # image_dataset_from_directory's
# How those files begin: TensorFlow's decode_image reads the format from the
# content, not from the suffix, and fails mid-training on anything else.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
RESULTS_FILE = "results.json"
PLOT_FILE = "curves.png"
STRATEGIES = ("mirrored",)
SAME = "same"  # recurrent_rate follows the swept rate
_DATA_EXPECTED = (
    "Expected a folder with one subfolder of images per class, or an `.npz` file "
    "with arrays " + ", ".join(NPZ_KEYS)
)


class DataError(RegularizeError, ValueError):
    """The training data cannot be read, or does not fit the model."""


class SweepError(RegularizeError):
    """The sweep cannot run or resume as asked (output folder, metrics).

    Attributes:
        argument: The `sweep` argument at fault (e.g. "out"), or None; the
            command line names its own flag from it.
    """

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


@dataclasses.dataclass
class VariantResult:
    """What fine-tuning one variant gave.

    Attributes:
        rate: The dropout rate of the variant (0: the baseline).
        history: Per epoch, as `fit()` logs them: "loss", "accuracy" (running
            means over the epoch, dropout active), "val_loss", "val_accuracy".
        metric: The Keras metric behind "accuracy" (e.g. "sparse_categorical_accuracy").
        train_accuracy: Accuracy on the training data after the last epoch,
            in inference mode like the validation accuracy (the running
            accuracy that `fit()` logs is lowered by the dropout itself).
        val_accuracy: Validation accuracy after the last epoch.
        best_val_accuracy: Highest validation accuracy of any epoch.
        best_epoch: The epoch (1-based) of `best_val_accuracy`.
        gap: `train_accuracy - val_accuracy`, the generalization gap at the end.
        epochs: Epochs trained.
        seconds: Wall time of the fine-tuning.
        sites: What the rewrite did (`Report.summary_lines()`), then its
            warnings, each starting with "warning: ".
        model_file: The variant, with the weights of its best epoch (a file
            name in the output folder).
        resumed: Read from an earlier run instead of trained now.
    """

    rate: float
    history: dict[str, list[float]]
    metric: str
    train_accuracy: float
    val_accuracy: float
    best_val_accuracy: float
    best_epoch: int
    gap: float
    epochs: int
    seconds: float
    sites: list[str]
    model_file: str
    resumed: bool = False

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("resumed")
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> VariantResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"resumed"}
        return cls(**{k: data[k] for k in names}, resumed=True)


@dataclasses.dataclass
class SweepResult:
    """Every variant of one sweep, in the order of `rates`.

    Attributes:
        variants: One `VariantResult` per rate.
        best_rate: The rate with the highest best validation accuracy (ties:
            the lower validation loss at that epoch, then the lower rate);
            None for a KerasTuner worker that was given no trial.
        out: The output folder.
        compile_note: How the variants were compiled (the model's own config,
            or the stated default).
        notes: Other things the user should know (e.g. rate 0 added).
        settings: What a resumed run must share with this one.
        best_model: Where `save_best` wrote the best variant, if asked.
        written: Whether this process wrote results.json and curves.png (a
            KerasTuner worker leaves that to the chief).
    """

    variants: list[VariantResult]
    best_rate: float | None
    out: Path
    compile_note: str
    notes: list[str]
    settings: dict
    best_model: Path | None = None
    written: bool = False

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS_FILE

    @property
    def plot_path(self) -> Path:
        return self.out / PLOT_FILE

    @property
    def best(self) -> VariantResult:
        return next(v for v in self.variants if v.rate == self.best_rate)

    def to_dict(self) -> dict:
        return {
            "best_rate": self.best_rate,
            "compile": self.compile_note,
            "notes": self.notes,
            "settings": self.settings,
            "plot": str(self.plot_path),
            "best_model": None if self.best_model is None else str(self.best_model),
            "variants": [v.to_dict() for v in self.variants],
        }

    def table(self) -> str:
        """The results as an aligned text table; the best rate is marked `*`."""
        header = ("rate", "train acc", "val acc", "best val acc", "gap", "epochs")
        rows = [header]
        for v in self.variants:
            mark = " *" if v.rate == self.best_rate else ""
            rows.append(
                (
                    f"{format_rate(v.rate)}{mark}",
                    f"{v.train_accuracy:.4f}",
                    f"{v.val_accuracy:.4f}",
                    f"{v.best_val_accuracy:.4f} (epoch {v.best_epoch})",
                    f"{v.gap:+.4f}",
                    str(v.epochs),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.append(
            "* best rate (highest best validation accuracy); train and val acc: "
            "inference mode, after the last epoch; gap = train acc - val acc"
        )
        return "\n".join(lines)


# -- checks without TensorFlow --------------------------------------------


def parse_rates(text: str) -> tuple[float, ...]:
    """Rates from a comma-separated string such as "0,0.2,0.3,0.5".

    Raises:
        PolicyError: An entry is not a float in [0, 1), or appears twice.
    """
    items = [item.strip() for item in str(text).split(",")]
    rates = []
    for item in items:
        try:
            rates.append(float(item))
        except ValueError:
            raise PolicyError(
                "Invalid `rates`: every entry must be a float in [0, 1), comma-separated. "
                f"Received: rates={text!r}"
            ) from None
    return check_rates(rates, text=text)


def check_rates(rates: Sequence[float], *, text: str | None = None) -> tuple[float, ...]:
    """Validated rates, in ascending order.

    Raises:
        PolicyError: Empty, a rate outside [0, 1), or a rate given twice.
    """
    shown = text if text is not None else rates
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates:
        raise PolicyError(
            f"Invalid `rates`. Expected one or more floats in [0, 1). Received: rates={shown!r}"
        )
    checked = []
    for rate in rates:
        try:
            checked.append(validate_rate("rate", rate))
        except PolicyError:
            raise PolicyError(
                f"Invalid `rates`: {rate!r} is not a float in [0, 1). Received: rates={shown!r}"
            ) from None
    if len(set(checked)) != len(checked):
        raise PolicyError(
            f"Invalid `rates`: a rate is given twice. Expected distinct rates. "
            f"Received: rates={shown!r}"
        )
    return tuple(sorted(checked))


def check_data(path: str | os.PathLike) -> str:
    """The kind of the training data at `path`: "npz" or "folder".

    Reads only the `.npz` index and the folder listing; TensorFlow-free.

    Raises:
        DataError: Missing, an `.npz` without the four arrays (or with
            mismatched lengths), or a folder without class subfolders of images.
    """
    path = Path(path)
    received = f"Received: data={str(path)!r}"
    if not path.exists():
        raise DataError(f"Cannot read data: no such file or folder. {_DATA_EXPECTED}. {received}")
    if path.is_dir():
        classes = _class_folders(path)
        if len(classes) < 2:
            found = (
                f"{len(classes)} subfolder with images" if classes else "no subfolder with images"
            )
            raise DataError(
                f"Cannot read data: the folder has {found}. {_DATA_EXPECTED} "
                f"(at least 2 classes). {received}"
            )
        for folder in classes:
            for file in _image_files(folder):
                _check_image(file, received)
        return "folder"
    if path.suffix != ".npz":
        raise DataError(
            f"Cannot read data: unsupported file type {path.suffix or '(none)'!r}. "
            f"{_DATA_EXPECTED}. {received}"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes = {key: archive[key].shape for key in archive.files if key in NPZ_KEYS}
    except Exception as err:  # zipfile, OSError, ValueError: one line each
        raise DataError(
            f"Cannot read data: not a readable `.npz` file ({type(err).__name__}: "
            f"{_first_line(err)}). {_DATA_EXPECTED}. {received}"
        ) from err
    missing = [key for key in NPZ_KEYS if key not in shapes]
    if missing:
        raise DataError(
            f"Cannot read data: the `.npz` file has no {', '.join(missing)}. "
            f"Expected arrays {', '.join(NPZ_KEYS)}. {received}"
        )
    for split in ("train", "val"):
        x, y = shapes[f"x_{split}"], shapes[f"y_{split}"]
        if not x or not y or x[0] != y[0] or x[0] == 0:
            raise DataError(
                f"Cannot read data: x_{split} and y_{split} must hold the same number "
                f"(at least 1) of samples. Received: x_{split} shape {x}, y_{split} shape {y}"
            )
    return "npz"


def _class_folders(path: Path) -> list[Path]:
    return sorted(
        sub
        for sub in path.iterdir()
        if sub.is_dir()
        and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.rglob("*") if f.is_file())
    )


def _image_files(folder: Path):
    """The files Keras would read as images under `folder`, in a stable order."""
    for file in sorted(folder.rglob("*")):
        if file.name.lower().endswith(IMAGE_SUFFIXES) and not file.is_dir():
            yield file


def _check_image(file: Path, received: str) -> None:
    """Reads the first bytes of `file`: a regular file that starts like an image.

    Cheap (a few bytes per file), and the only way to name the file: a bad
    image otherwise fails inside the training graph, without its name.
    """
    what = f"Cannot read data: the file {short_repr(str(file), 300)}"
    expected = "Expected only BMP, GIF, JPEG or PNG images in the class subfolders"
    try:
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{what} is not a regular file. {expected}. {received}")
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            head = f.read(len(_IMAGE_SIGNATURES[0]))
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        raise DataError(f"{what} cannot be read ({reason}). {expected}. {received}") from None
    if not head.startswith(_IMAGE_SIGNATURES):
        raise DataError(
            f"{what} is not an image (it does not start like a BMP, GIF, JPEG or PNG file). "
            f"{expected}: remove or convert that file. {received}"
        )


@contextlib.contextmanager
def _naming_bad_images(spec: _DataSpec):
    """Turns TensorFlow's decode failure on an image folder into a `DataError` naming the file.

    `check_data` catches files that are not images at all; a truncated or
    corrupt image passes it and fails in the training graph, whose error
    names no file. Then each image is decoded in turn to find it.
    """
    try:
        yield
    except Exception as err:
        if spec.kind != "folder" or type(err).__name__ != "InvalidArgumentError":
            raise
        import tensorflow as tf

        for file in (f for folder in _class_folders(spec.path) for f in _image_files(folder)):
            try:
                tf.io.decode_image(tf.io.read_file(str(file)), expand_animations=False)
            except tf.errors.InvalidArgumentError as bad:
                raise DataError(
                    f"Cannot read data: the file {short_repr(str(file), 300)} cannot be "
                    f"decoded as an image ({_tf_reason(bad)}). Expected only BMP, GIF, JPEG "
                    f"or PNG images in the class subfolders: remove or replace that file. "
                    f"Received: data={short_repr(str(spec.path), 300)}"
                ) from err
        raise


def format_rate(rate: float) -> str:
    """ "0", "0.2", "0.35": the shortest form, also used in file names."""
    return f"{rate:g}"


# -- the sweep --------------------------------------------------------------


def sweep(
    model,
    data: str | os.PathLike,
    rates: Sequence[float] = DEFAULT_RATES,
    *,
    epochs: int,
    policy: Policy | str | os.PathLike | None = None,
    recurrent_rate: float | str | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    validation_split: float = 0.2,
    image_size: tuple[int, int] | None = None,
    save_best: str | os.PathLike | None = None,
    overwrite: bool = False,
    strategy=None,
    keras_tuner: bool = False,
    progress: bool | None = None,
    custom_objects=None,
    safe_mode: bool = True,
) -> SweepResult:
    """Fine-tunes one variant of `model` per dropout rate and compares them.

    Every variant starts from the same weights (the model's), is rewritten
    with `add_dropout` at its rate, compiled like the model (or with the
    default below) and fine-tuned with the same seed and batch order. The
    input model is left as it was.

    If the model is not compiled, the variants are compiled with
    `Adam(1e-3)`, sparse categorical cross-entropy (categorical for one-hot
    labels, binary for one output unit; `from_logits` unless the output
    layer ends in softmax / sigmoid) and accuracy. An accuracy metric is
    added to a compile config that has none.

    Args:
        model: A `keras.Model`, or the path of a `.keras` / `.h5` file. With
            a `strategy`, a model object must have been built in its scope
            (a file is loaded there).
        data: An image folder (one subfolder per class, split by `seed` with
            `validation_split`) or an `.npz` file with x_train, y_train,
            x_val, y_val.
        rates: Dropout rates in [0, 1); 0 (the baseline) is added if absent.
        epochs: Epochs per variant.
        policy: A `Policy` or a TOML policy file; each variant uses it with
            its own `rate` (rules with a rate of their own keep it).
        recurrent_rate: `recurrent_dropout` of RNN layers: a float, "same"
            (the variant's rate), or None (unchanged).
        seed: Seeds weights of new layers, dropout masks, batch order and
            the folder split.
        out: Output folder. Default: `<model file stem>_sweep` next to the
            model file, or `<model name>_sweep` in the working folder.
        batch_size: Global batch size.
        validation_split: Fraction of an image folder used for validation.
        image_size: (height, width) to read a folder at; default: the
            model's input size.
        save_best: Also write the best variant here (atomically).
        overwrite: Replace an existing `save_best` file.
        strategy: None, "mirrored" (every GPU of this machine), or a
            `tf.distribute.Strategy`.
        keras_tuner: Run the variants as KerasTuner trials; with KerasTuner's
            environment variables set, this process is the chief or a worker
            of a distributed search (see the module docstring). Needs the
            keras-tuner package.
        progress: Show a progress display; default: when stderr is a TTY.
        custom_objects: For loading `model` from a file (see `load_model`).
        safe_mode: For loading `model` from a file (see `load_model`).

    Returns:
        A `SweepResult`; `results.json` and `curves.png` are in `out`.

    Raises:
        PolicyError: A rate (or the policy) is invalid.
        DataError: The data cannot be read or does not fit the model.
        SweepError: `out` holds results of a different sweep, or is a file.
        ModelLoadError, ModelSaveError, UnsupportedModelError: As in
            `load_model`, `save_model` and `add_dropout`.

    Example:
        >>> result = regularize.sweep("cnn.keras", "digits/", epochs=20)
        >>> print(result.table())
    """
    notes: list[str] = []
    rates = check_rates(list(rates))
    if 0.0 not in rates:
        rates = (0.0, *rates)
        notes.append("rate 0 (the baseline) added to the rates")
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SweepError(f"Invalid `seed`. Expected an int >= 0. Received: seed={seed!r}")
    kind = check_data(data)
    if kind == "folder" and not 0.0 < validation_split < 1.0:
        raise DataError(
            "Invalid `validation_split`. Expected a float in (0, 1) to split an image "
            f"folder. Received: validation_split={validation_split!r}"
        )
    base_policy = _base_policy(policy)
    recurrent_rate = _check_recurrent_rate(recurrent_rate)
    out = _output_folder(model, out)
    if save_best is not None:
        from regularize.paths import check_output_path

        check_output_path(Path(save_best), overwrite=overwrite)

    strategy = _make_strategy(strategy)
    role = _role(strategy, keras_tuner)
    if role == REPLICA:
        write_dir = Path(tempfile.mkdtemp(prefix="regularize-sweep-"))
    else:
        write_dir = out
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        if isinstance(model, (str, os.PathLike)):
            from regularize.io import load_model

            model = load_model(model, custom_objects=custom_objects, safe_mode=safe_mode)
        spec = _DataSpec.read(data, kind, model, batch_size, validation_split, image_size, seed)
        compile_config, compile_note = _compile_config(model, spec)
        run = _Run(
            model=model,
            spec=spec,
            compile_config=compile_config,
            policy=base_policy,
            recurrent_rate=recurrent_rate,
            seed=int(seed),
            epochs=int(epochs),
            write_dir=write_dir,
            strategy=None if strategy is None else type(strategy).__name__,
        )
        settings = run.settings()
        done = _finished(out, rates, settings)
        if done:
            notes.append(
                f"resumed {len(done)} finished variant{'s' if len(done) != 1 else ''} "
                f"from {out} (rates {', '.join(format_rate(r) for r in sorted(done))})"
            )
        start = _variables(model)
        show = _show_progress(progress) and role != TUNER_CHIEF
        try:
            with _Display(show, rates, epochs) as display:
                for rate in rates:
                    if rate in done:
                        display.resumed(rate, done[rate])
                if keras_tuner:
                    _search_as_trials(run, rates, start, display, settings, done, out)
                else:
                    for rate in rates:
                        if rate not in done:
                            done[rate] = _train_variant(run, rate, start, display, settings)
        finally:
            _assign(model, start)
    if role == TUNER_CHIEF:
        done = _collect(out, rates, settings, done)
        notes.append("KerasTuner chief: the workers trained the variants")
    variants = [done[rate] for rate in rates if rate in done]
    result = SweepResult(
        variants=variants,
        best_rate=_best_rate(variants) if variants else None,
        out=out,
        compile_note=compile_note,
        notes=notes,
        settings=settings,
    )
    if role == REPLICA:
        shutil.rmtree(write_dir, ignore_errors=True)
    elif role == TUNER_WORKER:
        trained = [format_rate(v.rate) for v in variants if not v.resumed]
        notes.append(
            f"KerasTuner worker: trained rates {', '.join(trained) or '(none)'}; "
            "the chief writes the results"
        )
    else:
        if save_best is not None:
            result.best_model = _save_best(
                result, Path(save_best), overwrite, custom_objects, safe_mode
            )
        _write_json(result.results_path, result.to_dict())
        plot_curves(
            {v.rate: [v.history] for v in variants},
            result.plot_path,
            title=f"{model.name}: dropout sweep (seed {seed})",
        )
        result.written = True
    return result


@dataclasses.dataclass
class _Run:
    """What every variant of one sweep shares."""

    model: object
    spec: _DataSpec
    compile_config: dict
    policy: Policy | None
    recurrent_rate: float | str | None
    seed: int
    epochs: int
    write_dir: Path
    strategy: str | None

    def settings(self) -> dict:
        """What a resumed run must share with this one (JSON-able)."""
        return {
            "model": {"name": self.model.name, "weights_sha256": _weights_digest(self.model)},
            "data": self.spec.describe(),
            "epochs": self.epochs,
            "seed": self.seed,
            "batch_size": self.spec.batch_size,
            "policy": None if self.policy is None else self.policy.to_dict(),
            "recurrent_rate": self.recurrent_rate,
            "compile": _without_optimizer_name(self.compile_config),
            "strategy": self.strategy,
        }

    def policy_for(self, rate: float) -> Policy:
        recurrent = rate if self.recurrent_rate == SAME else self.recurrent_rate
        if self.policy is None:
            return Policy(rate=rate, recurrent_rate=recurrent)
        changes = {"rate": rate}
        if self.recurrent_rate is not None:
            changes["recurrent_rate"] = recurrent
        return dataclasses.replace(self.policy, **changes)


def _train_variant(
    run: _Run, rate: float, start: list, display: _Display, settings: dict
) -> VariantResult:
    import keras

    from regularize import api
    from regularize.io import save_model
    from regularize.report import Report

    # Same starting weights, seed and batch order for every variant: the
    # variants share the model's variables, so training one changes them.
    _assign(run.model, start)
    keras.utils.set_random_seed(run.seed)
    report = Report()
    with warnings.catch_warnings():
        # The report keeps the rewrite's warnings; they go into the results.
        warnings.simplefilter("ignore")
        variant = api.add_dropout(run.model, policy=run.policy_for(rate), report=report)
    variant.compile(**keras.saving.deserialize_keras_object(run.compile_config))
    keras.utils.set_random_seed(run.seed)
    train, val = run.spec.datasets()
    tracker = _Tracker(variant, display, rate)
    callback = keras.callbacks.LambdaCallback(on_epoch_end=tracker.on_epoch_end)
    began = time.perf_counter()
    with _naming_bad_images(run.spec):
        variant.fit(
            train,
            validation_data=val,
            epochs=run.epochs,
            shuffle=False,  # the dataset shuffles, seeded
            verbose=0,
            callbacks=[callback],
        )
        seconds = time.perf_counter() - began
        # On equal terms with the validation accuracy: no dropout, last weights.
        scores = variant.evaluate(train, verbose=0, return_dict=True)
    history = tracker.history
    train_accuracy = float(scores[tracker.metric])
    label = format_rate(rate)
    path = run.write_dir / f"variant-{label}.keras"
    if tracker.best_weights is not None:
        variant.set_weights(tracker.best_weights)
    save_model(variant, path, overwrite=True)
    best = int(np.argmax(history["val_accuracy"]))
    result = VariantResult(
        rate=rate,
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
    _write_json(
        run.write_dir / f"variant-{label}.json",
        {"settings": settings, "result": result.to_dict()},
    )
    return result


def _best_rate(variants: list[VariantResult]) -> float:
    def key(v: VariantResult):
        loss = v.history["val_loss"][v.best_epoch - 1]
        return (-v.best_val_accuracy, loss if math.isfinite(loss) else math.inf, v.rate)

    return min(variants, key=key).rate


def _save_best(
    result: SweepResult, path: Path, overwrite: bool, custom_objects, safe_mode: bool
) -> Path:
    from regularize.io import load_model
    from regularize.io import save_model

    source = result.out / result.best.model_file
    best = load_model(source, custom_objects=custom_objects, safe_mode=safe_mode)
    return save_model(best, path, overwrite=overwrite)


# -- resuming ---------------------------------------------------------------


def _finished(out: Path, rates: Sequence[float], settings: dict) -> dict[float, VariantResult]:
    """Variants of `rates` that an earlier run of the same sweep finished."""
    done = {}
    for rate in rates:
        marker = out / f"variant-{format_rate(rate)}.json"
        if not marker.is_file():
            continue
        try:
            saved = json.loads(marker.read_text())
            result = VariantResult.from_dict(saved["result"])
            saved_settings = saved["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable (cut short by a crash?): train it again
        if saved_settings != _jsonable(settings):
            changed = sorted(
                key
                for key in set(settings) | set(saved_settings)
                if _jsonable(settings.get(key)) != saved_settings.get(key)
            )
            raise SweepError(
                f"Cannot resume: {str(out)!r} holds results of a sweep with other "
                f"settings ({', '.join(changed)} differ, in {marker.name}). Expected the "
                "same model, data, epochs, seed, batch size, policy and compile config. "
                "Choose another output folder, or delete that one.",
                argument="out",
            )
        if (out / result.model_file).is_file():
            done[rate] = result
    return done


def _default_mode(path: str) -> None:
    # mkstemp makes the file private (0600); give it what `open()` would.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _jsonable(value):
    return json.loads(json.dumps(value))


def _write_json(path: Path, data: dict) -> None:
    """Writes `data` to `path` atomically (temporary file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- data ---------------------------------------------------------------------


@dataclasses.dataclass
class _DataSpec:
    """The training data, read once, and a fresh pair of datasets per variant."""

    path: Path
    kind: str
    batch_size: int
    validation_split: float
    seed: int
    labels: str  # "sparse", "onehot" or "binary"
    classes: int
    train_size: int
    val_size: int
    arrays: dict | None = None
    image_size: tuple[int, int] | None = None
    color_mode: str | None = None

    @classmethod
    def read(cls, path, kind, model, batch_size, validation_split, image_size, seed) -> _DataSpec:
        path = Path(path)
        if kind == "npz":
            return cls._read_npz(path, model, batch_size, seed)
        return cls._read_folder(path, model, batch_size, validation_split, image_size, seed)

    @classmethod
    def _read_npz(cls, path: Path, model, batch_size: int, seed: int) -> _DataSpec:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in NPZ_KEYS}
        for split in ("train", "val"):
            _check_input_shape(model, arrays[f"x_{split}"].shape[1:], f"x_{split}")
        labels, classes = _label_format(arrays["y_train"], model)
        return cls(
            path=path,
            kind="npz",
            batch_size=batch_size,
            validation_split=0.0,
            seed=seed,
            labels=labels,
            classes=classes,
            train_size=len(arrays["x_train"]),
            val_size=len(arrays["x_val"]),
            arrays=arrays,
        )

    @classmethod
    def _read_folder(cls, path, model, batch_size, validation_split, image_size, seed):
        shape = _single_input_shape(model)
        if image_size is None:
            if shape is None or len(shape) != 3 or None in shape[:2]:
                raise DataError(
                    "Cannot read an image folder for this model: its input is not one "
                    "(height, width, channels) image of known size. Pass `image_size`, or "
                    f"use an `.npz` file. Received: input shape {shape}"
                )
            image_size = (int(shape[0]), int(shape[1]))
        channels = shape[-1] if shape else 3
        color_mode = {1: "grayscale", 3: "rgb", 4: "rgba"}.get(channels)
        if color_mode is None:
            raise DataError(
                "Cannot read an image folder for this model: its input has "
                f"{channels} channels. Expected 1, 3 or 4. Received: input shape {shape}"
            )
        spec = cls(
            path=path,
            kind="folder",
            batch_size=batch_size,
            validation_split=float(validation_split),
            seed=seed,
            labels="sparse",
            classes=len(_class_folders(path)),
            train_size=0,
            val_size=0,
            image_size=tuple(image_size),
            color_mode=color_mode,
        )
        train, val = spec.datasets()
        spec.train_size, spec.val_size = len(train.file_paths), len(val.file_paths)
        units = _output_units(model)
        if units not in (None, 1, spec.classes):
            raise DataError(
                f"The data has {spec.classes} classes (subfolders) but the model predicts "
                f"{units}. Expected a model with {spec.classes} output units. "
                f"Received: data={str(path)!r}"
            )
        return spec

    def datasets(self):
        """New train / validation datasets; a new pair replays the same batch order."""
        import tensorflow as tf

        if self.kind == "npz":
            a = self.arrays
            train = tf.data.Dataset.from_tensor_slices((a["x_train"], a["y_train"]))
            train = train.shuffle(len(a["x_train"]), seed=self.seed, reshuffle_each_iteration=True)
            val = tf.data.Dataset.from_tensor_slices((a["x_val"], a["y_val"]))
            return (
                train.batch(self.batch_size).prefetch(2),
                val.batch(self.batch_size).prefetch(2),
            )
        import keras

        # Keras prints "Using N files for training." whatever `verbose` says.
        with contextlib.redirect_stdout(io.StringIO()):
            return keras.utils.image_dataset_from_directory(
                self.path,
                labels="inferred",
                label_mode="int",
                color_mode=self.color_mode,
                batch_size=self.batch_size,
                image_size=self.image_size,
                shuffle=True,
                seed=self.seed,
                validation_split=self.validation_split,
                subset="both",
                verbose=False,
            )

    def describe(self) -> dict:
        """The data's identity for resuming: contents, not where it lies.

        Machines of a distributed sweep may keep the data at other paths.
        """
        data = {
            "kind": self.kind,
            "train": self.train_size,
            "val": self.val_size,
            "classes": self.classes,
            "labels": self.labels,
        }
        digest = hashlib.sha256()
        if self.kind == "npz":
            for key in NPZ_KEYS:
                digest.update(np.ascontiguousarray(self.arrays[key]).tobytes())
        else:
            for file in sorted(f for f in self.path.rglob("*") if f.is_file()):
                digest.update(f"{file.relative_to(self.path)}:{file.stat().st_size}\n".encode())
            data.update(
                validation_split=self.validation_split,
                image_size=list(self.image_size),
                color_mode=self.color_mode,
            )
        data["sha256"] = digest.hexdigest()
        return data


def _single_input_shape(model) -> tuple | None:
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        return None
    return tuple(inputs[0].shape[1:])


def _check_input_shape(model, shape: tuple, name: str) -> None:
    expected = _single_input_shape(model)
    if expected is None:
        return
    fits = len(expected) == len(shape) and all(
        e is None or e == s for e, s in zip(expected, shape, strict=True)
    )
    if not fits:
        raise DataError(
            f"The data does not fit the model: {name} samples have shape {tuple(shape)}, "
            f"the model expects {expected}. Received: {name} shape (n, "
            f"{', '.join(map(str, shape))})"
        )


def _output_units(model) -> int | None:
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        return None
    return outputs[0].shape[-1]


def _label_format(y: np.ndarray, model) -> tuple[str, int]:
    """("sparse" | "onehot" | "binary", number of classes) of the train labels."""
    units = _output_units(model)
    if y.ndim == 2 and y.shape[1] > 1:
        if units not in (None, y.shape[1]):
            raise DataError(
                f"The data does not fit the model: one-hot labels of {y.shape[1]} classes, "
                f"a model with {units} output units. Received: y_train shape {y.shape}"
            )
        return "onehot", int(y.shape[1])
    flat = y.reshape(len(y), -1)
    if flat.shape[1] != 1 or not np.all(np.equal(np.mod(flat, 1), 0)) or flat.min() < 0:
        raise DataError(
            "Cannot read labels: expected class ids (ints >= 0, shape (n,) or (n, 1)) or "
            f"one-hot rows. Received: y_train shape {y.shape}, dtype {y.dtype}"
        )
    classes = int(flat.max()) + 1
    if units == 1:
        return "binary", 2
    if units is not None and classes > units:
        raise DataError(
            f"The data does not fit the model: labels go up to {classes - 1}, the model "
            f"has {units} output units. Expected class ids below {units}."
        )
    return "sparse", classes if units is None else int(units)


# -- compiling ----------------------------------------------------------------


def _compile_config(model, spec: _DataSpec) -> tuple[dict, str]:
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
    config = _jsonable(config)
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


# -- training helpers -----------------------------------------------------------


def _variables(model) -> list[np.ndarray]:
    # Every variable, seed states of the model's own dropout layers included,
    # so that each variant draws the same masks there too.
    return [np.array(v) for v in model.variables]


def _assign(model, values: list[np.ndarray]) -> None:
    for variable, value in zip(model.variables, values, strict=True):
        variable.assign(value)


def _weights_digest(model) -> str:
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(np.array(variable)).tobytes())
    return digest.hexdigest()


class _Tracker:
    """Per epoch: the history under fixed names, best-epoch weights, progress."""

    def __init__(self, model, display: _Display, rate: float):
        self.model = model
        self.display = display
        self.rate = rate
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
        self.display.epoch(self.rate, epoch + 1, values)


def _accuracy_key(logs: Mapping) -> str:
    names = [k for k in logs if not k.startswith("val_") and f"val_{k}" in logs]
    for name in names:
        if name in ("accuracy", "acc") or name.endswith("accuracy"):
            return name
    raise SweepError(
        "The variants report no accuracy: add an accuracy metric to the model's "
        f"compile config. Received: metrics {sorted(names)}"
    )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SweepError(f"Invalid `{name}`. Expected an int >= 1. Received: {name}={value!r}")


def _check_recurrent_rate(value):
    if value is None or value == SAME:
        return value
    return validate_rate("recurrent_rate", value)


def _base_policy(policy) -> Policy | None:
    if policy is None:
        return None
    if isinstance(policy, (str, os.PathLike)):
        policy = Policy.from_file(policy)
    if not isinstance(policy, Policy):
        raise PolicyError(
            "Invalid `policy`. Expected a `regularize.Policy` or the path of a TOML "
            f"policy file. Received: policy of type {type(policy).__name__!r}"
        )
    if policy.schedule is not None:
        raise PolicyError(
            "Invalid `policy` for a sweep: its [schedule] sets the rate by depth, so the "
            "swept rate would be ignored. Expected a policy without a schedule."
            + (f" Received: {policy.source}" if policy.source else "")
        )
    return policy


def output_folder(model, out=None) -> Path:
    """Where a sweep of `model` writes: `out`, or the default (see `sweep`); creates nothing."""
    if out is not None:
        return Path(out)
    if isinstance(model, (str, os.PathLike)):
        return Path(model).with_name(f"{Path(model).stem}_sweep")
    return Path(f"{getattr(model, 'name', 'model')}_sweep")


def _output_folder(model, out) -> Path:
    out = output_folder(model, out)
    if out.exists() and not out.is_dir():
        raise SweepError(
            f"Cannot write the sweep to {str(out)!r}: it is a file. Expected a folder "
            "(new, or one an earlier run of this sweep wrote).",
            argument="out",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(
            f"Cannot create the sweep folder {str(out)!r}: {err.strerror}", argument="out"
        ) from err
    return out


MAIN, REPLICA, TUNER_CHIEF, TUNER_WORKER = "main", "replica", "tuner-chief", "tuner-worker"


def _role(strategy, keras_tuner: bool) -> str:
    """What this process does in the sweep.

    main: trains and writes everything. replica: a non-chief worker of a
    multi-worker `tf.distribute` strategy; trains, writes nothing. KerasTuner
    chief: hands out the rates, then writes the results. KerasTuner worker:
    trains the rates it is given and writes their variant files.
    """
    if not _is_chief(strategy):
        return REPLICA
    if keras_tuner and "KERASTUNER_ORACLE_IP" in os.environ:
        return TUNER_CHIEF if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else TUNER_WORKER
    return MAIN


def _search_as_trials(
    run: _Run,
    rates: Sequence[float],
    start: list,
    display: _Display,
    settings: dict,
    done: dict,
    out: Path,
) -> None:
    """Trains the variants as the trials of a KerasTuner grid search over the rates.

    Alone, this process runs every trial. As a KerasTuner worker it runs the
    trials the chief's oracle gives it; as the chief it only serves them.
    Finished variants (from `done`) are reported without training again.
    """
    try:
        import keras_tuner
    except ImportError as err:
        raise SweepError(
            "Cannot run the variants as KerasTuner trials: the keras-tuner package is not "
            "installed. Install it with `pip install keras-tuner`."
        ) from err

    class _VariantTrials(keras_tuner.GridSearch):
        def run_trial(self, trial, *args, **kwargs):
            rate = float(trial.hyperparameters.get("rate"))
            if rate not in done:
                done[rate] = _train_variant(run, rate, start, display, settings)
            return {"val_accuracy": done[rate].best_val_accuracy}

    space = keras_tuner.HyperParameters()
    space.Choice("rate", [float(r) for r in rates], ordered=True)
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
    tuner = _VariantTrials(
        hyperparameters=space,
        objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_trials=len(rates),
        # One folder per tuner: each overwrites only its own state.
        directory=str(out / "keras_tuner"),
        project_name=tuner_id,
        overwrite=True,
    )
    tuner.search(verbose=0)


def _collect(out: Path, rates: Sequence[float], settings: dict, before: dict) -> dict:
    """The KerasTuner chief's view of the variants the workers wrote to `out`."""
    done = _finished(out, rates, settings)
    missing = [format_rate(r) for r in rates if r not in done]
    if missing:
        raise SweepError(
            f"The KerasTuner search ended without variant(s) {', '.join(missing)} in "
            f"{str(out)!r}. Expected every worker to write to that folder: give them all "
            "the same `out` on a shared file system."
        )
    for rate, variant in done.items():
        variant.resumed = rate in before
    return done


def _make_strategy(strategy):
    if strategy is None or not isinstance(strategy, str):
        return strategy
    if strategy not in STRATEGIES:
        raise SweepError(
            f"Invalid `strategy`. Expected one of {', '.join(STRATEGIES)}. "
            f"Received: strategy={strategy!r}"
        )
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


class _Display:
    """A rich progress bar per variant (epochs), or nothing."""

    def __init__(self, enabled: bool, rates: Sequence[float], epochs: int):
        self.enabled = enabled
        self.epochs = epochs
        self.tasks = {}
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn
        from rich.progress import MofNCompleteColumn
        from rich.progress import Progress
        from rich.progress import TextColumn
        from rich.progress import TimeElapsedColumn

        self.progress = Progress(
            TextColumn("rate {task.fields[rate]:<5}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs  {task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        for rate in rates:
            self.tasks[rate] = self.progress.add_task(
                "", total=epochs, rate=format_rate(rate), info="waiting"
            )

    def __enter__(self) -> _Display:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def epoch(self, rate: float, epoch: int, values: Mapping[str, float]) -> None:
        if self.enabled:
            info = f"acc {values['accuracy']:.3f}  val acc {values['val_accuracy']:.3f}"
            self.progress.update(self.tasks[rate], completed=epoch, info=info)

    def resumed(self, rate: float, result: VariantResult) -> None:
        if self.enabled:
            info = f"done earlier: best val acc {result.best_val_accuracy:.3f}"
            self.progress.update(self.tasks[rate], completed=self.epochs, info=info)


# -- several runs ---------------------------------------------------------------

SUMMARY_KEYS = ("train_accuracy", "val_accuracy", "best_val_accuracy", "gap")


def summarize(results: Sequence[SweepResult]) -> dict[float, dict[str, dict]]:
    """Mean and standard deviation per rate over several sweeps (e.g. seeds).

    Returns:
        rate -> {"train_accuracy" | "val_accuracy" | "best_val_accuracy" |
        "gap": {"mean", "std", "values"}}, rates ascending. `std` is the
        sample standard deviation (n - 1), 0 for a single run.
    """
    by_rate: dict[float, list[VariantResult]] = {}
    for result in results:
        for variant in result.variants:
            by_rate.setdefault(variant.rate, []).append(variant)
    summary = {}
    for rate in sorted(by_rate):
        summary[rate] = {}
        for key in SUMMARY_KEYS:
            values = [float(getattr(v, key)) for v in by_rate[rate]]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            summary[rate][key] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return summary


# -- plotting -----------------------------------------------------------------


def plot_curves(
    runs: Mapping[float, Sequence[Mapping[str, Sequence[float]]]],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Draws train (solid) and validation (dashed) accuracy and loss per rate.

    The train curves are what `fit()` logs: running means over each epoch
    with dropout active.

    Args:
        runs: rate -> one history per run (e.g. per seed), each with "accuracy",
            "val_accuracy", "loss", "val_loss" lists. Several runs are drawn as
            their mean with a band of one (sample) standard deviation.
        path: The PNG file to write.
        title: The figure's title.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    panels = (("accuracy", "accuracy"), ("loss", "loss"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, (rate, histories) in enumerate(sorted(runs.items())):
            for split, style in (("", "-"), ("val_", "--")):
                series = _stack([h[f"{split}{key}"] for h in histories])
                epochs = np.arange(1, series.shape[1] + 1)
                mean = series.mean(axis=0)
                name = f"rate {format_rate(rate)} {'val' if split else 'train (fit)'}"
                ax.plot(epochs, mean, style, color=colors(i % 10), label=name)
                if len(histories) > 1:
                    std = series.std(axis=0, ddof=1)
                    ax.fill_between(
                        epochs, mean - std, mean + std, color=colors(i % 10), alpha=0.15
                    )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        _default_mode(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def _stack(series: Sequence[Sequence[float]]) -> np.ndarray:
    length = min(len(s) for s in series)
    return np.array([list(s)[:length] for s in series], dtype=float)


def _tf_reason(err: BaseException) -> str:
    """TensorFlow's op error without its "{{function_node ...}}" and "[Op:...]" wrapping."""
    text = re.sub(r"\{\{.*?\}\}", "", _first_line(err)).split(" [Op:")[0].strip()
    return text or type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines()[0].split())
