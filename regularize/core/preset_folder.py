"""keras-hub preset folders as files: what one is, and what in it may be read. No Keras import.

A preset folder is what keras-hub's `save_to_preset` writes: `config.json`
(the backbone, as a serialized Keras object), `metadata.json`, the backbone
weights `model.weights.h5` (or a sharded `model.weights.json` and its
shards), and for a task `task.json`, `task.weights.h5`, `preprocessor.json`,
`tokenizer.json` and `assets/` (vocabularies). keras-hub reads each by a
fixed name inside the folder (`preset_utils.get_file`), or by a name a
config gives (`config_file`, the shard names of `model.weights.json`).

The checks here need no Keras, so the command line can refuse a folder
before TensorFlow loads; `regularize.keras3.hub_preset` adds the config checks.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from regularize.core import safety
from regularize.core.errors import ModelLoadError

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TASK_FILE = "task.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
# The configs this tool edits; every other file of a preset is copied byte for byte.
EDITED_FILES = (CONFIG_FILE, TASK_FILE)
# keras-hub's remote preset schemes (`preset_utils`): resolved by keras-hub's own loader.
HANDLE_SCHEMES = ("kaggle://", "hf://", "gs://", "modelscope://")
# A built-in preset name (`bert_base_en`, `resnet_50_imagenet`): no suffix, no folder.
_BUILTIN_NAME = re.compile(r"[a-z][a-z0-9_]*")
# A JSON file larger than this is no preset config (a large BPE vocabulary is ~1 MB).
MAX_JSON_BYTES = 64 << 20
UNSAFE_HINT = "If you trust the folder, pass `safe_mode=False`."
EXPECTED = "a keras-hub preset folder (written by `save_to_preset`)"


def is_preset_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a keras-hub `config.json` (not a SavedModel)."""
    path = Path(path)
    try:
        return (
            path.is_dir()
            and (path / CONFIG_FILE).is_file()
            and not (path / "saved_model.pb").exists()
        )
    except OSError:
        return False


def is_preset(input: str | os.PathLike) -> bool:
    """Whether `input` is a keras-hub preset folder or handle (no Keras import)."""
    if is_preset_folder(input):
        return True
    return not os.path.lexists(input) and is_handle(input)


def is_remote(name: str | os.PathLike) -> bool:
    """Whether `name` is a remote preset handle (`kaggle://...`, `hf://...`): kept as a string."""
    return isinstance(name, str) and name.startswith(HANDLE_SCHEMES)


def is_handle(name: str | os.PathLike) -> bool:
    """Whether `name` is a remote preset handle (`kaggle://...`, `hf://...`) or a built-in name.

    A file or folder of that name wins. Built-in names are told apart from
    other missing paths by keras-hub itself (`regularize.keras3.hub_preset`); here a
    name only has to look like one.
    """
    text = os.fspath(name)
    if text.startswith(HANDLE_SCHEMES):
        return True
    return bool(_BUILTIN_NAME.fullmatch(text)) and not os.path.lexists(text)


def handle_name(handle: str) -> str:
    """The short name of a handle, for the default output (`kaggle://a/bert/keras/x/2` -> `x`)."""
    parts = [p for p in handle.split("://", 1)[-1].split("/") if p]
    if len(parts) > 1 and parts[-1].isdigit():
        parts = parts[:-1]
    return re.sub(r"[^\w.-]", "_", parts[-1] if parts else "preset")


