"""Policies on real graphs: presets, rules, globs into nested models, schedules.

Each rewrite is checked three ways: where dropout went (structure), that
inference is bit-exact, and that the `.keras` file reloads exactly.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import L
from helpers import assert_exact
from helpers import inserted
from helpers import rnn_dropout

import regularize
from regularize import mc
from regularize.core.policy import Policy


def resnet_like():
    """Stem, two residual blocks (BN inside), a dense head."""
    keras.utils.set_random_seed(21)
    inp = keras.Input((8, 8, 3), name="img")
    x = L.Conv2D(4, 3, padding="same", name="stem_conv")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.Activation("relu", name="stem_relu")(x)
    for b in (1, 2):
        y = L.Conv2D(4, 3, padding="same", name=f"block{b}_conv1")(x)
        y = L.BatchNormalization(name=f"block{b}_bn1")(y)
        y = L.Activation("relu", name=f"block{b}_relu")(y)
        y = L.Conv2D(4, 3, padding="same", name=f"block{b}_conv2")(y)
        y = L.BatchNormalization(name=f"block{b}_bn2")(y)
        x = L.Add(name=f"block{b}_add")([x, y])
        x = L.Activation("relu", name=f"block{b}_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(8, activation="relu", name="fc")(x)
    out = L.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="resnet_like")


def lstm_model():
    keras.utils.set_random_seed(22)
    inp = keras.Input((5, 4), name="seq")
    x = L.LSTM(6, return_sequences=True, name="lstm1")(inp)
    x = L.LSTM(6, name="lstm2")(x)
    x = L.Dense(6, activation="relu", name="fc")(x)
    out = L.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="lstm_model")


@pytest.fixture(scope="module")
def resnet():
    return resnet_like()


@pytest.fixture(scope="module")
def mobilenet():
    return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4)


@pytest.fixture(scope="module")
def lstm():
    return lstm_model()


def _x(model, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, *model.input_shape[1:])).astype("float32")


def _rewrite(model, tmp_path, **policy):
    """add_dropout with `policy`; checks inference and reload; returns (new, report)."""
    report = regularize.Report()
    new = regularize.add_dropout(model, policy=Policy(**policy), report=report)
    x = _x(model)
    assert_exact(model, new, x)
    path = tmp_path / "new.keras"
    regularize.save_model(new, path, overwrite=True)
    reloaded = keras.models.load_model(path)
    assert_exact(new, reloaded, x)
    assert inserted(reloaded) == inserted(new)
    return new, report


def _names(model) -> set[str]:
    return {path.rsplit("/", 1)[-1].removesuffix("__dropout") for path in inserted(model)}


# -- presets -----------------------------------------------------------------


def test_all_preset_on_resnet_like(resnet, tmp_path):
    new, _ = _rewrite(resnet, tmp_path, rate=0.2)
    assert _names(new) == {"stem_relu", "block1_relu", "block1_out", "block2_relu"} | {
        "block2_out",
        "fc",
    }


def test_head_preset_on_resnet_like_starts_after_the_last_batchnorm(resnet, tmp_path):
    new, report = _rewrite(resnet, tmp_path, preset="head")
    assert _names(new) == {"block2_out", "fc"}
    reasons = {s.layer: s.reason for s in report.sites}
    assert reasons["block2_relu"] == "preset head: before the last normalization layer"
    assert reasons["probs"] == "model output"


def test_blocks_preset_on_resnet_like_marks_residual_outputs(resnet, tmp_path):
    new, report = _rewrite(resnet, tmp_path, preset="blocks")
    assert _names(new) == {"block1_out", "block2_out"}
    assert {s.reason for s in report.sites if s.layer == "fc"} == {
        "preset blocks: not a block output"
    }


def test_head_preset_on_mobilenet_v2(mobilenet, tmp_path):
    new, _ = _rewrite(mobilenet, tmp_path, preset="head")
    assert inserted(new) == {"out_relu__dropout": ("SpatialDropout2D", 0.3)}


def test_blocks_preset_on_mobilenet_v2_uses_the_linear_adds(mobilenet, tmp_path):
    # MobileNetV2's residual Adds have no activation after them (linear
    # bottlenecks): the Add itself is the block output.
    new, report = _rewrite(mobilenet, tmp_path, preset="blocks", rate=0.1)
    adds = {layer.name for layer in mobilenet.layers if isinstance(layer, L.Add)}
    assert _names(new) == adds
    assert len(adds) == 10
    assert all(s.layer_class == "Add" for s in report.sites if s.action == "insert")


def test_all_preset_on_mobilenet_v2_leaves_the_adds_alone(mobilenet, tmp_path):
    new, _ = _rewrite(mobilenet, tmp_path, rate=0.1)
    assert not any("add" in name for name in _names(new))
    assert len(_names(new)) == 35  # every ReLU6: none feeds BN or an output


def test_presets_on_a_keras3_lstm_model(lstm, tmp_path):
    everywhere, _ = _rewrite(lstm, tmp_path, rate=0.25)
    assert _names(everywhere) == {"fc"}
    assert rnn_dropout(everywhere) == {
        "lstm1": ("recurrent", 0.25),
        "lstm2": ("recurrent", 0.25),
    }
    # No normalization anywhere: the head is where the tensors are flat.
    head, report = _rewrite(lstm, tmp_path, preset="head", rate=0.25)
    assert _names(head) == {"fc"}
    assert rnn_dropout(head) == {"lstm2": ("recurrent", 0.25)}
    assert {s.layer: s.action for s in report.sites}["lstm1"] == "skip"
    blocks, _ = _rewrite(lstm, tmp_path, preset="blocks", rate=0.25)
    assert inserted(blocks) == {} and rnn_dropout(blocks) == {}


# -- rules ---------------------------------------------------------------------


def test_rules_apply_in_order_and_the_last_match_wins(resnet, tmp_path):
    rules = [
        {"match": "block*", "rate": 0.4},
        {"match": "block2_*", "rate": 0.1},
        {"match": "block1_relu", "skip": True},
        {"class": "Dense", "kind": "gaussian"},
    ]
    new, report = _rewrite(resnet, tmp_path, rate=0.2, rules=rules)
    assert inserted(new) == {
        "stem_relu__dropout": ("SpatialDropout2D", 0.2),
        "block1_out__dropout": ("SpatialDropout2D", 0.4),
        "block2_relu__dropout": ("SpatialDropout2D", 0.1),
        "block2_out__dropout": ("SpatialDropout2D", 0.1),
        "fc__dropout": ("GaussianDropout", 0.2),
    }
    reasons = {s.layer: s.reason for s in report.sites}
    assert reasons["block1_relu"] == "skipped by rule 3 (match='block1_relu')"
    assert reasons["block2_out"] == "after relu, rule 2 (match='block2_*')"


def test_a_rule_can_bring_back_a_site_the_preset_leaves_out(resnet, tmp_path):
    new, _ = _rewrite(resnet, tmp_path, preset="head", rules=[{"match": "stem_*", "rate": 0.1}])
    assert _names(new) == {"stem_relu", "block2_out", "fc"}


def test_rules_by_depth_and_trainable(resnet, tmp_path):
    frozen = keras.models.clone_model(resnet)
    frozen.set_weights(resnet.get_weights())
    for layer in frozen.layers:
        layer.trainable = layer.name.startswith(("block2", "fc", "probs"))
    # The last match wins: the skip comes last, or the depth rule's rate
    # would bring the frozen sites back.
    rules = [{"depth": [0.0, 0.5], "rate": 0.05}, {"trainable": False, "skip": True}]
    new, report = _rewrite(frozen, tmp_path, rate=0.3, rules=rules)
    depths = {s.layer: s.depth for s in report.sites}
    got = inserted(new)
    assert set(got) == {"block2_relu__dropout", "block2_out__dropout", "fc__dropout"}
    for name, (_, rate) in got.items():
        assert rate == (0.05 if depths[name.removesuffix("__dropout")] <= 0.5 else 0.3)


def test_kinds(resnet, tmp_path):
    for kind, expected in [
        ("dropout", "Dropout"),
        ("spatial", "SpatialDropout2D"),
        ("gaussian", "GaussianDropout"),
        ("alpha", "AlphaDropout"),
    ]:
        new, _ = _rewrite(resnet, tmp_path, rules=[{"match": "block1_out", "kind": kind}])
        assert inserted(new)["block1_out__dropout"] == (expected, 0.3)
        # "spatial" on a flat tensor falls back to Dropout.
        new, _ = _rewrite(resnet, tmp_path, rules=[{"match": "fc", "kind": "spatial"}])
        assert inserted(new)["fc__dropout"] == ("Dropout", 0.3)


def test_bare_glob_matches_at_any_depth_and_a_path_glob_only_its_path(tmp_path):
    keras.utils.set_random_seed(23)
    inner_in = keras.Input((4,))
    # (No dropout goes after a nested model's own output: each ends in a Dense.)
    inner_out = L.Dense(4, name="lin")(L.Dense(4, activation="relu", name="fc")(inner_in))
    inner = keras.Model(inner_in, inner_out, name="inner")
    mid_in = keras.Input((4,))
    mid_out = L.Dense(4, name="lin")(L.Dense(4, activation="tanh", name="fc")(inner(mid_in)))
    mid = keras.Model(mid_in, mid_out, name="mid")
    inp = keras.Input((4,))
    x = L.Dense(4, activation="relu", name="fc")(mid(inp))
    model = keras.Model(inp, L.Dense(1, name="y")(x), name="outer")
    new, _ = _rewrite(model, tmp_path, rate=0.2, rules=[{"match": "fc", "rate": 0.4}])
    assert inserted(new) == {
        "mid/inner/fc__dropout": ("Dropout", 0.4),
        "mid/fc__dropout": ("Dropout", 0.4),
        "fc__dropout": ("Dropout", 0.4),
    }
    new, _ = _rewrite(model, tmp_path, rate=0.2, rules=[{"match": "mid/inner/*", "skip": True}])
    assert inserted(new) == {
        "mid/fc__dropout": ("Dropout", 0.2),
        "fc__dropout": ("Dropout", 0.2),
    }
    new, _ = _rewrite(model, tmp_path, rate=0.2, rules=[{"match": "mid/*", "rate": 0.1}])
    assert inserted(new)["mid/inner/fc__dropout"] == ("Dropout", 0.1)  # * crosses "/"
    assert inserted(new)["fc__dropout"] == ("Dropout", 0.2)


def test_a_glob_that_matches_nothing_is_a_warning(resnet):
    report = regularize.Report()
    policy = Policy(rules=[{"match": "block9_*", "rate": 0.4}], source="p.toml")
    regularize.plan(resnet, policy=policy, report=report)
    assert report.warnings == ["rule 1 (match='block9_*') of p.toml matches no candidate site"]


def test_an_unknown_class_name_is_a_policy_error(resnet):
    policy = Policy(rules=[{"class": "Conv9D", "rate": 0.4}], source="p.toml")
    with pytest.raises(regularize.PolicyError) as info:
        regularize.plan(resnet, policy=policy)
    assert str(info.value) == (
        "Invalid `class` in rule 1 in p.toml: no Keras layer class has that name. "
        "Expected a class name such as 'Conv2D' or 'ReLU'. Received: class='Conv9D'"
    )


def test_class_names_of_the_models_own_custom_layers_are_known():
    class Shift(L.Layer):
        def call(self, x):
            return x + 1.0

    inp = keras.Input((3,))
    model = keras.Model(inp, Shift(name="s")(L.Dense(3, activation="relu", name="fc")(inp)))
    sites = regularize.plan(model, policy=Policy(rules=[{"class": "Shift", "rate": 0.1}]))
    assert [s.action for s in sites] == ["insert"]


# -- depth schedule ------------------------------------------------------------


def test_depth_schedule_grows_with_depth(mobilenet, tmp_path):
    new, report = _rewrite(mobilenet, tmp_path, schedule=(0.05, 0.5))
    sites = [s for s in report.sites if s.action == "insert"]
    assert len(sites) == 35
    depths = [s.depth for s in sites]
    rates = [s.rate for s in sites]
    assert depths == sorted(depths) and rates == sorted(rates)
    assert rates[0] < 0.1 and rates[-1] > 0.45
    assert all(0.05 <= r <= 0.5 for r in rates)
    for site in sites:
        assert site.rate == pytest.approx(0.05 + 0.45 * site.depth, abs=1e-4)
    assert inserted(new)[sites[-1].layer + "__dropout"][1] == rates[-1]


def test_depth_counts_the_layers_inside_nested_models(tmp_path):
    keras.utils.set_random_seed(24)
    base_in = keras.Input((4,))
    h = base_in
    for i in range(6):
        h = L.Dense(4, activation="relu", name=f"base{i}")(h)
    base = keras.Model(base_in, h, name="base")
    inp = keras.Input((4,))
    x = L.Dense(4, activation="relu", name="head")(base(inp))
    model = keras.Model(inp, L.Dense(1, name="y")(x))
    report = regularize.Report()
    regularize.plan(model, report=report)
    depths = {s.layer: s.depth for s in report.sites}
    assert depths == {
        "base/base0": pytest.approx(1 / 8, abs=1e-4),
        "base/base1": pytest.approx(2 / 8, abs=1e-4),
        "base/base2": pytest.approx(3 / 8, abs=1e-4),
        "base/base3": pytest.approx(4 / 8, abs=1e-4),
        "base/base4": pytest.approx(5 / 8, abs=1e-4),
        "base/base5": pytest.approx(6 / 8, abs=1e-4),
        "head": pytest.approx(7 / 8, abs=1e-4),
    }


# -- SELU ----------------------------------------------------------------------


def test_alpha_dropout_after_selu(tmp_path):
    keras.utils.set_random_seed(25)
    inp = keras.Input((6,))
    x = L.Dense(8, activation="selu", kernel_initializer="lecun_normal", name="s1")(inp)
    x = L.Activation("selu", name="s2")(L.Dense(8, name="lin")(x))
    x = L.Dense(8, activation="relu", name="r")(x)
    model = keras.Model(inp, L.Dense(1, name="y")(x))
    new, _ = _rewrite(model, tmp_path, rate=0.1)
    assert inserted(new) == {
        "s1__dropout": ("AlphaDropout", 0.1),
        "s2__dropout": ("AlphaDropout", 0.1),
        "r__dropout": ("Dropout", 0.1),
    }


# -- re-targeting --------------------------------------------------------------


def test_rerun_with_another_policy_retargets_the_tools_own_layers(resnet, tmp_path):
    first, _ = _rewrite(resnet, tmp_path, rate=0.2)
    report = regularize.Report()
    second = regularize.add_dropout(first, policy=Policy(preset="head", rate=0.4), report=report)
    assert _names(second) == {"block2_out", "fc"}
    assert {n: r for n, (_, r) in inserted(second).items()} == {
        "block2_out__dropout": 0.4,
        "fc__dropout": 0.4,
    }
    actions = {s.layer: s.action for s in report.sites}
    assert actions["stem_relu"] == actions["block1_out"] == "remove"
    assert actions["fc"] == "update"
    assert_exact(resnet, second, _x(resnet))
    back = regularize.add_dropout(second, policy=Policy(rate=0.2))
    assert inserted(back) == inserted(first)
    # The same policy again changes nothing.
    again = regularize.Report()
    regularize.add_dropout(second, policy=Policy(preset="head", rate=0.4), report=again)
    assert again.changed() == 0


def test_blocks_then_all_removes_the_dropout_after_adds(mobilenet):
    blocks = regularize.add_dropout(mobilenet, policy=Policy(preset="blocks"))
    everywhere = regularize.add_dropout(blocks, policy=Policy())
    assert not any("add" in n for n in _names(everywhere))
    assert _names(everywhere) == _names(regularize.add_dropout(mobilenet))


def _with_user_dropout():
    keras.utils.set_random_seed(26)
    inp = keras.Input((6,))
    x = L.Dense(6, activation="relu", name="fc1")(inp)
    x = L.Dropout(0.5, name="user_drop")(x)
    x = L.Dense(6, name="lin")(x)
    x = L.Dropout(0.5, name="user_drop2")(x)
    x = L.Dense(6, activation="relu", name="fc2")(x)
    return keras.Model(inp, L.Dense(1, name="y")(x))


@pytest.mark.parametrize(
    "existing, expected",
    [
        ("keep", {"user_drop": 0.5, "user_drop2": 0.5, "fc2__dropout": 0.2}),
        ("retarget", {"user_drop": 0.2, "user_drop2": 0.5, "fc2__dropout": 0.2}),
        ("remove", {"fc2__dropout": 0.2}),
    ],
)
def test_existing_dropout_is_kept_unless_the_policy_says_otherwise(existing, expected, tmp_path):
    model = _with_user_dropout()
    new, _ = _rewrite(model, tmp_path, rate=0.2, existing=existing)
    got = {layer.name: layer.rate for layer in new.layers if isinstance(layer, L.Dropout)}
    assert got == expected


def test_mc_policy_inserts_dropout_active_at_inference(resnet, tmp_path):
    new = regularize.add_dropout(resnet, policy=Policy(preset="head", mc=True))
    layers = {type(layer).__name__ for layer in new.layers}
    assert "MCSpatialDropout2D" in layers and "MCDropout" in layers
    x = _x(resnet)
    assert not np.array_equal(new(x, training=False), new(x, training=False))
    path = tmp_path / "mc.keras"
    regularize.save_model(new, path)
    reloaded = keras.models.load_model(path)
    assert any(isinstance(layer, mc.MCDropout) for layer in reloaded.layers)
    # Plain again: the MC layers are the tool's own and get re-targeted.
    plain = regularize.add_dropout(new, policy=Policy(preset="head"))
    assert_exact(resnet, plain, x)
