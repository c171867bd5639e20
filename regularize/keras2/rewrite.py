"""The tf_keras adapter of the rewrite core: a `GraphView` and a `Builder` over tf_keras nodes.

The decisions are `regularize.core.walk`'s, the same as for Keras 3 models
(`regularize.keras3.rewrite`); this module reads tf_keras graphs for it and builds
the new model.

How: the recorded nodes are replayed the way tf_keras'
`Functional._run_internal_graph` does, calling the *same* layer objects on
new symbolic tensors, so weights, pruning masks, thresholds and
`pruning_step` variables are the input's own. tfmot wrappers
(`PruneLowMagnitude`, `QuantizeWrapperV2`, ...) are looked through to find a
layer's activation, and dropout goes after the wrapper, between wrapped
layers: `UpdatePruningStep` and `strip_pruning` find their wrappers as
before, and a quantization-aware model keeps its quantizers.

Runs only in the engine's child process (TF_USE_LEGACY_KERAS=1).
"""

from __future__ import annotations

import copy

import tensorflow as tf
import tf_keras

from regularize import core
from regularize.core import droppath
from regularize.core import owned
from regularize.core import refusals
from regularize.core import replay
from regularize.core import terms
from regularize.core.policy import Policy
from regularize.keras2 import TFMOT_CLASSES

L = tf_keras.layers
ADD = core.Mode.ADD
STRIP = core.Mode.STRIP
PLAN = "plan"

DROPOUT_CLASSES = (L.Dropout, L.GaussianDropout, L.AlphaDropout)  # Spatial* subclass Dropout
ACTIVATION_CLASSES = (L.ReLU, L.LeakyReLU, L.ELU, L.PReLU, L.Softmax, L.ThresholdedReLU)
RECURRENT_CLASSES = (L.RNN, L.Bidirectional)
NORMALIZATION_CLASSES = (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization)
MERGE_CLASSES = (L.Add, L.Concatenate)
_ADD_SYMBOLS = ("__operators__.add", "math.add")
# Attention layers apply their `dropout` to the attention probabilities.
ATTENTION_CLASSES = (L.MultiHeadAttention, L.Attention, L.AdditiveAttention)
TOKEN_CLASSES = (L.Embedding, *ATTENTION_CLASSES)


# -- facts about layers ---------------------------------------------------


def class_name(layer) -> str:
    """The class name of `layer` (the wrapper's, for a wrapped layer)."""
    return type(layer).__name__


def unwrap(layer):
    """The layer inside tfmot wrappers (themselves `Wrapper`s with `.layer`)."""
    while class_name(layer) in TFMOT_CLASSES and hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def is_graph_model(layer) -> bool:
    return isinstance(layer, tf_keras.Model) and bool(getattr(layer, "_is_graph_network", False))


def is_dropout(layer) -> bool:
    return isinstance(unwrap(layer), DROPOUT_CLASSES)


def is_own_dropout(layer) -> bool:
    return isinstance(layer, DROPOUT_CLASSES) and terms.is_own_name(layer.name)


def is_recurrent(layer) -> bool:
    return isinstance(unwrap(layer), RECURRENT_CLASSES)


def is_batchnorm(layer) -> bool:
    return isinstance(unwrap(layer), L.BatchNormalization)


def is_add(layer) -> bool:
    """An `Add` layer, or `x + y` / `tf.add` recorded as a TFOpLambda (a residual merge)."""
    inner = unwrap(layer)
    if isinstance(inner, L.Add):
        return True
    return class_name(inner) == "TFOpLambda" and getattr(inner, "symbol", None) in _ADD_SYMBOLS


def is_activation_layer(layer) -> bool:
    return isinstance(unwrap(layer), ACTIVATION_CLASSES + (L.Activation,))


def is_merge(layer) -> bool:
    return isinstance(unwrap(layer), MERGE_CLASSES)


def has_normalization(layer) -> bool:
    inner = unwrap(layer)
    if is_graph_model(inner):
        return any(has_normalization(x) for x in inner.layers)
    return isinstance(inner, NORMALIZATION_CLASSES)


def activation_of(layer) -> str | None:
    """Name of the non-linearity `layer` (or the layer it wraps) ends with."""
    inner = unwrap(layer)
    if is_graph_model(inner) or is_recurrent(inner) or is_dropout(inner):
        return None
    if isinstance(inner, ACTIVATION_CLASSES):
        return class_name(inner).lower()
    fn = getattr(inner, "activation", None)
    # QAT swaps `activation` for a QuantizeAwareActivation around the original.
    fn = getattr(fn, "activation", fn)
    if not callable(fn):
        return None
    name = getattr(fn, "__name__", class_name(fn))
    return None if name in ("linear", "NoOpActivation") else name


