"""Checks of an output path, kept free of TensorFlow so the CLI can fail fast."""

from __future__ import annotations

import os
from pathlib import Path

from regularize.errors import ModelSaveError

SAVE_SUFFIXES = (".keras", ".h5")


def check_output_path(path: Path, *, overwrite: bool, source: Path | None = None) -> None:
    """Raises `ModelSaveError` if a model cannot (or must not) be written to `path`.

    Args:
        path: Where the model would go.
        overwrite: Whether an existing file may be replaced.
        source: The input model's path, which is never overwritten.
    """
    where = f"Cannot write model to {str(path)!r}"
    if path.is_dir():
        raise ModelSaveError(f"{where}: it is a folder. Expected a file path.")
    if path.suffix not in SAVE_SUFFIXES:
        raise ModelSaveError(
            f"{where}: unsupported file type. Expected a path ending in `.keras` or `.h5`. "
            f"Received: suffix={path.suffix!r}"
        )
    if source is not None and path.resolve() == Path(source).resolve():
        raise ModelSaveError(f"{where}: it is the input model. Expected another path.")
    if not path.parent.is_dir():
        raise ModelSaveError(f"{where}: folder {str(path.parent)!r} does not exist.")
    # The temporary file goes beside `path`, so the folder must take new
    # files. access() also reports a read-only file system; root passes it on
    # permission bits, and a failing save then reports the OS error itself.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ModelSaveError(
            f"{where}: folder {str(path.parent)!r} is not writable. "
            "Expected a folder you may create files in."
        )
    if path.exists() and not overwrite:
        raise ModelSaveError(
            f"{where}: the file already exists. "
            "Pass --force (overwrite=True in Python) to replace it."
        )
