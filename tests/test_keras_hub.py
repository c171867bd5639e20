"""keras-hub models built from their constructors at tiny sizes (no download).

Each model is checked three ways: structure (class kept, which constructor
arguments or layers changed), bit-exact inference against outputs captured
before the rewrite, and `.keras` save -> reload (+ the same outputs), then one
training step. A task keeps its class and preprocessor; a backbone whose
constructor has dropout arguments is rebuilt through them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import keras_hub  # in the `test` extra: a missing one fails the collection
import numpy as np
import pytest

import regularize
from regularize.core.policy import Policy
from regularize.core.report import KEEP
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.report import Report
from regularize.keras3 import hub
from regularize.keras3 import io

pytestmark = pytest.mark.slow


def _images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, 32, 32, 3)).astype("float32")


def _tokens(n=2, length=8, vocabulary=50):
    ids = np.random.default_rng(0).integers(1, vocabulary, size=(n, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones((n, length), "int32")}


def _outputs(model, x):
    out = model(x, training=False)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, out)


def _assert_same(before, after):
    keras.tree.assert_same_structure(before, after)
    for a, b in zip(keras.tree.flatten(before), keras.tree.flatten(after), strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))


def _reload(model, tmp_path, name):
    path = io.save_model(model, tmp_path / f"{name}.keras")
    return keras.saving.load_model(path)


def _updates(report):
    return {(s.layer, s.kind): s.rate for s in report.sites if s.action == UPDATE}


@pytest.fixture(scope="module")
def vit():
    keras.utils.set_random_seed(0)
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        dropout_rate=0.0,
        attention_dropout=0.0,
        name="vit",
    )


def test_vit_backbone_keeps_its_class_and_reloads_without_keras_hub(vit, tmp_path):
    x = _images()
    before = _outputs(vit, x)
    weights = [w.numpy().copy() for w in vit.weights]
    report = Report()
    new = regularize.add_dropout(
        vit, policy=Policy(rate=0.3, attention_rate=0.1, exact=True), report=report
    )

    assert type(new) is type(vit)
    assert new.get_config()["dropout_rate"] == 0.3
    assert _updates(report) == {("vit", "dropout_rate"): 0.3}
    # Keras' MultiHeadAttention leaves its fused kernel once its dropout is > 0:
    # inference would change, so under `exact` the attention dropout stays at 0.
    assert new.get_config()["attention_dropout"] == 0.0
    skipped = {s.kind: s.reason for s in report.sites if s.action == SKIP}
    assert skipped == {"attention_dropout": hub.NOT_EXACT}
    # The input is untouched, the copy bit-equal.
    assert vit.get_config()["dropout_rate"] == 0.0
    for w, a, b in zip(weights, vit.weights, new.weights, strict=True):
        np.testing.assert_array_equal(w, a.numpy())
        np.testing.assert_array_equal(w, b.numpy())
    _assert_same(before, new(x, training=False))

    path = io.save_model(new, tmp_path / "vit.keras")
    # Plain Keras in a fresh process, keras-hub not imported by the caller.
    script = (
        "import sys, keras, numpy as np\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "y = m(np.load(sys.argv[3]), training=False)\n"
        "np.save(sys.argv[2], keras.ops.convert_to_numpy(y))\n"
        "print(type(m).__name__, m.get_config()['dropout_rate'])\n"
    )
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["ViTBackbone", "0.3"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), before)


def test_vit_attention_rate_switches_the_kernel_with_a_measured_warning(vit, tmp_path):
    x = _images()
    before = _outputs(vit, x)
    report = Report()
    new = regularize.add_dropout(vit, rate=0.3, attention_rate=0.1, report=report)
    assert type(new) is type(vit)
    assert _updates(report) == {("vit", "dropout_rate"): 0.3, ("vit", "attention_dropout"): 0.1}
    assert new.get_config()["attention_dropout"] == 0.1
    [warning] = [w for w in report.warnings if "crossed 0" in w]
    assert "other kernel" in warning and "`exact=True`" in warning
    measured = float(warning.split("at most ")[1].split(" ")[0])
    assert 0 < measured < 1e-4
    after = keras.ops.convert_to_numpy(new(x, training=False))
    assert np.max(np.abs(after - before)) < 1e-4
    reloaded = _reload(new, tmp_path, "vit_attention")
    assert reloaded.get_config()["attention_dropout"] == 0.1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(x, training=False)), after)


def test_vit_without_attention_rate_leaves_attention_dropout(vit):
    report = Report()
    new = regularize.add_dropout(vit, rate=0.2, report=report)
    assert new.get_config()["attention_dropout"] == 0.0
    skipped = [s for s in report.sites if s.action == SKIP]
    assert [(s.kind, s.reason) for s in skipped] == [
        ("attention_dropout", "`attention_rate` not set: attention_dropout=0 left as it is")
    ]


def test_vit_fit_step_and_remove_dropout(vit, tmp_path):
    x = _images()
    before = _outputs(vit, x)
    new = regularize.add_dropout(vit, rate=0.3)
    new.compile(optimizer="sgd", loss="mse")
    history = new.fit(x, np.zeros_like(before), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(new.weights, vit.weights, strict=True)
    )
    stripped = regularize.remove_dropout(new)
    assert type(stripped) is type(vit)
    assert stripped.get_config()["dropout_rate"] == 0.0
    _assert_same(_outputs(new, x), stripped(x, training=False))
    _assert_same(_outputs(new, x), _reload(stripped, tmp_path, "stripped")(x, training=False))


def test_plan_reports_constructor_arguments_and_builds_nothing(vit):
    sites = regularize.plan(vit, rate=0.25)
    assert [(s.layer, s.layer_class, s.kind, s.rate, s.action) for s in sites] == [
        ("vit", "ViTBackbone", "dropout_rate", 0.25, UPDATE),
        ("vit", "ViTBackbone", "attention_dropout", None, SKIP),
    ]
    assert sites[0].existing == "dropout_rate=0"
    assert "0 -> 0.25" in sites[0].reason


@pytest.fixture(scope="module")
def bert():
    keras.utils.set_random_seed(1)
    return keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        name="bert",
    )


def test_bert_own_dropout_follows_the_rate_unless_kept(bert, tmp_path):
    x = dict(_tokens(), segment_ids=np.zeros((2, 8), "int32"))
    before = _outputs(bert, x)
    kept = Report()
    regularize.add_dropout(bert, policy=Policy(rate=0.3, existing="keep"), report=kept)
    assert [(s.kind, s.action, s.existing) for s in kept.sites] == [
        ("dropout", KEEP, "dropout=0.1")
    ]
    removed = regularize.add_dropout(bert, policy=Policy(rate=0.3, existing="remove"))
    assert removed.get_config()["dropout"] == 0.0

    report = Report()
    new = regularize.add_dropout(bert, rate=0.3, report=report)
    assert type(new) is type(bert)
    assert _updates(report) == {("bert", "dropout"): 0.3}
    assert new.get_config()["dropout"] == 0.3
    assert bert.get_config()["dropout"] == 0.1
    _assert_same(before, new(x, training=False))
    reloaded = _reload(new, tmp_path, "bert")
    assert type(reloaded).__name__ == "BertBackbone"
    _assert_same(before, reloaded(x, training=False))
    new.compile(optimizer="sgd", loss="mse")
    loss = new.train_on_batch(x, keras.tree.map_structure(np.zeros_like, before))
    assert np.all(np.isfinite(loss))


@pytest.fixture(scope="module")
def resnet_task():
    keras.utils.set_random_seed(2)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
        name="resnet",
    )
    converter = keras_hub.layers.ResNetImageConverter(image_size=(32, 32), scale=1 / 255.0)
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter)
    return keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=preprocessor, name="resnet_task"
    )


def test_resnet_task_keeps_class_preprocessor_and_head(resnet_task, tmp_path):
    x = _images()
    before = resnet_task.predict(x, verbose=0)
    report = Report()
    with pytest.warns(regularize.RegularizeWarning, match="ResNetBackbone class is not kept"):
        new = regularize.add_dropout(resnet_task, rate=0.3, report=report)

    assert type(new) is type(resnet_task)
    assert new.preprocessor is resnet_task.preprocessor
    assert new.get_config()["num_classes"] == 3
    assert new.get_config()["pooling"] == "avg"
    assert new.get_config()["dropout"] == 0.3
    assert resnet_task.get_config()["dropout"] == 0.0
    # The backbone has no dropout argument: SpatialDropout2D in its graph.
    inserted = {
        s.layer: s.kind for s in report.sites if s.action == "insert" and s.kind != "dropout"
    }
    assert inserted == {
        "resnet_task/resnet/conv1_relu": "SpatialDropout2D",
        "resnet_task/resnet/stack0_block0_1_relu": "SpatialDropout2D",
        "resnet_task/resnet/stack0_block0_out": "SpatialDropout2D",
        "resnet_task/resnet/stack1_block0_1_relu": "SpatialDropout2D",
    }
    assert _updates(report) == {("resnet_task", "dropout"): 0.3}
    assert any("not kept" in w for w in report.warnings)
    names = [layer.name for layer in new.backbone.layers]
    assert "conv1_relu__dropout" in names

    np.testing.assert_array_equal(before, new.predict(x, verbose=0))
    reloaded = _reload(new, tmp_path, "resnet_task")
    assert type(reloaded).__name__ == "ResNetImageClassifier"
    assert type(reloaded.preprocessor).__name__ == "ResNetImageClassifierPreprocessor"
    np.testing.assert_array_equal(before, reloaded.predict(x, verbose=0))

    # One step on raw images: the preprocessor still runs inside fit().
    new.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = new.fit(x, np.array([0, 1]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    trained = new.predict(x, verbose=0)
    stripped = regularize.remove_dropout(new)
    assert type(stripped) is type(resnet_task)
    assert stripped.get_config()["dropout"] == 0.0
    assert not [la for la in stripped.backbone.layers if isinstance(la, keras.layers.Dropout)]
    np.testing.assert_array_equal(trained, stripped.predict(x, verbose=0))


def test_resnet_task_with_drop_path_keeps_its_class(resnet_task, tmp_path):
    """Drop path inside the backbone lists its layers in another order: the task is still
    rebuilt around it with every weight paired by name."""
    x = _images()
    before = resnet_task.predict(x, verbose=0)
    report = Report()
    new = regularize.add_dropout(resnet_task, rate=0.0, drop_path=0.2, report=report)
    assert type(new) is type(resnet_task)
    assert new.preprocessor is resnet_task.preprocessor
    drops = [s for s in report.sites if s.kind == "DropPath" and s.action == "insert"]
    assert [(s.layer, s.rate) for s in drops] == [
        ("resnet_task/resnet/stack0_block0_2_bn", 0.1),
        ("resnet_task/resnet/stack1_block0_2_bn", 0.2),
    ]
    layers = {la.name: la for la in new.backbone.layers}
    assert layers["stack1_block0_2_bn__droppath"].noise_shape == (None, 1, 1, 1)
    np.testing.assert_array_equal(before, new.predict(x, verbose=0))
    reloaded = _reload(new, tmp_path, "resnet_task_droppath")
    assert type(reloaded).__name__ == "ResNetImageClassifier"
    np.testing.assert_array_equal(before, reloaded.predict(x, verbose=0))


def test_resnet_task_head_preset_leaves_the_backbone(resnet_task):
    report = Report()
    new = regularize.add_dropout(resnet_task, policy=Policy(rate=0.4, preset="head"), report=report)
    assert new.backbone is resnet_task.backbone
    assert _updates(report) == {("resnet_task", "dropout"): 0.4}
    x = _images()
    np.testing.assert_array_equal(resnet_task.predict(x, verbose=0), new.predict(x, verbose=0))


@pytest.fixture(scope="module")
def efficientnet():
    keras.utils.set_random_seed(3)
    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 2],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 1],
        stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        dropout=0.0,
        input_shape=(32, 32, 3),
        name="efficientnet",
    )


def test_efficientnet_rebuilt_through_its_dropout_argument(efficientnet, tmp_path):
    x = _images()
    before = _outputs(efficientnet, x)
    report = Report()
    new = regularize.add_dropout(efficientnet, rate=0.3, report=report)
    assert type(new) is type(efficientnet)
    assert _updates(report) == {("efficientnet", "dropout"): 0.3}
    dropouts = [x for x in new._flatten_layers() if isinstance(x, keras.layers.Dropout)]
    assert dropouts, "the skip-connection dropout is made by the constructor"
    assert not [x for x in efficientnet._flatten_layers() if isinstance(x, keras.layers.Dropout)]
    _assert_same(before, new(x, training=False))
    reloaded = _reload(new, tmp_path, "efficientnet")
    assert type(reloaded).__name__ == "EfficientNetBackbone"
    _assert_same(before, reloaded(x, training=False))


def test_a_config_that_does_not_round_trip_is_refused():
    # keras-hub 0.32's EfficientNetBackbone.get_config() leaves out `num_features`:
    # rebuilt from it, the top convolution has 1280 filters instead of 32.
    keras.utils.set_random_seed(3)
    model = keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0],
        stackwise_depth_coefficients=[1.0],
        stackwise_kernel_sizes=[3],
        stackwise_num_repeats=[1],
        stackwise_input_filters=[8],
        stackwise_output_filters=[8],
        stackwise_expansion_ratios=[1],
        stackwise_squeeze_and_excite_ratios=[0.0],
        stackwise_strides=[1],
        stackwise_block_types=["fused"],
        stackwise_force_input_filters=[0],
        stackwise_nores_option=[False],
        dropout=0.0,
        input_shape=(32, 32, 3),
        num_features=32,
        name="tiny_efficientnet",
    )
    with pytest.raises(
        regularize.UnsupportedModelError,
        match=r"Cannot rebuild 'tiny_efficientnet' .*Received: weight 'top_conv/kernel' "
        r"of shape \(1, 1, 8, 1280\) where the original has 'top_conv/kernel' of shape "
        r"\(1, 1, 8, 32\)",
    ):
        regularize.add_dropout(model, rate=0.3)


@pytest.fixture(scope="module")
def llama():
    keras.utils.set_random_seed(4)
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        name="llama",
    )


def test_llama_decoder_backbone(llama, tmp_path):
    x = _tokens()
    before = _outputs(llama, x)
    report = Report()
    new = regularize.add_dropout(llama, rate=0.1, report=report)
    assert type(new) is type(llama)
    assert _updates(report) == {("llama", "dropout"): 0.1}
    _assert_same(before, new(x, training=False))
    reloaded = _reload(new, tmp_path, "llama")
    assert type(reloaded).__name__ == "LlamaBackbone"
    assert reloaded.get_config()["dropout"] == 0.1
    _assert_same(before, reloaded(x, training=False))
    new.compile(optimizer="sgd", loss="mse")
    loss = new.train_on_batch(x, np.zeros_like(before))
    assert np.isfinite(loss)


def test_frozen_layers_stay_frozen(llama):
    llama.get_layer("token_embedding").trainable = False
    try:
        new = regularize.add_dropout(llama, rate=0.1)
        assert new.get_layer("token_embedding").trainable is False
        assert len(new.trainable_weights) == len(llama.trainable_weights)
    finally:
        llama.get_layer("token_embedding").trainable = True


def test_hub_models_are_detected_by_class_not_by_import():
    assert hub.dropout_arguments(
        {"dropout": 0.1, "attention_dropout": 0, "use_dropout": True, "name": "x"}
    ) == {"dropout": 0.1, "attention_dropout": 0.0}
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert not hub.is_hub_model(plain)


def test_cli_inspect_and_add_dropout_keep_the_class(vit, tmp_path):
    from click.testing import CliRunner

    from regularize.cli import cli

    source = io.save_model(vit, tmp_path / "vit.keras")
    result = CliRunner().invoke(cli, ["inspect", str(source)])
    assert result.exit_code == 0, result.output
    assert "dropout_rate" in result.stdout and "ViTBackbone" in result.stdout
    out = tmp_path / "vit_dropout.keras"
    result = CliRunner().invoke(cli, ["add-dropout", str(source), "-o", str(out), "--rate", "0.2"])
    assert result.exit_code == 0, result.output
    reloaded = keras.saving.load_model(out)
    assert type(reloaded).__name__ == "ViTBackbone"
    assert reloaded.get_config()["dropout_rate"] == 0.2
    x = _images()
    _assert_same(_outputs(vit, x), reloaded(x, training=False))


def test_bert_dropout_from_0_would_switch_the_attention_kernel():
    # BERT's one `dropout` also drives its attention layers' dropout: from 0,
    # Keras' MultiHeadAttention would leave its fused kernel. Identical tokens
    # would hide that on a probe batch; the layers themselves tell.
    keras.utils.set_random_seed(5)
    model = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        dropout=0.0,
        name="bert0",
    )
    report = Report()
    exact = Policy(rate=0.3, exact=True)
    new = regularize.add_dropout(model, policy=exact, report=report)
    assert [(s.layer, s.kind, s.action, s.reason) for s in report.sites] == [
        ("bert0", "dropout", SKIP, hub.NOT_EXACT)
    ]
    assert new.get_config()["dropout"] == 0.0
    assert [(s.kind, s.action) for s in regularize.plan(model, policy=exact)] == [("dropout", SKIP)]
    x = dict(_tokens(), segment_ids=np.zeros((2, 8), "int32"))
    x["token_ids"] = np.random.default_rng(3).integers(0, 50, size=(2, 8)).astype("int32")
    _assert_same(_outputs(model, x), new(x, training=False))
    # Asked for without `exact`, the rate is set and the switch warned about.
    switched = Report()
    new = regularize.add_dropout(model, rate=0.3, report=switched)
    assert new.get_config()["dropout"] == 0.3
    assert [(s.kind, s.action) for s in switched.sites] == [("dropout", UPDATE)]
    assert any("dropout crossed 0" in w for w in switched.warnings)
