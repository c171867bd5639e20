"""The messages of a refused model, the same for every Keras API."""

from __future__ import annotations

from regularize.core.errors import UnsupportedModelError


def not_a_model(received: object, expected: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Expected {expected} (Functional or Sequential). "
        f"Received: model of type {type(received).__name__!r}"
    )


def subclassed(class_name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Cannot rewrite subclassed model {class_name!r}: its layer "
        "graph is not recorded. Rebuild it as a Functional or Sequential model "
        "(or wrap its layers in one) and run again."
    )


def unbuilt_sequential(name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Cannot rewrite Sequential model {name!r}: it is not built, so its "
        "tensor shapes are unknown. Give it an `Input(shape=...)` or call "
        "`model.build(input_shape)` first."
    )


def weights_differ(name: str, old: list, new: list) -> UnsupportedModelError:
    """A rebuilt layer's weight list does not fit the original's."""
    return UnsupportedModelError(
        f"Cannot carry the weights of {name!r} over to its rebuilt copy: "
        "the weight lists differ. Expected the same shapes. "
        f"Received: {old} vs {new}"
    )
