"""The memory budget of a model's weights, checked before any variable is allocated.

An engine lists what each layer would allocate (`LayerWeights`, from a build that
allocates nothing); `check_weight_budget` refuses a model that would allocate far more
than its file stores, or more than the machine has. Pure Python.
"""

from __future__ import annotations

import dataclasses

from regularize.core.checker import _shown
from regularize.core.errors import ModelLoadError
from regularize.core.text import format_bytes

# A model may allocate this much more than its file stores (optimizer-free
# builds allocate exactly what is stored; seed states and the like are tiny).
WEIGHT_SLACK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """What one layer of a model built without memory would allocate."""

    name: str
    class_name: str
    bytes: int


def check_weight_budget(
    layers: list[LayerWeights], *, stored: int, available: int | None, received: str
) -> None:
    """Raises `ModelLoadError` if a model's weights are far more than its file stores.

    A model file stores every weight its config declares; a config that
    declares gigabytes its file does not hold would only make the loader
    allocate (and randomly initialize) them before it fails. Not lifted by
    `unsafe`: no legitimate file needs it.

    Args:
        layers: Each layer's weight bytes, from a build that allocated nothing.
        stored: The bytes of weight data the file holds.
        available: The machine's available memory (None: unknown).
    """
    total = sum(layer.bytes for layer in layers)
    biggest = max(layers, key=lambda layer: layer.bytes, default=None)
    if biggest is None:
        return
    where = f"layer {_shown(biggest.name)} ({_shown(biggest.class_name, quote=False)})"
    if total > 2 * stored + WEIGHT_SLACK_BYTES:
        raise ModelLoadError(
            f"Refusing to load model: {where} would allocate {format_bytes(biggest.bytes)} "
            f"of weights ({format_bytes(total)} for the whole model), but the file stores "
            f"{format_bytes(stored)} of weights in all. Expected a config whose weights the "
            f"file holds. {received}"
        )
    if available is not None and total > available:
        raise ModelLoadError(
            f"Refusing to load model: its weights need {format_bytes(total)} ({where}: "
            f"{format_bytes(biggest.bytes)}), more than the {format_bytes(available)} of "
            f"memory available. {received}"
        )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
