"""Where the default policy puts dropout and drop path on every `keras.applications` model.

Each constructor (weights=None, its smallest input) is rewritten once with
`rate=0.2, drop_path=0.1`. A reader of the *output's* graph, written here
apart from the core's own analysis, then fails on a dropout the tool put
inside a squeeze-excitation gate, after a Rescaling or Normalization layer,
right before a softmax, on a model output or feeding BatchNormalization;
and on a drop path anywhere but on the branch of a residual merge. The counts
(dropout sites, gate sites left out, residual merges, drop paths) are
compared with the table in docs/applications.md, so the doc cannot drift:
on a difference the test prints the table it found. Inference stays bit-exact
against the values taken before the rewrite.

Slow (about 40 models); `pytest -m slow tests/test_applications_placement.py`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import keras
import numpy as np
import pytest

import regularize
from regularize.core import gates
from regularize.core.report import INSERT
from regularize.core.report import Report
from regularize.keras3 import graph

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "applications.md"
SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}  # else 32
COLUMNS = ("input", "dropout before", "dropout", "gate sites", "residual merges", "drop paths")
# A drop path's branch may end in the model's own dropout (EfficientNet's drop-connect):
# with `existing = "keep"` that site is kept, and still a merge found.
KEPT_BRANCH = "branch already ends in a dropout layer"
SUFFIXES = ("__dropout", "__droppath")


def application_names() -> list[str]:
    return sorted(
        name
        for name, value in vars(keras.applications).items()
        if not name.startswith("_") and callable(value) and not inspect.ismodule(value)
    )


def documented_table() -> dict[str, tuple[int, ...]]:
    """The placement table of docs/applications.md: name -> the counts of COLUMNS."""
    text = DOC.read_text()
    rows = re.findall(r"^\| `(\w+)` \|(.*)\|$", text, flags=re.M)
    return {name: tuple(int(cell) for cell in cells.split("|")) for name, cells in rows}


def render_table(rows: dict[str, tuple[int, ...]]) -> str:
    head = "| architecture | " + " | ".join(COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    body = [f"| `{n}` | " + " | ".join(str(c) for c in rows[n]) + " |" for n in sorted(rows)]
    return "\n".join([head, rule, *body])


# -- a reader of the output's graph (independent of regularize.core) ---------


class Reader:
    """Producers and readers of every tensor of a Keras 3 Functional model."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.producer: dict[int, object] = {}
        self.readers: dict[int, list] = {}
        self.inputs_of: dict[int, list] = {}  # id(op) -> its input tensors (first call)
        self.outputs_of: dict[int, list] = {}
        for node in graph.iter_nodes(model):
            op = node.operation
            self.inputs_of.setdefault(id(op), list(node.input_tensors))
            self.outputs_of.setdefault(id(op), list(node.outputs))
            for t in node.outputs:
                self.producer[id(t)] = op
            for t in node.input_tensors:
                self.readers.setdefault(id(t), []).append(op)
        self.final = {id(t) for t in model.outputs}

    def parent(self, op):
        inputs = self.inputs_of[id(op)]
        return self.producer.get(id(inputs[0])) if len(inputs) == 1 else None

    def children(self, op) -> list:
        return [r for t in self.outputs_of[id(op)] for r in self.readers.get(id(t), [])]

    def in_squeeze_excitation(self, op) -> bool:
        """On a chain of one-input layers from a global pooling to a `Multiply`."""
        node = op
        for _ in range(16):
            node = self.parent(node)
            if node is None:
                return False
            if gates.is_global_pooling(type(node).__name__):
                break
        else:
            return False
        node = op
        for _ in range(16):
            children = self.children(node)
            if len(children) != 1:
                return False
            node = children[0]
            if type(node).__name__ == "Multiply" and len(self.inputs_of[id(node)]) == 2:
                return True
            if len(self.inputs_of[id(node)]) != 1:
                return False
        return False


def is_softmax(op) -> bool:
    return isinstance(op, keras.layers.Softmax) or graph.activation_of(op) == "softmax"


