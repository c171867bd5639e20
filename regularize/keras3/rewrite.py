"""The Keras 3 adapter of the rewrite core: a `GraphView` and a `Builder` over Keras 3 nodes.

The decisions are `regularize.core.walk`'s; this module reads Keras 3 graphs
for it and builds the new model.

Why not `keras.models.clone_model(call_function=...)` alone: it refuses
`call_function` on Sequential models, its `call_function` sees a layer but not
the call node (so it cannot tell a model output or a BatchNormalization
consumer from another call of the same layer), a recursive clone drops a
nested model's own `trainable` flag, and cloning makes new variables. This
builder replays the recorded nodes the way `Functional._run_through_graph`
does (iteratively), reusing every layer object, so the new model shares the
input model's variables and nothing of the input model is changed.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import keras
from keras import tree

# The operation that `x + y` on symbolic tensors records (ConvNeXt's residual adds).
from keras.src.ops.numpy import Add as _AddOp

from regularize import core
from regularize.core import droppath
from regularize.core import owned
from regularize.core import refusals
from regularize.core import replay
from regularize.core.errors import RegularizeWarning
from regularize.core.policy import Policy
from regularize.core.report import Report
from regularize.keras3 import graph
from regularize.keras3 import training

ADD = core.Mode.ADD
STRIP = core.Mode.STRIP

_warned: set[str] = set()
# Keras' graph sort recurses once per node, with a few hundred frames of
# loading code on top: past this many nodes below the process's recursion
# limit (3,000 after importing TensorFlow on some machines, 1,000 on
# others), plain `keras.models.load_model` fails.
_LOAD_FRAMES = 500


def rewrite(
    model: keras.Model,
    policy: Policy,
    *,
    mode: str = ADD,
    build: bool = True,
    report: Report | None = None,
) -> keras.Model | None:
    """Rewrites `model` per `policy`; returns a new model (None if not `build`).

    Args:
        model: A Functional or built Sequential model; it is not changed.
        policy: Where and how much dropout.
        mode: "add" inserts or re-targets dropout, "strip" removes it.
        build: False only plans: the report is filled, nothing is built.
        report: Receives one `Site` per candidate.

    Raises:
        UnsupportedModelError: `model` is subclassed or not built.
    """
    _check_supported(model)
    report = report if report is not None else Report()
    view = _View(model, graph.graph_of(model))
    result = core.walk(view, policy, mode, replay.Layers(_Replay) if build else None)
    for site in result.sites:
        report.add(site)
    for text in result.warnings:
        _warn(report, text)
    new = result.model
    nodes = _count_nodes(new) if new is not None else 0
    if nodes > sys.getrecursionlimit() - _LOAD_FRAMES:
        _warn(
            report,
            f"the new model has {nodes} graph nodes: plain "
            "`keras.models.load_model` recurses once per node and needs "
            "`sys.setrecursionlimit(20000)` first (`regularize.load_model` does this)",
        )
    if new is not None and getattr(model, "compiled", False):
        # A fresh optimizer of the same config: the old one's slots belong to
        # the old model's variable list.
        training.compile_from_config(new, model.get_compile_config())
    return new


def _check_supported(model: object) -> None:
    if not isinstance(model, keras.Model):
        raise refusals.not_a_model(model, "a `keras.Model`")
    if not graph.is_graph_model(model):
        raise refusals.subclassed(type(model).__name__)
    if isinstance(model, keras.Sequential) and graph.graph_of(model) is None:
        raise refusals.unbuilt_sequential(model.name)


def _count_nodes(model: keras.Model) -> int:
    fn = graph.graph_of(model)
    return sum(len(nodes) for nodes in fn._nodes_by_depth.values()) if fn else 0


def _warn(report: Report, text: str) -> None:
    """Records `text` in the report, and warns once per process."""
    if text not in report.warnings:
        report.warnings.append(text)
    if text not in _warned:
        _warned.add(text)
        warnings.warn(text, RegularizeWarning, stacklevel=_caller_level())


# .../regularize/ (this module is regularize/keras3/rewrite.py)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_level() -> int:
    """The `stacklevel` that points a warning at the code that called this package.

    The depth from `_warn` to the public function varies (nested models
    recurse), and Keras frames may sit in between, so the outermost frame
    inside the package is found and its caller named. Python 3.12's
    `skip_file_prefixes` would stop at the first Keras frame instead.
    """
    frame = sys._getframe(1)  # `_warn`'s frame: stacklevel 1 for `warnings.warn`
    level = outermost = 1
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            outermost = level
        frame = frame.f_back
        level += 1
    return outermost + 1


# -- reading --------------------------------------------------------------


class _View:
    """`core.GraphView` over the Functional graph `fn` of `model`; tensors keyed by `id`."""

    def __init__(self, model, fn):
        self.model = model
        self.fn = fn
        self.default_data_format = keras.config.image_data_format()

    def nodes(self) -> list:
        return list(graph.iter_nodes(self.fn))

    def parents(self, node) -> list:
        return node.parent_nodes

    def operation(self, node):
        return node.operation

    def input_keys(self, node) -> list[int]:
        return [id(t) for t in node.input_tensors]

    def output_keys(self, node) -> list[int]:
        return [id(t) for t in node.outputs]

    def graph_outputs(self) -> list[int]:
        return [id(t) for t in self.fn.outputs]  # in the order of a call's outputs

    def out_shape(self, node) -> tuple | None:
        return tuple(node.outputs[0].shape) if node.outputs else None

    def training_flag(self, node):
        return node.arguments.kwargs.get("training")

    def casts_input(self, node) -> bool:
        op = node.operation
        return any(t.dtype != op.compute_dtype for t in node.input_tensors)

    def sub_graph(self, op) -> _View | None:
        fn = graph.graph_of(op)
        return _View(op, fn) if fn is not None else None

    def facts(self, op) -> core.LayerFacts:
        dropout = graph.is_dropout(op)
        nested = graph.is_graph_model(op)
        activation = graph.activation_of(op)
        api = _is_api_layer(op)
        keys = () if dropout or nested or graph.is_recurrent(op) else _owned_keys(op)
        return core.LayerFacts(
            name=op.name,
            class_name=type(op).__name__,
            activation=activation if api else None,
            inner_activation=None if api else activation,
            owned=keys,
            rebuild_refusal=_rebuild_refusal(op) if keys else None,
            starts_tokens=_starts_tokens(op),
            attention_kernel=_attention_kernel(op) if keys else None,
            trainable=bool(getattr(op, "trainable", True)),
            is_graph_model=graph.is_graph_model(op),
            is_dropout=dropout,
            is_own_dropout=graph.is_own_dropout(op),
            is_recurrent=graph.is_recurrent(op),
            is_batchnorm=graph.is_batchnorm(op),
            is_merge=graph.is_merge(op),
            is_activation_layer=graph.is_activation_layer(op),
            is_normalization=graph.is_normalization(op),
            is_add=isinstance(op, (keras.layers.Add, _AddOp)),
            is_own_drop_path=dropout and droppath.is_own_name(op.name),
            rate=getattr(op, "rate", None) if dropout else None,
            noise_shape=_noise_shape(op) if dropout else None,
            data_format=getattr(op, "data_format", None),
        )

    def config(self, op) -> dict:
        return keras.saving.serialize_keras_object(op)

    def layer_config(self, config: dict) -> dict:
        return config["config"]

    def probe(self, config: dict) -> dict:
        try:
            return keras.saving.deserialize_keras_object(copy.deepcopy(config)).get_config()
        except Exception as err:
            # Keras wraps the layer's own error in "could not be deserialized
            # properly ... Exception encountered: <the error>" (twice, even).
            raise ValueError(str(err).rsplit(_ENCOUNTERED, 1)[-1].strip()) from err

    def layer_names(self) -> set[str]:
        return {op.name for op in self.fn.operations}

    def class_names(self) -> set[str]:
        return {type(layer).__name__ for layer in self.model._flatten_layers()}

    def is_layer_class(self, name: str) -> bool:
        return graph.is_layer_class(name)

    def contains_normalization(self) -> bool:
        return graph.contains_normalization(self.model)

    def node_count(self) -> int:
        return _count_nodes(self.model)


# Keras' own attention layers apply their `dropout` to the attention
# probabilities (GroupQueryAttention's class is GroupedQueryAttention).
_ATTENTION_CLASSES = tuple(
    getattr(keras.layers, name)
    for name in ("MultiHeadAttention", "GroupQueryAttention", "Attention", "AdditiveAttention")
    if hasattr(keras.layers, name)
)
_TOKEN_CLASSES = (keras.layers.Embedding, *_ATTENTION_CLASSES)
_ENCOUNTERED = "Exception encountered:"


def _is_api_layer(op) -> bool:
    """Whether `op` is one of Keras' own layers (Dense, Conv2D, ...), not a custom block.

    Only there is a fused `activation` known to be applied to the layer's
    output; a keras-hub TransformerEncoder's `activation` is its inner
    feed-forward layer's.
    """
    return type(op).__module__.startswith("keras.")


def _owned_keys(op) -> tuple:
    if _is_api_layer(op) and not isinstance(op, _ATTENTION_CLASSES):
        # Keras' other layers have no dropout keys (RNN and dropout layers
        # are handled apart): no `get_config()` per layer of a large model.
        return ()
    try:
        config = op.get_config()
    except Exception:  # a custom layer without a config: nothing to rebuild from
        return ()
    return owned.find_keys(config, attention_layer=isinstance(op, _ATTENTION_CLASSES))


def _rebuild_refusal(op) -> str | None:
    """Why `op` would lose state if rebuilt from its config: quantized or LoRA sublayers."""
    for layer in getattr(op, "_flatten_layers", lambda: [op])():
        mode = getattr(layer.dtype_policy, "quantization_mode", None)
        if mode:
            return f"holds {mode}-quantized layers: rebuilt from its config they would be float"
        if getattr(layer, "lora_enabled", False):
            return "holds LoRA-enabled layers: rebuilt from its config they would lose LoRA"
    return None


# Keras 3 attention layers with two kernels (see `LayerFacts.attention_kernel`).
_FUSED_ATTENTION_CLASSES = tuple(
    getattr(keras.layers, name)
    for name in ("MultiHeadAttention", "GroupQueryAttention")
    if hasattr(keras.layers, name)
)


def _attention_kernel(op) -> str | None:
    """ "fused" / "explicit": the kernel of the Keras attention `op` is or holds (None: none)."""
    kernels = {
        "explicit" if getattr(layer, "dropout", 0) else "fused"
        for layer in getattr(op, "_flatten_layers", lambda: [op])()
        if isinstance(layer, _FUSED_ATTENTION_CLASSES)
    }
    if not kernels:
        return None
    return "fused" if "fused" in kernels else "explicit"


def _starts_tokens(op) -> bool:
    """An Embedding or attention layer, or a block (or nested model) holding one."""
    if isinstance(op, _TOKEN_CLASSES):
        return True
    if _is_api_layer(op) and not graph.is_graph_model(op):
        return False  # Dense, Conv2D, ...: no need to look inside
    flatten = getattr(op, "_flatten_layers", None)
    return flatten is not None and any(isinstance(x, _TOKEN_CLASSES) for x in flatten())


# -- building -------------------------------------------------------------


def _float_policy(anchor) -> keras.DTypePolicy:
    """The anchor's dtype policy, or the float one under a quantized policy.

    `model.quantize("int8")` gives each quantized layer a policy such as
    `int8_from_float32` (or `int8_from_mixed_bfloat16`): a layer that takes it
    calls its `_int8_call`, which Dropout does not have. Its output is in the
    source policy's compute dtype, so the source policy keeps inference exact.
    """
    policy = anchor.dtype_policy
    if getattr(policy, "quantization_mode", None) is None:
        return policy
    source = policy.get_config().get("source_name") or policy.compute_dtype
    return keras.DTypePolicy(source)


class _Replay(replay.GraphReplay):
    """Replays a Keras 3 graph (`Functional._run_through_graph`'s way)."""

    def input_tensors(self) -> dict:
        return {id(x): x for x in self.view.fn.inputs}

    def arguments(self, node) -> tuple:
        return node.arguments.fill_in(self.tensors)

    def flatten(self, outputs) -> list:
        return tree.flatten(outputs)

    def make_dropout(self, action, name: str) -> keras.Layer:
        return _make(action, name)

    def make_identity(self, layer) -> keras.Layer:
        return keras.layers.Identity(name=layer.name, dtype=layer.dtype_policy)

    def from_config(self, config: dict) -> keras.Layer:
        return keras.saving.deserialize_keras_object(config)

    def build_model(self) -> keras.Model:
        model, fn = self.view.model, self.view.fn
        if isinstance(model, keras.Sequential):
            first = fn.inputs[0]._keras_history.operation
            return keras.Sequential([first] + self.sequence, name=model.name)
        outputs = [self.tensors[id(x)] for x in fn.outputs]
        outputs = tree.pack_sequence_as(fn._outputs_struct, outputs)
        return keras.Model(inputs=fn._inputs_struct, outputs=outputs, name=model.name)


def _make(action: core.Insert | core.Retarget, name: str) -> keras.Layer:
    """A new dropout layer of the action's kind with the anchor's dtype policy and flag.

    The anchor's policy matters: a float32 Dropout after a mixed_float16 layer
    would cast the activations back to float32 and change inference. With
    `mc`, the layer is the MC twin of `kind` (active at inference too).
    """
    kind, shape, data_format = action.kind, action.shape, action.data_format
    # An operation (`x + y`) has no dtype policy; the new layer then takes the default.
    common = {"rate": action.rate, "name": name}
    if getattr(action.anchor, "dtype_policy", None) is not None:
        common["dtype"] = _float_policy(action.anchor)
    classes = keras.layers
    if action.mc:
        from regularize.keras3 import mc_layers

        classes = mc_layers
        kind = "MC" + kind
    if kind in ("Dropout", "MCDropout") and len(shape) == 3 and data_format == "channels_first":
        # SpatialDropout1D only knows channels_last: drop whole channels of
        # (batch, channels, steps) with a broadcast noise shape instead.
        common["noise_shape"] = (None, shape[1], 1)
    if action.noise_shape is not None:  # a drop path: one draw per sample
        common["noise_shape"] = action.noise_shape
    if "SpatialDropout" in kind and not kind.endswith("SpatialDropout1D"):
        common["data_format"] = data_format
    layer = getattr(classes, kind)(**common)
    # Inside a frozen base the new layer is frozen too, as `base.trainable =
    # False` would have made it (SpatialDropout* take no `trainable` argument).
    layer.trainable = getattr(action.anchor, "trainable", True)
    return layer


def _noise_shape(op) -> tuple | None:
    shape = getattr(op, "noise_shape", None)
    return tuple(shape) if shape is not None else None
