"""The rewrite's decisions, once, for every Keras API (no Keras import here).

`walk(view, policy, mode, builder)` reads a layer graph through a `GraphView`
and decides every site: it returns the `Site` records and the changes it
made (`Insert`, `Retarget`, `Remove`, `Rebuild`). With a `Builder` it also
has the new model built, node by node; without one it only plans. Each Keras
API gets a thin adapter: `regularize.rewrite` (Keras 3) and
`regularize.legacy.rewrite` (tf_keras, in the Keras 2 engine's process).
"""

from __future__ import annotations

from regularize.core.actions import Insert
from regularize.core.actions import Rebuild
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.graph import Builder
from regularize.core.graph import GraphBuilder
from regularize.core.graph import GraphView
from regularize.core.graph import LayerFacts
from regularize.core.walk import Mode
from regularize.core.walk import Result
from regularize.core.walk import walk

__all__ = [
    "Builder",
    "GraphBuilder",
    "GraphView",
    "Insert",
    "LayerFacts",
    "Mode",
    "Rebuild",
    "Remove",
    "Result",
    "Retarget",
    "walk",
]
