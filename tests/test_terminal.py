"""The command on a real terminal and under signals.

Real processes: the progress line needs a pseudo-terminal on stderr, and
Ctrl-C is SIGINT sent to the process. Nothing here is timed: "at once" is
checked as an order. The command runs under an audit hook (`_WATCHED`) that
logs every import of TensorFlow, Keras or JAX to a file and, when asked,
holds that import until the test lets it go: the first output must appear
while TensorFlow's import is held (it never waits for it), and a bad input
must be said with no such import logged at all. The latencies themselves
are measured in `benchmarks/cli_latency.py`.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent.parent / "fixtures"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="120", TERM="xterm")
ENV.pop("NO_COLOR", None)
# Runs `python -m regularize ARGS` with an audit hook on imports of the heavy packages.
_WATCHED = textwrap.dedent(
    """
    import os, runpy, sys, time
    LOG, HOLD = os.environ["REGULARIZE_TEST_IMPORTS"], os.environ.get("REGULARIZE_TEST_HOLD")
    HEAVY = ("tensorflow", "keras", "tf_keras", "jax")
    def hook(event, args):
        if event == "import" and args[0].split(".")[0] in HEAVY:
            with open(LOG, "a") as log:
                log.write(args[0] + "\\n")
            while HOLD and not os.path.exists(HOLD):
                time.sleep(0.05)
    sys.addaudithook(hook)
    sys.argv = ["regularize", *sys.argv[1:]]
    runpy.run_module("regularize", run_name="__main__", alter_sys=True)
    """
)


def _default_signals() -> None:
    """In the child before it starts: SIGINT and SIGTERM as a terminal delivers them.

    A process started in the background by a non-interactive shell (`cmd &` in a
    CI script) inherits SIGINT *ignored*, and Python then installs no
    KeyboardInterrupt handler: Ctrl-C would be a no-op for reasons outside the
    tool. The child is given the default dispositions a user's shell gives.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _watched(*args) -> list[str]:
    return [sys.executable, "-c", _WATCHED, *map(str, args)]


@pytest.fixture
def work(tmp_path):
    shutil.copy(FIXTURES / "cnn.keras", tmp_path / "cnn.keras")
    return tmp_path


