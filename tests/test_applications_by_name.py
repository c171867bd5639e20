"""Keras Applications by name: `keras.applications.NAME` instead of a model file.

Name and option checks (fast); each Application the core tests use, built by
name from a local weights file made here (slow: one module-scoped reference
build per Application); the CLI; the README's transfer-learning example; and
the ImageNet download failing offline. No test touches the network: the Keras
cache points at an empty folder and the download call itself is replaced.
"""

from __future__ import annotations

import importlib.util
import inspect
import socket
import subprocess
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import assert_exact
from helpers import error_line
from helpers import inserted
from helpers import invoke
from keras.src.backend import config as keras_config
from keras.src.utils import file_utils

import regularize
from regularize.core.errors import ModelLoadError
from regularize.keras3 import applications

# name -> input size: the smallest each accepts (InceptionV3 needs 75 px).
APPS = {
    "ResNet50": 32,
    "MobileNetV2": 32,
    "MobileNetV3Small": 32,
    "EfficientNetB0": 32,
    "DenseNet121": 32,
    "InceptionV3": 75,
    "ConvNeXtTiny": 32,
    "NASNetMobile": 32,
}
CLASSES = 7
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "transfer_learning.py"

# Keras warns when ImageNet weights meet a non-224 input; expected here.
quiet_input_shape = pytest.mark.filterwarnings("ignore:`input_shape` is undefined")


# --- names and options: no model built -----------------------------------


def test_module_imports_no_keras():
    """The CLI checks names and options before the slow TensorFlow import."""
    code = "import sys, regularize.keras3.applications; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keras.applications.ResNet50", True),
        ("keras.applications.resnet50.ResNet50", True),
        ("tf.keras.applications.MobileNetV2", True),
        ("keras.applications.NoSuchNet", True),  # a name; `resolve` refuses it
        ("ResNet50", False),  # could be a file name
        ("model.keras", False),
        ("models/keras.applications.ResNet50", False),
        ("keras.applications.", False),
        ("keras.applications", False),
        ("keras.applications.ResNet50 ", False),
    ],
)
def test_is_application_name(text, expected):
    assert applications.is_application_name(text) is expected


def test_short_name():
    assert applications.short_name("keras.applications.resnet50.ResNet50") == "ResNet50"


@pytest.mark.parametrize(
    ("text", "shape"),
    [("224,224,3", (224, 224, 3)), (" 32, 48 ,1", (32, 48, 1)), ("(75, 75, 3)", (75, 75, 3))],
)
def test_parse_input_shape(text, shape):
    assert applications.parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["224x224x3", "224,224", "224,224,3,1", "0,32,3", "a,b,c", ""])
def test_parse_input_shape_refuses(text):
    with pytest.raises(ModelLoadError) as err:
        applications.parse_input_shape(text)
    assert str(err.value) == (
        "Invalid input shape. Expected three comma-separated positive integers "
        f"(height,width,channels), e.g. 224,224,3. Received: input_shape={text!r}"
    )


def test_parse_weights():
    assert applications.parse_weights("none") is None
    assert applications.parse_weights("None") is None
    assert applications.parse_weights("ImageNet") == "imagenet"
    assert applications.parse_weights("w/x.weights.h5") == "w/x.weights.h5"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"weights": "imagenet", "classes": 10},
            "Cannot use the ImageNet top with another number of classes: its classifier "
            "has 1000. Expected classes=1000, or `include_top=False` to add your "
            "own head, or `weights=None`. Received: classes=10",
        ),
        (
            {"classes": 0},
            "Invalid `classes`. Expected a positive integer. Received: classes=0",
        ),
        (
            {"include_top": "no"},
            "Invalid `include_top`. Expected True or False. Received: include_top='no'",
        ),
        (
            {"input_shape": (32, 32)},
            "Invalid `input_shape`. Expected three positive integers (height, width, "
            "channels), e.g. (224, 224, 3). Received: input_shape=(32, 32)",
        ),
        (
            {"weights": "missing.weights.h5"},
            "Cannot load weights: no such file. Expected 'imagenet', `weights=None` "
            "or the path of a weights file. Received: weights='missing.weights.h5'",
        ),
        (
            {"weights": 3},
            "Invalid `weights`. Expected 'imagenet', None or the path of a weights file. "
            "Received: weights=3",
        ),
    ],
)
def test_check_options_refuses(options, message):
    with pytest.raises(ModelLoadError) as err:
        applications.check_options(**options)
    assert str(err.value) == message


def test_check_options_refuses_wrong_weights_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"unsupported file type '\.bin'\. Expected a file"):
        applications.check_options(weights=path)
    with pytest.raises(ModelLoadError, match="it is a folder"):
        applications.check_options(weights=tmp_path)


