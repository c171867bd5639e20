"""`regularize sweep`: variants, resume, results, plot, the CLI command and its errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

# The module, even if the package exports a `sweep` function of the same name.
sw = importlib.import_module("regularize.sweep")
training = importlib.import_module("regularize.sweep.training")
from regularize.cli.sweep import sweep as sweep_command  # noqa: E402
from regularize.core.errors import PolicyError  # noqa: E402

L = keras.layers
PNG = b"\x89PNG\r\n\x1a\n"


def _model(compiled=True, softmax=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            L.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
            L.Flatten(name="flat"),
            L.Dense(16, activation="relu", name="fc"),
            L.Dense(3, activation="softmax" if softmax else None, name="out"),
        ],
        name="tiny",
    )
    if compiled:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def _arrays(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype("int32")
    x = rng.normal(size=(n, 4, 4, 1)).astype("float32") * 0.5
    x[np.arange(n), y, 0, 0] += 2.0  # learnable, and noisy enough to overfit
    return x, y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    x_train, y_train = _arrays(48, 1)
    x_val, y_val = _arrays(24, 2)
    npz = root / "data.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
    model = root / "tiny.keras"
    _model().save(model)
    return root, model, npz


@pytest.fixture(scope="module")
def first_run(files):
    root, model, npz = files
    out = root / "out"
    result = sw.run_sweep(model, npz, [0, 0.5], epochs=2, out=out, seeds=3, batch_size=16)
    return result, out


def test_sweep_writes_every_result(first_run):
    result, out = first_run
    assert [v.rate for v in result.variants] == [0.0, 0.5]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "curves.png",
        "results.json",
        "variant-0-seed3.json",
        "variant-0-seed3.keras",
        "variant-0.5-seed3.json",
        "variant-0.5-seed3.keras",
    ]
    assert (out / "curves.png").read_bytes()[:8] == PNG
    mask = os.umask(0)
    os.umask(mask)
    for name in ("curves.png", "results.json", "variant-0-seed3.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name  # not mkstemp's 0600
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    assert saved["best_rate"] == result.best_rate
    for v in result.variants:
        assert v.epochs == 2 and len(v.history["val_accuracy"]) == 2
        assert v.gap == pytest.approx(v.train_accuracy - v.val_accuracy)
        assert v.best_val_accuracy == max(v.history["val_accuracy"])
        assert v.metric == "accuracy"  # added to the model's compile config
    assert result.compile_note == "compiled like the model (accuracy added to the metrics)"
    baseline, dropout = result.variants
    assert baseline.sites == ["skipped 3 sites: 2 rate is 0, 1 model output"]
    assert dropout.sites[0] == "inserted 2 sites: 1 SpatialDropout2D, 1 Dropout"
    # Each variant file is the variant itself: dropout in the 0.5 one only.
    with_dropout = keras.models.load_model(out / "variant-0.5-seed3.keras")
    kinds = {type(layer).__name__ for layer in with_dropout.layers}
    assert {"SpatialDropout2D", "Dropout"} <= kinds
    assert not any(
        isinstance(layer, L.Dropout)
        for layer in keras.models.load_model(out / "variant-0-seed3.keras").layers
    )


def test_table_marks_the_best_rate(first_run):
    result, _ = first_run
    lines = result.table().splitlines()
    assert lines[0].split() == [
        "rate",
        "train",
        "acc",
        "val",
        "acc",
        "best",
        "val",
        "acc",
        "gap",
    ] + ["epochs"]
    marked = [line for line in lines[1:3] if line.split()[1] == "*"]
    assert len(marked) == 1
    assert marked[0].split()[0] == sw.format_rate(result.best_rate)
    assert lines[-1].startswith("* best rate")


def test_resume_trains_only_unfinished_variants_and_reproduces_them(files, first_run, monkeypatch):
    _, model, npz = files
    result, out = first_run
    (out / "variant-0.5-seed3.json").unlink()
    trained = []
    real = training.train_variant

    def spy(run, variant, *args):
        trained.append(variant.rate)
        return real(run, variant, *args)

    monkeypatch.setattr(training, "train_variant", spy)
    again = sw.run_sweep(model, npz, [0, 0.5], epochs=2, out=out, seeds=3, batch_size=16)
    assert trained == [0.5]
    assert [v.resumed for v in again.variants] == [True, False]
    assert f"resumed 1 finished run from {out} (0)" in again.notes
    # Same start weights, seed and batch order: trained alone, after another
    # sweep in this process, the variant learns exactly what it learned first.
    assert again.variants[1].history == result.variants[1].history  # every float, exactly
    assert again.variants[1].train_accuracy == result.variants[1].train_accuracy
    assert (out / "variant-0.5-seed3.json").is_file()
    monkeypatch.setattr(training, "train_variant", None)  # nothing left to train
    third = sw.run_sweep(model, npz, [0.5], epochs=2, out=out, seeds=3, batch_size=16)
    assert [v.rate for v in third.variants] == [0.0, 0.5]
    assert third.notes[0] == "rate 0 (the baseline) added to the rates"


def test_resume_refuses_a_folder_of_another_sweep(files, first_run):
    _, model, npz = files
    _, out = first_run
    with pytest.raises(sw.SweepError, match=r"Cannot resume: .* \(epochs differ"):
        sw.run_sweep(model, npz, [0, 0.5], epochs=3, out=out, seeds=3, batch_size=16)


def test_input_model_is_unchanged_and_default_compile_is_stated(files, tmp_path, monkeypatch):
    _, _, npz = files
    model = _model(compiled=False, softmax=False)
    before = [np.array(v) for v in model.variables]
    result = sw.run_sweep(model, npz, [0, 0.3], epochs=1, out=tmp_path / "o", batch_size=16)
    for a, b in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, np.array(b))
    assert not model.compiled
    assert result.compile_note == (
        "the model is not compiled: using the default Adam(learning_rate=0.001), "
        "SparseCategoricalCrossentropy(from_logits=True), metrics=['accuracy']"
    )
    assert result.variants[0].metric == "accuracy"
    # One epoch: the saved variants hold the last weights. The train accuracy
    # is theirs in inference mode, not fit()'s running one with dropout on.
    arrays = np.load(npz)
    for v in result.variants:
        saved = keras.models.load_model(tmp_path / "o" / v.model_file)
        predicted = saved.predict(arrays["x_train"], verbose=0).argmax(axis=-1)
        assert v.train_accuracy == pytest.approx((predicted == arrays["y_train"]).mean())
    # A model built again (Keras names its optimizer "adam_1" now) resumes.
    monkeypatch.setattr(training, "train_variant", None)
    again = sw.run_sweep(
        _model(False, False), npz, [0, 0.3], epochs=1, out=tmp_path / "o", batch_size=16
    )
    assert [v.resumed for v in again.variants] == [True, True]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    x, y = _arrays(30, 4)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"class_{label}"
        folder.mkdir(exist_ok=True)
        pixels = np.clip(image * 60 + 128, 0, 255).astype("uint8")
        keras.utils.save_img(folder / f"{i}.png", pixels, scale=False)
    return root


def test_image_folder_and_save_best(files, image_folder, tmp_path):
    _, model, _ = files
    best = tmp_path / "best.keras"
    result = sw.run_sweep(
        model,
        image_folder,
        [0.2],
        epochs=1,
        out=tmp_path / "o",
        validation_split=0.3,
        save_best=best,
        batch_size=8,
    )
    data = result.settings["data"]
    assert (data["kind"], data["train"], data["val"], data["classes"]) == ("folder", 21, 9, 3)
    assert data["color_mode"] == "grayscale" and data["image_size"] == [4, 4]
    assert result.best_model == best
    loaded = keras.models.load_model(best)
    has_dropout = any(isinstance(layer, L.Dropout) for layer in loaded.layers)
    assert has_dropout == (result.best_rate > 0)
    with pytest.raises(Exception, match="already exists"):
        sw.run_sweep(model, image_folder, [0.2], epochs=1, out=tmp_path / "o", save_best=best)


def test_mirrored_strategy_runs_on_this_machine(files, tmp_path):
    _, model, npz = files
    result = sw.run_sweep(
        model, npz, [0, 0.5], epochs=1, out=tmp_path / "o", strategy="mirrored", batch_size=16
    )
    assert result.settings["strategy"] == "MirroredStrategy"
    assert [v.epochs for v in result.variants] == [1, 1]


def test_plot_draws_mean_and_band_of_several_runs(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    plot = importlib.import_module("regularize.sweep.plot")
    history = {"accuracy": [0.5, 0.7], "val_accuracy": [0.4, 0.5], "loss": [1.0, 0.5]}
    runs = {
        0.0: [{**history, "val_loss": [1.2, 1.1]}, {**history, "val_loss": [1.4, 1.0]}],
        "head@0.5": [{**history, "val_loss": [1.0, 0.9], "accuracy": [0.3, 0.6]}],
    }
    fig = plot.draw_curves(runs, title="t")
    try:
        accuracy, loss = fig.axes
        assert [line.get_label() for line in accuracy.lines] == [
            "rate 0 train (fit)",
            "rate 0 val",
            "head@0.5 train (fit)",
            "head@0.5 val",
        ]
        assert [list(line.get_ydata()) for line in accuracy.lines] == [
            [0.5, 0.7], [0.4, 0.5], [0.3, 0.6], [0.4, 0.5]
        ]  # fmt: skip
        # The mean of two runs, and a band only for the variant with two runs.
        assert list(loss.lines[1].get_ydata()) == pytest.approx([1.3, 1.05])
        bands = [c for c in loss.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2  # rate 0: train and val; head@0.5 (one run): none
        assert loss.get_yscale() == "log" and fig._suptitle.get_text() == "t"
        assert [t.get_text() for t in accuracy.get_legend().get_texts()] == [
            line.get_label() for line in accuracy.lines
        ]
    finally:
        plt.close(fig)
    path = sw.plot_curves(runs, tmp_path / "p.png", title="t")
    assert path.read_bytes()[:8] == PNG
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (462, 1210)  # 11 x 4.2 inches at 110 dpi
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20  # not blank
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,abc", "every entry must be a float"),
        ("0,1.0", "1.0 is not a float in [0, 1)"),
        ("-0.1", "-0.1 is not a float in [0, 1)"),
        ("0.2,0.2", "a rate is given twice"),
        ("", "every entry must be a float"),
    ],
)
def test_parse_rates_refuses(text, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace(")", r"\)")):
        sw.parse_rates(text)


def test_parse_rates_sorts():
    assert sw.parse_rates("0.5, 0, 0.2") == (0.0, 0.2, 0.5)


# -- the command --------------------------------------------------------------


def _group():
    """The command under the project's own group class (one-line errors)."""
    from regularize import cli

    main = getattr(cli, "main", None)
    base = main if isinstance(main, click.Group) else cli.cli
    return type(base)(name="regularize", commands={"sweep": sweep_command})


