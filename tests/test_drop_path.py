"""Stochastic depth (drop path): residual merges, shortcuts, the linear schedule, both engines.

The shortcut analysis runs first over a tiny pure-Python `GraphView` (no
TensorFlow); then tiny Keras 3 residual models get the three-part check
(structure, bit-exact inference, save -> reload with plain Keras), a `fit`
step, reruns and `remove_dropout`; the Keras Applications and the Keras 2
engine are slow tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import fake_graph
import keras
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import regularize
from regularize import core
from regularize.cli import cli
from regularize.core import droppath
from regularize.core import merges
from regularize.core.errors import PolicyError
from regularize.core.policy import Policy
from regularize.core.report import INSERT
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.report import Report
from regularize.keras3 import graph

L = keras.layers
ROOT = Path(__file__).resolve().parents[1]


# -- a pure-Python GraphView ----------------------------------------------


@dataclasses.dataclass(eq=False)
class Op:
    name: str
    kind: str  # conv, relu, bn, add, dropout, droppath, nested
    rate: float | None = None
    sub: FakeView | None = None


@dataclasses.dataclass(eq=False)
class Node:
    op: Op
    parents: list
    key: str


class FakeView(fake_graph.FakeView):
    """Every tensor is (None, 4, 4, 8); the graph's input nodes are no parents."""

    def parents(self, node):
        return [p for p in node.parents if p in self._nodes]

    def out_shape(self, node):
        return (None, 4, 4, 8)

    def training_flag(self, node):
        return None

    def facts(self, op):
        dropout = op.kind in ("dropout", "droppath")
        return core.LayerFacts(
            name=op.name,
            class_name={"dropout": "Dropout", "droppath": "Dropout"}.get(op.kind, op.kind.title()),
            activation="relu" if op.kind == "relu" else None,
            is_graph_model=op.kind == "nested",
            is_dropout=dropout,
            is_own_drop_path=op.kind == "droppath",
            is_batchnorm=op.kind == "bn",
            is_merge=op.kind == "add",
            is_add=op.kind == "add",
            rate=op.rate if dropout else None,
            noise_shape=(None, 1, 1, 1) if dropout else None,
        )

    def config(self, op):
        return {}


class Graph:
    """Builds a `FakeView`: `g.layer(name, kind, *parents)`; the last layer is the output."""

    def __init__(self, *inputs):
        self.inputs = [Node(Op(name, "input"), [], name) for name in inputs or ("x",)]
        self.nodes: list[Node] = []

    @property
    def x(self):
        return self.inputs[0]

    def layer(self, name, kind, *parents, rate=None, sub=None):
        node = Node(Op(name, kind, rate, sub), list(parents), name)
        self.nodes.append(node)
        return node

    def view(self):
        return FakeView(self.nodes, [self.nodes[-1].key])


def _blocks(g: Graph, n: int, start) -> Node:
    """`n` identity-shortcut blocks: h + bn(conv(h))."""
    h = start
    for i in range(n):
        bn = g.layer(f"b{i}_bn", "bn", g.layer(f"b{i}_conv", "conv", h))
        h = g.layer(f"b{i}_add", "add", h, bn)
    return h


def _merges(view):
    return merges.find_merges(view, view.nodes(), view.facts)


def _drop_sites(sites):
    return [s for s in sites if s.kind == droppath.KIND or "dropout layer" in s.reason]


def test_identity_shortcut_is_the_fork():
    g = Graph()
    _blocks(g, 1, g.x)
    (merge,) = _merges(g.view())
    assert (merge.branch, merge.shortcut, merge.fork) == ("b0_bn", "x", "x")
    assert merge.identity and merge.lengths == (2, 0) and merge.reason == ""


def test_projection_shortcut_is_the_shorter_path():
    g = Graph()
    short = g.layer("short_bn", "bn", g.layer("short_conv", "conv", g.x))
    a = g.layer("a_relu", "relu", g.layer("a_conv", "conv", g.x))
    b = g.layer("b_bn", "bn", g.layer("b_conv", "conv", a))
    g.layer("add", "add", short, b)  # the shortcut comes first here
    (merge,) = _merges(g.view())
    assert (merge.branch, merge.shortcut, merge.fork) == ("b_bn", "short_bn", "x")
    assert not merge.identity and merge.lengths == (4, 2)


