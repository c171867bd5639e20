"""The model-file checker's rules, one by one, on configs written as data.

`regularize.core.checker` decides from names; `regularize.keras3.trust` reads what
Keras 3 would resolve from Keras' own registries. Each rule is shown to
refuse what it must and to let through what real models hold, and the real
configs of Keras' and keras-hub's models pass (the slow suite checks every
Keras Application).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import keras_hub
import pytest

from regularize.core import budget
from regularize.core import checker
from regularize.core.allowlist import keras2_allowlist
from regularize.core.errors import ModelLoadError
from regularize.keras3 import trust

R = "Received: path='m'"


def _model(*layers):
    return {"module": "keras", "class_name": "Functional", "config": {"layers": list(layers)}}


def _layer(kind, module="keras.layers", registered=None, **config):
    return {
        "module": module,
        "class_name": kind,
        "config": {"name": "x", **config},
        "registered_name": registered,
    }


def _fn(name, module="builtins"):
    return {"module": module, "class_name": "function", "config": name, "registered_name": None}


@pytest.fixture(scope="module")
def allow():
    assert keras_hub.models.BertBackbone  # its registrations are what a hub file brings
    return trust.keras3_allowlist()


def _refusal(config, allowlist) -> str:
    with pytest.raises(ModelLoadError) as info:
        checker.check_config(config, allowlist, received=R)
    checker.check_config(config, allowlist, received=R, unsafe=True)  # --unsafe lifts it
    return str(info.value)


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (_layer("core.Dense"), "names the class 'core.Dense'"),
        (_layer("KerasFileEditor", "keras.src.saving.file_editor"), "'KerasFileEditor'"),
        (_layer("TorchModuleWrapper"), "'TorchModuleWrapper'"),
        (_layer("Dense", "keras_hub.src.evil"), "'Dense' of module 'keras_hub.src.evil'"),
        (_layer("Sampler", registered="keras_hub>upload_preset"), "'keras_hub>upload_preset'"),
        (_layer("Lambda", function=_fn("keras_hub>coco_id_to_name")), "function 'keras_hub>"),
        (_layer("Lambda", function=_fn("keras_hub>BertBackbone")), "function 'keras_hub>Bert"),
        (_layer("Lambda", function=_fn("upload_preset")), "function 'upload_preset'"),
        (_layer("Lambda", function=_fn("get_file", "keras.utils")), "'keras.utils.get_file'"),
        (_layer("Lambda", function=_fn("map", "keras.ops")), "'keras.ops.map'"),
        (_layer("Dense", activation="keras_hub>compute_word_piece_vocabulary"), "function"),
        (_layer("Lambda", function=["4wEAAAAA", None, None]), "Python-lambda"),
        (_layer("StringLookup", vocabulary="/etc/hosts"), "reads `vocabulary`"),
        (
            _layer(
                "X",
                module="keras_hub.src.y",
                registered="keras_hub>WhisperTokenizer",
                special_tokens="tokens.json",
            ),
            "reads `special_tokens`",
        ),
        (_layer("Preprocessor", config_file="../../x.json"), "reads `config_file`"),
    ],
)
def test_refused(allow, layer, fragment):
    message = _refusal(_model(layer), allow)
    assert fragment in message, message
    assert message.endswith(f"{checker.UNSAFE_HINT} {R}")


@pytest.mark.parametrize(
    "layer",
    [
        _layer(
            "Dense",
            activation="gelu",
            kernel_initializer={
                "module": "keras.initializers",
                "class_name": "GlorotUniform",
                "config": {},
                "registered_name": None,
            },
        ),
        _layer("Lambda", function=_fn("relu", "keras.activations")),
        _layer("Lambda", function=_fn("add", "keras.ops")),
        _layer("Lambda", function=_fn("keras_hub>gelu_approximate")),
        _layer("Add", module="keras.src.ops.numpy"),
        _layer("StringLookup", vocabulary=["a", "b", "/etc/hosts"]),
        _layer("Preprocessor", config_file="preprocessor.json"),
        _layer("BertBackbone", "keras_hub.src.models.bert.bert_backbone", "keras_hub>BertBackbone"),
        _layer("Unknown", "my_package.layers"),  # unknown here: Keras says so itself
    ],
)
def test_allowed(allow, layer):
    checker.check_config(_model(layer), allow, received=R)


def test_files_inside_the_model_folder_may_be_named(allow, tmp_path, monkeypatch):
    (tmp_path / "assets").mkdir()
    inside = tmp_path / "assets" / "vocab.txt"
    inside.write_text("a\n")
    layer = _layer("StringLookup", vocabulary=str(inside))
    checker.check_config(_model(layer), allow, received=R, root=str(tmp_path))
    # A relative name is opened from the working folder, not from the model's folder.
    monkeypatch.chdir(tmp_path.parent)
    relative = _layer("StringLookup", vocabulary=os.path.join("assets", "vocab.txt"))
    with pytest.raises(ModelLoadError, match="reads `vocabulary`"):
        checker.check_config(_model(relative), allow, received=R, root=str(tmp_path))


def test_user_custom_objects_are_allowed():
    @keras.saving.register_keras_serializable(package="regularize_test_checker")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    try:
        layer = _layer("Twice", "tests.mine", "regularize_test_checker>Twice")
        # Registered in this process but not passed: refused, as an installed package's would be.
        _refusal(_model(layer), trust.keras3_allowlist())
        checker.check_config(_model(layer), trust.keras3_allowlist({"Twice": Twice}), received=R)
    finally:
        keras.saving.get_custom_objects().pop("regularize_test_checker>Twice")


def test_keras2_constant_bound_is_not_lifted_by_unsafe():
    op = {
        "class_name": "TFOpLambda",
        "config": {"name": "big", "function": "ones"},
        "inbound_nodes": [["_CONSTANT_VALUE", -1, [30000, 20000], {}]],
    }
    for unsafe in (False, True):
        with pytest.raises(ModelLoadError, match="'big' \\(TFOpLambda\\) would make a constant"):
            checker.check_config(_model(op), keras2_allowlist(), received=R, unsafe=unsafe)
    small = dict(op, inbound_nodes=[["_CONSTANT_VALUE", -1, [300, 200], {}]])
    checker.check_config(_model(small), keras2_allowlist(), received=R)


def test_keras2_functions_named_by_module():
    allow = keras2_allowlist(custom_module="mine")
    ok = [_fn("relu", "keras.activations"), _fn("mse", "keras.losses"), _fn("f", "mine.fns")]
    for function in ok:
        checker.check_config(
            _model(_layer("TextVectorization", standardize=function)), allow, received=R
        )
    bad = _layer("TextVectorization", standardize=_fn("load_model", "keras.models"))
    with pytest.raises(ModelLoadError, match="names the function 'keras.models.load_model'"):
        checker.check_config(_model(bad), allow, received=R)


def test_keras2_modules_are_exact():
    allow = keras2_allowlist(modules=frozenset({"tfmot_like.quantizers"}))
    layer = {"module": "tfmot_like.quantizers", "class_name": "Q", "config": {"name": "q"}}
    checker.check_config(_model(layer), allow, received=R)
    for module in ("tfmot_like", "tfmot_like.quantizers.x", "tensorflow.python.keras.layers"):
        bad = dict(layer, module=module)
        with pytest.raises(ModelLoadError, match="names the Python module"):
            checker.check_config(_model(bad), allow, received=R)


def test_weight_budget():
    weights = [budget.LayerWeights("fc", "Dense", 10 << 20)]
    budget.check_weight_budget(weights, stored=10 << 20, available=None, received=R)
    with pytest.raises(ModelLoadError, match="'fc' \\(Dense\\) would allocate 209.7 MB"):
        budget.check_weight_budget(
            [budget.LayerWeights("fc", "Dense", 200 << 20)], stored=1, available=None, received=R
        )
    with pytest.raises(ModelLoadError, match="more than the 1.0 kB of memory available"):
        budget.check_weight_budget(weights, stored=10 << 20, available=1000, received=R)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in dir(keras.applications)
        if n[0].isupper() and callable(getattr(keras.applications, n))
    ),
)
def test_every_application_config_passes(allow, name, tmp_path):
    model = getattr(keras.applications, name)(weights=None)
    path = Path(tmp_path) / f"{name}.keras"
    model.save(path)
    trust.check_file(path)
