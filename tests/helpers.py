"""What the tests share: model factories, the rewrite checks, CLI helpers.

Every factory builds a small model with a fixed seed; `Case` holds the model,
a matching input batch, and what a rewrite at rate 0.3 must insert. Tests
import from here (`from helpers import ...`); tests/conftest.py holds the
fixtures only, and no test imports it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from regularize.cli import cli  # noqa: E402
from regularize.core.terms import dropout_settings  # noqa: E402
from regularize.keras3 import graph  # noqa: E402

L = keras.layers


@dataclasses.dataclass
class Case:
    model: keras.Model
    x: object
    # name of an inserted layer -> (class name, rate); for recurrent layers
    # name -> ("recurrent", dropout)
    expected: dict
    # False when this backend cannot run the model on every machine (see
    # `runs_channels_first`): tests check its structure and files here and its
    # inference on JAX.
    runs_here: bool = True
    # The model's outputs on `x`, where a test captured them before a rewrite.
    outputs: list | None = None


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(2, *shape)).astype("float32")


def mlp_sequential():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8,), name="features"),
            L.Dense(16, activation="relu", name="d1"),
            L.Dense(16, name="d2"),
            L.Activation("tanh", name="act"),
            L.Dense(3, activation="softmax", name="probs"),
        ],
        name="mlp",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    expected = {"d1__dropout": ("Dropout", 0.3), "act__dropout": ("Dropout", 0.3)}
    return Case(model, _x((8,)), expected)


def cnn_functional():
    """BN after an activation, a residual Add and a Concatenate branch."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    y = L.Conv2D(8, 3, padding="same", name="c2")(x)
    y = L.ReLU(name="r2")(y)
    x = L.Add(name="add")([x, y])
    z = L.Conv2D(4, 1, activation="swish", name="c3")(x)
    x = L.Concatenate(name="cat")([x, z])
    x = L.LeakyReLU(name="leaky")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(8, activation="gelu", name="fc")(x)
    out = L.Dense(2, name="logits")(x)
    model = keras.Model(inp, out, name="cnn")
    expected = {
        "r2__dropout": ("SpatialDropout2D", 0.3),
        "c3__dropout": ("SpatialDropout2D", 0.3),
        "leaky__dropout": ("SpatialDropout2D", 0.3),
        "fc__dropout": ("Dropout", 0.3),
    }
    return Case(model, _x((12, 12, 3)), expected)


def conv_ranks():
    """Rank 3 and rank 5 feature maps (channels_last)."""
    keras.utils.set_random_seed(3)
    seq = keras.Input((10, 4), name="seq")
    a = L.Conv1D(6, 3, activation="relu", name="c1d")(seq)
    a = L.GlobalAveragePooling1D(name="p1")(a)
    vol = keras.Input((6, 6, 6, 2), name="vol")
    b = L.Conv3D(3, 3, activation="elu", name="c3d")(vol)
    b = L.GlobalAveragePooling3D(name="p3")(b)
    out = L.Concatenate(name="merge")([a, b])
    out = L.Dense(2, name="head")(out)
    model = keras.Model([seq, vol], out, name="ranks")
    x = [_x((10, 4)), _x((6, 6, 6, 2))]
    expected = {
        "c1d__dropout": ("SpatialDropout1D", 0.3),
        "c3d__dropout": ("SpatialDropout3D", 0.3),
    }
    return Case(model, x, expected)