def test_fork_is_the_nearest_common_ancestor():
    g = Graph()
    stem = g.layer("stem", "conv", g.x)
    _blocks(g, 3, stem)
    merges = _merges(g.view())
    assert [(m.fork, m.shortcut, m.branch) for m in merges] == [
        ("stem", "stem", "b0_bn"),
        ("b0_add", "b0_add", "b1_bn"),
        ("b1_add", "b1_add", "b2_bn"),
    ]


def test_equal_paths_are_ambiguous_and_dropout_counts_zero():
    g = Graph()
    a = g.layer("a", "conv", g.x)
    b = g.layer("b_drop", "dropout", g.layer("b", "conv", g.x), rate=0.1)
    g.layer("add", "add", a, b)
    (merge,) = _merges(g.view())
    assert merge.branch is None and merge.lengths == (1, 1)
    assert merge.reason == "ambiguous shortcut: both inputs 1 layer from their fork"
    result = core.walk(g.view(), Policy(rate=0.0, drop_path=0.2))
    (site,) = _drop_sites(result.sites)
    assert (site.layer, site.action, site.rate) == ("add", SKIP, None)
    assert site.reason == merge.reason
    assert result.actions == []


def test_adds_that_are_no_residual_merge():
    g = Graph("x", "y")
    a = g.layer("a", "conv", g.inputs[0])
    b = g.layer("b", "conv", g.inputs[1])
    g.layer("two_inputs", "add", a, b)  # no shared ancestor
    g.layer("twice", "add", a, a)  # one tensor twice
    g.layer("three", "add", a, g.layer("c", "conv", a), g.layer("d", "relu", a))
    assert _merges(g.view()) == []
    result = core.walk(g.view(), Policy(rate=0.0, drop_path=0.2))
    assert _drop_sites(result.sites) == []
    assert result.warnings == [droppath.NO_MERGES]


class Recorder:
    """A `core.Builder` that keeps the actions it is asked to insert."""

    def __init__(self):
        self.inserted: list = []

    def graph(self, view):
        return self

    def call(self, node, op):
        pass

    def insert(self, node, action):
        self.inserted.append((node.key, action))

    def retarget(self, node, action):
        self.inserted.append((node.key, action))

    def remove(self, node, action):
        pass

    def rebuild(self, node, action):
        pass

    def finish(self, *, changed, top):
        return "new"


def test_rates_grow_linearly_in_graph_order():
    g = Graph()
    _blocks(g, 4, g.layer("stem", "conv", g.x))
    recorder = Recorder()
    result = core.walk(g.view(), Policy(rate=0.0, drop_path=0.3), builder=recorder)
    sites = _drop_sites(result.sites)
    assert [(s.layer, s.action, s.rate) for s in sites] == [
        (f"b{i}_bn", INSERT, round(0.3 * (i + 1) / 4, 4)) for i in range(4)
    ]
    assert sites[0].reason == "block 1/4 before b0_add, shortcut identity"
    assert [(key, a.name, a.rate, a.noise_shape) for key, a in recorder.inserted] == [
        (f"b{i}_bn", f"b{i}_bn__droppath", s.rate, (None, 1, 1, 1)) for i, s in enumerate(sites)
    ]
    # Off by default: the same walk without drop_path inserts nothing there.
    assert _drop_sites(core.walk(g.view(), Policy(rate=0.0)).sites) == []


def test_schedule_counts_the_merges_of_nested_models():
    inner = Graph("inner_in")
    _blocks(inner, 2, inner.x)
    outer = Graph()
    stem = outer.layer("stem", "conv", outer.x)
    nested = outer.layer("inner", "nested", stem, sub=inner.view())
    bn = outer.layer("c_bn", "bn", outer.layer("c_conv", "conv", nested))
    outer.layer("c_add", "add", nested, bn)
    result = core.walk(outer.view(), Policy(rate=0.0, drop_path=0.3))
    assert [(s.layer, s.rate) for s in _drop_sites(result.sites)] == [
        ("inner/b0_bn", 0.1),
        ("inner/b1_bn", 0.2),
        ("c_bn", 0.3),
    ]


