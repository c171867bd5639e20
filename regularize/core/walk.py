"""The decision tree of a rewrite, over any `GraphView`: one walk, every site decided.

The walk visits each call node in the order the Keras API replays its graph
(Functional `_run_through_graph`, iteratively, so a 2,000-layer chain is
fine) and decides it: a nested model is walked in turn, an existing dropout
layer is kept, re-targeted or removed, an RNN or a layer that owns its
dropout (`core.owned`: MultiHeadAttention, transformer blocks) gets new
dropout settings, and an activation (or a block output) may get a new
dropout layer. Every
decision is a `Site` record; every change is an action that a builder, when
there is one, applies at once (it needs the new tensors of the nodes before).
Without a builder the walk only plans: `inspect` and `--dry-run` take the
same path as a rewrite.
"""

from __future__ import annotations

import dataclasses

from regularize.core import droppath
from regularize.core import gates
from regularize.core import owned
from regularize.core import terms
from regularize.core.actions import Action
from regularize.core.actions import Insert
from regularize.core.actions import Rebuild
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.guards import gc_paused
from regularize.core.guards import recursion_limit
from regularize.core.mode import Mode
from regularize.core.policy import Policy
from regularize.core.protocols import Builder
from regularize.core.protocols import GraphView
from regularize.core.protocols import LayerFacts
from regularize.core.report import INSERT
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.report import Site
from regularize.core.rules import OWNED
from regularize.core.rules import RECURRENT
from regularize.core.rules import Candidate
from regularize.core.rules import Decision

# The fate of a dropout layer that stays as it is (see `_Run.fates`).
_KEPT = "kept"


@dataclasses.dataclass
class Result:
    """What a walk decided, and the new model if a builder built one."""

    sites: list[Site] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    actions: list[Action] = dataclasses.field(default_factory=list)
    model: object = None

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


def walk(
    view: GraphView, policy: Policy, mode: str = Mode.ADD, builder: Builder | None = None
) -> Result:
    """Decides every site of the model `view` reads; builds it if there is a `builder`.

    Args:
        view: The top graph of the model.
        policy: Where and how much dropout (`Policy(rate=0.0)` for STRIP).
        mode: "add" or "strip".
        builder: Replays the graph with the actions applied; None only plans.

    Returns:
        The sites, warnings and actions; `model` is the new model (None
        without a builder).

    Raises:
        PolicyError: A rule names a class that is neither in the model nor
            a layer class of the API.
    """
    classes = view.class_names()
    policy.check_classes(lambda name: name in classes or view.is_layer_class(name))
    mode = Mode(mode)
    # A plan decides every site as ADD does; it simply has no builder.
    run = _Run(policy=policy, mode=Mode.ADD if mode is Mode.PLAN else mode, builder=builder)
    run.total = max(run.length(view), 1)
    run.has_norm = view.contains_normalization()
    if run.mode == Mode.ADD:
        droppath.prepare(run, view)
    # Building a model sorts its graph with a recursive search (Keras 3:
    # `_build_map_helper`, tf_keras: `_build_map`), one frame per node on the
    # longest path; dropout after every activation of a 2,000-layer chain
    # doubles that path past Python's default limit.
    with recursion_limit(4 * view.node_count() + 1000), gc_paused():
        run.result.model, _ = _walk_graph(view, run, prefix="", inert=None, top=True)
    if run.mode == Mode.ADD:
        for i, rule in enumerate(policy.rules):
            if rule.match is not None and i not in run.matched:
                where = f" of {policy.source}" if policy.source else ""
                run.result.warn(f"{rule.describe(i)}{where} matches no candidate site")
    return run.result