def check_tree(folder: Path, received: str, *, unsafe: bool) -> list[Path]:
    """Every file of the preset folder, refusing links out of it and special files.

    keras-hub opens files by name inside the folder; a symbolic link there
    that points outside it would have a local file of the user's read into
    the model (a vocabulary) and written into the output. Lifted by
    `unsafe`. A pipe, socket or device is refused always: opening a pipe
    blocks forever.

    Returns:
        The regular files (and links to files inside the folder), relative to `folder`.
    """
    root = os.path.realpath(folder)
    files: list[Path] = []
    for top, dirs, names in os.walk(folder, followlinks=False):
        for name in sorted(dirs) + sorted(names):
            entry = Path(top) / name
            info = os.lstat(entry)
            relative = entry.relative_to(folder)
            if stat.S_ISLNK(info.st_mode):
                target = os.path.realpath(entry)
                if not _is_inside(target, root) and not unsafe:
                    raise ModelLoadError(
                        f"Refusing to read preset: {str(relative)!r} is a symbolic link to "
                        f"{target!r}, outside the preset folder, which keras-hub would read "
                        f"into the model. Expected files inside the folder. {UNSAFE_HINT} "
                        f"{received}"
                    )
                if os.path.isdir(entry):
                    # Not walked (a link can loop), so not copied: the output would miss it.
                    raise ModelLoadError(
                        f"Refusing to read preset: {str(relative)!r} is a symbolic link to a "
                        f"folder. Expected plain folders inside the preset. {received}"
                    )
                if os.path.isfile(entry):
                    files.append(relative)
            elif stat.S_ISREG(info.st_mode):
                files.append(relative)
            elif not stat.S_ISDIR(info.st_mode):
                raise ModelLoadError(
                    f"Refusing to read preset: {str(relative)!r} is not a regular file (a "
                    f"pipe, socket or device). Expected files and folders only. {received}"
                )
    return files


def _is_inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def read_json(folder: Path, name: Path | str, received: str) -> dict:
    """One JSON file of the preset, parsed as data (size and depth bounded)."""
    path = Path(folder) / name
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(
            f"Refusing to read preset: {str(name)!r} is {size:,} bytes. Expected at most "
            f"{MAX_JSON_BYTES:,} bytes. {received}"
        )
    return safety.parse_config(path.read_bytes(), received)


def json_files(files: list[Path]) -> list[Path]:
    """The JSON files of a preset, its configs and data alike (all are checked)."""
    return [f for f in files if f.suffix == ".json"]


def weight_files(folder: Path, files: list[Path], received: str) -> list[Path]:
    """The weights files keras-hub would read, each checked to be a self-contained HDF5 file.

    `model.weights.h5`, `task.weights.h5`, and the shards `model.weights.json`
    names (plain file names inside the folder: Keras joins them to its folder).
    Every other `.h5` file in the folder is checked the same way.
    """
    names = {str(f) for f in files}
    if WEIGHTS_FILE not in names and SHARDED_WEIGHTS_FILE not in names:
        raise ModelLoadError(
            f"Cannot read preset: it has no weights (no `{WEIGHTS_FILE}` and no "
            f"`{SHARDED_WEIGHTS_FILE}`). Expected {EXPECTED}. {received}"
        )
    weights = [f for f in files if f.suffix == ".h5"]
    if SHARDED_WEIGHTS_FILE in names:
        for shard in _shard_names(folder, received):
            if shard not in names:
                raise ModelLoadError(
                    f"Refusing to read preset: `{SHARDED_WEIGHTS_FILE}` names the shard "
                    f"{shard!r}, which is not a file of the folder. Expected shard names "
                    f"inside the preset folder. {received}"
                )
            if Path(shard) not in weights:
                weights.append(Path(shard))
    for name in weights:
        path = Path(folder) / name
        if not _is_hdf5(path):
            raise ModelLoadError(
                f"Refusing to read preset: {str(name)!r} is not an HDF5 file. Expected "
                f"Keras weights (`.weights.h5`). {received}"
            )
        safety.check_h5_storage(path, received)
    return weights


def _shard_names(folder: Path, received: str) -> list[str]:
    data = read_json(folder, SHARDED_WEIGHTS_FILE, received)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(
            f"Cannot read preset: `{SHARDED_WEIGHTS_FILE}` has no `weight_map` object. "
            f"Expected a sharded weights index written by Keras. {received}"
        )
    names = set()
    for value in weight_map.values():
        for name in value if isinstance(value, list) else [value]:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ModelLoadError(
                    f"Refusing to read preset: `{SHARDED_WEIGHTS_FILE}` names the shard "
                    f"{json.dumps(name)[:200]}, not a plain file name. Expected shard names "
                    f"inside the preset folder. {received}"
                )
            names.add(name)
    return sorted(names)


def _is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


def stored_bytes(folder: Path, weights: list[Path]) -> int:
    """The bytes of weight data the preset's weights files hold."""
    return sum(safety.h5_dataset_bytes(Path(folder) / name) for name in weights)
