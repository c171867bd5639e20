"""The Keras 2 rewrite: walks a tf_keras graph once, decides each site, builds.

The twin of `regularize.rewrite` (the Keras 3 engine) for tf_keras models,
with the same policy semantics: dropout after activations, not after model
outputs, not before BatchNormalization, Spatial dropout on feature maps, RNN
`dropout` / `recurrent_dropout` through their config, inserted layers named
`<anchor>__dropout` so that a rerun re-targets them, and the one policy call
`Policy.decide(Candidate(...))` with the same candidate facts (depth by
longest path, head after the last normalization, block outputs).

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

import dataclasses

import tensorflow as tf
import tf_keras

from regularize import rules
from regularize.errors import UnsupportedModelError
from regularize.legacy import TFMOT_CLASSES
from regularize.policy import RECURRENT
from regularize.policy import Candidate
from regularize.policy import Policy
from regularize.report import INSERT
from regularize.report import KEEP
from regularize.report import REMOVE
from regularize.report import SKIP
from regularize.report import UPDATE

L = tf_keras.layers
ADD = "add"
STRIP = "strip"
PLAN = "plan"

SUFFIX = rules.SUFFIX

DROPOUT_CLASSES = (L.Dropout, L.GaussianDropout, L.AlphaDropout)  # Spatial* subclass Dropout
ACTIVATION_CLASSES = (L.ReLU, L.LeakyReLU, L.ELU, L.PReLU, L.Softmax, L.ThresholdedReLU)
RECURRENT_CLASSES = (L.RNN, L.Bidirectional)
NORMALIZATION_CLASSES = (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization)
MERGE_CLASSES = (L.Add, L.Concatenate)


# -- facts about layers ---------------------------------------------------


def class_name(layer) -> str:
    """The class name of `layer` (the wrapper's, for a wrapped layer)."""
    return type(layer).__name__


def unwrap(layer):
    """The layer inside tfmot wrappers (themselves `Wrapper`s with `.layer`)."""
    while class_name(layer) in TFMOT_CLASSES and hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def describe(layer) -> str:
    """`Dense`, or `PruneLowMagnitude(Dense)` for a wrapped layer."""
    inner = unwrap(layer)
    return class_name(layer) if inner is layer else f"{class_name(layer)}({class_name(inner)})"


def is_graph_model(layer) -> bool:
    return isinstance(layer, tf_keras.Model) and bool(getattr(layer, "_is_graph_network", False))


def is_dropout(layer) -> bool:
    return isinstance(unwrap(layer), DROPOUT_CLASSES)


def is_own_dropout(layer) -> bool:
    return isinstance(layer, DROPOUT_CLASSES) and rules.is_own_name(layer.name)


def is_recurrent(layer) -> bool:
    return isinstance(unwrap(layer), RECURRENT_CLASSES)


def is_batchnorm(layer) -> bool:
    return isinstance(unwrap(layer), L.BatchNormalization)


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


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf_keras.Model):
            yield from all_layers(layer)


def data_format_near(node, limit: int = 64) -> str:
    """The `data_format` of the nearest upstream layer that declares one."""
    for _ in range(limit):
        fmt = getattr(unwrap(node.layer), "data_format", None)
        if fmt in ("channels_first", "channels_last"):
            return fmt
        parents = node.parent_nodes
        if not parents:
            break
        node = parents[0]
    return tf_keras.backend.image_data_format()


def make_dropout(kind: str, rate: float, name: str, anchor, shape, data_format: str):
    """A new dropout layer with the anchor's dtype policy and trainable flag."""
    common = {"rate": rate, "name": name, "dtype": anchor.dtype_policy}
    if kind == "Dropout" and len(shape) == 3 and data_format == "channels_first":
        layer = L.Dropout(noise_shape=(None, shape[1], 1), **common)
    else:
        if kind.startswith("SpatialDropout") and kind != "SpatialDropout1D":
            common["data_format"] = data_format
        layer = getattr(L, kind)(**common)
    layer.trainable = anchor.trainable
    return layer


# -- the rewrite ----------------------------------------------------------


