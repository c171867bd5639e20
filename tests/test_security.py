"""Safe by default: no model file, working folder or path may run code or leak.

Each test builds an attack in a temporary folder and runs the real command
line on it (`python -m regularize`, or the installed `regularize` script),
in a fresh process whose working folder is the attack's folder, without
`--unsafe`. Every run is checked the same way (`_refused` / `_done`): no
marker file, no change to any file but the output (the whole temporary tree
is hashed before and after), nothing of a local secret in any file or in the
output, one `Error: ` line on stderr, no traceback, the documented exit code.
Where `--unsafe` lifts a refusal, the same file is run once with it to show
that the attack is real (the marker appears), so a test that passes is not
one that cannot see the attack.

The Keras 2 files are built once, by `tests/keras2_attacks.py` in a tf_keras
child (importing tf_keras here would switch this process to Keras 2); the
Keras 3 files are built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pty
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from helpers import error_line

L = keras.layers
HERE = Path(__file__).resolve().parent

# 64 bytes: the size of a (4, 4) float32 kernel, which it replaces. ASCII, so
# read as float32 it holds no NaN or inf (the high byte never reaches 0x7f).
SECRET = b"TOP-SECRET-0123456789abcdefXYZ!!TOP-SECRET-0123456789abcdefXYZ!!"
VOCAB_SECRET = b"SECRETWORD"
DECOY = b"keep me\n"
# OSC 8 hyperlink, BEL, SGR red: a name that would rewrite a terminal.
ANSI_NAME = "\x1b]8;;http:x\x07evil\x1b[31m"
MARKUP_NAME = "[bold]x[blink]"  # rich markup (Keras refuses "/" in names: no closing tag)


# -- running the command line -------------------------------------------------


@dataclasses.dataclass
class Run:
    args: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    }
    env.update(extra)
    return env


def _script() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "regularize"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "regularize"]


def cli(
    *args,
    cwd: Path,
    timeout: float = 300,
    script: bool = False,
    env: dict | None = None,
    measure: Path | None = None,
) -> Run:
    """Runs the real CLI in a fresh process; `script` uses the console script.

    `env`: variables set for the run (a value of None removes one).
    `measure`: run it under `_MEASURED`, which caps its address space at
    `MEMORY_CAP` and writes its peak resident memory to this file (read it
    with `peak_rss`).
    """
    command = _script() if script else [sys.executable, "-m", "regularize"]
    command = [*command, *map(str, args)]
    if measure is not None:
        command = [sys.executable, "-c", _MEASURED, str(MEMORY_CAP), str(measure), *command]
    child_env = _env()
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    start = time.monotonic()
    try:
        run = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            env=child_env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{args} did not finish within {timeout} s (hangs?): {err.stderr!r:.2000}")
    return Run(list(args), run.returncode, run.stdout, run.stderr, time.monotonic() - start)


# Runs argv[3:] with its address space capped at argv[1] bytes (so that a
# defence that broke fails the test with an allocation error instead of taking
# the machine's memory), then writes the peak resident memory of the run and
# all its descendants (the Keras 2 engine's child too: a reaped child's peak
# counts toward its parent's RUSAGE_CHILDREN) to the file argv[2].
_MEASURED = """
import json, resource, subprocess, sys
limit, report, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = subprocess.run(command, preexec_fn=cap).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
with open(report, "w") as f:
    json.dump({"peak_rss": peak, "returncode": code}, f)
sys.exit(code if code >= 0 else 128 - code)
"""
# Far above what a run needs (about 1 GB resident, 5 GB of address space for
# TensorFlow), far below the 14.4 GB the big-Dense attack would allocate.
MEMORY_CAP = 10 << 30


def peak_rss(report: Path) -> int:
    """The peak resident memory (bytes) that a `measure`d run wrote to `report`."""
    return json.loads(report.read_text())["peak_rss"]


# -- what a run may and may not do --------------------------------------------


def snapshot(root: Path) -> dict:
    """Every entry under `root` (links not followed, FIFOs not opened) -> what it is."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                tree[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                tree[key] = ("dir",)
            elif stat.S_ISREG(info.st_mode):
                tree[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                tree[key] = ("other", stat.S_IFMT(info.st_mode))
    return tree


def _changes(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + os.sep)


@dataclasses.dataclass
class World:
    """The session's temporary tree: attacks, markers, secrets, decoys, work folders."""

    root: Path
    markers: Path
    decoy: Path
    secret: Path
    secret_h5: Path
    vocab: Path
    k2: Path  # Keras 2 attack files (read-only sources: tests copy them)
    k3: Path  # Keras 3 files
    notes: dict
    counter: int = 0

    def workdir(self, name: str) -> Path:
        self.counter += 1
        path = self.root / "runs" / f"{self.counter:02d}_{name}"
        path.mkdir(parents=True)
        return path

    def secret_files(self) -> set[Path]:
        return {self.secret, self.secret_h5, self.vocab}

    def observe(self, action, *, allowed: tuple[str, ...] = (), secret_ok: bool = False):
        """Runs `action()` and checks what it changed in the whole tree.

        `allowed`: paths (relative to root) that may change: the output.
        `secret_ok`: skip the secret scan (a documented `--unsafe` read).
        Returns the action's result. Markers and the decoy are reset even when
        the check fails, so one attack that fires fails one test, not the rest.
        """
        before = snapshot(self.root)
        try:
            result = action()
            after = snapshot(self.root)
        finally:
            fired = self.clear_markers()
            decoy_lost = self.restore_decoy()
        changed = _changes(before, after)
        allowed_keys = [str(Path(a)) for a in allowed]
        unexpected = sorted(k for k in changed if not any(_under(k, a) for a in allowed_keys))
        assert not fired, f"marker files written: {fired}; run: {result}"
        assert not decoy_lost, f"the decoy folder was changed; run: {result}"
        assert not unexpected, f"changed outside the output: {unexpected[:20]}; run: {result}"
        if not secret_ok:
            self.assert_no_secret(result, [self.root / k for k in changed])
        return result

    def assert_no_secret(self, run: Run, paths: list[Path]) -> None:
        """Neither secret is in `run`'s output or in any of `paths` (what the run wrote)."""
        for path in paths:
            if path in self.secret_files() or not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            assert SECRET not in data, f"the secret was copied into {path}"
            assert VOCAB_SECRET not in data, f"the vocabulary secret was copied into {path}"
        for text in (run.stdout, run.stderr):
            raw = text.encode("utf-8", "surrogateescape")
            assert SECRET[:16] not in raw and VOCAB_SECRET not in raw, run

    def clear_markers(self) -> list[str]:
        names = sorted(p.name for p in self.markers.iterdir())
        for path in self.markers.iterdir():
            path.unlink()
        return names

    def restore_decoy(self) -> bool:
        """Puts the decoy folder back; whether it had been changed."""
        keep = self.decoy / "keep.txt"
        intact = (
            self.decoy.is_dir()
            and not self.decoy.is_symlink()
            and [p.name for p in self.decoy.iterdir()] == ["keep.txt"]
            and keep.read_bytes() == DECOY
        )
        if not intact:
            shutil.rmtree(self.decoy, ignore_errors=True)
            self.decoy.mkdir()
            keep.write_bytes(DECOY)
        return not intact


def _failure_line(run: Run) -> str:
    """The one line of a failed command: click's `Error: `, then the message."""
    line = error_line(run)
    assert line.startswith("Error: "), line[:2000]
    return line


def _refused(world: World, run_action, code: int, *fragments, any_of=()) -> str:
    """The run is refused: exit `code`, one line holding every fragment, nothing written."""
    run = world.observe(run_action)
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    line = _failure_line(run)
    assert len(line) < 2000, line[:300]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if any_of:
        assert any(f in line for f in any_of), (any_of, line)
    return line


def _done(world: World, run_action, *, output: Path) -> Run:
    """The run succeeds and writes `output` and nothing else."""
    run = world.observe(run_action, allowed=(str(output.relative_to(world.root)),))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.output
    assert run.stderr.strip() == "", run.stderr[-3000:]
    assert output.exists() and not output.is_symlink(), output
    return run


def _copy(src: Path, folder: Path, name: str | None = None) -> Path:
    dst = folder / (name or src.name)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


# -- the attack files ----------------------------------------------------------


def _keras3_files(folder: Path) -> None:
    folder.mkdir()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), name="features"),
            L.Dense(4, activation="relu", name="fc"),
            L.Dense(4, activation="relu", name="hidden"),
            L.Dense(1, name="out"),
        ],
        name="plain",
    )
    model.save(folder / "plain.h5")  # Keras 3 writes a legacy `.h5` Keras 3 reads back
    model.save(folder / "model.keras")

    inp = keras.Input((4,), name="features")
    x = L.Dense(4, activation="relu", name=ANSI_NAME)(inp)
    x = L.Dense(4, activation="relu", name=MARKUP_NAME)(x)
    out = L.Dense(1, name="out")(x)
    keras.Model(inp, out, name=ANSI_NAME + "model").save(folder / "ansi.keras")

    tiny = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            L.Conv2D(2, 3, padding="same", activation="relu", name="conv"),
            L.Flatten(name="flat"),
            L.Dense(2, activation="softmax", name="probs"),
        ],
        name="tiny",
    )
    tiny.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    tiny.save(folder / "tiny.keras")


