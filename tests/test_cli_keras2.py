"""The real CLI on Keras 2 inputs: `.h5` files and SavedModel folders.

tests/test_legacy.py drives the Keras 2 engine through `regularize.keras2`;
here the commands a user types run on the same inputs: add-dropout,
remove-dropout, inspect, --json, --dry-run, the policies (preset head, rules,
schedule, `existing`) on a mixed-precision model, and the errors. Each Keras 2
command starts one engine child (seconds of TensorFlow import), so
`commands` runs them all once per module; one tf_keras process (`checked`)
then loads every output next to its input and compares them. Those tests are
slow; the refusals that come before any child are not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import error_line
from helpers import invoke

from regularize.core import terms

ROOT = Path(__file__).resolve().parents[1]
K2 = ROOT / "fixtures" / "keras2"
SM_LAYERS = ["features", "d1", "d2", "add", "block_out", "ln", "head", "logits"]

# Runs under tf_keras: a mixed_float16 SavedModel with a Dropout of its own.
_MAKE = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tf_keras as k

k.utils.set_random_seed(0)
k.mixed_precision.set_global_policy("mixed_float16")
inp = k.Input((8,), name="features")
x = k.layers.Dense(16, activation="relu", name="d1")(inp)
x = k.layers.Dropout(0.25, name="user_drop")(x)
x = k.layers.Dense(8, activation="relu", name="d2")(x)
x = k.layers.Dense(8, activation="tanh", name="d3")(x)
out = k.layers.Dense(3, activation="softmax", dtype="float32", name="probs")(x)
model = k.Model(inp, out, name="mixed")
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.save(os.path.join(sys.argv[1], "mixed"), save_format="tf")
"""

# Runs under tf_keras: loads each (input, output) pair and compares them.
_CHECK = """
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tensorflow as tf
import tf_keras
import tensorflow_model_optimization as tfmot
from regularize.keras2 import engine

def load(path):
    with tfmot.sparsity.keras.prune_scope(), tfmot.quantization.keras.quantize_scope():
        return tf_keras.models.load_model(path)

def predict(model, xs):
    feed = tf.nest.pack_sequence_as(model._nested_inputs, xs)
    return [np.asarray(t) for t in tf.nest.flatten(model(feed, training=False))]

def rates(layer):
    config = layer.get_config()
    if "recurrent_dropout" in config:
        return [config["dropout"], config["recurrent_dropout"]]
    return config.get("rate")

out = {}
for key, (src, dst) in json.loads(sys.argv[1]).items():
    old, new = load(src), load(dst)
    xs = engine.sample_inputs(old)
    old_w = {w.name: w.numpy() for w in old.weights}
    new_w = {w.name: w.numpy() for w in new.weights}
    out[key] = {
        "layers": [
            [l.name, type(l).__name__, l.dtype_policy.name, rates(l)] for l in new.layers
        ],
        "equal": all(
            np.array_equal(a, b) for a, b in zip(predict(old, xs), predict(new, xs), strict=True)
        ),
        "weights_equal": len(old.weights) == len(new.weights)
        and sorted(old_w) == sorted(new_w)
        and all(np.array_equal(old_w[k], new_w[k]) for k in old_w),
        "compiled": bool(getattr(new, "_is_compiled", False)),
    }
print(json.dumps(out))
"""


def _python(code: str, *args) -> dict | None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1:] or [""]
    return json.loads(last[0]) if last[0].startswith("{") else None


