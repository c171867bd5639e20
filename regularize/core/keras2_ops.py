"""Keras 2 op layers (`TFOpLambda`, `SlicingOpLambda`) read as data: what they call, with what.

tf_keras records a call of a TensorFlow function on Keras tensors as an op
layer whose config names the function (`math.add`) and whose recorded call
holds the constant arguments; it calls that function, eagerly, when it
rebuilds the model. The checker (`regularize.core.checker`) allows pure
tensor operations with inert constants only, and bounds what they make
(`regularize.core.opsize`). Imports nothing: the parent checks this before
any TensorFlow import.
"""

from __future__ import annotations

import re

from regularize.core import opsize

# The TensorFlow functions a Keras 2 `TFOpLambda` may call without `unsafe`:
# pure tensor operations, named as tf_keras records them (`config.function`,
# the `tf.` prefix dropped). An allowlist, not a denylist: TensorFlow has
# thousands of symbols and new ones appear; anything not here needs `unsafe`.
_PURE_NAMESPACES = ("math.", "nn.", "linalg.", "signal.", "bitwise.", "__operators__.")
PURE_FUNCTIONS = frozenset(
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
TENSOR_ATTRIBUTES = frozenset(
    """
    shape dtype values row_splits flat_values nested_row_splits row_lengths
    to_tensor indices dense_shape
    """.split()
)
OP_LAYERS = frozenset({"TFOpLambda", "SlicingOpLambda"})
ATTRIBUTE_LAYERS = frozenset({"InstanceProperty", "InstanceMethod", "ClassMethod"})
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
_CONSTANT = "_CONSTANT_VALUE"
# How tf_keras' SavedModel metadata encodes a tuple and a shape (json_utils);
# `.h5` configs write plain lists.
CONTAINERS = ("__tuple__", "TensorShape")
_MAX_CONSTANT_ITEMS = 1_000_000


def is_pure_function(name: str) -> bool:
    """Whether a `TFOpLambda` function name is on the allowlist."""
    if any(part in name for part in _NEVER):
        return False
    bare = name.removeprefix("compat.v1.")
    if bare.startswith(_PURE_NAMESPACES):
        rest = bare.split(".", 1)[1]
        return bool(rest) and "." not in rest and rest.isidentifier()
    return bare in PURE_FUNCTIONS


def layer_names(config) -> set[str]:
    """Every layer name in a Keras 2 config (the targets of recorded call arguments)."""
    names = set()
    for node in dicts(config):
        inner = node.get("config")
        if isinstance(node.get("class_name"), str) and isinstance(inner, dict):
            if isinstance(inner.get("name"), str):
                names.add(inner["name"])
        if isinstance(node.get("name"), str):
            names.add(node["name"])
    return names


def constant_arguments(inbound_nodes, names: set[str]):
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
            if kind in CONTAINERS and isinstance(item.get("items"), list):
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
        if _is_reference(item, names):
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


def calls(inbound_nodes, names: set[str]):
    """Each recorded call of an op layer: (positional arguments, keyword arguments).

    A tensor argument (`[layer, node, tensor]`) is `opsize.TENSOR`; tf_keras'
    tuple and shape encodings become lists.
    """
    stack = [inbound_nodes]
    while stack:
        item = stack.pop()
        if not isinstance(item, list):
            continue
        if len(item) == 4 and isinstance(item[3], dict):
            constant = item[0] == _CONSTANT and item[1] == -1
            if constant or _is_reference(item, names):
                first = _decoded(item[2], names) if constant else opsize.TENSOR
                yield [first], {k: _decoded(v, names) for k, v in item[3].items()}
                continue
        stack.extend(item)


def _decoded(value, names: set[str]):
    if isinstance(value, dict) and value.get("class_name") in CONTAINERS:
        return [_decoded(v, names) for v in value.get("items") or []]
    if isinstance(value, list):
        if _is_reference(value, names):
            return opsize.TENSOR
        return [_decoded(v, names) for v in value]
    return value


def _is_reference(item: list, names: set[str]) -> bool:
    return (
        len(item) in (3, 4)
        and isinstance(item[0], str)
        and item[0] in names
        and isinstance(item[1], int)
        and isinstance(item[2], int)
    )


def is_inert(value) -> bool:
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


def dicts(config):
    """Every dict in a JSON value, iteratively."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
