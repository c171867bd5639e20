"""Properties of the decision core, driven through a tiny pure-Python `GraphView`.

No Keras and no TensorFlow: hypothesis draws a layer graph (dense layers with
or without an activation, dropout, BatchNormalization, residual adds, RNNs,
a nested model), `core.walk` decides it, and the properties hold in
milliseconds. tests/test_properties.py checks the same rewrite end to end
through real Keras models.
"""

from __future__ import annotations

import dataclasses

import fake_graph
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from regularize import core
from regularize.core.policy import Policy
from regularize.core.report import INSERT
from regularize.core.report import REMOVE

KINDS = ("relu", "linear", "dropout", "own_dropout", "bn", "add", "rnn", "nested")


@dataclasses.dataclass(eq=False)
class Op:
    name: str
    kind: str
    rate: float = 0.5
    sub: FakeView | None = None
    config: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class Node:
    op: Op
    parents: list
    key: str
    training: bool | None = None


class FakeView(fake_graph.FakeView):
    """Every tensor is (None, 8)."""

    def out_shape(self, node):
        return (None, 8)

    def facts(self, op):
        kind = op.kind
        return core.LayerFacts(
            name=op.name,
            class_name=kind.title(),
            activation="relu" if kind == "relu" else None,
            is_graph_model=kind == "nested",
            is_dropout=kind in ("dropout", "own_dropout"),
            is_own_dropout=kind == "own_dropout",
            is_recurrent=kind == "rnn",
            is_batchnorm=kind == "bn",
            is_normalization=kind == "bn",
            is_merge=kind == "add",
            rate=op.rate if kind in ("dropout", "own_dropout") else None,
        )


@st.composite
def graphs(draw) -> FakeView:
    """A chain with skips: each layer reads one or two earlier tensors."""
    source = Node(Op("input", "input"), [], "t0")
    nodes: list[Node] = []
    size = draw(st.integers(1, 12))
    for i in range(1, size + 1):
        kind = draw(st.sampled_from(KINDS))
        earlier = [source, *nodes]
        parents = [earlier[-1]]
        if kind == "add" and len(earlier) > 1:
            parents.append(earlier[draw(st.integers(0, len(earlier) - 2))])
        name = f"l{i}__dropout" if kind == "own_dropout" else f"l{i}"
        op = Op(name, kind, rate=draw(st.sampled_from((0.1, 0.3, 0.5))))
        if kind == "rnn":
            op.config = {"dropout": 0.0, "recurrent_dropout": draw(st.sampled_from((0.0, 0.2)))}
        if kind == "nested":
            inner = Node(Op(f"l{i}_inner", "relu"), [], f"n{i}a")
            last = Node(Op(f"l{i}_out", "linear"), [inner], f"n{i}b")
            op.sub = FakeView([inner, last], [last.key])
        training = draw(st.sampled_from((None, False)))
        nodes.append(Node(op, parents, f"t{i}", training))
    return FakeView(nodes, [nodes[-1].key])


policies = st.builds(
    Policy,
    rate=st.sampled_from((0.0, 0.2, 0.5)),
    preset=st.sampled_from(("all", "head", "blocks")),
    existing=st.sampled_from(("keep", "retarget", "remove")),
    recurrent_rate=st.sampled_from((None, 0.0, 0.1)),
)


def _all_nodes(view: FakeView):
    """(graph, node) for every node, nested graphs included."""
    for node in view.nodes():
        yield view, node
        if node.op.sub is not None:
            yield from _all_nodes(node.op.sub)


class Recorder:
    """A `core.Builder` that notes what it is asked to build."""

    def __init__(self):
        self.calls: list = []

    def graph(self, view):
        return self

    def call(self, node, op):
        self.calls.append(("call", node.key))

    def insert(self, node, action):
        self.calls.append(("insert", node.key))

    def retarget(self, node, action):
        self.calls.append(("retarget", node.key))

    def remove(self, node, action):
        self.calls.append(("remove", node.key))

    def rebuild(self, node, action):
        self.calls.append(("rebuild", node.key))

    def finish(self, *, changed, top):
        return "new" if changed or top else "old"


@settings(max_examples=200, deadline=None)
@given(graphs(), policies)
def test_plan_is_the_walk_without_a_builder(view, policy):
    planned = core.walk(view, policy)
    recorder = Recorder()
    built = core.walk(view, policy, builder=recorder)
    assert planned.sites == built.sites
    assert planned.warnings == built.warnings
    assert planned.model is None and built.model == "new"
    # Every node is replayed once, in order (nested graphs in between).
    keys = [key for what, key in recorder.calls if what != "insert"]
    assert [k for k in keys if k.startswith("t")] == [n.key for n in view.nodes()]


@settings(max_examples=200, deadline=None)
@given(graphs(), policies)
def test_inserts_never_follow_outputs_batchnorm_or_unused_tensors(view, policy):
    result = core.walk(view, policy)
    inserts = [a for a in result.actions if isinstance(a, core.Insert)]
    assert len(inserts) == sum(s.action == INSERT and s.kind != "recurrent" for s in result.sites)
    for action in inserts:
        graph, node = next((g, n) for g, n in _all_nodes(view) if n.op is action.anchor)
        readers = [n for n in graph.nodes() if node in n.parents]
        assert node.key not in graph.graph_outputs()
        assert readers and not any(r.op.kind == "bn" for r in readers)
        assert action.rate > 0 and action.name == f"{node.op.name}__dropout"
    assert all(0.0 <= s.depth <= 1.0 for s in result.sites)
    if policy.rate == 0.0:
        assert inserts == []


@settings(max_examples=200, deadline=None)
@given(graphs())
def test_strip_removes_every_dropout_but_an_output_and_inserts_nothing(view):
    result = core.walk(view, Policy(rate=0.0), core.Mode.STRIP)
    removed = {s.layer for s in result.sites if s.action == REMOVE}
    for node in view.nodes():
        if node.op.kind in ("dropout", "own_dropout"):
            assert (node.op.name in removed) == (node.key not in view.graph_outputs())
    assert not any(isinstance(a, (core.Insert, core.Retarget)) for a in result.actions)


@settings(max_examples=200, deadline=None)
@given(graphs(), policies)
def test_the_walk_is_deterministic_and_leaves_the_graph_alone(view, policy):
    configs = [dict(n.op.config) for n in view.nodes()]
    first = core.walk(view, policy)
    assert core.walk(view, policy).sites == first.sites
    assert [n.op.config for n in view.nodes()] == configs