@dataclasses.dataclass
class _Run:
    """State of one walk, shared by the nested models it visits (keyed by `id`)."""

    policy: Policy
    mode: Mode
    builder: Builder | None
    result: Result = dataclasses.field(default_factory=Result)
    facts_of: dict = dataclasses.field(default_factory=dict)  # op -> LayerFacts
    views: dict = dataclasses.field(default_factory=dict)  # nested model -> GraphView
    models: dict = dataclasses.field(default_factory=dict)  # nested model -> (new, changed)
    lengths: dict = dataclasses.field(default_factory=dict)  # nested model -> levels
    matched: set = dataclasses.field(default_factory=set)  # rules that matched a site
    decisions: dict = dataclasses.field(default_factory=dict)  # anchor -> Decision
    inserted: dict = dataclasses.field(default_factory=dict)  # anchor -> new layer's name
    fates: dict = dataclasses.field(default_factory=dict)  # dropout -> None | _KEPT | Retarget
    total: int = 1  # levels from the inputs to the outputs of the whole model
    has_norm: bool = False
    drop: droppath.State = dataclasses.field(default_factory=droppath.State)

    def facts(self, view: GraphView, op) -> LayerFacts:
        if id(op) not in self.facts_of:
            self.facts_of[id(op)] = view.facts(op)
        return self.facts_of[id(op)]

    def sub_view(self, view: GraphView, op) -> GraphView | None:
        if id(op) not in self.views:
            self.views[id(op)] = view.sub_graph(op)
        return self.views[id(op)]

    def weight(self, view: GraphView, op) -> int:
        """Levels one call of `op` adds to a path: 0 for dropout (inserting
        dropout moves no site's depth), a nested model's length, else 1."""
        facts = self.facts(view, op)
        if facts.is_dropout:
            return 0
        if not facts.is_graph_model:
            return 1
        if id(op) not in self.lengths:
            sub = self.sub_view(view, op)
            self.lengths[id(op)] = self.length(sub) if sub is not None else 1
        return self.lengths[id(op)]

    def length(self, view: GraphView) -> int:
        ends = _levels(view, view.nodes(), self.weight)
        return max(ends.values(), default=1)


def _is_softmax(facts: LayerFacts) -> bool:
    """A standalone softmax (`Softmax`, `Activation("softmax")`, `ops.softmax`)."""
    if facts.class_name == "Softmax":
        return True
    return facts.is_activation_layer and facts.activation == "softmax"


def _levels(view: GraphView, nodes, weight) -> dict[int, int]:
    """Maps `id(node)` to the length of the longest path from the inputs to it."""
    end: dict[int, int] = {}
    for node in nodes:
        start = max((end.get(id(p), 0) for p in view.parents(node)), default=0)
        end[id(node)] = start + weight(view, view.operation(node))
    return end


def _walk_graph(
    view: GraphView,
    run: _Run,
    prefix: str,
    inert,
    top=False,
    offset=0,
    tail=False,
    outside=None,
    tokens=False,
):
    """Walks one (possibly nested) graph; returns (its new model or None, changed).

    `offset` is the level at which the graph's inputs sit in the whole model
    and `tail` whether a normalization layer follows its outputs there.
    `outside` maps each output key of a nested graph to (the layers of its
    caller that read it, whether it is an output of the whole model), and
    `tokens` says whether its inputs are token states.
    """
    graph = _GraphWalk(view, run, prefix, inert, offset, tail, outside, tokens)
    graph.run()
    if graph.builder is None:
        return None, graph.changed
    return graph.builder.finish(changed=graph.changed, top=top), graph.changed