def _result(run) -> dict:
    return {"code": run.exit_code, "stdout": run.stdout, "stderr": run.stderr}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Copies of the Keras 2 fixtures (default outputs go next to the input), and `mixed/`."""
    folder = tmp_path_factory.mktemp("cli_keras2")
    shutil.copytree(K2 / "savedmodel", folder / "sm")
    for name in ("pruned.h5", "rnn_oplambda.h5", "plain.h5"):
        shutil.copy(K2 / name, folder / name)
    _python(_MAKE, folder)
    return folder


@pytest.fixture(scope="module")
def commands(work) -> dict:
    """Every command of the slow tests, run once: exit code, stdout, stderr by key."""
    (work / "mixed.toml").write_text(
        'rate = 0.2\nexisting = "retarget"\n[schedule]\nstart = 0.1\nend = 0.5\n'
        '[[rule]]\nmatch = "d3"\nrate = 0.4\n'
    )
    runs = {
        "add_h5": ["add-dropout", work / "pruned.h5", "--rate", "0.2"],
        "add_sm": ["add-dropout", work / "sm", "--rate", "0.2"],
        "inspect_sm": ["inspect", work / "sm", "--rate", "0.2"],
        "inspect_json": ["inspect", work / "pruned.h5", "--rate", "0.2", "--json"],
        "dry_run": ["add-dropout", work / "sm", "--dry-run", "-o", work / "never"],
        "add_json": ["add-dropout", work / "sm", "--json", "-o", work / "sm_json"],
        "head": ["add-dropout", work / "sm", "--preset", "head", "-o", work / "sm_head"],
        "mixed": ["add-dropout", work / "mixed", "--policy", work / "mixed.toml", "--json"],
        "rnn": ["add-dropout", work / "rnn_oplambda.h5", "--recurrent-rate", "0.1"],
        "plain": ["add-dropout", work / "plain.h5", "--rate", "0.2"],
    }
    found = {key: _result(invoke(*args)) for key, args in runs.items()}
    # On the outputs: a rerun keeps everything, remove-dropout strips it.
    later = {
        "again_sm": ["add-dropout", work / "sm_dropout", "--rate", "0.2", "-o", work / "again"],
        "remove_sm": ["remove-dropout", work / "sm_dropout", "-o", work / "sm_stripped"],
        "remove_rnn": ["remove-dropout", work / "rnn_oplambda_dropout.h5"],
    }
    found.update({key: _result(invoke(*args)) for key, args in later.items()})
    return found


@pytest.fixture(scope="module")
def checked(commands, work) -> dict:
    pairs = {
        "add_h5": ("pruned.h5", "pruned_dropout.h5"),
        "add_sm": ("sm", "sm_dropout"),
        "add_json": ("sm", "sm_json"),
        "head": ("sm", "sm_head"),
        "mixed": ("mixed", "mixed_dropout"),
        "rnn": ("rnn_oplambda.h5", "rnn_oplambda_dropout.h5"),
        "again_sm": ("sm_dropout", "again"),
        "remove_sm": ("sm", "sm_stripped"),
        "remove_rnn": ("rnn_oplambda.h5", "rnn_oplambda_dropout_nodropout.h5"),
    }
    pairs = {k: [str(work / a), str(work / b)] for k, (a, b) in pairs.items()}
    return _python(_CHECK, json.dumps(pairs))


def _lines(result) -> list[str]:
    assert result["code"] == 0, result
    return result["stdout"].splitlines()


def _layers(check) -> dict:
    """name -> (class, dtype policy, rate) of the checked output."""
    return {name: (cls, dtype, rate) for name, cls, dtype, rate in check["layers"]}


def _exact(check) -> None:
    """Inference bit-exact, the same weights (by name, as many), the compile config kept."""
    assert check["equal"] and check["weights_equal"] and check["compiled"], check


# -- add-dropout ----------------------------------------------------------------


@pytest.mark.slow
def test_add_dropout_h5_writes_h5_next_to_the_input(commands, checked, work):
    assert _lines(commands["add_h5"]) == [
        "inserted 2 sites: 2 Dropout",
        f"wrote {work / 'pruned_dropout.h5'}",
    ]
    assert commands["add_h5"]["stderr"] == ""
    check = checked["add_h5"]
    assert [name for name, *_ in check["layers"]] == [
        "prune_low_magnitude_h1",
        "prune_low_magnitude_h1__dropout",
        "prune_low_magnitude_h2",
        "prune_low_magnitude_h2__dropout",
        "prune_low_magnitude_logits",
    ]
    assert _layers(check)["prune_low_magnitude_h1__dropout"] == ("Dropout", "float32", 0.2)
    _exact(check)


@pytest.mark.slow
def test_add_dropout_savedmodel_writes_a_savedmodel(commands, checked, work):
    assert _lines(commands["add_sm"]) == [
        "inserted 3 sites: 3 Dropout",
        f"wrote {work / 'sm_dropout'}",
    ]
    assert (work / "sm_dropout" / "saved_model.pb").is_file()
    layers = _layers(checked["add_sm"])
    assert list(layers) == [
        "features",
        "d1",
        "d1__dropout",
        "d2",
        "add",
        "block_out",
        "block_out__dropout",
        "ln",
        "head",
        "head__dropout",
        "logits",
    ]
    for name in ("d1__dropout", "block_out__dropout", "head__dropout"):
        assert layers[name] == ("Dropout", "float32", 0.2)
    _exact(checked["add_sm"])
    # Nothing else next to the input: no temporary folder left behind.
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_add_dropout_json_on_a_savedmodel(commands, checked, work):
    data = json.loads(commands["add_json"]["stdout"])
    assert data["input"] == str(work / "sm") and data["output"] == str(work / "sm_json")
    assert [(s["layer"], s["action"], s["rate"]) for s in data["sites"]] == [
        ("d1", "insert", 0.3),
        ("block_out", "insert", 0.3),
        ("head", "insert", 0.3),
    ]
    assert data["summary"] == {"insert": {"Dropout": 3}} and data["warnings"] == []
    assert _layers(checked["add_json"])["head__dropout"] == ("Dropout", "float32", 0.3)
    _exact(checked["add_json"])


@pytest.mark.slow
def test_rerun_on_the_output_keeps_everything(commands, checked, work):
    assert _lines(commands["again_sm"]) == [
        "kept 3 sites: 3 inserted earlier, same rate",
        f"wrote {work / 'again'}",
    ]
    assert _layers(checked["again_sm"]) == _layers(checked["add_sm"])
    _exact(checked["again_sm"])


@pytest.mark.slow
def test_keras2_h5_that_keras3_reads_gives_a_keras_file(commands, work):
    """A plain Keras 2 `.h5` goes the Keras 3 way: the output is a `.keras` file."""
    out = work / "plain_dropout.keras"
    assert _lines(commands["plain"]) == [
        "inserted 2 sites: 1 SpatialDropout2D, 1 Dropout",
        "skipped 2 sites: 1 feeds BatchNormalization, 1 model output",
        f"wrote {out}",
    ]
    # tf_keras computes its 4-D BatchNormalization fused, Keras 3 unfused.
    assert commands["plain"]["stderr"].splitlines() == [f"Warning: {terms.KERAS2_BATCHNORM}"]
    from regularize.keras3 import io

    old = io.load_model(work / "plain.h5")
    new = keras.models.load_model(out)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(
        np.asarray(old([x], training=False)), np.asarray(new([x], training=False))
    )


# -- policies in the Keras 2 engine ----------------------------------------------


@pytest.mark.slow
def test_head_preset(commands, checked, work):
    assert _lines(commands["head"]) == [
        "inserted 1 site: 1 Dropout",
        "skipped 2 sites: 2 preset head: before the last normalization layer",
        f"wrote {work / 'sm_head'}",
    ]
    layers = _layers(checked["head"])
    assert [name for name in layers if name.endswith(terms.SUFFIX)] == ["head__dropout"]
    assert layers["head__dropout"] == ("Dropout", "float32", 0.3)
    _exact(checked["head"])


@pytest.mark.slow
def test_schedule_rules_and_existing_on_a_mixed_precision_savedmodel(commands, checked):
    """A schedule, a rule that wins over it, and the model's own Dropout retargeted."""
    data = json.loads(commands["mixed"]["stdout"])
    sites = {s["layer"]: (s["action"], s["rate"]) for s in data["sites"]}
    assert sites == {
        "d1": ("update", 0.2),  # user_drop, 0.25 before: retargeted by the schedule
        "d2": ("insert", 0.3),  # the schedule, deeper
        "d3": ("insert", 0.4),  # the rule
        "probs": ("skip", None),  # model output
    }
    layers = _layers(checked["mixed"])
    assert layers == {
        "features": ("InputLayer", "float32", None),
        "d1": ("Dense", "mixed_float16", None),
        "user_drop": ("Dropout", "mixed_float16", 0.2),
        "d2": ("Dense", "mixed_float16", None),
        "d2__dropout": ("Dropout", "mixed_float16", 0.3),
        "d3": ("Dense", "mixed_float16", None),
        "d3__dropout": ("Dropout", "mixed_float16", 0.4),
        "probs": ("Dense", "float32", None),
    }
    _exact(checked["mixed"])


