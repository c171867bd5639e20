"""Model files read as data: configs, HDF5 storage, SavedModel metadata, load-error messages.

Imports no TensorFlow and no Keras: the parent process checks a file here
before it picks an engine, and the Keras 2 engine's child checks it again
before tf_keras sees it. Every walk is iterative, so that neither a deeply
nested config nor Python's recursion limit decides what happens.

The config checks themselves (classes, functions, file arguments, Keras 2
op layers, resource bounds) live once, in `regularize.core.checker`;
`check_keras2_config` applies its Keras 2 rules, `regularize.keras3.trust` its
Keras 3 ones. Here: parsing a config safely (`parse_config`: depth first),
HDF5 files whose datasets live in other files (external storage, external
links, virtual datasets) or need filter plugins (`check_h5_storage`, refused
always), the SavedModel's `keras_metadata.pb` decoded by hand, and our one
line for a Keras safe-mode refusal.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from regularize.core import budget
from regularize.core import checker
from regularize.core.allowlist import keras2_allowlist
from regularize.core.errors import ModelLoadError
from regularize.core.errors import first_line as _first
from regularize.core.text import printable
from regularize.core.text import short_repr

MAX_CONFIG_DEPTH = 256
UNSAFE_HINT = checker.UNSAFE_HINT

# HDF5 filters built into HDF5 or h5py; any other id makes HDF5 load a plugin.
_BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000, 32001, 32015})


# -- JSON configs -----------------------------------------------------------


def config_depth(text: str) -> int:
    """How deep `[` and `{` nest in a JSON text, counted without parsing it."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    depth = deepest = 0
    for match in re.finditer(r"[\[\]{}]", stripped):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_config(text: str | bytes, received: str) -> dict:
    """Parses a model config, refusing one nested too deep to parse safely.

    `json.loads` recurses once per level and fails at Python's recursion
    limit (1,000 after TensorFlow is imported on some machines), so depth is
    counted first, on the text.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    depth = config_depth(text)
    if depth > MAX_CONFIG_DEPTH:
        raise ModelLoadError(
            f"Cannot read model: its model config is nested {depth} levels deep. "
            f"Expected at most {MAX_CONFIG_DEPTH} levels. {received}"
        )
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(
            f"Cannot read model: its model config is not valid JSON ({_first(err)}); the "
            f"file is corrupt or was edited by hand. {received}"
        ) from err
    if not isinstance(config, dict):
        raise ModelLoadError(
            "Cannot read model: its model config is not a JSON object. Expected a Keras "
            f"model config. {received}"
        )
    return config


_CLASS_NAME = re.compile(r'"class_name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def class_names(text: str | bytes) -> set[str]:
    """Every `class_name` value in a JSON config text, found without parsing it.

    A `"class_name": "..."` key-value pair cannot appear inside a JSON string
    (its quotes would be escaped), so this finds exactly the keys, at any
    depth, whatever the recursion limit.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return {m.group(1) for m in _CLASS_NAME.finditer(text)}


def check_keras2_config(
    config,
    received: str,
    *,
    unsafe: bool = False,
    custom_module: str | None = None,
    modules: frozenset[str] | None = None,
    root: str | os.PathLike | None = None,
) -> None:
    """Raises `ModelLoadError` if loading this Keras 2 config would run code or read files.

    The checks live in `regularize.core.checker` (one checker for both
    engines); this applies its Keras 2 rules.

    Args:
        config: The parsed model config (or a SavedModel node's metadata).
        received: The `Received: path=...` tail of messages.
        unsafe: The user trusts the file: only the resource bounds apply.
        custom_module: The module the user named for custom objects, which
            the config may name too.
        modules: The exact modules of tfmot's classes (the child knows them).
        root: The SavedModel folder, whose own files (`assets/`) a config may name.
    """
    allowlist = keras2_allowlist(custom_module, modules=modules)
    root = None if root is None else str(root)
    checker.check_config(config, allowlist, received=received, unsafe=unsafe, root=root)


is_pure_function = checker.is_pure_function
_PURE_FUNCTIONS = checker.PURE_FUNCTIONS
_TENSOR_ATTRIBUTES = checker.TENSOR_ATTRIBUTES
_dicts = checker.dicts


# -- HDF5 -------------------------------------------------------------------


def check_h5_storage(source, received: str) -> None:
    """Raises `ModelLoadError` if an HDF5 file keeps data outside itself, or inflates.

    HDF5 lets a dataset store its bytes in another file (external storage),
    a link point into another file (external link), and a dataset be a view
    of others (virtual dataset): loading such a "model" copies any local
    file the process can read into the model, and so into the output. Soft
    links are refused too (Keras never writes them), and datasets whose
    filters HDF5 would load as plugins. A dataset that holds far more than
    the file stores for it (gzip of zeros, or never written: HDF5 then
    returns its fill value) would make the loader allocate that much from a
    small file; it is refused too (see `MAX_INFLATION`).

    Args:
        source: A path, or a file object (a `.keras` archive's member).
    """
    import h5py

    problems: list[str] = []

    def visit(name, link):
        if problems:
            return True
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"{_shown('/' + name)} is an external link to {_shown(link.filename)}")
        elif isinstance(link, h5py.SoftLink):
            problems.append(f"{_shown('/' + name)} is a soft link to {_shown(link.path)}")
        else:
            problem = _dataset_problem(f, name)
            if problem:
                problems.append(problem)
        return True if problems else None

    try:
        with h5py.File(source, "r") as f:
            f.visititems_links(visit)
    except Exception as err:  # h5py: OSError, RuntimeError, KeyError on damaged files
        raise ModelLoadError(
            f"Cannot read model: corrupt HDF5 file ({_first(err)}). {received}"
        ) from err
    if problems and " holds " in problems[0]:
        raise ModelLoadError(
            f"Refusing to read model: {problems[0]}. Expected weights stored at their "
            f"size. {received}"
        )
    if problems:
        raise ModelLoadError(
            f"Refusing to read model: {problems[0]}, which would read data from outside "
            f"the file. Expected a self-contained `.h5` file. {received}"
        )


