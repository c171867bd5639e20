"""`regularize inspect`, `--policy`, `--preset` and `--dry-run` on the command line."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time

import keras
import pytest
from click.testing import CliRunner
from conftest import assert_exact
from conftest import cnn_functional
from conftest import inserted

from regularize import cli as cli_module
from regularize.cli import cli

FIELDS = {"layer", "layer_class", "kind", "rate", "action", "reason", "shape", "depth", "existing"}


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def model_file(saved_cnn, tmp_path):
    path = tmp_path / "cnn.keras"
    path.write_bytes(saved_cnn.read_bytes())
    return path


def _policy(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_inspect_prints_every_site_and_writes_nothing(model_file):
    before = sorted(p.name for p in model_file.parent.iterdir())
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    result = _invoke("inspect", model_file, "--rate", "0.25")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ACTION",
        "LAYER",
        "CLASS",
        "SHAPE",
        "DEPTH",
        "EXISTING",
        "DROPOUT",
        "REASON",
    ]
    rows = [line.split() for line in lines[1:6]]
    assert [r[:2] for r in rows] == [
        ["skip", "c1"],
        ["insert", "r2"],
        ["insert", "c3"],
        ["insert", "leaky"],
        ["insert", "fc"],
    ]
    assert "SpatialDropout2D(0.25)" in lines[2]
    assert lines[-2:] == [
        "inserted 4 sites: 3 SpatialDropout2D, 1 Dropout",
        "skipped 1 site: 1 feeds BatchNormalization",
    ]
    assert sorted(p.name for p in model_file.parent.iterdir()) == before
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest


def test_dry_run_shows_the_same_plan_as_inspect(model_file, tmp_path):
    policy = _policy(tmp_path, 'preset = "blocks"\n')
    plan = _invoke("inspect", model_file, "--policy", policy).stdout
    dry = _invoke("add-dropout", model_file, "--policy", policy, "--dry-run").stdout
    assert dry == plan + "dry run: nothing written\n"


def test_inspect_json_has_every_field_and_the_policy(model_file, tmp_path):
    policy = _policy(tmp_path, 'preset = "head"\n[[rule]]\nmatch = "r*"\nrate = 0.1\n')
    result = _invoke("inspect", model_file, "--policy", policy, "--rate", "0.4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["policy"] == {
        "preset": "head",
        "rate": 0.4,
        "existing": "keep",
        "mc": False,
        "skip_inference_only": True,
        "rule": [{"match": "r*", "rate": 0.1}],
    }
    assert all(set(site) == FIELDS for site in data["sites"])
    by_layer = {s["layer"]: s for s in data["sites"]}
    assert by_layer["r2"]["rate"] == 0.1 and by_layer["r2"]["action"] == "insert"
    assert 0 < by_layer["r2"]["depth"] < by_layer["fc"]["depth"] <= 1


def test_inspect_on_a_terminal_is_a_rich_table(model_file, monkeypatch):
    monkeypatch.setattr(cli_module, "_is_terminal", lambda: True)
    result = _invoke("inspect", model_file)
    assert result.exit_code == 0, result.output
    assert "REASON" in result.stdout and "feeds BatchNormalization" in result.stdout
    assert result.stdout.rstrip().endswith("skipped 1 site: 1 feeds BatchNormalization")


def test_add_dropout_with_a_policy_file_and_rate(model_file, tmp_path):
    policy = _policy(
        tmp_path, '[[rule]]\nmatch = "fc"\nrate = 0.5\n[[rule]]\nmatch = "c3"\nskip = true\n'
    )
    out = tmp_path / "out.keras"
    result = _invoke("add-dropout", model_file, "--policy", policy, "--rate", "0.2", "-o", out)
    assert result.exit_code == 0, result.output
    new = keras.models.load_model(out)
    assert inserted(new) == {
        "r2__dropout": ("SpatialDropout2D", 0.2),
        "leaky__dropout": ("SpatialDropout2D", 0.2),
        "fc__dropout": ("Dropout", 0.5),
    }
    assert_exact(keras.models.load_model(model_file), new, cnn_functional().x)


def test_preset_flag(model_file, tmp_path):
    out = tmp_path / "out.keras"
    result = _invoke("add-dropout", model_file, "--preset", "blocks", "-o", out)
    assert result.exit_code == 0, result.output
    # The LeakyReLU after the Concatenate closes the only block.
    assert set(inserted(keras.models.load_model(out))) == {"leaky__dropout"}


def test_a_bad_policy_file_is_one_line_exit_2_before_loading(model_file, tmp_path):
    policy = _policy(tmp_path, 'preset = "tail"\n')
    result = _invoke("add-dropout", model_file, "--policy", policy)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"Error: Invalid value for '--policy': Invalid `preset` in {policy}. Expected one of "
        "'all', 'head', 'blocks'. Received: preset='tail'"
    ]
    assert not model_file.with_name("cnn_dropout.keras").exists()
    result = _invoke("inspect", model_file, "--policy", tmp_path / "missing.toml")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_an_unknown_class_in_a_rule_is_one_line_exit_1(model_file, tmp_path):
    policy = _policy(tmp_path, '[[rule]]\nclass = "Conv9D"\nskip = true\n')
    result = _invoke("inspect", model_file, "--policy", policy)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: Invalid `class` in rule 1 in {policy}: no Keras layer class has that name. "
        "Expected a class name such as 'Conv2D' or 'ReLU'. Received: class='Conv9D'"
    ]


def test_a_rule_matching_nothing_is_a_warning_line(model_file, tmp_path):
    policy = _policy(tmp_path, '[[rule]]\nmatch = "block9_*"\nskip = true\n')
    result = _invoke("inspect", model_file, "--policy", policy)
    assert result.exit_code == 0
    assert result.stderr.strip().splitlines() == [
        f"Warning: rule 1 (match='block9_*') of {policy} matches no candidate site"
    ]


def test_inspect_missing_input_exit_2(tmp_path):
    result = _invoke("inspect", tmp_path / "nope.keras")
    assert result.exit_code == 2
    assert "no such file" in result.stderr


def test_remove_dropout_reports_what_it_removed(model_file, tmp_path):
    with_dropout = tmp_path / "with.keras"
    assert _invoke("add-dropout", model_file, "-o", with_dropout).exit_code == 0
    result = _invoke("remove-dropout", with_dropout, "-o", tmp_path / "without.keras")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == ("removed 4 sites: 3 SpatialDropout2D, 1 Dropout")
    assert inserted(keras.models.load_model(tmp_path / "without.keras")) == {}


def test_every_help_starts_without_tensorflow():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from regularize.cli import cli\n"
        "for args in ([], ['inspect'], ['remove-dropout'], ['sweep'], ['add-dropout']):\n"
        "    r = CliRunner().invoke(cli, args + ['--help'])\n"
        "    assert r.exit_code == 0 and 'Usage:' in r.output, (args, r.output)\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_on_a_terminal_only(monkeypatch):
    for quiet, terminal, shown in [(False, True, True), (True, True, False), (False, False, False)]:
        stream = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        with cli_module._progress(quiet) as step:
            step("loading model.keras")
            time.sleep(0.3)  # the spinner refreshes in its own thread
        assert ("loading model.keras" in stream.getvalue()) is shown, (quiet, terminal)


def test_quiet_flag_is_accepted(model_file):
    result = _invoke("inspect", model_file, "-q")
    assert result.exit_code == 0 and result.stderr == ""