def _invoke(*args):
    return CliRunner().invoke(_group(), ["sweep", *map(str, args)], catch_exceptions=False)


def _error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_command_prints_table_and_writes_best(files, tmp_path):
    _, model, npz = files
    best = tmp_path / "best.keras"
    out = tmp_path / "o"
    result = _invoke(
        model, "--data", npz, "--rates", "0,0.3", "--epochs", "1", "--out", out,
        "--save-best", best, "--batch-size", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "compile: compiled like the model (accuracy added to the metrics)"
    assert lines[1].split()[0] == "rate"
    assert lines[-2] == f"wrote {out / 'results.json'} and {out / 'curves.png'}"
    assert lines[-1].startswith("wrote the best variant (rate ") and lines[-1].endswith(str(best))
    assert best.is_file()


def _bad_folder(root):
    folder = root / "flat_images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("rates", "Invalid value for '--rates': Invalid `rates`: 2.0 is not a float in [0, 1)"),
        ("letters", "Invalid value for '--rates': Invalid `rates`: every entry must be a float"),
        ("missing_data", "Invalid value for '--data': Cannot read data: no such file or folder."),
        ("no_keys", "Invalid value for '--data': Cannot read data: the `.npz` file has no x_val"),
        ("flat", "Invalid value for '--data': Cannot read data: the folder has no subfolder"),
        ("missing_model", "Invalid value for 'MODEL': no such file."),
        ("model_suffix", "Invalid value for 'MODEL': unsupported file type '.pt'."),
        ("epochs", "Invalid value for '--epochs': 0 is not in the range x>=1."),
        ("recurrent", "Invalid value for '--recurrent-rate': Expected a float in [0, 1) or"),
        ("policy", "Invalid value for '--policy': Cannot read policy file: no such file."),
    ],
)
def test_command_errors_are_one_line(files, tmp_path, case, message):
    _, model, npz = files
    data, rates, epochs, extra = npz, "0,0.5", "1", []
    if case == "rates":
        rates = "0,2"
    elif case == "letters":
        rates = "0,x"
    elif case == "missing_data":
        data = tmp_path / "nothing.npz"
    elif case == "no_keys":
        data = tmp_path / "partial.npz"
        np.savez(data, x_train=np.zeros((2, 4, 4, 1)), y_train=np.zeros(2))
    elif case == "flat":
        data = _bad_folder(tmp_path)
    elif case == "missing_model":
        model = tmp_path / "nothing.keras"
    elif case == "model_suffix":
        model = tmp_path / "model.pt"
        model.write_bytes(b"weights")
    elif case == "epochs":
        epochs = "0"
    elif case == "recurrent":
        extra = ["--recurrent-rate", "lots"]
    elif case == "policy":
        extra = ["--policy", tmp_path / "nothing.toml"]
    result = _invoke(model, "--data", data, "--rates", rates, "--epochs", epochs, *extra)
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith("Error: ")
    assert message in line


