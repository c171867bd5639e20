"""Atomic writes: a file or folder at its path is whole or absent. No Keras import.

Both engines write through these: the Keras 3 saver (`regularize.keras3.io`) and
the Keras 2 engine's child (`regularize.keras2.engine`). The new content goes
to a temporary name beside the output, then is renamed over it. A rename
replaces a symbolic link at the output itself, never what the link points
to, so an output symlink is never followed.

Temporary names are `.<stem>.<pid>.<random>.tmp<suffix>`, with the stem cut so
that the name fits the file system's 255-byte limit; `temp_pattern` matches
them, so that a later save can remove what a killed one left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
TMP = ".tmp"
_RANDOM = 8  # characters tempfile adds


def umask() -> int:
    """The process umask, read without changing it for longer than a moment."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_parts(path: Path) -> tuple[str, str]:
    """The (prefix, suffix) of a temporary name for `path`, within NAME_MAX."""
    stem = path.stem if path.suffix else path.name
    suffix = TMP + path.suffix
    fixed = f"..{os.getpid()}.." + "x" * _RANDOM + suffix
    room = NAME_MAX - len(fixed.encode())
    cut = stem.encode()[: max(room, 1)].decode("utf-8", errors="ignore") or "m"
    return f".{cut}.{os.getpid()}.", suffix


def temp_pattern(path: Path) -> re.Pattern:
    """Matches the temporary names any process gives `path` (group 1: its pid)."""
    prefix, suffix = _temp_parts(path)
    cut = prefix[1:].rsplit(".", 2)[0]
    return re.compile(re.escape(f".{cut}.") + r"(\d+)\.[^.]+" + re.escape(suffix))


def write_file(
    path: Path,
    write: Callable[[str], None],
    *,
    check: Callable[[str], None] | None = None,
) -> None:
    """Calls `write(tmp)` on a temporary file beside `path`, then renames it over `path`.

    The file gets the mode a plain `open()` would give it. On any failure or
    interruption the temporary file is removed and `path` is as it was.

    Args:
        path: Where the file goes.
        write: Writes the content to the temporary path it is given.
        check: Called with the temporary path once it is written, before the
            rename: whatever it raises stops the publication (a file that
            would not load again is never published).
    """
    prefix, suffix = _temp_parts(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_folder(
    path: Path,
    write: Callable[[str], None],
    *,
    check: Callable[[str], None] | None = None,
) -> None:
    """Calls `write(tmp)` on a temporary folder beside `path`, then moves it to `path`.

    A folder cannot replace another in one step: an existing `path` (a
    folder, or a link, which is moved as a link) is moved aside first and
    removed once the new one is in place, or moved back on failure. `check`
    is called with the temporary folder before anything moves, as in
    `write_file`.
    """
    prefix, suffix = _temp_parts(path)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    old = None
    try:
        write(str(tmp))
        if check is not None:
            check(str(tmp))
        os.chmod(tmp, 0o777 & ~umask())
        if os.path.lexists(path):
            old = path.with_name(f"{prefix}old")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.rename(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            remove(old)


def remove(path: Path) -> None:
    """Removes a file, a link (not its target) or a folder tree; quietly."""
    with contextlib.suppress(OSError):
        if path.is_symlink() or not path.is_dir():
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically, with the mode `open()` would give it."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_file(Path(path), write)


def write_json(path: Path, data: object) -> None:
    """Writes `data` as indented JSON, ending in a newline, to `path` atomically."""
    import json

    write_text(Path(path), json.dumps(data, indent=2) + "\n")