class _Terminal:
    """A process whose stderr is a pseudo-terminal (stdout a pipe unless `tty_stdout`)."""

    def __init__(self, args, cwd, *, tty_stdout=False):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=slave if tty_stdout else subprocess.PIPE,
            stderr=slave,
            cwd=cwd,
            env=ENV,
            preexec_fn=_default_signals,
        )
        os.close(slave)
        self.master = master
        self.seen = b""

    def read(self, timeout: float) -> bool:
        """Reads what the terminal shows for up to `timeout` seconds; False at its end."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            return False
        if not chunk:
            return False
        self.seen += chunk
        return True

    def wait_for(self, text: bytes) -> None:
        """Reads until `text` is shown; fails if the process ends first (no clock involved)."""
        while text not in self.seen:
            assert self.read(0.5) or text in self.seen, self.seen[-2000:]

    def finish(self) -> tuple[int, str]:
        """Reads to the end; returns the exit code and stdout (if piped)."""
        while self.read(0.5):
            pass
        out = self.proc.stdout.read().decode() if self.proc.stdout else ""
        code = self.proc.wait()
        os.close(self.master)
        return code, out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        os.close(self.master)

    def text(self) -> str:
        return self.seen.decode(errors="replace")


def _regularize(*args):
    return [sys.executable, "-m", "regularize", *map(str, args)]


@pytest.mark.parametrize(
    "command",
    [
        ["add-dropout", "cnn.keras", "-o", "out.keras"],
        ["inspect", "cnn.keras"],
        ["sweep", "cnn.keras", "--data", "data.npz", "--epochs", "1"],
    ],
    ids=lambda command: command[0],
)
def test_first_output_comes_before_tensorflow_is_imported(work, command, monkeypatch):
    x, y = np.zeros((2, 32, 32, 3)), np.zeros(2)
    np.savez(work / "data.npz", x_train=x, y_train=y, x_val=x, y_val=y)
    log = work / "imports.log"
    monkeypatch.setitem(ENV, "REGULARIZE_TEST_IMPORTS", str(log))
    monkeypatch.setitem(ENV, "REGULARIZE_TEST_HOLD", str(work / "never"))
    term = _Terminal(_watched(*command), work)
    try:
        # Visible: words, not only the escape sequence that clears the line.
        while b"starting" not in term.seen and b"importing TensorFlow" not in term.seen:
            assert term.read(60), f"the command ended showing only {term.seen[-2000:]!r}"
        # Then the command reaches the heavy import, which the hook holds: had the first
        # output waited for that import, it would never have appeared above.
        for _ in range(300):
            if log.is_file():
                break
            term.read(1)
    finally:
        term.kill()
    assert not (work / "out.keras").exists()
    assert log.is_file(), f"the command never imported TensorFlow: {term.text()[-2000:]}"
    assert log.read_text().split()[0] in ("tensorflow", "keras"), log.read_text()


def test_progress_names_each_stage_with_the_elapsed_time_then_clears(work):
    term = _Terminal(_regularize("add-dropout", "cnn.keras", "-o", "out.keras"), work)
    code, out = term.finish()
    assert code == 0, term.text()
    shown = term.text()
    stages = ["importing TensorFlow ...", "loading cnn.keras ...", "writing out.keras ..."]
    positions = [shown.find(stage) for stage in stages]
    assert -1 not in positions and positions == sorted(positions), shown
    # The elapsed time (m:ss) goes on while TensorFlow imports (seconds, not less).
    assert re.search(r"importing TensorFlow \.\.\. 0:0[1-9]", shown), shown
    assert out.splitlines()[-1] == "wrote out.keras"
    # One row, redrawn in place, and erased at the end.
    assert "\n" not in shown
    assert shown.endswith("\r\x1b[2K"), shown[-200:]


def test_quiet_shows_nothing_on_a_terminal(work):
    term = _Terminal(_regularize("add-dropout", "cnn.keras", "-o", "out.keras", "-q"), work)
    code, out = term.finish()
    assert code == 0
    assert term.seen == b""
    assert out.splitlines()[-1] == "wrote out.keras"


def _runs_without_tensorflow(work: Path, *args) -> subprocess.CompletedProcess:
    """Runs the command under the import hook; fails if it imported TensorFlow, Keras or JAX."""
    log = work / "imports.log"
    run = subprocess.run(
        _watched(*args),
        cwd=work,
        env=dict(ENV, REGULARIZE_TEST_IMPORTS=str(log)),
        capture_output=True,
        text=True,
    )
    assert not log.exists(), f"imported to say this: {log.read_text().split()[:3]}"
    return run


def test_the_import_hook_sees_a_tensorflow_import(work):
    """The hook the two tests below rely on logs the import a real command makes."""
    log = work / "imports.log"
    run = subprocess.run(
        _watched("inspect", "cnn.keras"),
        cwd=work,
        env=dict(ENV, REGULARIZE_TEST_IMPORTS=str(log)),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tensorflow" in log.read_text().split()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            "folder",
            "it is a folder, and neither a SavedModel (no `saved_model.pb`) nor a keras-hub "
            "preset (no `config.json`)",
        ),
        ("suffix", "unsupported file type '.pt'"),
        ("missing", "no such file"),
    ],
)
def test_a_bad_input_is_a_usage_error_before_tensorflow_is_imported(work, make, message):
    name = {"folder": "notamodel", "suffix": "model.pt", "missing": "nope.keras"}[make]
    if make == "folder":
        (work / name).mkdir()
    elif make == "suffix":
        (work / name).write_bytes(b"weights")
    run = _runs_without_tensorflow(work, "add-dropout", name)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"Error: Invalid value for 'INPUT': {message}. Expected a `.keras` or `.h5` model, "
        f"a SavedModel folder or a keras-hub preset folder. Received: '{name}'"
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.keras", b"not a zip", "not a `.keras` archive"),
        ("bad.h5", b"not hdf5", "not an HDF5 file"),
        ("empty.keras", b"", "the file is empty (0 bytes)"),
    ],
)
def test_a_file_that_is_not_a_model_is_said_before_the_tensorflow_import(
    work, name, content, message
):
    (work / name).write_bytes(content)
    run = _runs_without_tensorflow(work, "add-dropout", name)
    assert run.returncode == 1
    [line] = run.stderr.splitlines()
    assert line.startswith("Error: Cannot read model: ") and message in line, line


# -- Ctrl-C -------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("cnn.keras", "ready"))


def test_ctrl_c_while_tensorflow_imports(work):
    term = _Terminal(_regularize("add-dropout", "cnn.keras", "-o", "out.keras"), work)
    term.wait_for(b"importing TensorFlow")
    term.proc.send_signal(signal.SIGINT)
    code, out = term.finish()
    assert code == 130, term.text()
    assert term.text().replace("\r\n", "\n").rstrip().endswith("interrupted: nothing written")
    assert out == ""
    assert _leftovers(work) == []


# A child that runs the command with one stage slowed down: it says so
# through a file, then waits to be interrupted.
_DRIVER = """
import os, sys, time
from regularize.cli import import_keras_quietly
import_keras_quietly()
import keras
import regularize.core.report