@dataclasses.dataclass
class Run:
    """State of one rewrite, shared by the nested models it visits."""

    policy: Policy
    mode: str
    build: bool
    sites: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    models: dict = dataclasses.field(default_factory=dict)  # id(old) -> new
    layers: dict = dataclasses.field(default_factory=dict)  # id(old) -> new or None
    lengths: dict = dataclasses.field(default_factory=dict)  # id(model) -> levels
    matched: set = dataclasses.field(default_factory=set)  # rules that matched a site
    decisions: dict = dataclasses.field(default_factory=dict)  # id(layer) -> Decision
    total: int = 1
    has_norm: bool = False
    rebuilt_lstm: bool = False

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def weight(self, layer) -> int:
        """Levels one call of `layer` adds to a path (the Keras 3 engine's measure)."""
        if is_dropout(layer):
            return 0
        if not is_graph_model(layer):
            return 1
        if id(layer) not in self.lengths:
            ends = _levels(_nodes(layer), self.weight)
            self.lengths[id(layer)] = max(ends.values(), default=1)
        return self.lengths[id(layer)]


def rewrite(model: tf_keras.Model, run: Run):
    """Rewrites `model` per `run`; returns the new model (None when only planning)."""
    if not is_graph_model(model):
        raise UnsupportedModelError(
            f"Cannot rewrite subclassed model {class_name(model)!r}: its layer graph is not "
            "recorded. Rebuild it as a Functional or Sequential model and run again."
        )
    classes = set()
    for layer in all_layers(model):
        classes.update((class_name(layer), class_name(unwrap(layer))))
    run.policy.check_classes(lambda name: name in classes or _is_layer_class(name))
    run.total = max(run.weight(model), 1)
    run.has_norm = any(has_normalization(layer) for layer in model.layers)
    new = _rewrite_model(model, run, prefix="", inert=None, top=True)
    if run.mode == ADD:
        for i, rule in enumerate(run.policy.rules):
            if rule.match is not None and i not in run.matched:
                where = f" of {run.policy.source}" if run.policy.source else ""
                run.warn(f"{rule.describe(i)}{where} matches no candidate site")
    if new is not None and getattr(model, "_is_compiled", False) and model.optimizer is not None:
        _compile_like(new, model)
    return new


def _is_layer_class(name: str) -> bool:
    cls = getattr(L, name, None)
    return isinstance(cls, type) and issubclass(cls, L.Layer)


def _compile_like(new, old) -> None:
    """Compiles `new` like `old`, with a fresh optimizer of the same config.

    The old optimizer's slots belong to the old variable list (rebuilt RNN
    layers have new variables); the Keras 3 engine does the same. Pruning
    keeps its own step (`pruning_step` in each wrapper), not the optimizer's.
    """
    args = old._get_compile_args()
    optimizer = args["optimizer"]
    args["optimizer"] = type(optimizer).from_config(optimizer.get_config())
    new.compile(**args)


def _nodes(model) -> list:
    """The model's call nodes from inputs to outputs (as `_run_internal_graph`)."""
    by_depth = model._nodes_by_depth
    return [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if not node.is_input
    ]


def _levels(nodes, weight) -> dict[int, int]:
    """Maps `id(node)` to the length of the longest path from the inputs to it."""
    end: dict[int, int] = {}
    for node in nodes:
        start = max((end.get(id(p), 0) for p in node.parent_nodes), default=0)
        end[id(node)] = start + weight(node.layer)
    return end


def _normalization_after(nodes, outputs: set, tail: bool) -> dict[int, bool]:
    """Maps `id(node)` to whether a normalization layer lies downstream of it."""
    after: dict[int, bool] = {}
    for node in reversed(nodes):  # consumers before producers
        flag = after.get(id(node), False)
        if tail and any(key in outputs for key in node.flat_output_ids):
            flag = True
        after[id(node)] = flag
        down = flag or has_normalization(node.layer)
        for parent in node.parent_nodes:
            after[id(parent)] = after.get(id(parent), False) or down
    return after


def _rewrite_model(model, run: Run, prefix: str, inert, top=False, offset=0, tail=False):
    """Rewrites one (possibly nested) model; returns it unchanged if nothing changed."""
    walk = _Walk(model, run, prefix, inert, offset, tail)
    walk.run()
    if not run.build:
        return None
    if not walk.changed and not top:
        return model
    if isinstance(model, tf_keras.Sequential):
        input_layer = model.inputs[0]._keras_history.layer
        new = tf_keras.Sequential([input_layer, *walk.sequence], name=model.name)
    else:
        outputs = tf.nest.pack_sequence_as(model._nested_outputs, walk.outputs())
        new = tf_keras.Model(inputs=model._nested_inputs, outputs=outputs, name=model.name)
    # The flag itself: the setter would recurse into the shared layers.
    new._trainable = model._trainable
    return new


