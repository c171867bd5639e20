"""The training data of a sweep: checked without TensorFlow, then read once.

DATA is an image folder (one subfolder of images per class, split by seed) or an `.npz` file
with x_train, y_train, x_val, y_val. `check_data` reads only the folder listing, the first
bytes of each image and the `.npz` index, so a bad path fails before the TensorFlow import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import stat
from pathlib import Path

import numpy as np

from regularize.core.errors import RegularizeError
from regularize.core.errors import first_line as _first_line
from regularize.core.text import short_repr

NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # image_dataset_from_directory's
# How those files begin: TensorFlow's decode_image reads the format from the
# content, not from the suffix, and fails mid-training on anything else.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_DATA_EXPECTED = (
    "Expected a folder with one subfolder of images per class, or an `.npz` file "
    "with arrays " + ", ".join(NPZ_KEYS)
)


class DataError(RegularizeError, ValueError):
    """The training data cannot be read, or does not fit the model."""


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
def naming_bad_images(spec: DataSpec):
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


@dataclasses.dataclass
class DataSpec:
    """The training data, read once, and a fresh pair of datasets per variant."""

    path: Path
    kind: str
    batch_size: int
    validation_split: float
    labels: str  # "sparse", "onehot" or "binary"
    classes: int
    train_size: int
    val_size: int
    arrays: dict | None = None
    image_size: tuple[int, int] | None = None
    color_mode: str | None = None

    @classmethod
    def read(cls, path, kind, model, batch_size, validation_split, image_size) -> DataSpec:
        path = Path(path)
        if kind == "npz":
            return cls._read_npz(path, model, batch_size)
        return cls._read_folder(path, model, batch_size, validation_split, image_size)

    @classmethod
    def _read_npz(cls, path: Path, model, batch_size: int) -> DataSpec:
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
            labels=labels,
            classes=classes,
            train_size=len(arrays["x_train"]),
            val_size=len(arrays["x_val"]),
            arrays=arrays,
        )

    @classmethod
    def _read_folder(cls, path, model, batch_size, validation_split, image_size):
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
            labels="sparse",
            classes=len(_class_folders(path)),
            train_size=0,
            val_size=0,
            image_size=tuple(image_size),
            color_mode=color_mode,
        )
        # The split's sizes do not depend on the seed, only which files go where.
        train, val = spec.datasets(0)
        spec.train_size, spec.val_size = len(train.file_paths), len(val.file_paths)
        units = _output_units(model)
        if units not in (None, 1, spec.classes):
            raise DataError(
                f"The data has {spec.classes} classes (subfolders) but the model predicts "
                f"{units}. Expected a model with {spec.classes} output units. "
                f"Received: data={str(path)!r}"
            )
        return spec

    def datasets(self, seed: int):
        """New train / validation datasets, shuffled and (for a folder) split by `seed`.

        A new pair with the same seed replays the same batch order and split.
        """
        import tensorflow as tf

        if self.kind == "npz":
            a = self.arrays
            train = tf.data.Dataset.from_tensor_slices((a["x_train"], a["y_train"]))
            train = train.shuffle(len(a["x_train"]), seed=seed, reshuffle_each_iteration=True)
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
                seed=seed,
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


def _tf_reason(err: BaseException) -> str:
    """TensorFlow's op error without its "{{function_node ...}}" and "[Op:...]" wrapping."""
    text = re.sub(r"\{\{.*?\}\}", "", _first_line(err)).split(" [Op:")[0].strip()
    return text or type(err).__name__
