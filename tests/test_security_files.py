"""Model files that would make the loader read outside them or allocate far beyond them.

Each attack is a small legitimate model edited afterwards, and each test runs
the real command line on it (`python -m regularize`, a fresh process, under a
wrapper that caps its data segment at 8 GB so that a broken defence fails the
test instead of swapping the machine, and reports the peak RSS of every
process it started). Refused means: exit 1, one `Error:` line naming what is
wrong, nothing written, nothing of the secret in the output, a bounded peak
RSS. These refusals hold with `--unsafe` too (resource bounds and data
outside the file are refused always), so each `--unsafe` run is refused the
same way; that each attack is real is shown on the same file by h5py (it reads
the secret) or by plain Keras (slow suite: it runs out of memory).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import h5py
import keras
import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
SECRET = b"TOP-SECRET-file-contents-0123456789abcdef"
RSS_BOUND_MB = 2500
LIMIT = 8 << 30

WRAPPER = textwrap.dedent(
    """
    import json, resource, subprocess, sys
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))
    run = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=cap,
                         stdin=subprocess.DEVNULL, timeout=600)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(json.dumps({{"code": run.returncode, "stdout": run.stdout, "stderr": run.stderr,
                      "peak_mb": peak}}))
    """
).format(limit=LIMIT)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _capped(*command, cwd: Path) -> dict:
    """Runs `command` with its data segment capped; its result and peak RSS in MB."""
    run = subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, command)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _cli(*args, cwd: Path) -> dict:
    return _capped(sys.executable, "-m", "regularize", *args, cwd=cwd)


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _refused(model: Path, *fragments: str, unsafe: bool = False) -> str:
    """`inspect` and `add-dropout` on `model` are refused in one line; nothing is written.

    Returns the line of the first run.
    """
    lines = []
    # With `--unsafe`, `inspect` alone: the same pre-load check serves every command.
    commands = [["inspect"]] if unsafe else [["inspect"], ["add-dropout", "--rate", "0.2"]]
    for args in commands:
        args = [*args, model.name, *(["--unsafe"] if unsafe else [])]
        before = _tree(model.parent)
        run = _cli(*args, cwd=model.parent)
        assert run["code"] == 1, run
        errors = run["stderr"].strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("Error: "), run["stderr"][-3000:]
        assert "Traceback" not in run["stderr"] + run["stdout"]
        for fragment in fragments:
            assert fragment in errors[0], (fragment, errors[0])
        assert "--unsafe" not in errors[0], errors[0]  # refused always: no hint
        assert _tree(model.parent) == before, "the refused run wrote or changed files"
        assert SECRET not in (run["stdout"] + run["stderr"]).encode()
        assert run["peak_mb"] < RSS_BOUND_MB, run["peak_mb"]
        lines.append(errors[0])
    return lines[0]


def _plain_keras_load(model: Path) -> dict:
    code = "import sys, keras\nkeras.saving.load_model(sys.argv[1])\n"
    return _capped(sys.executable, "-c", code, model, cwd=model.parent)


# -- the files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    secret = root / "secret.bin"
    secret.write_bytes(SECRET + bytes(1024))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,), name="features"), keras.layers.Dense(4, name="fc")], name="m"
    )
    plain = root / "plain.keras"
    model.save(plain)
    out: dict[str, Path] = {}

    # 1. The archive's weights file keeps the kernel in another local file.
    weights = root / "weights.h5"
    with zipfile.ZipFile(plain) as archive:
        weights.write_bytes(archive.read("model.weights.h5"))
    with h5py.File(weights, "r+") as f:
        name = "layers/dense/vars/0"
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        f.create_dataset(name, shape, dtype, external=[(str(secret), 0, 64)])
    out["external"] = _rezip(plain, root / "w1" / "external.keras", {"model.weights.h5": weights})

    # 2. A weights dataset of 400 MB of zeros, gzip-compressed to a few hundred kB.
    bomb = root / "bomb.h5"
    shutil.copyfile(weights, bomb)
    with h5py.File(bomb, "r+") as f:
        del f["layers/dense/vars/0"]
        f.create_dataset(
            "layers/dense/vars/0", (10000, 10000), "float32", compression="gzip", fillvalue=0
        )
        f["layers/dense/vars/0"][0, 0] = 1.0  # written, so its chunks exist and compress
    out["inflating"] = _rezip(plain, root / "w2" / "inflating.keras", {"model.weights.h5": bomb})

    # 3. A config.json of 80 MB of blanks, deflated to under 100 kB.
    with zipfile.ZipFile(plain) as archive:
        config = archive.read("config.json")
    big_config = root / "config.json"
    big_config.write_bytes(config[:-1] + b" " * (80 << 20) + config[-1:])
    out["big_config"] = _rezip(
        plain, root / "w3" / "big_config.keras", {"config.json": big_config}, deflate=True
    )

    # 4. Keras 3 `.h5`: a 60000-wide input into Dense(60000): 14.4 GB of weights declared.
    h5 = root / "w4" / "wide.h5"
    h5.parent.mkdir()
    model.save(h5)
    with h5py.File(h5, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layers = config["config"]["layers"]
        layers[0]["config"]["batch_shape"] = [None, 60000]
        layers[1]["config"]["units"] = 60000
        layers[1]["build_config"] = {"input_shape": [None, 60000]}
        f.attrs["model_config"] = json.dumps(config)
    out["wide_h5"] = h5

    # 5. Keras 2 (tfmot-pruned, so the Keras 2 engine): the same 60000-wide Dense.
    pruned = root / "w5" / "pruned_wide.h5"
    pruned.parent.mkdir()
    shutil.copyfile(FIXTURES / "keras2" / "pruned.h5", pruned)
    with h5py.File(pruned, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layers = config["config"]["layers"]
        layers[0]["config"]["batch_input_shape"] = [None, 60000]
        layers[1]["config"]["layer"]["config"]["units"] = 60000
        layers[1]["config"]["layer"]["build_config"] = {"input_shape": [None, 60000]}
        f.attrs["model_config"] = json.dumps(config)
    out["wide_keras2"] = pruned
    return out


def _rezip(src: Path, dst: Path, replace: dict, *, deflate: bool = False) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w", method) as out:
        for info in archive.infolist():
            data = replace[info.filename].read_bytes() if info.filename in replace else None
            out.writestr(info.filename, data if data is not None else archive.read(info))
    return dst


# -- refused, with and without --unsafe -------------------------------------------


@pytest.mark.parametrize("unsafe", [False, True], ids=["default", "unsafe"])
def test_archive_weights_read_from_another_file_are_refused(files, unsafe):
    _refused(files["external"], "external file", "secret.bin", "vars/0", unsafe=unsafe)


@pytest.mark.parametrize("unsafe", [False, True], ids=["default", "unsafe"])
def test_inflating_weights_dataset_is_refused(files, unsafe):
    _refused(files["inflating"], "400.0 MB", "vars/0", "compressed or never written", unsafe=unsafe)


def test_oversized_config_is_refused(files):
    _refused(files["big_config"], "config.json", "83.9 MB")


@pytest.mark.parametrize("unsafe", [False, True], ids=["default", "unsafe"])
def test_keras3_h5_declaring_weights_it_does_not_store_is_refused(files, unsafe):
    _refused(files["wide_h5"], "'fc' (Dense)", "14.4 GB", "would allocate", unsafe=unsafe)


@pytest.mark.parametrize("unsafe", [False, True], ids=["default", "unsafe"])
def test_keras2_h5_declaring_weights_it_does_not_store_is_refused(files, unsafe):
    _refused(
        files["wide_keras2"], "(PruneLowMagnitude)", "28.8 GB", "would allocate", unsafe=unsafe
    )


# -- the attacks are real: plain Keras on the same files ---------------------------------


def test_the_archive_really_reads_the_other_file(files, tmp_path):
    """Any HDF5 reader of the archive's weights gets the secret as the kernel (Keras 3.15
    refuses external datasets itself when it loads an archive: the check is a second wall)."""
    member = tmp_path / "weights.h5"
    with zipfile.ZipFile(files["external"]) as archive:
        member.write_bytes(archive.read("model.weights.h5"))
    with h5py.File(member, "r") as f:
        assert f["layers/dense/vars/0"][()].tobytes()[: len(SECRET)] == SECRET


@pytest.mark.slow
def test_plain_keras_tries_to_allocate_what_the_file_does_not_store(files):
    run = _plain_keras_load(files["wide_h5"])
    assert run["code"] != 0
    assert "OOM" in run["stderr"] or "MemoryError" in run["stderr"], run["stderr"][-2000:]
