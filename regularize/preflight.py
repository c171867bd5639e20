"""The pre-flight of every command: what the input is and where the output goes, checked once.

`prepare` resolves the input's kind once (`input_kind`: a keras-hub preset, a
Keras 2 file only the Keras 2 engine reads, a Keras Application by name, or a
file), names the default output and checks it once against the output rule
(`core/kinds.check_output`), and returns one typed `Job`. The CLI and
`regularize.process` both start here; `service.execute` runs the job. The
write checks the output once more (a file that appeared at the output during
the run is not replaced without `overwrite`).

Imports no TensorFlow: a wrong output is said before the slow import.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from regularize.core import kinds
from regularize.core import preset_folder
from regularize.core.mode import Mode
from regularize.keras3 import applications

# The default output's suffix per mode: `model.keras` -> `model_dropout.keras`.
SUFFIXES = {Mode.ADD: "dropout", Mode.STRIP: "nodropout"}


# What an input is, resolved once per job (`input_kind`); a Keras 2 input is
# one of `kinds.detect`'s names.
APPLICATION, PRESET, FILE = "application", "preset", "file"
KERAS2_KINDS = (kinds.SAVEDMODEL, kinds.KERAS2_H5)


def input_kind(input: str | os.PathLike) -> str:
    """What `input` is, without TensorFlow.

    One of "preset", "savedmodel", "keras2-h5", "application", "file".
    "savedmodel" and "keras2-h5" are the inputs only the Keras 2 engine reads
    (`kinds.detect`); "file" is anything else on disk (or not there: the
    loader says why).
    """
    if is_preset(input):
        return PRESET
    keras2 = kinds.detect(input)
    if keras2:
        return keras2
    if is_application(input):
        return APPLICATION
    return FILE


def engine_of(input: str | os.PathLike) -> str:
    """ "keras2" for inputs only the Keras 2 engine reads, else "keras3" (no TensorFlow import)."""
    return "keras2" if input_kind(input) in KERAS2_KINDS else "keras3"


@dataclasses.dataclass(frozen=True)
class Job:
    """One checked request, from `prepare`: the input's kind resolved, the output checked.

    Attributes:
        input: The input path (a preset handle stays a string).
        kind: `input_kind(input)`.
        mode: What to do.
        output: Where the model goes (for a dry run: would go); None for `Mode.PLAN`.
        write: Whether `output` is written (not a dry run or a plan); its
            output rule is checked then (`kinds.check_output`).
        overwrite: Replace an output the tool itself would write.
        to_keras3: Keras 2 inputs: write a Keras 3 `.keras` file.
    """

    input: Path | str
    kind: str
    mode: Mode
    output: Path | None
    write: bool
    overwrite: bool = False
    to_keras3: bool = False

    @property
    def engine(self) -> str:
        """ "keras2" or "keras3"."""
        return "keras2" if self.kind in KERAS2_KINDS else "keras3"


def prepare(
    input: str | os.PathLike,
    mode: Mode | str = Mode.ADD,
    *,
    output: str | os.PathLike | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    to_keras3: bool = False,
    check_name: Callable[[Path], None] | None = None,
) -> Job:
    """The pre-flight of every command: resolves what `input` is and checks the output, once.

    No TensorFlow is imported: a wrong output is refused before the slow part.

    Args:
        input, mode, output, dry_run, overwrite, to_keras3: As for `process`.
        check_name: Called with the output path before the output rule (the
            CLI's checks of the name itself, e.g. its length).

    Raises:
        ModelSaveError: The output may not be written (`kinds.check_output`).
    """
    mode = Mode(mode)
    input = input if preset_folder.is_remote(input) else Path(input)
    kind = input_kind(input)
    if mode is Mode.PLAN:
        return Job(input, kind, mode, None, False, overwrite, to_keras3)
    if output is None:
        output = default_output(input, mode, to_keras3=to_keras3, kind=kind)
    output = Path(output)
    write = not dry_run
    if write:
        if check_name is not None:
            check_name(output)
        keras2 = kind in KERAS2_KINDS
        check_output(input, output, overwrite=overwrite, to_keras3=to_keras3, keras2=keras2)
    return Job(input, kind, mode, output, write, overwrite, to_keras3)


def default_output(
    input: str | os.PathLike, mode: Mode | str, *, to_keras3: bool = False, kind: str | None = None
) -> Path:
    """The output's name when none is given, beside the input and in its family.

    `model.keras` -> `model_dropout.keras`; a Keras 2 `model.h5` ->
    `model_dropout.h5` and a SavedModel `model/` -> `model_dropout/` (with
    `to_keras3`: `model_dropout.keras`); a keras-hub preset folder `bert/` ->
    `bert_dropout/` (a handle `kaggle://.../bert_base_en/2` -> `bert_base_en_dropout/`
    in the working folder); `keras.applications.ResNet50` ->
    `resnet50_dropout.keras` in the working folder. `kind` is
    `input_kind(input)`, when known.
    """
    suffix = SUFFIXES[Mode(mode)]
    kind = kind or input_kind(input)
    if kind == PRESET:
        if preset_folder.is_preset_folder(input):
            input = Path(input)
            return input.with_name(f"{input.name}_{suffix}")
        return Path(f"{preset_folder.handle_name(os.fspath(input))}_{suffix}")
    input = Path(input)
    if kind in KERAS2_KINDS:
        return kinds.default_output(input, suffix, to_keras3=to_keras3)
    if kind == APPLICATION:
        return Path(f"{applications.short_name(input)}_{suffix}.keras")
    return input.with_name(f"{input.stem}_{suffix}.keras")


# The output rule for any input, both engines (no TensorFlow).
check_output = kinds.check_output


is_preset = preset_folder.is_preset


def is_application(input: str | os.PathLike) -> bool:
    """Whether `input` names a Keras Application (a file of that name wins)."""
    return applications.is_application_name(input) and not Path(input).exists()