def test_branch_read_elsewhere_is_skipped():
    g = Graph()
    bn = g.layer("bn", "bn", g.layer("conv", "conv", g.x))
    add = g.layer("add", "add", g.x, bn)
    g.layer("side", "relu", bn)
    g.layer("out", "add", add, g.layer("side2", "conv", add))
    sites = _drop_sites(core.walk(g.view(), Policy(rate=0.0, drop_path=0.2)).sites)
    assert [(s.layer, s.action, s.reason) for s in sites[:1]] == [
        ("add", SKIP, "the residual branch also feeds side")
    ]


@st.composite
def residual_graphs(draw) -> FakeView:
    """A chain where each layer reads the last tensor, and an add also an earlier one."""
    g = Graph()
    h = [g.x]
    for i in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(("conv", "relu", "bn", "dropout", "droppath", "add")))
        name = f"l{i}__droppath" if kind == "droppath" else f"l{i}"
        parents = [h[-1]]
        if kind == "add":
            parents.append(h[draw(st.integers(0, len(h) - 1))])
        h.append(g.layer(name, kind, *parents, rate=draw(st.sampled_from((0.1, 0.2)))))
    return g.view()


@settings(
    max_examples=int(os.environ.get("REGULARIZE_DROP_PATH_EXAMPLES", 150)),
    deadline=None,
    derandomize=True,
)
@given(
    residual_graphs(),
    st.sampled_from((None, 0.0, 0.2)),
    st.sampled_from(("keep", "retarget", "remove")),
)
def test_plan_is_the_build_and_rates_follow_the_schedule(view, drop_path, existing):
    policy = Policy(rate=0.0, drop_path=drop_path, existing=existing)
    planned = core.walk(view, policy)
    built = core.walk(view, policy, builder=Recorder())
    assert planned.sites == built.sites and planned.warnings == built.warnings
    sites = [s for s in planned.sites if s.kind == droppath.KIND]
    if drop_path is None:
        assert sites == []
        return
    merges = _merges(view)
    assert len(_drop_sites(planned.sites)) == len(merges)
    rates = [s.rate for s in sites if s.action in (INSERT, UPDATE)]
    assert rates == sorted(rates) and all(0 < r <= drop_path for r in rates)
    # Never two drop paths on one branch: each insert follows a layer that is no dropout,
    # or (existing = "remove") a dropout layer that the same walk removes.
    removed = {id(a.layer) for a in planned.actions if isinstance(a, core.Remove)}
    for action in planned.actions:
        if isinstance(action, core.Insert) and action.noise_shape is not None:
            assert action.anchor.kind != "droppath"
            if action.anchor.kind == "dropout":
                assert existing == "remove" and id(action.anchor) in removed


# -- Keras 3: tiny residual models ----------------------------------------


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(2, *shape)).astype("float32")


def resnet_tiny():
    """A stem, a projection block, two identity blocks (one ends in relu), a head."""
    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(x)
    s = L.Conv2D(8, 1, name="p_short")(h)
    y = L.Conv2D(8, 3, padding="same", name="p_conv1")(h)
    y = L.Activation("relu", name="p_relu")(y)
    y = L.Conv2D(8, 3, padding="same", name="p_conv2")(y)
    y = L.BatchNormalization(name="p_bn")(y)
    h = L.Add(name="p_add")([s, y])
    y = L.Conv2D(8, 3, padding="same", name="i1_conv")(h)
    y = L.BatchNormalization(name="i1_bn")(y)
    h = L.Add(name="i1_add")([h, y])
    y = L.Conv2D(8, 3, padding="same", activation="relu", name="i2_conv")(h)
    h = L.Add(name="i2_add")([y, h])
    h = L.GlobalAveragePooling2D(name="pool")(h)
    out = L.Dense(3, name="logits")(h)
    model = keras.Model(x, out, name="resnet_tiny")
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.fixture(scope="module")
def tiny():
    model = resnet_tiny()
    x = _x((8, 8, 3))
    return model, x, [np.asarray(model(x, training=False))]


def _drop_layers(model) -> dict:
    return {
        layer.name: (layer.rate, tuple(layer.noise_shape))
        for layer in model.layers
        if isinstance(layer, L.Dropout) and layer.noise_shape is not None
    }


