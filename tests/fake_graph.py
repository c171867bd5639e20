"""A pure-Python `core.GraphView` base: the graph walk without Keras (tests of the core).

Nodes carry `op`, `parents` and `key`; each test module says how its ops read as
`LayerFacts` (and, where it differs, shapes and parents) in a small subclass.
"""

from __future__ import annotations


class FakeView:
    """`core.GraphView` over a list of nodes, read in that order."""

    default_data_format = "channels_last"

    def __init__(self, nodes, outputs):
        self._nodes = nodes
        self._outputs = outputs

    def nodes(self):
        return self._nodes

    def parents(self, node):
        return node.parents

    def operation(self, node):
        return node.op

    def input_keys(self, node):
        return [p.key for p in node.parents]

    def output_keys(self, node):
        return [node.key]

    def graph_outputs(self):
        return set(self._outputs)

    def training_flag(self, node):
        return getattr(node, "training", None)

    def casts_input(self, node):
        return False

    def sub_graph(self, op):
        return op.sub

    def config(self, op):
        return {"config": dict(getattr(op, "config", {}))}

    def layer_names(self):
        return {n.op.name for n in self._nodes}

    def class_names(self):
        return {n.op.kind.title() for n in self._nodes}

    def is_layer_class(self, name):
        return False

    def contains_normalization(self):
        return any(self.facts(n.op).is_normalization for n in self._nodes)

    def node_count(self):
        return len(self._nodes)