def test_command_runtime_error_is_one_line_exit_1(files, tmp_path):
    _, model, _ = files
    data = tmp_path / "wrong_shape.npz"
    x, y = np.zeros((4, 5, 5, 1), "float32"), np.zeros(4, "int32")
    np.savez(data, x_train=x, y_train=y, x_val=x, y_val=y)
    result = _invoke(model, "--data", data, "--epochs", "1", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert _error_line(result) == (
        "Error: The data does not fit the model: x_train samples have shape (5, 5, 1), "
        "the model expects (4, 4, 1). Received: x_train shape (n, 5, 5, 1)"
    )


def test_command_resume_error_names_the_out_flag(files, first_run):
    _, model, npz = files
    _, out = first_run
    result = _invoke(
        model, "--data", npz, "--rates", "0,0.5", "--epochs", "3", "--seed", "3",
        "--batch-size", "16", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith(f"Error: Invalid value for '--out': Cannot resume: '{out}' holds ")
    assert line.endswith("Choose another output folder, or delete that one.")


def _fake_sweep(monkeypatch, behave):
    """Replaces the library's sweep: records its keyword arguments, then `behave(kwargs)`."""
    seen = {}

    def fake(model, data, rates, **kwargs):
        seen.update(kwargs)
        return behave(kwargs)

    monkeypatch.setattr(sw, "run_sweep", fake)
    return seen


def test_command_quiet_turns_the_progress_display_off(files, monkeypatch):
    _, model, npz = files

    def stop(kwargs):
        raise sw.SweepError("stop here")

    seen = _fake_sweep(monkeypatch, stop)
    for flags, progress in (([], None), (["-q"], False), (["--quiet"], False)):
        result = _invoke(model, "--data", npz, "--epochs", "1", *flags)
        assert result.exit_code == 1 and _error_line(result) == "Error: stop here"
        assert seen["progress"] is progress, flags


def test_command_interrupted_says_what_it_keeps(files, tmp_path, monkeypatch):
    _, model, npz = files
    out = tmp_path / "o"

    def interrupted(kwargs):
        out.mkdir(exist_ok=True)
        if (out / "variant-0.json").exists():
            (out / "variant-0.5-seed3.json").write_text("{}")
        (out / "variant-0.json").write_text("{}")
        raise KeyboardInterrupt

    _fake_sweep(monkeypatch, interrupted)
    result = _invoke(model, "--data", npz, "--epochs", "1", "--out", out)
    assert result.exit_code == 130
    assert result.stderr == (
        f"interrupted: 1 finished variant kept in {out}; run the same command again to resume\n"
    )
    result = _invoke(model, "--data", npz, "--epochs", "1", "--out", out)
    assert "interrupted: 2 finished variants kept in" in result.stderr
    monkeypatch.setattr(sw, "run_sweep", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    result = _invoke(model, "--data", npz, "--epochs", "1", "--out", tmp_path / "new")
    assert (result.exit_code, result.stderr) == (130, "interrupted: nothing written\n")


def test_command_module_imports_no_tensorflow():
    code = (
        "import sys, regularize.cli.sweep, regularize.sweep; "
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_command_json_resumes_a_finished_sweep(files, first_run, tmp_path):
    _, model, npz = files
    _, out = first_run
    moved = tmp_path / "elsewhere.npz"  # same data at another path (another machine)
    moved.write_bytes(npz.read_bytes())
    result = _invoke(
        model, "--data", moved, "--rates", "0,0.5", "--epochs", "2", "--seed", "3",
        "--batch-size", "16", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [v["rate"] for v in data["variants"]] == [0.0, 0.5]
    assert data["notes"] == [f"resumed 2 finished runs from {out} (0, 0.5)"]
    assert data == json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_keras_tuner_chief_and_two_workers_share_the_variants(files, tmp_path):
    """A distributed KerasTuner search on this machine: 3 processes, as on 3 machines."""
    import socket

    import keras_tuner  # noqa: F401  in the `test` extra: a missing one fails here

    _, model, npz = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "shared"
    args = [model, "--data", npz, "--rates", "0,0.2,0.5", "--epochs", "1", "--out", out]
    code = "from regularize.cli.sweep import sweep; sweep(prog_name='regularize sweep')"
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=str(port),
    )
    procs = {
        tuner_id: subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args), "--batch-size", "16", "--keras-tuner"],
            env={**env, "KERASTUNER_TUNER_ID": tuner_id},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tuner_id in ("chief", "tuner0", "tuner1")
    }
    outputs = {}
    for tuner_id, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (tuner_id, stderr[-2000:])
        outputs[tuner_id] = stdout
    trained = []
    for tuner_id in ("tuner0", "tuner1"):
        line = next(x for x in outputs[tuner_id].splitlines() if "KerasTuner worker" in x)
        rates = line.split("KerasTuner worker: trained ")[1].split(";")[0]
        trained += [] if rates == "(none)" else rates.split(", ")
    assert sorted(trained) == ["0", "0.2", "0.5"]  # each variant trained once
    assert "note: KerasTuner chief: the workers trained the variants" in outputs["chief"]
    saved = json.loads((out / "results.json").read_text())
    assert [v["rate"] for v in saved["variants"]] == [0.0, 0.2, 0.5]


# -- a bad file in an image folder is named ------------------------------------


def _copy_images(image_folder, tmp_path):
    import shutil

    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    return data


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"label,text\n1,hello\n", "is not an image (it does not start like a BMP, GIF, JPEG or"),
        (b"", "is not an image (it does not start like a BMP, GIF, JPEG or"),
        (None, "is not a regular file."),
    ],
    ids=["csv", "empty", "fifo"],
)
def test_a_file_that_is_not_an_image_is_named_before_training(
    files, image_folder, tmp_path, content, problem
):
    _, model, _ = files
    data = _copy_images(image_folder, tmp_path)
    bad = data / "class_1" / "notes.JPG"
    if content is None:
        os.mkfifo(bad)  # reading it would block: only its type is looked at
    else:
        bad.write_bytes(content)
    (data / "class_1" / "readme.txt").write_text("not listed: no image suffix")
    result = _invoke(model, "--data", data, "--epochs", "1", "--out", tmp_path / "o")
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith(
        f"Error: Invalid value for '--data': Cannot read data: the file '{bad}' "
    )
    assert problem in line
    assert "Expected only BMP, GIF, JPEG or PNG images in the class subfolders" in line
    assert line.endswith(f". Received: data='{data}'")
    assert not (tmp_path / "o").exists()


