"""Keras Applications by name: `keras.applications.ResNet50` as a model input.

`regularize add-dropout keras.applications.ResNet50 --weights none` and
`regularize.load_model("keras.applications.ResNet50", weights=None)` build the
Application instead of reading a file. The text helpers (`is_application_name`,
`short_name`, `parse_input_shape`, `parse_weights`, `check_options`) import
nothing heavy, so the CLI can reject bad arguments before TensorFlow loads;
Keras is imported only inside `resolve` and `load_application`.

Every failure is one `ModelLoadError` line that says what is wrong, what was
expected and what was received.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import os
import re
import socket
import sys
import urllib.error
import warnings
from pathlib import Path

from regularize.core.errors import ModelLoadError
from regularize.core.errors import UnknownApplicationError

IMAGENET = "imagenet"
# What `keras.Model.load_weights` reads: Keras 3 weights files, whole `.keras`
# models, and legacy `.h5` files (the ImageNet downloads are legacy `.h5`).
WEIGHTS_SUFFIXES = (".weights.h5", ".weights.json", ".keras", ".h5", ".hdf5")
_NAME = re.compile(r"(?:tf\.)?keras\.applications(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_NO_NETWORK = (socket.gaierror, socket.timeout, TimeoutError, ConnectionError)


def is_application_name(text: str | os.PathLike) -> bool:
    """Whether `text` names a Keras Application, e.g. `keras.applications.ResNet50`.

    Only the dotted `keras.applications.` (or `tf.keras.applications.`) form
    counts: a bare `ResNet50` could be a file name. The test is on the text
    alone; callers let a path that exists on disk win.
    """
    return _NAME.fullmatch(os.fspath(text)) is not None


def short_name(name: str | os.PathLike) -> str:
    """The function name alone: `keras.applications.resnet50.ResNet50` -> `ResNet50`."""
    return os.fspath(name).rsplit(".", 1)[-1]


def resolve(name: str | os.PathLike):
    """Returns the model function of `keras.applications` that `name` names.

    Accepts `keras.applications.ResNet50`, the submodule path
    `keras.applications.resnet50.ResNet50`, and the same with a `tf.` prefix.

    Raises:
        ModelLoadError: The name is not a model function of
            `keras.applications`; the message lists close matches.
    """
    import keras

    text = os.fspath(name)
    builders = _builders(keras.applications)
    received = f"Received: name={text!r}"
    if not is_application_name(text):
        raise ModelLoadError(
            "Cannot build a Keras Application: not a `keras.applications` name. "
            f"Expected e.g. 'keras.applications.ResNet50'. {received}"
        )
    relative = text.split("applications.", 1)[1]
    found = keras.applications
    for part in relative.split("."):
        found = getattr(found, part, None) if not part.startswith("_") else None
    # Identity with a top-level builder also refuses `resnet50.preprocess_input`.
    if found is None or not any(found is f for f in builders.values()):
        raise UnknownApplicationError(
            f"Unknown Keras Application {relative!r}. {_expected(short_name(text), builders)} "
            f"{received}"
        )
    return found


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """Parses `--input-shape` text: `224,224,3` (or `(224, 224, 3)`) -> `(224, 224, 3)`.

    Raises:
        ModelLoadError: Not three comma-separated positive integers.
    """
    parts = [p.strip() for p in str(text).strip().strip("()[]").split(",")]
    if len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts):
        return tuple(int(p) for p in parts)
    raise ModelLoadError(
        "Invalid input shape. Expected three comma-separated positive integers "
        f"(height,width,channels), e.g. 224,224,3. Received: input_shape={text!r}"
    )


def parse_weights(text: str) -> str | None:
    """Parses `--weights` text: `imagenet`, `none` (-> None) or a weights file path."""
    lowered = str(text).strip().lower()
    if lowered == "none":
        return None
    if lowered == IMAGENET:
        return IMAGENET
    return str(text)


def check_options(
    *,
    weights: str | os.PathLike | None = IMAGENET,
    include_top: bool = True,
    input_shape: tuple | list | None = None,
    classes: int | None = None,
) -> None:
    """Checks the Application options that can be checked without Keras.

    Raises:
        ModelLoadError: An option has the wrong type or value, the weights file
            is missing or of the wrong type, or `classes` is not 1000 with the
            ImageNet weights and top.
    """
    if not isinstance(include_top, bool):
        raise ModelLoadError(
            f"Invalid `include_top`. Expected True or False. Received: include_top={include_top!r}"
        )
    if classes is not None and (
        isinstance(classes, bool) or not isinstance(classes, int) or classes < 1
    ):
        raise ModelLoadError(
            f"Invalid `classes`. Expected a positive integer. Received: classes={classes!r}"
        )
    if input_shape is not None and not _is_shape(input_shape):
        raise ModelLoadError(
            "Invalid `input_shape`. Expected three positive integers (height, width, "
            f"channels), e.g. (224, 224, 3). Received: input_shape={input_shape!r}"
        )
    if weights is None or weights == IMAGENET:
        if weights == IMAGENET and include_top and classes not in (None, 1000):
            raise ModelLoadError(
                "Cannot use the ImageNet top with another number of classes: its "
                "classifier has 1000. Expected classes=1000, or `include_top=False` "
                "to add your own head, or `weights=None`. "
                f"Received: classes={classes!r}"
            )
        return
    if not isinstance(weights, (str, os.PathLike)):
        raise ModelLoadError(
            "Invalid `weights`. Expected 'imagenet', None or the path of a weights "
            f"file. Received: weights={weights!r}"
        )
    _check_weights_file(Path(weights))


def load_application(
    name: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = IMAGENET,
    include_top: bool = True,
    input_shape: tuple | list | None = None,
    classes: int | None = None,
    **options,
):
    """Builds a Keras Application by name, with ImageNet, no, or local weights.

    Args:
        name: `keras.applications.NAME` (or a submodule path such as
            `keras.applications.resnet50.ResNet50`).
        weights: "imagenet" (Keras downloads the file once and caches it under
            `$KERAS_HOME`, default `~/.keras`), None (random initialization),
            or the path of a weights file: one saved by `save_weights()` from
            the same Application with the same options, or a downloaded
            Keras `.h5` weights file.
        include_top: Keep the classifier at the top of the network.
        input_shape: (height, width, channels); None uses the Application's
            default (224 x 224 for most with the top, any size without).
        classes: Output classes of the top; None uses the default (1000).
        **options: Other arguments of the Application function, e.g.
            `alpha=0.35` or `pooling="avg"`.

    Returns:
        The uncompiled `keras.Model`.

    Raises:
        ModelLoadError: Unknown name or option, invalid arguments, a missing
            or mismatched weights file, or no network for the ImageNet
            weights. One line each.

    Example:
        >>> base = load_application(
        ...     "keras.applications.MobileNetV2", weights=None, include_top=False,
        ...     input_shape=(96, 96, 3))
    """
    build = resolve(name)
    app = build.__name__
    check_options(
        weights=weights, include_top=include_top, input_shape=input_shape, classes=classes
    )
    arguments = {"include_top": include_top, **options}
    if input_shape is not None:
        arguments["input_shape"] = tuple(input_shape)
    if classes is not None:
        arguments["classes"] = classes
    _check_known(build, arguments)
    # A local file is loaded here rather than by Keras so that a file that does
    # not fit says so, apart from errors in the other arguments. Keras treats
    # a path like None while building, so the model is the same either way.
    imagenet = weights == IMAGENET
    arguments["weights"] = IMAGENET if imagenet else None
    # Keras prints its download progress on stdout: send it to stderr, so that
    # stdout keeps the tool's own output (`--json`).
    progress = _DownloadProgress(sys.stderr)
    try:
        with contextlib.redirect_stdout(progress):
            model = build(**arguments)
    except Exception as err:  # Keras raises ValueError, or bare Exception for downloads
        url, reason = _download_failure(err, progress.url)
        if imagenet and reason is not None:
            raise ModelLoadError(
                f"Cannot download the imagenet weights of {app}: {reason}. Download them "
                f"elsewhere ({url}) and pass `weights=PATH`, or use `weights=None`."
            ) from err
        message = _one_line(err)
        if "Received" not in message:
            message += f". Received: {_received(arguments)}"
        raise ModelLoadError(f"Cannot build {app}: {message}") from err
    progress.release()
    if weights is not None and not imagenet:
        _load_weights(model, Path(weights), app)
    return model


class _DownloadProgress(io.TextIOBase):
    """Keras' stdout during a build, passed to `stream`, holding back one line.

    Keras prints "Downloading data from URL" before it connects. Offline that
    line would stand before the one-line error; held until the progress bar
    writes, it is dropped when the download fails at once.
    """

    NOTICE = "Downloading data from "

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.held = ""
        self.url = ""

    def write(self, text: str) -> int:
        if text.startswith(self.NOTICE) and not self.held:
            self.held = text
            self.url = text[len(self.NOTICE) :].strip()
            return len(text)
        self.release()
        return self.stream.write(text)

    def release(self) -> None:
        if self.held:
            self.stream.write(self.held)
            self.held = ""

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        # Keras draws a live progress bar only on a terminal.
        return self.stream.isatty()


def _builders(applications) -> dict:
    """Name -> model function, for every public function of `keras.applications`."""
    return {
        name: value
        for name, value in vars(applications).items()
        if not name.startswith("_") and callable(value) and not inspect.ismodule(value)
    }


def _expected(wanted: str, builders: dict) -> str:
    # Match case-insensitively: `resnet50` is a submodule, `ResNet50` the model.
    by_lower = {n.lower(): n for n in builders}
    close = difflib.get_close_matches(wanted.lower(), list(by_lower), n=5, cutoff=0.6)
    if close:
        names = ", ".join(f"keras.applications.{by_lower[c]}" for c in close)
        return f"Did you mean: {names}?"
    return f"Expected one of: {', '.join(sorted(builders))}."


def _is_shape(shape) -> bool:
    return (
        isinstance(shape, (tuple, list))
        and len(shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    )


def _check_weights_file(path: Path) -> None:
    received = f"Received: weights={str(path)!r}"
    expected = "Expected 'imagenet', `weights=None` or the path of a weights file"
    if not path.exists():
        raise ModelLoadError(f"Cannot load weights: no such file. {expected}. {received}")
    if path.is_dir():
        raise ModelLoadError(f"Cannot load weights: it is a folder. {expected}. {received}")
    if not path.name.endswith(WEIGHTS_SUFFIXES):
        raise ModelLoadError(
            f"Cannot load weights: unsupported file type {path.suffix or '(none)'!r}. "
            f"Expected a file ending in {', '.join(f'`{s}`' for s in WEIGHTS_SUFFIXES)}. "
            f"{received}"
        )


def _check_known(build, arguments: dict) -> None:
    known = inspect.signature(build).parameters
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise ModelLoadError(
            f"Unknown option for {build.__name__}. Expected some of: "
            f"{', '.join(n for n in known if n != 'weights')}. "
            f"Received: {', '.join(f'{n}={arguments[n]!r}' for n in unknown)}"
        )


def _load_weights(model, path: Path, app: str) -> None:
    # A file that does not fit makes Keras warn once per nested container
    # before it raises: the one-line error says it all.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except Exception as err:  # ValueError for a mismatch, OSError for a bad file
            raise ModelLoadError(
                f"Cannot load the weights of {app} from {str(path)!r}: {_misfit(err)}. "
                "Expected weights saved from the same Application with the same "
                "include_top, input_shape and classes."
            ) from err
    for message in dict.fromkeys(str(w.message) for w in caught):
        warnings.warn(message, UserWarning, stacklevel=3)


def _misfit(err: Exception) -> str:
    """Keras' many-line "objects could not be loaded" error, in one line."""
    text = str(err)
    count = re.search(r"A total of (\d+) objects? could not be loaded", text)
    shapes = re.search(r"variable\.shape=(\(.*?\)), Received: value\.shape=(\(.*?\))", text)
    variable = re.search(r"Target variable: <Variable path=([^,\s]+)", text)
    if not (count and shapes and variable):
        return _one_line(err)
    n = int(count.group(1))
    return (
        f"{n} {'object does' if n == 1 else 'objects do'} not fit, e.g. "
        f"{variable.group(1)} has shape {shapes.group(1)} here and {shapes.group(2)} in the file"
    )


def _download_failure(err: BaseException, url: str) -> tuple[str, str | None]:
    """(URL, why) if `err` is a failed download of Keras' `get_file`, else (url, None).

    `get_file` turns the `URLError` / `HTTPError` of `urlretrieve` into a bare
    `Exception("URL fetch failure on URL: errno -- reason")`, chained to it;
    a timeout while reading comes through as it is. `url` is the one Keras
    announced, if any.
    """
    match = re.search(r"URL fetch failure on (\S+?):? ", str(err))
    url = match.group(1) if match else url or "the URL of the weights file"
    for cause in _chain(err):
        if isinstance(cause, urllib.error.HTTPError):
            return url, f"the server answered HTTP {cause.code} ({cause.reason})"
        if isinstance(cause, urllib.error.URLError):
            return url, f"no network ({_one_line(cause.reason)})"
        if isinstance(cause, _NO_NETWORK):
            return url, f"no network ({_one_line(cause)})"
    if match:
        return url, f"no network ({str(err).split(' -- ', 1)[-1].strip()})"
    return url, None


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _received(arguments: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


def _one_line(err) -> str:
    text = str(err).strip() or type(err).__name__
    line = " ".join(text.splitlines()[0].split())
    return line.rstrip(".")
