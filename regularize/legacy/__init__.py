"""Keras 2 models (tf_keras, tensorflow-model-optimization): the parent side.

Models saved by TensorFlow <= 2.15 are Keras 2 models. Keras 3 reads many of
their `.h5` files directly (that stays the main path); SavedModel folders and
the `.h5` files Keras 3 cannot read go through the Keras 2 engine
(`regularize/legacy/engine.py`, built on tf_keras).

Why a child process: importing tensorflow-model-optimization sets
`TF_USE_LEGACY_KERAS=1` in `os.environ` for the whole process
(tensorflow_model_optimization/python/core/keras/compat.py), after which
`tf.keras` means tf_keras, and a process holding Keras 3 and tf_keras layers
side by side mixes them up. So the engine runs in `python -m regularize.legacy`
with that variable set from the start, and this module imports neither
TensorFlow, Keras, tf_keras nor tfmot: `detect` reads HDF5 attributes with
h5py, `run` talks JSON to the child. Only `to_keras3` imports Keras 3 here, to
turn the child's legacy `.h5` into a `.keras` file.

Example:
    >>> kind = legacy.detect("model_savedmodel")  # "savedmodel"
    >>> result = legacy.run({"mode": "add", "input": "model_savedmodel",
    ...                      "output": "model_dropout", "policy": {"rate": 0.2}})
    >>> report = legacy.to_report(result)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from regularize import safety
from regularize.errors import ModelLoadError
from regularize.errors import ModelSaveError
from regularize.errors import PolicyError
from regularize.errors import RegularizeError
from regularize.errors import UnsupportedModelError
from regularize.legacy.keras3 import convert
from regularize.legacy.keras3 import keras3_fixes
from regularize.legacy.protocol import Failure
from regularize.legacy.protocol import Job
from regularize.legacy.protocol import Mode
from regularize.legacy.protocol import Result
from regularize.legacy.protocol import answer_from_dict
from regularize.paths import check_output_path
from regularize.paths import output_format

SAVEDMODEL = "savedmodel"
KERAS2_H5 = "keras2-h5"
MODES = tuple(Mode)
H5_SUFFIXES = (".h5", ".hdf5")

# Layer classes of tensorflow-model-optimization: Keras 3 has no tfmot, so a
# file holding them needs the Keras 2 engine and cannot become a `.keras`.
TFMOT_CLASSES = frozenset(
    {
        "PruneLowMagnitude",
        "QuantizeAnnotate",
        "QuantizeWrapper",
        "QuantizeWrapperV2",
        "QuantizeLayer",
        "ClusterWeights",
        "ClusterWeightsMHA",
    }
)
# Layer classes tf_keras 2.21 has and Keras 3 lacks (computed once by
# comparing `tf_keras.layers` with `keras.layers`; tf_keras no longer
# changes). `TFOpLambda` / `SlicingOpLambda` record a `tf.*` call or a
# slice in a Functional model: the commonest reason a Keras 2 `.h5` does not
# load in Keras 3.
KERAS2_ONLY_CLASSES = frozenset(
    {
        "TFOpLambda",
        "SlicingOpLambda",
        "DenseFeatures",
        "LocallyConnected1D",
        "LocallyConnected2D",
        "RandomFourierFeatures",
        "RandomHeight",
        "RandomWidth",
        "SyncBatchNormalization",
        "ThresholdedReLU",
        "DynamicEmbedding",
    }
)

_ERRORS = {
    cls.__name__: cls
    for cls in (ModelLoadError, ModelSaveError, PolicyError, UnsupportedModelError)
}
_EXPECTED = "a Keras 2 `.h5` file or a Keras 2 SavedModel folder"


def detect(path: str | os.PathLike) -> str | None:
    """Whether `path` needs the Keras 2 engine, without importing TensorFlow.

    Args:
        path: A model file or folder.

    Returns:
        "savedmodel" for a folder holding `saved_model.pb`; "keras2-h5" for an
        `.h5` file written by Keras 2 that Keras 3 cannot read: its config
        names a class Keras 3 does not have (tfmot wrappers, `TFOpLambda`,
        ...), holds an argument or a nested model Keras 3's `.h5` reader
        refuses (see `keras3_fixes`: LSTM's `time_major`, ...), or nests too
        deeply to parse (the Keras 2 engine's checks say so); None otherwise,
        including for the Keras 2 `.h5` files Keras 3 reads itself and for
        anything that is not a model (the Keras 3 loader says why). Class
        names are found in the config's text, so neither its depth nor the
        recursion limit decides the engine.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return SAVEDMODEL if (path / "saved_model.pb").is_file() else None
        if path.suffix not in H5_SUFFIXES or not path.is_file():
            return None
        version, text = _h5_config_text(path)
    except Exception:  # not HDF5, corrupt, no config, bad name: the loader says why
        return None
    if version.startswith("3."):
        return None
    if safety.class_names(text) & (TFMOT_CLASSES | KERAS2_ONLY_CLASSES):
        return KERAS2_H5
    if safety.config_depth(text) > safety.MAX_CONFIG_DEPTH:
        return KERAS2_H5
    try:
        fixes, blockers = keras3_fixes(json.loads(text))
    except Exception:  # not JSON, or not a model config: the Keras 3 loader says why
        return None
    return KERAS2_H5 if fixes or blockers else None


def default_output(input: str | os.PathLike, suffix: str, *, to_keras3: bool = False) -> Path:
    """Where the rewritten model goes by default: beside the input, in its family.

    `model.h5` -> `model_<suffix>.h5`, `model/` -> `model_<suffix>/`, and with
    `to_keras3` -> `model_<suffix>.keras`.
    """
    input = Path(input)
    stem = input.name if input.is_dir() else input.stem
    if to_keras3:
        return input.with_name(f"{stem}_{suffix}.keras")
    if input.is_dir():
        return input.with_name(f"{stem}_{suffix}")
    return input.with_name(f"{stem}_{suffix}{input.suffix}")


def check_output(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    to_keras3: bool = False,
) -> str:
    """Raises `ModelSaveError` if the Keras 2 engine cannot write `output`.

    An output ending in `.keras` means `to_keras3`; one ending in `.h5` is a
    Keras 2 HDF5 file; any other path is a SavedModel folder. The rest is
    the output rule both engines share (`regularize.paths`).

    Returns:
        The output format: "keras", "h5" or "savedmodel".
    """
    output = Path(output)
    fmt = output_format(output)
    if to_keras3 and fmt != "keras":
        raise ModelSaveError(
            f"Cannot write model to {str(output)!r}: `to_keras3` writes a Keras 3 file. "
            f"Expected a path ending in `.keras`. Received: suffix={output.suffix!r}"
        )
    check_output_path(output, overwrite=overwrite, source=Path(input), fmt=fmt)
    return fmt


def policy_to_dict(policy) -> dict:
    """A `Policy` as the JSON-able dict the child rebuilds it from."""
    if hasattr(policy, "to_dict"):
        return policy.to_dict()
    return dataclasses.asdict(policy)


def run(request: dict, *, debug: bool = False) -> dict:
    """Runs one request through the Keras 2 engine in a child process.

    Args:
        request: `mode` ("add", "strip", or "plan": "add" with `dry_run`),
            `input`, `output` (not for a dry run), `dry_run` (report only),
            `policy` (a `Policy` or its dict), `to_keras3`,
            `custom_objects` (a `.py` path or a module name), `overwrite`,
            `safe_mode` (default True: refuse Python-lambda `Lambda` layers).
        debug: Let the child's stderr (TensorFlow logs, tracebacks) through.

    Returns:
        `{"sites": [site dicts], "warnings": [str], "output": path or None}`.

    Raises:
        ModelLoadError: The input is not a Keras 2 model, or needs custom objects.
        ModelSaveError: The output cannot be written.
        PolicyError: Invalid mode or rates.
        UnsupportedModelError: The model cannot be rewritten (or, with
            `to_keras3`, converted).
        RegularizeError: The engine crashed; the message has its last words.
    """
    return _run_all([request], debug=debug, raise_errors=True)[0]


def run_many(requests: list[dict], *, debug: bool = False) -> list[dict | RegularizeError]:
    """Runs several requests in one child process (one TensorFlow import for all).

    Returns:
        One result dict per request, or the `RegularizeError` it raised, in
        order. All requests are checked before the child starts, so one
        cannot read the output of another of the same call.
    """
    return _run_all(requests, debug=debug, raise_errors=False)


def _run_all(requests: list[dict], *, debug: bool, raise_errors: bool) -> list:
    checked: list[Job | RegularizeError] = []
    for request in requests:
        try:
            checked.append(_validate(request))
        except RegularizeError as err:
            if raise_errors:
                raise
            checked.append(err)
    with tempfile.TemporaryDirectory(prefix="regularize-legacy-") as tmp:
        jobs = [_engine_job(r, Path(tmp), i) for i, r in enumerate(checked)]
        todo = [job for job in jobs if job is not None]
        answers = iter(_call_engine(todo, debug=debug) if todo else [])
        out: list = []
        for request, job in zip(checked, jobs, strict=True):
            try:
                if isinstance(request, RegularizeError):
                    raise request
                result = _unwrap(next(answers))
                if job is not request:  # --to-keras3: the child wrote a Keras 2 `.h5`
                    notes = convert(
                        Path(job.output),
                        Path(job.reference),
                        Path(request.output),
                        custom_objects=request.custom_objects,
                        overwrite=request.overwrite,
                    )
                    result = Result(result.sites, [*result.warnings, *notes], request.output)
                out.append(result.to_dict())
            except RegularizeError as err:
                if raise_errors:
                    raise
                out.append(err)
    return out


def _engine_job(request, tmp: Path, index: int) -> Job | None:
    """What the child gets: the job, or for --to-keras3 a temporary `.h5` job."""
    if not isinstance(request, Job):
        return None
    if not request.to_keras3:
        return request
    return dataclasses.replace(
        request,
        output=str(tmp / f"model{index}.h5"),
        reference=str(tmp / f"reference{index}.npz"),
        overwrite=True,
    )


def to_report(result: dict):
    """The child's result as a `regularize.report.Report` (sites and warnings)."""
    from regularize.report import Report
    from regularize.report import Site

    return Report(
        sites=[Site(**site) for site in result.get("sites", [])],
        warnings=list(result.get("warnings", [])),
    )


# -- checks before the child starts ---------------------------------------


def _validate(request: dict) -> Job:
    """Checks a request and turns it into the child's `Job` (absolute paths).

    Everything that can be refused without TensorFlow is refused here,
    before a child is paid for.
    """
    mode = request.get("mode")
    if mode not in MODES:
        raise PolicyError(
            f"Invalid `mode`. Expected one of {', '.join(map(repr, MODES))}. "
            f"Received: mode={mode!r}"
        )
    policy = request.get("policy") or {}
    source_name = request.get("policy_source") or ""
    if not isinstance(policy, dict):  # a Policy: its file name goes along for messages
        source_name = source_name or getattr(policy, "source", "")
        policy = policy_to_dict(policy)
    if policy.get("mc") and mode != Mode.STRIP:
        raise PolicyError(
            "MC dropout is not available for Keras 2 models. Expected `mc=False`, "
            "or convert the model to Keras 3 first. Received: mc=True"
        )
    safe_mode = bool(request.get("safe_mode", True))
    source = Path(request.get("input") or "")
    _check_input(source)
    custom_objects = custom_path = None
    spec = request.get("custom_objects")
    if spec is not None:
        text = str(spec)
        is_file = text.endswith(".py") or os.sep in text
        custom_objects = str(Path(text).resolve()) if is_file else text
        custom_path = None if is_file else _module_folder(text)
    check_model_file(source, unsafe=not safe_mode, custom_objects=custom_objects)
    job = Job(
        # "plan" is "add" without writing; `dry_run` plans "strip" as well.
        mode=Mode.STRIP if mode == Mode.STRIP else Mode.ADD,
        input=str(source.resolve()),
        dry_run=mode == Mode.PLAN or bool(request.get("dry_run", False)),
        policy=policy,
        policy_source=str(source_name),
        custom_objects=custom_objects,
        custom_path=custom_path,
        safe_mode=safe_mode,
        overwrite=bool(request.get("overwrite", False)),
    )
    if job.dry_run:
        return job
    if not request.get("output"):
        raise ModelSaveError(
            f"No output path given. Expected `output` for mode {mode!r}. Received: output=None"
        )
    output = Path(request["output"])
    to_keras3 = bool(request.get("to_keras3", False))
    fmt = check_output(source, output, overwrite=job.overwrite, to_keras3=to_keras3)
    if fmt == "keras" and source.is_file():
        refuse_keras3(safety.class_names(_h5_config_text(source)[1]))
    # Absolute, but the last component is not resolved: a link at the output
    # is replaced, never written through.
    return dataclasses.replace(job, output=os.path.abspath(output), to_keras3=fmt == "keras")


def _check_input(path: Path) -> None:
    received = f"Received: path={str(path)!r}"
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as err:  # a name too long, ...
        raise ModelLoadError(
            f"Cannot read model: {err.strerror or err}. Expected {_EXPECTED}. {received}"
        ) from err
    if not exists:
        raise ModelLoadError(
            f"Cannot read model: no such file or folder. Expected {_EXPECTED}. {received}"
        )
    if is_dir:
        if not (path / "saved_model.pb").is_file():
            raise ModelLoadError(
                "Cannot read model: the folder is not a SavedModel (it has no "
                f"`saved_model.pb`). Expected {_EXPECTED}. {received}"
            )
        if not (path / "keras_metadata.pb").is_file():
            raise ModelLoadError(
                "Cannot read model: the SavedModel holds no Keras model (no "
                "`keras_metadata.pb`; written by `tf.saved_model.save` or Keras 3 "
                "`model.export()`), so there is no layer graph to rewrite. "
                f"Expected {_EXPECTED}. {received}"
            )
        return
    if path.suffix not in H5_SUFFIXES:
        raise ModelLoadError(
            f"Cannot read model: unsupported file type {path.suffix or '(none)'!r}. "
            f"Expected {_EXPECTED}. {received}"
        )
    try:
        _h5_config_text(path)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"Cannot read model: not a readable HDF5 model ({_first_line(err)}). "
            f"Expected {_EXPECTED}. {received}"
        ) from err


def check_model_file(
    path: Path, *, unsafe: bool, custom_objects=None, modules: frozenset[str] | None = None
) -> None:
    """Raises `ModelLoadError` if loading this Keras 2 model would run code or read files.

    Reads the file as data only (h5py, or `keras_metadata.pb` decoded by
    hand) and applies `regularize.safety`: the parent calls it before a
    child is started, the child again before tf_keras sees the file.
    """
    path = Path(path)
    received = f"Received: path={str(path)!r}"
    module = _custom_module_name(custom_objects)
    if path.is_dir():
        metadata, _ = safety.savedmodel_root_config(path)
        safety.check_keras2_config(
            metadata, received, unsafe=unsafe, custom_module=module, modules=modules, root=path
        )
        config = metadata.get("config")
        if not unsafe and not (isinstance(config, dict) and metadata.get("class_name")):
            raise ModelLoadError(
                "Refusing to load model: the SavedModel keeps no config for its model "
                f"(class {metadata.get('class_name')!r}), only traced graph functions, and "
                "loading those runs the SavedModel's own graph code. Expected a Keras 2 "
                f"SavedModel of a Functional or Sequential model. {safety.UNSAFE_HINT} "
                f"{received}"
            )
        return
    safety.check_h5_storage(path, received)
    config = safety.parse_config(_h5_config_text(path)[1], received)
    safety.check_keras2_config(
        config, received, unsafe=unsafe, custom_module=module, modules=modules
    )


def _custom_module_name(spec) -> str | None:
    if not spec:
        return None
    text = str(spec)
    return Path(text).stem if text.endswith(".py") or os.sep in text else text


def _module_folder(name: str) -> str | None:
    """The `sys.path` folder the module `name` would be imported from, found without importing it.

    The child starts isolated (no working folder on its path), so the folder
    of a custom-object module the user named goes along explicitly.
    """
    import importlib.machinery

    try:
        # Where `custom_objects.load` would find it: the import path, then
        # the working folder (last).
        where = [*sys.path, os.getcwd()]
        spec = importlib.machinery.PathFinder.find_spec(name.split(".")[0], where)
    except (ImportError, ValueError, OSError):
        return None
    if spec is None or not spec.origin or not os.path.isabs(spec.origin):
        return None
    origin = Path(spec.origin)
    return str(origin.parent.parent if origin.name == "__init__.py" else origin.parent)


def _h5_config_text(path: Path) -> tuple[str, str]:
    """The `keras_version` and the model config's JSON text of an HDF5 model file."""
    import h5py

    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs:
            raise ModelLoadError(
                "Cannot read model: the `.h5` file holds weights only, no model config. "
                f"Expected {_EXPECTED}. Received: path={str(path)!r}"
            )
        config = f.attrs["model_config"]
        version = f.attrs.get("keras_version", "")
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    if isinstance(version, bytes):
        version = version.decode("utf-8")
    return str(version), str(config)


def refuse_keras3(classes) -> None:
    """Raises `UnsupportedModelError` if layer `classes` cannot exist in Keras 3."""
    found = set(classes) & TFMOT_CLASSES
    if found:
        # Each wrapper kind has its own way out, or none (QAT).
        advice = []
        for kind, names, way in _TFMOT_KINDS:
            if found & names:
                advice.append(f"{kind} wrappers ({', '.join(sorted(found & names))}): {way}")
        ways = "; ".join(advice)
        raise UnsupportedModelError(
            "Cannot convert to Keras 3: the model has tensorflow-model-optimization "
            f"wrappers, and Keras 3 has no tfmot. {ways[0].upper()}{ways[1:]}. Expected a model "
            "without tfmot wrappers, or a Keras 2 output (`to_keras3=False`)."
        )
    found = sorted(set(classes) & KERAS2_ONLY_CLASSES)
    if found:
        raise UnsupportedModelError(
            f"Cannot convert to Keras 3: the model has {', '.join(found)} layers, which "
            "Keras 3 does not have (`TFOpLambda`: a `tf.*` call recorded by Keras 2). "
            "Expected a Keras 2 output (`to_keras3=False`)."
        )


# The tfmot wrapper kinds, and what turns a model of each into plain layers.
_TFMOT_KINDS = (
    (
        "pruning",
        frozenset({"PruneLowMagnitude"}),
        "remove them with `tfmot.sparsity.keras.strip_pruning` after pruning",
    ),
    (
        "clustering",
        frozenset({"ClusterWeights", "ClusterWeightsMHA"}),
        "remove them with `tfmot.clustering.keras.strip_clustering` after clustering",
    ),
    (
        "quantization-aware training",
        frozenset({"QuantizeAnnotate", "QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"}),
        "no tfmot function removes them, so a QAT model cannot become a Keras 3 model "
        "(it stays a Keras 2 model; the TFLite converter takes it from there)",
    ),
)


# -- the child process ----------------------------------------------------


def _call_engine(requests: list[dict], *, debug: bool) -> list[dict]:
    """Runs the engine on `requests`; returns its answers (results or errors)."""
    env = dict(os.environ)
    env["TF_USE_LEGACY_KERAS"] = "1"
    if not debug:
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    payload = {"requests": [job.to_dict() for job in requests], "debug": debug}
    with tempfile.TemporaryDirectory(prefix="regularize-legacy-") as tmp:
        result_path = Path(tmp) / "result.json"
        # `-I`: no working folder, no user site, no PYTHON* variables on the
        # child's path (a `json.py` beside the model is not imported). What
        # the child needs, this package and the libraries it imports, goes
        # along explicitly, from where this process finds them.
        command = [sys.executable, "-I", "-c", _BOOT, json.dumps(_child_path()), "-"]
        command.append(str(result_path))
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=None if debug else subprocess.DEVNULL,
                stderr=None if debug else subprocess.PIPE,
                text=True,
                env=env,
                cwd=tmp,
            )
        except OSError as err:
            raise RegularizeError(
                f"Cannot start the Keras 2 engine ({sys.executable} -I): {_first_line(err)}"
            ) from err
        try:
            _, stderr = proc.communicate(json.dumps(payload))
        except BaseException:
            # Ctrl-C, SIGTERM: let the child unwind too (it removes its
            # temporary output) before giving up on it.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        answer = _read_answer(result_path)
    if answer is None:
        raise RegularizeError(_crash_message(proc.returncode, stderr or ""))
    if "error" in answer:  # the request as a whole was refused
        return [Failure.from_dict(answer)] * len(requests)
    return [answer_from_dict(one) for one in answer.get("results", [])]


