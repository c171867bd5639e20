"""What both engines share, without Keras: names, dropout kinds, RNN settings, texts.

The decision core (`regularize.core.walk`) places and names dropout by these
rules for both Keras APIs; its adapters (`regularize.keras3.rewrite` for Keras 3,
`regularize.keras2.rewrite` for tf_keras in its own process) and the MC and
CLI code use them too.
"""

from __future__ import annotations

import re

# Inserted layers are named `<anchor>__dropout` (`_<n>` added on a name clash),
# so a second run and `remove_dropout` recognise the tool's own work.
SUFFIX = "__dropout"
OWN_NAME = re.compile(re.escape(SUFFIX) + r"(_\d+)?$")

# Keras <= 3.15 lets the caller's `training` override a nested call's explicit
# `training=False` (keras-team/keras#23364 removes that), so dropout there would
# fire during `fit()`: the frozen base would not stay in the inference mode its
# caller asked for. Keras 2 honours the flag, and dropout there never fires.
INFERENCE_ONLY = "nested model always called with training=False: kept in inference mode"
CUDNN = (
    "recurrent dropout disables the cuDNN kernel on GPU: training and inference "
    "run the slower generic loop"
)
LSTM_KERNEL = (
    "recurrent dropout switches LSTM to its per-gate kernel (implementation=1): "
    "inference can differ from the original by float rounding (about 1e-7)"
)
# A Keras 2 `.h5` that Keras 3 reads is rewritten in Keras 3: the output predicts
# bit for bit what Keras 3 reads from the input, but tf_keras computes
# BatchNormalization on 4-D maps with its fused kernel (`fused_batch_norm`) and
# Keras 3 unfused, as `(x - mean) * rsqrt(var + eps) * gamma + beta`.
KERAS2_BATCHNORM = (
    "this Keras 2 `.h5` is read by Keras 3, whose BatchNormalization is not tf_keras's fused "
    "kernel: the new model predicts exactly what Keras 3 reads from the input, and can differ "
    "from the Keras 2 model's predictions by float rounding (about 2e-7 after one layer; 3e-5 "
    "at the output of a ResNet34 U-Net, 1e-4 of an FPN)"
)
LSTM_KERNEL_BACK = (
    "removing recurrent dropout switches LSTM back to its fused kernel (implementation=2): "
    "inference can differ from the original by float rounding (about 1e-7)"
)


def is_own_name(name: str) -> bool:
    """Whether `name` is the name of a dropout layer this tool inserted."""
    return bool(OWN_NAME.search(name))


def unique_name(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 1
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def dropout_kind(rank: int, data_format: str) -> str:
    """Dropout class for a tensor of `rank`: Spatial on feature maps."""
    if rank in (4, 5) or (rank == 3 and data_format == "channels_last"):
        return f"SpatialDropout{rank - 2}D"
    return "Dropout"  # rank 2, or a channels_first 1D map (a noise_shape Dropout)


def dropout_settings(config):
    """Yields every nested config dict that has RNN dropout settings.

    Covers LSTM/GRU/SimpleRNN/ConvLSTM*, `RNN(cell)`, `StackedRNNCells` and
    both directions of `Bidirectional`, whatever the nesting.
    """
    if isinstance(config, dict):
        if "dropout" in config and "recurrent_dropout" in config:
            yield config
        for value in config.values():
            yield from dropout_settings(value)
    elif isinstance(config, list):
        for value in config:
            yield from dropout_settings(value)


def has_lstm_cell(config) -> bool:
    """Whether a serialized layer config holds an LSTM (or LSTMCell)."""
    if isinstance(config, dict):
        if config.get("class_name") in ("LSTM", "LSTMCell"):
            return True
        return any(has_lstm_cell(v) for v in config.values())
    if isinstance(config, list):
        return any(has_lstm_cell(v) for v in config)
    return False


def returns_to_fused_lstm(config, settings) -> bool:
    """Whether clearing recurrent dropout gives an LSTM its fused kernel back.

    Keras 3 does not save the `implementation` that recurrent dropout forced
    to 1, so the rebuilt cell takes the fused kernel (2); tf_keras saves the 1
    and keeps it.
    """
    return has_lstm_cell(config) and any(s.get("implementation", 2) != 1 for s in settings)


def describe_rnn(values) -> str:
    """The `existing` column of an RNN site: its (dropout, recurrent_dropout)."""
    if values == (0.0, 0.0):
        return ""
    return f"dropout={values[0]:g}, recurrent_dropout={values[1]:g}"


def describe_change(old, new) -> str:
    """The reason of an RNN site, e.g. "dropout 0 -> 0.3, recurrent_dropout=0"."""
    parts = []
    for name, a, b in zip(("dropout", "recurrent_dropout"), old, new, strict=True):
        parts.append(f"{name}={b:g}" if a == b else f"{name} {a:g} -> {b:g}")
    return ", ".join(parts)
