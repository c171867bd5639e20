"""The model-file checker: a config read as data, before anything is deserialized.

One checker for both engines. It imports neither Keras nor TensorFlow: each
engine's adapter describes what its deserializer would resolve a name to (an
`Allowlist`, `regularize.core.allowlist`: `regularize.keras3.trust` fills it for
Keras 3, `keras2_allowlist` with tfmot's exact modules in the Keras 2 engine's
child), and `check_config` walks the config, iteratively,
the way that deserializer would, refusing with one `ModelLoadError` line:

- a class the config names (`module`, `class_name`, `registered_name`) that
  does not resolve *exactly* to an allowed class: Keras' own layers and
  objects, keras-hub's classes, tfmot's wrappers, the user's custom objects.
  A dotted class name or a private module is refused, never matched by prefix;
- a serialized function (a `Lambda`'s function, an activation, a registered
  `package>name` function, any string a deserializer would look up in the
  registry) that is not a pure tensor function (`keras.ops`,
  `keras.activations`, ...); Python lambdas (their bytecode would run);
- a string argument that names a file (`vocabulary`, `merges`, `proto`, ...
  paths): the layer would read that local file into the model;
- on the Keras 2 engine, the `TFOpLambda` rules (`regularize.core.keras2_ops`):
  only pure TensorFlow operations with inert constant arguments, and no
  constant tensor larger than `MAX_CONSTANT_BYTES` (`regularize.core.opsize`).

`unsafe=True` lifts everything but the resource bounds. `check_weight_budget`
is the other resource bound: weights a model would allocate against what its
file stores and the machine has.

Example:
    >>> check_config(config, allowlist, received="Received: path='m.keras'")
"""

from __future__ import annotations

import os
import re

from regularize.core import keras2_ops
from regularize.core import opsize
from regularize.core.allowlist import KERAS2
from regularize.core.allowlist import Allowlist
from regularize.core.errors import ModelLoadError
from regularize.core.text import format_bytes
from regularize.core.text import printable
from regularize.core.text import short_repr

UNSAFE_HINT = "If you trust the file, pass `safe_mode=False`."
# One constant tensor a Keras 2 op layer may make while the model loads.
MAX_CONSTANT_BYTES = 1 << 30

# Keras 3's own markers for values that are no classes (serialization_lib).
_KERAS3_VALUES = frozenset(
    {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__"}
)
# tf_keras' JSON encoding of values (json_utils) that resolve no name.
_KERAS2_VALUES = frozenset(
    {"__tuple__", "TensorShape", "__ellipsis__", "__bytes__", "TypeSpec", "CompositeTensor"}
)
# Packages Keras 3 imports a config's `module` from when the name is not
# registered (`_retrieve_class_or_fn`).
_IMPORTED_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_REGISTERED = re.compile(r"[A-Za-z_][\w.]*>[A-Za-z_]\w*")  # `package>Name`
# Constructor arguments that Keras and keras-hub layers open as files when
# they are strings (vocabulary / merges / SentencePiece proto paths, ...).
# (WhisperTokenizer opens `special_tokens` and `language_tokens` paths too.)
_FILE_KEYS = frozenset(
    """
    vocabulary merges proto spm_proto special_tokens language_tokens path file filename
    filepath directory
    """.split()
)
_FILE_SUFFIXES = ("_file", "_path", "_dir", "_filename", "_filepath", "_directory")
# keras-hub preprocessors keep the name of their preset's JSON file
# (`config_file`), which is only written, inside a preset folder.
_PRESET_CONFIG = re.compile(r"[\w-]+\.json")
_FILE_EXEMPT = frozenset({"name", "class_name", "module", "registered_name", "function_type"})


_KERAS2_FUNCTION_MODULES = frozenset(
    {"builtins", "keras.activations", "keras.losses", "keras.metrics"}
)


def check_config(
    config,
    allowlist: Allowlist,
    *,
    received: str,
    unsafe: bool = False,
    root: str | None = None,
) -> None:
    """Raises `ModelLoadError` if deserializing `config` could run, read or import anything.

    Args:
        config: The parsed JSON config (a `.keras` `config.json`, an `.h5`
            `model_config`, a SavedModel node's metadata).
        allowlist: What the engine may resolve (see `Allowlist`).
        received: The `Received: path=...` tail of messages.
        unsafe: The user trusts the file: only the resource bounds apply.
        root: A folder whose files the config may name (a preset folder).
    """
    checker = _Checker(allowlist, received, unsafe, root)
    if checker.keras2:
        checker.layer_names = keras2_ops.layer_names(config)
    stack = [(config, "the model config", None)]
    while stack:
        value, where, key = stack.pop()
        if isinstance(value, dict):
            where = checker.dict_(value, where)
            stack.extend((v, where, k) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, where, None) for v in value)  # words, not paths
        elif isinstance(value, str):
            checker.string(value, where, key)