def stall(*args, **kwargs):
    {before}
    open({ready!r}, "w").close()
    while True:  # until the test's signal ends it
        time.sleep(3600)

{patch}
from regularize.cli import main
sys.argv = ["regularize", *{args!r}]
main()
"""

_STAGES = {
    # Keras' own loader, inside `regularize.load_model`.
    "load": ("pass", "keras.saving.load_model = stall"),
    # The save: half a model in the temporary file, then the stall.
    "save": (
        "open(args[1], 'wb').write(b'half a model')",
        "keras.Model.save = stall",
    ),
    # After the rename: the summary lines are printed.
    "print": ("pass", "regularize.core.report.Report.summary_lines = stall"),
}


def _interrupt_at(stage: str, folder: Path, args: list[str], signum=signal.SIGINT):
    before, patch = _STAGES[stage]
    ready = folder / "ready"
    code = _DRIVER.format(before=before, ready=str(ready), patch=patch, args=args)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=folder,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,
    )
    try:
        while not ready.exists():  # the stall is reached, or the child ended: fail
            assert child.poll() is None, child.communicate()
            time.sleep(0.05)
        child.send_signal(signum)
        out, err = child.communicate()
    finally:
        child.kill()
    return child.returncode, out, err


@pytest.mark.parametrize("stage", ["load", "save"])
def test_ctrl_c_while_loading_or_saving_writes_nothing(work, stage):
    before = (work / "cnn.keras").read_bytes()
    code, out, err = _interrupt_at(stage, work, ["add-dropout", "cnn.keras", "-o", "out.keras"])
    assert code == 130, err
    assert err == "interrupted: nothing written\n"
    assert out == ""
    assert _leftovers(work) == []  # neither the output nor a temporary file
    assert (work / "cnn.keras").read_bytes() == before


def test_ctrl_c_after_the_write_says_so(work):
    code, out, err = _interrupt_at("print", work, ["add-dropout", "cnn.keras", "-o", "out.keras"])
    assert code == 130, err
    assert err == "interrupted after writing out.keras\n"
    assert _leftovers(work) == ["out.keras"]
    assert "config.json" in zipfile.ZipFile(work / "out.keras").namelist()


def test_sigterm_while_saving_writes_nothing(work):
    args = ["add-dropout", "cnn.keras", "-o", "out.keras"]
    code, out, err = _interrupt_at("save", work, args, signal.SIGTERM)
    assert code == 143, err
    assert err == "terminated: nothing written\n"
    assert _leftovers(work) == []
