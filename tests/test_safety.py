"""The pre-load checks of `regularize.core.safety` and the shared output rule, without TensorFlow.

The attacks end to end (real CLI, real Keras 2 files) are in
`test_security.py`; here each rule is pinned down on plain data, and a fuzz
of Keras 2 configs goes through the parent's pre-load check
(`regularize.keras2.check_model_file`): it may only ever raise
`RegularizeError`, and must refuse every config whose op layers call
anything off the allowlist.
"""

from __future__ import annotations

import json
import os
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from regularize import keras2
from regularize.core import safety
from regularize.core.allowlist import KERAS2_MODULES
from regularize.core.allowlist import TFMOT_PREFIX
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.errors import RegularizeError
from regularize.core.paths import check_output_path

R = "Received: path='m.h5'"
# How many fuzz cases: a few hundred in CI; `REGULARIZE_FUZZ=10000` by hand.
FUZZ = int(os.environ.get("REGULARIZE_FUZZ", "300"))


def _op(name, function, inbound=None):
    return {
        "class_name": "TFOpLambda",
        "name": name,
        "config": {"name": name, "trainable": True, "dtype": "float32", "function": function},
        "inbound_nodes": inbound if inbound is not None else [["inp", 0, 0, {"y": 1.0}]],
    }


def _model(*layers):
    base = {"class_name": "InputLayer", "name": "inp", "config": {"name": "inp"}}
    return {"class_name": "Functional", "config": {"name": "m", "layers": [base, *layers]}}


# -- TFOpLambda and friends --------------------------------------------------


@pytest.mark.parametrize(
    "function",
    [
        "math.add",
        "__operators__.add",
        "__operators__.getitem",
        "reshape",
        "nn.relu",
        "concat",
        "compat.v1.transpose",
        "math.reduce_mean",
        "image.resize",
        "einsum",
    ],
)
def test_pure_functions_pass(function):
    safety.check_keras2_config(_model(_op("ok", function)), R)


@pytest.mark.parametrize(
    "function",
    [
        "io.write_file",
        "io.gfile.rmtree",
        "io.gfile.copy",
        "saved_model.load",
        "load_library",
        "load_op_library",
        "py_function",
        "numpy_function",
        "compat.v1.py_func",
        "compat.v1.gfile.Remove",
        "summary.create_file_writer",
        "raw_ops.WriteFile",
        "debugging.assert_equal",
        "print",
        "math.io.write_file",
        "nn..",
        7,
        None,
    ],
)
def test_other_functions_are_refused(function):
    with pytest.raises(ModelLoadError) as info:
        safety.check_keras2_config(_model(_op("evil", function)), R)
    message = str(info.value)
    assert message.startswith("Refusing to load model: layer 'evil' (TFOpLambda) calls")
    assert "`safe_mode=False`" in message and message.endswith(R)
    assert "\n" not in message


def test_unsafe_lifts_the_refusal():
    safety.check_keras2_config(_model(_op("evil", "io.write_file")), R, unsafe=True)


@pytest.mark.parametrize(
    "inbound",
    [
        [["_CONSTANT_VALUE", -1, "/etc/passwd", {}]],
        [["inp", 0, 0, {"y": "/tmp/x"}]],
        [["inp", 0, 0, {"y": ["not_a_layer", 0, 0]}]],
        [["_CONSTANT_VALUE", -1, ["a", 1], {}]],
        [["inp", 0, 0, {"y": {"class_name": "TypeSpec", "type_spec": "x", "serialized": []}}]],
        [["inp", 0, 0, {"y": {"class_name": "__bytes__", "value": "/etc/passwd"}}]],
        [["inp", 0, 0, {"y": {"class_name": "__tuple__", "items": ["/etc/passwd"]}}]],
    ],
)
def test_constant_arguments_must_be_inert(inbound):
    with pytest.raises(ModelLoadError, match="passes `tf.math.add` the constant argument"):
        safety.check_keras2_config(_model(_op("odd", "math.add", inbound)), R)


