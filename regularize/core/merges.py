"""Residual merges read from a layer graph: which input is the shortcut, where the fork is.

A residual merge is an `Add` of two tensors that share an ancestor: the block's input
(the fork) reaches the merge once through the shortcut and once through the residual
branch; scaled merges (Inception-ResNet's `CustomScaleLayer`, an `Add` after a constant
scale) count too. Drop path (`regularize.core.droppath`) puts its drops on the branches
found here; the gate finder (`regularize.core.gates`) uses the same node index and fork
search. No Keras import: any `GraphView` will do.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

from regularize.core.protocols import GraphView
from regularize.core.protocols import LayerFacts


def layers_text(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


# A merge that scales its second input before adding it: Keras' (and
# tf_keras') Inception-ResNet `CustomScaleLayer`, `inputs[0] + inputs[1] * scale`.
SCALED_MERGE_CLASSES = ("CustomScaleLayer",)
# One tensor in, times a constant: a `Rescaling` layer or the operation `r * 0.2`
# records (Keras 3 `ops.numpy.Multiply` with one tensor input).
CONSTANT_SCALE_CLASSES = ("Multiply", "Rescaling", "TrueDivide", "Divide")


@dataclasses.dataclass(frozen=True, eq=False)
class Merge:
    """One residual merge and which of its inputs is the shortcut.

    Attributes:
        node: The `Add` node.
        branch: Key of the residual branch's tensor; None where ambiguous.
        shortcut: Key of the shortcut's tensor; None where ambiguous.
        fork: Key of the nearest tensor both inputs derive from.
        lengths: Layers from the fork to (branch, shortcut); dropout layers
            count 0, so a rerun sees the same lengths.
        reason: Why no drop path can go there ("" where one can).
        inner: How many other residual merges lie on the branch's paths from
            the fork where those paths also pass through a coarser resolution
            than the merge's: a long skip (FPN's top-down path, a U-Net-style
            `Add` of decoder and encoder), not one block; else 0.
    """

    node: Any
    branch: Hashable | None
    shortcut: Hashable | None
    fork: Hashable
    lengths: tuple[int, int]
    reason: str = ""
    inner: int = 0

    @property
    def identity(self) -> bool:
        return self.shortcut == self.fork


def index_nodes(view, nodes: list, facts: Callable) -> tuple[dict, dict, Callable]:
    """Which node makes each tensor, where it stands in `nodes`, and a path weight that
    does not count dropout layers (shared by the merge and the gate finders)."""
    producer: dict = {}
    position: dict = {}
    for i, node in enumerate(nodes):
        for key in view.output_keys(node):
            producer[key] = node
            position[key] = i

    def weight(node) -> int:
        return 0 if facts(view.operation(node)).is_dropout else 1

    return producer, position, weight


def find_merges(view: GraphView, nodes, facts: Callable[[Any], LayerFacts]) -> list[Merge]:
    """The residual merges among `nodes` (in their order), shortcuts identified.

    An `Add` with other than two distinct input tensors, or whose inputs
    share no ancestor, is no residual merge and is left out.

    Args:
        view: The graph.
        nodes: Its call nodes in topological order (`view.nodes()`).
        facts: The `LayerFacts` of an operation.
    """
    producer, position, weight = index_nodes(view, nodes, facts)

    merges = []
    for node in nodes:
        layer = facts(view.operation(node))
        scaled = is_scaled_merge(layer)
        if not (layer.is_add or scaled):
            continue
        keys = list(view.input_keys(node))
        if len(keys) != 2 or keys[0] == keys[1]:
            continue
        found = nearest_fork(view, keys, producer, position, weight)
        if found is None:
            continue
        fork, lengths = found
        if scaled:
            b = 1  # `inputs[0] + inputs[1] * scale`: the second is the branch
        else:
            b = _scaled_side(view, keys, producer, facts)
        if b is None and lengths[0] == lengths[1]:
            reason = f"ambiguous shortcut: both inputs {layers_text(lengths[0])} from their fork"
            merges.append(Merge(node, None, None, fork, lengths, reason))
            continue
        if b is None:
            b = 0 if lengths[0] > lengths[1] else 1
        inner = _long_skip(view, node, between(view, fork, keys[b], producer, position), facts)
        lengths = (lengths[b], lengths[1 - b])
        merges.append(Merge(node, keys[b], keys[1 - b], fork, lengths, inner=inner))
    return merges


def _long_skip(view: GraphView, merge, path: list, facts) -> int:
    """The residual merges on `path` if it also dips below the merge's resolution, else 0.

    A residual block keeps (or only reduces) the resolution on its branch;
    FPN's top-down path goes down the encoder, through its residual blocks,
    and is upsampled back. NASNet's cell branches pass through the previous
    cell's merges at the same resolution: blocks, kept.
    """
    inner = sum(_is_residual_add(view, n, facts) for n in path)
    if not inner:
        return 0
    size = _spatial(view, view.out_shape(merge))
    if size is None:
        return 0
    for node in path:
        other = _spatial(view, view.out_shape(node))
        if other is not None and len(other) == len(size):
            if any(
                o is not None and m is not None and o < m for o, m in zip(other, size, strict=True)
            ):
                return inner
    return 0


def _spatial(view: GraphView, shape) -> tuple | None:
    """The spatial dimensions of a feature map's shape (rank 3 to 5), else None."""
    if shape is None or not 3 <= len(shape) <= 5:
        return None
    if view.default_data_format == "channels_first":
        return tuple(shape[2:])
    return tuple(shape[1:-1])


