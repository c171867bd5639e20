"""keras-hub models: a task keeps its class, constructor dropout arguments are used.

A keras-hub `Backbone` or `Task` is a Functional model whose `get_config()`
holds its constructor's arguments, not its layer graph: a graph rewrite
would turn it into a plain `Functional` (losing the class, the task API and
the preprocessor), and some keras-hub layers cannot be rebuilt from a
Functional config at all. So, the keras-hub-native way:

- dropout arguments the constructor already has (`dropout`, `dropout_rate`,
  `attention_dropout`, ... found by name in `get_config()`, no list of
  classes) are set, the model is rebuilt from the edited config and the
  weights are copied over (and checked bit-equal);
- a backbone without such arguments (e.g. ResNet) gets dropout in its layer
  graph; it then becomes a plain Functional model, which the report says;
- a task is rebuilt around its (new) backbone with the same preprocessor.

keras-hub itself is never imported here: the model's own class is used.
"""

from __future__ import annotations

import dataclasses
import weakref

import keras
import numpy as np

from regularize.core import Mode
from regularize.core import owned
from regularize.core.errors import UnsupportedModelError
from regularize.core.policy import Policy
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.report import Report
from regularize.core.report import Site
from regularize.keras3 import rewrite as graph_rewrite
from regularize.keras3 import training

_PACKAGE = "keras_hub"


def is_hub_model(model: object) -> bool:
    """Whether `model` is a keras-hub `Backbone` or `Task` (checked without importing keras-hub)."""
    return isinstance(model, keras.Model) and (_is_task(model) or _is_backbone(model))


def dropout_arguments(config: dict) -> dict[str, float]:
    """The constructor's dropout-like arguments in a `get_config()` dict: name → value.

    One definition for the whole tool: `core.owned.find_arguments` (dropout
    keys by name, and stochastic depth such as `drop_path_rate`; those of a
    sub-model argument named by their path, `image_encoder.dropout_rate`).
    """
    return {key.name: key.value for key in owned.find_arguments(config)}


def rewrite(
    model: keras.Model,
    policy: Policy,
    *,
    mode: str = Mode.ADD,
    build: bool = True,
    report: Report | None = None,
) -> keras.Model | None:
    """Rewrites a keras-hub backbone or task; a task keeps its class.

    Args:
        model: A keras-hub `Backbone` or `Task`; it is not changed.
        policy: Each argument follows the setting of its role
            (`core.owned.find_arguments`): `rate` the general dropout
            arguments, `attention_rate` the attention ones, `drop_path`
            stochastic depth (`drop_path_rate`); None leaves them. A value
            already above 0 follows `existing` (default: set to the rate).
        mode: "add" or "strip" (every dropout argument to 0).
        build: False only plans: the report is filled, nothing is built.
        report: Receives one `Site` per dropout argument, and the graph
            sites of a backbone that has no dropout argument.

    Returns:
        The new model, or None if not `build`.
    """
    report = report if report is not None else Report()
    if policy.rules and mode == Mode.ADD:
        graph_rewrite._warn(
            report,
            f"rules match layers of a graph: the constructor dropout arguments of "
            f"{model.name!r} ({type(model).__name__}) follow `rate` / `attention_rate`",
        )
    if _is_task(model):
        return _rewrite_task(model, policy, mode, build, report)
    return _rewrite_backbone(model, policy, mode, build, report, prefix="")


def _rewrite_task(task, policy, mode, build, report):
    backbone = task.backbone
    # The backbone's arguments whose change switched a kernel (warned, with the
    # measured difference): the task cannot be bit-identical either then.
    switched: list[str] = []
    if policy.preset == "head" and mode == Mode.ADD:
        # The head of a task is the task's own layers: the backbone stays.
        new_backbone = backbone
        reason = "preset 'head': the backbone stays"
        _skip_all(backbone, backbone.get_config(), reason, report, prefix=f"{task.name}/")
    else:
        new_backbone = _rewrite_backbone(
            backbone, policy, mode, build, report, prefix=f"{task.name}/", switched=switched
        )
    config = task.get_config()
    # The task's `backbone` argument is rewritten above, not as a nested argument.
    changes, sites = _decide(task, config, policy, mode, report, prefix="", nested=False)
    for site in sites:
        report.add(site)
    if not build:
        return None
    config = owned.with_arguments(config, changes)
    config["backbone"] = new_backbone
    config["preprocessor"] = task.preprocessor
    new = _from_config(task, config)
    _copy_state(task, new)
    if not switched and not _is_exact(task, new):
        raise UnsupportedModelError(
            f"Cannot rewrite {task.name!r} ({type(task).__name__}): the rebuilt task does not "
            "compute bit-identical outputs at inference. Expected the same outputs with "
            f"`training=False`. Received: changed arguments {sorted(changes)}"
        )
    _compile_like(task, new)
    return new