@pytest.mark.parametrize(
    "inbound",
    [
        [["inp", 0, 0, {"y": 2.5, "name": None}]],
        [["_CONSTANT_VALUE", -1, [[1, 2], [3, None]], {"dtype": "float32"}]],
        [["inp", 0, 0, {"slice_spec": [{"start": 1, "stop": None, "step": 2}]}]],
        [["inp", 0, 0, {"y": ["inp", 0, 0]}]],
        [["inp", 0, 0, {"padding": "SAME", "data_format": "NHWC"}]],
        [["_CONSTANT_VALUE", -1, "ij,jk->ik", {}], ["inp", 0, 0, {}]],
        # SavedModel metadata encodes tuples and shapes (tf_keras json_utils):
        [["inp", 0, 0, {"shape": {"class_name": "__tuple__", "items": [-1, 2, 1]}}]],
        [
            [
                "inp",
                0,
                0,
                {
                    "slice_spec": {
                        "class_name": "__tuple__",
                        "items": [
                            {"start": None, "stop": 2, "step": None},
                            {"class_name": "__ellipsis__"},
                        ],
                    }
                },
            ]
        ],
        [["inp", 0, 0, {"shape": {"class_name": "TensorShape", "items": [None, 4]}}]],
    ],
)
def test_inert_constant_arguments_pass(inbound):
    safety.check_keras2_config(_model(_op("ok", "math.add", inbound)), R)


def test_attribute_layers():
    prop = {"class_name": "InstanceProperty", "config": {"name": "p", "attr_name": "shape"}}
    safety.check_keras2_config(_model(prop), R)
    method = {"class_name": "InstanceMethod", "config": {"name": "m", "attr_name": "numpy"}}
    with pytest.raises(ModelLoadError, match="layer 'm' \\(InstanceMethod\\) calls 'numpy'"):
        safety.check_keras2_config(_model(method), R)
    cls = {"class_name": "ClassMethod", "config": {"name": "c", "cls_symbol": "RaggedTensor"}}
    with pytest.raises(ModelLoadError, match="ClassMethod"):
        safety.check_keras2_config(_model(cls), R)


def test_vocabulary_file_and_modules_and_lambdas():
    lookup = {"class_name": "StringLookup", "config": {"name": "s", "vocabulary": "/etc/hosts"}}
    with pytest.raises(ModelLoadError, match="reads `vocabulary` from the local file '/etc/"):
        safety.check_keras2_config(_model(lookup), R)
    listed = {"class_name": "StringLookup", "config": {"name": "s", "vocabulary": ["a", "b"]}}
    safety.check_keras2_config(_model(listed), R)
    foreign = {"class_name": "Dense", "module": "antigravity", "config": {"name": "d"}}
    with pytest.raises(ModelLoadError, match="names the Python module 'antigravity'"):
        safety.check_keras2_config(_model(foreign), R)
    mine = {"class_name": "Scale", "module": "my_layers.scale", "config": {"name": "s"}}
    safety.check_keras2_config(_model(mine), R, custom_module="my_layers")
    keras_own = {"class_name": "Dense", "module": "keras.layers", "config": {"name": "d"}}
    safety.check_keras2_config(_model(keras_own), R)
    code = {"class_name": "Lambda", "config": {"name": "l", "function": ["4wEA", None, None]}}
    with pytest.raises(ModelLoadError, match="Python-lambda `Lambda` layer \\('l'\\)"):
        safety.check_keras2_config(_model(code), R)


def test_names_in_messages_are_escaped_and_short():
    evil = _op("\x1b]8;;http://x\x07" + "n" * 500, "io.write_file")
    with pytest.raises(ModelLoadError) as info:
        safety.check_keras2_config(_model(evil), R)
    message = str(info.value)
    assert "\x1b" not in message and "\x07" not in message
    assert len(message) < 600


# -- configs: depth and routing -----------------------------------------------


def test_depth_is_counted_without_parsing_and_deep_configs_are_refused():
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + ', "s": "[[[["}'
    assert safety.config_depth(deep) == 100_001
    assert sys.getrecursionlimit() < 100_000
    with pytest.raises(ModelLoadError, match="nested 100001 levels deep. Expected at most 256"):
        safety.parse_config(deep, R)


def test_deep_keras2_h5_goes_to_the_keras2_engine_and_is_refused(tmp_path):
    path = tmp_path / "deep.h5"
    config = json.dumps(_model(_op("t", "math.add")))
    config = config[:-2] + ', "junk": ' + "[" * 5000 + "]" * 5000 + "}}"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = config
        f.attrs["keras_version"] = "2.15.0"
    assert keras2.detect(path) == keras2.KERAS2_H5
    with pytest.raises(ModelLoadError, match="nested 5002 levels deep"):
        keras2.check_model_file(path, unsafe=False)


