"""How large a tensor a Keras 2 op layer's recorded call makes, from its constants alone.

tf_keras calls a `TFOpLambda`'s TensorFlow function while it rebuilds the
model, eagerly, with the constants recorded in the config: `tf.eye(24000)`
is a 2.3 GB tensor from a 20-byte number. A product of the numbers of each
shape does not see every way of asking for size (one side of a square, a
float limit, a count, a depth, a padding), so the operations whose output
size their arguments set get a formula each, over their arguments by name
(tf_keras records the first argument positionally and the rest by keyword).
Imports nothing: the parent checks this before any TensorFlow import.
"""

from __future__ import annotations

import math

TENSOR = object()  # a call argument that is a Keras tensor: its size is unknown here

# Parameter names, in TensorFlow's order, of the operations with a formula.
_PARAMS = {
    "fill": ("dims", "value"),
    "ones": ("shape",),
    "zeros": ("shape",),
    "eye": ("num_rows", "num_columns", "batch_shape"),
    "range": ("start", "limit", "delta"),
    "linspace": ("start", "stop", "num"),
    "one_hot": ("indices", "depth"),
    "tile": ("input", "multiples"),
    "broadcast_to": ("input", "shape"),
    "repeat": ("input", "repeats"),
    "pad": ("tensor", "paddings"),
    "sequence_mask": ("lengths", "maxlen"),
    "bincount": ("arr", "weights", "minlength", "maxlength"),
    "unsorted_segment": ("data", "segment_ids", "num_segments"),
    "scatter_nd": ("indices", "updates", "shape"),
    "diag": ("diagonal",),
    "resize": ("images", "size"),
    "pad_to_bounding_box": (
        "image",
        "offset_height",
        "offset_width",
        "target_height",
        "target_width",
    ),
}


def elements(function: str, calls: list[tuple[list, dict]]) -> int:
    """The most elements one of `calls` (positional and keyword arguments) asks for."""
    key = _key(function)
    largest = 0
    for positional, keywords in calls:
        values = list(positional) + list(keywords.values())
        largest = max(largest, _largest_shape(values))
        if key in _PARAMS:
            named = dict(zip(_PARAMS[key], positional, strict=False))
            named.update(keywords)
            largest = max(largest, _formula(key, named))
    return largest


def _key(function: str) -> str:
    bare = function.removeprefix("compat.v1.")
    for prefix in ("math.", "linalg.", "image.", "nn."):
        bare = bare.removeprefix(prefix)
    return "unsorted_segment" if bare.startswith("unsorted_segment_") else bare


def _formula(key: str, a: dict) -> int:
    if key == "fill":
        return _product(a.get("dims"))
    if key in ("ones", "zeros", "broadcast_to", "scatter_nd"):
        return _product(a.get("shape"))
    if key == "eye":
        rows = _number(a.get("num_rows"))
        columns = _number(a.get("num_columns")) or rows
        return rows * columns * max(1, _product(a.get("batch_shape")))
    if key == "range":
        start, limit, delta = (_real(a.get(k)) for k in ("start", "limit", "delta"))
        if a.get("limit") is None:
            start, limit = 0.0, start
        return int(abs(limit - start) / max(abs(delta) if a.get("delta") is not None else 1, 1e-12))
    if key == "linspace":
        return _number(a.get("num"))
    if key == "one_hot":
        return _size(a.get("indices")) * _number(a.get("depth"))
    if key == "tile":
        return _size(a.get("input")) * _product(a.get("multiples"))
    if key == "repeat":
        return _size(a.get("input")) * max(1, _largest(a.get("repeats")))
    if key == "pad":
        return _padded(a.get("tensor"), a.get("paddings"))
    if key == "sequence_mask":
        return _size(a.get("lengths")) * _number(a.get("maxlen"))
    if key == "bincount":
        return max(_largest(a.get("arr")) + 1, _number(a.get("minlength")))
    if key == "unsorted_segment":
        return _number(a.get("num_segments")) * max(1, _size(a.get("data")))
    if key == "diag":
        return _size(a.get("diagonal")) ** 2
    if key == "resize":
        return _product(a.get("size")) * max(1, _size(a.get("images")))
    if key == "pad_to_bounding_box":
        return _number(a.get("target_height")) * _number(a.get("target_width"))
    return 0


def _numbers(value) -> list[float]:
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out.append(abs(item))
    return out


def _number(value) -> int:
    numbers = _numbers(value) if value is not TENSOR else []
    return int(max(numbers)) if numbers else 0


def _real(value) -> float:
    numbers = _numbers(value) if value is not TENSOR else []
    return float(numbers[0]) if len(numbers) == 1 else 0.0


def _largest(value) -> int:
    return _number(value)


def _product(value) -> int:
    if value is TENSOR or value is None:
        return 0
    numbers = [int(n) for n in _numbers(value)]
    return math.prod(numbers) if numbers else 0


def _size(value) -> int:
    """Elements of a constant (a nested list); 1 for a scalar or a tensor of unknown size."""
    if not isinstance(value, list):
        return 1
    return max(1, len(_numbers(value)))


def _padded(tensor, paddings) -> int:
    if not isinstance(paddings, list):
        return 0
    shape = _shape(tensor)
    total = 1
    for i, pair in enumerate(paddings):
        extra = sum(_numbers(pair))
        total *= int((shape[i] if i < len(shape) else 1) + extra)
    return total


def _shape(value) -> list[int]:
    shape = []
    while isinstance(value, list) and value:
        shape.append(len(value))
        value = value[0]
    return shape


def _largest_shape(values: list) -> int:
    """The largest product of a flat list of at most 8 integers (a shape) among `values`."""
    largest = 0
    for value in values:
        if (
            isinstance(value, list)
            and 0 < len(value) <= 8
            and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        ):
            largest = max(largest, math.prod(abs(n) for n in value))
    return largest