def _assert_outputs(model, x, expected):
    out = model(x, training=False)
    for a, b in zip(keras.tree.flatten(out), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def _reader(model, name) -> str:
    """The layer that reads the output of `name` in `model`'s graph (exactly one).

    Read from the graph's nodes: the layers are shared with the input model,
    so `layer.output` would be the input model's tensor.
    """
    readers = [
        node.operation.name
        for node in graph.iter_nodes(graph.graph_of(model))
        for t in node.input_tensors
        if t._keras_history.operation.name == name
    ]
    (reader,) = readers
    return reader


def test_tiny_resnet_gets_a_drop_path_on_each_branch(tiny, tmp_path):
    model, x, expected = tiny
    report = Report()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.3, report=report)
    sites = _drop_sites(report.sites)
    assert [(s.layer, s.action, s.rate, s.reason) for s in sites] == [
        ("p_bn", INSERT, 0.1, "block 1/3 before p_add, shortcut 1 layer"),
        ("i1_bn", INSERT, 0.2, "block 2/3 before i1_add, shortcut identity"),
        ("i2_conv", INSERT, 0.3, "block 3/3 before i2_add, shortcut identity"),
    ]
    assert _drop_layers(new) == {
        "p_bn__droppath": (0.1, (None, 1, 1, 1)),
        "i1_bn__droppath": (0.2, (None, 1, 1, 1)),
        "i2_conv__droppath": (0.3, (None, 1, 1, 1)),
    }
    # On the branch, just before the merge; the shortcut is untouched.
    assert _reader(new, "p_bn") == "p_bn__droppath"
    assert _reader(new, "p_bn__droppath") == "p_add"
    assert _reader(new, "p_short") == "p_add"
    assert _reader(new, "i2_conv") == "i2_conv__droppath"
    assert all(type(layer) is L.Dropout for layer in new.layers if "__droppath" in layer.name)
    _assert_outputs(new, x, expected)
    path = tmp_path / "dp.keras"
    new.save(path)
    reloaded = keras.models.load_model(path)  # plain Dropout layers: no custom objects
    assert _drop_layers(reloaded) == _drop_layers(new)
    _assert_outputs(reloaded, x, expected)