def runs_channels_first() -> bool:
    """Whether this backend runs channels_first convolutions on any machine.

    TensorFlow's own CPU kernels take NHWC only ("The Conv2D op currently only
    supports the NHWC tensor format on the CPU"); oneDNN runs NCHW on some CPUs
    and not others. Whether a test runs must not depend on the CPU's
    instruction set, so on TensorFlow without a GPU the answer is no, even on a
    CPU that could. JAX (XLA) and TensorFlow on a GPU run them everywhere.
    """
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def conv_channels_first():
    """channels_first feature maps: rank 4 (+ PReLU) and rank 3 (Dropout with noise_shape)."""
    keras.utils.set_random_seed(3)
    img = keras.Input((3, 10, 10), name="chw")
    c = L.Conv2D(4, 3, data_format="channels_first", name="cf")(img)
    c = L.PReLU(name="prelu")(c)
    c = L.GlobalAveragePooling2D(data_format="channels_first", name="p2")(c)
    sig = keras.Input((4, 9), name="cw")
    d = L.Conv1D(5, 2, data_format="channels_first", activation="relu", name="cf1d")(sig)
    d = L.Flatten(name="flat")(d)
    out = L.Concatenate(name="merge")([c, d])
    out = L.Dense(2, name="head")(out)
    model = keras.Model([img, sig], out, name="channels_first")
    x = [_x((3, 10, 10)), _x((4, 9))]
    expected = {
        "prelu__dropout": ("SpatialDropout2D", 0.3),
        "cf1d__dropout": ("Dropout", 0.3),  # channel-wise through noise_shape
    }
    return Case(model, x, expected, runs_here=runs_channels_first())


def nested_two_levels():
    """Transfer-learning pattern, one base inside another, inner one frozen."""
    keras.utils.set_random_seed(4)
    inner_in = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="inner_conv")(inner_in)
    h = L.Conv2D(4, 3, padding="same", name="inner_conv2")(h)
    inner = keras.Model(inner_in, h, name="inner")
    inner.trainable = False
    mid_in = keras.Input((8, 8, 3))
    m = inner(mid_in)
    m = L.ReLU(name="mid_relu")(m)
    m = L.Conv2D(4, 1, name="mid_conv")(m)
    mid = keras.Model(mid_in, m, name="mid")
    inp = keras.Input((8, 8, 3))
    x = mid(inp)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(6, activation="relu", name="fc")(x)
    out = L.Dense(2, activation="softmax", name="out")(x)
    model = keras.Model(inp, out, name="outer")
    expected = {
        "mid/inner/inner_conv__dropout": ("SpatialDropout2D", 0.3),
        "mid/mid_relu__dropout": ("SpatialDropout2D", 0.3),
        "fc__dropout": ("Dropout", 0.3),
    }
    return Case(model, _x((8, 8, 3)), expected)


def frozen_base_inference():
    """`base(x, training=False)`: nothing inserted inside, the head still gets some."""
    keras.utils.set_random_seed(5)
    base_in = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, activation="relu", name="b_conv")(base_in)
    h = L.BatchNormalization(name="b_bn")(h)
    h = L.Conv2D(4, 3, activation="relu", name="b_conv2")(h)
    h = L.GlobalAveragePooling2D(name="b_gap")(h)
    base = keras.Model(base_in, h, name="base")
    base.trainable = False
    inp = keras.Input((8, 8, 3))
    x = base(inp, training=False)
    x = L.Dense(6, activation="relu", name="fc")(x)
    out = L.Dense(2, name="out")(x)
    model = keras.Model(inp, out, name="head")
    model.compile(optimizer="adam", loss="mse")
    return Case(model, _x((8, 8, 3)), {"fc__dropout": ("Dropout", 0.3)})


def shared_layers():
    """A Dense and an activation shared by two branches (siamese)."""
    keras.utils.set_random_seed(6)
    a = keras.Input((5,), name="a")
    b = keras.Input((5,), name="b")
    dense = L.Dense(7, activation="relu", name="shared_dense")
    act = L.Activation("sigmoid", name="shared_act")
    ha, hb = act(dense(a)), act(dense(b))
    x = L.Concatenate(name="cat")([ha, hb])
    out = L.Dense(1, name="score")(x)
    model = keras.Model([a, b], out, name="siamese")
    expected = {
        "shared_dense__dropout": ("Dropout", 0.3),
        "shared_act__dropout": ("Dropout", 0.3),
    }
    return Case(model, [_x((5,)), _x((5,), seed=1)], expected)


