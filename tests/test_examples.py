"""The digits examples reproduce: the same command twice gives the same numbers.

Each run is a fresh process, as a user's would be, so nothing (seeds, TensorFlow's thread pools,
traced functions) carries over from the first run to the second.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# One seed, one epoch, the baseline and one dropout rate (masks on the inputs and the
# recurrent state): about 30 s of CPU time per run.
QUICK = ("--seeds", "0", "--epochs", "1", "--rates", "0,0.5")
# Left out of the comparison: they measure time, not the model.
TIMES = {"seconds", "cpu_seconds"}


def _numbers(value):
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.slow
def test_digits_lstm_twice_gives_the_same_numbers(tmp_path):
    """Two runs of one short example, in two processes at once; the second with `--out`."""
    reference = _digests(EXAMPLES / "results")
    # CPU only: two processes that each take a whole GPU's memory would fail, and the test
    # is about the CPU runs the README reports.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    first, second = tmp_path / "first", tmp_path / "second"
    commands = [
        (first, [*QUICK]),
        (second, [*QUICK, "--out", str(second / "chosen")]),
    ]
    runs = []
    for cwd, args in commands:
        cwd.mkdir()
        command = [sys.executable, str(EXAMPLES / "digits_lstm.py"), *args]
        runs.append(
            subprocess.Popen(
                command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for run in runs:
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output.decode(errors="replace")[-3000:]

    # The default folder is in the working folder, and `--out` replaces it.
    default = first / "regularize-results" / "digits_lstm"
    assert sorted(p.name for p in default.iterdir()) == ["digits_lstm.json", "digits_lstm.png"]
    assert not (second / "regularize-results").exists()
    # The reference results in the repository are only written when asked for.
    assert _digests(EXAMPLES / "results") == reference

    a = json.loads((default / "digits_lstm.json").read_text())
    b = json.loads((second / "chosen" / "digits_lstm.json").read_text())
    assert a["run"] == {"threads": 1, "op_determinism": True}
    variants = a["runs"][0]["variants"]
    assert [v["rate"] for v in variants] == [0.0, 0.5]
    assert all(len(v["history"]["val_accuracy"]) == 1 for v in variants)
    assert _numbers(a) == _numbers(b)  # exactly: every float of every epoch


@pytest.mark.slow
def test_digits_transfer_twice_gives_the_same_numbers(tmp_path):
    """The transfer-learning example's tiny mode, twice in two processes: the same numbers."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        command = [
            sys.executable, str(EXAMPLES / "digits_transfer.py"), "--tiny",
            "--out", str(tmp_path / name / "out"),
        ]  # fmt: skip
        runs.append(
            subprocess.Popen(
                command,
                cwd=tmp_path / name,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = []
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output.decode(errors="replace")[-3000:]
        outputs.append(output.decode())
    a, b = (
        json.loads((tmp_path / name / "out" / "digits_transfer.json").read_text())
        for name in ("first", "second")
    )
    for phase in ("frozen", "unfrozen"):
        assert a[phase]["seeds"] == [0, 1]
        assert [v["label"] for v in a[phase]["variants"]] == [
            "none", "none", "all@0.3", "all@0.3", "drop_path@0.1", "drop_path@0.1"
        ]  # fmt: skip
        assert set(a[phase]["vs_baseline"]["all@0.3"]) >= {"val_accuracy", "best_val_accuracy"}
        assert sorted(p.name for p in (tmp_path / "first" / "out").iterdir()) == [
            "digits_transfer.json",
            "digits_transfer_frozen.png",
            "digits_transfer_unfrozen.png",
        ]
    assert _numbers(a) == _numbers(b)  # exactly: every float of every epoch and seed
    assert "| variant | val acc |" in outputs[0]
