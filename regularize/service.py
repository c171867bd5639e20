"""File in, file out: `process` loads a model, rewrites it and saves it, on either engine.

Runs the `Job` of the pre-flight (`regularize.preflight.prepare`: the input's
kind, the output's name and its rule, once) on its engine: Keras 3 in this
process, or the Keras 2 engine in its own; and decides when a result is not
worth writing (the policy put dropout nowhere). The CLI parses arguments,
calls this and prints; a Python user calls the same function:

    >>> outcome = regularize.process("model.keras", "add", policy=Policy(rate=0.2))
    >>> outcome.output, outcome.written
    (PosixPath('model_dropout.keras'), True)

Imports no TensorFlow at module level: paths are checked before the slow
import, and the Keras 2 engine's parent never imports it at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from regularize.core import preset_folder
from regularize.core import terms
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.mode import Mode
from regularize.core.paths import SAVE_SUFFIXES
from regularize.core.policy import Policy
from regularize.preflight import APPLICATION
from regularize.preflight import FILE as FILE
from regularize.preflight import PRESET
from regularize.preflight import SUFFIXES as SUFFIXES
from regularize.preflight import Job
from regularize.preflight import check_output as check_output
from regularize.preflight import default_output as default_output
from regularize.preflight import engine_of as engine_of
from regularize.preflight import input_kind
from regularize.preflight import is_application as is_application
from regularize.preflight import is_preset as is_preset
from regularize.preflight import prepare


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What `process` did.

    Attributes:
        report: One `Site` per candidate, and the warnings.
        output: Where the model was (or, for a dry run, would be) written;
            None for `Mode.PLAN`.
        written: Whether a file or folder was written at `output`.
        empty: The policy asks for dropout and put it nowhere; nothing is
            written then unless `allow_empty`.
    """

    report: object
    output: Path | None
    written: bool
    empty: bool


# The keyword arguments of `process` that are the pre-flight's (`prepare`).
PREFLIGHT = ("output", "dry_run", "overwrite", "to_keras3")


def process(input: str | os.PathLike, mode: Mode | str = Mode.ADD, **options) -> Outcome:
    """Loads `input`, rewrites it per `mode` and `policy`, and writes the result atomically.

    Args:
        input: A `.keras` / `.h5` file, a SavedModel folder, a keras-hub
            preset folder or handle, or a Keras Application by name
            ("keras.applications.ResNet50"). A keras-hub model whose rewrite
            only changes constructor arguments is written with one copy of
            its weights in memory, the output's weights the input's bytes
            (`regularize.keras3.hub_edit`).
        mode: "add" (dropout per `policy`), "strip" (remove it) or "plan"
            (decide every site; nothing is built or written).
        **options: Keywords, `prepare`'s (the first four) and `execute`'s:
        output: Where to write; default `default_output(input, mode)`.
        dry_run: Decide and report, write nothing ("add" and "strip").
        overwrite: Replace an existing output the tool itself would write.
        to_keras3: Keras 2 inputs: write a Keras 3 `.keras` file.
        policy: For "add" and "plan"; default `Policy()`.
        allow_empty: Write the model even if the policy asks for dropout and
            put it nowhere (`Outcome.empty`).
        custom_objects: A dict of custom classes (Keras 3 inputs), or a
            module name or `.py` file (both engines).
        safe_mode: False runs what a model file asks to run (Python
            lambdas, ...): only for files you trust.
        step: Called with what runs now ("importing TensorFlow", ...).
        quiet: A context manager factory around the TensorFlow import and
            the Keras work (the CLI keeps library logs off stderr with it).
        debug: The Keras 2 engine lets its child's stderr through.
        **application_options: For a Keras Application: `weights`,
            `include_top`, `input_shape`, `classes`.

    Returns:
        An `Outcome`.

    Raises:
        ModelLoadError, ModelSaveError, PolicyError, UnsupportedModelError:
            one line each, nothing written.
    """
    checks = {key: options.pop(key) for key in PREFLIGHT if key in options}
    return execute(prepare(input, mode, **checks), **options)


def execute(
    job: Job,
    *,
    policy: Policy | None = None,
    allow_empty: bool = False,
    custom_objects: dict | str | os.PathLike | None = None,
    safe_mode: bool = True,
    step: Callable[[str], None] | None = None,
    quiet: Callable[[], contextlib.AbstractContextManager] | None = None,
    debug: bool = False,
    **application_options,
) -> Outcome:
    """Runs a `Job` from `prepare` on its engine; the arguments are `process`'s."""
    policy = policy if policy is not None else Policy()
    step = step or (lambda text: None)
    quiet = quiet or contextlib.nullcontext
    asks = job.mode is not Mode.STRIP and policy.asks_for_dropout()

    def keep(report) -> bool:
        return allow_empty or not (asks and report.with_dropout() == 0)

    run = _run_keras2 if job.engine == "keras2" else _run_keras3
    report, written = run(
        job,
        policy,
        keep=keep,
        custom_objects=custom_objects,
        safe_mode=safe_mode,
        step=step,
        quiet=quiet,
        debug=debug,
        options=application_options,
    )
    empty = asks and report.with_dropout() == 0
    return Outcome(report=report, output=job.output, written=written, empty=empty)