def multi_io_dict():
    """Dict inputs and dict outputs; compiled with a loss per output name."""
    keras.utils.set_random_seed(7)
    img = keras.Input((6, 6, 1), name="img")
    meta = keras.Input((3,), name="meta")
    x = L.Conv2D(3, 3, activation="relu", name="conv")(img)
    x = L.Flatten(name="flat")(x)
    m = L.Dense(4, activation="relu", name="meta_fc")(meta)
    x = L.Concatenate(name="cat")([x, m])
    cls = L.Dense(3, activation="softmax", name="label")(x)
    reg = L.Dense(1, name="value")(x)
    model = keras.Model({"img": img, "meta": meta}, {"label": cls, "value": reg}, name="multi")
    model.compile(
        optimizer="sgd",
        loss={"label": "sparse_categorical_crossentropy", "value": "mse"},
        metrics={"label": ["accuracy"]},
    )
    expected = {"conv__dropout": ("SpatialDropout2D", 0.3), "meta_fc__dropout": ("Dropout", 0.3)}
    return Case(model, {"img": _x((6, 6, 1)), "meta": _x((3,))}, expected)


def ops_nodes():
    """Raw keras.ops calls inside the graph (MobileNetV3 has them too)."""
    keras.utils.set_random_seed(8)
    inp = keras.Input((6,), name="x")
    h = L.Dense(6, activation="relu", name="fc1")(inp)
    h = keras.ops.add(h, inp)
    h = keras.ops.multiply(h, 0.5)
    h = L.Dense(4, activation="tanh", name="fc2")(h)
    out = L.Dense(1, name="y")(keras.ops.concatenate([h, h], axis=-1))
    model = keras.Model(inp, out, name="ops")
    expected = {"fc1__dropout": ("Dropout", 0.3), "fc2__dropout": ("Dropout", 0.3)}
    return Case(model, _x((6,)), expected)


def recurrent():
    """LSTM, GRU, SimpleRNN, Bidirectional, RNN(cell), stacked cells, ConvLSTM."""
    keras.utils.set_random_seed(9)
    seq = keras.Input((5, 4), name="seq")
    h = L.Bidirectional(L.LSTM(6, return_sequences=True), name="bi")(seq)
    h = L.GRU(5, return_sequences=True, name="gru")(h)
    h = L.SimpleRNN(4, return_sequences=True, name="srnn")(h)
    h = L.RNN(keras.layers.LSTMCell(4), return_sequences=True, name="cell_rnn")(h)
    h = L.RNN(
        keras.layers.StackedRNNCells([keras.layers.GRUCell(3), keras.layers.SimpleRNNCell(3)]),
        name="stacked",
    )(h)
    frames = keras.Input((3, 6, 6, 2), name="frames")
    v = L.ConvLSTM2D(3, 3, name="convlstm")(frames)
    v = L.Flatten(name="flat")(v)
    out = L.Dense(2, name="out")(L.Concatenate(name="cat")([h, v]))
    model = keras.Model([seq, frames], out, name="rnns")
    expected = {
        name: ("recurrent", 0.3)
        for name in ("bi", "gru", "srnn", "cell_rnn", "stacked", "convlstm")
    }
    return Case(model, [_x((5, 4)), _x((3, 6, 6, 2))], expected)


def mixed_precision():
    keras.utils.set_random_seed(10)
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        inp = keras.Input((8, 8, 2))
        x = L.Conv2D(4, 3, activation="relu", name="conv")(inp)
        x = L.Flatten(name="flat")(x)
        x = L.Dense(8, activation="relu", name="fc")(x)
        out = L.Dense(2, activation="softmax", dtype="float32", name="probs")(x)
        model = keras.Model(inp, out, name="mixed")
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    expected = {"conv__dropout": ("SpatialDropout2D", 0.3), "fc__dropout": ("Dropout", 0.3)}
    return Case(model, _x((8, 8, 2)), expected)


def masked_sequence():
    """A padding mask from Embedding flows through the inserted dropout."""
    keras.utils.set_random_seed(11)
    inp = keras.Input((6,), dtype="int32", name="tokens")
    x = L.Embedding(20, 4, mask_zero=True, name="embed")(inp)
    x = L.Dense(5, activation="relu", name="fc")(x)
    x = L.LSTM(3, name="lstm")(x)
    model = keras.Model(inp, x, name="masked")
    tokens = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]], "int32")
    # Token states (an Embedding upstream): element-wise Dropout.
    expected = {"fc__dropout": ("Dropout", 0.3), "lstm": ("recurrent", 0.3)}
    return Case(model, tokens, expected)


