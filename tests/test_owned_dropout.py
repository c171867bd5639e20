"""Layers that own their dropout: rebuilt with new config values.

MultiHeadAttention, GroupedQueryAttention, keras-hub transformer blocks and
any registered layer with `dropout`-like config keys are rebuilt from their
edited config with their weights copied, as RNN layers are. `rate` drives the
general keys, `attention_rate` (off by default, warned about) the dropout on
attention probabilities. Every rewrite here is checked for structure,
bit-exact inference against outputs captured before it, a `.keras`
save/reload and one `fit` step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import regularize
from regularize import keras2
from regularize.core import owned
from regularize.core.errors import RegularizeWarning
from regularize.core.report import Report

L = keras.layers


def _tokens(n=3, steps=6, vocab=20, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, steps)).astype("int32")


def _attention_model(mha_dropout=0.0, gqa=True):
    inp = keras.Input((6,), dtype="int32", name="ids")
    x = L.Embedding(20, 8, name="emb")(inp)
    x = L.MultiHeadAttention(2, 4, dropout=mha_dropout, name="mha")(x, x)
    if gqa:
        x = L.GroupQueryAttention(4, 2, 1, name="gqa")(x, x)
    x = L.Dense(8, activation="relu", name="ffn")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inp, L.Dense(2, name="out")(x), name="attn")


def _sites(report):
    return {s.layer: s for s in report.sites}


def _roundtrip(model, new, x, tmp_path, **load):
    """Bit-exact inference against `model` (captured first), save/reload, one fit step."""
    expected = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(expected, np.asarray(new(x, training=False)))
    path = tmp_path / "new.keras"
    new.save(path)
    again = keras.models.load_model(path, **load)
    np.testing.assert_array_equal(expected, np.asarray(again(x, training=False)))
    again.compile(optimizer="sgd", loss="mse")
    history = again.fit(x, np.zeros((len(x), 2), "float32"), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    return again


# -- finding the keys (pure Python) ---------------------------------------


def test_keys_are_found_by_name_with_their_roles():
    config = {
        "name": "block",
        "dropout": 0.1,
        "dropout_rate": 0,
        "attention_dropout": 0.2,
        "hidden_dropout_prob": 0.3,
        "attention_probs_dropout_prob": 0.0,
        "recurrent_dropout": 0.0,
        "attn_drop": 0.1,
        "resid_pdrop": 0.1,
        "drop_path_rate": 0.1,  # stochastic depth, not unit dropout
        "drop_prob": 0.1,
        "use_dropout": True,  # a flag, not a rate
        "dropout_seed": 7,
        "layer_dropout": "0.1",
    }
    keys = {k.name: k.role for k in owned.find_keys(config)}
    assert keys == {
        "dropout": owned.Role.GENERAL,
        "dropout_rate": owned.Role.GENERAL,
        "attention_dropout": owned.Role.ATTENTION,
        "hidden_dropout_prob": owned.Role.GENERAL,
        "attention_probs_dropout_prob": owned.Role.ATTENTION,
        "recurrent_dropout": owned.Role.RECURRENT,
        "attn_drop": owned.Role.ATTENTION,
        "resid_pdrop": owned.Role.GENERAL,
    }
    (key,) = owned.find_keys({"dropout": 0.0}, attention_layer=True)
    assert key.role == owned.Role.ATTENTION


def test_arguments_of_a_sub_model_argument_are_found_by_path_and_set_in_a_copy():
    # A SegFormer's `image_encoder` argument is a serialized MiT: its arguments are the
    # SegFormer's too, named by their path; a task's `backbone` is left out with nested=False.
    encoder = {"class_name": "MiTBackbone", "config": {"max_drop_path_rate": 0.0, "x": 1}}
    config = {"dropout": 0.1, "image_encoder": encoder, "image_shape": [32, 32, 3]}
    keys = {k.name: (k.value, k.role) for k in owned.find_arguments(config)}
    assert keys == {
        "dropout": (0.1, owned.Role.GENERAL),
        "image_encoder.max_drop_path_rate": (0.0, owned.Role.DROP_PATH),
    }
    assert [k.name for k in owned.find_arguments(config, nested=False)] == ["dropout"]
    new = owned.with_arguments(config, {"image_encoder.max_drop_path_rate": 0.1, "dropout": 0.2})
    assert new["dropout"] == 0.2
    assert new["image_encoder"]["config"] == {"max_drop_path_rate": 0.1, "x": 1}
    assert encoder["config"]["max_drop_path_rate"] == 0.0  # the input is not changed


def test_attention_rate_in_policy_files_rules_and_round_trips(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        'attention_rate = 0.1\n[[rule]]\nclass = "MultiHeadAttention"\nattention_rate = 0.2\n'
    )
    policy = regularize.Policy.from_file(path, rate=0.3, attention_rate=0.05)
    assert (policy.rate, policy.attention_rate) == (0.3, 0.1)
    assert policy.rules[0].attention_rate == 0.2
    assert regularize.Policy.from_dict(policy.to_dict()) == policy
    assert "attention_rate" not in regularize.Policy().to_dict()  # off by default
    with pytest.raises(regularize.PolicyError, match=r"Received: attention_rate=1\.5"):
        regularize.Policy(attention_rate=1.5)


# -- Keras' attention layers ----------------------------------------------


def test_attention_rate_rebuilds_mha_and_gqa_and_warns(tmp_path):
    model = _attention_model()
    x = _tokens()
    report = Report()
    with pytest.warns(RegularizeWarning, match="attention dropout disables fused"):
        new = regularize.add_dropout(model, 0.2, attention_rate=0.1, report=report)
    sites = _sites(report)
    for name in ("mha", "gqa"):
        site = sites[name]
        assert (site.kind, site.action, site.rate) == ("owned", "insert", 0.1)
        assert site.reason == "dropout 0 -> 0.1"
        assert new.get_layer(name) is not model.get_layer(name)
        assert new.get_layer(name).get_config()["dropout"] == 0.1
        assert model.get_layer(name).get_config()["dropout"] == 0.0  # input untouched
    assert sites["ffn"].kind == "Dropout"  # token states: element-wise
    assert owned.ATTENTION_WARNING in report.warnings
    assert owned.KERNEL_SWITCH_WARNING in report.warnings  # 0 -> 0.1: the explicit kernel
    again = _roundtrip(model, new, x, tmp_path)
    assert again.get_layer("mha").get_config()["dropout"] == 0.1
    assert again.get_layer("gqa").get_config()["dropout"] == 0.1
    # The other layers are the input's own objects (its variables).
    assert new.get_layer("ffn") is model.get_layer("ffn")


def test_an_attention_kernel_switch_warns_and_stays_within_rounding():
    """Where Keras' fused and explicit attention round differently (2 heads of 8 on 16
    features), the switch is the documented exception to bit-exact inference."""
    inp = keras.Input((5, 16))
    x = L.MultiHeadAttention(2, 8, name="mha")(inp, inp)
    model = keras.Model(inp, L.LayerNormalization(name="norm")(x + inp))
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    expected = np.asarray(model(x, training=False))
    report = Report()  # (a RegularizeWarning too, once per process)
    new = regularize.add_dropout(model, 0.0, attention_rate=0.1, report=report)
    assert _sites(report)["mha"].reason == "dropout 0 -> 0.1"
    assert report.warnings == [owned.ATTENTION_WARNING, owned.KERNEL_SWITCH_WARNING]
    assert np.abs(expected - np.asarray(new(x, training=False))).max() <= 1e-5
    assert new.get_layer("norm") is model.get_layer("norm")


def test_attention_rate_is_off_by_default_and_does_not_warn():
    model = _attention_model(mha_dropout=0.05, gqa=False)
    report = Report()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegularizeWarning)
        regularize.plan(model, 0.3, report=report)
    site = _sites(report)["mha"]
    assert (site.action, site.rate, site.existing) == ("keep", 0.05, "dropout=0.05")
    assert report.warnings == []
    report = Report()
    regularize.plan(_attention_model(gqa=False), 0.3, report=report)
    site = _sites(report)["mha"]
    assert (site.action, site.reason) == (
        "skip",
        "attention_rate not set: dropout=0 left as it is",
    )


def test_rules_target_attention_layers_by_class(tmp_path):
    model = _attention_model(mha_dropout=0.1)
    x = _tokens(seed=1)
    policy = regularize.Policy(
        rate=0.2,
        rules=[
            {"class": "GroupedQueryAttention", "attention_rate": 0.25},
            {"class": "MultiHeadAttention", "skip": True},
        ],
    )
    report = Report()
    new = regularize.add_dropout(model, policy=policy, report=report)
    sites = _sites(report)
    assert (sites["gqa"].action, sites["gqa"].rate) == ("insert", 0.25)
    assert sites["gqa"].reason == "dropout 0 -> 0.25"
    assert (sites["mha"].action, sites["mha"].reason) == (
        "skip",
        "skipped by rule 2 (class='MultiHeadAttention')",
    )
    assert new.get_layer("mha") is model.get_layer("mha")
    _roundtrip(model, new, x, tmp_path)


def test_update_and_remove_dropout_of_an_attention_layer(tmp_path):
    model = _attention_model(mha_dropout=0.1, gqa=False)
    x = _tokens(seed=2)
    report = Report()
    new = regularize.add_dropout(model, 0.2, attention_rate=0.3, report=report)
    site = _sites(report)["mha"]
    assert (site.action, site.reason, site.existing) == (
        "update",
        "dropout 0.1 -> 0.3",
        "dropout=0.1",
    )
    assert new.get_layer("mha").get_config()["dropout"] == 0.3
    assert report.warnings == [owned.ATTENTION_WARNING]  # 0.1 -> 0.3: no kernel switch
    report = Report()
    bare = regularize.remove_dropout(new, report=report)
    site = _sites(report)["mha"]
    assert (site.action, site.reason) == ("remove", "dropout 0.3 -> 0")
    assert report.warnings == [owned.KERNEL_SWITCH_WARNING]  # back to the fused kernel
    assert bare.get_layer("mha").get_config()["dropout"] == 0.0
    assert not any(isinstance(layer, L.Dropout) for layer in bare.layers)
    _roundtrip(model, bare, x, tmp_path)


def test_frozen_sublayer_of_a_rebuilt_layer_stays_frozen():
    model = _attention_model(gqa=False)
    model.get_layer("mha")._query_dense.trainable = False
    new = regularize.add_dropout(model, 0.2, attention_rate=0.1)
    rebuilt = new.get_layer("mha")
    assert rebuilt is not model.get_layer("mha")
    assert rebuilt._query_dense.trainable is False
    assert rebuilt._key_dense.trainable is True
    assert len(new.trainable_weights) == len(model.trainable_weights)


# -- any registered layer with such keys ----------------------------------


@keras.saving.register_keras_serializable(package="owned_test")
class Block(L.Layer):
    """A custom block with a general and an attention dropout key."""

    def __init__(self, units=8, dropout_rate=0.0, attention_dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dropout_rate = dropout_rate
        self.attention_dropout = attention_dropout
        self.dense = L.Dense(units, activation="relu")
        self.drop = L.Dropout(dropout_rate)
        self.att_drop = L.Dropout(attention_dropout)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x, training=None):
        return self.drop(self.dense(self.att_drop(x, training=training)), training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "dropout_rate": self.dropout_rate,
            "attention_dropout": self.attention_dropout,
        }


@keras.saving.register_keras_serializable(package="owned_test")
class Stubborn(Block):
    """Reports a constant rate: the rebuilt layer would not carry the new one."""

    def get_config(self):
        return {**super().get_config(), "dropout_rate": 0.0}


@keras.saving.register_keras_serializable(package="owned_test")
class Picky(Block):
    """Refuses any attention dropout (like MultiHeadAttention with flash attention)."""

    def __init__(self, **kwargs):
        if kwargs.get("attention_dropout"):
            raise ValueError("attention dropout is not supported here")
        super().__init__(**kwargs)


def _block_model():
    inp = keras.Input((4,))
    x = Block(8, name="block")(inp)
    x = Stubborn(8, name="stubborn")(x)
    x = Picky(units=8, name="picky")(x)
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_registered_custom_layer_keys_follow_their_roles(tmp_path):
    model = _block_model()
    x = np.random.default_rng(3).normal(size=(3, 4)).astype("float32")
    report = Report()
    new = regularize.add_dropout(model, 0.2, attention_rate=0.1, report=report)
    sites = _sites(report)
    assert (sites["block"].action, sites["block"].rate) == ("insert", 0.2)
    assert sites["block"].reason == "dropout_rate 0 -> 0.2, attention_dropout 0 -> 0.1"
    config = new.get_layer("block").get_config()
    assert (config["dropout_rate"], config["attention_dropout"]) == (0.2, 0.1)
    assert sites["stubborn"].action == "skip"
    assert sites["stubborn"].reason == (
        "rebuilt from its config, it does not carry the new value: dropout_rate=0.0 (expected 0.2)"
    )
    assert sites["picky"].action == "skip"
    assert sites["picky"].reason == (
        "cannot be rebuilt with dropout_rate 0 -> 0.2, attention_dropout 0 -> 0.1 "
        "(attention dropout is not supported here)"
    )
    assert new.get_layer("stubborn") is model.get_layer("stubborn")
    assert new.get_layer("picky") is model.get_layer("picky")
    _roundtrip(model, new, x, tmp_path)


def test_cli_attention_rate_option(tmp_path):
    from click.testing import CliRunner

    from regularize.cli import cli

    path = tmp_path / "attn.keras"
    _attention_model(gqa=False).save(path)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--attention-rate", "0.15", "--json"])
    assert result.exit_code == 0, result.output
    assert '"attention_rate": 0.15' in result.stdout
    assert '"reason": "dropout 0 -> 0.15"' in result.stdout
    bad = CliRunner().invoke(cli, ["inspect", str(path), "--attention-rate", "1"])
    assert bad.exit_code == 2
    assert "Invalid value for '--attention-rate'" in bad.output


# -- keras-hub layers (no hard-coded list of their classes) ---------------


@pytest.mark.slow
def test_keras_hub_transformer_layers_get_their_dropout(tmp_path):
    import keras_hub

    inp = keras.Input((5,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(50, 5, 8, name="emb")(inp)
    x = keras_hub.layers.TransformerEncoder(16, 2, dropout=0.1, name="enc")(x)
    x = keras_hub.layers.TransformerDecoder(16, 2, name="dec")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    model = keras.Model(inp, L.Dense(2, name="out")(x))
    tokens = _tokens(steps=5, vocab=50, seed=4)
    # `rate` alone: the decoder's attention runs Keras' fused kernel (dropout 0), which a
    # dropout above 0 would switch to the explicit one (other rounding): left as it is.
    report = Report()
    plain = regularize.add_dropout(model, 0.25, report=report)
    sites = _sites(report)
    assert (sites["enc"].action, sites["enc"].reason) == ("update", "dropout 0.1 -> 0.25")
    assert (sites["dec"].action, sites["dec"].reason) == ("skip", owned.KERNEL_SWITCH_SKIP)
    assert plain.get_layer("dec") is model.get_layer("dec")
    np.testing.assert_array_equal(model(tokens, training=False), plain(tokens, training=False))
    # With attention_rate the user accepts the switch: it is made, and said.
    report = Report()
    new = regularize.add_dropout(model, 0.25, attention_rate=0.1, report=report)
    sites = _sites(report)
    assert (sites["dec"].action, sites["dec"].reason) == ("insert", "dropout 0 -> 0.25")
    assert owned.KERNEL_SWITCH_WARNING in report.warnings
    assert {s.kind for s in report.sites} == {"owned"}  # no activation site inside a block
    assert new.get_layer("dec").dropout == 0.25
    assert new.get_layer("dec")._self_attention_layer.dropout == 0.25
    expected = np.asarray(model(tokens, training=False))
    diff = np.abs(expected - np.asarray(new(tokens, training=False))).max()
    assert diff <= 1e-5  # float rounding only, as the warning says
    path = tmp_path / "new.keras"
    new.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(new(tokens, training=False), again(tokens, training=False))
    assert again.get_layer("enc").dropout == 0.25


# -- the Keras 2 engine ---------------------------------------------------

_MAKE_K2 = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tf_keras
    L = tf_keras.layers
    inp = tf_keras.Input((6,), dtype="int32")
    x = L.Embedding(20, 8, name="emb")(inp)
    x = L.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = L.Dense(8, activation="relu", name="ffn")(x)
    inner_in = tf_keras.Input((8,))
    feat = L.Dense(8, activation="relu", name="feat")(inner_in)
    inner = tf_keras.Model(inner_in, feat, name="inner")
    x = inner(L.GlobalAveragePooling1D(name="pool")(x))
    model = tf_keras.Model(inp, L.Dense(2, name="out")(x))
    model.save(sys.argv[1], save_format="h5")
    """
)