@pytest.mark.slow
def test_output_loads_in_a_process_without_regularize(tiny, tmp_path):
    model, x, expected = tiny
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.3)
    path = tmp_path / "dp.keras"
    new.save(path)
    code = textwrap.dedent(
        f"""
        import json, sys, keras
        m = keras.models.load_model({str(path)!r})
        print(json.dumps({{l.name: [l.rate, list(l.noise_shape)] for l in m.layers
                          if l.name.endswith("__droppath")}}))
        assert "regularize" not in sys.modules
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        name: [rate, list(shape)] for name, (rate, shape) in _drop_layers(new).items()
    }


def test_fit_step_drops_whole_samples():
    model = resnet_tiny()  # fit changes the shared variables: not the module's model
    x = _x((8, 8, 3))
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.5)
    before = [np.asarray(w).copy() for w in new.weights]
    new.fit(x, np.zeros((2, 3), "float32"), epochs=1, verbose=0)
    assert any(
        not np.array_equal(a, np.asarray(w)) for a, w in zip(before, new.weights, strict=True)
    )
    # In training, a drop path zeroes whole samples of its branch, or keeps them scaled.
    layer = new.get_layer("i2_conv__droppath")
    y = np.ones((64, 4, 4, 8), "float32")
    out = np.asarray(layer(y, training=True))
    per_sample = out.reshape(64, -1)
    assert all(len(set(row)) == 1 for row in per_sample)
    assert set(np.unique(per_sample)) <= {0.0, 1 / (1 - layer.rate)}


def test_remove_dropout_strips_drop_paths_bit_exact(tiny):
    model, x, expected = tiny
    new = regularize.add_dropout(model, rate=0.2, drop_path=0.3)
    report = Report()
    bare = regularize.remove_dropout(new, report=report)
    assert [layer.name for layer in bare.layers] == [layer.name for layer in model.layers]
    removed = {s.layer for s in report.sites if s.action == REMOVE}
    assert {"p_bn__droppath", "i1_bn__droppath", "i2_conv__droppath"} <= removed
    _assert_outputs(bare, x, expected)


def test_rerun_keeps_updates_or_removes_and_never_stacks(tiny):
    model, x, expected = tiny
    first = regularize.add_dropout(model, rate=0.2, drop_path=0.3)
    # Both on a branch that ends in an activation: the dropout first, the drop path last.
    assert _reader(first, "i2_conv") == "i2_conv__dropout"
    assert _reader(first, "i2_conv__dropout") == "i2_conv__droppath"
    names = [layer.name for layer in first.layers]

    report = Report()
    same = regularize.add_dropout(first, rate=0.2, drop_path=0.3, report=report)
    assert [layer.name for layer in same.layers] == names
    assert {s.action for s in _drop_sites(report.sites)} == {KEEP}
    assert _drop_layers(same) == _drop_layers(first)

    report = Report()
    more = regularize.add_dropout(first, rate=0.2, drop_path=0.6, report=report)
    assert [layer.name for layer in more.layers] == names
    assert [s.action for s in _drop_sites(report.sites)] == [UPDATE] * 3
    assert _drop_layers(more) == {
        "p_bn__droppath": (0.2, (None, 1, 1, 1)),
        "i1_bn__droppath": (0.4, (None, 1, 1, 1)),
        "i2_conv__droppath": (0.6, (None, 1, 1, 1)),
    }
    _assert_outputs(more, x, expected)

    off = regularize.add_dropout(first, rate=0.2)  # drop_path None: left as they are
    assert _drop_layers(off) == _drop_layers(first)
    report = Report()
    gone = regularize.add_dropout(first, rate=0.2, drop_path=0.0, report=report)
    assert _drop_layers(gone) == {}
    assert [s.action for s in _drop_sites(report.sites)] == [REMOVE] * 3
    assert "i2_conv__dropout" in [layer.name for layer in gone.layers]
    _assert_outputs(gone, x, expected)


def efficientnet_like(rate=0.1):
    """Blocks whose branch already ends in a per-sample Dropout (EfficientNet's drop-connect)."""
    keras.utils.set_random_seed(4)
    x = keras.Input((8, 8, 4))
    h = x
    for i in range(2):
        y = L.Conv2D(4, 3, padding="same", name=f"e{i}_conv")(h)
        y = L.BatchNormalization(name=f"e{i}_bn")(y)
        y = L.Dropout(rate * (i + 1), noise_shape=(None, 1, 1, 1), name=f"e{i}_drop")(y)
        h = L.Add(name=f"e{i}_add")([y, h])
    return keras.Model(x, L.Conv2D(2, 1, name="out")(h))


@pytest.mark.parametrize("existing", ["keep", "retarget", "remove"])
def test_branch_with_dropout_gets_no_second_one(existing, tmp_path):
    model = efficientnet_like()
    x = _x((8, 8, 4))
    expected = [np.asarray(model(x, training=False))]
    report = Report()
    policy = Policy(rate=0.0, drop_path=0.4, existing=existing)
    new = regularize.add_dropout(model, policy=policy, report=report)
    sites = _drop_sites(report.sites)
    dropouts = {
        layer.name: (layer.rate, tuple(layer.noise_shape))
        for layer in new.layers
        if isinstance(layer, L.Dropout)
    }
    if existing == "keep":
        assert [(s.layer, s.action, s.reason, s.existing) for s in sites] == [
            ("e0_bn", KEEP, "branch already ends in a dropout layer", "Dropout(0.1)"),
            ("e1_bn", KEEP, "branch already ends in a dropout layer", "Dropout(0.2)"),
        ]
        assert dropouts == {"e0_drop": (0.1, (None, 1, 1, 1)), "e1_drop": (0.2, (None, 1, 1, 1))}
        assert new is not model
    elif existing == "retarget":
        assert [(s.layer, s.action, s.rate) for s in sites] == [
            ("e0_bn", UPDATE, 0.2),
            ("e1_bn", UPDATE, 0.4),
        ]
        assert sites[0].reason == "Dropout(0.1) -> DropPath(0.2), block 1/2 before e0_add, " + (
            "shortcut identity"
        )
        assert dropouts == {"e0_drop": (0.2, (None, 1, 1, 1)), "e1_drop": (0.4, (None, 1, 1, 1))}
    else:
        assert [(s.layer, s.action, s.rate) for s in sites] == [
            ("e0_bn", INSERT, 0.2),
            ("e1_bn", INSERT, 0.4),
        ]
        assert dropouts == {
            "e0_bn__droppath": (0.2, (None, 1, 1, 1)),
            "e1_bn__droppath": (0.4, (None, 1, 1, 1)),
        }
    # Never two dropout layers between the branch's last layer and the merge.
    for i in range(2):
        assert _reader(new, _reader(new, f"e{i}_bn")) == f"e{i}_add"
    _assert_outputs(new, x, expected)
    path = tmp_path / "e.keras"
    new.save(path)
    _assert_outputs(keras.models.load_model(path), x, expected)


def test_add_operation_and_identity_placeholder():
    """ConvNeXt's residual: `inputs + Activation("linear")(branch)`, an op, not a layer."""
    keras.utils.set_random_seed(5)
    x = keras.Input((4, 4, 8))
    h = x
    for i in range(2):
        y = L.Dense(8, name=f"c{i}_dense")(h)
        y = L.Activation("linear", name=f"c{i}_identity")(y)
        h = h + y
    model = keras.Model(x, h)
    xs = _x((4, 4, 8))
    expected = [np.asarray(model(xs, training=False))]
    report = Report()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.2, report=report)
    assert [(s.layer, s.action, s.rate) for s in _drop_sites(report.sites)] == [
        ("c0_identity", INSERT, 0.1),
        ("c1_identity", INSERT, 0.2),
    ]
    assert _drop_layers(new) == {
        "c0_identity__droppath": (0.1, (None, 1, 1, 1)),
        "c1_identity__droppath": (0.2, (None, 1, 1, 1)),
    }
    assert "c0_identity" in [layer.name for layer in new.layers]  # the placeholder stays
    _assert_outputs(new, xs, expected)


def test_convnext_stochastic_depth_gets_no_second_drop():
    from keras.src.applications.convnext import StochasticDepth

    x = keras.Input((4, 4, 8))
    y = StochasticDepth(0.1, name="c_stochastic_depth")(L.Dense(8, name="c_dense")(x))
    model = keras.Model(x, x + y)
    report = Report()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.2, report=report)
    assert [(s.layer, s.action, s.reason) for s in _drop_sites(report.sites)] == [
        ("c_stochastic_depth", KEEP, "branch already ends in StochasticDepth")
    ]
    assert _drop_layers(new) == {}