FACTORIES = [
    mlp_sequential,
    cnn_functional,
    conv_ranks,
    conv_channels_first,
    nested_two_levels,
    frozen_base_inference,
    shared_layers,
    multi_io_dict,
    ops_nodes,
    recurrent,
    mixed_precision,
    masked_sequence,
]


def all_layers(model, prefix=""):
    """(path, layer) for every layer at every nesting level."""
    for layer in model.layers:
        yield prefix + layer.name, layer
        if graph.is_graph_model(layer):
            yield from all_layers(layer, f"{prefix}{layer.name}/")


def predict(model, x):
    out = model(x, training=False)
    return [np.asarray(t) for t in keras.tree.flatten(out)]


def assert_exact(a, b, x):
    for left, right in zip(predict(a, x), predict(b, x), strict=True):
        np.testing.assert_array_equal(left, right)


def inserted(model) -> dict:
    """The tool's dropout layers and rewritten recurrent settings, by path."""
    found = {}
    for path, layer in all_layers(model):
        if graph.is_own_dropout(layer):
            found[path] = (type(layer).__name__, layer.rate)
    return found


def rnn_dropout(model) -> dict:
    found = {}
    for path, layer in all_layers(model):
        if graph.is_recurrent(layer):
            config = keras.saving.serialize_keras_object(layer)
            rates = {s["dropout"] for s in dropout_settings(config)}
            if rates and rates != {0.0}:
                found[path] = ("recurrent", max(rates))
    return found


def assert_same_model_except_dropout(old, new, before):
    """Names, trainable flags, dtype policies and weights survive the rewrite.

    Weight values are compared with `before`, the `snapshot` of `old` taken
    before the rewrite: `new` shares `old`'s variables, so comparing the two
    models with each other could not see a rewrite that changed them.
    """
    values = {path: weights for path, _, _, weights in before}
    new_layers = dict(all_layers(new))
    for path, layer in all_layers(old):
        assert path in new_layers, f"layer {path} lost"
        twin = new_layers[path]
        assert twin.trainable == layer.trainable, path
        assert twin.dtype_policy.name == layer.dtype_policy.name, path
        assert len(twin.weights) == len(values[path]), path
        for w, value in zip(twin.weights, values[path], strict=True):
            np.testing.assert_array_equal(np.asarray(w), value, err_msg=path)
    assert graph.graph_of(new).output_names == graph.graph_of(old).output_names
    assert new.count_params() == old.count_params()
    assert len(new.trainable_weights) == len(old.trainable_weights)
    assert len(new.non_trainable_weights) == len(old.non_trainable_weights)
    for path, layer in all_layers(new):
        if graph.is_own_dropout(layer):
            anchor = path[: -len(graph.SUFFIX)]
            assert layer.dtype_policy.name == new_layers[anchor].dtype_policy.name


def assert_outputs(expected: list, model, x) -> None:
    """`model`'s outputs on `x` equal `expected` (from `predict`) bit for bit."""
    for left, right in zip(expected, predict(model, x), strict=True):
        np.testing.assert_array_equal(left, right)


def snapshot(model) -> list:
    """What must not change in the input model: configs and weight values."""
    return [
        (
            path,
            type(layer).__name__,
            repr(layer.get_config()),
            [np.asarray(w) for w in layer.weights],
        )
        for path, layer in all_layers(model)
    ]


def assert_snapshot_equal(before, after):
    assert len(before) == len(after)
    for (p, c, cfg, ws), (p2, c2, cfg2, ws2) in zip(before, after, strict=True):
        assert (p, c, cfg) == (p2, c2, cfg2)
        for a, b in zip(ws, ws2, strict=True):
            np.testing.assert_array_equal(a, b)


def copy_model(src: Path, folder: Path) -> Path:
    """A copy of the model file `src` in `folder`: a test may change or lose its copy."""
    path = Path(folder) / Path(src).name
    shutil.copy(src, path)
    return path


def invoke(*args, command=cli):
    """Runs the CLI in-process on `args` (paths are turned into strings); exceptions propagate."""
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The one line a failing command prints: no traceback, no second line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]
