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

import keras
import numpy as np

from regularize.core import Mode
from regularize.core import arguments
from regularize.core import owned
from regularize.core.errors import UnsupportedModelError
from regularize.core.policy import Policy
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.report import Report
from regularize.core.report import Site
from regularize.keras3 import hub_probe
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
    if not switched and not hub_probe.is_exact(task, new):
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
    if hub_probe.is_exact(model, new):
        return new, sites, []
    old = dropout_arguments(config)
    crossing = [key for key in changes if (old[key] == 0) != (changes[key] == 0)]
    kept = {key: value for key, value in changes.items() if key not in crossing}
    base = _rebuilt(model, config, kept) if kept != changes else new
    if not hub_probe.is_exact(model, base):
        raise UnsupportedModelError(
            f"Cannot rewrite {model.name!r} ({type(model).__name__}): the model rebuilt with "
            "the new dropout arguments does not compute bit-identical outputs at inference. "
            f"Expected the same outputs with `training=False`. Received: changed arguments "
            f"{sorted(kept or changes)}"
        )
    if not policy.exact:
        _warn_crossing(report, name, crossing, hub_probe.max_difference(model, new))
        return new, sites, crossing
    # One argument at a time: those that keep inference exact are set (`new`
    # is always the last model built with exactly `kept`).
    new = base
    refused = set()
    for key in crossing:
        trial = _rebuilt(model, config, {**kept, key: changes[key]})
        if hub_probe.is_exact(model, trial):
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
        model(hub_probe.probe(model), training=True)
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
    name = f"{prefix}{model.name}"
    changes, sites, notes = arguments.decide(
        name, type(model).__name__, config, policy, mode, nested=nested
    )
    for text in notes:
        graph_rewrite._warn(report, text)
    return changes, sites


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