def _rewrite_backbone(backbone, policy, mode, build, report, *, prefix, switched=None):
    config = backbone.get_config()
    if not dropout_arguments(config):
        return _rewrite_graph(backbone, policy, mode, build, report, prefix=prefix)
    changes, sites = _decide(backbone, config, policy, mode, report, prefix=prefix)
    # A plan builds too (from the config: fast): whether inference stays
    # bit-identical is only known by running the rebuilt model.
    name = f"{prefix}{backbone.name}"
    new, sites, crossed = _rebuild_exact(backbone, config, changes, sites, policy, report, name)
    if switched is not None:
        switched.extend(crossed)
    for site in sites:
        report.add(site)
    if not build:
        return None
    if changes and mode == Mode.ADD:
        _check_training(new, changes)
    _compile_like(backbone, new)
    return new


# Why a dropout argument that was 0 stays 0 under `exact=True`.
NOT_EXACT = (
    "dropout crossing 0 switches a layer to another kernel (Keras' MultiHeadAttention leaves "
    "its fused dot-product attention), so inference would not stay bit-identical; exact=True"
)


def _rebuild_exact(model, config, changes, sites, policy, report, name):
    """The rebuilt model and its sites, inference checked against `model` on a probe batch.

    Setting a dropout argument across 0 can change a layer's inference code
    path, not only add an identity: Keras' `MultiHeadAttention` uses
    `ops.dot_product_attention` only while its dropout is 0. Such a change
    was asked for (an explicit rate), so it is made and the measured largest
    difference is warned about, as for an LSTM leaving cuDNN; with
    `policy.exact` such arguments stay as they were (their sites skipped
    with `NOT_EXACT`). Changes that do not cross 0 must stay bit-identical.
    """
    new = _rebuilt(model, config, changes)
    if _is_exact(model, new):
        return new, sites, []
    old = dropout_arguments(config)
    crossing = [key for key in changes if (old[key] == 0) != (changes[key] == 0)]
    kept = {key: value for key, value in changes.items() if key not in crossing}
    base = _rebuilt(model, config, kept) if kept != changes else new
    if not _is_exact(model, base):
        raise UnsupportedModelError(
            f"Cannot rewrite {model.name!r} ({type(model).__name__}): the model rebuilt with "
            "the new dropout arguments does not compute bit-identical outputs at inference. "
            f"Expected the same outputs with `training=False`. Received: changed arguments "
            f"{sorted(kept or changes)}"
        )
    if not policy.exact:
        _warn_crossing(report, name, crossing, max_difference(model, new))
        return new, sites, crossing
    # One argument at a time: those that keep inference exact are set (`new`
    # is always the last model built with exactly `kept`).
    new = base
    refused = set()
    for key in crossing:
        trial = _rebuilt(model, config, {**kept, key: changes[key]})
        if _is_exact(model, trial):
            kept[key] = changes[key]
            new = trial
        else:
            refused.add(key)
    sites = [
        dataclasses.replace(site, action=SKIP, rate=None, reason=NOT_EXACT)
        if site.kind in refused and site.action in (UPDATE, REMOVE)
        else site
        for site in sites
    ]
    return new, sites, []


def _warn_crossing(report, name: str, crossing, difference: float) -> None:
    """The warning of arguments that crossed 0 and so switched an attention kernel."""
    measured = (
        f"inference differs by at most {difference:.3g} on a probe batch"
        if difference
        else "inference is bit-identical on a probe batch, but other inputs or devices "
        "may round differently"
    )
    graph_rewrite._warn(
        report,
        f"{name}: {', '.join(sorted(crossing))} crossed 0, so its attention runs Keras' "
        f"other kernel (fused at 0, explicit above): {measured} (set `exact=True` to "
        "refuse this)",
    )


