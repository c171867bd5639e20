"""What an engine's deserializer may resolve, as plain names: the checker's input.

Each engine adapter fills an `Allowlist` from what it can see (Keras 3: its registries,
`regularize.keras3.trust`; Keras 2: the modules tf_keras writes, `keras2_allowlist`);
`regularize.core.checker` simulates the deserializer's lookup against it. Pure Python.
"""

from __future__ import annotations

import dataclasses

KERAS3 = "keras3"
KERAS2 = "keras2"


@dataclasses.dataclass(frozen=True)
class Allowlist:
    """What one engine's deserializer may resolve, described as names (no Keras here).

    Attributes:
        engine: `KERAS3` or `KERAS2`: which deserializer's rules apply.
        registry: Every name in the engine's global registry of serializable
            objects (`package>Name`) and in the user's custom objects: the
            deserializer looks a name up there first.
        registry_ok: The subset that may be loaded (keras-hub classes, tfmot
            wrappers, pure registered functions, the user's objects).
        registry_functions: The names in `registry` that are functions.
        api: Every public API name (`keras.layers.Dense`, `keras.ops.add`).
        api_ok: The public classes a model may name.
        functions_ok: The public functions a model may name (pure tensor ones).
        builtins_ok: Names a `module: "builtins"` function may take (Keras
            looks them up in its built-in modules: `relu`, `mse`, ...).
        modules_ok: `(module, class_name)` pairs the deserializer imports for
            allowed classes that are not public or registered (Keras writes
            `keras.src.models.functional` for `Functional`).
        api_modules: The public API modules (`keras.layers`): a name missing
            there is unknown, not something else.
        custom_module: The module the user named for custom objects.
    """

    engine: str
    registry: frozenset[str] = frozenset()
    registry_ok: frozenset[str] = frozenset()
    registry_functions: frozenset[str] = frozenset()
    api: frozenset[str] = frozenset()
    api_ok: frozenset[str] = frozenset()
    functions_ok: frozenset[str] = frozenset()
    builtins_ok: frozenset[str] = frozenset()
    modules_ok: frozenset[tuple[str, str]] = frozenset()
    api_modules: frozenset[str] = frozenset()
    custom_module: str | None = None
    keras2_modules: frozenset[str] = frozenset()
    keras2_module_prefixes: tuple[str, ...] = ()


# The modules tf_keras writes in a config's `module` keys: its public
# namespaces (`keras.layers`, ...), under the name `keras`.
KERAS2_NAMESPACES = frozenset(
    """
    layers initializers regularizers constraints activations losses metrics optimizers
    optimizers.legacy optimizers.experimental optimizers.schedules mixed_precision models
    layers.experimental layers.experimental.preprocessing
    """.split()
)
KERAS2_MODULES = frozenset({"keras", "builtins"} | {f"keras.{ns}" for ns in KERAS2_NAMESPACES})
# tfmot writes its own (private) module paths; the Keras 2 engine's child
# replaces this prefix by the exact modules of tfmot's classes.
TFMOT_PREFIX = "tensorflow_model_optimization.python.core."


def keras2_allowlist(
    custom_module: str | None = None, *, modules: frozenset[str] | None = None
) -> Allowlist:
    """The Keras 2 engine's allowlist: exact `modules` where known (the child), else the
    modules tf_keras writes and tfmot's package (the parent, which cannot import tf_keras)."""
    return Allowlist(
        engine=KERAS2,
        custom_module=custom_module,
        keras2_modules=KERAS2_MODULES | (modules or frozenset()),
        keras2_module_prefixes=() if modules is not None else (TFMOT_PREFIX,),
    )