def test_a_corrupt_image_is_named_when_training_fails(files, image_folder, tmp_path):
    """A PNG signature with nothing after it passes the up-front check and fails in TensorFlow."""
    _, model, _ = files
    data = _copy_images(image_folder, tmp_path)
    bad = data / "class_2" / "broken.png"
    bad.write_bytes(PNG + b"\x00" * 12)
    result = _invoke(
        model, "--data", data, "--epochs", "1", "--out", tmp_path / "o", "--rates", "0",
        "--batch-size", "8",
    )  # fmt: skip
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(
        f"Error: Cannot read data: the file '{bad}' cannot be decoded as an image ("
    )
    assert line.endswith(
        "Expected only BMP, GIF, JPEG or PNG images in the class subfolders: remove or replace "
        f"that file. Received: data='{data}'"
    )
    assert "{{" not in line and "[Op:" not in line


# -- a failed sweep leaves nothing; -q hides a progress display that shows -----


def test_a_failed_sweep_leaves_no_empty_out_folder(files, tmp_path):
    _, model, _ = files
    data = tmp_path / "wrong_shape.npz"
    x, y = np.zeros((4, 5, 5, 1), "float32"), np.zeros(4, "int32")
    np.savez(data, x_train=x, y_train=y, x_val=x, y_val=y)
    out = tmp_path / "new" / "o"
    with pytest.raises(sw.DataError, match="does not fit the model"):
        sw.run_sweep(model, data, [0, 0.5], epochs=1, out=out)
    assert list(tmp_path.iterdir()) == [data]  # neither o nor its new parent
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(sw.DataError):
        sw.run_sweep(model, data, [0, 0.5], epochs=1, out=kept)
    assert kept.is_dir()  # not created by the sweep: left alone