def _noise_shape(layer) -> tuple | None:
    shape = getattr(layer, "noise_shape", None)
    return tuple(shape) if shape is not None else None


def is_api_layer(layer) -> bool:
    """Whether `layer` (or the layer it wraps) is one of tf_keras' own, not a custom block.

    Only there is a fused `activation` known to be applied to the output.
    """
    return type(unwrap(layer)).__module__.startswith(("tf_keras.", "keras."))


def owned_keys(layer) -> tuple:
    inner = unwrap(layer)
    if is_graph_model(inner) or is_dropout(inner) or is_recurrent(inner):
        return ()
    if is_api_layer(inner) and not isinstance(inner, ATTENTION_CLASSES):
        return ()  # tf_keras' other layers have no dropout keys
    try:
        config = inner.get_config()
    except Exception:  # a custom layer without a config: nothing to rebuild from
        return ()
    return owned.find_keys(config, attention_layer=isinstance(inner, ATTENTION_CLASSES))


def starts_tokens(layer) -> bool:
    """An Embedding or attention layer, or a block (or nested model) holding one."""
    inner = unwrap(layer)
    if isinstance(inner, TOKEN_CLASSES):
        return True
    if is_api_layer(inner) and not is_graph_model(inner):
        return False
    flatten = getattr(inner, "_flatten_layers", None)
    return flatten is not None and any(isinstance(x, TOKEN_CLASSES) for x in flatten())


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf_keras.Model):
            yield from all_layers(layer)


def make_dropout(
    kind: str, rate: float, name: str, anchor, shape, data_format: str, noise_shape=None
):
    """A new dropout layer with the anchor's dtype policy and trainable flag.

    `noise_shape` (a drop path's `(None, 1, ..., 1)`) makes a plain `Dropout`.
    """
    common = {"rate": rate, "name": name, "dtype": anchor.dtype_policy}
    if noise_shape is not None:
        layer = L.Dropout(noise_shape=noise_shape, **common)
    elif kind == "Dropout" and len(shape) == 3 and data_format == "channels_first":
        layer = L.Dropout(noise_shape=(None, shape[1], 1), **common)
    else:
        if kind.startswith("SpatialDropout") and kind != "SpatialDropout1D":
            common["data_format"] = data_format
        layer = getattr(L, kind)(**common)
    layer.trainable = anchor.trainable
    return layer


# -- the rewrite ----------------------------------------------------------


def rewrite(
    model: tf_keras.Model, policy: Policy, *, mode: str = ADD, build: bool = True
) -> core.Result:
    """Rewrites `model` per `policy`; `result.model` is the new model (None if not `build`).

    Raises:
        UnsupportedModelError: `model` is subclassed.
    """
    if not isinstance(model, tf_keras.Model):
        raise refusals.not_a_model(model, "a `tf_keras.Model`")
    if not is_graph_model(model):
        raise refusals.subclassed(class_name(model))
    result = core.walk(_View(model), policy, mode, replay.Layers(_Replay) if build else None)
    new = result.model
    if new is not None and getattr(model, "_is_compiled", False) and model.optimizer is not None:
        _compile_like(new, model)
    return result


def _compile_like(new, old) -> None:
    """Compiles `new` like `old`, with a fresh optimizer of the same config.

    The old optimizer's slots belong to the old variable list (rebuilt RNN
    layers have new variables); the Keras 3 adapter does the same. Pruning
    keeps its own step (`pruning_step` in each wrapper), not the optimizer's.
    """
    args = old._get_compile_args()
    optimizer = args["optimizer"]
    args["optimizer"] = type(optimizer).from_config(optimizer.get_config())
    new.compile(**args)


def is_layer_class(name: str) -> bool:
    """Whether `name` is a tf_keras layer class or a registered custom layer."""
    cls = getattr(L, name, None)
    if cls is None:
        cls = tf_keras.saving.get_registered_object(name)
    return isinstance(cls, type) and issubclass(cls, L.Layer)


# -- reading --------------------------------------------------------------


