"""Keras 2 models (tf_keras, tfmot): detection, the engine child, --to-keras3.

TensorFlow + tf_keras cost seconds to import, so the rewrites run in few
processes: `parent_run` is one fresh Python process running the parent side
(no tf_keras, no tfmot) with one engine child for all Keras 2 rewrites and one
for `--to-keras3`; `verified` is one tf_keras process that loads the outputs
and checks them (inference, weights, a pruning fine-tune step, strip_pruning,
QAT). The tests that use them are marked slow; the rest needs no child at
all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from regularize import keras2
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.errors import PolicyError
from regularize.core.errors import RegularizeError
from regularize.core.errors import UnsupportedModelError
from regularize.core.paths import output_format
from regularize.core.policy import Policy
from regularize.keras3 import io

K2 = Path(__file__).resolve().parents[1] / "fixtures" / "keras2"
FIXTURES = K2.parent
ROOT = FIXTURES.parent

# Runs in a fresh process: the parent side only (it must never import
# tf_keras or tfmot) and two engine children: the Keras 2 rewrites, then
# reruns on their outputs and --to-keras3 (whose last step, Keras 3, runs here).
_PARENT = """
import json, sys
from pathlib import Path
from regularize import keras2
out, k2 = Path(sys.argv[1]), Path(sys.argv[2])
data = {"detect": {
    p.name: keras2.detect(p) for p in sorted(k2.iterdir()) if p.name != "__pycache__"
}}
data["tf_after_detect"] = "tensorflow" in sys.modules
jobs = {
    "sm": dict(mode="add", input=k2 / "savedmodel", output=out / "sm_dropout"),
    "pruned": dict(mode="add", input=k2 / "pruned.h5", output=out / "pruned_dropout.h5"),
    "qat": dict(mode="add", input=k2 / "qat.h5", output=out / "qat_dropout.h5"),
    "rnn": dict(mode="add", input=k2 / "rnn_oplambda.h5", output=out / "rnn_dropout.h5",
                policy={"rate": 0.2, "recurrent_rate": 0.1}),
    "custom_missing": dict(mode="plan", input=k2 / "custom.h5"),
    "custom": dict(mode="add", input=k2 / "custom.h5", output=out / "custom_dropout.h5",
                   custom_objects=str(k2 / "custom_layers.py")),
    "plan_blocks": dict(mode="plan", input=k2 / "savedmodel", policy={"preset": "blocks"}),
    "lambda_safe": dict(mode="plan", input=k2 / "lambda.h5"),
    "lambda_unsafe": dict(mode="plan", input=k2 / "lambda.h5", safe_mode=False),
}
for job in jobs.values():
    job.setdefault("policy", {"rate": 0.2})
answers = keras2.run_many(list(jobs.values()))
data["results"] = {
    key: {"error": str(a), "type": type(a).__name__} if isinstance(a, Exception) else a
    for key, a in zip(jobs, answers)
}
again = keras2.run_many([
    dict(mode="plan", input=out / "pruned_dropout.h5", policy={"rate": 0.2}),
    dict(mode="add", input=out / "qat_dropout.h5", output=out / "qat_again.h5",
         policy={"rate": 0.4}),
    dict(mode="strip", input=out / "sm_dropout", output=out / "sm_stripped"),
    dict(mode="add", input=k2 / "savedmodel", output=out / "sm.keras", policy={"rate": 0.2},
         to_keras3=True),
])
again = [a if isinstance(a, dict) else {"error": str(a)} for a in again]
data["again"], data["keras3"] = again[:3], again[3]
data["modules"] = sorted(m.split(".")[0] for m in sys.modules
    if m.startswith(("tf_keras", "tensorflow_model_optimization", "keras")))
print(json.dumps(data, default=str))
"""

# Runs under tf_keras: loads each (input, output) pair and checks the output.
_VERIFY = """
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tensorflow as tf
import tf_keras
import tensorflow_model_optimization as tfmot
from regularize.keras2 import engine

