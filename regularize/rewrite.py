"""The engine: walks a model's layer graph once, decides each site, builds.

Why not `keras.models.clone_model(call_function=...)` alone: it refuses
`call_function` on Sequential models, its `call_function` sees a layer but not
the call node (so it cannot tell a model output or a BatchNormalization
consumer from another call of the same layer), a recursive clone drops a
nested model's own `trainable` flag, and cloning makes new variables. This
engine replays the recorded nodes the way `Functional._run_through_graph`
does (iteratively), reusing every layer object, so the new model shares the
input model's variables and nothing of the input model is changed.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
from keras import tree

from regularize import graph
from regularize import training
from regularize.errors import RegularizeWarning
from regularize.errors import UnsupportedModelError
from regularize.policy import Policy
from regularize.report import INSERT
from regularize.report import KEEP
from regularize.report import REMOVE
from regularize.report import SKIP
from regularize.report import UPDATE
from regularize.report import Report
from regularize.report import Site

ADD = "add"
STRIP = "strip"

_INFERENCE_ONLY = "nested model always called with training=False: dropout would never fire"
_warned: set[str] = set()
# Keras' graph sort recurses once per node; TensorFlow leaves Python's
# recursion limit at 3,000, and a few frames sit on top of each level.
_PLAIN_LOAD_NODES = 2500


@dataclasses.dataclass
class _Run:
    """State of one rewrite, shared by the nested models it visits."""

    policy: Policy
    mode: str
    build: bool
    report: Report
    models: dict = dataclasses.field(default_factory=dict)  # id(old) -> new
    layers: dict = dataclasses.field(default_factory=dict)  # id(old) -> new or None


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
    run = _Run(policy=policy, mode=mode, build=build, report=report or Report())
    # `keras.Model(inputs, outputs)` sorts the graph with a recursive search
    # (keras/src/ops/function.py: _build_map_helper), one frame per node on the
    # longest path; dropout after every activation of a 2,000-layer chain
    # doubles that path past Python's default limit.
    with graph.recursion_limit(4 * _count_nodes(model) + 1000):
        new = _rewrite_model(model, run, prefix="", inert=None, top=True)
    nodes = _count_nodes(new) if new is not None else 0
    if nodes > _PLAIN_LOAD_NODES:
        _warn(
            run.report,
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
        raise UnsupportedModelError(
            "Expected a `keras.Model` (Functional or Sequential). "
            f"Received: model of type {type(model).__name__!r}"
        )
    if not graph.is_graph_model(model):
        raise UnsupportedModelError(
            f"Cannot rewrite subclassed model {type(model).__name__!r}: its layer "
            "graph is not recorded. Rebuild it as a Functional or Sequential model "
            "(or wrap its layers in one) and run again."
        )
    if isinstance(model, keras.Sequential) and graph.graph_of(model) is None:
        raise UnsupportedModelError(
            f"Cannot rewrite Sequential model {model.name!r}: it is not built, so its "
            "tensor shapes are unknown. Give it an `Input(shape=...)` or call "
            "`model.build(input_shape)` first."
        )


def _count_nodes(model: keras.Model) -> int:
    fn = graph.graph_of(model)
    return sum(len(nodes) for nodes in fn._nodes_by_depth.values()) if fn else 0


def _rewrite_model(model, run: _Run, prefix: str, inert: str | None, top: bool = False):
    """Rewrites one (possibly nested) model; returns it unchanged if nothing changed."""
    fn = graph.graph_of(model)
    if fn is None:  # an unbuilt nested Sequential: nothing is known inside
        return model
    walk = _Walk(fn, run, prefix, inert)
    walk.run()
    if not run.build:
        return None
    if not walk.changed and not top:
        return model
    if isinstance(model, keras.Sequential):
        new = keras.Sequential(
            [fn.inputs[0]._keras_history.operation] + walk.sequence, name=model.name
        )
    else:
        outputs = tree.pack_sequence_as(fn._outputs_struct, walk.outputs())
        new = keras.Model(inputs=fn._inputs_struct, outputs=outputs, name=model.name)
    # Set the flag itself: the `trainable` setter would recurse into the
    # shared layers and their variables, which already carry their own flags
    # (a frozen base may hold layers unfrozen one by one).
    new._trainable = model._trainable
    return new


class _Walk:
    """One pass over one graph: decides each node and, if building, replays it."""

    def __init__(self, fn, run: _Run, prefix: str, inert: str | None):
        self.fn = fn
        self.ctx = run
        self.prefix = prefix
        self.inert = inert
        self.readers = graph.consumers(fn)
        self.outputs_ids = {id(t) for t in fn.outputs}
        self.names = {op.name for op in fn.operations}
        self.tensors = {id(x): x for x in fn.inputs}
        self.sequence: list = []  # layers in call order, for Sequential
        self.changed = False
        self.calls: dict[int, list] = {}
        for node in graph.iter_nodes(fn):
            self.calls.setdefault(id(node.operation), []).append(node)

    def run(self) -> None:
        for node in graph.iter_nodes(self.fn):
            op = node.operation
            if graph.is_graph_model(op):
                outputs = self._nested(node)
            elif graph.is_dropout(op):
                outputs = self._dropout(node)
            elif graph.is_recurrent(op):
                outputs = self._recurrent(node)
            else:
                outputs = self._call(op, node)
                if graph.activation_of(op) and self.ctx.mode == ADD:
                    outputs = self._activation(node, outputs)
            if self.ctx.build:
                for old, new in zip(node.outputs, tree.flatten(outputs), strict=True):
                    self.tensors[id(old)] = new

    def outputs(self) -> list:
        return [self.tensors[id(x)] for x in self.fn.outputs]

    # -- replaying --------------------------------------------------------

    def _call(self, op, node):
        """Calls `op` (or its replacement) as `node` called the original."""
        if not self.ctx.build:
            return None
        args, kwargs = node.arguments.fill_in(self.tensors)
        self.sequence.append(op)
        return op(*args, **kwargs)

    def _site(self, node, op, kind, rate, action, reason) -> None:
        shape = node.outputs[0].shape if node.outputs else ()
        self.ctx.report.add(
            Site(
                layer=self.prefix + op.name,
                layer_class=type(op).__name__,
                kind=kind,
                rate=rate,
                action=action,
                reason=reason,
                shape=str(tuple(shape)),
            )
        )
        if action in (INSERT, UPDATE, REMOVE):
            self.changed = True

    # -- nested models ----------------------------------------------------

    def _nested(self, node):
        op = node.operation
        run = self.ctx
        inert = self.inert
        if inert is None and run.mode == ADD and run.policy.skip_inference_only:
            calls = self.calls[id(op)]
            if all(n.arguments.kwargs.get("training") is False for n in calls):
                inert = _INFERENCE_ONLY
        if id(op) not in run.models:
            new = _rewrite_model(op, run, f"{self.prefix}{op.name}/", inert)
            run.models[id(op)] = new
        new = run.models[id(op)]
        if new is not op and run.build:
            self.changed = True
        return self._call(new if run.build else op, node)

    # -- activation sites -------------------------------------------------

    def _activation(self, node, outputs):
        op = node.operation
        run = self.ctx
        if len(node.outputs) != 1:
            return outputs
        tensor = node.outputs[0]
        rate = run.policy.rate
        fmt = graph.data_format_near(node)
        kind = graph.dropout_kind(len(tensor.shape), fmt)
        readers = self.readers.get(id(tensor), [])
        dropouts = [r for r in readers if graph.is_dropout(r)]

        def skip(reason, action=SKIP):
            self._site(node, op, kind, None, action, reason)
            return outputs

        if self.inert:
            return skip(self.inert)
        if id(tensor) in self.outputs_ids:
            return skip("model output")
        if dropouts:
            for layer in dropouts:
                if graph.is_own_dropout(layer):
                    self._retarget(node, layer, kind, fmt)
                else:
                    skip(f"already followed by {type(layer).__name__}", KEEP)
            return outputs
        if any(graph.is_batchnorm(r) for r in readers):
            return skip("feeds BatchNormalization")
        if not readers:
            return skip("output not used")
        if rate == 0:
            return skip("rate is 0")
        self._site(node, op, kind, rate, INSERT, f"after {graph.activation_of(op)}")
        if not run.build:
            return outputs
        if id(op) not in run.layers:
            name = graph.unique_name(op.name + graph.SUFFIX, self.names)
            self.names.add(name)
            run.layers[id(op)] = graph.make_dropout(kind, rate, name, op, tensor.shape, fmt)
        dropout = run.layers[id(op)]
        self.sequence.append(dropout)
        return dropout(outputs)

    def _retarget(self, node, layer, kind, fmt) -> None:
        """Decides what becomes of the tool's own dropout after `node`."""
        op = node.operation
        run = self.ctx
        rate = run.policy.rate
        tensor = node.outputs[0]
        old_kind = type(layer).__name__
        if self.inert or rate == 0:
            reason = self.inert or "rate is 0"
            self._site(node, op, old_kind, layer.rate, REMOVE, reason)
            run.layers[id(layer)] = None
        elif rate == layer.rate and old_kind == kind:
            self._site(node, op, kind, rate, KEEP, "inserted earlier, same rate")
            run.layers[id(layer)] = layer
        else:
            reason = f"rate {layer.rate:g} -> {rate:g}"
            self._site(node, op, kind, rate, UPDATE, reason)
            if run.build:
                run.layers[id(layer)] = graph.make_dropout(
                    kind, rate, layer.name, op, tensor.shape, fmt
                )

    # -- existing dropout layers ------------------------------------------

    def _dropout(self, node):
        op = node.operation
        run = self.ctx
        if run.mode == STRIP:
            if id(node.outputs[0]) in self.outputs_ids:
                self._site(node, op, type(op).__name__, op.rate, KEEP, "model output")
                return self._call(op, node)
            rate = getattr(op, "rate", None)
            self._site(node, op, type(op).__name__, rate, REMOVE, "strip dropout")
            return self._passthrough(node)
        if id(op) not in run.layers:  # a user's dropout: left as it is
            return self._call(op, node)
        new = run.layers[id(op)]
        if new is None:
            self.changed = True
            return self._passthrough(node)
        if new is not op:
            self.changed = True
        return self._call(new, node)

    def _passthrough(self, node):
        if not self.ctx.build:
            return None
        args, _ = node.arguments.fill_in(self.tensors)
        return args[0]

    # -- recurrent layers -------------------------------------------------

    def _recurrent(self, node):
        op = node.operation
        run = self.ctx
        config = keras.saving.serialize_keras_object(op)
        settings = list(_dropout_settings(config))
        if not settings:
            self._site(node, op, "recurrent", None, SKIP, "cell has no dropout setting")
            return self._call(op, node)
        if run.mode == STRIP:
            target = (0.0, 0.0)
        else:
            rec = run.policy.recurrent_rate
            target = (run.policy.rate, rec)
        old = (settings[0]["dropout"], settings[0]["recurrent_dropout"])
        new_values = (target[0], old[1] if target[1] is None else target[1])
        reason = _describe_change(old, new_values)
        if self.inert:
            self._site(node, op, "recurrent", None, SKIP, self.inert)
            return self._call(op, node)
        if all((s["dropout"], s["recurrent_dropout"]) == new_values for s in settings):
            action, reason = (SKIP, "rate is 0") if new_values == (0.0, 0.0) else (KEEP, reason)
            self._site(node, op, "recurrent", new_values[0] or None, action, reason)
            return self._call(op, node)
        if run.mode == STRIP:
            action = REMOVE
        else:
            action = INSERT if old == (0.0, 0.0) else UPDATE
        self._site(node, op, "recurrent", new_values[0], action, reason)
        if new_values[1] > 0 and run.mode == ADD:
            _warn_recurrent(run.report, config)
        if not run.build:
            return None
        fresh = id(op) not in run.layers
        if fresh:
            # Rebuilt from config, not patched in place: LSTMCell picks its
            # kernel (implementation 1 or 2) in __init__ from recurrent_dropout.
            for s in settings:
                s["dropout"], s["recurrent_dropout"] = new_values
            run.layers[id(op)] = keras.saving.deserialize_keras_object(config)
        new = run.layers[id(op)]
        outputs = self._call(new, node)  # builds `new` on its first call
        if fresh:
            _copy_weights(op, new)
        return outputs