def test_quiet_hides_the_progress_display(files, tmp_path, monkeypatch):
    """On a terminal (stderr made to look like one) the display shows; `-q` hides it."""
    _, model, npz = files
    progress = importlib.import_module("regularize.sweep.progress")
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    args = ("--data", npz, "--rates", "0", "--epochs", "1", "--batch-size", "48")
    shown = _invoke(model, *args, "--out", tmp_path / "a")
    assert shown.exit_code == 0, shown.output
    assert "epochs" in shown.stderr and "val acc" in shown.stderr  # the bars' text
    assert "1/1" in shown.stderr
    quiet = _invoke(model, *args, "--out", tmp_path / "b", "-q")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert quiet.stdout.splitlines()[1:3] == shown.stdout.splitlines()[1:3]  # same table


# -- labels, recurrent rate, policies ---------------------------------------------


def test_one_hot_labels_use_categorical_cross_entropy(tmp_path):
    x_train, y_train = _arrays(48, 1)
    x_val, y_val = _arrays(24, 2)
    npz = tmp_path / "onehot.npz"
    eye = np.eye(3, dtype="float32")
    np.savez(npz, x_train=x_train, y_train=eye[y_train], x_val=x_val, y_val=eye[y_val])
    result = sw.run_sweep(
        _model(compiled=False), npz, [0], epochs=1, out=tmp_path / "o", batch_size=48
    )
    assert result.settings["data"]["labels"] == "onehot"
    assert result.compile_note == (
        "the model is not compiled: using the default Adam(learning_rate=0.001), "
        "CategoricalCrossentropy(from_logits=False), metrics=['accuracy']"
    )
    (v,) = result.variants
    assert v.metric == "accuracy"
    saved = keras.models.load_model(tmp_path / "o" / v.model_file)
    predicted = np.asarray(saved(x_train, training=False)).argmax(axis=-1)
    assert v.train_accuracy == pytest.approx((predicted == y_train).mean())  # class ids compared


