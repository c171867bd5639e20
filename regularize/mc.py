"""Monte Carlo dropout: predictions with dropout active, and layers that keep it on.

`mc_predict` samples a model's predictions with its dropout layers active and
everything else (BatchNormalization above all) in inference mode. It does so
through a twin model that shares every layer object of the input, hence every
variable, except the dropout-family layers, which become their `MC*` twins.

Why twins and not `model(x, training=True)`: that would also switch
BatchNormalization to batch statistics (and update its moving statistics when
fitting). Why not `Dropout(...)(x, training=True)` in the graph: in Keras 3
(3.15 at least) `Functional.call` overrides an explicit `training=` of every
node with the caller's value, so `predict()` turns it off again. The `MC*`
classes ignore `training` altogether.

The `MC*` classes (`regularize.keras3.mc_layers`, re-exported here) are registered
with Keras (package "regularize"): a model file that holds them loads with
`keras.models.load_model` once this module has been imported (`import regularize.mc`).
"""

from __future__ import annotations

import sys
import warnings
import weakref

import keras
import numpy as np
from keras import tree

from regularize.core.errors import RegularizeWarning
from regularize.core.errors import UnsupportedModelError
from regularize.keras3 import graph
from regularize.keras3.mc_layers import _KERAS_TO_MC
from regularize.keras3.mc_layers import _MC_TYPES
from regularize.keras3.mc_layers import MC_CLASSES as MC_CLASSES
from regularize.keras3.mc_layers import MCAlphaDropout as MCAlphaDropout
from regularize.keras3.mc_layers import MCDropout as MCDropout
from regularize.keras3.mc_layers import MCGaussianDropout as MCGaussianDropout
from regularize.keras3.mc_layers import MCSpatialDropout1D as MCSpatialDropout1D
from regularize.keras3.mc_layers import MCSpatialDropout2D as MCSpatialDropout2D
from regularize.keras3.mc_layers import MCSpatialDropout3D as MCSpatialDropout3D
from regularize.keras3.mc_layers import make_mc

# model -> (ids of its layers when the twin was built, twin, any dropout?):
# building a twin adds one call node to every shared layer, so calls reuse it.
_twins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mc_predict(
    model: keras.Model,
    x,
    samples: int = 30,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
):
    """Mean and standard deviation of `samples` predictions with dropout active.

    Dropout, SpatialDropout1D/2D/3D, GaussianDropout and AlphaDropout layers
    (in nested models too) sample a new mask on every pass; every other layer
    runs in inference mode, so BatchNormalization uses, and keeps, its moving
    statistics. The model is not changed: the passes run through a twin that
    shares its layers and variables.

    Each batch is passed `samples` times before the next one is read, so a
    shuffling `tf.data.Dataset` is fine. Dropout inside a nested model is
    sampled even where the model is called with `training=False`: Keras 3
    (up to 3.15 at least) overrides that flag in `fit()` too, so that
    dropout was active in training. RNN `dropout` / `recurrent_dropout` is
    not sampled (a `RegularizeWarning` says so).

    Args:
        model: A Functional or Sequential model (built).
        x: Input data as `predict_on_batch` takes it: an array, a list or dict
            of arrays, or a `tf.data.Dataset` / `keras.utils.PyDataset`
            yielding batches (`x` or `(x, y[, sample_weight])`).
        samples: How many stochastic passes, an int >= 1.
        batch_size: Batch size for array input. Default 32.
        seed: Seeds the dropout masks, for repeatable results.

    Returns:
        `(mean, std)`, NumPy arrays (or the model's output structure of them)
        shaped like the model's predictions. `std` is the population standard
        deviation over the samples; it is 0 where no dropout is active.

    Raises:
        ValueError: `samples` or `batch_size` is not a positive int.
        UnsupportedModelError: The model is subclassed or not built.

    Example:
        >>> mean, std = regularize.mc_predict(model, x_test, samples=50)
        >>> uncertain = std.max(axis=-1) > 0.2
    """
    _check_positive_int("samples", samples)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    twin, stochastic = _twin_for(model)
    if not stochastic:
        warnings.warn(
            f"Model {model.name!r} has no dropout layer that `mc_predict` can sample: "
            "every prediction is the same and the std is 0.",
            RegularizeWarning,
            stacklevel=2,
        )
    if seed is not None:
        _reseed(twin, seed)
    means, stds = [], []
    for batch, size in _batches(x, batch_size or 32):
        mean, std = _sample(twin, batch, samples)
        means.append(tree.map_structure(lambda a, n=size: a[:n], mean))
        stds.append(tree.map_structure(lambda a, n=size: a[:n], std))
    if not means:
        raise ValueError(f"`x` holds no samples. Received: x={type(x).__name__}")
    return _concat(means), _concat(stds)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Invalid `{name}`. Expected an int >= 1. Received: {name}={value!r}")


def _twin_for(model: keras.Model) -> tuple[keras.Model, bool]:
    """The cached twin of `model`, and whether any of its layers is stochastic."""
    if not isinstance(model, keras.Model) or not graph.is_graph_model(model):
        raise UnsupportedModelError(
            f"Cannot sample subclassed model {type(model).__name__!r}: its layer graph "
            "is not recorded, so its dropout layers cannot be swapped. Use the `MC*` "
            "layers of `regularize.mc` in its code instead."
        )
    key = tuple(id(layer) for layer in model.layers)
    cached = _twins.get(model)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    found = []
    twin = _twin_of(_view(model), found)
    _warn_unsampled(model)
    _twins[model] = (key, twin, bool(found))
    return twin, bool(found)