pairs, reference = json.loads(sys.argv[1]), sys.argv[2]
sys.path.insert(0, sys.argv[3])
from custom_layers import Scale

def load(path):
    with tfmot.sparsity.keras.prune_scope(), tfmot.quantization.keras.quantize_scope():
        return tf_keras.models.load_model(path, custom_objects={"Scale": Scale})

def predict(model, xs):
    feed = tf.nest.pack_sequence_as(model._nested_inputs, xs)
    return [np.asarray(t) for t in tf.nest.flatten(model(feed, training=False))]

def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

out = {}
for key, (src, dst) in pairs.items():
    old, new = load(src), load(dst)
    xs = engine.sample_inputs(old)
    old_w = {w.name: w.numpy() for w in old.weights}
    new_w = {w.name: w.numpy() for w in new.weights}
    r = {
        "layers": [[l.name, type(l).__name__] for l in new.layers],
        "equal": same(predict(old, xs), predict(new, xs)),
        # By name, and as many: no variable lost, none added, none duplicated.
        "weights_equal": len(old.weights) == len(new.weights)
        and sorted(old_w) == sorted(new_w)
        and all(np.array_equal(old_w[k], new_w[k]) for k in old_w),
        "compiled": bool(getattr(new, "_is_compiled", False)),
    }
    if key == "sm":
        arrays = {f"x{i}": x for i, x in enumerate(xs)}
        arrays.update({f"y{i}": y for i, y in enumerate(predict(old, xs))})
        for layer in old.layers:
            for i, w in enumerate(layer.get_weights()):
                arrays[f"w/{layer.name}/{i}"] = w
        np.savez(reference, **arrays)
    if key == "pruned":
        wrappers = [l for l in new.layers if type(l).__name__ == "PruneLowMagnitude"]
        r["steps"] = [int(l.pruning_step.numpy()) for l in wrappers]
        x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
        new.fit(x, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        r["steps_after_fit"] = [int(l.pruning_step.numpy()) for l in wrappers]
        r["masks_zero"] = [float(np.mean(l.pruning_vars[0][1].numpy() == 0)) for l in wrappers]
        stripped = tfmot.sparsity.keras.strip_pruning(new)
        r["stripped_layers"] = [[l.name, type(l).__name__] for l in stripped.layers]
        r["stripped_equal"] = same(predict(new, xs), predict(stripped, xs))
        r["stripped_zeros"] = [
            float(np.mean(l.kernel.numpy() == 0)) for l in stripped.layers if hasattr(l, "kernel")
        ]
    if key == "qat":
        x = np.random.default_rng(1).normal(size=(2, 6, 6, 1)).astype("float32")
        history = new.fit(x, np.array([0, 1]), epochs=1, verbose=0)
        r["fit_loss"] = float(history.history["loss"][0])
    if key == "rnn":
        r["lstm"] = [new.get_layer("lstm").dropout, new.get_layer("lstm").recurrent_dropout]
    out[key] = r
print(json.dumps(out))
"""


def _python(code: str, *args, legacy_keras: bool = False) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    else:
        env.pop("TF_USE_LEGACY_KERAS", None)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("legacy")


@pytest.fixture(scope="module")
def parent_run(out_dir):
    return _python(_PARENT, out_dir, K2)


@pytest.fixture(scope="module")
def results(parent_run):
    return parent_run["results"]


@pytest.fixture(scope="module")
def verified(parent_run, out_dir):
    pairs = {
        "sm": (K2 / "savedmodel", out_dir / "sm_dropout"),
        "pruned": (K2 / "pruned.h5", out_dir / "pruned_dropout.h5"),
        "qat": (K2 / "qat.h5", out_dir / "qat_dropout.h5"),
        "rnn": (K2 / "rnn_oplambda.h5", out_dir / "rnn_dropout.h5"),
        "custom": (K2 / "custom.h5", out_dir / "custom_dropout.h5"),
        "strip": (K2 / "savedmodel", out_dir / "sm_stripped"),
    }
    pairs = {k: [str(a), str(b)] for k, (a, b) in pairs.items()}
    reference = out_dir / "reference.npz"
    return _python(_VERIFY, json.dumps(pairs), reference, K2, legacy_keras=True)


def _names(layers) -> list[str]:
    return [name for name, _ in layers]


def _inserted(result) -> dict:
    return {s["layer"]: (s["kind"], s["rate"]) for s in result["sites"] if s["action"] == "insert"}


# -- detection and the parent process ---------------------------------------


@pytest.mark.slow
def test_detect_sorts_files_into_keras3_and_legacy(parent_run):
    assert parent_run["detect"] == {
        "custom.h5": None,  # a custom layer: Keras 3 reads it, with --custom-objects
        "custom_layers.py": None,
        "lambda.h5": None,
        "plain.h5": None,  # Keras 3 reads it directly
        "pruned.h5": "keras2-h5",
        "qat.h5": "keras2-h5",
        "rnn_oplambda.h5": "keras2-h5",  # TFOpLambda, LSTM's `time_major`
        "savedmodel": "savedmodel",
    }
    assert keras2.detect(FIXTURES / "cnn.keras") is None
    assert keras2.detect(FIXTURES / "mlp.h5") is None  # written by Keras 3


@pytest.mark.slow
def test_parent_never_imports_tf_keras_or_tfmot(parent_run):
    assert parent_run["tf_after_detect"] is False
    # Keras 3 was imported for --to-keras3; tf_keras and tfmot never.
    assert parent_run["modules"] and set(parent_run["modules"]) == {"keras"}


def test_folder_that_is_not_a_savedmodel(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert keras2.detect(tmp_path) is None
    with pytest.raises(ModelLoadError, match="not a SavedModel") as info:
        keras2.run({"mode": "plan", "input": tmp_path})
    assert "\n" not in str(info.value)
    assert f"Received: path={str(tmp_path)!r}" in str(info.value)


def test_savedmodel_without_keras_metadata(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert keras2.detect(tmp_path) == "savedmodel"
    with pytest.raises(ModelLoadError, match="no `keras_metadata.pb`"):
        keras2.run({"mode": "plan", "input": tmp_path})


def test_weights_only_h5_is_refused(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", data=np.zeros(2))
    assert keras2.detect(path) is None
    with pytest.raises(ModelLoadError, match="weights only"):
        keras2.run({"mode": "plan", "input": path})


def test_output_checks_before_the_child(tmp_path):
    source = K2 / "pruned.h5"
    taken = tmp_path / "taken.h5"
    taken.write_bytes(b"x")
    with pytest.raises(ModelSaveError, match="already exists. Pass `overwrite=True`"):
        keras2.run({"mode": "add", "input": source, "output": taken})
    with pytest.raises(ModelSaveError, match="it is the input model"):
        keras2.run({"mode": "add", "input": source, "output": source})
    with pytest.raises(ModelSaveError, match="does not exist"):
        keras2.run({"mode": "add", "input": source, "output": tmp_path / "no" / "x.h5"})
    plain_file = tmp_path / "taken_file"
    plain_file.write_bytes(b"x")
    with pytest.raises(ModelSaveError, match="Expected a folder path for a SavedModel"):
        keras2.run(
            {"mode": "add", "input": K2 / "savedmodel", "output": plain_file, "overwrite": True}
        )
    with pytest.raises(ModelSaveError, match="ending in `.keras`"):
        keras2.check_output(source, tmp_path / "x.h5", to_keras3=True)


def test_output_format_and_default_paths(tmp_path):
    assert output_format("a/b.h5") == "h5"
    assert output_format("a/b.keras") == "keras"
    assert output_format("a/b") == "savedmodel"
    assert keras2.default_output(K2 / "pruned.h5", "dropout") == K2 / "pruned_dropout.h5"
    assert keras2.default_output(K2 / "savedmodel", "dropout") == K2 / "savedmodel_dropout"
    keras3 = keras2.default_output(K2 / "savedmodel", "x", to_keras3=True)
    assert keras3 == K2 / "savedmodel_x.keras"


def test_to_keras3_refuses_tfmot_and_tfoplambda_without_a_child(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"wrappers \(PruneLowMagnitude\)"):
        keras2.run(
            {"mode": "add", "input": K2 / "pruned.h5", "output": tmp_path / "p.keras"},
        )
    with pytest.raises(UnsupportedModelError, match="TFOpLambda layers"):
        keras2.run(
            {
                "mode": "add",
                "input": K2 / "rnn_oplambda.h5",
                "output": tmp_path / "r.keras",
                "to_keras3": True,
            },
        )
    assert not list(tmp_path.iterdir())


def test_bad_mode_and_mc_are_policy_errors():
    with pytest.raises(PolicyError, match="Invalid `mode`"):
        keras2.run({"mode": "grow", "input": K2 / "qat.h5"})
    with pytest.raises(PolicyError, match="MC dropout is not available for Keras 2"):
        keras2.run(
            {"mode": "add", "input": K2 / "qat.h5", "output": "x.h5", "policy": Policy(mc=True)}
        )


def test_engine_crash_is_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'boom: out of luck' >&2\necho 'I0000 00:00 log noise' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(RegularizeError) as info:
        keras2.run({"mode": "plan", "input": K2 / "qat.h5"})
    message = str(info.value)
    assert "\n" not in message
    assert "exited with code 3 without a result: boom: out of luck" in message


# -- Keras 2 -> Keras 3 config fixes (no TensorFlow) --------------------------


def test_keras3_fixes_drop_what_keras3_refuses():
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {"class_name": "LSTM", "config": {"name": "lstm", "time_major": False}},
                {"class_name": "SpatialDropout2D", "config": {"name": "sd", "trainable": True}},
                {"class_name": "Conv2DTranspose", "config": {"name": "up", "groups": 1}},
            ],
        },
    }
    fixes, blockers = keras2.keras3_fixes(config)
    assert blockers == []
    assert fixes == [
        "lstm: dropped `time_major`",
        "sd: dropped `trainable`",
        "up: dropped `groups`",
    ]
    assert [layer["config"] for layer in config["config"]["layers"]] == [
        {"name": "lstm"},
        {"name": "sd"},
        {"name": "up"},
    ]


def test_keras3_fixes_block_what_has_no_equivalent():
    config = {
        "class_name": "Sequential",
        "config": {
            "layers": [
                {"class_name": "LSTM", "config": {"name": "lstm", "time_major": True}},
                {"class_name": "MultiHeadAttention", "config": {"name": "mha"}},
            ]
        },
    }
    _, blockers = keras2.keras3_fixes(config)
    assert blockers == [
        "lstm: `time_major=True` has no Keras 3 equivalent",
        "mha (MultiHeadAttention): Keras 3 cannot rebuild it from a Keras 2 `.h5` config",
    ]


def test_keras3_fixes_renumber_nested_model_calls():
    inner = {"class_name": "Sequential", "config": {"name": "inner", "layers": []}}
    inner["name"] = "inner"
    config = {
        "class_name": "Functional",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "config": {"name": "in"}, "inbound_nodes": []},
                {**inner, "inbound_nodes": [[["in", 0, 0, {}]]]},
                {
                    "class_name": "Dense",
                    "config": {"name": "d"},
                    "inbound_nodes": [[["inner", 1, 0, {}]]],
                },
            ],
            "input_layers": [["in", 0, 0]],
            "output_layers": [["d", 0, 0]],
        },
    }
    fixes, _ = keras2.keras3_fixes(config)
    assert fixes == ["inner: nested-model call indices shifted for Keras 3"]
    assert config["config"]["layers"][2]["inbound_nodes"] == [[["inner", 0, 0, {}]]]


# -- Keras 2 .h5 -> .keras through Keras 3 directly -------------------------


def test_keras2_h5_to_keras_via_keras3(tmp_path):
    import regularize

    model = io.load_model(K2 / "plain.h5")
    new = regularize.add_dropout(model, rate=0.2)
    names = [layer.name for layer in new.layers]
    assert "r2__dropout" in names and "fc__dropout" in names
    assert "c1__dropout" not in names  # feeds BatchNormalization
    path = io.save_model(new, tmp_path / "plain_dropout.keras")
    again = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    expected = np.asarray(model([x], training=False))  # Keras 2 files: a list of inputs
    np.testing.assert_array_equal(expected, np.asarray(new([x], training=False)))
    np.testing.assert_array_equal(expected, np.asarray(again([x], training=False)))


# -- the Keras 2 engine -------------------------------------------------------


@pytest.mark.slow
def test_savedmodel_to_savedmodel_inference_equal(results, verified, out_dir):
    result = results["sm"]
    assert result["output"] == str(out_dir / "sm_dropout")
    assert (out_dir / "sm_dropout" / "saved_model.pb").is_file()
    assert _inserted(result) == {
        "d1": ("Dropout", 0.2),
        "block_out": ("Dropout", 0.2),
        "head": ("Dropout", 0.2),
    }
    check = verified["sm"]
    assert _names(check["layers"]) == [
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
    assert check["equal"] and check["weights_equal"] and check["compiled"]
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.slow
def test_sites_carry_the_report_fields(results):
    site = results["sm"]["sites"][0]
    assert set(site) == {
        "layer",
        "layer_class",
        "kind",
        "rate",
        "action",
        "reason",
        "shape",
        "depth",
        "existing",
    }
    report = keras2.to_report(results["sm"])
    assert report.summary_lines() == ["inserted 3 sites: 3 Dropout"]


@pytest.mark.slow
def test_policy_semantics_match_the_keras3_engine(results):
    blocks = {s["layer"]: (s["action"], s["reason"]) for s in results["plan_blocks"]["sites"]}
    assert blocks == {
        "d1": ("skip", "preset blocks: not a block output"),
        "block_out": ("insert", "after relu"),
        "head": ("skip", "preset blocks: not a block output"),
    }
    assert results["plan_blocks"]["output"] is None


@pytest.mark.slow
def test_pruned_model_keeps_pruning_and_fine_tunes(results, verified):
    assert _inserted(results["pruned"]) == {
        "prune_low_magnitude_h1": ("Dropout", 0.2),
        "prune_low_magnitude_h2": ("Dropout", 0.2),
    }
    assert results["pruned"]["sites"][0]["layer_class"] == "PruneLowMagnitude(Dense)"
    check = verified["pruned"]
    assert check["layers"] == [
        ["prune_low_magnitude_h1", "PruneLowMagnitude"],
        ["prune_low_magnitude_h1__dropout", "Dropout"],
        ["prune_low_magnitude_h2", "PruneLowMagnitude"],
        ["prune_low_magnitude_h2__dropout", "Dropout"],
        ["prune_low_magnitude_logits", "PruneLowMagnitude"],
    ]
    # Masks, thresholds and step variables are the input's own.
    assert check["equal"] and check["weights_equal"] and check["compiled"]
    assert check["steps"] == [2, 2, 2]
    assert check["steps_after_fit"] == [3, 3, 3]  # UpdatePruningStep drives it on
    assert check["masks_zero"] == [0.5, 0.5, 0.5]
    assert _names(check["stripped_layers"]) == [
        "h1",
        "prune_low_magnitude_h1__dropout",
        "h2",
        "prune_low_magnitude_h2__dropout",
        "logits",
    ]
    assert check["stripped_equal"]
    assert check["stripped_zeros"] == [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_qat_model_stays_quantization_aware(results, verified):
    assert _inserted(results["qat"]) == {
        "quant_conv": ("SpatialDropout2D", 0.2),
        "quant_fc": ("Dropout", 0.2),
    }
    check = verified["qat"]
    assert check["layers"] == [
        ["image", "InputLayer"],
        ["quantize_layer", "QuantizeLayer"],
        ["quant_conv", "QuantizeWrapperV2"],
        ["quant_conv__dropout", "SpatialDropout2D"],
        ["quant_flat", "QuantizeWrapperV2"],
        ["quant_fc", "QuantizeWrapperV2"],
        ["quant_fc__dropout", "Dropout"],
        ["quant_probs", "QuantizeWrapperV2"],
    ]
    assert check["equal"] and check["weights_equal"] and check["compiled"]
    assert np.isfinite(check["fit_loss"])


@pytest.mark.slow
def test_recurrent_dropout_through_config(results, verified):
    sites = {s["layer"]: s for s in results["rnn"]["sites"]}
    assert sites["lstm"]["action"] == "insert"
    assert sites["lstm"]["reason"] == "dropout 0 -> 0.2, recurrent_dropout 0 -> 0.1"
    assert sites["score"]["reason"] == "model output"
    assert any("cuDNN" in w for w in results["rnn"]["warnings"])
    check = verified["rnn"]
    assert check["lstm"] == [0.2, 0.1]
    assert ["tf.math.reduce_mean", "TFOpLambda"] in check["layers"]
    assert check["equal"] and check["weights_equal"]
    assert results["rnn"]["output"].endswith("rnn_dropout.h5")  # Keras 2 family


@pytest.mark.slow
def test_unknown_custom_layer_names_class_and_option(results):
    error = results["custom_missing"]
    assert error["type"] == "ModelLoadError"
    assert "'Scale'" in error["error"] and "`custom_objects`" in error["error"]
    assert "\n" not in error["error"]


@pytest.mark.slow
def test_lambda_layer_needs_unsafe(results):
    error = results["lambda_safe"]
    assert error["type"] == "ModelLoadError"
    assert error["error"].startswith("Refusing to load a model with a Python-lambda `Lambda`")
    assert "`safe_mode=False`" in error["error"]
    assert _inserted(results["lambda_unsafe"]) == {"fc": ("Dropout", 0.2)}


@pytest.mark.slow
def test_custom_objects_file_in_the_keras2_engine(results, verified):
    assert _inserted(results["custom"]) == {"fc": ("Dropout", 0.2)}
    assert ["scale", "Scale"] in verified["custom"]["layers"]
    assert verified["custom"]["equal"] and verified["custom"]["weights_equal"]


@pytest.mark.slow
def test_rerun_retargets_and_strip_removes(parent_run, verified):
    plan, qat, strip = parent_run["again"]
    assert {(s["action"], s["reason"]) for s in plan["sites"]} == {
        ("keep", "inserted earlier, same rate")
    }
    assert {s["layer"]: (s["action"], s["reason"]) for s in qat["sites"]} == {
        "quant_conv": ("update", "SpatialDropout2D(0.2) -> SpatialDropout2D(0.4)"),
        "quant_fc": ("update", "Dropout(0.2) -> Dropout(0.4)"),
        "quant_probs": ("skip", "model output"),
    }
    assert [s["action"] for s in strip["sites"]] == ["remove"] * 3
    stripped = verified["strip"]
    assert not any(name.endswith("__dropout") for name in _names(stripped["layers"]))
    assert stripped["equal"] and stripped["weights_equal"]


# -- --to-keras3 --------------------------------------------------------------


@pytest.mark.slow
def test_to_keras3_writes_a_checked_keras_file(parent_run, verified, out_dir):
    result = parent_run["keras3"]
    assert result["output"] == str(out_dir / "sm.keras")
    assert len(_inserted(result)) == 3
    # LayerNormalization: Keras 3 and tf_keras round differently.
    assert any("float rounding" in w for w in result["warnings"])
    model = keras.saving.load_model(out_dir / "sm.keras")
    assert [layer.name for layer in model.layers][:3] == ["features", "d1", "d1__dropout"]
    reference = np.load(out_dir / "reference.npz")
    got = np.asarray(model([reference["x0"]], training=False))
    np.testing.assert_allclose(got, reference["y0"], rtol=1e-5, atol=1e-6)
    for layer in model.layers:
        for i, w in enumerate(layer.get_weights()):
            np.testing.assert_array_equal(w, reference[f"w/{layer.name}/{i}"])
