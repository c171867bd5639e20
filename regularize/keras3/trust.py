"""The Keras 3 side of the model-file checker: what Keras 3 may resolve, and the weight budget.

`regularize.core.checker` decides; this module describes Keras 3's
deserializer to it as names (`keras3_allowlist`), read from Keras' own
registries: the public API table (`keras.src.api_export`, what
`deserialize_keras_object` looks `module.class_name` up in) and the global
registry of serializable objects (`register_keras_serializable`, which
keras-hub fills with hundreds of classes and a few functions). Whatever an
installed package registers and this list does not allow is refused, which
is what Keras' own `safe_mode` does not do.

`check_file` runs the checker on a `.keras` / `.h5` file's config, then builds
the model from its config inside a `StatelessScope` that initializes
nothing (no weight memory is allocated: Keras defers the variables), and
compares the weights it would allocate with what the file stores.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import keras
from keras.src import api_export
from keras.src.saving import object_registration

from regularize.core import budget
from regularize.core import checker
from regularize.core import safety
from regularize.core.allowlist import KERAS3
from regularize.core.allowlist import Allowlist
from regularize.keras3 import archive

# Public namespaces whose classes a model config may name.
_CLASS_NAMESPACES = (
    "keras.layers.",
    "keras.initializers.",
    "keras.regularizers.",
    "keras.constraints.",
    "keras.losses.",
    "keras.metrics.",
    "keras.optimizers.",
    "keras.activations.",
    "keras.dtype_policies.",
    "keras.quantizers.",
    "keras.random.",
    "keras.models.",
    "keras.distillation.",
)
_TOP_CLASSES = frozenset(
    """
    Model Sequential Layer Loss Metric Optimizer Initializer Regularizer Quantizer
    DTypePolicy FloatDTypePolicy Variable KerasTensor InputSpec Operation
    """.split()
)
# Public classes that load code when built from a config: TorchModuleWrapper
# unpickles a torch module (`torch.load`). Keras' safe mode refuses it too.
_CODE_LOADING = frozenset({"keras.layers.TorchModuleWrapper"})
# Public namespaces whose functions are pure tensor functions.
_FUNCTION_NAMESPACES = (
    "keras.ops.",
    "keras.activations.",
    "keras.losses.",
    "keras.metrics.",
    "keras.random.",
    "keras.initializers.",
    "keras.regularizers.",
    "keras.constraints.",
)
# `keras.ops` functions that take Python callables or leave the tensor world.
_IMPURE_OPS = frozenset(
    """
    map scan associative_scan fori_loop while_loop cond switch vectorized_map
    custom_gradient convert_to_numpy
    """.split()
)
# Keras looks a `module: "builtins"` function's name up in these (serialization_lib).
_BUILTIN_MODULES = (
    "activations",
    "constraints",
    "initializers",
    "losses",
    "metrics",
    "optimizers",
    "regularizers",
)
# Registered functions of installed packages that are pure tensor functions.
_TRUSTED_PACKAGES = frozenset({"keras_hub", "keras_nlp", "keras_cv", "regularize"})
_PURE_REGISTERED = frozenset({"keras_hub>gelu_approximate", "keras_nlp>gelu_approximate"})
_cache: dict = {}


def keras3_allowlist(custom_objects: dict | None = None) -> Allowlist:
    """What Keras 3 may resolve in a config loaded here, with `custom_objects` allowed."""
    registry = object_registration.GLOBAL_CUSTOM_OBJECTS
    key = (frozenset(registry), len(api_export.REGISTERED_NAMES_TO_OBJS))
    base = _cache.get(key)
    if base is None:
        base = _cache[key] = _base_allowlist()
    if not custom_objects:
        return base
    names = set(custom_objects)
    pairs = set(base.modules_ok)
    for obj in custom_objects.values():
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.add(object_registration.get_registered_name(obj))
            pairs.add((obj.__module__, obj.__name__))
    functions = {n for n, obj in custom_objects.items() if inspect.isfunction(obj)}
    return Allowlist(
        engine=KERAS3,
        registry=base.registry | names,
        registry_ok=base.registry_ok | names,
        registry_functions=base.registry_functions | functions,
        api=base.api,
        api_ok=base.api_ok,
        functions_ok=base.functions_ok,
        builtins_ok=base.builtins_ok,
        modules_ok=frozenset(pairs),
        api_modules=base.api_modules,
    )


def _base_allowlist() -> Allowlist:
    api = api_export.REGISTERED_NAMES_TO_OBJS
    classes_ok, functions_ok, pairs = set(), set(), set()
    for name, obj in api.items():
        if name in _CODE_LOADING:
            continue
        if inspect.isclass(obj) and _is_model_class(name):
            classes_ok.add(name)
            pairs.add((obj.__module__, obj.__name__))
        elif callable(obj) and not inspect.isclass(obj) and _is_pure_function(name):
            functions_ok.add(name)
    # Keras writes its own non-public classes by their real module
    # (`keras.src.models.functional.Functional`, `keras.src.ops.numpy.Add`
    # for an op in a functional graph, InceptionResNetV2's CustomScaleLayer).
    unsafe = {api[name] for name in _CODE_LOADING if name in api}
    for cls in _keras_own_classes() - unsafe:
        pairs.add((cls.__module__, cls.__name__))
    registry = object_registration.GLOBAL_CUSTOM_OBJECTS
    registry_ok = {
        name
        for name, obj in registry.items()
        if (inspect.isclass(obj) and _is_model_object(obj) and _is_trusted_package(name, obj))
        or name in _PURE_REGISTERED
    }
    for name in registry_ok:
        obj = registry[name]
        pairs.add((obj.__module__, obj.__name__))
    builtins_ok = set()
    for module in _BUILTIN_MODULES:
        prefix = f"keras.{module}."
        for name in api:
            bare = name.removeprefix(prefix)
            if name.startswith(prefix) and "." not in bare:
                builtins_ok.add(bare)
    # A bare name is allowed only where every built-in module holding it allows it.
    builtins_ok = {
        bare
        for bare in builtins_ok
        if all(
            f"keras.{m}.{bare}" not in api or f"keras.{m}.{bare}" in functions_ok | classes_ok
            for m in _BUILTIN_MODULES
        )
    }
    return Allowlist(
        engine=KERAS3,
        registry=frozenset(registry),
        registry_ok=frozenset(registry_ok),
        registry_functions=frozenset(n for n, o in registry.items() if not inspect.isclass(o)),
        api=frozenset(api),
        api_ok=frozenset(classes_ok),
        functions_ok=frozenset(functions_ok),
        builtins_ok=frozenset(builtins_ok),
        modules_ok=frozenset(pairs),
        api_modules=frozenset(name.rsplit(".", 1)[0] for name in api),
    )


def _keras_own_classes() -> set[type]:
    """Every subclass of Keras' model-building base classes that Keras itself defines."""
    from keras.src.ops.operation import Operation

    roots = [
        Operation,
        keras.initializers.Initializer,
        keras.regularizers.Regularizer,
        keras.constraints.Constraint,
        keras.losses.Loss,
        keras.metrics.Metric,
        keras.optimizers.Optimizer,
        keras.optimizers.schedules.LearningRateSchedule,
        keras.DTypePolicy,
        keras.quantizers.Quantizer,
    ]
    found, stack = set(), list(roots)
    while stack:
        cls = stack.pop()
        if cls in found:
            continue
        found.add(cls)
        stack.extend(cls.__subclasses__())
    return {cls for cls in found if cls.__module__.startswith("keras.src.")}