class _View:
    """`core.GraphView` over a tf_keras graph model.

    Tensors are keyed by `str(id(tensor))`, as tf_keras' own node bookkeeping
    (`node.flat_output_ids`) keys them.
    """

    def __init__(self, model):
        self.model = model
        self.default_data_format = tf_keras.backend.image_data_format()

    def nodes(self) -> list:
        """The call nodes from inputs to outputs (as `_run_internal_graph`)."""
        by_depth = self.model._nodes_by_depth
        return [
            node
            for depth in sorted(by_depth, reverse=True)
            for node in by_depth[depth]
            if not node.is_input
        ]

    def parents(self, node) -> list:
        return node.parent_nodes

    def operation(self, node):
        return node.layer

    def input_keys(self, node) -> list[str]:
        return [str(id(kt)) for kt in node.keras_inputs]

    def output_keys(self, node) -> list[str]:
        return node.flat_output_ids

    def graph_outputs(self) -> list[str]:
        return [str(id(t)) for t in self.model.outputs]  # in the order of a call's outputs

    def out_shape(self, node) -> tuple | None:
        flat = tf.nest.flatten(node.outputs)
        return tuple(flat[0].shape) if flat else None

    def training_flag(self, node):
        return node.call_kwargs.get("training")

    def casts_input(self, node) -> bool:
        dtype = tf.as_dtype(node.layer.compute_dtype)
        return any(t.dtype != dtype for t in node.keras_inputs)

    def sub_graph(self, op) -> _View:
        return _View(op)

    def facts(self, op) -> core.LayerFacts:
        inner = unwrap(op)
        dropout = is_dropout(op)
        activation = activation_of(op)
        api = is_api_layer(op)
        return core.LayerFacts(
            name=op.name,
            # The wrapped class, so that a rule `class = "Dense"` matches a
            # pruned or quantized Dense too; the report shows the wrapper.
            class_name=class_name(inner),
            wrapper=class_name(op) if inner is not op else None,
            activation=activation if api else None,
            inner_activation=None if api else activation,
            owned=owned_keys(op),
            starts_tokens=starts_tokens(op),
            trainable=bool(op.trainable),
            is_graph_model=is_graph_model(op),
            is_dropout=dropout,
            is_own_dropout=is_own_dropout(op),
            is_recurrent=is_recurrent(op),
            is_batchnorm=is_batchnorm(op),
            is_merge=is_merge(op),
            is_activation_layer=is_activation_layer(op),
            is_normalization=has_normalization(op),
            is_add=is_add(op),
            is_own_drop_path=dropout and droppath.is_own_name(op.name),
            rate=float(inner.rate) if dropout else None,
            noise_shape=_noise_shape(inner) if dropout else None,
            data_format=getattr(inner, "data_format", None),
        )

    def config(self, op) -> dict:
        return L.serialize(unwrap(op))

    def layer_config(self, config: dict) -> dict:
        return config["config"]

    def probe(self, config: dict) -> dict:
        return L.deserialize(copy.deepcopy(config)).get_config()

    def layer_names(self) -> set[str]:
        return {layer.name for layer in self.model.layers}

    def class_names(self) -> set[str]:
        classes = set()
        for layer in all_layers(self.model):
            classes.update((class_name(layer), class_name(unwrap(layer))))
        return classes

    def is_layer_class(self, name: str) -> bool:
        return is_layer_class(name)

    def contains_normalization(self) -> bool:
        return any(has_normalization(layer) for layer in self.model.layers)

    def node_count(self) -> int:
        return sum(len(nodes) for nodes in self.model._nodes_by_depth.values())


# -- building -------------------------------------------------------------


class _Lookup:
    """`node.map_arguments` pops tensors from lists; this hands out one each time."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __getitem__(self, key):
        return [self.tensors[key]]


class _Replay(replay.GraphReplay):
    """Replays a tf_keras graph (`Functional._run_internal_graph`'s way)."""

    def input_tensors(self) -> dict:
        return {str(id(t)): t for t in self.view.model.inputs}

    def arguments(self, node) -> tuple:
        return node.map_arguments(_Lookup(self.tensors))

    def flatten(self, outputs) -> list:
        return tf.nest.flatten(outputs)

    def make_dropout(self, action, name: str):
        anchor, shape = action.anchor, action.shape
        fmt, noise = action.data_format, action.noise_shape
        return make_dropout(action.kind, action.rate, name, anchor, shape, fmt, noise)

    def make_identity(self, layer):
        # By name: Identity's config is the one its `__init__` saw, and a
        # policy object would not serialize.
        return L.Identity(name=layer.name, dtype=layer.dtype_policy.name)

    def from_config(self, config: dict):
        return L.deserialize(config)

    def build_model(self):
        model = self.view.model
        if isinstance(model, tf_keras.Sequential):
            input_layer = model.inputs[0]._keras_history.layer
            return tf_keras.Sequential([input_layer, *self.sequence], name=model.name)
        outputs = [self.tensors[str(id(t))] for t in model.outputs]
        outputs = tf.nest.pack_sequence_as(model._nested_outputs, outputs)
        return tf_keras.Model(inputs=model._nested_inputs, outputs=outputs, name=model.name)