def test_class_names_are_found_in_text_only_as_keys():
    text = json.dumps({"class_name": "Dense", "config": {"name": '"class_name": "TFOpLambda"'}})
    assert safety.class_names(text) == {"Dense"}


# -- HDF5 ----------------------------------------------------------------------


def _h5_with(tmp_path, make):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(_model())
        group = f.create_group("model_weights/dense")
        make(f, group, tmp_path)
    return path


def _external(f, group, tmp):
    secret = tmp / "secret.bin"
    secret.write_bytes(b"S" * 64)
    group.create_dataset("kernel", shape=(16,), dtype="float32", external=[(str(secret), 0, 64)])


def _external_link(f, group, tmp):
    with h5py.File(tmp / "other.h5", "w") as other:
        other["data"] = np.zeros(4)
    group["kernel"] = h5py.ExternalLink(str(tmp / "other.h5"), "/data")


def _soft_link(f, group, tmp):
    group["real"] = np.zeros(4)
    group["kernel"] = h5py.SoftLink("/model_weights/dense/real")


def _virtual(f, group, tmp):
    with h5py.File(tmp / "other.h5", "w") as other:
        other["data"] = np.zeros(4)
    layout = h5py.VirtualLayout(shape=(4,), dtype="float64")
    layout[:] = h5py.VirtualSource(str(tmp / "other.h5"), "data", shape=(4,))
    group.create_virtual_dataset("kernel", layout)


@pytest.mark.parametrize(
    "make, words",
    [
        (_external, "dataset '/model_weights/dense/kernel' stores its data in the external file"),
        (_external_link, "'/model_weights/dense/kernel' is an external link to"),
        (_soft_link, "'/model_weights/dense/kernel' is a soft link to"),
        (_virtual, "dataset '/model_weights/dense/kernel' is a virtual dataset"),
    ],
    ids=["external", "external_link", "soft_link", "virtual"],
)
def test_h5_data_outside_the_file_is_refused(tmp_path, make, words):
    path = _h5_with(tmp_path, make)
    with pytest.raises(ModelLoadError) as info:
        safety.check_h5_storage(path, R)
    assert words in str(info.value)
    assert "Expected a self-contained `.h5` file" in str(info.value)
    with pytest.raises(ModelLoadError, match="Refusing to read model"):
        keras2.check_model_file(path, unsafe=True)  # --unsafe does not lift it


def test_plain_h5_passes(tmp_path):
    path = _h5_with(tmp_path, lambda f, g, t: g.create_dataset("kernel", data=np.ones(4)))
    safety.check_h5_storage(path, R)


# -- SavedModel metadata ------------------------------------------------------


def test_keras_metadata_is_decoded_by_hand(tmp_path):
    root = json.dumps({"class_name": "Functional", "config": {"name": "m", "layers": []}})

    def field(number, data):
        return _varint(number << 3 | 2) + _varint(len(data)) + data

    node = field(3, b"root") + field(4, b"_tf_keras_network") + field(5, root.encode())
    other = field(3, b"root.layer-0") + field(5, b"{}")
    (tmp_path / "keras_metadata.pb").write_bytes(field(1, node) + field(1, other))
    metadata, text = safety.savedmodel_root_config(tmp_path)
    assert metadata["class_name"] == "Functional" and text == root
    (tmp_path / "keras_metadata.pb").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ModelLoadError, match="is not Keras metadata"):
        safety.read_keras_metadata(tmp_path)


def _varint(value):
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


# -- the output rule ----------------------------------------------------------


def test_output_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.h5"
    model.write_bytes(b"x")
    sm = tmp_path / "sm"
    (sm / "variables").mkdir(parents=True)
    (sm / "saved_model.pb").write_bytes(b"x")
    other_sm = tmp_path / "other_sm"
    other_sm.mkdir()
    (other_sm / "saved_model.pb").write_bytes(b"x")
    docs = tmp_path / "docs"
    docs.mkdir()
    link = tmp_path / "out.h5"
    link.symlink_to(tmp_path / "elsewhere.h5")

    def refused(path, words, **kw):
        kw.setdefault("overwrite", True)
        with pytest.raises(ModelSaveError, match=words):
            check_output_path(path, **kw)

    refused(link, "a symbolic link already exists", overwrite=False, source=model)
    check_output_path(link, overwrite=True, source=model)  # the link itself is replaced
    refused(tmp_path / "m.h5", "it is the input model", source=model)
    refused(tmp_path, "holds the input model", source=model, fmt="savedmodel")
    refused(sm / "variables", "inside the input SavedModel", source=sm, fmt="savedmodel")
    refused(docs, "not a SavedModel", source=model, fmt="savedmodel")
    refused(tmp_path / ("x" * 300 + ".h5"), "File name too long", source=model)
    check_output_path(other_sm, overwrite=True, source=sm, fmt="savedmodel")
    refused(other_sm, "the folder already exists", overwrite=False, source=sm, fmt="savedmodel")
    monkeypatch.chdir(other_sm)
    refused(other_sm, "the working folder", source=sm, fmt="savedmodel")


