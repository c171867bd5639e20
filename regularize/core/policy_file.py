"""Reading a policy file and checking its values: one clear line for each mistake.

`read_toml` reads a TOML file safely (a regular file only, never a FIFO or a device, of
bounded size); the checkers turn a wrong value into a `PolicyError` that names the key,
what was expected and what was received. Pure Python.
"""

from __future__ import annotations

import errno
import os
import stat
import tomllib
from collections.abc import Mapping

from regularize.core.errors import PolicyError
from regularize.core.rules import validate_rate
from regularize.core.text import short_repr


def read_toml(path: str | os.PathLike) -> dict:
    """The TOML table in the regular file at `path`; every failure a one-line `PolicyError`."""
    received = f"Expected a TOML file. Received: {short_repr(os.fspath(path), 300)}"
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise PolicyError(f"Cannot read policy file: {_not_a_file(mode)}. {received}")
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PolicyError(f"Cannot read policy file: no such file. {received}") from None
    except OSError as err:
        raise PolicyError(f"Cannot read policy file: {_os_reason(err)}. {received}") from None
    with open(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise PolicyError(f"Cannot read policy file: {_not_a_file(mode)}. {received}")
        try:
            return tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(
                f"Cannot read policy file {str(path)!r}: not valid TOML ({err}). "
                "Expected `key = value` lines and [[rule]] tables."
            ) from err
        except RecursionError:
            # tomllib parses nested arrays and inline tables recursively.
            raise PolicyError(
                f"Cannot read policy file {str(path)!r}: it nests arrays or tables too "
                "deeply to parse. Expected `key = value` lines and [[rule]] tables."
            ) from None
        except OSError as err:
            raise PolicyError(f"Cannot read policy file: {_os_reason(err)}. {received}") from None


def _not_a_file(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "it is a folder"
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"it is {kind}, not a regular file"


def _os_reason(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "a name in its path is too long for the file system (at most 255 bytes)"
    if err.errno == errno.ELOOP:
        return "its path is a symlink loop"
    return (err.strerror or type(err).__name__).lower()


def check_rate(name: str, value, where: str, allow_none: bool = False) -> float | None:
    try:
        return validate_rate(name, value, allow_none=allow_none)
    except PolicyError:
        raise PolicyError(
            f"Invalid `{name}`{where}. Expected a float in [0, 1). "
            f"Received: {name}={short_repr(value)}"
        ) from None


def check_choice(name: str, value, allowed: tuple, where: str) -> str:
    if value not in allowed:
        raise PolicyError(
            f"Invalid `{name}`{where}. Expected one of {', '.join(map(repr, allowed))}. "
            f"Received: {name}={short_repr(value)}"
        )
    return value


def check_flag(name: str, value, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(
            f"Invalid `{name}`{where}. Expected true or false. Received: {name}={short_repr(value)}"
        )
    return value


def check_no_unknown(data: Mapping, known: tuple, what: str, where: str) -> None:
    for key in data:
        if key not in known:
            bare = isinstance(key, str) and key.isidentifier() and len(key) <= 40
            name = key if bare else short_repr(key, 40)
            raise PolicyError(
                f"Unknown {what} {short_repr(key, 40)}{where}. Expected one of "
                f"{', '.join(known)}. Received: {name}={short_repr(data[key])}"
            )


def check_schedule(value, where: str) -> tuple[float, float]:
    if isinstance(value, Mapping):
        check_no_unknown(value, ("start", "end"), "schedule key", where)
        if set(value) != {"start", "end"}:
            raise PolicyError(
                f"Invalid `schedule`{where}. Expected both `start` and `end`. "
                f"Received: schedule={short_repr(dict(value))}"
            )
        value = (value["start"], value["end"])
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PolicyError(
            f"Invalid `schedule`{where}. Expected start and end rates. "
            f"Received: schedule={short_repr(value)}"
        )
    return (
        check_rate("schedule.start", value[0], where),
        check_rate("schedule.end", value[1], where),
    )