# -- recurrent dropout, and remove-dropout -----------------------------------------


@pytest.mark.slow
def test_recurrent_rate_on_a_keras2_lstm(commands, checked, work):
    result = commands["rnn"]
    assert _lines(result) == [
        "inserted 2 sites: 1 recurrent, 1 Dropout",
        "skipped 1 site: 1 model output",
        f"wrote {work / 'rnn_oplambda_dropout.h5'}",
    ]
    assert result["stderr"].splitlines() == [
        f"Warning: {terms.CUDNN}",
        f"Warning: {terms.LSTM_KERNEL}",
    ]
    layers = _layers(checked["rnn"])
    assert layers["lstm"] == ("LSTM", "float32", [0.3, 0.1])
    assert layers["fc__dropout"] == ("Dropout", "float32", 0.3)
    _exact(checked["rnn"])


@pytest.mark.slow
def test_remove_dropout_savedmodel_gives_back_the_input(commands, checked, work):
    assert _lines(commands["remove_sm"]) == [
        "removed 3 sites: 3 Dropout",
        f"wrote {work / 'sm_stripped'}",
    ]
    assert [name for name, *_ in checked["remove_sm"]["layers"]] == SM_LAYERS
    _exact(checked["remove_sm"])  # compared with the original input


@pytest.mark.slow
def test_remove_dropout_h5_clears_recurrent_dropout_bit_exact(commands, checked, work):
    """tf_keras keeps the LSTM's per-gate kernel (its config says so): exact, no warning."""
    result = commands["remove_rnn"]
    assert _lines(result) == [
        "removed 2 sites: 1 recurrent, 1 Dropout",
        f"wrote {work / 'rnn_oplambda_dropout_nodropout.h5'}",
    ]
    assert result["stderr"] == ""
    layers = _layers(checked["remove_rnn"])
    assert layers["lstm"] == ("LSTM", "float32", [0.0, 0.0])
    assert not [name for name in layers if name.endswith(terms.SUFFIX)]
    _exact(checked["remove_rnn"])  # compared with the original input


