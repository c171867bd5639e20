"""The part of a `GraphBuilder` every Keras API shares: which layer each node calls.

A replay calls the *same* layer objects on new symbolic tensors, node by
node, so the new model shares the input's variables. What is common is the
bookkeeping: new tensors by key, one new dropout layer per anchor (a shared
layer's calls share it), one replacement per re-targeted dropout, one
rebuilt copy per RNN (its weights carried over at its first call), the
layers in call order for a Sequential model. An adapter subclasses
`GraphReplay` with its API's calls (`arguments`, `make_dropout`, ...).
"""

from __future__ import annotations

from regularize.core.actions import Insert
from regularize.core.actions import Rebuild
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.refusals import weights_differ


class Layers:
    """The new layers of one rewrite, shared by the graphs it replays (a `core.Builder`)."""

    def __init__(self, replay: type[GraphReplay]):
        self.replay = replay
        self.new: dict = {}  # (id(anchor), name), id(old dropout or RNN) -> new layer
        self.casts: dict[int, object] = {}  # id(node) -> identity layer

    def graph(self, view) -> GraphReplay:
        return self.replay(self, view)


class GraphReplay:
    """Replays one graph; subclasses supply the API's calls."""

    def __init__(self, layers: Layers, view):
        self.layers = layers
        self.view = view
        self.tensors: dict = self.input_tensors()
        self.sequence: list = []  # layers in call order, for Sequential
        self.last = None  # what the node replayed last returned

    # -- the API's side ---------------------------------------------------

    def input_tensors(self) -> dict:
        """The graph's input tensors by key."""
        raise NotImplementedError

    def arguments(self, node) -> tuple[list, dict]:
        """The call arguments of `node` with the new tensors filled in."""
        raise NotImplementedError

    def flatten(self, outputs) -> list:
        raise NotImplementedError

    def make_dropout(self, action: Insert | Retarget, name: str):
        raise NotImplementedError

    def make_identity(self, layer):
        """An identity layer with the name and dtype policy of `layer`."""
        raise NotImplementedError

    def from_config(self, config: dict):
        raise NotImplementedError

    def build_model(self):
        """The new model from the replayed tensors (or `self.sequence`)."""
        raise NotImplementedError

    # -- the builder ------------------------------------------------------

    def _replay(self, node, op) -> None:
        args, kwargs = self.arguments(node)
        self.sequence.append(op)
        self._record(node, op(*args, **kwargs))

    def _record(self, node, outputs) -> None:
        self.last = outputs
        keys = self.view.output_keys(node)
        for key, new in zip(keys, self.flatten(outputs), strict=True):
            self.tensors[key] = new

    def _once(self, key: int, make):
        if key not in self.layers.new:
            self.layers.new[key] = make()
        return self.layers.new[key]

    def call(self, node, op) -> None:
        self._replay(node, op)

    def insert(self, node, action: Insert) -> None:
        # By anchor and name: a drop path and a dropout may follow the same anchor,
        # and layers of one name may sit in different nested models.
        key = (id(action.anchor), action.name)
        dropout = self._once(key, lambda: self.make_dropout(action, action.name))
        self.sequence.append(dropout)
        self._record(node, dropout(self.last))

    def retarget(self, node, action: Retarget) -> None:
        name = action.layer.name
        self._replay(node, self._once(id(action.layer), lambda: self.make_dropout(action, name)))

    def remove(self, node, action: Remove) -> None:
        args, _ = self.arguments(node)
        if not action.cast:
            return self._record(node, args[0])
        # A mixed-precision dropout also casts its input (float32 ->
        # float16); an identity layer of the same dtype policy keeps that
        # cast, so inference does not change.
        if id(node) not in self.layers.casts:
            self.layers.casts[id(node)] = self.make_identity(action.layer)
        cast = self.layers.casts[id(node)]
        self.sequence.append(cast)
        self._record(node, cast(args[0]))

    def rebuild(self, node, action: Rebuild) -> None:
        fresh = id(action.layer) not in self.layers.new
        new = self._once(id(action.layer), lambda: self.from_config(action.config))
        self._replay(node, new)  # builds `new` on its first call
        if fresh:
            copy_weights(action.layer, new)

    def finish(self, *, changed: bool, top: bool):
        if not changed and not top:
            return self.view.model
        new = self.build_model()
        # Set the flag itself: the `trainable` setter would recurse into the
        # shared layers and their variables, which already carry their own
        # flags (a frozen base may hold layers unfrozen one by one).
        new._trainable = self.view.model._trainable
        return new


def copy_weights(old, new) -> None:
    """Carries the weights over exactly; the configs are equal but for dropout.

    The `trainable` flags of the sublayers come along too (a transformer block
    whose attention the user froze): the config holds only the layer's own.
    """
    values = old.get_weights()
    shapes = [w.shape for w in values]
    new_shapes = [w.shape for w in new.get_weights()]
    if new_shapes != shapes:
        raise weights_differ(old.name, shapes, new_shapes)
    new.set_weights(values)
    olds, news = list(old._flatten_layers()), list(new._flatten_layers())
    if len(olds) == len(news):
        # Outer layers first: setting a layer's flag sets its sublayers' too.
        for before, after in zip(olds, news, strict=True):
            if after.trainable != before.trainable:
                after.trainable = before.trainable
