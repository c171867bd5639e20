"""The one output-path rule of both engines, kept free of TensorFlow so the CLI can fail fast.

What an output may replace (with `overwrite`, the CLI's `--force`): a file
of its own kind, a symbolic link (the link itself: it is never followed), or
for a SavedModel output a folder that is itself a SavedModel, for a keras-hub
preset output a folder that is itself a preset (`preset_folder.is_preset_folder`).
Never the
input, a folder that holds the input, the working folder or one above it,
nor any other folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from regularize.core.errors import ModelSaveError
from regularize.core.preset_folder import is_preset_folder
from regularize.core.text import short_repr

SAVE_SUFFIXES = (".keras", ".h5")
KERAS = "keras"
H5 = "h5"
SAVEDMODEL = "savedmodel"
PRESET = "preset"
FOLDER_FORMATS = (SAVEDMODEL, PRESET)


def output_format(path: str | os.PathLike) -> str:
    """The format an output path's suffix means: "keras", "h5" or "savedmodel"."""
    suffix = Path(path).suffix
    if suffix == ".keras":
        return KERAS
    return H5 if suffix in (".h5", ".hdf5") else SAVEDMODEL


def check_output_path(
    path: Path, *, overwrite: bool, source: Path | None = None, fmt: str | None = None
) -> None:
    """Raises `ModelSaveError` if a model cannot (or must not) be written to `path`.

    Args:
        path: Where the model would go.
        overwrite: Whether an existing output may be replaced (see the module).
        source: The input model's path, which is never overwritten.
        fmt: "keras", "h5", "savedmodel" or "preset"; None: a `.keras` / `.h5` file
            (the Keras 3 engine), told by the suffix.
    """
    path = Path(path)
    where = f"Cannot write model to {_shown(path)}"
    try:
        _check(path, where, overwrite=overwrite, source=source, fmt=fmt)
    except ModelSaveError:
        raise
    except OSError as err:  # a name too long, a loop of links, ...
        raise ModelSaveError(f"{where}: {err.strerror or err}.") from err


def _check(path: Path, where: str, *, overwrite: bool, source: Path | None, fmt) -> None:
    info = _lstat(path)
    is_link = info is not None and stat.S_ISLNK(info.st_mode)
    is_dir = info is not None and stat.S_ISDIR(info.st_mode)
    if fmt is None:  # the Keras 3 engine: a `.keras` or `.h5` file
        if is_dir:
            raise ModelSaveError(f"{where}: it is a folder. Expected a file path.")
        if path.suffix not in SAVE_SUFFIXES:
            raise ModelSaveError(
                f"{where}: unsupported file type. Expected a path ending in `.keras` or "
                f"`.h5`. Received: suffix={path.suffix!r}"
            )
        fmt = output_format(path)
    if fmt not in FOLDER_FORMATS and is_dir:
        raise ModelSaveError(f"{where}: it is a folder. Expected a file path.")
    if fmt in FOLDER_FORMATS and info is not None and stat.S_ISREG(info.st_mode):
        what = "a SavedModel" if fmt == SAVEDMODEL else "a keras-hub preset"
        raise ModelSaveError(
            f"{where}: it is a file. Expected a folder path for {what} "
            "(or a path ending in `.h5` or `.keras`)."
        )
    if source is not None:
        _check_source(path, Path(source), where, info, is_link)
    if not path.parent.is_dir():
        raise ModelSaveError(f"{where}: folder {_shown(path.parent)} does not exist.")
    # The temporary file goes beside `path`, so the folder must take new
    # files. access() also reports a read-only file system; root passes it on
    # permission bits, and a failing save then reports the OS error itself.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ModelSaveError(
            f"{where}: folder {_shown(path.parent)} is not writable. "
            "Expected a folder you may create files in."
        )
    if info is None:
        return
    if not overwrite:
        what = "a symbolic link" if is_link else "the folder" if is_dir else "the file"
        raise ModelSaveError(
            f"{where}: {what} already exists. Pass `overwrite=True` to replace it."
        )
    if is_link:
        return  # the link itself is replaced, its target untouched
    if is_dir:
        _check_replaceable_folder(path, where, fmt)
    elif not stat.S_ISREG(info.st_mode):
        raise ModelSaveError(
            f"{where}: it is not a regular file (a device, pipe or socket). Expected a file path."
        )


def _check_source(path: Path, source: Path, where: str, info, is_link: bool) -> None:
    same = os.path.abspath(path) == os.path.abspath(source)
    if not same and info is not None and not is_link and source.exists():
        same = os.path.samefile(path, source)
    if same:
        raise ModelSaveError(f"{where}: it is the input model. Expected another path.")
    if not source.exists():
        return
    real_source = source.resolve()
    real_parent = path.parent.resolve()
    if source.is_dir() and (real_parent == real_source or real_source in real_parent.parents):
        what = "SavedModel" if (source / "saved_model.pb").exists() else "folder"
        raise ModelSaveError(
            f"{where}: it is inside the input {what} {_shown(source)}, which is never "
            "changed. Expected a path outside it."
        )
    if info is not None and not is_link and stat.S_ISDIR(info.st_mode):
        real = path.resolve()
        if real == real_source or real in real_source.parents:
            raise ModelSaveError(
                f"{where}: it is a folder that holds the input model, which is never "
                "replaced. Expected another path."
            )


def _check_replaceable_folder(path: Path, where: str, fmt: str) -> None:
    real = path.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working folder was removed: it cannot be replaced either
        cwd = None
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise ModelSaveError(
            f"{where}: it is the working folder or a folder above it, which is never "
            f"replaced. Expected a {'SavedModel' if fmt == SAVEDMODEL else 'preset'} folder path."
        )
    if fmt == PRESET:
        if not is_preset_folder(path):
            raise ModelSaveError(
                f"{where}: it is a folder that is not a keras-hub preset (no `config.json`), "
                "and only a preset folder may be replaced. Expected a new path or a "
                "preset folder."
            )
        return
    if not (path / "saved_model.pb").is_file():
        raise ModelSaveError(
            f"{where}: it is a folder that is not a SavedModel (no `saved_model.pb`), "
            "and only a SavedModel folder may be replaced. Expected a new path or a "
            "SavedModel folder."
        )


def _lstat(path: Path) -> os.stat_result | None:
    """`path`'s own status (a link is not followed), or None if nothing is there."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _shown(path) -> str:
    """A path for a one-line message: repr (control characters escaped), cut short."""
    return short_repr(str(path), 200)