def test_check_options_accepts():
    applications.check_options(weights=None, include_top=True, classes=7)
    applications.check_options(weights="imagenet", include_top=False, classes=7)
    applications.check_options(weights="imagenet", include_top=True, classes=1000)


@pytest.mark.parametrize(
    "name",
    [
        "keras.applications.ResNet50",
        "keras.applications.resnet50.ResNet50",
        "keras.applications.resnet.ResNet50",
        "tf.keras.applications.ResNet50",
    ],
)
def test_resolve(name):
    assert applications.resolve(name) is keras.applications.ResNet50


def test_resolve_accepts_every_application():
    names = [
        n
        for n, v in vars(keras.applications).items()
        if not n.startswith("_") and callable(v) and not inspect.ismodule(v)
    ]
    assert len(names) >= 40
    for name in names:
        assert applications.resolve(f"keras.applications.{name}") is getattr(
            keras.applications, name
        )


@pytest.mark.parametrize(
    ("name", "close"),
    [
        ("keras.applications.ResNet5O", "keras.applications.ResNet50"),
        ("keras.applications.resnet50", "keras.applications.ResNet50"),  # the submodule
        ("keras.applications.MobilenetV2", "keras.applications.MobileNetV2"),
        ("keras.applications.EfficientNetB9", "keras.applications.EfficientNetB7"),
    ],
)
def test_resolve_unknown_name_lists_close_matches(name, close):
    with pytest.raises(ModelLoadError) as err:
        applications.resolve(name)
    message = str(err.value)
    wanted = name.removeprefix("keras.applications.")
    assert message.startswith(f"Unknown Keras Application {wanted!r}. Did you mean: ")
    assert close in message.split("Did you mean: ")[1]
    assert message.endswith(f"? Received: name={name!r}")


def test_resolve_refuses_helpers_and_lists_all_names():
    with pytest.raises(ModelLoadError) as err:
        applications.resolve("keras.applications.resnet50.preprocess_input")
    message = str(err.value)
    assert "Expected one of: ConvNeXtBase, " in message
    assert ", Xception. Received: name='keras.applications.resnet50.preprocess_input'" in message


def test_resolve_refuses_a_bare_name():
    with pytest.raises(ModelLoadError, match="not a `keras.applications` name"):
        applications.resolve("ResNet50")


# --- building: errors ---------------------------------------------------------


def test_load_application_input_too_small():
    with pytest.raises(ModelLoadError) as err:
        applications.load_application(
            "keras.applications.MobileNetV2", weights=None, input_shape=(16, 16, 3)
        )
    assert str(err.value) == (
        "Cannot build MobileNetV2: Input size must be at least 32x32; "
        "Received: input_shape=(16, 16, 3)"
    )
    assert isinstance(err.value.__cause__, ValueError)


def test_load_application_imagenet_top_needs_default_shape():
    with pytest.raises(ModelLoadError) as err:
        applications.load_application("keras.applications.ResNet50", input_shape=(64, 64, 3))
    assert str(err.value) == (
        "Cannot build ResNet50: When setting `include_top=True` and loading `imagenet` "
        "weights, `input_shape` should be (224, 224, 3). Received: input_shape=(64, 64, 3)"
    )


def test_load_application_unknown_option():
    with pytest.raises(ModelLoadError) as err:
        applications.load_application("keras.applications.ResNet50", weights=None, alpha=0.5)
    assert str(err.value) == (
        "Unknown option for ResNet50. Expected some of: include_top, input_tensor, "
        "input_shape, pooling, classes, classifier_activation, name. Received: alpha=0.5"
    )


def test_load_application_passes_other_options():
    model = applications.load_application(
        "keras.applications.MobileNetV3Small",
        weights=None,
        include_top=False,
        input_shape=(32, 32, 3),
        alpha=0.75,
        pooling="avg",
    )
    assert model.name == "MobileNetV3Small"
    assert model.output_shape == (None, 432)  # pooled; alpha 0.75 narrows the last block


def test_load_application_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "seven.weights.h5"
    applications.load_application(
        "keras.applications.MobileNetV3Small",
        weights=None,
        input_shape=(32, 32, 3),
        classes=CLASSES,
    ).save_weights(path)
    with pytest.raises(ModelLoadError) as err:
        applications.load_application(
            "keras.applications.MobileNetV3Small",
            weights=path,
            input_shape=(32, 32, 3),
            classes=5,
        )
    assert str(err.value) == (
        f"Cannot load the weights of MobileNetV3Small from {str(path)!r}: 1 object does not "
        "fit, e.g. logits/kernel has shape (1, 1, 1024, 5) here and (1, 1, 1024, 7) in the "
        "file. Expected weights saved from the same Application with the same include_top, "
        "input_shape and classes."
    )