def _is_model_class(name: str) -> bool:
    if name.startswith(_CLASS_NAMESPACES):
        return True
    return name.startswith("keras.") and name.count(".") == 1 and name[6:] in _TOP_CLASSES


def _is_pure_function(name: str) -> bool:
    if not name.startswith(_FUNCTION_NAMESPACES):
        return False
    return not (name.startswith("keras.ops.") and name.rsplit(".", 1)[-1] in _IMPURE_OPS)


def _is_trusted_package(name: str, cls: type) -> bool:
    """keras-hub (and its older names) and this tool's MC layers: registered by whom they say.

    Any other package's registered objects (tensorflow-text's tokenizers, a
    plug-in's layers) need `custom_objects` or `safe_mode=False`.
    """
    package = name.split(">", 1)[0]
    return package in _TRUSTED_PACKAGES and cls.__module__.split(".", 1)[0] in _TRUSTED_PACKAGES


def _is_model_object(cls: type) -> bool:
    """keras-hub's (and any package's) layers, models, tokenizers, samplers and metrics."""
    bases = (keras.layers.Layer, keras.metrics.Metric, keras.losses.Loss)
    if issubclass(cls, bases):
        return True
    return any(base.__name__ == "Sampler" for base in cls.__mro__)


# -- one file --------------------------------------------------------------------