def test_ambiguous_shortcut_is_skipped_with_a_reason():
    x = keras.Input((8,))
    a = L.Dense(8, name="left")(x)
    b = L.Dense(8, name="right")(x)
    model = keras.Model(x, L.Add(name="sum")([a, b]))
    report = Report()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.2, report=report)
    assert [(s.layer, s.action, s.reason) for s in _drop_sites(report.sites)] == [
        ("sum", SKIP, "ambiguous shortcut: both inputs 1 layer from their fork")
    ]
    assert _drop_layers(new) == {}


def test_no_residual_merges_warns():
    x = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(x)
    model = keras.Model(x, L.Concatenate(name="cat")([x, a]))
    report = Report()
    with warnings.catch_warnings():  # warned once per process: the report always has it
        warnings.simplefilter("ignore")
        regularize.plan(model, rate=0.0, drop_path=0.2, report=report)
    assert report.warnings == [droppath.NO_MERGES]
    assert _drop_sites(report.sites) == []


def test_nested_model_gets_drop_paths_inside():
    inner = resnet_tiny()
    x = keras.Input((8, 8, 3))
    outer = keras.Model(x, L.Dense(2, name="top")(inner(x)))
    xs = _x((8, 8, 3))
    expected = [np.asarray(outer(xs, training=False))]
    report = Report()
    new = regularize.add_dropout(outer, rate=0.0, drop_path=0.3, report=report)
    assert [(s.layer, s.rate) for s in _drop_sites(report.sites)] == [
        ("resnet_tiny/p_bn", 0.1),
        ("resnet_tiny/i1_bn", 0.2),
        ("resnet_tiny/i2_conv", 0.3),
    ]
    assert set(_drop_layers(new.get_layer("resnet_tiny"))) == {
        "p_bn__droppath",
        "i1_bn__droppath",
        "i2_conv__droppath",
    }
    _assert_outputs(new, xs, expected)


# -- policy, API and CLI ----------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.2", True, float("nan")])
def test_bad_drop_path_is_one_policy_error(bad, tiny):
    message = "Invalid `drop_path`. Expected a float in [0, 1). Received: drop_path="
    with pytest.raises(PolicyError) as err:
        Policy(drop_path=bad)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(PolicyError, match=r"Invalid `drop_path`\. Expected a float"):
        regularize.add_dropout(tiny[0], drop_path=bad)
    with pytest.raises(PolicyError, match=r"Invalid `drop_path`\. Expected a float"):
        regularize.add_dropout(tiny[0], drop_path=bad, policy=Policy(preset="blocks"))