class _GraphWalk:
    """One pass over one graph: decides each node and has the builder replay it."""

    def __init__(
        self,
        view: GraphView,
        run: _Run,
        prefix: str,
        inert,
        offset: int,
        tail: bool,
        outside: dict | None = None,
        tokens: bool = False,
    ):
        self.view = view
        self.run_ = run
        self.policy = run.policy
        self.prefix = prefix
        self.inert = inert
        self.offset = offset
        self.nodes = list(view.nodes())
        self.ends = _levels(view, self.nodes, run.weight)
        self.outputs = set(view.graph_outputs())
        # "Model output" is the whole model's: a nested model's output that
        # its caller reads further is a site like any other.
        self.final = self.outputs
        if outside is not None:
            self.final = {key for key, (_, final) in outside.items() if final}
        self.norm_after = self._normalization_after(tail)
        self.readers: dict = {}  # tensor key -> ops reading it
        self.calls: dict[int, list] = {}  # id(op) -> its nodes
        for node in self.nodes:
            op = view.operation(node)
            for key in view.input_keys(node):
                self.readers.setdefault(key, []).append(op)
            self.calls.setdefault(id(op), []).append(node)
        for key, (readers, _) in (outside or {}).items():
            self.readers.setdefault(key, []).extend(readers)
        self.tokens_in = tokens
        self.tokens = self._token_states()
        self.names = view.layer_names()
        self.builder = run.builder.graph(view) if run.builder is not None else None
        self.changed = False
        add = run.mode == Mode.ADD
        self.drop_paths = droppath.GraphDropPaths(self, _KEPT) if add else None
        self.gates = gates.find_gate_layers(view, self.nodes, self.facts) if add else {}

    def facts(self, op) -> LayerFacts:
        return self.run_.facts(self.view, op)

    def run(self) -> None:
        add = self.run_.mode == Mode.ADD
        blocks = self.policy.preset == "blocks"
        for node in self.nodes:
            op = self.view.operation(node)
            facts = self.facts(op)
            if facts.is_graph_model:
                self._nested(node, op, facts)
            elif facts.is_dropout:
                self._dropout(node, op, facts)
            elif facts.is_recurrent:
                self._recurrent(node, op, facts)
            elif facts.owned or (add and facts.inner_activation):
                self._owned(node, op, facts)
            else:
                action = None
                if add and self._is_site(node, facts, blocks):
                    action = self._activation(node, op, facts)
                self._call(node, op)
                if action is not None:
                    self._apply(node, action)
            if self.drop_paths is not None:
                self.drop_paths.after(node)

    # -- facts about nodes ------------------------------------------------

    def _is_site(self, node, facts: LayerFacts, blocks: bool) -> bool:
        """Activations; with the blocks preset, merges no activation follows.

        A layer the tool's own dropout follows is a site too, so that a new
        policy can remove or re-target that dropout.
        """
        if facts.activation:
            return True
        keys = self.view.output_keys(node)
        readers = [self.facts(r) for k in keys for r in self.readers.get(k, [])]
        if any(r.is_own_dropout for r in readers):
            return True
        return blocks and facts.is_merge and not any(r.activation for r in readers)

    def _normalization_after(self, tail: bool) -> dict[int, bool]:
        """Maps `id(node)` to whether a normalization layer lies downstream of it.

        `tail` says whether one lies downstream of the graph's outputs (for a
        nested model: in the model that calls it).
        """
        after: dict[int, bool] = {}
        for node in reversed(self.nodes):  # consumers before producers
            flag = after.get(id(node), False)
            if tail and any(k in self.outputs for k in self.view.output_keys(node)):
                flag = True
            after[id(node)] = flag
            down = flag or self.facts(self.view.operation(node)).is_normalization
            for parent in self.view.parents(node):
                after[id(parent)] = after.get(id(parent), False) or down
        return after

    def _token_states(self) -> dict[int, bool]:
        """Maps `id(node)` to whether its outputs are token states.

        In a transformer-style graph (an Embedding or attention layer
        upstream) a rank-3 tensor is (batch, tokens, features): it gets
        element-wise Dropout, as every transformer implementation does, not
        SpatialDropout1D, which would drop whole features of every token.
        """
        tokens: dict[int, bool] = {}
        for node in self.nodes:
            # A parent not walked is an input of the graph.
            upstream = any(tokens.get(id(p), self.tokens_in) for p in self.view.parents(node))
            tokens[id(node)] = upstream or self.facts(self.view.operation(node)).starts_tokens
        return tokens

    def _data_format_near(self, node, limit: int = 64) -> str:
        """The `data_format` of the nearest upstream layer that declares one.

        Standalone activations carry no `data_format`, so a channels_first
        network is recognised from the convolution or pooling feeding it.
        """
        for _ in range(limit):
            fmt = self.facts(self.view.operation(node)).data_format
            if fmt in ("channels_first", "channels_last"):
                return fmt
            parents = self.view.parents(node)
            if not parents:
                break
            node = parents[0]
        return self.view.default_data_format

    def _depth(self, node) -> float:
        return round((self.offset + self.ends[id(node)]) / self.run_.total, 4)

    def _site(self, node, facts: LayerFacts, kind, rate, action, reason, existing="") -> None:
        shape = self.view.out_shape(node)
        self.run_.result.sites.append(
            Site(
                layer=self.prefix + facts.name,
                layer_class=facts.label,
                kind=kind,
                rate=rate,
                action=action,
                reason=reason,
                shape=str(tuple(shape if shape is not None else ())),
                depth=self._depth(node),
                existing=existing,
            )
        )
        if action in (INSERT, UPDATE, REMOVE):
            self.changed = True

    def _decided(self, node, op, facts: LayerFacts, auto_kind: str, site, existing):
        """The policy's decision for a layer's own settings, or None once `site` says why not."""
        decision = self._decide(node, op, facts, auto_kind)
        skip = self.inert or (decision.reason if decision.skipped else None)
        if skip:
            site(None, SKIP, skip, existing)
            return None
        return decision

    def _decide(self, node, op, facts: LayerFacts, auto_kind: str) -> Decision:
        """Asks the policy about the site at `node`; notes which rules matched."""
        shape = self.view.out_shape(node)
        rank = len(shape) if shape is not None else 0
        if self.run_.has_norm:
            in_head = not self.norm_after[id(node)]
        else:  # no normalization anywhere: the head is where the maps are flat
            in_head = rank <= 2
        parents = [self.facts(self.view.operation(p)) for p in self.view.parents(node)]
        candidate = Candidate(
            path=self.prefix + facts.name,
            layer_class=facts.class_name,
            activation=facts.activation,
            depth=self._depth(node),
            trainable=facts.trainable,
            auto_kind=auto_kind,
            in_head=in_head,
            # A standalone activation right after the merge closes the block; a
            # layer with a fused activation there already starts the next one.
            block_output=facts.is_merge
            or (facts.is_activation_layer and any(p.is_merge for p in parents)),
            gate=self.gates.get(id(node)),
        )
        rules_ = self.policy.rules
        self.run_.matched.update(i for i, r in enumerate(rules_) if r.matches(candidate))
        # A shared layer gets one decision, its first call's: its calls share
        # one dropout layer (a siamese branch stays siamese), and an RNN is
        # rebuilt once for all its calls.
        return self.run_.decisions.setdefault(id(op), self.policy.decide(candidate))

    def _new_dropout(self, decision: Decision, shape: tuple, fmt: str) -> dict:
        return {
            "kind": decision.kind,
            "rate": decision.rate,
            "shape": shape,
            "data_format": fmt,
            "mc": self.policy.mc,
        }

    def _wanted_class(self, kind: str) -> str:
        return ("MC" if self.policy.mc else "") + kind

    # -- building ---------------------------------------------------------

    def _call(self, node, op) -> None:
        if self.builder is not None:
            self.builder.call(node, op)

    def _apply(self, node, action: Action) -> None:
        self.run_.result.actions.append(action)
        if self.builder is None:
            return
        if isinstance(action, Insert):
            self.builder.insert(node, action)
        elif isinstance(action, Retarget):
            self.builder.retarget(node, action)
        elif isinstance(action, Remove):
            self.builder.remove(node, action)
        else:
            self.builder.rebuild(node, action)

    # -- nested models ----------------------------------------------------

    def _nested(self, node, op, facts: LayerFacts) -> None:
        run = self.run_
        inert = self.inert
        if inert is None and run.mode == Mode.ADD and self.policy.skip_inference_only:
            if all(self.view.training_flag(n) is False for n in self.calls[id(op)]):
                inert = terms.INFERENCE_ONLY
        if id(op) not in run.models:
            sub = run.sub_view(self.view, op)
            if sub is None:  # an unbuilt nested Sequential: nothing is known inside
                run.models[id(op)] = (op, False)
            else:
                offset = self.offset + self.ends[id(node)] - run.weight(self.view, op)
                tail = self.norm_after[id(node)]
                prefix = f"{self.prefix}{facts.name}/"
                parents = self.view.parents(node)
                tokens = any(self.tokens.get(id(p), self.tokens_in) for p in parents)
                run.models[id(op)] = _walk_graph(
                    sub,
                    run,
                    prefix,
                    inert,
                    offset=offset,
                    tail=tail,
                    outside=self._outside(node, sub),
                    tokens=tokens,
                )
        new, changed = run.models[id(op)]
        self.changed = self.changed or changed
        self._call(node, new if changed else op)

    def _outside(self, node, sub: GraphView) -> dict | None:
        """For each output key of the nested graph `sub` called at `node`: the
        layers here that read it, and whether it is an output of the whole model."""
        inner = list(sub.graph_outputs())
        keys = self.view.output_keys(node)
        if len(inner) != len(keys):
            return None  # cannot pair them: every output counts as the model's
        outside: dict = {}
        for sub_key, key in zip(inner, keys, strict=True):
            readers, final = outside.get(sub_key, ([], False))
            outside[sub_key] = (readers + self.readers.get(key, []), final or key in self.final)
        return outside

    # -- activation sites -------------------------------------------------

    def _activation(self, node, op, facts: LayerFacts) -> Insert | None:
        """Decides the site after `node`; returns the dropout to insert there, if any."""
        keys = self.view.output_keys(node)
        if len(keys) != 1:
            return None
        key = keys[0]
        shape = tuple(self.view.out_shape(node))
        if self.tokens[id(node)]:
            fmt, auto_kind = "channels_last", "Dropout"
        else:
            fmt = self._data_format_near(node)
            auto_kind = terms.dropout_kind(len(shape), fmt)
        readers = self.readers.get(key, [])
        dropouts = [
            r
            for r in readers
            if self.facts(r).is_dropout and not droppath.claims(self.run_, r, self.facts(r))
        ]
        existing = ", ".join(f"{self.facts(d).label}({self.facts(d).rate:g})" for d in dropouts)
        decision = self._decide(node, op, facts, auto_kind)

        def skip(reason, action=SKIP):
            self._site(node, facts, decision.kind, None, action, reason, existing)

        if self.inert:
            reason = self.inert
        elif key in self.final:
            return skip("model output")
        elif decision.skipped:
            reason = decision.reason
        else:
            reason = None
        if dropouts:
            for layer in dropouts:
                other = self.facts(layer)
                # A wrapped dropout (QuantizeWrapperV2(Dropout)) stays the user's.
                if other.is_own_dropout or (
                    self.policy.layer_existing != "keep" and other.wrapper is None
                ):
                    self._retarget(node, op, facts, layer, decision, shape, fmt, reason, existing)
                else:
                    skip(f"already followed by {other.label}", KEEP)
            return None
        if reason:
            return skip(reason)
        if any(self.facts(r).is_batchnorm for r in readers):
            return skip("feeds BatchNormalization")
        if any(_is_softmax(self.facts(r)) for r in readers):
            # Dropout on a softmax's logits zeros scores, it drops no class or token:
            # the probabilities shift towards the kept ones in training only.
            return skip("feeds a softmax")
        if not readers:
            return skip("output not used")
        if decision.rate == 0:
            return skip(decision.reason)
        self._site(node, facts, decision.kind, decision.rate, INSERT, decision.reason, existing)
        if id(op) not in self.run_.inserted:
            name = terms.unique_name(facts.name + terms.SUFFIX, self.names)
            self.names.add(name)
            self.run_.inserted[id(op)] = name
        name = self.run_.inserted[id(op)]
        return Insert(anchor=op, name=name, **self._new_dropout(decision, shape, fmt))

    def _retarget(self, node, op, facts, layer, decision, shape, fmt, skip_reason, existing):
        """Decides what becomes of a dropout layer after `node`.

        The tool's own layers always follow the policy; the model's own ones
        only with `existing = "retarget"` or `"remove"`.
        """
        run = self.run_
        other = self.facts(layer)
        old_kind = other.class_name
        own = other.is_own_dropout

        def site(kind, rate, action, reason):
            self._site(node, facts, kind, rate, action, reason, existing)

        if id(layer) in run.fates:  # a shared dropout, decided at its first call
            done = run.fates[id(layer)]
            why = "shared, same as its first call"
            if done is None:
                site(old_kind, other.rate, REMOVE, "shared, removed")
            elif done == _KEPT:
                site(old_kind, other.rate, KEEP, why)
            else:
                site(self._wanted_class(done.kind), done.rate, UPDATE, why)
            return
        if not own and self.policy.layer_existing == "remove":
            skip_reason = "existing = remove"
        elif not skip_reason and decision.rate == 0:
            skip_reason = decision.reason
        wanted = self._wanted_class(decision.kind)
        if skip_reason:
            site(old_kind, other.rate, REMOVE, skip_reason)
            run.fates[id(layer)] = None
        elif decision.rate == other.rate and old_kind == wanted:
            why = "inserted earlier, same rate" if own else "already there, same rate"
            site(decision.kind, decision.rate, KEEP, why)
            run.fates[id(layer)] = _KEPT
        else:
            reason = f"{old_kind}({other.rate:g}) -> {wanted}({decision.rate:g})"
            site(decision.kind, decision.rate, UPDATE, reason)
            args = self._new_dropout(decision, shape, fmt)
            run.fates[id(layer)] = Retarget(layer=layer, anchor=op, **args)

    # -- existing dropout layers ------------------------------------------

    def _dropout(self, node, op, facts: LayerFacts) -> None:
        run = self.run_
        strip = run.mode == Mode.STRIP or (
            self.policy.layer_existing == "remove" and id(op) not in run.fates
        )
        if strip:
            if self.view.output_keys(node)[0] in self.final:
                self._site(node, facts, facts.class_name, facts.rate, KEEP, "model output")
                return self._call(node, op)
            why = "strip dropout" if run.mode == Mode.STRIP else "existing = remove"
            self._site(node, facts, facts.class_name, facts.rate, REMOVE, why)
            return self._apply(node, Remove(op, self.view.casts_input(node)))
        fate = run.fates.get(id(op), _KEPT)  # a user's dropout is left as it is
        if fate == _KEPT:
            return self._call(node, op)
        self.changed = True
        if fate is None:
            return self._apply(node, Remove(op, self.view.casts_input(node)))
        return self._apply(node, fate)

    # -- recurrent layers -------------------------------------------------

    def _recurrent(self, node, op, facts: LayerFacts) -> None:
        run = self.run_
        config = self.view.config(op)
        settings = list(terms.dropout_settings(config))

        def site(rate, action, reason, existing=""):
            self._site(node, facts, RECURRENT, rate, action, reason, existing)

        if not settings:
            site(None, SKIP, "cell has no dropout setting")
            return self._call(node, op)
        old = (settings[0]["dropout"], settings[0]["recurrent_dropout"])
        existing = terms.describe_rnn(old)
        if run.mode == Mode.STRIP:
            new_values = (0.0, 0.0)
        else:
            decision = self._decided(node, op, facts, RECURRENT, site, existing)
            if decision is None:
                return self._call(node, op)
            rec = decision.recurrent_rate
            new_values = (decision.rate, old[1] if rec is None else rec)
        reason = terms.describe_change(old, new_values)
        if all((s["dropout"], s["recurrent_dropout"]) == new_values for s in settings):
            action, reason = (SKIP, "rate is 0") if new_values == (0.0, 0.0) else (KEEP, reason)
            site(new_values[0] or None, action, reason, existing)
            return self._call(node, op)
        if facts.wrapper is not None:
            # Rebuilding from config would drop the wrapper and its pruning
            # or quantization state.
            site(None, SKIP, f"wrapped in {facts.wrapper}: left as it is", existing)
            return self._call(node, op)
        if run.mode == Mode.STRIP:
            action = REMOVE
        else:
            action = INSERT if old == (0.0, 0.0) else UPDATE
        site(new_values[0], action, reason, existing)
        if new_values[1] > 0 and run.mode == Mode.ADD:
            run.result.warn(terms.CUDNN)
            if terms.has_lstm_cell(config):
                run.result.warn(terms.LSTM_KERNEL)
        elif old[1] > 0 and new_values[1] == 0 and terms.returns_to_fused_lstm(config, settings):
            run.result.warn(terms.LSTM_KERNEL_BACK)
        for s in settings:
            s["dropout"], s["recurrent_dropout"] = new_values
        self._apply(node, Rebuild(op, config, new_values))

    # -- layers that own their dropout ----------------------------------------

    def _owned(self, node, op, facts: LayerFacts) -> None:
        """Rebuilds a layer with new values for the dropout keys of its config.

        Like an RNN layer: dropout after a MultiHeadAttention or a transformer
        block would not be the dropout it was trained with, so its own
        settings (`LayerFacts.owned`) change. A layer that has none but
        applies an activation inside is reported as skipped.
        """
        run = self.run_
        keys = facts.owned

        def site(rate, action, reason, existing=""):
            self._site(node, facts, OWNED, rate, action, reason, existing)

        if not keys:
            why = f"{facts.class_name} applies its activation inside and has no dropout setting"
            site(None, SKIP, why)
            return self._call(node, op)
        existing = owned.describe_existing(keys)
        if run.mode == Mode.STRIP:
            settings = dict.fromkeys(owned.Role, 0.0)
        else:
            decision = self._decided(node, op, facts, OWNED, site, existing)
            if decision is None:
                return self._call(node, op)
            settings = {
                owned.Role.GENERAL: decision.rate,
                owned.Role.ATTENTION: decision.attention_rate,
                owned.Role.RECURRENT: decision.recurrent_rate,
            }
        values = owned.new_values(keys, settings)
        old = tuple(k.value for k in keys)
        reason = owned.describe(keys, values)
        top = max(values)
        if values == old:
            if top == 0:
                unset = all(settings[k.role] is None for k in keys)
                site(None, SKIP, owned.unset_reason(keys) if unset else "rate is 0", existing)
            else:
                site(top, KEEP, reason, existing)
            return self._call(node, op)
        switch = owned.switches_kernel(facts.attention_kernel, old, values)
        if (
            switch
            and run.mode == Mode.ADD
            and (settings[owned.Role.ATTENTION] is None or self.policy.exact)
        ):
            # Only a user who asked for attention dropout accepts the rounding.
            site(None, SKIP, owned.KERNEL_SWITCH_SKIP, existing)
            return self._call(node, op)
        refusal = facts.rebuild_refusal
        if refusal is None and facts.wrapper is not None:
            refusal = f"wrapped in {facts.wrapper}: left as it is"
        config = self.view.config(op)
        if refusal is None:
            refusal = owned.check_rebuild(self.view, config, keys, values)
        if refusal is not None:
            site(None, SKIP, refusal, existing)
            return self._call(node, op)
        if run.mode == Mode.STRIP:
            action = REMOVE
        else:
            action = INSERT if not any(old) else UPDATE
        site(top, action, reason, existing)
        attention = [v for k, v in zip(keys, values, strict=True) if k.role == owned.Role.ATTENTION]
        if run.mode == Mode.ADD and any(attention):
            run.result.warn(owned.ATTENTION_WARNING)
        if switch:
            run.result.warn(owned.KERNEL_SWITCH_WARNING)
        self._apply(node, Rebuild(op, config, values))
