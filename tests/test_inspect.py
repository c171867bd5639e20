"""`regularize inspect`, `--policy`, `--preset` and `--dry-run` on the command line."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time

import keras
import pytest
from click.testing import _NamedTextIOWrapper
from helpers import assert_exact
from helpers import cnn_functional
from helpers import inserted
from helpers import invoke

from regularize.cli import commands as cli_module

FIELDS = {"layer", "layer_class", "kind", "rate", "action", "reason", "shape", "depth", "existing"}


def _policy(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_inspect_prints_every_site_and_writes_nothing(model_file):
    before = sorted(p.name for p in model_file.parent.iterdir())
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    result = invoke("inspect", model_file, "--rate", "0.25")
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
    # A plan: what would be done, not what was done.
    assert lines[-2:] == [
        "would insert 4 sites: 3 SpatialDropout2D, 1 Dropout",
        "would skip 1 site: 1 feeds BatchNormalization",
    ]
    assert sorted(p.name for p in model_file.parent.iterdir()) == before
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest


def test_dry_run_shows_the_same_plan_as_inspect(model_file, tmp_path):
    policy = _policy(tmp_path, 'preset = "blocks"\n')
    plan = invoke("inspect", model_file, "--policy", policy).stdout
    dry = invoke("add-dropout", model_file, "--policy", policy, "--dry-run").stdout
    assert dry == plan + "dry run: nothing written\n"


def test_inspect_json_has_every_field_and_the_policy(model_file, tmp_path):
    policy = _policy(tmp_path, 'preset = "head"\n[[rule]]\nmatch = "r*"\nrate = 0.1\n')
    result = invoke("inspect", model_file, "--policy", policy, "--rate", "0.4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["policy"] == {
        "preset": "head",
        "rate": 0.4,
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
    result = invoke("inspect", model_file)
    assert result.exit_code == 0, result.output
    assert "REASON" in result.stdout and "feeds BatchNormalization" in result.stdout
    assert result.stdout.rstrip().endswith("would skip 1 site: 1 feeds BatchNormalization")


def test_add_dropout_with_a_policy_file_and_rate(model_file, tmp_path):
    policy = _policy(
        tmp_path, '[[rule]]\nmatch = "fc"\nrate = 0.5\n[[rule]]\nmatch = "c3"\nskip = true\n'
    )
    out = tmp_path / "out.keras"
    result = invoke("add-dropout", model_file, "--policy", policy, "--rate", "0.2", "-o", out)
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
    result = invoke("add-dropout", model_file, "--preset", "blocks", "-o", out)
    assert result.exit_code == 0, result.output
    # The LeakyReLU after the Concatenate closes the only block.
    assert set(inserted(keras.models.load_model(out))) == {"leaky__dropout"}


def test_a_bad_policy_file_is_one_line_exit_2_before_loading(model_file, tmp_path):
    policy = _policy(tmp_path, 'preset = "tail"\n')
    result = invoke("add-dropout", model_file, "--policy", policy)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"Error: Invalid value for '--policy': Invalid `preset` in {policy}. Expected one of "
        "'all', 'head', 'blocks'. Received: preset='tail'"
    ]
    assert not model_file.with_name("cnn_dropout.keras").exists()
    result = invoke("inspect", model_file, "--policy", tmp_path / "missing.toml")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_an_unknown_class_in_a_rule_is_one_line_exit_1(model_file, tmp_path):
    policy = _policy(tmp_path, '[[rule]]\nclass = "Conv9D"\nskip = true\n')
    result = invoke("inspect", model_file, "--policy", policy)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: Invalid `class` in rule 1 in {policy}: no Keras layer class has that name. "
        "Expected a class name such as 'Conv2D' or 'ReLU'. Received: class='Conv9D'"
    ]


def test_a_rule_matching_nothing_is_a_warning_line(model_file, tmp_path):
    policy = _policy(tmp_path, '[[rule]]\nmatch = "block9_*"\nskip = true\n')
    result = invoke("inspect", model_file, "--policy", policy)
    assert result.exit_code == 0
    assert result.stderr.strip().splitlines() == [
        f"Warning: rule 1 (match='block9_*') of {policy} matches no candidate site"
    ]


def test_inspect_missing_input_exit_2(tmp_path):
    result = invoke("inspect", tmp_path / "nope.keras")
    assert result.exit_code == 2
    assert "no such file" in result.stderr


def test_remove_dropout_reports_what_it_removed(model_file, tmp_path):
    with_dropout = tmp_path / "with.keras"
    assert invoke("add-dropout", model_file, "-o", with_dropout).exit_code == 0
    result = invoke("remove-dropout", with_dropout, "-o", tmp_path / "without.keras")
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


def test_progress_keeps_turning_while_descriptor_2_is_silenced(tmp_path):
    """TensorFlow's import points descriptor 2 at /dev/null; the line has its own copy."""
    code = (
        "import os, sys, time\n"
        "from regularize.cli import _progress\n"
        "sys.stderr.isatty = lambda: True\n"
        "with _progress(False, 'importing TensorFlow') as step:\n"
        "    saved = os.dup(2)\n"
        "    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)\n"
        "    step('loading model.keras')\n"
        "    time.sleep(0.3)\n"
        "    os.dup2(saved, 2)\n"
    )
    log = tmp_path / "stderr"
    with open(log, "wb") as stream:
        subprocess.run([sys.executable, "-c", code], stderr=stream, check=True)
    shown = log.read_bytes().decode()
    assert "importing TensorFlow ... 0:00" in shown
    assert "loading model.keras ... 0:00" in shown
    assert shown.endswith("\r\x1b[2K")


