"""One copy of the weights: a keras-hub model rewritten by editing its saved config only.

When a keras-hub model's rewrite only changes constructor arguments
(`regularize.keras3.hub`: dropout, attention dropout, drop path), its weights do
not change and need not be built twice. So, for a `.keras` file or a preset
folder in and the same kind out:

1. `plan` decides every argument from the loaded model's config (the same
   `hub` decisions and report), runs the model once on the probe batch and
   keeps only those outputs: the caller then drops the input model;
2. `write` writes the output with only the configs edited: a `.keras`
   archive's `config.json` (every other member, `model.weights.h5` first,
   copied as its bytes); a preset's `config.json` and `task.json` (every
   other file copied byte for byte);
3. before the output is published, it is loaded (the one copy now in
   memory) and run on the probe batch: bit-identical outputs, or the
   measured difference of a kernel switch the `hub` path warns about too.

Weights files of a preset are copied, not hard-linked: a hard link is the
same file, and Keras and h5py open weights files for writing in place
(`save_weights` to the same path, `h5py.File(path, "r+")`), so an edit of
one folder would silently change the other. The copy costs disk, not memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np

from regularize.core import Mode
from regularize.core import atomic
from regularize.core import owned
from regularize.core import preset_folder
from regularize.core.errors import ModelSaveError
from regularize.core.errors import RegularizeError
from regularize.core.errors import UnsupportedModelError
from regularize.core.errors import first_line
from regularize.core.policy import Policy
from regularize.core.report import Report
from regularize.keras3 import hub
from regularize.keras3 import hub_probe

KERAS = "keras"
PRESET = "preset"


@dataclasses.dataclass(frozen=True)
class Edit:
    """What `write` needs once the input model is gone: no reference to it is kept."""

    name: str  # the model's name and class, for messages
    where: str  # the backbone's path (`task/backbone`), for the kernel-switch warning
    backbone: dict  # argument -> new value, for the backbone's config
    task: dict  # argument -> new value, for the task's own config (empty for a backbone)
    is_task: bool
    crossing: tuple[str, ...]  # changed arguments that crossed 0 (a possible kernel switch)
    probe: object  # the probe batch
    outputs: tuple  # the input model's outputs on it, as numpy arrays
    attention: tuple  # the attention layers' dropout, in layer order
    train_check: bool  # add mode with changes: one training-mode pass on the output


def kind_of(input: Path, output: Path) -> str | None:
    """KERAS or PRESET if the input and output are of one kind this module writes; else None."""
    if input.suffix == ".keras" and output.suffix == ".keras" and input.is_file():
        return KERAS
    if preset_folder.is_preset_folder(input) and output.suffix not in (".keras", ".h5"):
        return PRESET
    return None


def plan(model: keras.Model, policy: Policy, mode: str, report: Report) -> Edit | None:
    """The config edit of a keras-hub model, or None where the weights would change.

    None: not a keras-hub model, a backbone without dropout arguments (its
    dropout goes into the layer graph, `hub`), or `policy.exact` with an
    argument crossing 0 (`hub` then tries one argument at a time, which
    takes both models in memory). The report is filled only if an `Edit` is
    returned.
    """
    if not hub.is_hub_model(model) or mode not in (Mode.ADD, Mode.STRIP):
        return None
    is_task = hub._is_task(model)
    backbone = model.backbone if is_task else model
    head_only = is_task and policy.preset == "head" and mode == Mode.ADD
    config = backbone.get_config()
    if not head_only and not hub.dropout_arguments(config):
        return None
    trial = Report()
    prefix = f"{model.name}/" if is_task else ""
    if head_only:
        hub._skip_all(backbone, config, "preset 'head': the backbone stays", trial, prefix=prefix)
        backbone_changes = {}
    else:
        backbone_changes, sites = hub._decide(backbone, config, policy, mode, trial, prefix=prefix)
        for site in sites:
            trial.add(site)
    crossing = _crossing(config, backbone_changes)
    task_changes = {}
    if is_task:
        task_config = model.get_config()
        # The task's `backbone` argument is the backbone above, not a nested argument.
        task_changes, sites = hub._decide(
            model, task_config, policy, mode, trial, prefix="", nested=False
        )
        for site in sites:
            trial.add(site)
        crossing += _crossing(task_config, task_changes)
    if crossing and policy.exact:
        return None
    if policy.rules and mode == Mode.ADD:
        hub.graph_rewrite._warn(
            report,
            f"rules match layers of a graph: the constructor dropout arguments of "
            f"{model.name!r} ({type(model).__name__}) follow `rate` / `attention_rate`",
        )
    for site in trial.sites:
        report.add(site)
    report.warnings.extend(w for w in trial.warnings if w not in report.warnings)
    probe = hub_probe.probe(model)
    return Edit(
        name=f"{model.name!r} ({type(model).__name__})",
        where=f"{prefix}{backbone.name}",
        backbone=backbone_changes,
        task=task_changes,
        is_task=is_task,
        crossing=tuple(crossing),
        probe=probe,
        outputs=tuple(_outputs(model, probe)),
        attention=tuple(_attention(model)),
        train_check=mode == Mode.ADD and bool(backbone_changes or task_changes),
    )


def _crossing(config: dict, changes: dict) -> list[str]:
    old = {key.name: key.value for key in owned.find_arguments(config)}
    return [key for key, new in changes.items() if (old[key] == 0) != (new == 0)]


def write(
    input: Path,
    output: Path,
    edit: Edit,
    report: Report,
    *,
    custom_objects=None,
    safe_mode: bool = True,
) -> None:
    """Writes the edited copy of `input` to `output` atomically, checked before it is published.

    Args:
        input: The `.keras` file or preset folder `edit` was planned on.
        output: Where the output goes (its path already checked).
        edit: From `plan`; the input model is no longer in memory.
        report: Receives the kernel-switch warning, if any.
        custom_objects: A dict of the classes the input needed (as `load_model` took).
        safe_mode: As the input was loaded.
    """
    kind = kind_of(input, output)

    def load(path: Path) -> keras.Model:
        from regularize.keras3 import hub_preset
        from regularize.keras3 import io

        objects = io._custom_objects(custom_objects)
        with keras.saving.custom_object_scope(objects):
            if kind == KERAS:
                return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
            return hub_preset._from_preset(path)

    gc.collect()  # the input model's variables, before the output's are made

    def check(tmp: str) -> None:
        _check(Path(tmp), edit, report, load)

    try:
        if kind == KERAS:
            atomic.write_file(
                output, lambda tmp: _write_archive(input, Path(tmp), edit), check=check
            )
        else:
            atomic.write_folder(
                output, lambda tmp: _write_folder(input, Path(tmp), edit), check=check
            )
    except RegularizeError:
        raise
    except Exception as err:  # OS errors of the copy: one line, nothing written
        raise ModelSaveError(f"Cannot write model to {str(output)!r}: {first_line(err)}") from err


def save_preset(model: keras.Model, output: Path) -> None:
    """Writes a rewritten keras-hub model as a preset folder with keras-hub's `save_to_preset`.

    The path where `plan` gave no `Edit` (`--exact` with an argument
    crossing 0, ...): the model was rebuilt in memory, and keras-hub writes
    its weights again and a new `metadata.json`. The folder is loaded back
    with `from_preset` before it is published.

    Raises:
        UnsupportedModelError: The model is no longer a keras-hub model (its
            dropout went into its layer graph): a preset cannot hold it.
    """
    if not hub.is_hub_model(model) or not hasattr(model, "save_to_preset"):
        raise UnsupportedModelError(
            f"Cannot write {model.name!r} as a keras-hub preset: its dropout went into its "
            f"layer graph, so it is a plain {type(model).__name__} model, which a preset "
            "cannot hold. Expected a `.keras` output path for it. Received: output="
            f"{str(output)!r}"
        )

    def check(tmp: str) -> None:
        from regularize.keras3 import hub_preset

        try:
            hub_preset._from_preset(Path(tmp))
        except Exception as err:  # keras-hub raises many types
            raise ModelSaveError(
                f"Cannot write model to {str(output)!r}: the written preset would not load "
                f"again ({type(err).__name__}: {first_line(err)[:300]}); nothing was written."
            ) from err

    try:
        atomic.write_folder(output, lambda tmp: model.save_to_preset(tmp), check=check)
    except RegularizeError:
        raise
    except Exception as err:  # OS errors of the write: one line, nothing written
        raise ModelSaveError(f"Cannot write model to {str(output)!r}: {first_line(err)}") from err


def _edited(config: dict, edit: Edit, *, holds_task: bool) -> dict:
    """A serialized model config (`config.json`, `task.json`) with the new arguments."""
    config = json.loads(json.dumps(config))
    if holds_task:
        config["config"].update(edit.task)
        config["config"]["backbone"]["config"].update(edit.backbone)
    else:
        config["config"].update(edit.backbone)
    return config


def _write_archive(input: Path, tmp: Path, edit: Edit) -> None:
    # By hand, since Keras has no way to save a changed config with the weights
    # it read: every member but `config.json` is streamed as its stored bytes
    # (Keras stores them uncompressed), 1 MiB at a time, never whole in memory.
    with zipfile.ZipFile(input) as source, zipfile.ZipFile(tmp, "w") as target:
        for info in source.infolist():
            if info.filename == "config.json":
                config = json.loads(source.read(info))
                target.writestr(info, json.dumps(_edited(config, edit, holds_task=edit.is_task)))
                continue
            with source.open(info) as reader, target.open(_copy_info(info), "w") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    copy.compress_type = info.compress_type
    copy.external_attr = info.external_attr
    copy.file_size = info.file_size  # ZIP64 decided before the first byte
    return copy


def _write_folder(input: Path, tmp: Path, edit: Edit) -> None:
    # By hand, not keras-hub's `save_to_preset`: that writes the weights again
    # from memory and a new `metadata.json` (its date); here every file but
    # the two edited configs is the input's bytes. The configs are written as
    # keras-hub writes them (`json.dumps(config, indent=4)`).
    files = preset_folder.check_tree(input, f"Received: path={str(input)!r}", unsafe=True)
    for relative in files:
        source, target = input / relative, tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        name = str(relative)
        if name in preset_folder.EDITED_FILES:
            config = json.loads(source.read_text(encoding="utf-8"))
            edited = _edited(config, edit, holds_task=name == preset_folder.TASK_FILE)
            text = json.dumps(edited, indent=4)
            target.write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(source, target)


@contextlib.contextmanager
def _random_initializers_as_zeros():
    """Variables a random initializer would fill start as zeros instead, for a while.

    The check's load overwrites every weight with the file's values, so the
    random numbers Keras draws first (about half of a `.keras` load of BERT)
    are never used. A weight the file would not restore then stays 0 where it
    would have been random: the model's outputs differ from the input's either
    way, and the check refuses the output either way.
    """
    from keras.src.backend import Variable
    from keras.src.initializers.random_initializers import RandomInitializer

    name = "_initialize_with_initializer"
    own = vars(Variable).get(name)
    original = getattr(Variable, name)

    def initialize(self, initializer):
        if isinstance(initializer, RandomInitializer):
            initializer = keras.initializers.Zeros()
        return original(self, initializer)

    setattr(Variable, name, initialize)
    try:
        yield
    finally:
        if own is None:
            delattr(Variable, name)
        else:
            setattr(Variable, name, own)


def _check(tmp: Path, edit: Edit, report: Report, load) -> None:
    """Loads the written output and compares it with the input's outputs on the probe batch."""
    try:
        with _random_initializers_as_zeros():
            model = load(tmp)
    except Exception as err:  # Keras and keras-hub raise many types
        raise ModelSaveError(
            f"Cannot write model: the written output would not load again "
            f"({type(err).__name__}: {first_line(err)[:300]}); nothing was written."
        ) from err
    try:
        after = _outputs(model, edit.probe)
        switched = any(not a and b for a, b in zip(edit.attention, _attention(model), strict=False))
        same = len(after) == len(edit.outputs) and all(
            np.array_equal(a, b) for a, b in zip(edit.outputs, after, strict=True)
        )
        if not same or switched:
            if not edit.crossing:
                raise UnsupportedModelError(
                    f"Cannot rewrite {edit.name}: the model with the new dropout arguments "
                    "does not compute bit-identical outputs at inference. Expected the same "
                    "outputs with `training=False`. Received: changed arguments "
                    f"{sorted({**edit.backbone, **edit.task})}"
                )
            hub._warn_crossing(report, edit.where, edit.crossing, _difference(edit.outputs, after))
        if edit.train_check:
            hub._check_training(model, {**edit.backbone, **edit.task})
    finally:
        del model
        gc.collect()


def _outputs(model: keras.Model, probe) -> list:
    try:
        values = keras.tree.flatten(model(probe, training=False))
    except Exception as err:  # the model's own error on an input it does not take
        raise UnsupportedModelError(
            f"Cannot check {model.name!r} ({type(model).__name__}) on a probe batch: "
            f"{type(err).__name__}: {first_line(err)[:200]}. Expected a model that takes "
            "inputs of the shapes of its `inputs`."
        ) from err
    return [keras.ops.convert_to_numpy(v) for v in values]


def _attention(model: keras.Model) -> list[float]:
    return [
        hub_probe.attention_dropout(layer)
        for layer in model._flatten_layers()
        if isinstance(layer, hub_probe.KERNEL_SWITCH)
    ]


def _difference(before, after) -> float:
    return max(
        (
            float(np.max(np.abs(a.astype("float64") - b.astype("float64"))))
            for a, b in zip(before, after, strict=True)
            if a.size
        ),
        default=0.0,
    )
