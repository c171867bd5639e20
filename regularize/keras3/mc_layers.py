"""The Monte Carlo dropout layers: Keras' dropout family, always on.

Each `MC*` class ignores `training` (see `regularize.mc` for why twins and not
`training=True`). They are registered with Keras under the package "regularize", so a
file that holds them loads once this module has been imported; `regularize.mc`, which
users import, imports it. They live in the Keras 3 adapter because its loader
(`io`) and its rebuild (`rewrite`, for `add-dropout --mc`) need them.
"""

from __future__ import annotations

import keras

_PACKAGE = "regularize"


def _always_on(base: type[keras.layers.Layer]) -> type[keras.layers.Layer]:
    """`MC<base>`: `base` with `call` always in training mode, registered with Keras."""

    def call(self, inputs, training=None):
        return base.call(self, inputs, training=True)

    cls = type(
        "MC" + base.__name__,
        (base,),
        {
            "call": call,
            "__doc__": f"`{base.__name__}` that stays active at inference (Monte Carlo dropout).",
            "__module__": __name__,
        },
    )
    return keras.saving.register_keras_serializable(package=_PACKAGE)(cls)


MCDropout = _always_on(keras.layers.Dropout)
MCSpatialDropout1D = _always_on(keras.layers.SpatialDropout1D)
MCSpatialDropout2D = _always_on(keras.layers.SpatialDropout2D)
MCSpatialDropout3D = _always_on(keras.layers.SpatialDropout3D)
MCGaussianDropout = _always_on(keras.layers.GaussianDropout)
MCAlphaDropout = _always_on(keras.layers.AlphaDropout)


# Keras class name -> its always-on twin (for `add-dropout --mc`).
MC_CLASSES: dict[str, type[keras.layers.Layer]] = {
    "Dropout": MCDropout,
    "SpatialDropout1D": MCSpatialDropout1D,
    "SpatialDropout2D": MCSpatialDropout2D,
    "SpatialDropout3D": MCSpatialDropout3D,
    "GaussianDropout": MCGaussianDropout,
    "AlphaDropout": MCAlphaDropout,
}
# Exact Keras classes only: a user's own Dropout subclass may do more than
# drop units, and replacing it by a plain twin would lose that.
_KERAS_TO_MC = {getattr(keras.layers, name): mc for name, mc in MC_CLASSES.items()}
_MC_TYPES = tuple(MC_CLASSES.values())


def make_mc(layer: keras.layers.Layer, seed: int | None = None) -> keras.layers.Layer:
    """The always-on twin of a Keras dropout-family layer, same config and name.

    Args:
        layer: A Dropout, SpatialDropout1D/2D/3D, GaussianDropout or
            AlphaDropout layer (exact Keras class).
        seed: Overrides the layer's seed.

    Raises:
        TypeError: `layer` is not one of those classes.
    """
    mc_class = _KERAS_TO_MC.get(type(layer))
    if mc_class is None:
        raise TypeError(
            "Expected a Keras Dropout, SpatialDropout1D/2D/3D, GaussianDropout or "
            f"AlphaDropout layer. Received: layer of type {type(layer).__name__!r}"
        )
    config = layer.get_config()
    if seed is not None:
        config["seed"] = seed
    return mc_class.from_config(config)
