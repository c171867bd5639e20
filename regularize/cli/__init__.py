"""The `regularize` command line: `regularize.cli.main` is the console script.

Modules: `runtime` (one-line errors, Ctrl-C, progress, the quiet TensorFlow
import: what every command shares), `options` (shared options and the checks
that run before TensorFlow loads), `commands` (add-dropout, remove-dropout,
inspect) and `sweep`. None imports TensorFlow at module level.
"""

from __future__ import annotations

from regularize.cli.commands import cli
from regularize.cli.commands import main
from regularize.cli.options import MODEL_SUFFIXES
from regularize.cli.runtime import Interrupted
from regularize.cli.runtime import _progress
from regularize.cli.runtime import _quiet
from regularize.cli.runtime import _signal_of
from regularize.cli.runtime import _terminate
from regularize.cli.runtime import check_path
from regularize.cli.runtime import import_keras_quietly
from regularize.cli.runtime import one_line_errors

__all__ = [
    "MODEL_SUFFIXES",
    "Interrupted",
    "_progress",
    "_quiet",
    "_signal_of",
    "_terminate",
    "check_path",
    "cli",
    "import_keras_quietly",
    "main",
    "one_line_errors",
]