def _is_residual_add(view: GraphView, node, facts) -> bool:
    layer = facts(view.operation(node))
    return (layer.is_add or is_scaled_merge(layer)) and len(view.input_keys(node)) == 2


def is_scaled_merge(layer: LayerFacts) -> bool:
    """A layer that adds a scaled branch to its first input (`x + scale * branch`)."""
    return layer.class_name in SCALED_MERGE_CLASSES


def _scaled_side(view: GraphView, keys, producer: dict, facts) -> int | None:
    """The input of an `Add` that a constant scales (the branch of `x + scale * r`), if one.

    A residual block scales its branch, never its shortcut (Inception-ResNet,
    ResNet-RS, LayerScale), so that side is the branch whatever the lengths.
    """
    scaled = []
    for key in keys:
        node = producer.get(key)
        if node is None:
            scaled.append(False)
            continue
        layer = facts(view.operation(node))
        one_input = len(view.input_keys(node)) == 1
        scaled.append(one_input and layer.class_name in CONSTANT_SCALE_CLASSES)
    if scaled[0] == scaled[1]:
        return None
    return 0 if scaled[0] else 1


def nearest_fork(view: GraphView, keys, producer: dict, position: dict, weight):
    """(fork key, (length to keys[0], length to keys[1])), or None if they share no ancestor.

    Sweeps back from both inputs at once, latest tensor first: every tensor
    is reached from all its readers before it is popped, so the first one
    reached from both sides is the nearest common ancestor, and its
    distances are final (shortest paths, dropout layers counting 0).
    """
    dist: tuple[dict, dict] = ({keys[0]: 0}, {keys[1]: 0})
    order = itertools.count()
    heap: list = []
    seen: set = set()

    def push(key) -> None:
        if key not in seen:
            seen.add(key)
            heapq.heappush(heap, (-position.get(key, -1), next(order), key))

    for key in keys:
        push(key)
    while heap:
        key = heapq.heappop(heap)[2]
        if key in dist[0] and key in dist[1]:
            return key, (dist[0][key], dist[1][key])
        node = producer.get(key)
        if node is None:  # a graph input
            continue
        step = weight(node)
        for parent in view.input_keys(node):
            for side in dist:
                if key in side:
                    side[parent] = min(side.get(parent, math.inf), side[key] + step)
            push(parent)
    return None


def between(view, fork, key, producer: dict, position: dict) -> list:
    """The nodes on the paths from the tensor `fork` to the tensor `key` (graph order)."""
    # Ancestors of `key` that come after the fork; then those that read the
    # fork or a tensor such an ancestor made.
    start = position.get(fork, -1)
    seen: set = set()
    stack = [key]
    ancestors = []
    while stack:
        k = stack.pop()
        node = producer.get(k)
        if k == fork or node is None or id(node) in seen or position[k] <= start:
            continue
        seen.add(id(node))
        ancestors.append(node)
        stack.extend(view.input_keys(node))
    ancestors.sort(key=lambda n: position[view.output_keys(n)[0]])
    made = {fork}
    region = []
    for node in ancestors:
        if any(k in made for k in view.input_keys(node)):
            region.append(node)
            made.update(view.output_keys(node))
    return region