# -- fuzz ------------------------------------------------------------------------

_CLASSES = st.sampled_from(
    [
        "TFOpLambda",
        "SlicingOpLambda",
        "InstanceMethod",
        "InstanceProperty",
        "ClassMethod",
        "Lambda",
        "StringLookup",
        "Dense",
        "Functional",
        "Sequential",
        "\x1b[31m",
        "",
    ]
)
_FUNCTIONS = st.one_of(
    st.sampled_from(
        sorted(safety._PURE_FUNCTIONS)[:40]
        + [
            "io.write_file",
            "io.gfile.copy",
            "math.add",
            "nn.relu",
            "__operators__.getitem",
            "compat.v1.gfile.Copy",
        ]
    ),
    st.text(max_size=30),
    st.integers(),
    st.none(),
)
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def _configs(draw):
    layers = []
    for i in range(draw(st.integers(0, 5))):
        inner = {"name": f"l{i}", "function": draw(_FUNCTIONS)}
        inner.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["attr_name", "cls_symbol", "vocabulary", "module", "dtype"]),
                    _JSON,
                    max_size=2,
                )
            )
        )
        layer = {"class_name": draw(_CLASSES), "config": inner}
        if draw(st.booleans()):
            layer["module"] = draw(st.sampled_from(["keras.layers", "os", "tf_keras", "x"]))
        layer["inbound_nodes"] = draw(
            st.one_of(
                _JSON,
                st.just([["_CONSTANT_VALUE", -1, draw(_JSON), draw(_JSON)]]),
                st.just([["l0", 0, 0, {"y": draw(_JSON)}]]),
            )
        )
        layers.append(layer)
    config = _model(*layers)
    nest = draw(st.integers(0, 3))
    for _ in range(nest):
        config = _model(config)
    return config


@settings(
    max_examples=FUZZ,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(config=_configs())
def test_fuzz_keras2_configs_through_the_parent_check(tmp_path_factory, config):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.15.0"
    before = sorted(os.listdir(folder))
    try:
        keras2.check_model_file(path, unsafe=False)
        accepted = True
    except RegularizeError as err:
        accepted = False
        message = str(err)
        assert "\n" not in message and "\x1b" not in message and len(message) < 1200
    assert sorted(os.listdir(folder)) == before
    if accepted:  # nothing unsafe may have passed
        for node in safety._dicts(config):
            inner = node.get("config")
            if node.get("class_name") in ("TFOpLambda", "SlicingOpLambda"):
                assert safety.is_pure_function(inner["function"]), inner
            if node.get("class_name") in ("InstanceMethod", "ClassMethod"):
                assert node.get("class_name") == "InstanceMethod"
                assert inner.get("attr_name") in safety._TENSOR_ATTRIBUTES
            if isinstance(inner, dict):
                assert not isinstance(inner.get("vocabulary"), str)
            module = node.get("module")
            if isinstance(module, str):
                assert module in KERAS2_MODULES or module.startswith(TFMOT_PREFIX)
    assert keras2.detect(path) in (keras2.KERAS2_H5, None)


def test_a_named_custom_object_module_is_found_in_the_working_folder_last(tmp_path, monkeypatch):
    from regularize.core import custom_objects

    (tmp_path / "regularize_test_layers.py").write_text("class Scale:\n    pass\n")
    (tmp_path / "json.py").write_text("raise SystemExit('working-folder json.py imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert "Scale" in custom_objects.load("regularize_test_layers")
    assert sys.path == before
    assert keras2._module_folder("regularize_test_layers") == str(tmp_path)
    assert keras2._module_folder("json") != str(tmp_path)  # installed modules win
