"""The probe batch of a keras-hub model, and whether a rebuilt model computes the same.

A rebuilt keras-hub model must compute what the input does at inference:
`is_exact` runs both on a small probe batch (`probe`, inputs made from the
model's own input specs) and knows the one kernel switch Keras has (attention
leaves its fused kernel once its dropout is above 0); `max_difference` is
the number the kernel-switch warning reports.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np

from regularize.core.errors import UnsupportedModelError

# Keras attention layers that leave `ops.dot_product_attention` for explicit
# einsums (other last bits) as soon as their dropout is above 0.
KERNEL_SWITCH = tuple(
    getattr(keras.layers, name)
    for name in ("MultiHeadAttention", "GroupedQueryAttention")
    if hasattr(keras.layers, name)
)


def is_exact(old: keras.Model, new: keras.Model) -> bool:
    """Whether `new` computes what `old` does at inference.

    Known kernel switches are found in the layers themselves (a probe input
    can hide them: identical tokens make every attention weight equal); the
    probe batch then catches what is not known.
    """
    before = [x for x in old._flatten_layers() if isinstance(x, KERNEL_SWITCH)]
    after = [x for x in new._flatten_layers() if isinstance(x, KERNEL_SWITCH)]
    for a, b in zip(before, after, strict=False):
        if not attention_dropout(a) and attention_dropout(b):
            return False
    return same_outputs(old, new)


def attention_dropout(layer) -> float:
    return float(getattr(layer, "dropout", 0.0) or 0.0)


def probe(model: keras.Model):
    """A small input batch `model` runs on: masks of ones, ids of 0 and 1, floats.

    Unknown sizes: a batch of 2, 32 pixels of an image, and 8 steps of a
    sequence (ids, or features as Whisper's: its position embedding holds no
    more) unless the model fails on 8 steps: a raw waveform (Moonshine's
    stem strides 64, then 3 and 2, so it needs 895 samples) gets 1024.
    """
    length = _PROBE_LENGTHS.get(model)
    if length is None:
        length = SEQUENCE_LENGTHS[-1]
        for candidate in SEQUENCE_LENGTHS[:-1]:
            try:
                model(probe_batch(model, candidate), training=False)
            except Exception:  # the model's own error on too short an input; try longer
                continue
            length = candidate
            break
        _PROBE_LENGTHS[model] = length
    return probe_batch(model, length)


SEQUENCE_LENGTHS = (8, 1024)
# The sequence length each model was found to run on (checked once per model object).
_PROBE_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def probe_batch(model: keras.Model, length: int):
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


def same_outputs(old: keras.Model, new: keras.Model) -> bool:
    before, after = both_outputs(old, new)
    return len(before) == len(after) and all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )


def max_difference(old: keras.Model, new: keras.Model) -> float:
    """The largest absolute difference of the two models' outputs on the probe batch."""
    before, after = both_outputs(old, new)
    return max(
        (
            float(np.max(np.abs(a.astype("float64") - b.astype("float64"))))
            for a, b in zip(before, after, strict=True)
            if a.size
        ),
        default=0.0,
    )


def both_outputs(old: keras.Model, new: keras.Model):
    x = probe(old)
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
