"""Text from model files and users, made safe and short for one-line messages. No Keras import."""

from __future__ import annotations

import reprlib
import unicodedata

# Unicode categories a terminal may act on instead of showing: controls (C0
# with \n and \t, DEL, C1 with the 8-bit CSI/OSC introducers), format
# characters (bidirectional overrides, zero-width), line and paragraph
# separators, lone surrogates.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str) -> str:
    """`text` safe for a terminal: controls and escape sequences shown as `\\x1b`, `\\n`, ...

    Layer and model names come from the model file, which may be anyone's:
    a name holding ESC sequences (ANSI colours, OSC titles and hyperlinks),
    carriage returns or bidirectional overrides would otherwise act on the
    user's terminal or disguise the line. ESC itself is escaped, so the rest
    of a sequence shows as plain text. Rich markup is a separate concern:
    render through `rich.text.Text`, which does not parse it.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in _UNPRINTABLE else ch for ch in text)


def _escape(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, for the `Received:` part of messages.

    A value read from a user's file may be megabytes long or nested
    thousands of levels deep; the message must stay one readable line.

    Example:
        >>> short_repr("a" * 52428800, limit=4)
        "'aaaa...' (52428800 chars)"
    """
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        head = repr(value[:limit])
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{head[:-1]}...{head[-1]} ({len(value)} {unit})"
    try:
        text = _SHORT.repr(value)
    except Exception:  # a huge int, a failing __repr__: say what it is
        return f"<{type(value).__name__}>"
    if len(text) > 2 * limit:
        text = f"{text[: 2 * limit]}... ({type(value).__name__})"
    return text


def _short_repr_lib() -> reprlib.Repr:
    # reprlib stops at `maxlevel` instead of recursing, and abbreviates long
    # containers and strings inside them.
    short = reprlib.Repr()
    short.maxlevel = 4
    short.maxstring = 40
    short.maxother = 40
    short.maxlong = 40
    for name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset"):
        setattr(short, name, 8)
    return short


_SHORT = _short_repr_lib()


def format_bytes(size: int) -> str:
    """`14.4 GB`, `64 B`: decimal units, one decimal place."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