# --- the ImageNet download, offline -------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache, and a download call that fails with `error`.

    Keras reads KERAS_HOME once, at import: the module global is set too.
    Returns `block(error)`, which installs the failing download and returns
    the list of URLs it was asked for.
    """
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))

    def block(error):
        urls = []

        def urlretrieve(url, filename, reporthook=None, data=None):
            urls.append(url)
            raise error

        monkeypatch.setattr(file_utils, "urlretrieve", urlretrieve)
        return urls

    block.home = home
    return block


def _http_error(code, reason):
    return urllib.error.HTTPError("https://example.invalid", code, reason, {}, None)


@quiet_input_shape
@pytest.mark.parametrize(
    ("error", "why"),
    [
        (
            urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")),
            "no network ([Errno -3] Temporary failure in name resolution)",
        ),
        (TimeoutError("timed out"), "no network (timed out)"),
        (_http_error(403, "Forbidden"), "the server answered HTTP 403 (Forbidden)"),
    ],
    ids=["dns", "timeout", "http403"],
)
def test_imagenet_weights_offline(offline, error, why, capsys):
    urls = offline(error)
    with pytest.raises(ModelLoadError) as err:
        applications.load_application(
            "keras.applications.MobileNetV3Small", include_top=False, input_shape=(32, 32, 3)
        )
    assert len(urls) == 1 and urls[0].startswith("https://")
    assert urls[0].endswith("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")
    assert str(err.value) == (
        f"Cannot download the imagenet weights of MobileNetV3Small: {why}. Download them "
        f"elsewhere ({urls[0]}) and pass `weights=PATH`, or use `weights=None`."
    )
    assert list((offline.home / "models").iterdir()) == []  # no partial file left
    captured = capsys.readouterr()
    # Keras' "Downloading data from URL" is held back: the error stays one line.
    assert captured.out == "" and "Downloading" not in captured.err


@quiet_input_shape
def test_imagenet_download_progress_goes_to_stderr(offline, capsys, monkeypatch):
    def urlretrieve(url, filename, reporthook=None, data=None):
        reporthook(0, 8192, 10 * 8192)  # connected: the progress bar starts
        raise urllib.error.URLError(ConnectionResetError(104, "Connection reset by peer"))

    monkeypatch.setattr(file_utils, "urlretrieve", urlretrieve)
    with pytest.raises(ModelLoadError, match=r"no network \(\[Errno 104\] Connection reset"):
        applications.load_application(
            "keras.applications.MobileNetV3Small", include_top=False, input_shape=(32, 32, 3)
        )
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is the tool's (`--json`)
    assert captured.err.startswith("Downloading data from https://")


# --- each Application of the core tests, by name, from a local weights file ---


@dataclass
class Reference:
    name: str
    size: int
    model: keras.Model
    weights: Path
    x: np.ndarray

    @property
    def shape(self) -> tuple:
        return (self.size, self.size, 3)


def assert_same_weights(a, b):
    # In order, not by path: Keras numbers auto-named layers per session
    # (`normalization`, `normalization_1`), so paths differ between builds.
    for left, right in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right), err_msg=left.path)


@pytest.fixture(scope="module", params=sorted(APPS))
def reference(request, tmp_path_factory):
    """The Application built by Keras (no top), and its weights saved to a file.

    Without the top: with random weights the softmax of MobileNetV2,
    MobileNetV3Small and NASNetMobile is the same for every input at these
    sizes, which would make comparing predictions vacuous; their feature maps
    differ.
    """
    name = request.param
    size = APPS[name]
    keras.utils.set_random_seed(0)
    build = getattr(keras.applications, name)
    model = build(weights=None, include_top=False, input_shape=(size, size, 3))
    weights = tmp_path_factory.mktemp(name) / f"{name}.weights.h5"
    model.save_weights(weights)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype("float32")
    return Reference(name, size, model, weights, x)


@pytest.mark.slow
# One here; the CLI test below loads every Application from its weights file.
@pytest.mark.parametrize("reference", ["MobileNetV3Small"], indirect=True)
def test_load_application_by_name_with_local_weights(reference):
    model = applications.load_application(
        f"keras.applications.{reference.name}",
        weights=reference.weights,
        include_top=False,
        input_shape=reference.shape,
    )
    assert model is not reference.model
    assert [type(layer).__name__ for layer in model.layers] == [
        type(layer).__name__ for layer in reference.model.layers
    ]
    assert_same_weights(reference.model, model)
    assert_exact(reference.model, model, reference.x)


@pytest.mark.slow
def test_cli_add_dropout_by_name(reference, tmp_path):
    out = tmp_path / f"{reference.name}_dropout.keras"
    result = invoke(
        "add-dropout",
        f"keras.applications.{reference.name}",
        "--weights",
        reference.weights,
        "--no-top",
        "--input-shape",
        ",".join(map(str, reference.shape)),
        "--rate",
        "0.2",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"wrote {out}"
    loaded = keras.models.load_model(out)
    own = inserted(loaded)
    assert own and {rate for _, rate in own.values()} == {0.2}
    assert_same_weights(reference.model, loaded)
    assert_exact(reference.model, loaded, reference.x)


# --- regularize.load_model and the CLI: wiring --------------------------------


def test_load_model_by_name():
    model = regularize.load_model(
        "keras.applications.MobileNetV3Small",
        weights=None,
        include_top=False,
        input_shape=(32, 32, 3),
    )
    assert model.input_shape == (None, 32, 32, 3)
    assert "predictions" not in [layer.name for layer in model.layers]


def test_load_model_refuses_application_options_for_files(tmp_path):
    path = tmp_path / "tiny.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    with pytest.raises(ModelLoadError, match="keras.applications"):
        regularize.load_model(path, weights=None)


def test_load_model_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A file whose name reads like an Application: the file wins.
    Path("keras.applications.ResNet50").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="unsupported file type"):
        regularize.load_model("keras.applications.ResNet50")


def test_cli_unknown_application(tmp_path):
    result = invoke("add-dropout", "keras.applications.ResNet5O", "-o", tmp_path / "o.keras")
    assert result.exit_code == 2
    line = error_line(result)
    assert "Unknown Keras Application 'ResNet5O'. Did you mean: keras.applications.ResNet50" in line
    assert not (tmp_path / "o.keras").exists()


@pytest.mark.parametrize(
    "option",
    [["--weights", "none"], ["--no-top"], ["--input-shape", "32,32,3"], ["--classes", "3"]],
    ids=lambda o: o[0],
)
def test_cli_application_options_refused_for_files(tmp_path, option):
    path = tmp_path / "tiny.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    result = invoke("add-dropout", path, *option, "-o", tmp_path / "o.keras")
    assert result.exit_code == 2
    line = error_line(result)
    assert option[0] in line and "keras.applications" in line


def test_cli_bad_input_shape():
    result = invoke("add-dropout", "keras.applications.ResNet50", "--input-shape", "224x224")
    assert result.exit_code == 2
    assert error_line(result).endswith(
        "Expected three comma-separated positive integers (height,width,channels), "
        "e.g. 224,224,3. Received: input_shape='224x224'"
    )


def test_cli_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    result = invoke("add-dropout", "keras.applications.ResNet50", "--weights", missing)
    assert result.exit_code == 2
    assert error_line(result).endswith(
        f"no such file. Expected 'imagenet', --weights none "
        f"or the path of a weights file. Received: "
        f"weights={str(missing)!r}"
    )


@quiet_input_shape
def test_cli_imagenet_offline(offline, tmp_path):
    urls = offline(
        urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    )
    out = tmp_path / "o.keras"
    result = invoke(
        "add-dropout",
        "keras.applications.MobileNetV3Small",
        "--no-top",
        "--input-shape",
        "32,32,3",
        "-o",
        out,
    )
    assert result.exit_code == 1
    assert error_line(result) == (
        "Error: Cannot download the imagenet weights of MobileNetV3Small: no network "
        f"([Errno -3] Temporary failure in name resolution). Download them elsewhere ({urls[0]}) "
        "and pass --weights PATH, or use --weights none."
    )
    assert not out.exists()


def test_cli_classes_and_default_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "add-dropout",
        "keras.applications.MobileNetV3Small",
        "--weights",
        "none",
        "--input-shape",
        "32,32,3",
        "--classes",
        "5",
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "MobileNetV3Small_dropout.keras"  # in the working folder
    assert result.stdout.splitlines()[-1] == f"wrote {out.name}"
    loaded = keras.models.load_model(out)
    assert loaded.output_shape == (None, 5)
    assert inserted(loaded)


# --- the README's transfer-learning example -----------------------------------


def _example():
    spec = importlib.util.spec_from_file_location("transfer_learning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_transfer_learning_example(capsys):
    trained, history = _example().main(weights=None, image_size=32, epochs=1)
    assert inserted(trained) == {"head_fc__dropout": ("Dropout", 0.2)}
    assert capsys.readouterr().out.startswith("inserted 1 site: 1 Dropout\n")
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    # Without its dropout (the same variables, trained) it predicts the same.
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    assert_exact(trained, regularize.remove_dropout(trained), x)
