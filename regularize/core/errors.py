"""Errors a user can fix, and the one warning class the tool emits."""

from __future__ import annotations


class RegularizeError(Exception):
    """Base class for errors a user can fix."""


class PolicyError(RegularizeError, ValueError):
    """A rate or another policy setting is invalid."""


class UnsupportedModelError(RegularizeError, TypeError):
    """The model cannot be rewritten (subclassed, unbuilt, ...)."""


class ModelLoadError(RegularizeError, OSError):
    """A model file or folder cannot be read as a Keras model."""


class UnknownApplicationError(ModelLoadError):
    """A `keras.applications.NAME` input names no Keras Application (a bad argument)."""


class ModelSaveError(RegularizeError, OSError):
    """The rewritten model cannot be written where it was asked to go."""


class RegularizeWarning(UserWarning):
    """Something the user should know about the rewrite; nothing failed."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed (for one-line errors)."""
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines()[0].split())