def test_drop_path_in_policy_files(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("rate = 0.0\nmc = false\ndrop_path = 0.2\n")
    policy = Policy.from_file(path)
    assert policy.drop_path == 0.2
    assert list(policy.to_dict()) == [
        "preset",
        "rate",
        "mc",
        "drop_path",
        "skip_inference_only",
    ]
    assert Policy.from_dict(policy.to_dict()) == policy
    assert "drop_path" not in Policy().to_dict() and Policy().drop_path is None
    # The file wins; the argument fills in.
    assert Policy.from_file(path, drop_path=0.5).drop_path == 0.2
    path.write_text("drop_path = 2\n")
    with pytest.raises(PolicyError, match=r"Invalid `drop_path` in .*p\.toml\. Expected a float"):
        Policy.from_file(path)
    filled = regularize.api.resolve_policy(Policy(preset="head"), drop_path=0.1)
    assert (filled.preset, filled.drop_path) == ("head", 0.1)


def test_cli_bad_drop_path_exits_2(tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(b"")
    result = CliRunner().invoke(cli, ["inspect", str(path), "--drop-path", "1.5"])
    assert result.exit_code == 2
    assert "Invalid value for '--drop-path'" in result.output


def test_cli_inspect_shows_drop_path_sites(tiny, tmp_path):
    path = tmp_path / "tiny.keras"
    tiny[0].save(path)
    args = ["inspect", str(path), "--rate", "0", "--drop-path", "0.3"]
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["policy"]["drop_path"] == 0.3
    sites = [s for s in data["sites"] if s["kind"] == "DropPath"]
    assert [(s["layer"], s["action"], s["rate"]) for s in sites] == [
        ("p_bn", "insert", 0.1),
        ("i1_bn", "insert", 0.2),
        ("i2_conv", "insert", 0.3),
    ]
    out = tmp_path / "out.keras"
    args_add = ["add-dropout", str(path), "--rate", "0", "--drop-path", "0.3", "-o", str(out)]
    added = CliRunner().invoke(cli, args_add, catch_exceptions=False)
    assert added.exit_code == 0, added.output
    assert "inserted 3 sites: 3 DropPath" in added.stdout
    assert _drop_layers(keras.models.load_model(out)) == {
        "p_bn__droppath": (0.1, (None, 1, 1, 1)),
        "i1_bn__droppath": (0.2, (None, 1, 1, 1)),
        "i2_conv__droppath": (0.3, (None, 1, 1, 1)),
    }
    table = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert table.exit_code == 0
    assert "DropPath(0.2)" in table.stdout
    assert "would insert 3 sites: 3 DropPath" in table.stdout


# -- slow: Keras Applications and the Keras 2 engine ------------------------

# name -> (merges, inserted, kept): EfficientNetB0's 9 merges keep their drop-connect.
APPLICATIONS = {
    "ResNet50": (16, 16, 0),
    "ResNet101": (33, 33, 0),
    "ResNet50V2": (16, 16, 0),
    "MobileNetV2": (10, 10, 0),
    "EfficientNetB0": (9, 0, 9),
    "ConvNeXtTiny": (18, 18, 0),
    "DenseNet121": (0, 0, 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_keras_applications(name, tmp_path):
    model = getattr(keras.applications, name)(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    x = _x((32, 32, 3))
    expected = [np.asarray(model(x, training=False))]
    report = Report()
    start = time.perf_counter()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.2, report=report)
    elapsed = time.perf_counter() - start
    sites = _drop_sites(report.sites)
    merges, inserted, kept = APPLICATIONS[name]
    print(f"{name}: {len(sites)} merges, {inserted} inserted, {kept} kept, {elapsed:.2f} s")
    assert len(sites) == merges
    assert sorted(s.action for s in sites) == [INSERT] * inserted + [KEEP] * kept
    assert [s.rate for s in sites if s.action == INSERT] == [
        round(0.2 * i / merges, 4) for i in range(1, inserted + 1)
    ]
    assert len(_drop_layers(new)) == inserted + (
        kept if name == "EfficientNetB0" else 0
    )  # EfficientNet's own drop layers have a noise shape too
    if name == "DenseNet121":
        assert report.warnings == [droppath.NO_MERGES]
    if name == "ConvNeXtTiny":
        assert all(s.layer.endswith("_identity") for s in sites)
    _assert_outputs(new, x, expected)
    if name in ("ResNet50", "EfficientNetB0", "ConvNeXtTiny", "MobileNetV2"):
        path = tmp_path / f"{name}.keras"
        new.save(path)
        reloaded = keras.models.load_model(path)
        assert _drop_layers(reloaded) == _drop_layers(new)
        _assert_outputs(reloaded, x, expected)
        bare = regularize.remove_dropout(reloaded)
        assert not any(layer.name.endswith("__droppath") for layer in bare.layers)
        _assert_outputs(bare, x, expected)


@pytest.mark.slow
def test_efficientnet_retarget_makes_its_drop_connect_the_drop_path():
    model = keras.applications.EfficientNetB0(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    x = _x((32, 32, 3))
    expected = [np.asarray(model(x, training=False))]
    report = Report()
    policy = Policy(rate=0.0, drop_path=0.2, existing="retarget")
    new = regularize.add_dropout(model, policy=policy, report=report)
    sites = _drop_sites(report.sites)
    assert [s.action for s in sites] == [UPDATE] * 9
    assert [s.rate for s in sites] == [round(0.2 * i / 9, 4) for i in range(1, 10)]
    drops = {n: r for n, (r, _) in _drop_layers(new).items()}
    assert not any(n.endswith("__droppath") for n in drops)
    assert [drops[s.layer.replace("project_bn", "drop")] for s in sites] == [s.rate for s in sites]
    _assert_outputs(new, x, expected)


_KERAS2 = """
import json, sys, os
import numpy as np, tf_keras
from pathlib import Path
out = Path(sys.argv[1])
if sys.argv[2] == "make":
    m = tf_keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    m.save(out / "resnet50.h5")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.save(out / "x.npy", x)
    np.save(out / "y.npy", m(x, training=False).numpy())
else:
    x, y = np.load(out / "x.npy"), np.load(out / "y.npy")
    found = {}
    for name in ("dp.h5", "bare.h5"):
        m = tf_keras.models.load_model(out / name, compile=False)
        np.testing.assert_array_equal(m(x, training=False).numpy(), y)
        found[name] = {l.name: [l.rate, list(l.noise_shape)] for l in m.layers
                       if type(l) is tf_keras.layers.Dropout}
    assert "regularize" not in sys.modules
    print(json.dumps(found))
"""


@pytest.mark.slow
def test_keras2_resnet50_through_the_engine(tmp_path):
    from regularize import keras2

    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)

    def child(step):
        done = subprocess.run(
            [sys.executable, "-c", _KERAS2, str(tmp_path), step],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    child("make")
    policy = {"rate": 0.0, "drop_path": 0.2}
    job = dict(mode="add", input=tmp_path / "resnet50.h5", output=tmp_path / "dp.h5")
    first = keras2.run_many([dict(job, policy=policy)])[0]
    assert not isinstance(first, Exception), first
    again = keras2.run_many(
        [
            dict(mode="plan", input=tmp_path / "dp.h5", policy=policy),
            dict(mode="strip", input=tmp_path / "dp.h5", output=tmp_path / "bare.h5"),
        ]
    )
    assert not any(isinstance(a, Exception) for a in again), again
    sites = [s for s in first["sites"] if s["kind"] == "DropPath"]
    assert [(s["action"], s["rate"]) for s in sites] == [
        (INSERT, round(0.2 * i / 16, 4)) for i in range(1, 17)
    ]
    assert sites[0]["layer"] == "conv2_block1_3_bn"
    assert sites[0]["reason"] == "block 1/16 before conv2_block1_add, shortcut 2 layers"
    rerun = [s for s in again[0]["sites"] if s["kind"] == "DropPath"]
    assert [s["action"] for s in rerun] == [KEEP] * 16
    found = json.loads(child("check").strip().splitlines()[-1])
    assert found["dp.h5"] == {
        f"{s['layer']}__droppath": [s["rate"], [None, 1, 1, 1]] for s in sites
    }
    assert found["bare.h5"] == {}