def _check_training(model, changes) -> None:
    """Refuses a rebuild whose forward pass fails in training mode.

    keras-hub 0.32's `DINOV2DropPath` builds its noise shape with the
    symbolic batch size `None`, so a DINOv2 with `drop_path_rate > 0` cannot
    train: the file would load and predict, and the first `fit` would fail.
    """
    # A training-mode pass moves BatchNormalization statistics and seed states:
    # the model's non-trainable state is put back exactly as it was.
    state = [(v, keras.ops.convert_to_numpy(v)) for v in model.non_trainable_variables]
    try:
        model(_probe(model), training=True)
    except Exception as err:  # the model's own layer fails; one line here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UnsupportedModelError(
            f"Cannot rewrite {model.name!r} ({type(model).__name__}): with "
            f"{', '.join(f'{k}={v:g}' for k, v in changes.items())} its forward pass fails in "
            f"training mode ({type(err).__name__}: {first}), a defect of the model's own "
            "layers. Expected a model that trains with the new arguments. Received: changed "
            f"arguments {sorted(changes)}"
        ) from err
    finally:
        for variable, value in state:
            variable.assign(value)


def _rebuilt(model, config, changes):
    new = _from_config(model, owned.with_arguments(config, changes))
    _copy_state(model, new)
    return new


# Keras attention layers that leave `ops.dot_product_attention` for explicit
# einsums (other last bits) as soon as their dropout is above 0.
_KERNEL_SWITCH = tuple(
    getattr(keras.layers, name)
    for name in ("MultiHeadAttention", "GroupedQueryAttention")
    if hasattr(keras.layers, name)
)


def _is_exact(old: keras.Model, new: keras.Model) -> bool:
    """Whether `new` computes what `old` does at inference.

    Known kernel switches are found in the layers themselves (a probe input
    can hide them: identical tokens make every attention weight equal); the
    probe batch then catches what is not known.
    """
    before = [x for x in old._flatten_layers() if isinstance(x, _KERNEL_SWITCH)]
    after = [x for x in new._flatten_layers() if isinstance(x, _KERNEL_SWITCH)]
    for a, b in zip(before, after, strict=False):
        if not _attention_dropout(a) and _attention_dropout(b):
            return False
    return _same_outputs(old, new)


def _attention_dropout(layer) -> float:
    return float(getattr(layer, "dropout", 0.0) or 0.0)


def _probe(model: keras.Model):
    """A small input batch `model` runs on: masks of ones, ids of 0 and 1, floats.

    Unknown sizes: a batch of 2, 32 pixels of an image, and 8 steps of a
    sequence (ids, or features as Whisper's: its position embedding holds no
    more) unless the model fails on 8 steps: a raw waveform (Moonshine's
    stem strides 64, then 3 and 2, so it needs 895 samples) gets 1024.
    """
    length = _PROBE_LENGTHS.get(model)
    if length is None:
        length = _SEQUENCE_LENGTHS[-1]
        for candidate in _SEQUENCE_LENGTHS[:-1]:
            try:
                model(_probe_batch(model, candidate), training=False)
            except Exception:  # the model's own error on too short an input; try longer
                continue
            length = candidate
            break
        _PROBE_LENGTHS[model] = length
    return _probe_batch(model, length)


_SEQUENCE_LENGTHS = (8, 1024)
# The sequence length each model was found to run on (checked once per model object).
_PROBE_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe_batch(model: keras.Model, length: int):
    rng = np.random.default_rng(0)
    arrays = []
    for tensor in model.inputs:
        size = length if len(tensor.shape) <= 3 else 32
        shape = [2 if i == 0 else size for i in range(len(tensor.shape))]
        shape = [d if d is not None else shape[i] for i, d in enumerate(tensor.shape)]
        name = str(getattr(tensor, "name", "") or "")
        if "bool" in str(tensor.dtype) or "mask" in name:
            arrays.append(np.ones(shape, tensor.dtype))
        elif "segment" in name:
            arrays.append(np.zeros(shape, tensor.dtype))
        elif "int" in str(tensor.dtype):
            # Token ids 0 and 1 exist in every vocabulary; mixed, rows differ.
            arrays.append(rng.integers(0, 2, size=shape).astype(tensor.dtype))
        else:
            arrays.append(rng.uniform(0, 1, size=shape).astype(tensor.dtype))
    return keras.tree.pack_sequence_as(model._inputs_struct, arrays)


def _same_outputs(old: keras.Model, new: keras.Model) -> bool:
    before, after = _both_outputs(old, new)
    return len(before) == len(after) and all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )


def max_difference(old: keras.Model, new: keras.Model) -> float:
    """The largest absolute difference of the two models' outputs on the probe batch."""
    before, after = _both_outputs(old, new)
    return max(
        (
            float(np.max(np.abs(a.astype("float64") - b.astype("float64"))))
            for a, b in zip(before, after, strict=True)
            if a.size
        ),
        default=0.0,
    )