def check_file(path: Path, *, custom_objects: dict | None = None, safe_mode: bool = True) -> None:
    """Raises `ModelLoadError` if loading this Keras 3 file could run code, read files or
    allocate far more memory than it stores. Reads the config as data first."""
    received = f"Received: path={str(path)!r}"
    if path.suffix == ".keras":
        archive.check_archive(path, received)
    text = archive.config_text(path)
    config = safety.parse_config(text, received)
    _import_named_packages(text)
    allowlist = keras3_allowlist(custom_objects)
    checker.check_config(config, allowlist, received=received, unsafe=not safe_mode)
    _check_weights(path, config, received, custom_objects)


# A `config.json` larger than this is no model config (InceptionResNetV2's
# is 0.8 MB): reading it would inflate a small archive into memory.
def _import_named_packages(text: str) -> None:
    """Imports keras-hub (or keras-nlp / keras-cv) when the config names it.

    Keras would import the package while loading and so fill the registry
    with everything the package registers; the allowlist must see the
    registry as it will be.
    """
    import importlib
    import importlib.util
    import os

    for package in ("keras_hub", "keras_nlp", "keras_cv"):
        if f'"{package}.' not in text and f'"{package}>' not in text:
            continue
        try:
            spec = importlib.util.find_spec(package)
            origin = os.path.realpath(spec.origin) if spec and spec.origin else None
            # Never one planted in the working folder (`keras_cv.py` or `keras_cv/`, on a
            # Python user's path); a venv inside it is fine.
            cwd = os.path.realpath(os.getcwd())
            if origin is None or cwd in (
                os.path.dirname(origin),
                os.path.dirname(os.path.dirname(origin)),
            ):
                continue
            importlib.import_module(package)
        except Exception:  # not installed or broken: Keras fails to load it the same way
            continue


def _check_weights(path: Path, config: dict, received: str, custom_objects) -> None:
    layers = _dry_build(path, config, custom_objects)
    if layers is None:
        return
    budget.check_weight_budget(
        layers,
        stored=archive.stored_bytes(path),
        available=budget.available_memory(),
        received=received,
    )


def _dry_build(path: Path, config: dict, custom_objects) -> list[budget.LayerWeights] | None:
    return declared_weights(config, custom_objects, build=lambda c: _from_config(path, c))


def declared_weights(
    config: dict, custom_objects=None, *, build=None
) -> list[budget.LayerWeights] | None:
    """Each layer's weight bytes, from the model built with no variable initialized.

    `build` makes the model from `config` (default: Keras 3's
    `deserialize_keras_object`, as for a `.keras` file or a preset's
    `config.json` / `task.json`).

    Inside `StatelessScope(initialize_variables=False)` Keras creates each
    variable with its shape and its initializer but allocates nothing, and
    lists it as uninitialized; that list is read (also when the build fails
    halfway, so what was declared still counts) and put back as it was, so
    the shells are dropped. None when nothing was declared.
    """
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope

    classes = _layer_classes(config)  # before Keras, which edits the config as it reads it
    pending = global_state.get_global_attribute("uninitialized_variables")
    global_state.set_global_attribute("uninitialized_variables", [])
    try:
        with (
            contextlib.suppress(Exception),  # the real load says what is wrong
            keras.saving.custom_object_scope(custom_objects or {}),
            StatelessScope(initialize_variables=False),
        ):
            (build or _deserialize)(config)
        declared = global_state.get_global_attribute("uninitialized_variables") or []
        sizes: dict[str, int] = {}
        for variable in declared:
            # `model/fc/kernel`: the layer is the last name before the variable's.
            parts = variable.path.split("/")
            layer = parts[-2] if len(parts) > 1 else parts[0]
            sizes[layer] = sizes.get(layer, 0) + _variable_bytes(variable)
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)
    if not sizes:
        return None
    return [budget.LayerWeights(name, classes.get(name, "?"), size) for name, size in sizes.items()]


def _layer_classes(config) -> dict[str, str]:
    return {
        node["config"]["name"]: str(node.get("class_name"))
        for node in checker.dicts(config)
        if isinstance(node.get("config"), dict) and isinstance(node["config"].get("name"), str)
    }


def _from_config(path: Path, config: dict):
    if path.suffix == ".keras":
        return _deserialize(config)
    from keras.src.legacy.saving import saving_utils

    return saving_utils.model_from_config(config)


def _deserialize(config: dict):
    config = {key: value for key, value in config.items() if key != "compile_config"}
    return keras.saving.deserialize_keras_object(config, safe_mode=True)


def _variable_bytes(variable) -> int:
    shape = [d for d in variable.shape if d is not None]
    size = 1
    for dim in shape:
        size *= int(dim)
    return size * _itemsize(variable.dtype)


def _itemsize(dtype) -> int:
    name = str(dtype)
    for bits in (64, 32, 16, 8):
        if str(bits) in name:
            return bits // 8
    return 4
