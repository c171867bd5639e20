"""The CLI: exit codes, one-line errors, outputs; one real subprocess run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_exact
from helpers import assert_outputs
from helpers import cnn_functional
from helpers import error_line
from helpers import inserted
from helpers import invoke
from helpers import predict

from regularize.cli import cli


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_dropout_writes_default_output_next_to_input(model_file):
    before = _digest(model_file)
    result = invoke("add-dropout", model_file, "--rate", "0.3")
    assert result.exit_code == 0, result.output
    out = model_file.with_name("cnn_dropout.keras")
    assert result.stdout.splitlines() == [
        "inserted 4 sites: 3 SpatialDropout2D, 1 Dropout",
        "skipped 1 site: 1 feeds BatchNormalization",
        f"wrote {out}",
    ]
    assert _digest(model_file) == before
    new = keras.models.load_model(out)
    assert set(inserted(new)) == {"r2__dropout", "c3__dropout", "leaky__dropout", "fc__dropout"}
    assert_exact(keras.models.load_model(model_file), new, cnn_functional().x)
    assert new.compiled


def test_existing_output_needs_force(model_file, tmp_path):
    out = tmp_path / "out.keras"
    out.write_bytes(b"precious")
    result = invoke("add-dropout", model_file, "-o", out)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: Invalid value for '-o' / '--output': Cannot write model to '{out}': the file "
        "already exists. Pass --force to replace it."
    )
    assert out.read_bytes() == b"precious"
    result = invoke("add-dropout", model_file, "-o", out, "--force")
    assert result.exit_code == 0
    assert zipfile.is_zipfile(out)


def test_an_existing_default_output_is_named_with_o_and_force(model_file):
    """The user never typed -o: the message names the default path, not '-o'."""
    default = model_file.with_name("cnn_dropout.keras")
    default.write_bytes(b"precious")
    result = invoke("add-dropout", model_file)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: Invalid value for the default output (pass -o): Cannot write model to "
        f"'{default}': the file already exists. Pass --force to "
        "replace it."
    )
    assert default.read_bytes() == b"precious"


def test_output_equal_to_input_is_refused(model_file):
    before = _digest(model_file)
    result = invoke("add-dropout", model_file, "-o", model_file, "--force")
    assert result.exit_code == 2
    assert "it is the input model. Expected another path." in error_line(result)
    assert _digest(model_file) == before


@pytest.mark.parametrize(
    ("value", "shown"), [("1.5", "'1.5'"), ("-0.1", "'-0.1'"), ("abc", "'abc'"), ("nan", "'nan'")]
)
def test_bad_rate_exit_2(model_file, value, shown):
    result = invoke("add-dropout", model_file, "--rate", value)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: Invalid value for '--rate': Expected a float in [0, 1). Received: {shown}"
    )
    assert not model_file.with_name("cnn_dropout.keras").exists()


def test_bad_recurrent_rate_exit_2(model_file):
    result = invoke("add-dropout", model_file, "--recurrent-rate", "1")
    assert result.exit_code == 2
    assert "Invalid value for '--recurrent-rate'" in error_line(result)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("out.pt", "unsupported file type. Expected a path ending in `.keras` or `.h5`."),
        ("missing/out.keras", "does not exist."),
        (".", "it is a folder. Expected a file path."),
    ],
)
def test_bad_output_path_exit_2_before_loading(model_file, name, message):
    result = invoke("add-dropout", model_file, "-o", model_file.parent / name)
    assert result.exit_code == 2
    assert message in error_line(result)
    assert "keras" not in result.stdout


def test_missing_input_exit_2(tmp_path):
    result = invoke("add-dropout", tmp_path / "nope.keras")
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: Invalid value for 'INPUT': no such file.")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.keras", b"", "the file is empty (0 bytes)"),
        ("noise.keras", b"\x8f" * 999, "not a `.keras` archive"),
        ("noise.h5", b"\x01" * 999, "not an HDF5 file"),
    ],
)
def test_unreadable_model_exit_1(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke("add-dropout", path)
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith("Error: Cannot read model: ")
    assert message in line
    assert f"Received: path='{path}'" in line
    assert sorted(os.listdir(tmp_path)) == [name]


def test_truncated_and_not_a_model_zip_exit_1(model_file, tmp_path):
    cut = tmp_path / "cut.keras"
    cut.write_bytes(model_file.read_bytes()[:1000])
    result = invoke("add-dropout", cut)
    assert result.exit_code == 1 and "not a `.keras` archive" in error_line(result)
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("data.csv", "1,2")
    result = invoke("add-dropout", other)
    assert result.exit_code == 1 and "no `config.json`" in error_line(result)


def test_debug_shows_the_exception(tmp_path):
    path = tmp_path / "noise.keras"
    path.write_bytes(b"\x8f" * 999)
    result = CliRunner().invoke(cli, ["add-dropout", str(path), "--debug"])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "ModelLoadError"


def test_dry_run_writes_nothing(model_file):
    result = invoke("add-dropout", model_file, "--dry-run")
    assert result.exit_code == 0
    header, first = result.stdout.splitlines()[:2]
    assert header.split() == ["ACTION", "LAYER", "CLASS", "SHAPE", "DEPTH", "EXISTING"] + [
        "DROPOUT",
        "REASON",
    ]
    assert first.split()[:3] == ["skip", "c1", "Conv2D"]
    assert first.endswith("feeds BatchNormalization")
    assert "dry run: nothing written" in result.stdout
    assert sorted(p.name for p in model_file.parent.iterdir()) == ["cnn.keras"]


def test_json_output(model_file, tmp_path):
    out = tmp_path / "j.keras"
    result = invoke("add-dropout", model_file, "-o", out, "--json", "--rate", "0.2")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["output"] == str(out)
    assert data["summary"] == {
        "insert": {"SpatialDropout2D": 3, "Dropout": 1},
        "skip": {"feeds BatchNormalization": 1},
    }
    assert {s["rate"] for s in data["sites"] if s["action"] == "insert"} == {0.2}


def test_lambda_model_needs_unsafe(tmp_path):
    inp = keras.Input((3,))
    x = keras.layers.Dense(3, activation="relu", name="fc")(inp)
    out = keras.layers.Lambda(lambda t: t + 1.0, name="plus")(x)
    path = tmp_path / "lam.keras"
    keras.Model(inp, out).save(path)
    result = invoke("add-dropout", path)
    assert result.exit_code == 1
    assert "--unsafe" in error_line(result)
    result = invoke("add-dropout", path, "--unsafe")
    assert result.exit_code == 0, result.output


def test_subclassed_model_file_is_refused_cleanly(tmp_path):
    module = tmp_path / "net.py"
    module.write_text(
        textwrap.dedent(
            """
            import keras

            @keras.saving.register_keras_serializable(package="t")
            class Net(keras.Model):
                def __init__(self, **kwargs):
                    super().__init__(**kwargs)
                    self.fc = keras.layers.Dense(2)

                def call(self, x):
                    return self.fc(x)
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import net

        model = net.Net()
        model(keras.ops.ones((1, 3)))
        path = tmp_path / "sub.keras"
        model.save(path)
        result = invoke("add-dropout", path, "--custom-objects", module)
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code == 1
    assert "Cannot rewrite subclassed model 'Net'" in error_line(result)