def _lstm():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 3)),
            L.LSTM(6, return_sequences=True, name="lstm1"),
            L.LSTM(6, name="lstm2"),
            L.Dense(3, activation="softmax", name="out"),
        ],
        name="tiny_lstm",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.slow  # an LSTM with recurrent dropout traces slowly: ~20 s alone on 2 cores
def test_recurrent_rate_same_follows_each_variant(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4, 3)).astype("float32")
    y = rng.integers(0, 3, 40).astype("int32")
    npz = tmp_path / "seq.npz"
    np.savez(npz, x_train=x[:32], y_train=y[:32], x_val=x[32:], y_val=y[32:])
    model = tmp_path / "lstm.keras"
    _lstm().save(model)
    out = tmp_path / "o"
    result = _invoke(
        model, "--data", npz, "--rates", "0.4", "--recurrent-rate", "same", "--epochs", "1",
        "--batch-size", "32", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["recurrent_rate"] == "same"
    assert [v["label"] for v in data["variants"]] == ["0", "0.4"]
    for rate in (0.0, 0.4):
        label = sw.format_rate(rate)
        saved = keras.models.load_model(out / f"variant-{label}-seed0.keras")
        for name in ("lstm1", "lstm2"):
            layer = saved.get_layer(name)
            assert (layer.dropout, layer.recurrent_dropout) == (rate, rate), (label, name)


def _policy_sweep(model, npz, out, *extra):
    return _invoke(
        model, "--data", npz, "--policies", "none,all@0.5", "--seeds", "0,1", "--epochs", "1",
        "--batch-size", "16", "--out", out, *extra,
    )  # fmt: skip


def test_policy_sweep_over_seeds_gives_table_json_intervals_and_resumes(
    files, tmp_path, monkeypatch
):
    _, model, npz = files
    out = tmp_path / "o"
    result = _policy_sweep(model, npz, out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[1]
    assert header.split()[:3] == ["variant", "val", "acc"]
    assert "best val acc - none [95% CI]" in header
    rows = {line.split()[0]: line for line in lines[2:4]}
    assert sorted(rows) == ["all@0.5", "none"]
    assert "(baseline)" in rows["none"]
    assert " ± " in rows["all@0.5"]
    assert lines[4].startswith("mean ± std over 2 seeds (0, 1)")

    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["baseline"] == "none"
    runs = [(v["label"], v["seed"]) for v in data["variants"]]
    assert runs == [("none", 0), ("none", 1), ("all@0.5", 0), ("all@0.5", 1)]
    by_run = {(v["label"], v["seed"]): v for v in data["variants"]}
    summary = data["summary"]["all@0.5"]["best_val_accuracy"]
    values = [by_run["all@0.5", s]["best_val_accuracy"] for s in (0, 1)]
    assert summary["values"] == values
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    diff = data["vs_baseline"]["all@0.5"]["best_val_accuracy"]
    expected = [values[s] - by_run["none", s]["best_val_accuracy"] for s in (0, 1)]
    assert diff["differences"] == pytest.approx(expected)
    half = 12.7062 * np.std(expected, ddof=1) / np.sqrt(2)  # t(0.975, 1 df)
    assert diff["ci95"] == pytest.approx([np.mean(expected) - half, np.mean(expected) + half])
    assert diff["distinguishable"] == (not diff["ci95"][0] <= 0 <= diff["ci95"][1])
    verdict = "not distinguishable" if not diff["distinguishable"] else "than the baseline"
    assert verdict in rows["all@0.5"]
    assert data["best"] in ("none", "all@0.5")
    assert rows[data["best"]].split()[1] == "*"
    names = sorted(p.name for p in out.iterdir())
    assert "variant-all@0.5-seed1.keras" in names and "variant-none-seed0.json" in names
    dropout = keras.models.load_model(out / "variant-all@0.5-seed0.keras")
    assert {layer.rate for layer in dropout.layers if isinstance(layer, L.Dropout)} == {0.5}

    # Resumes: one run lost, one trained again (exactly as before), three read back.
    (out / "variant-all@0.5-seed1.json").unlink()
    trained = []
    real = training.train_variant

    def spy(run, variant, seed, *args):
        trained.append((variant.label, seed))
        return real(run, variant, seed, *args)

    monkeypatch.setattr(training, "train_variant", spy)
    again = _policy_sweep(model, npz, out, "--json")
    assert again.exit_code == 0, again.output
    assert trained == [("all@0.5", 1)]
    resumed = json.loads(again.stdout)
    for run in (*resumed["variants"], *data["variants"]):
        run.pop("seconds")  # wall time: the only number that differs
    assert resumed["variants"] == data["variants"]  # trained again: exactly the same
    assert resumed["vs_baseline"] == data["vs_baseline"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--policies", "none,heads"],
            "Invalid value for '--policies': Invalid policy entry 'heads': not a preset and "
            "not a `.toml` policy file.",
        ),
        (
            ["--policies", "head,missing.toml"],
            "Invalid value for '--policies': Cannot read policy file: no such file.",
        ),
        (
            ["--policies", "head@1.5"],
            "Invalid value for '--policies': Invalid `policies`: the rate of 'head@1.5' is not",
        ),
        (["--policies", "head,head"], "Invalid `policies`: head given twice."),
        (["--policies", "head", "--policy", "p.toml"], "--policy and --policies cannot be"),
        (["--seeds", "0,x"], "Invalid value for '--seeds': Expected distinct ints >= 0"),
        (["--policies", "none,head", "--drop-path", "1.5"], "Invalid value for '--drop-path'"),
    ],
)
def test_a_bad_variant_list_is_a_usage_error_before_any_training(
    files, tmp_path, monkeypatch, flags, message
):
    _, model, npz = files
    (tmp_path / "p.toml").write_text("rate = 0.2\n")
    monkeypatch.chdir(tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("the sweep started")

    monkeypatch.setattr(sw, "run_sweep", no_training)
    result = _invoke(model, "--data", npz, "--epochs", "1", "--out", tmp_path / "o", *flags)
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert line.startswith("Error: ") and message in line, line
    assert not (tmp_path / "o").exists()


def test_drop_path_variants_are_swept_like_policies(files, tmp_path):
    """`--drop-path R` adds a variant with stochastic depth only (no dropout from the rate)."""
    _, _, npz = files
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 1))
    stem = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inp)
    branch = L.Conv2D(4, 3, padding="same", name="branch")(stem)
    x = L.Add(name="add")([stem, branch])
    x = L.Flatten(name="flat")(x)
    out = L.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inp, out, name="residual")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    path = tmp_path / "residual.keras"
    model.save(path)
    result = _invoke(
        path, "--data", npz, "--policies", "none", "--drop-path", "0.2", "--epochs", "1",
        "--batch-size", "16", "--out", tmp_path / "o", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [v["label"] for v in data["variants"]] == ["none", "drop_path@0.2"]
    saved = keras.models.load_model(tmp_path / "o" / "variant-drop_path@0.2-seed0.keras")
    drops = [layer for layer in saved.layers if isinstance(layer, L.Dropout)]
    assert [(d.name, d.rate, tuple(d.noise_shape)) for d in drops] == [
        ("branch__droppath", 0.2, (None, 1, 1, 1))
    ]
    baseline = keras.models.load_model(tmp_path / "o" / "variant-none-seed0.keras")
    assert not any(isinstance(layer, L.Dropout) for layer in baseline.layers)


def test_policy_variants_cross_rates_and_keep_own_rates(tmp_path):
    variants = importlib.import_module("regularize.sweep.variants")
    file = tmp_path / "mine.toml"
    file.write_text('preset = "blocks"\nrate = 0.4\n')
    entries = variants.parse_policies(f"head,all@0.1,{file}")
    chosen, notes = variants.policy_variants(entries, [0, 0.2, 0.5])
    assert [(v.label, v.rate) for v in chosen] == [
        ("none", 0.0),
        ("head@0.2", 0.2),
        ("head@0.5", 0.5),
        ("all@0.1", 0.1),
        ("mine@0.2", 0.2),
        ("mine@0.5", 0.5),
    ]
    assert notes == ["the baseline (none: no dropout added) added to the policies"]
    assert chosen[1].policy_for().preset == "head"
    assert chosen[4].policy_for().preset == "blocks"
    own, _ = variants.policy_variants(entries)  # no rates: each entry's own
    assert [v.label for v in own] == ["none", "head@0.3", "all@0.1", "mine@0.4"]
    # Extra Policy settings are forwarded as keyword arguments.
    extra = variants.setting_variants("mc", [True])
    assert extra[0].settings == (("mc", True),) and extra[0].policy_for().mc is True
    with pytest.raises(PolicyError, match="`Policy` has no setting 'drop_pathh'"):
        variants.setting_variants("drop_pathh", [0.1])[0].policy_for()
    with pytest.raises(PolicyError, match="none is the baseline"):
        variants.check_variants(chosen[1:])


def test_paired_interval_against_hand_computed_numbers():
    stats = importlib.import_module("regularize.sweep.stats")
    assert stats.t_quantile_975(1) == 12.7062
    assert stats.t_quantile_975(4) == 2.7764
    assert stats.t_quantile_975(30) == 2.0423
    assert stats.t_quantile_975(60) == pytest.approx(2.0003, abs=1e-4)
    # Differences 0.01, 0.03, 0.02, 0.04, 0.00: mean 0.02, sd 0.0158114, n 5.
    d = stats.paired_difference([0.81, 0.83, 0.82, 0.84, 0.80], [0.8] * 5)
    half = 2.7764 * np.std([0.01, 0.03, 0.02, 0.04, 0.0], ddof=1) / 5**0.5
    assert d.mean == pytest.approx(0.02)
    assert (d.low, d.high) == pytest.approx((0.02 - half, 0.02 + half))
    assert d.low == pytest.approx(0.000368, abs=1e-6)  # just above 0
    assert d.distinguishable is True
    crossing = stats.paired_difference([0.81, 0.79, 0.82, 0.80, 0.83], [0.8] * 5)
    assert crossing.low < 0 < crossing.high and crossing.distinguishable is False
    same = stats.paired_difference([0.5, 0.6], [0.5, 0.6])
    assert (same.low, same.high, same.distinguishable) == (0.0, 0.0, False)
    one = stats.paired_difference([0.5], [0.4])
    assert (one.low, one.distinguishable) == (None, None)