class _Checker:
    def __init__(self, allowlist: Allowlist, received: str, unsafe: bool, root):
        self.allow = allowlist
        self.received = received
        self.unsafe = unsafe
        self.root = root
        self.keras2 = allowlist.engine == KERAS2
        self.layer_names: set[str] = set()

    # -- one dict of the config ------------------------------------------------

    def dict_(self, node: dict, where: str) -> str:
        """Checks one dict; returns the `where` of its contents (the layer it belongs to)."""
        kind = node.get("class_name")
        inner = node.get("config")
        if isinstance(kind, str) and isinstance(inner, dict) and isinstance(inner.get("name"), str):
            where = f"layer {_shown(inner['name'])} ({_shown(kind, quote=False)})"
        if self.keras2:
            self._keras2_node(node, kind, inner, where)
        elif isinstance(kind, str) and "config" in node:
            self._keras3_node(node, kind, inner, where)
        return where

    def _keras3_node(self, node: dict, kind: str, inner, where: str) -> None:
        if kind in _KERAS3_VALUES:
            return
        if kind == "__lambda__":
            self._lambda(where)
        elif kind == "__typespec__":
            module = node.get("module")
            if not (
                isinstance(module, str)
                and module.startswith("tensorflow.")
                and node.get("registered_name") is None
            ):
                self._refuse_class(where, node.get("spec_name"), module)
        elif kind == "function":
            if isinstance(inner, str):
                self._keras3_function(inner, node.get("module"), where)
        elif isinstance(inner, dict):
            if not (_IDENTIFIER.fullmatch(kind) or _REGISTERED.fullmatch(kind)):
                self._refuse_class(where, kind, node.get("module"))
            registered = node.get("registered_name", kind)
            if self._keras3_class(kind, node.get("module"), registered) is False:
                self._refuse_class(where, registered if registered else kind, node.get("module"))
            if kind == "Lambda":
                self._lambda_layer(inner, where)

    def _keras3_class(self, kind: str, module, registered) -> bool | None:
        """True: allowed; False: resolves to something not allowed; None: to nothing."""
        allow = self.allow
        if isinstance(registered, str) and registered in allow.registry:
            return registered in allow.registry_ok
        if not isinstance(module, str) or not module:
            return None  # legacy `.h5` configs: looked up by name in Keras' own modules
        api = f"{module}.{kind}"
        if (module == "keras" or module.startswith("keras.")) and api in allow.api:
            return api in allow.api_ok
        if module.split(".", 1)[0] in _IMPORTED_PACKAGES:
            if (module, kind) in allow.modules_ok:
                return True
            if module in allow.api_modules:
                return None  # a public module without that name: Keras says it is unknown
            return False  # Keras would import that module and take the class from it
        if self.allow.custom_module and _in_module(module, self.allow.custom_module):
            return True
        return None

    def _keras3_function(self, name: str, module, where: str) -> None:
        allow = self.allow
        if name in allow.registry:
            # A function position takes functions: a registered class there would be called.
            if name not in allow.registry_ok or name not in allow.registry_functions:
                self._refuse_function(where, name)
            return
        if isinstance(module, str) and (module == "keras" or module.startswith("keras.")):
            api = f"{module}.{name}"
            if api in allow.api:
                if api not in allow.functions_ok:
                    self._refuse_function(where, api)
                return
        if module == "builtins" or not isinstance(module, str):
            if name in allow.builtins_ok:
                return
            # Keras matches a bare name against registered `package>name` too.
            suffix = f">{name}"
            if ">" not in name and any(
                r.endswith(suffix) and r not in allow.registry_ok for r in allow.registry
            ):
                self._refuse_function(where, name)
            if any(
                f"keras.{m}.{name}" in allow.api
                for m in ("activations", "losses", "metrics", "initializers", "regularizers")
            ):
                self._refuse_function(where, name)

    def _lambda_layer(self, inner: dict, where: str) -> None:
        # Its functions first: they are the cause when an argument looks odd too.
        for key in ("function", "output_shape", "mask"):
            value = inner.get(key)
            if isinstance(value, dict) and value.get("class_name") == "__lambda__":
                self._lambda(where, name=inner.get("name"))
            elif isinstance(value, dict) and value.get("class_name") == "function":
                if isinstance(value.get("config"), str):
                    self._keras3_function(value["config"], value.get("module"), where)
            elif isinstance(value, str) and value:
                if inner.get(f"{key}_type") == "lambda":
                    self._lambda(where, name=inner.get("name"))
                self._keras3_function(value, "builtins", where)
            elif isinstance(value, list) and (key == "function" or inner.get(f"{key}_type")):
                # A Keras 2 `.h5` read by Keras 3: [bytecode, defaults, closure].
                self._lambda(where, name=inner.get("name"))

    # -- Keras 2 ---------------------------------------------------------------

    def _keras2_node(self, node: dict, kind, inner, where: str) -> None:
        module = node.get("module")
        if isinstance(module, str) and not self._keras2_module(module):
            self._refuse(
                f"Refusing to load model: {where} names the Python module {_shown(module)}, "
                "which the Keras 2 loader would import. Expected modules of Keras, tfmot or "
                "your custom objects"
            )
        if kind == "function" and isinstance(inner, str):
            # tf_keras' newer serialization names a function by module: only Keras'
            # own function modules (activations, losses, metrics) or the user's.
            if not (module in _KERAS2_FUNCTION_MODULES or self._custom(module)):
                self._refuse_function(where, f"{module}.{inner}" if module else inner)
            return
        if not isinstance(kind, str) or not isinstance(inner, dict):
            return
        if kind in _KERAS2_VALUES:
            return
        if not (_IDENTIFIER.fullmatch(kind) or _REGISTERED.fullmatch(kind)):
            self._refuse_class(where, kind, module)
        if kind in self.allow.registry and kind not in self.allow.registry_ok:
            self._refuse_class(where, kind, module)
        if kind in keras2_ops.OP_LAYERS:
            self._op_layer(node, inner, where)
        elif kind in keras2_ops.ATTRIBUTE_LAYERS:
            self._attribute_layer(kind, inner, where)
        elif kind == "Lambda":
            self._keras2_lambda(inner, where)

    def _custom(self, module) -> bool:
        custom = self.allow.custom_module
        return isinstance(module, str) and bool(custom) and _in_module(module, custom)

    def _keras2_module(self, module: str) -> bool:
        allow = self.allow
        if module in allow.keras2_modules or module.startswith(allow.keras2_module_prefixes):
            return True
        return bool(allow.custom_module) and _in_module(module, allow.custom_module)

    def _keras2_lambda(self, inner: dict, where: str) -> None:
        for key in ("function", "output_shape", "mask"):
            value = inner.get(key)
            if value is None:
                continue
            kind = inner.get(f"{key}_type", "lambda" if key == "function" else "raw")
            if not isinstance(value, str) or kind == "lambda" or not value.isidentifier():
                if key == "function" or kind == "lambda":
                    self._lambda(where, name=inner.get("name"))
                continue
            # A function by name: tf_keras imports `module` and takes it from there.
            module = inner.get("module") if key == "function" else inner.get(f"{key}_module")
            custom = self.allow.custom_module
            if not (isinstance(module, str) and custom and _in_module(module, custom)):
                shown = f"{module}.{value}" if isinstance(module, str) else value
                self._refuse_function(where, shown)

    def _op_layer(self, node: dict, inner: dict, where: str) -> None:
        function = inner.get("function")
        if not isinstance(function, str) or not keras2_ops.is_pure_function(function):
            shown = f"`tf.{function}`" if isinstance(function, str) else _shown(function)
            self._refuse(
                f"Refusing to load model: {where} calls {_shown(shown, quote=False)}, which "
                "is not on the allowlist of pure tensor operations: loading the model "
                "would call it"
            )
        constants = list(keras2_ops.constant_arguments(node.get("inbound_nodes"), self.layer_names))
        for value in constants:
            if not keras2_ops.is_inert(value):
                self._refuse(
                    f"Refusing to load model: {where} passes `tf.{function}` the constant "
                    f"argument {_shown(value)}. Expected numbers, shapes or dtypes"
                )
        calls = list(keras2_ops.calls(node.get("inbound_nodes"), self.layer_names))
        size = 4 * opsize.elements(function, calls)  # float32, the smallest usual dtype
        if size > MAX_CONSTANT_BYTES:
            raise ModelLoadError(
                f"Refusing to load model: {where} would make a constant tensor of "
                f"{format_bytes(size)} (`tf.{function}` of its constant arguments) while the "
                f"model loads. Expected at most {format_bytes(MAX_CONSTANT_BYTES)} per "
                f"constant. {self.received}"
            )

    def _attribute_layer(self, kind: str, inner: dict, where: str) -> None:
        name = inner.get("attr_name")
        if kind != "ClassMethod" and isinstance(name, str) and name in keras2_ops.TENSOR_ATTRIBUTES:
            return
        target = inner.get("attr_name") or inner.get("cls_symbol")
        self._refuse(
            f"Refusing to load model: {where} calls {_shown(target)} on a TensorFlow "
            "object while the model is loaded. Expected a pure tensor operation"
        )

    # -- strings ---------------------------------------------------------------

    def string(self, value: str, where: str, key) -> None:
        if isinstance(key, str) and _is_file_argument(key, value):
            if not self._inside_root(value):
                self._refuse(
                    f"Refusing to load model: {where} reads `{printable(key)}` from the "
                    f"local file {_shown(value)}, which would be copied into the model. "
                    "Expected it inside the model file"
                )
        if key != "name" and value in self.allow.registry and value not in self.allow.registry_ok:
            if value in self.allow.registry_functions:
                self._refuse_function(where, value)
            self._refuse_class(where, value, None)

    def _inside_root(self, value: str) -> bool:
        """Whether the loader, opening `value` as it would (from the working folder when
        relative), reads a file inside `root` (the model's own folder)."""
        if self.root is None:
            return False
        root = os.path.realpath(self.root)
        return os.path.realpath(value).startswith(root + os.sep)

    # -- refusals --------------------------------------------------------------

    def _refuse(self, message: str) -> None:
        if not self.unsafe:
            raise ModelLoadError(f"{message}. {UNSAFE_HINT} {self.received}")

    def _refuse_class(self, where: str, name, module) -> None:
        of = f" of module {_shown(module)}" if isinstance(module, str) and module else ""
        # Registered in this process by another package, or by the user's own code.
        yours = (
            "; if it is your class, pass its module in `custom_objects`"
            if name in self.allow.registry
            else ""
        )
        self._refuse(
            f"Refusing to load model: {where} names the class {_shown(name)}{of}, which is "
            "not on the allowlist of Keras, keras-hub and tfmot classes and your custom "
            f"objects: loading the model would import and build it{yours}"
        )

    def _refuse_function(self, where: str, name) -> None:
        self._refuse(
            f"Refusing to load model: {where} names the function {_shown(name)}, which is "
            "not on the allowlist of pure tensor functions: loading the model would call it"
        )

    def _lambda(self, where: str, name=None) -> None:
        if self.unsafe:
            return
        shown = f" ({_shown(name)})" if isinstance(name, str) else f" ({where})"
        raise ModelLoadError(
            f"Refusing to load a model with a Python-lambda `Lambda` layer{shown}: it runs "
            f"arbitrary code. {UNSAFE_HINT} {self.received}"
        )


def _is_file_argument(key: str, value: str) -> bool:
    lowered = key.lower()
    if not value or lowered in _FILE_EXEMPT:
        return False
    if lowered == "config_file" and _PRESET_CONFIG.fullmatch(value):
        return False
    return lowered in _FILE_KEYS or lowered.endswith(_FILE_SUFFIXES)


def _in_module(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _shown(value, *, quote: bool = True) -> str:
    """A value for a one-line message: repr (control characters escaped), cut short."""
    return short_repr(value) if quote else printable(short_repr(str(value))[1:-1])


# Kept here for the callers that check Keras 2 configs through this module.
dicts = keras2_ops.dicts
is_pure_function = keras2_ops.is_pure_function
PURE_FUNCTIONS = keras2_ops.PURE_FUNCTIONS
TENSOR_ATTRIBUTES = keras2_ops.TENSOR_ATTRIBUTES
