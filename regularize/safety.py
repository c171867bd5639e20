"""Model files from strangers, read as data before anything is deserialized.

Imports no TensorFlow and no Keras: the parent process checks a file here
before it picks an engine, and the Keras 2 engine's child checks it again
before tf_keras sees it. Every walk is iterative, so that neither a deeply
nested config nor Python's recursion limit decides what happens.

What is refused without `unsafe` (each a one-line `ModelLoadError`):
- a Keras 2 `TFOpLambda` / `SlicingOpLambda` whose TensorFlow function is not
  a pure tensor operation on the allowlist below, or whose constant
  arguments are anything but numbers, shapes, dtypes and a few fixed
  keywords: tf_keras calls that function, eagerly, while it loads the model
  (`tf.io.write_file` writes any file, `tf.io.gfile.rmtree` deletes a tree);
- `ClassMethod` / `InstanceMethod` layers and `InstanceProperty` layers
  outside a few tensor attributes, for the same reason;
- Python-lambda `Lambda` layers (their bytecode runs at load time);
- a `vocabulary` given as a file path (tf_keras reads that local file into
  the model);
- a `module` key outside Keras, TensorFlow and the custom-object module:
  tf_keras' deserializer imports whatever module a config names.
What is refused always: HDF5 files whose datasets live in other files
(external storage, external links, virtual datasets) or need filter plugins,
and configs nested deeper than `MAX_CONFIG_DEPTH`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from regularize.errors import ModelLoadError
from regularize.errors import first_line as _first
from regularize.text import printable
from regularize.text import short_repr

MAX_CONFIG_DEPTH = 256
UNSAFE_HINT = "If you trust the file, pass `safe_mode=False`."

# The TensorFlow functions a Keras 2 `TFOpLambda` may call without `unsafe`:
# pure tensor operations, named as tf_keras records them (`config.function`,
# the `tf.` prefix dropped). An allowlist, not a denylist: TensorFlow has
# thousands of symbols and new ones appear; anything not here needs `unsafe`.
_PURE_NAMESPACES = ("math.", "nn.", "linalg.", "signal.", "bitwise.", "__operators__.")
_PURE_FUNCTIONS = frozenset(
    """
    abs add add_n argmax argmin argsort boolean_mask broadcast_to cast clip_by_norm
    clip_by_value complex concat convert_to_tensor cos cumsum divide einsum ensure_shape
    equal exp expand_dims eye fill floor gather gather_nd greater greater_equal identity
    less less_equal linspace logical_and logical_not logical_or matmul maximum meshgrid
    minimum multiply negative norm not_equal one_hot ones ones_like pad pow range rank
    realdiv reduce_all reduce_any reduce_logsumexp reduce_max reduce_mean reduce_min
    reduce_prod reduce_std reduce_sum reduce_variance repeat reshape reverse roll round
    rsqrt scatter_nd searchsorted sequence_mask shape sigmoid sign sin size slice sort
    split sqrt square squeeze stack stop_gradient strided_slice subtract tanh tensordot
    tile transpose truediv unstack where zeros zeros_like
    image.central_crop image.convert_image_dtype image.crop_to_bounding_box
    image.extract_patches image.flip_left_right image.flip_up_down
    image.grayscale_to_rgb image.pad_to_bounding_box image.per_image_standardization
    image.resize image.resize_with_crop_or_pad image.resize_with_pad image.rgb_to_grayscale
    """.split()
)
# Name parts refused even under an allowed namespace: a file or code-loading
# operation TensorFlow may add there later.
_NEVER = ("io.", "gfile", "saved_model", "load_library", "load_op_library", "py_function")
_TENSOR_ATTRIBUTES = frozenset(
    """
    shape dtype values row_splits flat_values nested_row_splits row_lengths
    to_tensor indices dense_shape
    """.split()
)
_OP_LAYERS = frozenset({"TFOpLambda", "SlicingOpLambda"})
_ATTRIBUTE_LAYERS = frozenset({"InstanceProperty", "InstanceMethod", "ClassMethod"})
# Strings a pure op may take as a constant argument: dtypes and fixed keywords.
_DTYPES = frozenset(
    """
    bool bfloat16 float16 half float32 float float64 double int8 int16 int32 int64
    uint8 uint16 uint32 uint64 complex64 complex128 string
    """.split()
)
_KEYWORDS = frozenset(
    """
    SAME VALID same valid CONSTANT REFLECT SYMMETRIC constant reflect symmetric
    channels_last channels_first NHWC NCHW NWC NCW NDHWC NCDHW
    bilinear nearest bicubic area lanczos3 lanczos5 gaussian mitchellcubic euclidean fro
    """.split()
)
_EINSUM = re.compile(r"[a-zA-Z. ]*(,[a-zA-Z. ]*)*(->[a-zA-Z. ]*)?")
_NAME = re.compile(r"[\w.\-/]{0,128}")
_CONSTANT = "_CONSTANT_VALUE"
# How tf_keras' SavedModel metadata encodes a tuple and a shape (json_utils);
# `.h5` configs write plain lists.
_CONTAINERS = ("__tuple__", "TensorShape")
_MAX_CONSTANT_ITEMS = 1_000_000
# Modules a config may name (tf_keras imports the module a config's `module`
# key names, before anything else checks it).
_TRUSTED_MODULES = ("keras", "tf_keras", "tensorflow", "builtins", "tensorflow_model_optimization")
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
            f"Cannot read model: its model config is not valid JSON ({_first(err)}). {received}"
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
    config, received: str, *, unsafe: bool = False, custom_module: str | None = None
) -> None:
    """Raises `ModelLoadError` if loading this Keras 2 config would run code.

    Args:
        config: The parsed model config (or a SavedModel node's metadata).
        received: The `Received: path=...` tail of messages.
        unsafe: The user trusts the file: nothing is refused.
        custom_module: The module the user named for custom objects, which
            the config may name too.
    """
    if unsafe:
        return
    layer_names = _layer_names(config)
    for node in _dicts(config):
        module = node.get("module")
        if isinstance(module, str) and not _is_trusted_module(module, custom_module):
            raise ModelLoadError(
                f"Refusing to load model: its config names the Python module "
                f"{_shown(module)}, which the Keras 2 loader would import. Expected "
                f"modules of Keras or TensorFlow. {UNSAFE_HINT} {received}"
            )
        kind = node.get("class_name")
        inner = node.get("config")
        if not isinstance(kind, str) or not isinstance(inner, dict):
            continue
        where = f"layer {_shown(inner.get('name', '?'))} ({_shown(kind, quote=False)})"
        if kind in _OP_LAYERS:
            _check_op_layer(node, inner, where, layer_names, received)
        elif kind in _ATTRIBUTE_LAYERS:
            _check_attribute_layer(kind, inner, where, received)
        elif kind == "Lambda" and _is_python_lambda(inner.get("function")):
            raise ModelLoadError(
                f"Refusing to load a model with a Python-lambda `Lambda` layer "
                f"({_shown(inner.get('name', '?'))}): it runs arbitrary code. "
                f"{UNSAFE_HINT} {received}"
            )
        vocabulary = inner.get("vocabulary")
        if isinstance(vocabulary, str):
            raise ModelLoadError(
                f"Refusing to load model: {where} reads its vocabulary from the local "
                f"file {_shown(vocabulary)}, which would be copied into the model. "
                f"Expected the vocabulary as a list in the config. {UNSAFE_HINT} {received}"
            )


def _check_op_layer(node: dict, inner: dict, where: str, layer_names, received: str) -> None:
    function = inner.get("function")
    if not isinstance(function, str) or not is_pure_function(function):
        shown = f"`tf.{function}`" if isinstance(function, str) else _shown(function)
        raise ModelLoadError(
            f"Refusing to load model: {where} calls {_shown(shown, quote=False)}, which "
            "is not on the allowlist of pure tensor operations: loading the model "
            f"would call it. {UNSAFE_HINT} {received}"
        )
    for value in _constant_arguments(node.get("inbound_nodes"), layer_names):
        if not _is_inert(value):
            raise ModelLoadError(
                f"Refusing to load model: {where} passes `tf.{function}` the constant "
                f"argument {_shown(value)}. Expected numbers, shapes or dtypes. "
                f"{UNSAFE_HINT} {received}"
            )


def _check_attribute_layer(kind: str, inner: dict, where: str, received: str) -> None:
    name = inner.get("attr_name")
    if kind != "ClassMethod" and isinstance(name, str) and name in _TENSOR_ATTRIBUTES:
        return
    target = inner.get("attr_name") or inner.get("cls_symbol")
    raise ModelLoadError(
        f"Refusing to load model: {where} calls {_shown(target)} on a TensorFlow "
        "object while the model is loaded. Expected a pure tensor operation. "
        f"{UNSAFE_HINT} {received}"
    )


def is_pure_function(name: str) -> bool:
    """Whether a `TFOpLambda` function name is on the allowlist."""
    if any(part in name for part in _NEVER):
        return False
    bare = name.removeprefix("compat.v1.")
    if bare.startswith(_PURE_NAMESPACES):
        rest = bare.split(".", 1)[1]
        return bool(rest) and "." not in rest and rest.isidentifier()
    return bare in _PURE_FUNCTIONS


def _is_python_lambda(function) -> bool:
    # tf_keras writes [code, defaults, closure] with function_type "lambda";
    # the type sits beside it in the config, the code itself is a list or a
    # base64 string. Anything but a plain function name counts.
    return not (isinstance(function, str) and function.isidentifier())


def _is_trusted_module(module: str, custom_module: str | None) -> bool:
    if module.split(".", 1)[0] in _TRUSTED_MODULES:
        return True
    if not custom_module:
        return False
    return module == custom_module or module.startswith(custom_module + ".")


def _layer_names(config) -> set[str]:
    names = set()
    for node in _dicts(config):
        inner = node.get("config")
        if isinstance(node.get("class_name"), str) and isinstance(inner, dict):
            if isinstance(inner.get("name"), str):
                names.add(inner["name"])
        if isinstance(node.get("name"), str):
            names.add(node["name"])
    return names


def _constant_arguments(inbound_nodes, layer_names: set[str]):
    """The constants of a layer's recorded calls: positional and keyword.

    tf_keras records each call argument as `[layer, node, tensor, kwargs]`
    (a tensor) or `["_CONSTANT_VALUE", -1, value, kwargs]` (a constant);
    keyword arguments hold constants or `[layer, node, tensor]` references.
    """
    stack = [inbound_nodes]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            kind = item.get("class_name")
            if kind in _CONTAINERS and isinstance(item.get("items"), list):
                stack.append(item["items"])  # a tuple or shape, as a list
            elif kind == "__ellipsis__" and len(item) == 1:
                pass  # `x[..., 0]`
            elif kind is not None:
                yield item  # any other encoded object is not inert
            else:
                stack.extend(item.values())
            continue
        if not isinstance(item, list):
            yield item
            continue
        if _is_reference(item, layer_names):
            if len(item) >= 4:
                stack.append(item[3])
            continue
        if len(item) >= 3 and item[0] == _CONSTANT and item[1] == -1:
            yield item[2]
            if len(item) >= 4:
                stack.append(item[3])
            continue
        if _is_numbers(item):
            yield item
            continue
        stack.extend(item)


def _is_reference(item: list, layer_names: set[str]) -> bool:
    return (
        len(item) in (3, 4)
        and isinstance(item[0], str)
        and item[0] in layer_names
        and isinstance(item[1], int)
        and isinstance(item[2], int)
    )


def _is_inert(value) -> bool:
    """A number, a shape, a dtype or a fixed keyword: nothing a pure op can misuse."""
    if value is None or isinstance(value, bool | int | float):
        return True
    if isinstance(value, str):
        return value in _DTYPES or value in _KEYWORDS or _is_equation(value)
    if isinstance(value, dict):
        # SlicingOpLambda writes a slice as {"start": ..., "stop": ..., "step": ...}.
        return set(value) <= {"start", "stop", "step"} and all(
            v is None or isinstance(v, int) for v in value.values()
        )
    if isinstance(value, list):
        return _is_numbers(value)
    return False


def _is_equation(text: str) -> bool:
    return 0 < len(text) <= 64 and bool(_EINSUM.fullmatch(text)) and any(c.isalpha() for c in text)


def _is_numbers(value: list) -> bool:
    """A (nested) list of numbers and None: a shape or a small constant tensor."""
    stack, count = [value], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > _MAX_CONSTANT_ITEMS:
            return False
        if isinstance(item, list):
            stack.extend(item)
        elif not (item is None or isinstance(item, bool | int | float)):
            return False
    return True


def _dicts(config):
    """Every dict in a JSON value, iteratively."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# -- HDF5 -------------------------------------------------------------------


def check_h5_storage(path: str | os.PathLike, received: str) -> None:
    """Raises `ModelLoadError` if an HDF5 file keeps any data outside itself.

    HDF5 lets a dataset store its bytes in another file (external storage),
    a link point into another file (external link), and a dataset be a view
    of others (virtual dataset): loading such a "model" copies any local
    file the process can read into the model, and so into the output. Soft
    links are refused too (Keras never writes them), and datasets whose
    filters HDF5 would load as plugins.
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
        with h5py.File(path, "r") as f:
            f.visititems_links(visit)
    except Exception as err:  # h5py: OSError, RuntimeError, KeyError on damaged files
        raise ModelLoadError(
            f"Cannot read model: corrupt HDF5 file ({_first(err)}). {received}"
        ) from err
    if problems:
        raise ModelLoadError(
            f"Refusing to read model: {problems[0]}, which would read data from outside "
            f"the file. Expected a self-contained `.h5` file. {received}"
        )


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