def _view(model: keras.Model) -> keras.Model:
    """An uncompiled Functional model over `model`'s own graph (same layers).

    `clone_model` compiles its result like the input, building a second
    optimizer (Adam: two slots per weight); a view has nothing to compile.
    """
    fn = graph.graph_of(model)
    if fn is None:
        raise UnsupportedModelError(
            f"Cannot sample model {model.name!r}: it is not built, so it has no "
            "layer graph yet. Give it an `Input(shape=...)` or call it once first."
        )
    return keras.Model(fn.input, fn.output, name=model.name)


def _twin_of(view: keras.Model, found: list) -> keras.Model:
    """Clones the graph of `view` onto the same layers, dropout swapped for MC."""

    def clone_function(layer):
        if type(layer) in _KERAS_TO_MC:
            twin = make_mc(layer)
            found.append(twin)
            return twin
        if isinstance(layer, _MC_TYPES):
            found.append(layer)
            return layer
        if graph.is_graph_model(layer) and _has_dropout(layer):
            # A nested model is swapped too, even one called with
            # `training=False`: Keras 3 overrides that flag with the caller's
            # (see the module docstring), so its dropout was active in fit().
            return _twin_of(_view(layer), found)
        return layer  # shared: same object, same variables

    return keras.models.clone_model(view, clone_function=clone_function)


def _has_dropout(model: keras.Model) -> bool:
    for layer in model.layers:
        if isinstance(layer, (*_KERAS_TO_MC, *_MC_TYPES)):
            return True
        if graph.is_graph_model(layer) and _has_dropout(layer):
            return True
    return False


def _warn_unsampled(model: keras.Model) -> None:
    """Warns about dropout that the twin cannot make stochastic."""
    for layer in _walk(model):
        if (graph.is_recurrent(layer) and _has_rnn_dropout(layer.get_config())) or (
            isinstance(layer, graph.DROPOUT_CLASSES)
            and type(layer) not in _KERAS_TO_MC
            and not isinstance(layer, _MC_TYPES)
        ):
            warnings.warn(
                f"Layer {layer.name!r} ({type(layer).__name__}) keeps its dropout off in "
                "`mc_predict`: only Dropout, SpatialDropout1D/2D/3D, GaussianDropout and "
                "AlphaDropout layers are sampled.",
                RegularizeWarning,
                stacklevel=4,
            )


def _has_rnn_dropout(config) -> bool:
    """Whether an RNN config (cells and wrapped layers included) sets any dropout."""
    if isinstance(config, dict):
        if any(config.get(key) for key in ("dropout", "recurrent_dropout")):
            return True
        return any(_has_rnn_dropout(value) for value in config.values())
    if isinstance(config, (list, tuple)):
        return any(_has_rnn_dropout(value) for value in config)
    return False


def _walk(model: keras.Model):
    for layer in model.layers:
        yield layer
        if graph.is_graph_model(layer):
            yield from _walk(layer)


def _reseed(twin: keras.Model, seed: int) -> None:
    """Restarts every MC layer's random stream at a seed derived from `seed`."""
    for offset, layer in enumerate(_mc_layers(twin)):
        state = layer.seed_generator.state
        state.assign(np.array([seed + offset, 0], dtype=state.dtype))


def _mc_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, _MC_TYPES):
            yield layer
        elif graph.is_graph_model(layer):
            yield from _mc_layers(layer)


def _batches(x, batch_size: int):
    """Yields `(inputs, rows)`: a batch and how many of its rows are real."""
    if _is_dataset(x):
        for element in x:
            inputs, _, _ = keras.utils.unpack_x_y_sample_weight(element)
            if keras.backend.backend() != "tensorflow":
                # tf.data yields TensorFlow tensors; JAX and PyTorch take arrays.
                inputs = tree.map_structure(np.asarray, inputs)
            yield inputs, None
        return
    flat = tree.flatten(x)
    if not flat:
        return
    size = len(flat[0])
    for start in range(0, size, batch_size):
        rows = min(batch_size, size - start)
        batch = tree.map_structure(lambda a, s=start: np.asarray(a[s : s + batch_size]), x)
        if rows < batch_size and size > batch_size:
            # A short last batch would trace the predict function once more.
            batch = tree.map_structure(lambda a: _pad_rows(a, batch_size), batch)
        yield batch, rows


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def _is_dataset(x) -> bool:
    if isinstance(x, keras.utils.PyDataset):
        return True
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)


def _sample(twin: keras.Model, batch, samples: int):
    """Welford's running mean and variance over `samples` passes of one batch."""
    mean = m2 = None
    for n in range(1, samples + 1):
        out = tree.map_structure(
            lambda t: np.asarray(t, dtype=np.float64), twin.predict_on_batch(batch)
        )
        if mean is None:
            mean = out
            m2 = tree.map_structure(np.zeros_like, out)
            continue
        delta = tree.map_structure(np.subtract, out, mean)
        mean = tree.map_structure(lambda m, d, n=n: m + d / n, mean, delta)
        m2 = tree.map_structure(lambda acc, d, o, m: acc + d * (o - m), m2, delta, out, mean)
    std = tree.map_structure(lambda acc: np.sqrt(acc / samples), m2)
    return mean, std


def _concat(parts: list):
    # Accumulated in float64; handed back as float32, Keras' default float.
    return tree.map_structure(
        lambda *arrays: np.concatenate(arrays, axis=0).astype(np.float32), *parts
    )
