"""What the parent and the Keras 2 engine's child say to each other. No Keras import.

A `Job` is one checked request: the parent builds it from the user's request
(`regularize.keras2._validate`), sends `to_dict()` as JSON, and the child
rebuilds it with `from_dict()`, which refuses anything else (a wrong type, a
missing or unknown key) in one line. The child answers with a `Result` or a
`Failure` per job.
"""

from __future__ import annotations

import dataclasses

from regularize.core.errors import RegularizeError
from regularize.core.mode import Mode


def _check(cls, data, types: dict) -> dict:
    """`data` as keyword arguments of `cls`, each key of its declared type."""
    if not isinstance(data, dict):
        raise RegularizeError(
            f"Invalid Keras 2 engine message. Expected a JSON object for {cls.__name__}. "
            f"Received: {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise RegularizeError(
            f"Invalid Keras 2 engine message: unknown keys {unknown} for {cls.__name__}. "
            f"Expected some of {sorted(types)}."
        )
    for key, allowed in types.items():
        if key in data and not isinstance(data[key], allowed):
            raise RegularizeError(
                f"Invalid Keras 2 engine message: `{key}` of {cls.__name__}. Expected "
                f"{' or '.join(t.__name__ for t in allowed)}. Received: {type(data[key]).__name__}"
            )
    return data


_STR = (str,)
_OPT_STR = (str, type(None))
_BOOL = (bool,)


@dataclasses.dataclass(frozen=True)
class Job:
    """One request for the child, checked by the parent (absolute paths)."""

    mode: Mode  # ADD or STRIP
    input: str
    output: str | None = None
    dry_run: bool = False
    policy: dict = dataclasses.field(default_factory=dict)
    policy_source: str = ""
    custom_objects: str | None = None
    custom_path: str | None = None  # where a custom-object module named by the user lives
    safe_mode: bool = True
    overwrite: bool = False
    to_keras3: bool = False
    reference: str | None = None  # `.npz` of sample inputs and outputs, for --to-keras3

    _TYPES = {
        "mode": _STR,
        "input": _STR,
        "output": _OPT_STR,
        "dry_run": _BOOL,
        "policy": (dict,),
        "policy_source": _STR,
        "custom_objects": _OPT_STR,
        "custom_path": _OPT_STR,
        "safe_mode": _BOOL,
        "overwrite": _BOOL,
        "to_keras3": _BOOL,
        "reference": _OPT_STR,
    }

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["mode"] = str(self.mode)
        return data

    @classmethod
    def from_dict(cls, data) -> Job:
        data = dict(_check(cls, data, cls._TYPES))
        for key in ("mode", "input"):
            if key not in data:
                raise RegularizeError(f"Invalid Keras 2 engine message: no `{key}` in Job.")
        if data["mode"] not in (Mode.ADD, Mode.STRIP):
            raise RegularizeError(
                "Invalid Keras 2 engine message: `mode` of Job. Expected 'add' or 'strip'. "
                f"Received: {data['mode']!r}"
            )
        data["mode"] = Mode(data["mode"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Result:
    """What one job did: its sites (as `dataclasses.asdict(Site)`), warnings, output."""

    sites: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    output: str | None = None

    _TYPES = {"sites": (list,), "warnings": (list,), "output": _OPT_STR}

    def to_dict(self) -> dict:
        return {"sites": list(self.sites), "warnings": list(self.warnings), "output": self.output}

    @classmethod
    def from_dict(cls, data) -> Result:
        return cls(**_check(cls, data, cls._TYPES))


@dataclasses.dataclass(frozen=True)
class Failure:
    """A job that raised: the error's class name and its one-line message."""

    error: str
    type: str = "RegularizeError"

    _TYPES = {"error": _STR, "type": _STR}

    def to_dict(self) -> dict:
        return {"error": self.error, "type": self.type}

    @classmethod
    def from_dict(cls, data) -> Failure:
        return cls(**_check(cls, data, cls._TYPES))


def answer_from_dict(data) -> Result | Failure:
    """A child's answer to one job."""
    if isinstance(data, dict) and "error" in data:
        return Failure.from_dict(data)
    return Result.from_dict(data)