# -- inspect and --dry-run: nothing written ----------------------------------------


@pytest.mark.slow
def test_inspect_savedmodel(commands):
    assert _lines(commands["inspect_sm"]) == [
        "ACTION  LAYER      CLASS  SHAPE      DEPTH  EXISTING  DROPOUT       REASON",
        "insert  d1         Dense  (None, 8)  0.14   -         Dropout(0.2)  after relu",
        "insert  block_out  ReLU   (None, 8)  0.57   -         Dropout(0.2)  after relu",
        "insert  head       Dense  (None, 8)  0.86   -         Dropout(0.2)  after tanh",
        "would insert 3 sites: 3 Dropout",
    ]
    assert commands["inspect_sm"]["stderr"] == ""


@pytest.mark.slow
def test_inspect_json_on_a_pruned_h5(commands, work):
    data = json.loads(commands["inspect_json"]["stdout"])
    assert data["input"] == str(work / "pruned.h5")
    assert data["policy"]["rate"] == 0.2
    assert [(s["layer"], s["layer_class"], s["action"], s["rate"]) for s in data["sites"]] == [
        ("prune_low_magnitude_h1", "PruneLowMagnitude(Dense)", "insert", 0.2),
        ("prune_low_magnitude_h2", "PruneLowMagnitude(Dense)", "insert", 0.2),
    ]
    assert data["summary"] == {"insert": {"Dropout": 2}}


@pytest.mark.slow
def test_dry_run_writes_nothing(commands, work):
    assert _lines(commands["dry_run"])[-2:] == [
        "would insert 3 sites: 3 Dropout",
        "dry run: nothing written",
    ]
    assert not (work / "never").exists()


# -- refusals before any engine child ----------------------------------------------


@pytest.fixture
def pruned(tmp_path) -> Path:
    path = tmp_path / "pruned.h5"
    shutil.copy(K2 / "pruned.h5", path)
    return path


def test_mc_is_refused_for_keras2(pruned, tmp_path):
    result = invoke("add-dropout", pruned, "--mc", "-o", tmp_path / "o.h5")
    assert result.exit_code == 1, result.output
    assert error_line(result) == (
        "Error: MC dropout is not available for Keras 2 models. Expected no --mc, "
        "or convert the model to Keras 3 first. Received: mc=True"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.h5"]


def test_existing_output_needs_force(pruned, tmp_path):
    taken = tmp_path / "taken.h5"
    taken.write_bytes(b"mine")
    result = invoke("add-dropout", pruned, "-o", taken)
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        f"Error: Invalid value for '-o' / '--output': Cannot write model to '{taken}': the "
        "file already exists. Pass --force to replace it."
    )
    assert taken.read_bytes() == b"mine"


def test_output_that_is_the_input(pruned):
    result = invoke("add-dropout", pruned, "-o", pruned, "--force")
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        f"Error: Invalid value for '-o' / '--output': Cannot write model to '{pruned}': it is "
        "the input model. Expected another path."
    )


def test_to_keras3_refuses_a_pruned_model(pruned, tmp_path):
    result = invoke("add-dropout", pruned, "--to-keras3", "-o", tmp_path / "p.keras")
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert line.startswith("Error: ") and "wrappers (PruneLowMagnitude)" in line
    assert not (tmp_path / "p.keras").exists()


def test_savedmodel_without_keras_metadata(tmp_path):
    folder = tmp_path / "graph_only"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"")
    result = invoke("inspect", folder)
    assert result.exit_code == 1, result.output
    assert error_line(result) == (
        "Error: Cannot read model: the SavedModel holds no Keras model (no `keras_metadata.pb`; "
        "written by `tf.saved_model.save` or Keras 3 `model.export()`), so there is no layer "
        "graph to rewrite. Expected a Keras 2 `.h5` file or a Keras 2 SavedModel folder. "
        f"Received: path={str(folder)!r}"
    )