def misplaced(model: keras.Model) -> list[str]:
    """Every dropout or drop path the tool put where a practitioner would not."""
    reader = Reader(model)
    wrong = []
    for op in model.operations:
        name = op.name
        if not graph.is_dropout(op) or not name.endswith(SUFFIXES):
            continue
        anchor = reader.parent(op)
        children = reader.children(op)
        if any(id(t) in reader.final for t in reader.outputs_of[id(op)]):
            wrong.append(f"{name}: on a model output")
        if isinstance(anchor, (keras.layers.Rescaling, keras.layers.Normalization)):
            wrong.append(f"{name}: after {type(anchor).__name__}")
        if any(isinstance(c, keras.layers.BatchNormalization) for c in children):
            wrong.append(f"{name}: feeds BatchNormalization")
        if any(isinstance(c, keras.layers.Softmax) or c.name.endswith("softmax") for c in children):
            wrong.append(f"{name}: right before a softmax")
        if name.endswith("__dropout") and reader.in_squeeze_excitation(op):
            wrong.append(f"{name}: inside a squeeze-excitation gate")
        if name.endswith("__droppath"):
            merge = children[0] if len(children) == 1 else None
            if merge is not None and len(reader.inputs_of[id(merge)]) == 1:
                merge = (reader.children(merge) or [None])[0]  # through a constant scale
            kinds = ("Add", "CustomScaleLayer")
            if merge is None or type(merge).__name__ not in kinds:
                wrong.append(f"{name}: not on the branch of a residual merge")
    return wrong


def residual_merges(model: keras.Model) -> int:
    """`Add`s of two tensors and Inception-ResNet's scaled merges, in the input model."""
    reader = Reader(model)
    count = 0
    for op in model.operations:
        two = len(reader.inputs_of.get(id(op), [])) == 2
        if type(op).__name__ == "CustomScaleLayer" or (isinstance(op, keras.layers.Add) and two):
            count += 1
        elif type(op).__name__ == "Add" and two:  # the operation `x + y`
            count += 1
    return count


# -- the test -----------------------------------------------------------------

_found: dict[str, tuple[int, ...]] = {}


@pytest.mark.parametrize("name", application_names())
def test_placement_on_every_application(name):
    size = SIZES.get(name, 32)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=7, classifier_activation=None
    )
    x = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype("float32")
    expected = np.asarray(model(x, training=False))
    report = Report()
    new = regularize.add_dropout(model, 0.2, drop_path=0.1, report=report)

    assert misplaced(new) == []
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)

    dropout = [s for s in report.sites if s.kind != "DropPath" and s.action == INSERT]
    in_gates = [s for s in report.sites if s.reason == gates.SQUEEZE_EXCITATION]
    merges = [s for s in report.sites if s.kind == "DropPath" or s.reason == KEPT_BRANCH]
    drops = [s for s in merges if s.kind == "DropPath" and s.action == INSERT]
    assert len(merges) == residual_merges(model)
    own = [op for op in new.operations if graph.is_dropout(op) and op.name.endswith(SUFFIXES)]
    assert len(own) == len(dropout) + len(drops)
    _found[name] = (size, len(dropout) + len(in_gates), len(dropout), len(in_gates))
    _found[name] += (len(merges), len(drops))
    table = documented_table()
    assert _found[name] == table.get(name), (
        f"docs/applications.md disagrees for {name}. Found so far:\n{render_table(_found)}"
    )


def test_the_table_lists_every_application_once():
    assert sorted(documented_table()) == application_names()


@pytest.mark.parametrize(
    "name", ["EfficientNetB0", "EfficientNetV2B0", "MobileNetV3Small", "InceptionResNetV2"]
)
def test_the_architectures_whose_placement_changed_reload_and_train(name, tmp_path):
    """Gates left out (EfficientNet, MobileNetV3), scaled merges found (InceptionResNetV2):
    the output reloads with plain Keras, bit-exact, and takes a fit step."""
    size = SIZES.get(name, 32)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=7, classifier_activation=None
    )
    x = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype("float32")
    expected = np.asarray(model(x, training=False))
    new = regularize.add_dropout(model, 0.2, drop_path=0.1)
    path = tmp_path / f"{name}.keras"
    regularize.save_model(new, path)
    loaded = keras.models.load_model(path)
    own = sorted(op.name for op in loaded.operations if op.name.endswith(SUFFIXES))
    assert own == sorted(op.name for op in new.operations if op.name.endswith(SUFFIXES))
    assert misplaced(loaded) == []
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), expected)
    loaded.compile(optimizer="sgd", loss="mse")
    loaded.fit(x, expected, epochs=1, batch_size=2, verbose=0)
