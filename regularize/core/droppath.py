"""Stochastic depth (drop path): residual merges, their shortcuts, and what goes on each branch.

A residual merge is an `Add` of two tensors that share an ancestor: the
block's input (the fork) reaches the merge once through the shortcut and
once through the residual branch. Drop path drops the whole branch per
sample during training: a plain `Dropout(rate, noise_shape=(None, 1, ..., 1))`
just before the merge, as Keras' EfficientNet does with its `drop_rate`. The
rate grows linearly with depth as in timm and ConvNeXt: merge i of N (graph
order, nested models included) gets `drop_path * i / N`.

Which input is the shortcut is read from the graph: the one whose path back
to the fork (the nearest common ancestor tensor of both inputs) is shorter;
the fork itself (an identity shortcut) where it is an input. Where both are
equally long and neither is the fork, the merge is skipped: dropping the
wrong branch would drop the shortcut.

A scaled residual merge is one too: Inception-ResNet's `CustomScaleLayer`
(`x + scale * branch`, the branch its second input) and an `Add` one of whose
inputs is a constant scale of the branch (`x + Rescaling(0.2)(r)`, `x + r *
0.2`), which is the branch whatever the lengths. Dropout is the identity at
inference, so the merge computes the same sums bit for bit.

No Keras import here: the walk (`regularize.core.walk`) calls this module
over any `GraphView`, for both Keras APIs.
"""

from __future__ import annotations

import dataclasses
import re

from regularize.core import terms
from regularize.core.actions import Insert
from regularize.core.actions import Retarget
from regularize.core.merges import Merge
from regularize.core.merges import find_merges
from regularize.core.merges import layers_text
from regularize.core.protocols import GraphView
from regularize.core.protocols import LayerFacts
from regularize.core.report import INSERT
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE

# Drop-path layers are named `<anchor>__droppath` (`_<n>` added on a name
# clash): a second run finds its own, and `remove_dropout` strips them like
# any dropout layer.
SUFFIX = "__droppath"
OWN_NAME = re.compile(re.escape(SUFFIX) + r"(_\d+)?$")
KIND = "DropPath"  # `Site.kind` of a drop-path site
# Layers that already drop a branch per sample without being a Dropout
# (Keras' ConvNeXt with `drop_path_rate > 0`, keras-hub/keras-cv blocks):
# a branch that ends in one gets no drop path.
STOCHASTIC_DEPTH_CLASSES = ("StochasticDepth", "DropPath")
NO_MERGES = (
    "drop path: the model has no residual merges (an `Add` of a block's input and its branch)"
)


def is_own_name(name: str) -> bool:
    """Whether `name` is the name of a drop-path layer this tool inserted."""
    return bool(OWN_NAME.search(name))


def noise_shape(shape: tuple) -> tuple:
    """One draw per sample: `(None, 1, ..., 1)` for a tensor of `shape`."""
    return (None,) + (1,) * (len(shape) - 1)


# -- the walk's side --------------------------------------------------------


@dataclasses.dataclass
class State:
    """What the drop-path part of one walk shares across nested graphs."""

    merges: dict = dataclasses.field(default_factory=dict)  # id(view) -> {id(node): Merge}
    counts: dict = dataclasses.field(default_factory=dict)  # id(view) -> merges, nested too
    starts: dict = dataclasses.field(default_factory=dict)  # id(view) -> merges before it
    names: dict = dataclasses.field(default_factory=dict)  # id(anchor) -> new layer's name
    claimed: set = dataclasses.field(default_factory=set)  # dropout layers drop path decides
    total: int = 0


def prepare(run, view: GraphView) -> None:
    """Counts the residual merges of the whole model (the schedule's N); warns if none."""
    if run.policy.drop_path is None:
        return
    run.drop.total = _count(run, view)
    if run.drop.total == 0:
        run.result.warn(NO_MERGES)


def _merges_of(run, view: GraphView) -> dict:
    if id(view) not in run.drop.merges:
        found = find_merges(view, list(view.nodes()), lambda op: run.facts(view, op))
        run.drop.merges[id(view)] = {id(m.node): m for m in found}
    return run.drop.merges[id(view)]


