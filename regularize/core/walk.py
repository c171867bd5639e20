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
from regularize.core import terms
from regularize.core.actions import Action
from regularize.core.actions import Insert
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.guards import gc_paused
from regularize.core.guards import recursion_limit
from regularize.core.layer_sites import KEPT
from regularize.core.layer_sites import LayerSites
from regularize.core.mode import Mode
from regularize.core.policy import Policy
from regularize.core.protocols import Builder
from regularize.core.protocols import GraphView
from regularize.core.protocols import LayerFacts
from regularize.core.report import INSERT
from regularize.core.report import REMOVE
from regularize.core.report import UPDATE
from regularize.core.report import Site
from regularize.core.rules import Candidate
from regularize.core.rules import Decision
from regularize.core.settings import SettingSites


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
    fates: dict = dataclasses.field(default_factory=dict)  # dropout -> None | KEPT | Retarget
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


class _GraphWalk(LayerSites, SettingSites):
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
        self.drop_paths = droppath.GraphDropPaths(self, KEPT) if add else None
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
                    self.apply(node, action)
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

    def data_format_near(self, node, limit: int = 64) -> str:
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

    def record_site(self, node, facts: LayerFacts, kind, rate, action, reason, existing="") -> None:
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

    def _call(self, node, op) -> None:
        if self.builder is not None:
            self.builder.call(node, op)

    def apply(self, node, action: Action) -> None:
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