def test_remove_dropout_command(model_file, tmp_path):
    with_dropout = tmp_path / "with.keras"
    assert invoke("add-dropout", model_file, "-o", with_dropout).exit_code == 0
    result = invoke("remove-dropout", with_dropout, "-o", tmp_path / "without.keras")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "removed 4 sites: 3 SpatialDropout2D, 1 Dropout"
    assert inserted(keras.models.load_model(tmp_path / "without.keras")) == {}


def test_help_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from regularize.cli import cli\n"
        "r = CliRunner().invoke(cli, ['add-dropout', '--help'])\n"
        "assert r.exit_code == 0 and '--rate' in r.output, r.output\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_subprocess_then_fresh_process_fits(model_file, tmp_path):
    """The console script, then plain Keras in a process without regularize."""
    out = tmp_path / "fresh.keras"
    # The console script installed next to this interpreter (PATH may hold a shim or nothing).
    script = Path(sysconfig.get_path("scripts")) / "regularize"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "regularize"]
    run = subprocess.run(
        [*command, "add-dropout", str(model_file), "-o", str(out), "--rate", "0.25"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.splitlines()[-1] == f"wrote {out}"
    check = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import keras
        model = keras.models.load_model({str(out)!r})
        assert model.compiled
        names = [layer.name for layer in model.layers]
        assert "fc__dropout" in names and "r2__dropout" in names, names
        x = np.random.default_rng(0).normal(size=(4, 12, 12, 3)).astype("float32")
        y = np.zeros((4, 2), "float32")
        history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert not any(m.startswith("regularize") for m in sys.modules), "regularize imported"
        print("fit ok")
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    fresh = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip() == "fit ok"


def test_sigterm_during_save_leaves_nothing(model_file, tmp_path):
    """An interrupted write leaves neither the output nor a temporary file."""
    out = tmp_path / "out.keras"
    driver = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from regularize.cli import import_keras_quietly
        import_keras_quietly()
        import keras

        def save_then_die(self, path, *args, **kwargs):
            with open(path, "wb") as f:
                f.write(b"half a model")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        keras.Model.save = save_then_die
        from regularize.cli import main
        sys.argv = ["regularize", "add-dropout", {str(model_file)!r}, "-o", {str(out)!r}]
        main()
        """
    )
    before = _digest(model_file)
    run = subprocess.run(
        [sys.executable, "-c", driver],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert run.returncode == 143  # 128 + SIGTERM
    assert run.stderr == "terminated: nothing written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.keras"]
    assert _digest(model_file) == before


def test_custom_objects_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "team_layers.py").write_text(
        textwrap.dedent(
            """
            import keras

            class Shift(keras.layers.Layer):
                def call(self, x):
                    return x + 1.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import team_layers

    inp = keras.Input((3,))
    out = team_layers.Shift(name="shift")(keras.layers.Dense(3, activation="relu", name="fc")(inp))
    path = tmp_path / "shift.keras"
    keras.Model(inp, out).save(path)
    result = invoke("add-dropout", path, "--custom-objects", "team_layers", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[:2] == ["insert", "fc"]
    result = invoke("add-dropout", path, "--custom-objects", "no_such_module_xyz")
    assert result.exit_code == 1
    assert "Cannot read custom objects from 'no_such_module_xyz'" in error_line(result)


def test_python_dash_m_runs():
    run = subprocess.run(
        [sys.executable, "-m", "regularize", "--version"], capture_output=True, text=True
    )
    assert run.returncode == 0
    assert run.stdout.strip() == "regularize, version 0.1.0"


# -- every bad path is one line, before TensorFlow -----------------------------

LONG = "n" * 300  # one path component over the 255-byte NAME_MAX


@pytest.mark.parametrize(
    ("where", "hint"),
    [("input", "'INPUT'"), ("output", "'-o' / '--output'"), ("policy", "'--policy'")],
)
def test_a_name_over_255_bytes_is_one_line_exit_2(model_file, tmp_path, where, hint):
    args = {"input": model_file, "output": tmp_path / "out.keras", "policy": None}
    args[where] = tmp_path / f"{LONG}.keras"
    extra = ["--policy", args["policy"]] if args["policy"] else []
    result = invoke("add-dropout", args["input"], "-o", args["output"], *extra)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(
        f"Error: Invalid value for {hint}: Cannot use path: a name in it is longer than the "
        "file system allows. Expected names of at most 255 bytes. Received: '"
    )
    assert line.endswith(" chars)") and len(line) < 600
    assert not (tmp_path / "out.keras").exists()


def test_a_default_output_name_over_255_bytes_is_one_line(model_file, tmp_path):
    # 245 + "_dropout.keras" passes the limit; the input's own name does not.
    source = tmp_path / ("m" * 245 + ".keras")
    source.write_bytes(model_file.read_bytes())
    result = invoke("add-dropout", source)
    assert result.exit_code == 2
    assert error_line(result).startswith(
        "Error: Invalid value for the default output (pass -o): Cannot use path: a name in it "
        "is longer than the file system allows."
    )
    assert invoke("add-dropout", source, "--dry-run").exit_code == 0


def test_a_symlink_loop_or_a_device_as_policy_is_one_line(model_file, tmp_path):
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    result = invoke("inspect", model_file, "--policy", loop)
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: Invalid value for '--policy': Cannot use path: it is a symlink loop. Expected "
        f"a file, a folder or a link to one. Received: '{loop}'"
    )
    result = invoke("inspect", model_file, "--policy", "/dev/zero")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: Invalid value for '--policy': Cannot read policy file: it is a character "
        "device, not a regular file. Expected a TOML file. Received: '/dev/zero'"
    )


def test_a_fifo_as_policy_is_refused_without_waiting(tmp_path):
    """A real process: opening a FIFO for reading blocks until a writer comes."""
    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    model = Path(__file__).parent.parent / "fixtures" / "cnn.keras"
    run = subprocess.run(
        [sys.executable, "-m", "regularize", "inspect", str(model), "--policy", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "Error: Invalid value for '--policy': Cannot read policy file: it is a named pipe "
        f"(FIFO), not a regular file. Expected a TOML file. Received: '{fifo}'"
    ]
    assert run.stdout == ""


def test_a_deeply_nested_or_huge_policy_is_one_short_line(model_file, tmp_path):
    policy = tmp_path / "deep.toml"
    policy.write_text("rate = " + "[" * 5000 + "]" * 5000)
    result = invoke("add-dropout", model_file, "--policy", policy)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: Invalid value for '--policy': Cannot read policy file '{policy}': it nests "
        "arrays or tables too deeply to parse. Expected `key = value` lines and [[rule]] tables."
    )
    policy.write_text('zzz = "' + "a" * 5_000_000 + '"')
    result = invoke("add-dropout", model_file, "--policy", policy)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.endswith("Received: zzz='" + "a" * 80 + "...' (5000000 chars)")
    assert len(line) - len(str(policy)) < 400  # short, whatever the temporary path


# -- names from a model file cannot drive the terminal -------------------------


def test_the_error_line_and_the_wrote_line_escape_control_characters(model_file, monkeypatch):
    from regularize.core.errors import ModelLoadError
    from regularize.keras3 import io as model_io

    def refuse(*args, **kwargs):
        raise ModelLoadError("Cannot read layer 'a\x1b]0;pwned\x07b\nc\x9b31m': bad")

    monkeypatch.setattr(model_io, "load_model", refuse)
    result = invoke("inspect", model_file)
    assert result.exit_code == 1
    assert error_line(result) == "Error: Cannot read layer 'a\\x1b]0;pwned\\x07b\\nc\\x9b31m': bad"
    monkeypatch.undo()
    out = model_file.with_name("out\x1b[2J\r.keras")
    result = invoke("add-dropout", model_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "wrote " + str(out).replace("\x1b", "\\x1b").replace(
        "\r", "\\r"
    )


# -- a policy that puts dropout nowhere ----------------------------------------


@pytest.fixture
def topless_base(tmp_path):
    """Like a Keras Application without its top: every activation before the last BN."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(4, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    outputs = keras.layers.ReLU(name="out_relu")(x)
    path = tmp_path / "base.keras"
    keras.Model(inputs, outputs).save(path)
    return path


HEAD_EMPTY = (
    "no dropout: it leaves out all 2 candidate sites (1 preset head: before the last "
    "normalization layer, 1 model output). The head preset puts dropout only after the last "
    "normalization layer, and this model has nothing there: a base without its top gets its "
    "head in your own code, so rewrite the model after adding the head, or use --preset blocks."
)


def test_a_policy_that_inserts_nothing_exits_3_and_writes_nothing(topless_base, tmp_path):
    out = tmp_path / "out.keras"
    result = invoke("add-dropout", topless_base, "--preset", "head", "-o", out)
    assert result.exit_code == 3
    assert result.stdout.splitlines() == [
        "skipped 2 sites: 1 preset head: before the last normalization layer, 1 model output"
    ]
    assert error_line(result) == (
        f"Error: The policy inserted {HEAD_EMPTY} Nothing written; pass --allow-empty to write "
        "the model anyway."
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.keras"]


def test_allow_empty_writes_the_model_and_warns(topless_base, tmp_path):
    out = tmp_path / "out.keras"
    result = invoke("add-dropout", topless_base, "--preset", "head", "-o", out, "--allow-empty")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1] == f"wrote {out}"
    assert error_line(result) == f"Warning: The policy inserted {HEAD_EMPTY}"
    assert inserted(keras.models.load_model(out)) == {}


def test_a_plan_that_inserts_nothing_exits_3(topless_base):
    for command in (["inspect"], ["add-dropout", "--dry-run"]):
        result = invoke(*command, topless_base, "--preset", "head")
        assert result.exit_code == 3, command
        assert "would skip 2 sites" in result.stdout
        assert error_line(result) == (
            f"Error: The policy would insert {HEAD_EMPTY} Pass --allow-empty to accept that."
        )
        result = invoke(*command, topless_base, "--preset", "head", "--allow-empty")
        assert result.exit_code == 0
        assert error_line(result).startswith("Warning: The policy would insert no dropout")
    assert sorted(p.name for p in topless_base.parent.iterdir()) == ["base.keras"]


def test_json_of_an_empty_result_has_no_output(topless_base, tmp_path):
    result = invoke("add-dropout", topless_base, "--preset", "head", "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["output"] is None
    assert not topless_base.with_name("base_dropout.keras").exists()


def test_a_rerun_keeping_the_tools_dropout_and_rate_0_are_not_empty(model_file, tmp_path):
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"
    assert invoke("add-dropout", model_file, "-o", first).exit_code == 0
    result = invoke("add-dropout", first, "-o", second)  # the same rate: every site kept
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "kept 4 sites: 4 inserted earlier, same rate"
    assert result.stderr == ""
    # --rate 0 asks for no dropout: removing the tool's is what it is for.
    result = invoke("add-dropout", first, "--rate", "0", "-o", tmp_path / "none.keras")
    assert result.exit_code == 0 and result.stderr == ""
    assert inserted(keras.models.load_model(tmp_path / "none.keras")) == {}


def test_the_models_own_dropout_alone_is_empty_with_its_advice(tmp_path):
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, activation="relu", name="fc")(inputs)
    x = keras.layers.Dropout(0.5, name="own")(x)
    path = tmp_path / "own.keras"
    keras.Model(inputs, keras.layers.Dense(2, name="out")(x)).save(path)
    result = invoke("inspect", path)
    assert result.exit_code == 3
    assert error_line(result) == (
        "Error: The policy would insert no dropout: it leaves out the only candidate site "
        "(1 already followed by Dropout). Dropout the model already has is kept as it is: set "
        'existing = "retarget" in a --policy file to give it the policy\'s rate. Pass '
        "--allow-empty to accept that."
    )


# -- messages that point the right way -----------------------------------------


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        ({"PruneLowMagnitude"}, "Pruning wrappers (PruneLowMagnitude): remove them with "
         "`tfmot.sparsity.keras.strip_pruning` after pruning."),
        ({"ClusterWeights"}, "Clustering wrappers (ClusterWeights): remove them with "
         "`tfmot.clustering.keras.strip_clustering` after clustering."),
        ({"QuantizeWrapperV2", "QuantizeLayer"}, "Quantization-aware training wrappers "
         "(QuantizeLayer, QuantizeWrapperV2): no tfmot function removes them, so a QAT model "
         "cannot become a Keras 3 model"),
    ],
)  # fmt: skip
def test_to_keras3_refusal_names_the_way_out_of_each_wrapper_kind(classes, words):
    from regularize import keras2
    from regularize.core.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as info:
        keras2.refuse_keras3(classes | {"Dense"})
    text = str(info.value)
    assert text.startswith("Cannot convert to Keras 3: the model has tensorflow-model-opt")
    assert words in text
    assert "--" not in text  # a library message: the CLI names its flags
    if "QuantizeLayer" in classes:
        assert "strip_pruning" not in text


def test_a_policy_warning_points_at_the_callers_line(model_file):
    import warnings

    import regularize

    model = keras.models.load_model(model_file)
    policy = regularize.Policy(rules=[{"match": "no_such_layer_7f3a*", "skip": True}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        regularize.add_dropout(model, policy=policy)
    [warning] = [w for w in caught if "no_such_layer_7f3a" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_setting_tf_cpp_min_log_level_keeps_tensorflow_logs_off_stderr(model_file):
    """What the README tells API users (no GPU here: TensorFlow's cuInit fails loudly)."""
    code = textwrap.dedent(
        f"""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import regularize
        model = regularize.load_model({str(model_file)!r})
        regularize.add_dropout(model)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    # TensorFlow 2.21's C++ import banner ("I0000 ...") ignores the variable; errors
    # and warnings ("E0000 ... failed call to cuInit", "W0000 ...") obey it.
    loud = [line for line in run.stderr.splitlines() if line[:1] in "EW" and line[1:5].isdigit()]
    assert loud == [] and "cuInit" not in run.stderr, run.stderr


def test_runs_from_a_working_folder_that_was_removed(tmp_path):
    """`python -m regularize` drops the working folder from its path: one that is gone too."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = (
        "import os, runpy, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
        "sys.argv = ['regularize', '--version']; "
        "runpy.run_module('regularize', run_name='__main__', alter_sys=True)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(gone)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("regularize, version")


def test_add_dropout_mc_keeps_dropout_active_at_inference(model_file, tmp_path):
    """`--mc`: MC layers that fire at inference; remove-dropout gives the original back."""
    original = keras.models.load_model(model_file)
    x = cnn_functional().x
    expected = predict(original, x)
    out = tmp_path / "mc.keras"
    result = invoke("add-dropout", model_file, "--mc", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "inserted 4 sites: 3 SpatialDropout2D, 1 Dropout",
        "skipped 1 site: 1 feeds BatchNormalization",
        f"wrote {out}",
    ]
    mc = keras.models.load_model(out)  # the MC classes are registered by `import regularize`
    assert inserted(mc) == {
        "r2__dropout": ("MCSpatialDropout2D", 0.3),
        "c3__dropout": ("MCSpatialDropout2D", 0.3),
        "leaky__dropout": ("MCSpatialDropout2D", 0.3),
        "fc__dropout": ("MCDropout", 0.3),
    }
    keras.utils.set_random_seed(0)
    first, second = predict(mc, x)[0], predict(mc, x)[0]
    assert not np.array_equal(first, second)  # a new mask at each inference call
    assert not np.array_equal(first, expected[0])
    for old, new in zip(original.weights, mc.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new), err_msg=old.path)
    plain = tmp_path / "plain.keras"
    result = invoke("remove-dropout", out, "-o", plain)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "removed 4 sites: 3 MCSpatialDropout2D, 1 MCDropout"
    assert_outputs(expected, keras.models.load_model(plain), x)
