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

import contextlib
import dataclasses
import gc
import os
import sys
import warnings

import keras
from keras import tree

from regularize import graph
from regularize import rules
from regularize import training
from regularize.errors import RegularizeWarning
from regularize.errors import UnsupportedModelError
from regularize.policy import RECURRENT
from regularize.policy import Candidate
from regularize.policy import Decision
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
    lengths: dict = dataclasses.field(default_factory=dict)  # id(model) -> levels
    matched: set = dataclasses.field(default_factory=set)  # rules that matched a site
    decisions: dict = dataclasses.field(default_factory=dict)  # id(layer) -> Decision
    casts: dict = dataclasses.field(default_factory=dict)  # id(node) -> Identity
    total: int = 1  # levels from the inputs to the outputs of the whole model
    has_norm: bool = False

    def weight(self, op) -> int:
        """Levels one call of `op` adds to a path (see `graph.levels`)."""
        if graph.is_dropout(op):
            return 0
        if not graph.is_graph_model(op):
            return 1
        if id(op) not in self.lengths:
            fn = graph.graph_of(op)
            ends = graph.levels(fn, self.weight) if fn is not None else {}
            self.lengths[id(op)] = max(ends.values(), default=1)
        return self.lengths[id(op)]


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
    classes = {type(layer).__name__ for layer in model._flatten_layers()}
    policy.check_classes(lambda name: name in classes or graph.is_layer_class(name))
    run = _Run(policy=policy, mode=mode, build=build, report=report or Report())
    run.total = max(run.weight(model), 1)
    run.has_norm = graph.contains_normalization(model)
    # `keras.Model(inputs, outputs)` sorts the graph with a recursive search
    # (keras/src/ops/function.py: _build_map_helper), one frame per node on the
    # longest path; dropout after every activation of a 2,000-layer chain
    # doubles that path past Python's default limit.
    with graph.recursion_limit(4 * _count_nodes(model) + 1000), _gc_paused():
        new = _rewrite_model(model, run, prefix="", inert=None, top=True)
    if mode == ADD:
        _warn_unmatched(run)
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


