"""The one `Mode`: what a run does to a model, on either engine and in the walk."""

from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    """What a run does to the model."""

    ADD = "add"  # add or re-target dropout per the policy
    STRIP = "strip"  # remove every dropout layer, RNN dropout to 0 (remove_dropout)
    PLAN = "plan"  # decide every site as ADD would; build and write nothing