# How much larger than its bytes in the file a dataset may be (float weights
# barely compress; zeros compress a thousandfold), beyond a first megabyte.
MAX_INFLATION = 20
_INFLATION_FLOOR = 1 << 20


def h5_dataset_bytes(source) -> int:
    """The bytes of data the datasets of an HDF5 file (a path or a file object) hold."""
    import h5py

    total = 0

    def visit(_name, obj):
        nonlocal total
        if isinstance(obj, h5py.Dataset):
            total += obj.size * obj.dtype.itemsize

    with h5py.File(source, "r") as f:
        f.visititems(visit)
    return total


def _dataset_problem(f, name: str) -> str | None:
    import h5py

    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        return None
    shown = _shown("/" + name)
    if obj.is_virtual:
        return f"dataset {shown} is a virtual dataset"
    plist = obj.id.get_create_plist()
    if plist.get_external_count() > 0:
        file = plist.get_external(0)[0]
        file = file.decode("utf-8", "replace") if isinstance(file, bytes) else file
        return f"dataset {shown} stores its data in the external file {_shown(file)}"
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in _BUILTIN_FILTERS:
            return f"dataset {shown} needs the HDF5 filter plugin {code}"
    logical = obj.size * obj.dtype.itemsize
    stored = obj.id.get_storage_size()
    if logical > MAX_INFLATION * stored + _INFLATION_FLOOR:
        return (
            f"dataset {shown} holds {budget.format_bytes(logical)} that the file stores "
            f"in {budget.format_bytes(stored)} (compressed or never written)"
        )
    return None


# -- SavedModel metadata ----------------------------------------------------


def read_keras_metadata(folder: str | os.PathLike) -> list[dict]:
    """The nodes of a Keras 2 SavedModel's `keras_metadata.pb`, as plain dicts.

    Each is `{"node_path", "identifier", "metadata"}` (the metadata a JSON
    text). Decoded by hand: the generated protobuf class lives in tf_keras,
    whose import brings TensorFlow and legacy Keras into this process. The
    file is `SavedMetadata { repeated SavedObject nodes = 1; }` with
    `SavedObject { int32 node_id = 2; string node_path = 3; string identifier
    = 4; string metadata = 5; VersionDef version = 6; }`
    (tf_keras/protobuf/saved_metadata.proto).

    Raises:
        ModelLoadError: The file is not such a message.
    """
    path = Path(folder) / "keras_metadata.pb"
    data = path.read_bytes()
    nodes = []
    try:
        for field, value in _fields(data):
            if field == 1 and isinstance(value, bytes):
                node = {"node_path": "", "identifier": "", "metadata": ""}
                for inner, text in _fields(value):
                    key = {3: "node_path", 4: "identifier", 5: "metadata"}.get(inner)
                    if key and isinstance(text, bytes):
                        node[key] = text.decode("utf-8")
                nodes.append(node)
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(
            f"Cannot read model: `keras_metadata.pb` is not Keras metadata ({_first(err)}). "
            f"Received: path={str(folder)!r}"
        ) from err
    return nodes


def savedmodel_root_config(folder: str | os.PathLike) -> tuple[dict, str]:
    """The root model's metadata (a dict) and its JSON text, from `keras_metadata.pb`."""
    received = f"Received: path={str(folder)!r}"
    for node in read_keras_metadata(folder):
        if node["node_path"] == "root":
            return parse_config(node["metadata"], received), node["metadata"]
    raise ModelLoadError(
        "Cannot read model: `keras_metadata.pb` has no root object. Expected a Keras 2 "
        f"SavedModel. {received}"
    )


def _fields(data: bytes):
    """(field number, value) pairs of a protobuf message: ints and byte strings."""
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > end:
                raise ValueError("truncated field")
            value, i = data[i : i + size], i + size
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if i > end:
            raise ValueError("truncated field")
        yield field, value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


# -- messages -----------------------------------------------------------------


def safe_mode_refusal(text: str, received: str) -> str | None:
    """Our one line for a Keras (or tf_keras) safe-mode refusal, naming its real cause.

    Returns None when `text` is not a safe-mode refusal.
    """
    if "safe_mode" not in text and "unsafe_deserialization" not in text:
        return None
    if "TFSMLayer" in text:
        cause = "a `TFSMLayer` layer: it loads an external SavedModel, whose graph code would run"
    elif "vocabulary file" in text:
        cause = (
            "a lookup layer whose vocabulary is a file outside the model: a local file "
            "would be read into the model"
        )
    elif "lambda" in text.lower():
        return (
            "Refusing to load a model with a Python-lambda `Lambda` layer: it runs "
            f"arbitrary code. {UNSAFE_HINT} {received}"
        )
    else:
        cause = f"something Keras' safe mode refuses ({_shown(_first(text), quote=False)})"
    return f"Refusing to load a model with {cause}. {UNSAFE_HINT} {received}"


def _shown(value, *, quote: bool = True) -> str:
    """A value for a one-line message: repr (control characters escaped), cut short."""
    return short_repr(value) if quote else printable(short_repr(str(value))[1:-1])