def _run_keras3(job, policy, *, keep, step, quiet, **kwargs):
    input, mode = job.input, job.mode
    save_to = job.output if job.write else None
    if job.kind not in (APPLICATION, PRESET):
        from regularize.core import inputs

        inputs.check_readable(input)  # a wrong file is said before the slow import
    step("importing TensorFlow")
    with quiet():
        step(f"loading {input}")
        from regularize import api
        from regularize.core.report import Report
        from regularize.keras3 import io

        model = io.load_model(
            input,
            custom_objects=kwargs["custom_objects"],
            safe_mode=kwargs["safe_mode"],
            **kwargs["options"],
        )
        report = Report()
        if mode is Mode.ADD and _is_keras2_h5(input) and _has_batchnorm(model):
            report.warnings.append(terms.KERAS2_BATCHNORM)
        step("rewriting")
        if mode is not Mode.PLAN and save_to is not None:
            from regularize.keras3 import hub_edit

            input_path = hub_preset_folder(input, job.kind)
            edit = None
            if hub_edit.kind_of(input_path, Path(save_to)):
                edit = hub_edit.plan(model, policy, mode, report)
            if edit is not None:
                # One copy of the weights: the input model goes before the output loads.
                del model
                if not keep(report):
                    return report, False
                step(f"writing {save_to}")
                hub_edit.write(
                    input_path,
                    Path(save_to),
                    edit,
                    report,
                    custom_objects=kwargs["custom_objects"],
                    safe_mode=kwargs["safe_mode"],
                )
                return report, True
        if mode is Mode.PLAN:
            api.plan(model, policy=policy, report=report)
            return report, False
        if mode is Mode.STRIP:
            new = api.remove_dropout(model, report=report)
        else:
            new = api.add_dropout(model, policy=policy, report=report)
        if save_to is None or not keep(report):
            return report, False
        step(f"writing {save_to}")
        if job.kind == PRESET and Path(save_to).suffix not in SAVE_SUFFIXES:
            from regularize.keras3 import hub_edit

            hub_edit.save_preset(new, Path(save_to))
        else:
            # The pre-flight checked the output before the slow part; the check at the
            # write is the one that holds: a file that appeared meanwhile is not replaced.
            io.save_model(new, save_to, overwrite=job.overwrite)
    return report, True


def hub_preset_folder(input, kind: str | None = None) -> Path:
    """The local folder of a preset handle (keras-hub's download); any other input as is."""
    kind = kind or input_kind(input)
    if kind == PRESET and not preset_folder.is_preset_folder(input):
        from regularize.keras3 import hub_preset

        return hub_preset.resolve(input)
    return Path(input)


def _is_keras2_h5(input) -> bool:
    """An `.h5` file that Keras 2 (tf_keras, or Keras <= 2.15) wrote."""
    path = Path(input)
    if path.suffix not in (".h5", ".hdf5") or not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version", "")
    except OSError:
        return False
    version = version.decode() if isinstance(version, bytes) else str(version)
    return bool(version) and not version.startswith("3.")


def _has_batchnorm(model) -> bool:
    """A BatchNormalization on 4-D or 5-D maps: the ones tf_keras computes fused."""
    from regularize.keras3 import graph

    for layer in model._flatten_layers(include_self=False):
        if graph.is_batchnorm(layer):
            try:
                rank = len(layer.input.shape)
            except (AttributeError, ValueError):  # not called in a graph
                continue
            if rank in (4, 5):
                return True
    return False


def _run_keras2(job, policy, *, keep, step, quiet, **kw):
    """One job for the Keras 2 engine; its output is published only if `keep(report)`.

    The engine writes into a temporary folder beside the output, and the
    result is renamed into place here: a policy that puts dropout nowhere, or
    an interrupt, leaves the output as it was.
    """
    from regularize import keras2

    input, mode, to_keras3 = job.input, job.mode, job.to_keras3
    save_to = job.output if job.write else None
    if kw["options"]:
        given = ", ".join(f"{k}={v!r}" for k, v in kw["options"].items())
        raise ModelLoadError(
            "Cannot read model: Application options apply only to a "
            f"`keras.applications.NAME` input, not to a model file. Received: "
            f"path={str(input)!r}, {given}"
        )
    request = {"mode": str(mode), "input": input, "custom_objects": kw["custom_objects"]}
    request.update(safe_mode=kw["safe_mode"], overwrite=job.overwrite, to_keras3=to_keras3)
    if mode is not Mode.STRIP:
        request["policy"] = policy
    step(f"rewriting {input} with the Keras 2 engine")
    # Keras 3 is needed in this process only to write a `.keras` file.
    needs_keras = to_keras3 and save_to is not None
    with quiet() if needs_keras else contextlib.nullcontext():
        if save_to is None:
            request.update(output=None, dry_run=True)
            return keras2.to_report(keras2.run(request, debug=kw["debug"])), False
        output = Path(save_to)
        prefix = f".{output.name[:100]}."
        stage = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=output.parent))
        try:
            staged = stage / output.name
            request.update(output=staged, dry_run=False)
            try:
                report = keras2.to_report(keras2.run(request, debug=kw["debug"]))
            except ModelSaveError as err:
                # The engine wrote to the staging path; the user named `output`.
                text = str(err).replace(repr(str(staged)), repr(str(output)))
                raise ModelSaveError(text.replace(str(staged), str(output))) from err
            if not keep(report):
                return report, False
            _publish(staged, output)
            return report, True
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _publish(staged: Path, output: Path) -> None:
    """Renames the engine's finished output into place (a SavedModel folder too)."""
    from regularize.core import atomic

    if staged.is_dir() and not staged.is_symlink():
        # A folder cannot replace another in one step; `write_folder` moves
        # the old one aside and back on failure. Its empty temporary folder
        # is replaced by the staged one in one rename.
        atomic.write_folder(output, lambda tmp: os.rename(staged, tmp))
    else:
        os.replace(staged, output)
