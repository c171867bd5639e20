"""Read-only facts about a Keras layer graph: nodes, consumers, layer kinds.

Nothing here changes a model or builds one.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras

# Keras has no public name for the Functional class; `keras.models.clone_model`
# itself dispatches on it.
from keras.src.models.functional import Functional

from regularize.core import terms

DROPOUT_CLASSES = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D subclass it
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
ACTIVATION_CLASSES = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Softmax,
)
RECURRENT_CLASSES = (keras.layers.RNN, keras.layers.Bidirectional)
# Layers that renormalize activations: the "head" preset starts after the last.
NORMALIZATION_CLASSES = tuple(
    getattr(keras.layers, name)
    for name in (
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
    )
    if hasattr(keras.layers, name)
)
# A residual `Add` or a `Concatenate` closes a block (the "blocks" preset).
MERGE_CLASSES = (keras.layers.Add, keras.layers.Concatenate)

# Re-exported: tests and callers know the suffix as `graph.SUFFIX`.
SUFFIX = terms.SUFFIX


def is_graph_model(layer: object) -> bool:
    """Whether `layer` is a model whose layer graph is recorded."""
    return isinstance(layer, (Functional, keras.Sequential))


def is_dropout(op: object) -> bool:
    return isinstance(op, DROPOUT_CLASSES)


def is_own_dropout(op: object) -> bool:
    """Whether `op` is a dropout layer this tool inserted."""
    return is_dropout(op) and terms.is_own_name(op.name)


def is_recurrent(op: object) -> bool:
    return isinstance(op, RECURRENT_CLASSES)


def is_batchnorm(op: object) -> bool:
    return isinstance(op, keras.layers.BatchNormalization)


def is_merge(op: object) -> bool:
    return isinstance(op, MERGE_CLASSES)


def is_activation_layer(op: object) -> bool:
    """Whether `op` is a standalone activation layer (ReLU, Activation, ...)."""
    return isinstance(op, ACTIVATION_CLASSES)


def is_normalization(op: object) -> bool:
    """Whether `op` is, or (a nested model) contains, a normalization layer."""
    if is_graph_model(op):
        return contains_normalization(op)
    return isinstance(op, NORMALIZATION_CLASSES)


def contains_normalization(model: keras.Model) -> bool:
    return any(
        isinstance(layer, NORMALIZATION_CLASSES)
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )


def activation_of(op: object) -> str | None:
    """Name of the non-linearity `op` ends with, or None if it has none.

    Covers standalone activation layers and layers with a fused `activation=`
    (Dense, Conv*, SeparableConv*, DepthwiseConv*, Conv*Transpose, ...).
    Recurrent layers are not activation sites: they get their own dropout.
    """
    if is_graph_model(op) or is_recurrent(op) or is_dropout(op):
        return None
    if isinstance(op, ACTIVATION_CLASSES) and not isinstance(op, keras.layers.Activation):
        return type(op).__name__.lower()
    fn = getattr(op, "activation", None)
    if not callable(fn) or fn is keras.activations.linear:
        return None
    name = getattr(fn, "__name__", type(fn).__name__)
    return None if name == "linear" else name


def graph_of(model: keras.Model) -> Functional:
    """The Functional graph behind a Functional or a built Sequential model."""
    if isinstance(model, keras.Sequential):
        return model._functional
    return model


def iter_nodes(graph: Functional) -> Iterator:
    """Yields the graph's call nodes from inputs to outputs.

    Iterates `_nodes_by_depth` like Keras' own `_run_through_graph` (which is
    not recursive, so 2,000-layer chains are fine).
    """
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                yield node


def consumers(graph: Functional) -> dict[int, list]:
    """Maps `id(tensor)` to the operations of `graph` that read it."""
    readers: dict[int, list] = {}
    for node in iter_nodes(graph):
        for tensor in node.input_tensors:
            readers.setdefault(id(tensor), []).append(node.operation)
    return readers


def is_layer_class(name: str) -> bool:
    """Whether `name` is a Keras layer class or a registered custom layer."""
    cls = getattr(keras.layers, name, None)
    if cls is None:
        cls = keras.saving.get_registered_object(name)
    return isinstance(cls, type) and issubclass(cls, keras.layers.Layer)