def _dropout_settings(config):
    """Yields every nested config dict that has RNN dropout settings.

    Covers LSTM/GRU/SimpleRNN/ConvLSTM*, `RNN(cell)`, `StackedRNNCells` and
    both directions of `Bidirectional`, whatever the nesting.
    """
    if isinstance(config, dict):
        if "dropout" in config and "recurrent_dropout" in config:
            yield config
        for value in config.values():
            yield from _dropout_settings(value)
    elif isinstance(config, list):
        for value in config:
            yield from _dropout_settings(value)


def _describe_change(old, new) -> str:
    parts = []
    for name, a, b in zip(("dropout", "recurrent_dropout"), old, new, strict=True):
        parts.append(f"{name}={b:g}" if a == b else f"{name} {a:g} -> {b:g}")
    return ", ".join(parts)


def _copy_weights(old, new) -> None:
    """Carries the weights over exactly; the configs are equal but for dropout."""
    values = old.get_weights()
    if [w.shape for w in new.get_weights()] != [w.shape for w in values]:
        raise UnsupportedModelError(
            f"Cannot carry the weights of {old.name!r} over to its rebuilt copy: "
            "the weight lists differ. Expected the same shapes. "
            f"Received: {[w.shape for w in values]} vs "
            f"{[w.shape for w in new.get_weights()]}"
        )
    new.set_weights(values)


_CUDNN = (
    "recurrent dropout disables the cuDNN kernel on GPU: training and inference "
    "run the slower generic loop"
)
_LSTM_KERNEL = (
    "recurrent dropout switches LSTM to its per-gate kernel (implementation=1): "
    "inference can differ from the original by float rounding (about 1e-7)"
)


def _warn_recurrent(report: Report, config: dict) -> None:
    _warn(report, _CUDNN)
    if _has_lstm_cell(config):
        _warn(report, _LSTM_KERNEL)


def _warn(report: Report, text: str) -> None:
    """Records `text` in the report, and warns once per process."""
    if text not in report.warnings:
        report.warnings.append(text)
    if text not in _warned:
        _warned.add(text)
        warnings.warn(text, RegularizeWarning, stacklevel=3)


def _has_lstm_cell(config) -> bool:
    if isinstance(config, dict):
        if config.get("class_name") in ("LSTM", "LSTMCell"):
            return True
        return any(_has_lstm_cell(v) for v in config.values())
    if isinstance(config, list):
        return any(_has_lstm_cell(v) for v in config)
    return False
