"""regularize: add dropout to existing Keras models without losing a weight.

The public names load lazily, so `regularize --help` starts without
importing TensorFlow.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "add_dropout": "regularize.api",
    "remove_dropout": "regularize.api",
    "plan": "regularize.api",
    "process": "regularize.service",
    "Outcome": "regularize.service",
    "mc_predict": "regularize.mc",
    "run_sweep": "regularize.sweep",
    "load_model": "regularize.keras3.io",
    "save_model": "regularize.keras3.io",
    "Policy": "regularize.core.policy",
    "Report": "regularize.core.report",
    "Site": "regularize.core.report",
    "RegularizeError": "regularize.core.errors",
    "PolicyError": "regularize.core.errors",
    "UnsupportedModelError": "regularize.core.errors",
    "ModelLoadError": "regularize.core.errors",
    "ModelSaveError": "regularize.core.errors",
    "RegularizeWarning": "regularize.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regularize' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