# The child's first lines: add the explicit folders to its path (after the
# standard library's), then run `regularize.legacy.__main__`.
_BOOT = (
    "import json, sys; "
    "sys.path += [p for p in json.loads(sys.argv.pop(1)) if p not in sys.path]; "
    "from regularize.legacy.__main__ import main; "
    "sys.exit(main(sys.argv[1:]))"
)
# Top-level packages the child imports; each is taken from where this
# process would import it.
_CHILD_PACKAGES = ("regularize", "tensorflow", "tf_keras", "tensorflow_model_optimization")


def _child_path() -> list[str]:
    """The folders the isolated child needs on `sys.path` (never the working folder)."""
    import importlib.machinery

    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was removed
        cwd = None
    folders = [str(Path(__file__).resolve().parents[2])]
    # Relative entries ('' and the like) mean the working folder: left out.
    entries = [p for p in sys.path if os.path.isabs(p) and os.path.normpath(p) != cwd]
    for name in _CHILD_PACKAGES[1:]:
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, entries)
        except (ImportError, ValueError, OSError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations:
            folders.append(str(Path(locations[0]).parent))
    return list(dict.fromkeys(folders))


def _read_answer(path: Path) -> dict | None:
    try:
        answer = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def _crash_message(code: int, stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # TensorFlow's C++ log lines ("I0000 ...", "W0000 ...") are not last words.
    words = [line for line in lines if line[:1] not in "IWE" or not line[1:5].isdigit()]
    last = (words or lines or ["no message"])[-1]
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return (
        f"The Keras 2 engine (python -m regularize.legacy) {how} without a result: {last} "
        "(run again with `debug=True` for its full output)"
    )


def _unwrap(answer: Result | Failure) -> Result:
    if isinstance(answer, Result):
        return answer
    cls = _ERRORS.get(answer.type, RegularizeError)
    raise cls(answer.error)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines()[0].split())
