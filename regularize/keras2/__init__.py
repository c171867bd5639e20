"""The Keras 2 engine adapter (tf_keras, tensorflow-model-optimization): the parent side.

What it owns: telling Keras 2 files apart (`detect`), the output rule for them, starting the
child process (`python -m regularize.keras2`, `__main__` and `engine`, which rewrites with
`rewrite` over the same core walk), the typed records of the parent <-> child protocol
(`protocol`) and the checked conversion to Keras 3 (`to_keras3`). What it may import:
`regularize.core`; the child alone imports tensorflow, tf_keras and tfmot.

Models saved by TensorFlow <= 2.15 are Keras 2 models. Keras 3 reads many of
their `.h5` files directly (that stays the main path); SavedModel folders and
the `.h5` files Keras 3 cannot read go through the Keras 2 engine
(`regularize/keras2/engine.py`, built on tf_keras).

Why a child process: importing tensorflow-model-optimization sets
`TF_USE_LEGACY_KERAS=1` in `os.environ` for the whole process
(tensorflow_model_optimization/python/core/keras/compat.py), after which
`tf.keras` means tf_keras, and a process holding Keras 3 and tf_keras layers
side by side mixes them up. So the engine runs in `python -m regularize.keras2`
with that variable set from the start, and this module imports neither
TensorFlow, Keras, tf_keras nor tfmot: `detect` reads HDF5 attributes with
h5py, `run` talks JSON to the child. Only `to_keras3` imports Keras 3 here, to
turn the child's legacy `.h5` into a `.keras` file.

Example:
    >>> kind = keras2.detect("model_savedmodel")  # "savedmodel"
    >>> result = keras2.run({"mode": "add", "input": "model_savedmodel",
    ...                      "output": "model_dropout", "policy": {"rate": 0.2}})
    >>> report = keras2.to_report(result)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from regularize.core import safety
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.errors import PolicyError
from regularize.core.errors import RegularizeError
from regularize.core.errors import UnsupportedModelError
from regularize.core.kinds import H5_SUFFIXES as H5_SUFFIXES
from regularize.core.kinds import KERAS2_H5 as KERAS2_H5
from regularize.core.kinds import KERAS2_ONLY_CLASSES as KERAS2_ONLY_CLASSES
from regularize.core.kinds import SAVEDMODEL as SAVEDMODEL
from regularize.core.kinds import TFMOT_CLASSES as TFMOT_CLASSES
from regularize.core.kinds import check_output as check_output
from regularize.core.kinds import default_output as default_output
from regularize.core.kinds import detect as detect
from regularize.core.kinds import h5_config_text as _h5_config_text
from regularize.core.kinds import keras3_fixes as keras3_fixes
from regularize.keras2.child import call_engine as _call_engine
from regularize.keras2.files import check_input as _check_input
from regularize.keras2.files import check_model_file as check_model_file
from regularize.keras2.files import module_folder as _module_folder
from regularize.keras2.files import refuse_keras3 as refuse_keras3
from regularize.keras2.protocol import Failure
from regularize.keras2.protocol import Job
from regularize.keras2.protocol import Mode
from regularize.keras2.protocol import Result
from regularize.keras2.to_keras3 import convert

_ERRORS = {
    cls.__name__: cls
    for cls in (ModelLoadError, ModelSaveError, PolicyError, UnsupportedModelError)
}
MODES = tuple(Mode)


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
    """The child's result as a `regularize.core.report.Report` (sites and warnings)."""
    from regularize.core.report import Report
    from regularize.core.report import Site

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
    fmt = check_output(source, output, overwrite=job.overwrite, to_keras3=to_keras3, keras2=True)
    if fmt == "keras" and source.is_file():
        refuse_keras3(safety.class_names(_h5_config_text(source)[1]))
    # Absolute, but the last component is not resolved: a link at the output
    # is replaced, never written through.
    return dataclasses.replace(job, output=os.path.abspath(output), to_keras3=fmt == "keras")


def _unwrap(answer: Result | Failure) -> Result:
    if isinstance(answer, Result):
        return answer
    cls = _ERRORS.get(answer.type, RegularizeError)
    raise cls(answer.error)