def _both_outputs(old: keras.Model, new: keras.Model):
    x = _probe(old)
    try:
        before = keras.tree.flatten(old(x, training=False))
        after = keras.tree.flatten(new(x, training=False))
    except Exception as err:  # the model's own error on an input it does not take
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        shapes = [tuple(a.shape) for a in keras.tree.flatten(x)]
        raise UnsupportedModelError(
            f"Cannot check {old.name!r} ({type(old).__name__}) on a probe batch: "
            f"{type(err).__name__}: {first}. Expected a model that takes inputs of the "
            f"shapes of its `inputs`. Received: probe shapes {shapes}"
        ) from err
    return (
        [keras.ops.convert_to_numpy(a) for a in before],
        [keras.ops.convert_to_numpy(b) for b in after],
    )


def _rewrite_graph(backbone, policy, mode, build, report, *, prefix):
    """Dropout in the layer graph: the backbone becomes a plain Functional model."""
    inner = Report()
    new = graph_rewrite.rewrite(backbone, policy, mode=mode, build=build, report=inner)
    # Inside a task the backbone is a nested model: its sites get its path.
    where = f"{prefix}{backbone.name}/" if prefix else ""
    for site in inner.sites:
        report.add(dataclasses.replace(site, layer=f"{where}{site.layer}"))
    report.warnings.extend(w for w in inner.warnings if w not in report.warnings)
    if not inner.sites:
        # keras-hub blocks that are custom layers (HGNetV2, ViTDet, SAM) leave the graph
        # walk no candidate: without a site the report would not say why nothing changed.
        cls = type(backbone).__name__
        reason = (
            f"{cls} has no constructor dropout argument and its layer graph no candidate "
            "site: no dropout setting to change"
        )
        report.add(Site(f"{prefix}{backbone.name}", cls, "owned", None, SKIP, reason))
    if inner.changed():
        graph_rewrite._warn(
            report,
            f"{prefix}{backbone.name} ({type(backbone).__name__}) has no constructor argument "
            "for dropout after its activations: the dropout goes into its layer graph, so it "
            f"becomes a plain Functional model (the {type(backbone).__name__} class is not kept)",
        )
    return new


def _decide(model, config, policy, mode, report, *, prefix, nested=True) -> tuple[dict, list[Site]]:
    """The new value of each dropout-like argument of `model`, and one `Site` each."""
    changes = {}
    sites = []
    name = f"{prefix}{model.name}"
    cls = type(model).__name__
    for key in owned.find_arguments(config, nested=nested):
        old = key.value
        new, action, reason = _target(key, policy, mode)
        existing = f"{key.name}={old:g}"
        if new is None:
            rate = old if reason == "already at the rate" else None
            sites.append(Site(name, cls, key.name, rate, action, reason, existing=existing))
            continue
        changes[key.name] = new
        reason = f"{key.name}: {old:g} -> {new:g} ({reason})"
        action = REMOVE if new == 0 else UPDATE
        sites.append(Site(name, cls, key.name, new, action, reason, existing=existing))
    if changes and policy.schedule is not None and mode == Mode.ADD:
        graph_rewrite._warn(
            report, f"{name}: a constructor argument has one rate, not a schedule: `rate` used"
        )
    return changes, sites


def _target(key: owned.Key, policy: Policy, mode: str) -> tuple[float | None, str, str]:
    """(new value or None to leave it, action, reason) for one constructor argument.

    The setting of the key's role drives it (`rate`, `attention_rate`,
    `recurrent_rate`, `drop_path`). A value already above 0 is the model's
    own dropout: `existing` decides, and by default ("retarget" for a
    setting, see `Policy.setting_existing`) the rate asked for is set.
    """
    old = key.value
    if mode == Mode.STRIP:
        return (0.0, REMOVE, "removed") if old else (None, SKIP, "already 0")
    if policy.mc:
        return None, SKIP, "MC dropout cannot be set through a constructor argument"
    rate = getattr(policy, key.role.value)
    if rate is None:
        return None, SKIP, f"`{key.role.value}` not set: {key.name}={old:g} left as it is"
    existing = policy.setting_existing
    if old and existing == "keep":
        return None, KEEP, f"the model's own dropout ({key.name}={old:g}); existing='keep'"
    if old and existing == "remove":
        return 0.0, REMOVE, "existing='remove'"
    if old and not rate and policy.existing is None:
        # `rate=0` asks for no dropout from the tool (it removes the tool's own
        # layers), not for the model's: that takes existing='remove'.
        return None, KEEP, f"rate 0 leaves the model's own {key.name}={old:g}; existing='remove'"
    if rate == old:
        if not rate:
            return None, SKIP, f"`{key.role.value}` is 0: {key.name}=0 left as it is"
        return None, KEEP, "already at the rate"
    return float(rate), UPDATE, key.role.value


