"""The small protocols between the decision core and a Keras API.

A `GraphView` reads one layer graph (a Functional model, or a Sequential
one's graph); a `Builder` replays it with the same layer objects and applies
the walk's actions. Nodes, operations and tensor keys are opaque to the
core: it only compares them and hands them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import Protocol

from regularize.core.actions import Insert
from regularize.core.actions import Rebuild
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.owned import Key


@dataclasses.dataclass(frozen=True)
class LayerFacts:
    """What the decisions need to know about one layer (operation).

    Attributes:
        name: The layer's name.
        class_name: Its class name, the one rules match (for a tfmot wrapper:
            the wrapped layer's class, so `class = "Dense"` matches a pruned
            Dense too).
        wrapper: The class of the wrapper around it (tfmot), or None.
        activation: The non-linearity it ends with ("relu", ...), or None.
        trainable: Its `trainable` flag.
        is_graph_model: A nested Functional or Sequential model.
        is_dropout: A dropout layer (Dropout, Spatial*, Gaussian*, Alpha*),
            wrapped or not.
        is_own_dropout: A dropout layer this tool inserted (by its name).
        is_recurrent: An RNN layer or a Bidirectional one.
        is_batchnorm: A BatchNormalization layer.
        is_merge: An `Add` or a `Concatenate` (closes a block).
        is_activation_layer: A standalone activation layer (ReLU, Activation, ...).
        is_normalization: A normalization layer, or a nested model holding one.
        is_add: An `Add` layer or an add operation (`x + y`): a residual merge
            where its two inputs share an ancestor (drop path).
        is_own_drop_path: A drop-path layer this tool inserted (by its name).
        rate: A dropout layer's rate, else None.
        noise_shape: A dropout layer's `noise_shape`, else None.
        data_format: The `data_format` it declares, else None.
        owned: The dropout settings in its own config (`core.owned.find_keys`);
            such a layer is rebuilt with new values, not followed by dropout.
        attention_kernel: For a layer that is or holds Keras 3 attention
            (MultiHeadAttention, GroupQueryAttention): "fused" while its
            dropout is 0 (Keras then calls `ops.dot_product_attention`),
            "explicit" above 0 (einsums): moving between them changes
            inference by float rounding. None otherwise (tf_keras always
            computes attention the explicit way).
        rebuild_refusal: Why the layer cannot be rebuilt from its config
            (quantized or LoRA-enabled sublayers, whose state the config does
            not hold), else None.
        inner_activation: The `activation` of a layer that is not one of the
            Keras API's own (a composite block): it applies it inside, not to
            its output, so it is no activation site.
        starts_tokens: An Embedding or attention layer (or a block holding
            one): the rank-3 tensors after it are token states, not channel
            maps.
    """

    name: str
    class_name: str
    activation: str | None = None
    trainable: bool = True
    wrapper: str | None = None
    is_graph_model: bool = False
    is_dropout: bool = False
    is_own_dropout: bool = False
    is_recurrent: bool = False
    is_batchnorm: bool = False
    is_merge: bool = False
    is_activation_layer: bool = False
    is_normalization: bool = False
    is_add: bool = False
    is_own_drop_path: bool = False
    rate: float | None = None
    noise_shape: tuple | None = None
    data_format: str | None = None
    owned: tuple[Key, ...] = ()
    rebuild_refusal: str | None = None
    inner_activation: str | None = None
    starts_tokens: bool = False
    attention_kernel: str | None = None

    @property
    def label(self) -> str:
        """`Dense`, or `PruneLowMagnitude(Dense)` for a wrapped layer (the report's class)."""
        return f"{self.wrapper}({self.class_name})" if self.wrapper else self.class_name


class GraphView(Protocol):
    """Read-only access to one layer graph."""

    default_data_format: str  # the API's image data format, where no layer says

    def nodes(self) -> Sequence[Any]:
        """The call nodes from the inputs to the outputs (input nodes left out)."""

    def parents(self, node) -> Sequence[Any]:
        """The nodes whose outputs `node` reads."""

    def operation(self, node) -> Any:
        """The layer `node` calls."""

    def input_keys(self, node) -> Sequence[Hashable]:
        """Keys of the tensors `node` reads."""

    def output_keys(self, node) -> Sequence[Hashable]:
        """Keys of the tensors `node` makes (flat)."""

    def graph_outputs(self) -> Sequence[Hashable]:
        """Keys of the graph's output tensors, in the order of a call's outputs
        (`output_keys` of a node that calls this graph as a nested model)."""

    def out_shape(self, node) -> tuple | None:
        """Shape of the first output of `node`, None if it has none."""

    def training_flag(self, node) -> bool | None:
        """The `training=` argument of the call, None if not given."""

    def casts_input(self, node) -> bool:
        """Whether the layer at `node` casts its input to another dtype."""

    def sub_graph(self, op) -> GraphView | None:
        """The view of a nested model's graph; None where it is not built."""

    def facts(self, op) -> LayerFacts: ...

    def config(self, op) -> dict:
        """A fresh serialized config of `op` (the walk may change it)."""

    def layer_config(self, config: dict) -> dict:
        """The `get_config()` inside the serialized config `config` (edited in place)."""

    def probe(self, config: dict) -> dict:
        """The `get_config()` of a new layer made from `config`; raises if none can be made."""

    def layer_names(self) -> set[str]:
        """Names of the layers of this graph."""

    # The whole model (asked of the top graph only).

    def class_names(self) -> set[str]:
        """Class names of every layer, nested models included."""

    def is_layer_class(self, name: str) -> bool:
        """Whether `name` names a layer class of the API (or a registered custom one)."""

    def contains_normalization(self) -> bool: ...

    def node_count(self) -> int: ...


class GraphBuilder(Protocol):
    """Replays one graph, node by node, as the walk decides."""

    def call(self, node, op) -> None:
        """Calls `op` (the original layer, or a nested model's rewrite) as `node` did."""

    def insert(self, node, action: Insert) -> None:
        """Applies the dropout of `action` to the output of the node just called."""

    def retarget(self, node, action: Retarget) -> None:
        """Calls the replacement of the dropout layer at `node`."""

    def remove(self, node, action: Remove) -> None:
        """Passes the input of the dropout layer at `node` through."""

    def rebuild(self, node, action: Rebuild) -> None:
        """Calls the rebuilt layer at `node` (an RNN or a layer that owns its
        dropout; rebuilt at its first call)."""

    def finish(self, *, changed: bool, top: bool) -> Any:
        """The new model (or the old one where nothing changed and it is nested)."""


class Builder(Protocol):
    def graph(self, view: GraphView) -> GraphBuilder:
        """A builder for the graph `view` reads (the top one or a nested model's)."""
