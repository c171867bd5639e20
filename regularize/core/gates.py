"""Gates: branches whose output scales another tensor through a `Multiply`.

A squeeze-excitation block (EfficientNet, EfficientNetV2, MobileNetV3,
SE-ResNet) pools a feature map to one value per channel, passes it through a
small bottleneck and a sigmoid (or a hard sigmoid), and multiplies the map by
the result. That tensor is a per-channel *scale*: dropout on it zeros whole
channel gates and scales the others past 1 in training, which no published
recipe does (EfficientNet regularizes with drop-connect on the residual
branch and dropout before its classifier). A GLU-style gate
(`x * sigmoid(dense(x))`) is the same thing without the pooling. So no
activation on such a branch is a dropout site by default; a policy rule that
names the layer still puts dropout there (`Policy.decide`).

A gate is found from the graph alone, never from layer names: a `Multiply`
of two tensors that share an ancestor (the fork), one of which (the gate
side) is

- smaller than the other on a non-batch axis where it has size 1 (it
  broadcasts: a per-channel scale), or
- reached from the fork through a global pooling layer, or
- the output of a sigmoid or hard sigmoid (through constant scales and
  shifts at most).

The gate's layers are the ones on the paths from the fork to the gate side;
the fork itself carries the feature map and stays a site.

No Keras import here: the walk calls this module over any `GraphView`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from regularize.core import merges
from regularize.core.protocols import GraphView
from regularize.core.protocols import LayerFacts

SQUEEZE_EXCITATION = "inside a squeeze-excitation gate"
GATE = "inside a gate (a branch that scales another tensor)"

# The class names of a product of tensors: Keras' `Multiply` layer and the
# operation `x * y` records in Keras 3 (`keras.src.ops.numpy.Multiply`).
MULTIPLY_CLASSES = frozenset({"Multiply"})
# Bounded squashing functions: their output is a scale in [0, 1].
SQUASHING = frozenset({"sigmoid", "hard_sigmoid"})
# Layers that pass a gate through with a constant scale, shift or new shape
# (MobileNetV3's hard sigmoid is `ReLU(6)(x + 3) * (1 / 6)`): one tensor in.
_PASS_THROUGH = frozenset(
    {"Multiply", "Add", "Subtract", "TrueDivide", "Divide", "Rescaling", "Reshape"}
)
_MAX_PASS_THROUGH = 4


def is_global_pooling(class_name: str) -> bool:
    """`GlobalAveragePooling2D`, `GlobalMaxPooling1D`, ...: one value per channel."""
    return class_name.startswith("Global") and "Pooling" in class_name


def find_gate_layers(view: GraphView, nodes, facts: Callable[[Any], LayerFacts]) -> dict[int, str]:
    """Maps `id(node)` of every node inside a gate to the reason it is no site.

    Args:
        view: The graph.
        nodes: Its call nodes in topological order (`view.nodes()`).
        facts: The `LayerFacts` of an operation.

    Returns:
        `{id(node): SQUEEZE_EXCITATION or GATE}`; empty for a graph without gates.
    """
    producer, position, weight = merges.index_nodes(view, nodes, facts)

    inside: dict[int, str] = {}
    for node in nodes:
        if facts(view.operation(node)).class_name not in MULTIPLY_CLASSES:
            continue
        keys = list(view.input_keys(node))
        if len(keys) != 2 or keys[0] == keys[1] or not all(k in producer for k in keys):
            continue  # a constant scale, a square, or a graph input
        found = merges.nearest_fork(view, keys, producer, position, weight)
        if found is None:
            continue
        fork = found[0]
        shapes = [view.out_shape(producer[k]) for k in keys]
        for side in (0, 1):
            key = keys[side]
            if key == fork:
                continue  # the feature map itself
            region = merges.between(view, fork, key, producer, position)
            reason = _gate_reason(
                view, producer[key], shapes[side], shapes[1 - side], region, facts
            )
            if reason is None:
                continue
            for member in region:
                inside.setdefault(id(member), reason)
    return inside


def _gate_reason(view, end, shape, other_shape, region, facts) -> str | None:
    """SQUEEZE_EXCITATION, GATE, or None where the side ending at `end` is no gate.

    Squeeze-excitation where the side pools (the "squeeze"); a gate without
    pooling (GLU, a highway gate, a spatial attention mask) otherwise.
    """
    if any(is_global_pooling(facts(view.operation(n)).class_name) for n in region):
        return SQUEEZE_EXCITATION
    if _broadcasts(shape, other_shape) or _squashes(view, end, facts):
        return GATE
    return None


def _broadcasts(shape, other) -> bool:
    """Whether `shape` is a per-channel (or per-position) scale of `other`."""
    if shape is None or other is None or len(shape) != len(other) or len(shape) < 3:
        return False
    smaller = False
    for mine, theirs in zip(shape[1:], other[1:], strict=True):
        if mine == theirs:
            continue
        if mine != 1:
            return False
        smaller = True
    return smaller


def _squashes(view, node, facts) -> bool:
    """Whether `node` ends in a sigmoid, past constant scales, shifts and dropout layers
    (the dropout an earlier release put after the sigmoid, which a rerun removes)."""
    for _ in range(_MAX_PASS_THROUGH + 1):
        layer = facts(view.operation(node))
        if layer.activation in SQUASHING:
            return True
        parents = view.parents(node)
        passes = layer.is_dropout or layer.class_name in _PASS_THROUGH
        if not passes or len(view.input_keys(node)) != 1:
            return False
        if len(parents) != 1:
            return False
        node = parents[0]
    return False