@contextlib.contextmanager
def _gc_paused():
    """Pauses Python's cyclic garbage collector inside the block.

    A rewrite keeps everything it allocates (layers, nodes, tensors), so the
    full collections its allocations trigger rescan a growing heap for
    nothing: about 0.5 s of a 2,000-layer rewrite, and the part of its time
    that grew faster than the number of layers (benchmarks/scale.py).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


def _warn_unmatched(run: _Run) -> None:
    for i, rule in enumerate(run.policy.rules):
        if rule.match is not None and i not in run.matched:
            where = f" of {run.policy.source}" if run.policy.source else ""
            _warn(run.report, f"{rule.describe(i)}{where} matches no candidate site")


def _rewrite_model(
    model,
    run: _Run,
    prefix: str,
    inert: str | None,
    top: bool = False,
    offset: int = 0,
    tail: bool = False,
):
    """Rewrites one (possibly nested) model; returns it unchanged if nothing changed.

    `offset` is the level at which the model's inputs sit in the whole graph
    and `tail` whether a normalization layer follows its outputs there.
    """
    fn = graph.graph_of(model)
    if fn is None:  # an unbuilt nested Sequential: nothing is known inside
        return model
    walk = _Walk(fn, run, prefix, inert, offset, tail)
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

    def __init__(self, fn, run: _Run, prefix: str, inert: str | None, offset: int, tail: bool):
        self.fn = fn
        self.ctx = run
        self.prefix = prefix
        self.inert = inert
        self.offset = offset
        self.ends = graph.levels(fn, run.weight)
        self.norm_after = graph.normalization_after(fn, tail)
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
        blocks = self.ctx.policy.preset == "blocks"
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
                if self.ctx.mode == ADD and self._is_site(node, blocks):
                    outputs = self._activation(node, outputs)
            if self.ctx.build:
                for old, new in zip(node.outputs, tree.flatten(outputs), strict=True):
                    self.tensors[id(old)] = new

    def _is_site(self, node, blocks: bool) -> bool:
        """Activations; with the blocks preset, merges no activation follows.

        A layer the tool's own dropout follows is a site too, so that a new
        policy can remove or re-target that dropout.
        """
        op = node.operation
        if graph.activation_of(op):
            return True
        readers = [r for t in node.outputs for r in self.readers.get(id(t), [])]
        if any(graph.is_own_dropout(r) for r in readers):
            return True
        return blocks and graph.is_merge(op) and not any(map(graph.activation_of, readers))

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

    def _depth(self, node) -> float:
        return round((self.offset + self.ends[id(node)]) / self.ctx.total, 4)

    def _site(self, node, op, kind, rate, action, reason, existing="") -> None:
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
                depth=self._depth(node),
                existing=existing,
            )
        )
        if action in (INSERT, UPDATE, REMOVE):
            self.changed = True

    def _decide(self, node, auto_kind: str) -> Decision:
        """Asks the policy about the site at `node`; notes which rules matched."""
        op = node.operation
        rank = len(node.outputs[0].shape) if node.outputs else 0
        if self.ctx.has_norm:
            in_head = not self.norm_after[id(node)]
        else:  # no normalization anywhere: the head is where the maps are flat
            in_head = rank <= 2
        parents = [p.operation for p in node.parent_nodes]
        candidate = Candidate(
            path=self.prefix + op.name,
            layer_class=type(op).__name__,
            activation=graph.activation_of(op),
            depth=self._depth(node),
            trainable=bool(op.trainable),
            auto_kind=auto_kind,
            in_head=in_head,
            # A standalone activation right after the merge closes the block; a
            # layer with a fused activation there already starts the next one.
            block_output=graph.is_merge(op)
            or (graph.is_activation_layer(op) and any(map(graph.is_merge, parents))),
        )
        policy = self.ctx.policy
        self.ctx.matched.update(i for i, r in enumerate(policy.rules) if r.matches(candidate))
        # A shared layer gets one decision, its first call's: its calls share
        # one dropout layer (a siamese branch stays siamese), and an RNN is
        # rebuilt once for all its calls.
        return self.ctx.decisions.setdefault(id(op), policy.decide(candidate))

    # -- nested models ----------------------------------------------------

    def _nested(self, node):
        op = node.operation
        run = self.ctx
        inert = self.inert
        if inert is None and run.mode == ADD and run.policy.skip_inference_only:
            calls = self.calls[id(op)]
            if all(n.arguments.kwargs.get("training") is False for n in calls):
                inert = rules.INFERENCE_ONLY
        if id(op) not in run.models:
            offset = self.offset + self.ends[id(node)] - run.weight(op)
            tail = self.norm_after[id(node)]
            prefix = f"{self.prefix}{op.name}/"
            run.models[id(op)] = _rewrite_model(op, run, prefix, inert, offset=offset, tail=tail)
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
        fmt = graph.data_format_near(node)
        auto_kind = rules.dropout_kind(len(tensor.shape), fmt)
        readers = self.readers.get(id(tensor), [])
        dropouts = [r for r in readers if graph.is_dropout(r)]
        existing = ", ".join(f"{type(d).__name__}({d.rate:g})" for d in dropouts)
        decision = self._decide(node, auto_kind)

        def skip(reason, action=SKIP):
            self._site(node, op, decision.kind, None, action, reason, existing)
            return outputs

        if self.inert:
            reason = self.inert
        elif id(tensor) in self.outputs_ids:
            return skip("model output")
        elif decision.skipped:
            reason = decision.reason
        else:
            reason = None
        if dropouts:
            for layer in dropouts:
                if graph.is_own_dropout(layer) or run.policy.existing != "keep":
                    self._retarget(node, layer, decision, fmt, reason, existing)
                else:
                    skip(f"already followed by {type(layer).__name__}", KEEP)
            return outputs
        if reason:
            return skip(reason)
        if any(graph.is_batchnorm(r) for r in readers):
            return skip("feeds BatchNormalization")
        if not readers:
            return skip("output not used")
        if decision.rate == 0:
            return skip(decision.reason)
        self._site(node, op, decision.kind, decision.rate, INSERT, decision.reason, existing)
        if not run.build:
            return outputs
        if id(op) not in run.layers:
            name = rules.unique_name(op.name + rules.SUFFIX, self.names)
            self.names.add(name)
            run.layers[id(op)] = self._make(decision, name, op, tensor, fmt)
        dropout = run.layers[id(op)]
        self.sequence.append(dropout)
        return dropout(outputs)

    def _make(self, decision: Decision, name: str, op, tensor, fmt: str):
        return graph.make_dropout(
            decision.kind,
            decision.rate,
            name,
            op,
            tensor.shape,
            fmt,
            mc=self.ctx.policy.mc,
        )

    def _retarget(self, node, layer, decision: Decision, fmt, skip_reason, existing) -> None:
        """Decides what becomes of a dropout layer after `node`.

        The tool's own layers always follow the policy; the model's own ones
        only with `existing = "retarget"` or `"remove"`.
        """
        op = node.operation
        run = self.ctx
        tensor = node.outputs[0]
        old_kind = type(layer).__name__
        own = graph.is_own_dropout(layer)
        if id(layer) in run.layers:  # a shared dropout, decided at its first call
            done = run.layers[id(layer)]
            if done is None:
                self._site(node, op, old_kind, layer.rate, REMOVE, "shared, removed", existing)
            else:
                action = KEEP if done is layer else UPDATE
                why = "shared, same as its first call"
                self._site(node, op, type(done).__name__, done.rate, action, why, existing)
            return
        if not own and run.policy.existing == "remove":
            skip_reason = "existing = remove"
        elif not skip_reason and decision.rate == 0:
            skip_reason = decision.reason
        if skip_reason:
            self._site(node, op, old_kind, layer.rate, REMOVE, skip_reason, existing)
            run.layers[id(layer)] = None
        elif decision.rate == layer.rate and old_kind == self._wanted_class(decision):
            why = "inserted earlier, same rate" if own else "already there, same rate"
            self._site(node, op, decision.kind, decision.rate, KEEP, why, existing)
            run.layers[id(layer)] = layer
        else:
            reason = f"{old_kind}({layer.rate:g}) -> {self._wanted_class(decision)}"
            reason += f"({decision.rate:g})"
            self._site(node, op, decision.kind, decision.rate, UPDATE, reason, existing)
            if run.build:
                run.layers[id(layer)] = self._make(decision, layer.name, op, tensor, fmt)

    def _wanted_class(self, decision: Decision) -> str:
        return ("MC" if self.ctx.policy.mc else "") + decision.kind

    # -- existing dropout layers ------------------------------------------

    def _dropout(self, node):
        op = node.operation
        run = self.ctx
        is_output = id(node.outputs[0]) in self.outputs_ids
        strip = run.mode == STRIP or (run.policy.existing == "remove" and id(op) not in run.layers)
        if strip:
            if is_output:
                self._site(node, op, type(op).__name__, op.rate, KEEP, "model output")
                return self._call(op, node)
            rate = getattr(op, "rate", None)
            why = "strip dropout" if run.mode == STRIP else "existing = remove"
            self._site(node, op, type(op).__name__, rate, REMOVE, why)
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
        op = node.operation
        if any(t.dtype != op.compute_dtype for t in node.input_tensors):
            # A mixed-precision dropout also casts its input (float32 ->
            # float16); an Identity of the same dtype policy keeps that cast,
            # so inference does not change.
            if id(node) not in self.ctx.casts:
                self.ctx.casts[id(node)] = keras.layers.Identity(
                    name=op.name, dtype=op.dtype_policy
                )
            cast = self.ctx.casts[id(node)]
            self.sequence.append(cast)
            return cast(args[0])
        return args[0]

    # -- recurrent layers -------------------------------------------------

    def _recurrent(self, node):
        op = node.operation
        run = self.ctx
        config = keras.saving.serialize_keras_object(op)
        settings = list(rules.dropout_settings(config))
        if not settings:
            self._site(node, op, "recurrent", None, SKIP, "cell has no dropout setting")
            return self._call(op, node)
        old = (settings[0]["dropout"], settings[0]["recurrent_dropout"])
        existing = rules.describe_rnn(old)
        if run.mode == STRIP:
            new_values = (0.0, 0.0)
        else:
            decision = self._decide(node, RECURRENT)
            skip = self.inert or (decision.reason if decision.skipped else None)
            if skip:
                self._site(node, op, "recurrent", None, SKIP, skip, existing)
                return self._call(op, node)
            rec = decision.recurrent_rate
            new_values = (decision.rate, old[1] if rec is None else rec)
        reason = rules.describe_change(old, new_values)
        if all((s["dropout"], s["recurrent_dropout"]) == new_values for s in settings):
            action, reason = (SKIP, "rate is 0") if new_values == (0.0, 0.0) else (KEEP, reason)
            self._site(node, op, "recurrent", new_values[0] or None, action, reason, existing)
            return self._call(op, node)
        if run.mode == STRIP:
            action = REMOVE
        else:
            action = INSERT if old == (0.0, 0.0) else UPDATE
        self._site(node, op, "recurrent", new_values[0], action, reason, existing)
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


def _warn_recurrent(report: Report, config: dict) -> None:
    _warn(report, rules.CUDNN)
    if rules.has_lstm_cell(config):
        _warn(report, rules.LSTM_KERNEL)


def _warn(report: Report, text: str) -> None:
    """Records `text` in the report, and warns once per process."""
    if text not in report.warnings:
        report.warnings.append(text)
    if text not in _warned:
        _warned.add(text)
        warnings.warn(text, RegularizeWarning, stacklevel=_caller_level())


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # .../regularize/


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