@pytest.mark.parametrize(("flags", "drawn"), [((), True), (("-q",), False)], ids=["", "-q"])
def test_quiet_hides_the_progress_line(model_file, monkeypatch, flags, drawn):
    """On a terminal, stderr shows a progress line; `-q` shows none.

    CliRunner's streams are no terminal, where the line is never drawn (so
    `-q` alone could not fail there): here its stderr says it is one, and the
    line, drawn on stderr itself since that has no file descriptor, is captured.
    """
    monkeypatch.setattr(_NamedTextIOWrapper, "isatty", lambda self: self.name == "<stderr>")
    result = invoke("inspect", model_file, *flags)
    assert result.exit_code == 0, result.output
    assert ("importing TensorFlow ..." in result.stderr) is drawn, result.stderr
    assert result.stderr.endswith("\r\x1b[2K") is drawn  # erased at the end
    if not drawn:
        assert result.stderr == ""
    assert result.stdout.rstrip().endswith("would skip 1 site: 1 feeds BatchNormalization")


# -- names from a model file cannot drive the terminal -------------------------

# ESC sequences (colour, OSC title and hyperlink), BEL, newline, tab, carriage
# return, DEL, the 8-bit CSI, a bidirectional override, rich markup and emoji codes.
EVIL = {
    "colour": "d\x1b[31mred",
    "osc": "t\x1b]8;;https:x\x07link\x1b]0;title\x07",
    "lines": "a\nb\tc\rd\x7fe\x9b31m",
    "bidi": "abc\u202edef",
    "markup": "[bold]b[red]x[link=http:\\e]l :warning:",
}
UNSAFE = ("\x1b", "\x07", "\n", "\t", "\r", "\x7f", "\x9b", "\u202e")


@pytest.fixture
def evil_model(tmp_path):
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, activation="relu", name=EVIL["bidi"])],
        name="sub\x1b[2J",
    )
    x = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name=EVIL["colour"])(x)
    h = keras.layers.Dense(8, activation="relu", name=EVIL["osc"])(h)
    h = keras.layers.Dense(8, activation="relu", name=EVIL["lines"])(h)
    h = inner(h)
    h = keras.layers.Dense(8, activation="relu", name=EVIL["markup"])(h)
    path = tmp_path / "evil.keras"
    keras.Model(x, keras.layers.Dense(2, name="out")(h), name="m\x1bc").save(path)
    return path


def _escaped(name):
    from regularize.core.text import printable

    return printable(name)


def test_printable_escapes_controls_and_keeps_the_rest():
    from regularize.core.text import printable

    assert printable("block1_conv/relu é 中") == "block1_conv/relu é 中"
    assert printable(EVIL["colour"]) == "d\\x1b[31mred"
    assert printable(EVIL["lines"]) == "a\\nb\\tc\\rd\\x7fe\\x9b31m"
    assert printable(EVIL["bidi"]) == "abc\\u202edef"
    assert printable("\u2028\U000e0001") == "\\u2028\\U000e0001"


def test_inspect_escapes_names_in_plain_columns(evil_model):
    result = invoke("inspect", evil_model)
    assert result.exit_code == 0, result.output
    assert not any(ch in result.stdout.replace("\n", "") for ch in UNSAFE)
    lines = result.stdout.splitlines()
    # Header, one line per site, the summary: the nested model's output feeds
    # a layer of its caller, so it is a site like any other.
    assert len(lines) == 1 + 5 + 1
    layers = [re.split(r"\s{2,}", line)[1] for line in lines[1:-1]]
    assert layers == [
        _escaped(EVIL["colour"]),
        _escaped(EVIL["osc"]),
        _escaped(EVIL["lines"]),
        _escaped("sub\x1b[2J/" + EVIL["bidi"]),
        EVIL["markup"],
    ]


def test_inspect_on_a_terminal_shows_markup_as_text(evil_model, monkeypatch):
    monkeypatch.setattr(cli_module, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "300")
    result = invoke("inspect", evil_model)
    assert result.exit_code == 0, result.output
    assert not any(ch in result.stdout.replace("\n", "") for ch in UNSAFE)
    # As markup, "[bold]", "[red]" and "[link=...]" would vanish and ":warning:" turn into ⚠.
    assert EVIL["markup"] in result.stdout
    assert _escaped(EVIL["osc"]) in result.stdout


def test_inspect_json_escapes_the_names_in_every_field(evil_model):
    """Decoded JSON holds no control character either (`jq -r` would print it raw)."""
    result = invoke("inspect", evil_model, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.isascii()
    data = json.loads(result.stdout)
    layers = [site["layer"] for site in data["sites"]]
    assert layers[:3] == [_escaped(EVIL[k]) for k in ("colour", "osc", "lines")]
    strings = [v for site in data["sites"] for v in site.values() if isinstance(v, str)]
    assert strings and not any(ch in text for text in strings for ch in UNSAFE)


def test_dry_run_and_warnings_escape_names(evil_model, capsys):
    result = invoke("add-dropout", evil_model, "--dry-run")
    assert result.exit_code == 0, result.output
    assert _escaped(EVIL["colour"]) in result.stdout
    assert not any(ch in result.stdout.replace("\n", "") for ch in UNSAFE)
    from regularize.core.report import Report

    cli_module._print_warnings(Report(warnings=["layer 'x\x1b[8m' is \n odd"]))
    assert capsys.readouterr().err == "Warning: layer 'x\\x1b[8m' is \\n odd\n"
