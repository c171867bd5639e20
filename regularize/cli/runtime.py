"""What every `regularize` command shares at run time: one-line errors, Ctrl-C, progress,
quiet TensorFlow import, path checks. No click command lives here, and no TensorFlow import
runs at module level."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click

from regularize.core.errors import RegularizeError
from regularize.core.text import printable
from regularize.core.text import short_repr


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM: one line without "Error:", exit 128 + the signal number.

    Args:
        note: What the run left, e.g. "nothing written" or "after writing 'x'".
        signum: SIGINT (Ctrl-C) or SIGTERM.
    """

    def __init__(self, note: str = ": nothing written", signum: int = signal.SIGINT):
        word = "terminated" if signum == signal.SIGTERM else "interrupted"
        super().__init__(printable(word + note))
        self.exit_code = 128 + signum


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so that every temporary file is removed."""


def _signal_of(err: BaseException) -> int:
    return signal.SIGTERM if isinstance(err, _Terminated) else signal.SIGINT


def _terminate(signum, frame):
    # Unwind like Ctrl-C so that the atomic save removes its temporary file.
    raise _Terminated


def check_path(path: Path | None, hint: str, *, follow: bool = True) -> Path | None:
    """`path` if the OS can look it up (or says it is absent); else one line, exit 2.

    `Path.exists()` and friends raise (a traceback) for a name over 255 bytes
    or a path the process may not search, and answer False for a symlink
    loop; this check runs first, before TensorFlow is imported. `follow=False`
    (an output path) looks at a link itself, not where it points.
    """
    if path is None:
        return None
    try:
        (os.stat if follow else os.lstat)(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as err:
        raise click.BadParameter(
            f"Cannot use path: {_path_problem(err)}. Received: {short_repr(str(path), 300)}",
            param_hint=hint,
        ) from None
    return path


def _path_problem(err: OSError) -> str:
    """What is wrong with a path the OS refused to look up, and what was expected."""
    if err.errno == errno.ENAMETOOLONG:
        return (
            "a name in it is longer than the file system allows. "
            "Expected names of at most 255 bytes"
        )
    if err.errno == errno.ELOOP:
        return "it is a symlink loop. Expected a file, a folder or a link to one"
    reason = (err.strerror or type(err).__name__).lower()
    return f"{reason}. Expected a path this user may look up"


def path_callback(hint: str, *, follow: bool = True):
    """A click callback running `check_path` on the option's value."""
    return lambda ctx, param, value: check_path(value, hint, follow=follow)


OUTPUT_HINT = "'-o' / '--output'"


DEFAULT_OUTPUT_HINT = "the default output (pass -o)"


class _Guard:
    """The output a run may write, and what was at its path before."""

    def __init__(self):
        self.output: Path | None = None
        self.before = None

    def watch(self, output: Path | None) -> None:
        self.output = output
        self.before = _identity(output)


@contextlib.contextmanager
def _interrupts():
    """Turns Ctrl-C (and SIGTERM) into one `Interrupted` line that says what was written.

    Yields a `_Guard`: the output it watches was written if it changed since
    (a rename gives it a new inode); the saves are atomic, so it is then
    whole. Temporary files this process left beside it are removed.
    """
    guard = _Guard()
    try:
        yield guard
    except KeyboardInterrupt as err:
        signum = _signal_of(err)
        previous = signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C waits for the cleanup
        try:
            _remove_own_temps(guard.output)
        finally:
            signal.signal(signum, previous)
        output = guard.output
        changed = output is not None and _identity(output) not in (guard.before, None)
        note = f" after writing {output}" if changed else ": nothing written"
        raise Interrupted(note, signum) from None


def _identity(path: Path | None):
    if path is None:
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns)


def _remove_own_temps(output: Path | None) -> None:
    """Removes this process's temporary files for `output` (atomic saves remove
    their own; this covers an interrupt between creating one and guarding it)."""
    if output is None:
        return
    from regularize.core import atomic

    pattern = atomic.temp_pattern(output)
    with contextlib.suppress(OSError):
        for entry in os.scandir(output.parent):
            match = pattern.fullmatch(entry.name)
            if match and int(match.group(1)) == os.getpid():
                atomic.remove(Path(entry.path))


# The library's messages name Python arguments in backticks; the command line's name its flags.
_FLAGS = (
    ("pass `safe_mode=False`", "pass --unsafe"),
    ("`safe_mode=False`", "--unsafe"),
    ("`overwrite=True`", "--force"),
    ("`custom_objects`", "--custom-objects"),
    ("`include_top=False`", "--no-top"),
    ("`weights=None`", "--weights none"),
    ("`weights=PATH`", "--weights PATH"),
    ("Expected `mc=False`", "Expected no --mc"),
    ("Set `to_keras3=False`", "Drop --to-keras3"),
    ("`to_keras3`", "--to-keras3"),
    ("`debug=True`", "--debug"),
    ("`exact=True`", "--exact"),
    ("; exact=True", "; --exact"),
    ("existing='keep'", "--existing keep"),
    ("existing='remove'", "--existing remove"),
    ("`rate` not set", "--rate not given"),
    ("`attention_rate` not set", "--attention-rate not given"),
    ("`recurrent_rate` not set", "--recurrent-rate not given"),
    ("`drop_path` not set", "--drop-path not given"),
)