def _kernel_path(f: h5py.File, layer: str) -> str:
    """The HDF5 path of `layer`'s kernel (Keras 2 and 3 lay weights out differently)."""
    found = []

    def visit(name, obj):
        if (
            isinstance(obj, h5py.Dataset)
            and f"/{layer}/" in f"/{name}"
            and name.rsplit("/", 1)[-1].startswith("kernel")
        ):
            found.append(name)

    f["model_weights"].visititems(visit)
    assert len(found) == 1, found
    return "model_weights/" + found[0]


def tamper_h5(src: Path, dst: Path, kind: str, secret: Path, secret_h5: Path) -> str:
    """Copies `src` to `dst` with the kernel of layer `fc` read from outside the file.

    Returns the kernel's HDF5 path.
    """
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        path = _kernel_path(f, "fc")
        shape, dtype = f[path].shape, f[path].dtype
        assert (shape, dtype, f[path].nbytes) == ((4, 4), np.float32, len(SECRET))
        del f[path]
        if kind == "external":
            f.create_dataset(path, shape, dtype, external=[(str(secret), 0, len(SECRET))])
        elif kind == "external_link":
            f[path] = h5py.ExternalLink(str(secret_h5), "/data")
        elif kind == "soft_link":
            # A soft link cannot name another file, but it can go through an
            # external link elsewhere in the file.
            f["leak"] = h5py.ExternalLink(str(secret_h5), "/")
            f[path] = h5py.SoftLink("/leak/data")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape, dtype)
            layout[...] = h5py.VirtualSource(str(secret_h5), "data", shape, dtype=dtype)
            f.create_virtual_dataset(path, layout)
        else:
            raise ValueError(kind)
    # The attack is real: any HDF5 reader now gets the secret as the kernel.
    with h5py.File(dst, "r") as f:
        assert f[path][()].tobytes() == SECRET
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("security")
    markers = root / "markers"
    markers.mkdir()
    decoy = root / "decoy"
    decoy.mkdir()
    (decoy / "keep.txt").write_bytes(DECOY)
    secret = root / "secret.bin"
    secret.write_bytes(SECRET)
    secret_h5 = root / "secret.h5"
    with h5py.File(secret_h5, "w") as f:
        f["data"] = np.frombuffer(SECRET, dtype=np.float32).reshape(4, 4)
    vocab = root / "vocab_secret.txt"
    vocab.write_bytes(b"alpha\nbeta\n" + VOCAB_SECRET + b"\n")
    k2 = root / "keras2"
    spec = {
        "out": str(k2),
        "markers": str(markers),
        "secret": str(secret),
        "decoy": str(decoy),
        "vocab": str(vocab),
    }
    env = _env(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
    build = subprocess.run(
        [sys.executable, str(HERE / "keras2_attacks.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=root,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    notes = json.loads(build.stdout.strip().splitlines()[-1])
    assert not any(markers.iterdir()), "building the attacks fired one"
    k3 = root / "keras3"
    _keras3_files(k3)
    return World(root, markers, decoy, secret, secret_h5, vocab, k2, k3, notes)


# -- 1. TFOpLambda calling any TensorFlow function ------------------------------

TFOP_COMMANDS = {
    "inspect": ["inspect"],
    "dry_run": ["add-dropout", "--dry-run"],
    "add": ["add-dropout"],
    "remove": ["remove-dropout"],
}


@pytest.mark.parametrize("command", list(TFOP_COMMANDS))
def test_tfoplambda_write_file_is_refused(world, command):
    work = world.workdir(f"tfop_write_{command}")
    model = _copy(world.k2 / "tfop_write.h5", work)
    _refused(
        world,
        lambda: cli(*TFOP_COMMANDS[command], model.name, cwd=work),
        1,
        "evil",
        "io.write_file",
        "--unsafe",
        any_of=("Refusing", "Cannot read model"),
    )


def test_tfoplambda_write_file_fires_with_unsafe(world):
    """The attack is real: with --unsafe, tf_keras calls tf.io.write_file."""
    work = world.workdir("tfop_write_unsafe")
    model = _copy(world.k2 / "tfop_write.h5", work)
    cli("inspect", model.name, "--unsafe", cwd=work)
    assert world.clear_markers() == ["tfop_write"]


@pytest.mark.parametrize(
    ("name", "layer", "function"),
    [
        ("tfop_copy.h5", "evil_copy", "io.gfile.copy"),
        ("tfop_rmtree.h5", "evil_rmtree", "io.gfile.rmtree"),
    ],
)
def test_tfoplambda_file_functions_are_refused(world, name, layer, function):
    work = world.workdir(Path(name).stem)
    model = _copy(world.k2 / name, work)
    _refused(
        world,
        lambda: cli("add-dropout", model.name, cwd=work),
        1,
        layer,
        function,
        "--unsafe",
        any_of=("Refusing", "Cannot read model"),
    )


def test_tfoplambda_in_savedmodel_metadata_is_refused(world):
    work = world.workdir("sm_tfop")
    model = _copy(world.k2 / "sm_tfop", work)
    _refused(
        world,
        lambda: cli("add-dropout", model.name, cwd=work),
        1,
        "evil",
        "io.write_file",
        "--unsafe",
        any_of=("Refusing", "Cannot read model"),
    )
    cli("inspect", model.name, "--unsafe", cwd=work)
    assert world.clear_markers() == ["sm_tfop"], "the SavedModel attack did not fire"


def test_allowed_op_with_a_string_constant_is_refused(world):
    work = world.workdir("tfop_string_const")
    model = _copy(world.k2 / "tfop_string_const.h5", work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "add_text",
        "math.add",
        "--unsafe",
        any_of=("Refusing", "Cannot read model"),
    )


def test_legit_tfoplambda_model_works_without_unsafe(world):
    """math.add with a float, a slice and reshape with a shape: pure tensor ops."""
    work = world.workdir("legit")
    model = _copy(world.k2 / "legit_oplambda.h5", work)
    output = work / "legit_oplambda_dropout.h5"
    run = _done(world, lambda: cli("add-dropout", model.name, cwd=work), output=output)
    assert run.stdout.splitlines()[-1] == f"wrote {output.name}"
    with h5py.File(output, "r") as f:
        config = f.attrs["model_config"]
    assert "TFOpLambda" in config and "SlicingOpLambda" in config and "Dropout" in config


# -- 2. SavedModel graph code -------------------------------------------------


def test_savedmodel_resource_initializer_does_not_run(world):
    assert world.notes["notes"]["resource_marker_at_save"] is False
    work = world.workdir("sm_resource")
    model = _copy(world.k2 / "sm_resource", work)
    output = work / "sm_resource_dropout"
    run = world.observe(
        lambda: cli("add-dropout", model.name, cwd=work),
        allowed=(str(output.relative_to(world.root)),),
    )
    if run.returncode == 0:  # rebuilt from keras_metadata.pb and the checkpoint
        assert run.stderr.strip() == "", run.stderr[-3000:]
        assert (output / "saved_model.pb").is_file() and (output / "variables").is_dir()
        assert run.stdout.splitlines()[-1] == f"wrote {output.name}"
    else:
        assert run.returncode == 1, run.stderr[-3000:]
        line = _failure_line(run)
        assert "--unsafe" in line
        # The reason must be the graph code, not the legitimate TFOpLambda layers.
        assert "TFOpLambda" not in line, line
        assert not output.exists()


def test_savedmodel_resource_initializer_runs_with_unsafe(world):
    """The attack is real: restoring the object graph runs the initializer."""
    work = world.workdir("sm_resource_unsafe")
    model = _copy(world.k2 / "sm_resource", work)
    cli("add-dropout", model.name, "--unsafe", "--dry-run", cwd=work)
    assert world.clear_markers() == ["sm_resource"]


# -- 3. modules in the working folder -----------------------------------------

# Imported lazily by both processes (not at interpreter start-up, unlike
# `typing` or `tempfile` here): `json` (stdlib) and `h5py` (the parent reads
# `.h5` headers with it; a third-party name shows that site-packages loses too).
CWD_MODULES = ("json", "h5py")


def _plant_modules(folder: Path, markers: Path) -> None:
    for name in CWD_MODULES:
        marker = markers / f"imported_{name}_from_{folder.name}"
        (folder / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'w').write('pwned')\n"
            f"raise ImportError('planted {name}.py imported')\n"
        )
    # The planted modules are real: a plain `python -c` started here imports them.
    probe = subprocess.run(
        [sys.executable, "-c", "import json"], cwd=folder, env=_env(), capture_output=True
    )
    assert probe.returncode == 1 and b"planted json.py imported" in probe.stderr
    assert [p.name for p in markers.iterdir()] == [f"imported_json_from_{folder.name}"]
    (markers / f"imported_json_from_{folder.name}").unlink()


def test_working_folder_modules_are_not_imported_python_m(world):
    work = world.workdir("cwd_modules_h5")
    model = _copy(world.k2 / "legit_oplambda.h5", work)
    _plant_modules(work, world.markers)
    run = world.observe(lambda: cli("inspect", model.name, cwd=work))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fc" in run.stdout


def test_working_folder_modules_are_not_imported_console_script(world):
    """The user `cd`s into a SavedModel folder that holds planted modules."""
    work = world.workdir("cwd_modules_sm")
    model = _copy(world.k2 / "sm_legit", work)
    _plant_modules(model, world.markers)
    run = world.observe(lambda: cli("inspect", ".", cwd=model, script=True))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fc" in run.stdout


# -- 4. HDF5 external storage ---------------------------------------------------

H5_KINDS = ("external", "external_link", "soft_link", "virtual")


@pytest.mark.parametrize(
    ("engine", "kind"),
    [("keras2", kind) for kind in H5_KINDS] + [("keras3", "external"), ("keras3", "virtual")],
)
def test_hdf5_reading_outside_the_file_is_refused(world, engine, kind):
    work = world.workdir(f"h5_{engine}_{kind}")
    src = world.k2 / "legit_oplambda.h5" if engine == "keras2" else world.k3 / "plain.h5"
    model = work / f"{engine}_{kind}.h5"
    tamper_h5(src, model, kind, world.secret, world.secret_h5)
    # The soft link goes through the external link `/leak`: either may be named.
    names = ("kernel", "leak") if kind == "soft_link" else ("kernel",)
    line = _refused(world, lambda: cli("add-dropout", model.name, cwd=work), 1, any_of=names)
    assert "Refusing" in line or "Cannot read" in line, line


# -- 5. symlinks at the output ---------------------------------------------------

# (source, input name in the work folder, default output name)
LINK_CASES = {
    "keras2_h5": ("k2", "legit_oplambda.h5", "legit_oplambda_dropout.h5"),
    "savedmodel": ("k2", "sm_legit", "sm_legit_dropout"),
    "keras3": ("k3", "model.keras", "model_dropout.keras"),
}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_dangling_link_at_default_output_is_refused(world, case):
    source, name, default = LINK_CASES[case]
    work = world.workdir(f"link_{case}")
    elsewhere = world.workdir(f"link_{case}_target")
    model = _copy(getattr(world, source) / name, work)
    planted = elsewhere / ("planted" + Path(default).suffix)
    (work / default).symlink_to(planted)
    _refused(
        world,
        lambda: cli("add-dropout", model.name, cwd=work),
        2,
        "already exists",
    )
    assert not planted.exists() and not any(elsewhere.iterdir())


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_force_replaces_the_link_not_its_target(world, case):
    source, name, default = LINK_CASES[case]
    work = world.workdir(f"force_link_{case}")
    elsewhere = world.workdir(f"force_link_{case}_target")
    model = _copy(getattr(world, source) / name, work)
    if model.is_dir():
        target = elsewhere / "decoy_dir"
        target.mkdir()
        (target / "keep.txt").write_bytes(b"decoy")
    else:
        target = elsewhere / ("decoy" + Path(default).suffix)
        target.write_bytes(b"decoy")
    (work / default).symlink_to(target)
    output = work / default
    _done(world, lambda: cli("add-dropout", model.name, "--force", cwd=work), output=output)
    assert not output.is_symlink()
    if model.is_dir():
        assert (output / "saved_model.pb").is_file()
        assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
        assert (target / "keep.txt").read_bytes() == b"decoy"
    else:
        assert output.is_file() and output.stat().st_size > 1000
        assert target.read_bytes() == b"decoy"


# -- 6. what --force must never delete -------------------------------------------


def _force_case(world: World, case: str):
    """Sets up one forbidden --force target; returns (work folder, args)."""
    work = world.workdir(f"force_{case}")
    if case == "dot":
        _copy(world.k2 / "sm_legit", work, "sm")
        (work / "notes.txt").write_text("mine")
        return work, ["add-dropout", "sm", "-o", ".", "--force"]
    if case == "variables":
        _copy(world.k2 / "sm_legit", work, "sm")
        return work, ["add-dropout", "sm", "-o", "sm/variables", "--force"]
    if case == "input_parent":
        proj = work / "proj"
        proj.mkdir()
        _copy(world.k2 / "legit_oplambda.h5", proj)
        (proj / "train.py").write_text("print('mine')\n")
        return work, ["add-dropout", "proj/legit_oplambda.h5", "-o", "proj", "--force"]
    if case == "plain_folder":
        _copy(world.k2 / "sm_legit", work, "sm")
        docs = work / "docs"
        docs.mkdir()
        (docs / "index.md").write_text("# mine\n")
        return work, ["add-dropout", "sm", "-o", "docs", "--force"]
    raise ValueError(case)


@pytest.mark.parametrize("case", ["dot", "variables", "input_parent", "plain_folder"])
def test_force_never_deletes_what_it_must_not(world, case):
    work, args = _force_case(world, case)
    _refused(world, lambda: cli(*args, cwd=work), 2)  # `cli` fails a run that hangs


def test_force_may_replace_another_savedmodel(world):
    work = world.workdir("force_other_sm")
    _copy(world.k2 / "sm_legit", work, "sm")
    old = _copy(world.k2 / "sm_legit", work, "old_output")
    (old / "stale.txt").write_text("from the last run")
    _done(
        world, lambda: cli("add-dropout", "sm", "-o", "old_output", "--force", cwd=work), output=old
    )
    assert (old / "saved_model.pb").is_file() and not (old / "stale.txt").exists()


# -- 7. every bad path or policy is one line -------------------------------------


@pytest.fixture(scope="session")
def policy_world(world):
    """A folder with a Keras 3 model and the bad policies."""
    work = world.workdir("policies")
    _copy(world.k3 / "model.keras", work)
    (work / "loop_a").symlink_to("loop_b")
    (work / "loop_b").symlink_to("loop_a")
    os.mkfifo(work / "policy.fifo")
    (work / "deep.toml").write_text("rate = " + "[" * 100_000 + "]" * 100_000 + "\n")
    return work


LONG = "a" * 300  # one path component over NAME_MAX (255 bytes)


@pytest.mark.parametrize(
    ("case", "args", "code"),
    [
        ("long_input", ["inspect", LONG + ".keras"], 2),
        ("long_input_dir", ["inspect", f"{LONG}/model.h5"], 2),
        ("long_output", ["add-dropout", "model.keras", "-o", LONG + ".keras"], 2),
        ("long_policy", ["inspect", "model.keras", "--policy", LONG + ".toml"], 2),
        ("policy_loop", ["inspect", "model.keras", "--policy", "loop_a"], 2),
        ("policy_deep", ["inspect", "model.keras", "--policy", "deep.toml"], 2),
        ("policy_fifo", ["inspect", "model.keras", "--policy", "policy.fifo"], 2),
        ("policy_huge", ["inspect", "model.keras", "--policy", "huge.toml"], 2),
    ],
)
def test_bad_paths_and_policies_are_one_short_line(world, policy_world, case, args, code):
    huge = policy_world / "huge.toml"
    if case == "policy_huge":  # 50 MB: written for this case only (every run hashes the tree)
        huge.write_text('bogus = "' + "x" * 50_000_000 + '"\n')
    try:
        line = _refused(world, lambda: cli(*args, cwd=policy_world), code)  # hangs fail in `cli`
    finally:
        huge.unlink(missing_ok=True)
    assert len(line) < 1000, f"{len(line)} characters: {line[:300]}"
    if case == "policy_huge":
        assert "bogus" in line


@pytest.mark.parametrize(
    ("source", "name", "length"),
    [("k3", "model.keras", 250), ("k3", "model.keras", 255), ("k2", "legit_oplambda.h5", 250)],
)
def test_long_output_names(world, source, name, length):
    """The temporary name beside the output must fit the file-system limit too."""
    work = world.workdir(f"long_output_{source}_{length}")
    model = _copy(getattr(world, source) / name, work)
    suffix = model.suffix
    output = work / ("n" * (length - len(suffix)) + suffix)
    assert len(output.name) == length
    if length < 255:
        _done(
            world,
            lambda: cli("add-dropout", model.name, "-o", output.name, cwd=work),
            output=output,
        )
        assert sorted(p.name for p in work.iterdir()) == sorted([model.name, output.name])
        return
    run = world.observe(
        lambda: cli("add-dropout", model.name, "-o", output.name, cwd=work),
        allowed=(str(output.relative_to(world.root)),),
    )
    if run.returncode == 0:
        assert output.is_file()
    else:
        assert run.returncode in (1, 2)
        _failure_line(run)
        assert not output.exists()
    assert {p.name for p in work.iterdir()} <= {model.name, output.name}


# -- 8. control characters in names ---------------------------------------------


@pytest.mark.parametrize("command", [["inspect"], ["add-dropout", "--json"]], ids=" ".join)
def test_names_reach_the_output_escaped(world, command):
    """In a pipe: plain columns and JSON (the report of a real rewrite) hold no raw ESC/BEL."""
    work = world.workdir("ansi_" + "_".join(c.strip("-") for c in command))
    model = _copy(world.k3 / "ansi.keras", work)
    output = work / "ansi_dropout.keras"
    run = world.observe(
        lambda: cli(*command, model.name, cwd=work),
        allowed=(str(output.relative_to(world.root)),),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\x1b" not in run.output and "\x07" not in run.output, repr(run.output[:2000])
    if command == ["inspect"]:
        assert MARKUP_NAME in run.stdout
        assert "evil" in run.stdout
    else:
        assert output.is_file()
        report = json.loads(run.stdout)
        assert MARKUP_NAME in json.dumps(report, ensure_ascii=False), report


def test_names_on_a_terminal(world):
    """On a terminal rich draws the table: its own styles only, no markup from names."""
    work = world.workdir("ansi_tty")
    model = _copy(world.k3 / "ansi.keras", work)
    leader, follower = pty.openpty()
    env = _env(COLUMNS="250", LINES="50", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "regularize", "inspect", model.name],
            cwd=work,
            stdout=follower,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        stderr = proc.communicate(timeout=300)[1]
    finally:
        os.close(leader)
    screen = b"".join(chunks)
    assert proc.returncode == 0, stderr[-3000:]
    assert b"evil" in screen, screen[:2000]
    assert b"\x07" not in screen, screen[:2000]
    assert b"\x1b]8;;http:x" not in screen, screen[:2000]
    assert b"evil\x1b[31m" not in screen, screen[:2000]
    assert b"bold]x" in screen, "rich markup in a name was interpreted"


# -- 9. a config nested deeper than the recursion limit -------------------------


def test_deeply_nested_keras2_config_is_one_line(world):
    work = world.workdir("deep_config")
    model = _copy(world.k2 / "deep_config.h5", work)
    line = _refused(world, lambda: cli("inspect", model.name, cwd=work), 1)
    assert "TFOpLambda" not in line and "custom object" not in line, line


# -- 10. sweep on a folder with a file that is not an image ----------------------


@pytest.mark.parametrize(
    ("case", "content"),
    [
        ("text", b"this is not an image\n"),
        # Starts like a PNG, so only TensorFlow's decoder, mid-training, finds it broken.
        ("broken_png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20),
    ],
    ids=["text", "broken_png"],
)
def test_sweep_names_the_file_that_is_not_an_image(world, case, content):
    work = world.workdir(f"sweep_{case}")
    _copy(world.k3 / "tiny.keras", work)
    rng = np.random.default_rng(0)
    for label in ("cls_a", "cls_b"):
        (work / "images" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, size=(4, 4, 1), dtype=np.uint8)
            keras.utils.save_img(work / "images" / label / f"{i}.png", pixels, scale=False)
    (work / "images" / "cls_a" / "bad.png").write_bytes(content)
    args = ["sweep", "tiny.keras", "--data", "images", "--epochs", "1", "--rates", "0,0.2"]
    args += ["--batch-size", "4", "--out", "sweep_out"]
    out = work / "sweep_out"  # may be created; no model in it (asserted below)
    run = world.observe(lambda: cli(*args, cwd=work), allowed=(str(out.relative_to(world.root)),))
    assert run.returncode in (1, 2), run.stderr[-3000:]
    line = _failure_line(run)
    assert "bad.png" in line, line
    assert "internal error" not in line and "Graph execution error" not in line, line
    assert not out.exists() or not any(out.iterdir()), "the failed sweep left files"


# -- 11. a vocabulary file path in a Keras 2 config ------------------------------


def test_vocabulary_file_is_refused(world):
    work = world.workdir("vocab")
    model = _copy(world.k2 / "vocab_file.h5", work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "lookup",
        "vocabulary",
        "--unsafe",
        any_of=("Refusing", "Cannot read model"),
    )


def test_vocabulary_file_is_read_with_unsafe(world):
    """Documented: with --unsafe tf_keras reads the vocabulary file into the model."""
    work = world.workdir("vocab_unsafe")
    model = _copy(world.k2 / "vocab_file.h5", work)
    out = work / "out.h5"
    run = world.observe(
        lambda: cli("add-dropout", model.name, "--unsafe", "-o", out.name, cwd=work),
        allowed=(str(out.relative_to(world.root)),),
        secret_ok=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # tf_keras read the file to build the lookup table (the engine ran the model on
    # strings before writing) and the output still names it: it is read again at load.
    with h5py.File(out, "r") as f:
        config = f.attrs["model_config"]
    assert str(world.vocab).encode() in (config if isinstance(config, bytes) else config.encode())


# -- 12. what a config names: imports, calls, files, memory --------------------
#
# Each attack is refused before anything is deserialized, on every command
# that reads a model (`inspect`, `add-dropout`, `add-dropout --dry-run`), in
# one line that names the layer, the object and why. The fast suite runs the
# main attack of each kind on the three commands and its variants on
# `inspect`; the other commands of a variant are `slow`.

READ_COMMANDS = {
    "inspect": ["inspect"],
    "add": ["add-dropout"],
    "dry_run": ["add-dropout", "--dry-run"],
}


def _commands(fast: tuple[str, ...] = tuple(READ_COMMANDS)) -> list:
    """Parameters for `command`: those in `fast` run in the fast suite, the rest are `slow`."""
    return [
        pytest.param(name, marks=() if name in fast else pytest.mark.slow, id=name)
        for name in READ_COMMANDS
    ]


@pytest.fixture(scope="session")
def k3_attacks(world) -> Path:
    """The Keras 3 attack files (tests/keras3_attacks.py), aimed at the world's paths."""
    import keras3_attacks

    folder = world.root / "keras3_attacks"
    keras3_attacks.build(
        folder, target=world.decoy / "keep.txt", vocab=world.vocab, secret=world.secret
    )
    assert not world.clear_markers() and not world.restore_decoy(), "building an attack fired it"
    return folder


# -- 12a. code execution: a dotted class name in a Keras 2 config -----------------

DOTTED_SAVEDMODELS = {"sm_dotted_lambda": "standardize", "sm_dotted_split": "split"}


@pytest.mark.parametrize("command", _commands())
def test_dotted_lambda_in_savedmodel_is_refused(world, command):
    """`tensorflow.python.keras.layers` / `core.Lambda` as TextVectorization's `standardize`.

    The old check trusted every module under `tensorflow` and compared class
    names with "Lambda" exactly: the dotted name passed, and tf_keras built
    TensorFlow's embedded old Keras `Lambda`, whose bytecode wrote the marker.
    """
    work = world.workdir(f"sm_dotted_{command}")
    model = _copy(world.k2 / "sm_dotted_lambda", work)
    _refused(
        world,
        lambda: cli(*READ_COMMANDS[command], model.name, cwd=work),
        1,
        "core.Lambda",
        "--unsafe",
        any_of=("allowlist", "'tensorflow.python.keras.layers'"),
    )


@pytest.mark.parametrize("command", _commands(fast=("inspect",)))
def test_dotted_lambda_as_split_is_refused(world, command):
    work = world.workdir(f"sm_dotted_split_{command}")
    model = _copy(world.k2 / "sm_dotted_split", work)
    _refused(
        world,
        lambda: cli(*READ_COMMANDS[command], model.name, cwd=work),
        1,
        "core.Lambda",
        "--unsafe",
        any_of=("allowlist", "'tensorflow.python.keras.layers'"),
    )


# What regularize 0.1 did with a Keras 2 SavedModel: rebuild the root model from
# `keras_metadata.pb` with tf_keras' (new-style) deserializer.
_REBUILD_SAVEDMODEL = """
import sys
import tf_keras
from tf_keras.protobuf import saved_metadata_pb2
from tf_keras.src.saving.legacy.saved_model import json_utils
meta = saved_metadata_pb2.SavedMetadata()
meta.ParseFromString(open(sys.argv[1] + "/keras_metadata.pb", "rb").read())
root = json_utils.decode(next(n.metadata for n in meta.nodes if n.node_path == "root"))
try:
    tf_keras.models.model_from_config({key: root[key] for key in ("class_name", "config")})
except Exception as err:
    print(type(err).__name__, err)
"""


@pytest.mark.parametrize("name", list(DOTTED_SAVEDMODELS))
def test_dotted_lambda_runs_its_bytecode_when_unsafe(world, name):
    """The attack is real: with --unsafe, or rebuilt by tf_keras from its metadata, it fires.

    regularize 0.1 rebuilt SavedModels from their metadata outside tf_keras'
    SavedModel scope, where the dotted name resolves; `--unsafe` now rebuilds
    them inside it, where tf_keras' legacy deserializer does not resolve it.
    Either way the marker shows what the file does to that deserializer.
    """
    work = world.workdir(f"{name}_unsafe")
    model = _copy(world.k2 / name, work)
    cli("inspect", model.name, "--unsafe", cwd=work)
    fired = world.clear_markers()
    if not fired:
        env = _env(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run(
            [sys.executable, "-c", _REBUILD_SAVEDMODEL, str(model)],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        fired = world.clear_markers()
    assert fired == [name]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "sm_dotted_activation",
        "sm_dotted_initializer",
        "sm_dotted_regularizer",
        "sm_dotted_constraint",
        "sm_dotted_timedistributed",
        "sm_dotted_bidirectional",
    ],
)
def test_dotted_lambda_elsewhere_in_a_layer_is_refused(world, name):
    """An activation, an initializer, a regularizer, a constraint, a wrapped layer."""
    work = world.workdir(name)
    model = _copy(world.k2 / name, work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "core.Lambda",
        "--unsafe",
        any_of=("allowlist", "'tensorflow.python.keras.layers'"),
    )


def test_dotted_lambda_in_h5_is_refused(world):
    """The same nested object in an `.h5` model config (held by tf_keras before; still held)."""
    work = world.workdir("h5_dotted")
    model = _copy(world.k2 / "dotted_lambda.h5", work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "core.Lambda",
        any_of=("Refusing", "Cannot read model"),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "module"), [("module_os.h5", "'os'"), ("module_subprocess.h5", "'subprocess'")]
)
def test_keras2_config_naming_a_stdlib_module_is_refused(world, name, module):
    """tf_keras imports a config's `module` before anything else checks it."""
    work = world.workdir(Path(name).stem)
    model = _copy(world.k2 / name, work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "hidden",
        module,
        "--unsafe",
    )


# -- 12b. file truncation: a registered keras-hub function in a Lambda ---------------


@pytest.mark.parametrize("command", _commands())
def test_registered_function_that_opens_a_file_is_refused(world, k3_attacks, command):
    """`keras_hub>compute_sentence_piece_proto` with `proto_output_file` = the decoy's file."""
    work = world.workdir(f"sp_truncate_{command}")
    model = _copy(k3_attacks / "sp_truncate.keras", work)
    _refused(
        world,
        lambda: cli(*READ_COMMANDS[command], model.name, cwd=work),
        1,
        "'evil'",
        "--unsafe",
        # Two reasons, either may be named: the function, the file it would open.
        any_of=("compute_sentence_piece_proto", "`proto_output_file`"),
    )


def test_registered_function_truncates_the_file_with_unsafe(world, k3_attacks):
    """The attack is real: Keras calls the function while it infers the Lambda's shape."""
    work = world.workdir("sp_truncate_unsafe")
    model = _copy(k3_attacks / "sp_truncate.keras", work)
    cli("inspect", model.name, "--unsafe", cwd=work)
    assert (world.decoy / "keep.txt").read_bytes() == b"", "the decoy's file was not truncated"
    assert world.restore_decoy()


def test_registered_function_as_a_plain_string_is_refused(world, k3_attacks):
    """The Lambda's `function` as the bare string `keras_hub>compute_sentence_piece_proto`."""
    work = world.workdir("sp_truncate_string")
    model = _copy(k3_attacks / "sp_truncate_string.keras", work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "'evil'",
        "--unsafe",
        any_of=("compute_sentence_piece_proto", "`proto_output_file`"),
    )


def test_registered_function_as_an_activation_is_refused(world, k3_attacks):
    work = world.workdir("activation_registered")
    model = _copy(k3_attacks / "activation_registered.keras", work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "'fc'",
        "compute_sentence_piece_proto",
        "--unsafe",
    )
    # The name is real: with --unsafe, Keras resolves it to keras-hub's function.
    run = cli("inspect", model.name, "--unsafe", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compute_sentence_piece_proto" in run.stdout, run.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("get_file", "get_file"),
        ("load_model", "load_model"),
        ("private_module", "get_file"),
        ("os_module", "system"),
        ("builtins_registered", "builtins>exec"),
    ],
)
def test_lambda_naming_a_non_tensor_function_is_refused(world, k3_attacks, name, function):
    """Functions Keras 3 refuses or cannot find itself: still one refusal line."""
    work = world.workdir(f"k3_{name}")
    model = _copy(k3_attacks / f"{name}.keras", work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        function,
        any_of=("Refusing", "Cannot read model"),
    )


# -- 12c. a local file read into the output: keras-hub tokenizer paths ---------------


@pytest.mark.parametrize("command", _commands())
def test_tokenizer_vocabulary_file_is_refused(world, k3_attacks, command):
    """PARSeqTokenizer's `vocabulary` = the world's vocabulary secret, its asset removed."""
    work = world.workdir(f"parseq_{command}")
    model = _copy(k3_attacks / "parseq_vocab.keras", work)
    _refused(
        world,
        lambda: cli(*READ_COMMANDS[command], model.name, cwd=work),
        1,
        "'tok'",
        "`vocabulary`",
        str(world.vocab),
        "--unsafe",
    )


def test_tokenizer_vocabulary_file_is_read_with_unsafe(world, k3_attacks):
    """The attack is real: with --unsafe, the secret is the output's vocabulary asset."""
    work = world.workdir("parseq_unsafe")
    model = _copy(k3_attacks / "parseq_vocab.keras", work)
    out = work / "out.keras"
    run = world.observe(
        lambda: cli("add-dropout", model.name, "--unsafe", "-o", out.name, cwd=work),
        allowed=(str(out.relative_to(world.root)),),
        secret_ok=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with zipfile.ZipFile(out) as z:
        assets = [n for n in z.namelist() if n.startswith("assets/")]
        # PARSeq keeps its vocabulary as one string and saves it a character a line.
        text = "".join(z.read(n).decode("utf-8", "replace").replace("\n", "") for n in assets)
    assert VOCAB_SECRET.decode() in text, (assets, text[:200])


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("bpe_vocab.keras", ("`vocabulary`", "`merges`")),
        ("whisper_vocab.keras", ("`vocabulary`", "`merges`")),
        ("sentencepiece_proto.keras", ("`proto`",)),
    ],
)
def test_other_tokenizer_files_are_refused(world, k3_attacks, name, keys):
    """BytePairTokenizer / WhisperTokenizer (`vocabulary`, `merges`), SentencePiece (`proto`)."""
    work = world.workdir(Path(name).stem)
    model = _copy(k3_attacks / name, work)
    _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work),
        1,
        "'tok'",
        "--unsafe",
        any_of=keys,
    )


# -- 12d. network and home-folder writes: a public Keras function that downloads ----


class Listener:
    """A TCP socket on 127.0.0.1 that counts the connections it accepts (an HTTP proxy)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the timeout: look at the stop flag again
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> int:
        """Stops listening (the thread ends within its accept timeout); the count."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.sock.close()
        return self.accepted


@pytest.fixture(scope="session")
def home(world, tmp_path_factory) -> Path:
    """A home folder inside the world (so `observe` sees a write there), Keras' config in it."""
    folder = world.root / "home"
    (folder / ".keras").mkdir(parents=True)
    config = {
        "floatx": "float32",
        "epsilon": 1e-07,
        "backend": "tensorflow",
        "image_data_format": "channels_last",
    }
    # Keras writes this file at import when it is missing: present, nothing changes.
    (folder / ".keras" / "keras.json").write_text(json.dumps(config, indent=4))
    return folder


def _reset_home(home: Path) -> None:
    """Removes whatever a run put in the home folder but Keras' config."""
    for path in home.iterdir():
        if path.name != ".keras":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (home / ".keras").iterdir():
        if path.name != "keras.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _network_env(home: Path, proxy: str, matplotlib: Path) -> dict:
    env = {key: proxy for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    env.update(HOME=str(home), KERAS_HOME=str(home / ".keras"), NO_PROXY=None, no_proxy=None)
    # matplotlib keeps its font cache under $HOME: elsewhere, outside the world.
    env["MPLCONFIGDIR"] = str(matplotlib)
    return env


@pytest.mark.parametrize("command", _commands())
def test_downloading_function_is_refused(world, k3_attacks, home, tmp_path, command):
    """A Lambda naming `keras.applications.imagenet_utils.decode_predictions`."""
    work = world.workdir(f"decode_{command}")
    model = _copy(k3_attacks / "decode_predictions.keras", work)
    listener = Listener()
    try:
        env = _network_env(home, listener.url, tmp_path)
        _refused(
            world,
            lambda: cli(*READ_COMMANDS[command], model.name, cwd=work, env=env),
            1,
            "'evil'",
            "decode_predictions",
            "allowlist",
            "--unsafe",
        )
    finally:
        accepted = listener.close()
        _reset_home(home)  # a failed check leaves the download's folder behind
    assert accepted == 0, f"{accepted} connection(s) to the proxy"


def test_downloading_function_in_a_keras3_h5_is_refused(world, k3_attacks, home, tmp_path):
    """The same Lambda in a Keras 3 `.h5`: another loader, the same check."""
    work = world.workdir("decode_h5")
    model = _copy(k3_attacks / "decode_predictions.h5", work)
    listener = Listener()
    try:
        env = _network_env(home, listener.url, tmp_path)
        _refused(
            world,
            lambda: cli("inspect", model.name, cwd=work, env=env),
            1,
            "'evil'",
            "decode_predictions",
            "--unsafe",
        )
    finally:
        accepted = listener.close()
        _reset_home(home)
    assert accepted == 0, f"{accepted} connection(s) to the proxy"


def test_downloading_function_connects_with_unsafe(world, k3_attacks, home, tmp_path):
    """The attack is real: with --unsafe, Keras downloads through the proxy into $KERAS_HOME."""
    work = world.workdir("decode_unsafe")
    model = _copy(k3_attacks / "decode_predictions.keras", work)
    listener = Listener()
    try:
        env = _network_env(home, listener.url, tmp_path)
        before = snapshot(home)
        cli("inspect", model.name, "--unsafe", cwd=work, env=env)
        written = _changes(before, snapshot(home))
    finally:
        accepted = listener.close()
        _reset_home(home)
    assert accepted > 0
    assert written, "nothing was written to $KERAS_HOME"


# -- 12e. memory: weights or constants far beyond what the file stores -------------

# A run reads a small model in about 1 GB; each attack would take 2.3 GB more
# (Keras 2) or 14.4 GB (Keras 3).
PEAK_BOUND = 2_500_000_000


@pytest.mark.parametrize("command", _commands())
def test_huge_constant_of_an_allowed_op_is_refused(world, tmp_path, command):
    """`tf.fill([24000, 24000], 1.0)`: an allowed op, a 2.3 GB constant."""
    work = world.workdir(f"tfop_fill_{command}")
    model = _copy(world.k2 / "tfop_fill.h5", work)
    report = tmp_path / "peak.json"
    line = _refused(
        world,
        lambda: cli(*READ_COMMANDS[command], model.name, cwd=work, measure=report),
        1,
        "'big'",
        "fill",
        "GB",
    )
    assert "--unsafe" not in line, line
    assert peak_rss(report) < PEAK_BOUND, f"peak {peak_rss(report) / 1e9:.2f} GB"


@pytest.mark.slow
@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe"])
@pytest.mark.parametrize("name", ["tfop_ones.h5", "tfop_zeros.h5"])
def test_huge_ones_and_zeros_are_refused(world, tmp_path, name, unsafe):
    """Not lifted by --unsafe: no legitimate file needs it."""
    work = world.workdir(Path(name).stem + ("_unsafe" if unsafe else ""))
    model = _copy(world.k2 / name, work)
    report = tmp_path / "peak.json"
    flags = ["--unsafe"] if unsafe else []
    line = _refused(
        world,
        lambda: cli("inspect", *flags, model.name, cwd=work, measure=report),
        1,
        "'big'",
        "GB",
    )
    assert "--unsafe" not in line, line
    assert peak_rss(report) < PEAK_BOUND, f"peak {peak_rss(report) / 1e9:.2f} GB"


_KERAS2_LOAD = """
import sys, tf_keras
try:
    tf_keras.models.load_model(sys.argv[1])
except Exception as err:
    print(type(err).__name__, err)
"""


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("tfop_eye.h5", "eye"),
        pytest.param("tfop_linalg_eye.h5", "linalg.eye", marks=pytest.mark.slow),
        pytest.param("tfop_pad.h5", "pad", marks=pytest.mark.slow),
        pytest.param("tfop_one_hot.h5", "one_hot", marks=pytest.mark.slow),
        pytest.param("tfop_range.h5", "range", marks=pytest.mark.slow),
        ("tfop_bincount.h5", "math.bincount"),
        pytest.param("tfop_segment_sum.h5", "math.unsorted_segment_sum", marks=pytest.mark.slow),
    ],
)
def test_huge_results_of_other_allowed_ops_are_refused(world, tmp_path, name, function):
    """2.3 GB asked for by one side, a zero among the numbers, a float, a namespace op.

    Each allocates 2.3 GB or more while tf_keras rebuilds the model (measured:
    a peak of 3.2 to 5.5 GB with regularize 0.1 and with the first checker).
    """
    work = world.workdir(Path(name).stem)
    model = _copy(world.k2 / name, work)
    report = tmp_path / "peak.json"
    line = _refused(
        world,
        lambda: cli("inspect", model.name, cwd=work, measure=report),
        1,
        "'big'",
        function,
        "GB",
    )
    assert "--unsafe" not in line, line
    assert peak_rss(report) < PEAK_BOUND, f"peak {peak_rss(report) / 1e9:.2f} GB"