def _count(run, view: GraphView) -> int:
    if id(view) not in run.drop.counts:
        n = len(_merges_of(run, view))
        for node in view.nodes():
            op = view.operation(node)
            if run.facts(view, op).is_graph_model:
                sub = run.sub_view(view, op)
                n += _count(run, sub) if sub is not None else 0
        run.drop.counts[id(view)] = n
    return run.drop.counts[id(view)]


def claims(run, op, facts: LayerFacts) -> bool:
    """Whether the dropout layer `op` is a drop path's: the activation sites leave it alone."""
    return facts.is_own_drop_path or id(op) in run.drop.claimed


class GraphDropPaths:
    """The drop-path decisions of one graph walk (`walk._GraphWalk`), applied node by node.

    Every decision is made up front (the branch's last layer comes before the
    merge); `after(node)` records the sites of `node` and applies the new
    layers that go after it.
    """

    def __init__(self, graph, kept):
        self.graph = graph
        self.pending: dict = {}  # id(node) -> [(site args, Insert or None)]
        self.producers: dict | None = None  # tensor key -> node
        run, view = graph.run_, graph.view
        for node in graph.nodes:
            op = view.operation(node)
            if graph.facts(op).is_own_drop_path:
                # Left as it is, unless a merge below decides it.
                run.fates.setdefault(id(op), kept)
        self.kept = kept
        if graph.policy.drop_path is None:
            return
        merges = _merges_of(run, view)
        index = run.drop.starts.get(id(view), 0)
        for node in graph.nodes:
            op = view.operation(node)
            if graph.facts(op).is_graph_model:
                sub = run.sub_view(view, op)
                if sub is not None:
                    run.drop.starts.setdefault(id(sub), index)
                    index += _count(run, sub)
            elif id(node) in merges:
                index += 1
                self._decide(merges[id(node)], index)

    def after(self, node) -> None:
        """Records the drop-path sites of `node`; inserts what goes after it."""
        for site, action in self.pending.pop(id(node), ()):
            self.graph.record_site(*site)
            if action is not None:
                self.graph.apply(node, action)

    def _queue(self, node, site: tuple, action: Insert | None = None) -> None:
        self.pending.setdefault(id(node), []).append((site, action))

    def _decide(self, merge: Merge, index: int) -> None:
        graph, view, run = self.graph, self.graph.view, self.graph.run_
        total = run.drop.total
        rate = round(graph.policy.drop_path * index / total, 4)  # as `Policy.schedule`
        add = view.operation(merge.node)
        add_facts = graph.facts(add)

        def skip_merge(reason: str) -> None:
            self._queue(merge.node, (merge.node, add_facts, KIND, None, SKIP, reason))

        if merge.reason:
            return skip_merge(merge.reason)
        if merge.inner:
            # Dropping that path drops whole blocks (and their own drop paths) at once.
            merges = "merge" if merge.inner == 1 else "merges"
            return skip_merge(
                f"the branch spans {merge.inner} other residual {merges} at a coarser "
                "resolution: a long skip, not a block"
            )
        if graph.inert:
            return skip_merge(graph.inert)
        node = self._producer(merge.branch)
        if node is None:
            return skip_merge("the residual branch is a graph input")
        op = view.operation(node)
        facts = graph.facts(op)
        if len(view.output_keys(node)) != 1:
            return skip_merge(f"the residual branch ends in {facts.name!r}, with several outputs")
        others = [r for r in graph.readers.get(merge.branch, []) if r is not add]
        if others:
            names = ", ".join(sorted({graph.facts(r).name for r in others}))
            return skip_merge(f"the residual branch also feeds {names}")
        if merge.branch in graph.outputs:
            return skip_merge("the residual branch is a model output")
        shape = view.out_shape(node)
        if shape is None or len(shape) < 2:
            return skip_merge("the residual branch has no batch of samples to drop")
        shortcut = "identity" if merge.identity else layers_text(merge.lengths[1])
        why = f"block {index}/{total} before {add_facts.name}, shortcut {shortcut}"
        shape = tuple(shape)
        if facts.is_dropout:
            return self._existing(node, op, facts, rate, shape, why)
        if facts.class_name in STOCHASTIC_DEPTH_CLASSES:
            reason = f"branch already ends in {facts.class_name}"
            return self._queue(node, (node, facts, KIND, None, KEEP, reason))
        if rate == 0:
            return self._queue(node, (node, facts, KIND, None, SKIP, f"rate is 0, {why}"))
        self._queue(node, *self._insert(node, op, facts, rate, shape, why))

    def _producer(self, key):
        if self.producers is None:
            view = self.graph.view
            self.producers = {k: n for n in self.graph.nodes for k in view.output_keys(n)}
        return self.producers.get(key)

    def _insert(self, node, anchor, facts: LayerFacts, rate, shape, why, at=None):
        """(site args, Insert) for a drop path after `anchor` (the node `at`)."""
        graph, drop = self.graph, self.graph.run_.drop
        if id(anchor) not in drop.names:
            name = terms.unique_name(facts.name + SUFFIX, graph.names)
            graph.names.add(name)
            drop.names[id(anchor)] = name
        action = Insert(anchor=anchor, name=drop.names[id(anchor)], **self._new(node, rate, shape))
        site = (at or node, facts, KIND, rate, INSERT, why)
        return site, action

    def _new(self, node, rate, shape) -> dict:
        return {
            "kind": "Dropout",
            "rate": rate,
            "shape": shape,
            "data_format": self.graph.data_format_near(node),
            "noise_shape": noise_shape(shape),
        }

    def _existing(self, node, layer, facts: LayerFacts, rate, shape, why) -> None:
        """The branch already ends in a dropout layer: never a second one on it.

        The tool's own drop path follows the policy; the model's own dropout
        (EfficientNet's drop-connect) stays with `existing = "keep"`, becomes
        the drop path with `"retarget"` (keeping its name), or goes with
        `"remove"` and the drop path takes its place.
        """
        graph, run = self.graph, self.graph.run_
        if id(layer) in run.drop.claimed:  # a shared dropout, decided at its first call
            return
        existing = f"{facts.label}({facts.rate:g})"
        parent = graph.view.parents(node)[0] if graph.view.parents(node) else node
        anchor = graph.view.operation(parent)
        anchor_facts = graph.facts(anchor)

        def site(kind, r, action, reason):
            self._queue(node, (parent, anchor_facts, kind, r, action, reason, existing))

        wanted = noise_shape(shape)
        same = facts.rate == rate and facts.class_name == "Dropout" and facts.noise_shape == wanted
        policy = graph.policy.layer_existing
        if not facts.is_own_drop_path and policy == "keep":
            return site(
                facts.class_name, facts.rate, KEEP, "branch already ends in a dropout layer"
            )
        run.drop.claimed.add(id(layer))
        if not facts.is_own_drop_path and policy == "remove":
            # The walk removes it (existing = "remove"); the drop path goes in its place.
            if rate == 0:
                return site(KIND, None, SKIP, f"rate is 0, {why}")
            if anchor_facts.is_own_drop_path:
                # The tool's drop path sits before the removed layer: it stays the
                # branch's one drop path (a new one after it would stack a second).
                return site(KIND, anchor_facts.rate, KEEP, "drop path inserted earlier")
            run.drop.claimed.discard(id(layer))
            site_args, action = self._insert(parent, anchor, anchor_facts, rate, shape, why)
            self._queue(node, site_args, action)
            return
        if rate == 0:
            run.fates[id(layer)] = None
            return site(KIND, facts.rate, REMOVE, f"rate is 0, {why}")
        if same:
            run.fates[id(layer)] = self.kept
            own = "inserted earlier" if facts.is_own_drop_path else "already there"
            return site(KIND, rate, KEEP, f"drop path {own}, same rate")
        run.fates[id(layer)] = Retarget(
            layer=layer, anchor=anchor, **self._new(parent, rate, shape)
        )
        site(KIND, rate, UPDATE, f"{existing} -> {KIND}({rate:g}), {why}")