class _Lookup:
    """`node.map_arguments` pops tensors from lists; this hands out one each time."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __getitem__(self, key):
        return [self.tensors[key]]


class _Walk:
    """One pass over one graph: decides each node and, if building, replays it.

    Tensors are keyed by `str(id(tensor))`, as tf_keras' own node bookkeeping
    (`node.flat_output_ids`) keys them.
    """

    def __init__(self, model, run: Run, prefix: str, inert, offset: int, tail: bool):
        self.model = model
        self.ctx = run
        self.prefix = prefix
        self.inert = inert
        self.offset = offset
        self.nodes = _nodes(model)
        self.ends = _levels(self.nodes, run.weight)
        self.output_ids = {str(id(t)) for t in model.outputs}
        self.norm_after = _normalization_after(self.nodes, self.output_ids, tail)
        self.readers: dict[str, list] = {}
        for node in self.nodes:
            for kt in node.keras_inputs:
                self.readers.setdefault(str(id(kt)), []).append(node.layer)
        self.names = {layer.name for layer in model.layers}
        self.tensors = {str(id(t)): t for t in model.inputs}
        self.calls: dict[int, list] = {}
        for node in self.nodes:
            self.calls.setdefault(id(node.layer), []).append(node)
        self.sequence: list = []  # layers in call order, for Sequential
        self.changed = False

    def run(self) -> None:
        blocks = self.ctx.policy.preset == "blocks"
        for node in self.nodes:
            layer = node.layer
            if is_graph_model(layer):
                outputs = self._nested(node)
            elif is_dropout(layer):
                outputs = self._dropout(node)
            elif is_recurrent(layer):
                outputs = self._recurrent(node)
            else:
                outputs = self._call(layer, node)
                if self.ctx.mode == ADD and self._is_site(node, blocks):
                    outputs = self._activation(node, outputs)
            if self.ctx.build:
                for key, new in zip(node.flat_output_ids, tf.nest.flatten(outputs), strict=True):
                    self.tensors[key] = new

    def _is_site(self, node, blocks: bool) -> bool:
        """Activations, layers the tool's own dropout follows, and (blocks) bare merges."""
        if activation_of(node.layer):
            return True
        readers = [r for key in node.flat_output_ids for r in self.readers.get(key, [])]
        if any(is_own_dropout(r) for r in readers):
            return True
        return blocks and is_merge(node.layer) and not any(map(activation_of, readers))

    def outputs(self) -> list:
        return [self.tensors[str(id(t))] for t in self.model.outputs]

    # -- replaying --------------------------------------------------------

    def _call(self, layer, node):
        if not self.ctx.build:
            return None
        args, kwargs = node.map_arguments(_Lookup(self.tensors))
        self.sequence.append(layer)
        return layer(*args, **kwargs)

    def _depth(self, node) -> float:
        return round((self.offset + self.ends[id(node)]) / self.ctx.total, 4)

    def _site(self, node, kind, rate, action, reason, existing="") -> None:
        flat = tf.nest.flatten(node.outputs)
        self.ctx.sites.append(
            {
                "layer": self.prefix + node.layer.name,
                "layer_class": describe(node.layer),
                "kind": kind,
                "rate": None if rate is None else float(rate),
                "action": action,
                "reason": reason,
                "shape": str(tuple(flat[0].shape)) if flat else "()",
                "depth": self._depth(node),
                "existing": existing,
            }
        )
        if action in (INSERT, UPDATE, REMOVE):
            self.changed = True

    def _decide(self, node, auto_kind: str):
        """The one policy call: `Policy.decide` on the facts of the site at `node`."""
        layer = node.layer
        flat = tf.nest.flatten(node.outputs)
        rank = len(flat[0].shape) if flat else 0
        in_head = not self.norm_after[id(node)] if self.ctx.has_norm else rank <= 2
        parents = [p.layer for p in node.parent_nodes]
        candidate = Candidate(
            path=self.prefix + layer.name,
            # The wrapped class, so that a rule `class = "Dense"` matches a
            # pruned or quantized Dense too.
            layer_class=class_name(unwrap(layer)),
            activation=activation_of(layer),
            depth=self._depth(node),
            trainable=bool(layer.trainable),
            auto_kind=auto_kind,
            in_head=in_head,
            # As the Keras 3 engine: a standalone activation right after the
            # merge closes the block; a fused one already starts the next.
            block_output=is_merge(layer)
            or (is_activation_layer(layer) and any(map(is_merge, parents))),
        )
        policy = self.ctx.policy
        self.ctx.matched.update(i for i, r in enumerate(policy.rules) if r.matches(candidate))
        # As the Keras 3 engine: a shared layer gets its first call's decision.
        return self.ctx.decisions.setdefault(id(layer), policy.decide(candidate))

    # -- nested models ----------------------------------------------------

    def _nested(self, node):
        layer = node.layer
        run = self.ctx
        inert = self.inert
        if inert is None and run.mode == ADD and run.policy.skip_inference_only:
            if all(n.call_kwargs.get("training") is False for n in self.calls[id(layer)]):
                inert = rules.INFERENCE_ONLY
        if id(layer) not in run.models:
            offset = self.offset + self.ends[id(node)] - run.weight(layer)
            tail = self.norm_after[id(node)]
            prefix = f"{self.prefix}{layer.name}/"
            run.models[id(layer)] = _rewrite_model(
                layer, run, prefix, inert, offset=offset, tail=tail
            )
        new = run.models[id(layer)]
        if run.build and new is not layer:
            self.changed = True
        return self._call(new if run.build else layer, node)

    # -- activation sites -------------------------------------------------

    def _activation(self, node, outputs):
        run = self.ctx
        flat = tf.nest.flatten(node.outputs)
        if len(flat) != 1:
            return outputs
        tensor = flat[0]
        key = node.flat_output_ids[0]
        fmt = data_format_near(node)
        auto_kind = rules.dropout_kind(len(tensor.shape), fmt)
        readers = self.readers.get(key, [])
        dropouts = [r for r in readers if is_dropout(r)]
        existing = ", ".join(f"{describe(d)}({unwrap(d).rate:g})" for d in dropouts)
        decision = self._decide(node, auto_kind)

        def skip(reason, action=SKIP):
            self._site(node, decision.kind, None, action, reason, existing)
            return outputs

        if self.inert:
            reason = self.inert
        elif key in self.output_ids:
            return skip("model output")
        elif decision.skipped:
            reason = decision.reason
        else:
            reason = None
        if dropouts:
            for dropout in dropouts:
                # A wrapped dropout (QuantizeWrapperV2(Dropout)) is the user's.
                if is_own_dropout(dropout) or (
                    run.policy.existing != "keep" and unwrap(dropout) is dropout
                ):
                    self._retarget(node, dropout, decision, fmt, reason, existing)
                else:
                    skip(f"already followed by {describe(dropout)}", KEEP)
            return outputs
        if reason:
            return skip(reason)
        if any(is_batchnorm(r) for r in readers):
            return skip("feeds BatchNormalization")
        if not readers:
            return skip("output not used")
        if decision.rate == 0:
            return skip(decision.reason)
        self._site(node, decision.kind, decision.rate, INSERT, decision.reason, existing)
        if not run.build:
            return outputs
        layer = node.layer
        if id(layer) not in run.layers:
            name = rules.unique_name(layer.name + SUFFIX, self.names)
            self.names.add(name)
            run.layers[id(layer)] = make_dropout(
                decision.kind, decision.rate, name, layer, tensor.shape, fmt
            )
        dropout = run.layers[id(layer)]
        self.sequence.append(dropout)
        return dropout(outputs)

    def _retarget(self, node, dropout, decision, fmt, skip_reason, existing) -> None:
        """Decides what becomes of a dropout layer after `node` (as the Keras 3 engine)."""
        run = self.ctx
        tensor = tf.nest.flatten(node.outputs)[0]
        old_kind = class_name(dropout)
        own = is_own_dropout(dropout)
        if id(dropout) in run.layers:  # a shared dropout, decided at its first call
            done = run.layers[id(dropout)]
            if done is None:
                self._site(node, old_kind, dropout.rate, REMOVE, "shared, removed", existing)
            else:
                action = KEEP if done is dropout else UPDATE
                why = "shared, same as its first call"
                self._site(node, class_name(done), done.rate, action, why, existing)
            return
        if not own and run.policy.existing == "remove":
            skip_reason = "existing = remove"
        elif not skip_reason and decision.rate == 0:
            skip_reason = decision.reason
        if skip_reason:
            self._site(node, old_kind, dropout.rate, REMOVE, skip_reason, existing)
            run.layers[id(dropout)] = None
        elif decision.rate == dropout.rate and old_kind == decision.kind:
            why = "inserted earlier, same rate" if own else "already there, same rate"
            self._site(node, decision.kind, decision.rate, KEEP, why, existing)
            run.layers[id(dropout)] = dropout
        else:
            reason = f"{old_kind}({dropout.rate:g}) -> {decision.kind}({decision.rate:g})"
            self._site(node, decision.kind, decision.rate, UPDATE, reason, existing)
            if run.build:
                run.layers[id(dropout)] = make_dropout(
                    decision.kind, decision.rate, dropout.name, node.layer, tensor.shape, fmt
                )

    # -- existing dropout layers ------------------------------------------

    def _dropout(self, node):
        layer = node.layer
        run = self.ctx
        rate = getattr(unwrap(layer), "rate", None)
        is_output = node.flat_output_ids[0] in self.output_ids
        strip = run.mode == STRIP or (
            run.policy.existing == "remove" and id(layer) not in run.layers
        )
        if strip:
            if is_output:
                self._site(node, class_name(unwrap(layer)), rate, KEEP, "model output")
                return self._call(layer, node)
            why = "strip dropout" if run.mode == STRIP else "existing = remove"
            self._site(node, class_name(unwrap(layer)), rate, REMOVE, why)
            return self._passthrough(node)
        if id(layer) not in run.layers:  # a user's dropout: left as it is
            return self._call(layer, node)
        new = run.layers[id(layer)]
        if new is None:
            self.changed = True
            return self._passthrough(node)
        if new is not layer:
            self.changed = True
        return self._call(new, node)

    def _passthrough(self, node):
        if not self.ctx.build:
            return None
        args, _ = node.map_arguments(_Lookup(self.tensors))
        return args[0]

    # -- recurrent layers -------------------------------------------------

    def _recurrent(self, node):
        layer = node.layer
        run = self.ctx
        config = L.serialize(unwrap(layer))
        settings = list(rules.dropout_settings(config))
        if not settings:
            self._site(node, "recurrent", None, SKIP, "cell has no dropout setting")
            return self._call(layer, node)
        old = (settings[0]["dropout"], settings[0]["recurrent_dropout"])
        existing = rules.describe_rnn(old)
        if run.mode == STRIP:
            new_values = (0.0, 0.0)
        else:
            decision = self._decide(node, RECURRENT)
            skip = self.inert or (decision.reason if decision.skipped else None)
            if skip:
                self._site(node, "recurrent", None, SKIP, skip, existing)
                return self._call(layer, node)
            rec = decision.recurrent_rate
            new_values = (float(decision.rate), old[1] if rec is None else float(rec))
        reason = rules.describe_change(old, new_values)
        if all((s["dropout"], s["recurrent_dropout"]) == new_values for s in settings):
            action, reason = (SKIP, "rate is 0") if new_values == (0.0, 0.0) else (KEEP, reason)
            self._site(node, "recurrent", new_values[0] or None, action, reason, existing)
            return self._call(layer, node)
        if unwrap(layer) is not layer:
            # Rebuilding from config would drop the wrapper and its pruning
            # or quantization state.
            why = f"wrapped in {class_name(layer)}: left as it is"
            self._site(node, "recurrent", None, SKIP, why, existing)
            return self._call(layer, node)
        action = REMOVE if run.mode == STRIP else (INSERT if old == (0.0, 0.0) else UPDATE)
        self._site(node, "recurrent", new_values[0], action, reason, existing)
        if new_values[1] > 0 and run.mode == ADD:
            run.warn(rules.CUDNN)
            if rules.has_lstm_cell(config):
                run.warn(rules.LSTM_KERNEL)
        if not run.build:
            return None
        fresh = id(layer) not in run.layers
        if fresh:
            # Rebuilt from config, not patched in place: LSTMCell picks its
            # kernel (implementation 1 or 2) in __init__ from recurrent_dropout.
            for s in settings:
                s["dropout"], s["recurrent_dropout"] = new_values
            run.layers[id(layer)] = L.deserialize(config)
            run.rebuilt_lstm = run.rebuilt_lstm or (
                new_values[1] > 0 and rules.has_lstm_cell(config)
            )
        new = run.layers[id(layer)]
        outputs = self._call(new, node)  # builds `new` on its first call
        if fresh:
            _copy_weights(layer, new)
        return outputs


def _copy_weights(old, new) -> None:
    values = old.get_weights()
    if [w.shape for w in new.get_weights()] != [w.shape for w in values]:
        raise UnsupportedModelError(
            f"Cannot carry the weights of {old.name!r} over to its rebuilt copy: the "
            "weight lists differ. Expected the same shapes. Received: "
            f"{[w.shape for w in values]} vs {[w.shape for w in new.get_weights()]}"
        )
    new.set_weights(values)