def test_huge_constant_is_allocated_by_tf_keras(world, tmp_path):
    """The attack is real: tf_keras alone allocates the constant while it loads the file."""
    work = world.workdir("tfop_fill_real")
    model = _copy(world.k2 / "tfop_fill.h5", work)
    report = tmp_path / "peak.json"
    subprocess.run(
        [sys.executable, "-c", _MEASURED, str(MEMORY_CAP), str(report)]
        + [sys.executable, "-c", _KERAS2_LOAD, str(model)],
        cwd=work,
        env=_env(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert peak_rss(report) > 24_000 * 24_000 * 4, f"peak {peak_rss(report) / 1e9:.2f} GB"


@pytest.mark.parametrize("command", _commands())
def test_weights_far_beyond_the_file_are_refused(world, k3_attacks, tmp_path, command):
    """`Dense(60000)` on a 60000-wide input in config.json; model.weights.h5 holds 6x6."""
    work = world.workdir(f"big_dense_{command}")
    model = _copy(k3_attacks / "big_dense.keras", work)
    report = tmp_path / "peak.json"
    line = _refused(
        world,
        lambda: cli(*READ_COMMANDS[command], model.name, cwd=work, measure=report),
        1,
        "'big'",
        "Dense",
        "14.4 GB",
    )
    assert "--unsafe" not in line, line
    assert peak_rss(report) < PEAK_BOUND, f"peak {peak_rss(report) / 1e9:.2f} GB"


# Plain Keras 3, with its address space capped: a load that would allocate the
# kernel fails at that allocation (nothing is touched; the cap refuses it).
_KERAS3_LOAD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import keras
try:
    keras.saving.load_model(sys.argv[1])
except Exception as err:
    print(type(err).__name__, err)
"""


def test_weights_far_beyond_the_file_are_allocated_by_keras(world, k3_attacks):
    """The attack is real: Keras 3 alone asks for the 60000 x 60000 kernel."""
    work = world.workdir("big_dense_real")
    model = _copy(k3_attacks / "big_dense.keras", work)
    run = subprocess.run(
        [sys.executable, "-c", _KERAS3_LOAD, str(model)],
        cwd=work,
        env=_env(TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert "OOM" in run.stdout and "[60000,60000]" in run.stdout, run.stdout[-2000:]