def as_flags(text: str) -> str:
    """A library message as the command line says it: `overwrite=True` -> --force, ..."""
    for argument, flag in _FLAGS:
        text = text.replace(argument, flag)
    return text


@contextlib.contextmanager
def one_line_errors(debug: bool):
    """Turns what the block raises into one `click.ClickException` line.

    `RegularizeError`s keep their message; anything else is an internal
    error with its first line. With `debug` the exception goes through.
    """
    try:
        yield
    except RegularizeError as err:
        if debug:
            raise
        raise click.ClickException(as_flags(str(err))) from err
    except (click.ClickException, KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise click.ClickException(
            f"internal error: {type(err).__name__}: {first} (run again with --debug "
            "for the traceback)"
        ) from err


@contextlib.contextmanager
def _progress(quiet: bool, first: str = "starting"):
    """Yields `step(text)`: on a terminal, a spinner line with the text and the time
    since the start; nothing otherwise, or when `quiet`.

    The line is drawn through a duplicate of stderr's descriptor, so it keeps
    turning while `import_keras_quietly` points descriptor 2 at /dev/null. It
    is erased when the block ends, before anything else is printed.
    """
    if quiet or not sys.stderr.isatty():
        yield lambda text: None
        return
    with _terminal_stream() as stream:
        spinner = _Spinner(stream, first)
        try:
            yield spinner.update
        finally:
            spinner.close()


class _Spinner:
    """One self-redrawing line: a spinner, a text and the elapsed time.

    Hand-made rather than rich's: importing rich.progress costs about a
    third of the 0.3 s the first output may take.
    """

    def __init__(self, stream, text: str):
        self.stream = stream
        self.text = printable(text)
        self.started = time.monotonic()
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if encoding == "utf8" else "|/-\\"
        self.turn = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._draw()
        self.thread = threading.Thread(target=self._spin, name="regularize-progress", daemon=True)
        self.thread.start()

    def update(self, text: str) -> None:
        with self.lock:
            self.text = printable(text)
            self._draw()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def _spin(self) -> None:
        while not self.done.wait(0.1):
            with self.lock:
                self.turn += 1
                self._draw()

    def _draw(self) -> None:
        seconds = int(time.monotonic() - self.started)
        frame = self.frames[self.turn % len(self.frames)]
        line = f"{frame} {self.text} ... {seconds // 60}:{seconds % 60:02d}"
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            width = 0
        width = width or 80  # a terminal that does not know its size says 0
        with contextlib.suppress(OSError, ValueError):
            # One row, whatever the width: "\r" and erase-line reach only the cursor's row.
            self.stream.write("\r\x1b[2K" + line[: max(width - 1, 1)])
            self.stream.flush()


@contextlib.contextmanager
def _terminal_stream():
    """A text stream on a duplicate of stderr's file descriptor (stderr itself if it has none)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: a test's stream
        yield sys.stderr
        return
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    stream = os.fdopen(os.dup(fd), "w", encoding=encoding, errors="backslashreplace")
    try:
        yield stream
    finally:
        stream.close()


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _json(data) -> str:
    """JSON for the terminal: names from the model file escaped as in the tables.

    `json.dumps` writes ESC as `\u001b`, which `jq -r` turns back into a raw
    ESC; `printable` keeps such names inert for any consumer. The Python API
    (`Report.to_dict()`) keeps the names as they are.
    """
    return json.dumps(_escape_strings(data), indent=2)


def _escape_strings(value):
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _escape_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_strings(v) for v in value]
    return value


@contextlib.contextmanager
def _quiet(debug: bool):
    """Keeps TensorFlow's and Keras' log lines off stderr (unless --debug).

    See `import_keras_quietly`. Python warnings are silenced too: the tool's
    own are in the report and printed from there, one line each.
    """
    if debug:
        yield
        return
    import_keras_quietly()
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def import_keras_quietly() -> None:
    """Imports Keras (and TensorFlow) with stderr pointed at /dev/null meanwhile.

    TensorFlow 2.21 writes INFO lines (oneDNN, CUDA) to file descriptor 2 from
    C++ while it is imported, before absl logging exists, whatever
    TF_CPP_MIN_LOG_LEVEL says.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with _interrupts_held():
            import keras

            # On JAX or PyTorch, Keras still imports TensorFlow if it is
            # installed (its serializer probes for `tf.TensorShape` on every
            # save), later and with the same banner: import it now, while
            # stderr is quiet.
            if keras.backend.backend() != "tensorflow":
                with contextlib.suppress(ImportError):
                    importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _interrupts_held():
    """Holds Ctrl-C and SIGTERM back until the block ends, then delivers them.

    A KeyboardInterrupt raised inside TensorFlow's import can be swallowed by
    a bare `except:` of some module it imports (the import then finishes, and
    the run goes on as if nothing happened), or leave a half-imported module
    behind. The signal is noted here and raised once the import is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if caught:
        handler = old[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        raise KeyboardInterrupt