def _skip_all(model, config, reason, report, *, prefix) -> None:
    for key in owned.find_arguments(config):
        existing = f"{key.name}={key.value:g}"
        name = f"{prefix}{model.name}"
        report.add(
            Site(name, type(model).__name__, key.name, None, SKIP, reason, existing=existing)
        )


def _from_config(model, config):
    try:
        return type(model).from_config(config)
    except Exception as err:  # keras-hub raises many types; one line here
        raise UnsupportedModelError(
            f"Cannot rebuild {model.name!r} ({type(model).__name__}) from its edited config: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Expected "
            "a keras-hub model whose constructor takes its `get_config()` back. "
            f"Received: model of class {type(model).__module__}.{type(model).__name__}"
        ) from err


def _copy_state(old: keras.Model, new: keras.Model) -> None:
    """Copies weights (checked bit-equal) and per-layer `trainable` flags."""
    old_vars, new_vars = _paired(old.weights, new.weights)
    mismatch = _first_mismatch(old_vars, new_vars)
    if mismatch:
        raise UnsupportedModelError(
            f"Cannot rebuild {old.name!r} ({type(old).__name__}) from its config: the rebuilt "
            "model's weights do not match the original's (its `get_config()` leaves out a "
            f"constructor argument?). Expected {len(old_vars)} weights of the same names and "
            f"shapes. Received: {mismatch}"
        )
    for a, b in zip(old_vars, new_vars, strict=True):
        if a is not b:
            b.assign(a)
    for a, b in zip(old_vars, new_vars, strict=True):
        if not np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)):
            raise UnsupportedModelError(
                f"Cannot rebuild {old.name!r}: weight {a.path!r} did not copy bit-exactly. "
                f"Expected equal values. Received: dtype {a.dtype} -> {b.dtype}"
            )
    old_layers = list(old._flatten_layers(include_self=True))
    new_layers = list(new._flatten_layers(include_self=True))
    if [type(x) for x in old_layers] == [type(x) for x in new_layers]:
        for a, b in zip(old_layers, new_layers, strict=True):
            if b.trainable != a.trainable:
                b.trainable = a.trainable
    else:
        new.trainable = old.trainable


def _paired(old_vars, new_vars) -> tuple[list, list]:
    """`new_vars` in the order of `old_vars`, matched by layer and weight name.

    A backbone whose graph was rewritten (dropout or drop path inserted) may
    list its layers in another order than the original; the names are the
    same. Where names do not pair one to one, the order is kept and the
    check that follows names the first difference.
    """

    def key(variable) -> str:
        return "/".join(variable.path.split("/")[-2:])

    by_key = {key(v): v for v in new_vars}
    if len(by_key) != len(new_vars) or len({key(v) for v in old_vars}) != len(old_vars):
        return list(old_vars), list(new_vars)
    if set(by_key) != {key(v) for v in old_vars}:
        return list(old_vars), list(new_vars)
    return list(old_vars), [by_key[key(v)] for v in old_vars]


def _first_mismatch(old_vars, new_vars) -> str:
    """'' if the two weight lists match by name and shape; else what differs first."""
    for a, b in zip(old_vars, new_vars, strict=False):
        if a.name != b.name or tuple(a.shape) != tuple(b.shape):
            return (
                f"weight {b.path!r} of shape {tuple(b.shape)} where the original has "
                f"{a.path!r} of shape {tuple(a.shape)}"
            )
    if len(old_vars) != len(new_vars):
        return f"{len(new_vars)} weights"
    return ""


def _compile_like(old: keras.Model, new: keras.Model) -> None:
    if getattr(old, "compiled", False):
        training.compile_from_config(new, old.get_compile_config())


def _is_task(model: object) -> bool:
    return _has_hub_base(model, "Task") and hasattr(model, "backbone")


def _is_backbone(model: object) -> bool:
    return _has_hub_base(model, "Backbone")


def _has_hub_base(model: object, name: str) -> bool:
    return any(
        cls.__name__ == name and cls.__module__.startswith(_PACKAGE) for cls in type(model).__mro__
    )
