"""The Keras-free, TensorFlow-free core: every decision, once, for both engines.

What it owns:
- the policy and its presets (`policy`), the shared names and texts (`terms`, `text`), the
  records and the report (`report`), the errors (`errors`);
- the walk that decides every site for dropout (`walk`) and drop path (`droppath`), with its
  helpers (`replay`, `gates`, `owned`, `guards`, `refusals`, `actions`) and the protocols an
  engine implements to be walked (`protocols`);
- a model constructor's dropout arguments, decided from the policy (`arguments`: keras-hub);
- the model-file checker (`checker`, `allowlist`, `budget`, `keras2_ops`, `opsize`,
  `safety`), input kinds (`kinds`, `inputs`, `preset_folder` for keras-hub preset folders),
  the output rule (`paths`), atomic writes (`atomic`) and `--custom-objects`
  (`custom_objects`).

What it may import: the standard library and h5py (to read file
attributes without building anything). Never keras, tensorflow, tf_keras or tfmot (an
import-linter contract in the test command checks this).

`walk(view, policy, mode, builder)` reads a layer graph through a `GraphView` and decides
every site: it returns the `Site` records and the changes it made (`Insert`, `Retarget`,
`Remove`, `Rebuild`). With a `Builder` it also has the new model built, node by node;
without one it only plans. Each Keras API gets a thin adapter: `regularize.keras3.rewrite`
(Keras 3) and `regularize.keras2.rewrite` (tf_keras, in the Keras 2 engine's process).
"""

from __future__ import annotations

from regularize.core.actions import Insert
from regularize.core.actions import Rebuild
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.protocols import Builder
from regularize.core.protocols import GraphBuilder
from regularize.core.protocols import GraphView
from regularize.core.protocols import LayerFacts
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