_CHECK_K2 = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tf_keras
    old = tf_keras.models.load_model(sys.argv[1])
    new = tf_keras.models.load_model(sys.argv[2])
    x = np.random.default_rng(0).integers(0, 20, (3, 6)).astype("int32")
    equal = bool(np.array_equal(old(x, training=False), new(x, training=False)))
    new.compile(optimizer="sgd", loss="mse")
    loss = new.fit(x, np.zeros((3, 2)), epochs=1, verbose=0).history["loss"][0]
    print(json.dumps({
        "equal": equal,
        "mha_dropout": new.get_layer("mha").get_config()["dropout"],
        "layers": [l.name for l in new.layers],
        "inner": [l.name for l in new.get_layer("inner").layers],
        "loss_finite": bool(np.isfinite(loss)),
    }))
    """
)


@pytest.mark.slow
def test_keras2_engine_rebuilds_attention_and_places_token_and_nested_sites(tmp_path):
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    source, output = tmp_path / "k2.h5", tmp_path / "k2_dropout.h5"
    subprocess.run([sys.executable, "-c", _MAKE_K2, str(source)], check=True, env=env)
    policy = {"rate": 0.2, "attention_rate": 0.1}
    (answer,) = keras2.run_many(
        [{"mode": "add", "input": str(source), "output": str(output), "policy": policy}]
    )
    assert not isinstance(answer, Exception), answer
    sites = {s["layer"]: s for s in answer["sites"]}
    assert (sites["mha"]["kind"], sites["mha"]["action"], sites["mha"]["rate"]) == (
        "owned",
        "insert",
        0.1,
    )
    assert sites["mha"]["reason"] == "dropout 0 -> 0.1"
    assert (sites["ffn"]["kind"], sites["ffn"]["action"]) == ("Dropout", "insert")
    assert (sites["inner/feat"]["kind"], sites["inner/feat"]["action"]) == ("Dropout", "insert")
    assert owned.ATTENTION_WARNING in answer["warnings"]
    # The engine itself refuses to write a model whose inference differs.
    done = subprocess.run(
        [sys.executable, "-c", _CHECK_K2, str(source), str(output)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    import json

    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["equal"] and data["loss_finite"]
    assert data["mha_dropout"] == 0.1
    assert "ffn__dropout" in data["layers"]
    assert data["inner"][-1] == "feat__dropout"
