"""keras-hub preset folders in and out, and one copy of the weights (`.keras` and presets).

Tiny BERTs (no download): a `BertBackbone` preset, a `BertTextClassifier`
preset with its tokenizer and vocabulary, and both as `.keras` files, built
once per session. Each rewrite is checked for structure (class kept, the
dropout arguments as reported), bit-exact inference against the input,
reload (a preset in a fresh process that never imports regularize, with
`from_preset`), every other file byte-identical (the weights files too: the
one-copy property), and one training step on the output. Each refusal of the
pre-load check runs the real command, then the same folder with `--unsafe`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import keras_hub  # in the `test` extra: a missing one fails the collection
import numpy as np
import pytest

import regularize
from regularize import service
from regularize.core import preset_folder
from regularize.core.policy import Policy

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
TEXTS = ["w1 w2 w3", "w4 w5"]
# Files of a preset the tool never edits: each must come out byte-identical.
BACKBONE_KEPT = ["metadata.json", "model.weights.h5"]
TASK_KEPT = BACKBONE_KEPT + [
    "task.weights.h5",
    "preprocessor.json",
    "tokenizer.json",
    "assets/tokenizer/vocabulary.txt",
]


def _backbone():
    return keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )


def _task(backbone):
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCABULARY)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=16)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=preprocessor)


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """The input folders and files, written once: bert/, bert_task/, bert.keras, bert_task.keras."""
    root = tmp_path_factory.mktemp("hub_presets")
    keras.utils.set_random_seed(0)
    backbone = _backbone()
    task = _task(backbone)
    backbone.save_to_preset(str(root / "bert"))
    task.save_to_preset(str(root / "bert_task"))
    backbone.save(root / "bert.keras")
    task.save(root / "bert_task.keras")
    return root


@pytest.fixture
def bert(saved, tmp_path):
    return Path(shutil.copytree(saved / "bert", tmp_path / "bert"))


@pytest.fixture
def bert_task(saved, tmp_path):
    return Path(shutil.copytree(saved / "bert_task", tmp_path / "bert_task"))


def _tokens():
    ids = np.array([[2, 7, 9, 3, 0, 0, 0, 0], [2, 11, 5, 6, 8, 3, 0, 0]], "int32")
    return {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": (ids != 0).astype("int32"),
    }


def _regularize(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "regularize", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=600,
    )


def _errors(run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith(("Error", "Warning"))]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _config(folder: Path, name="config.json") -> dict:
    return json.loads((folder / name).read_text())


# Runs in a fresh process that never imports regularize: loads the input and
# the output with keras-hub's own `from_preset`, compares them, trains a step.
_RELOAD = r"""
import json, sys
import numpy as np, keras, keras_hub
kind, source, output = sys.argv[1:4]
assert not any(name.split(".")[0] == "regularize" for name in sys.modules)
ids = np.array([[2, 7, 9, 3, 0, 0, 0, 0], [2, 11, 5, 6, 8, 3, 0, 0]], "int32")
mask = (ids != 0).astype("int32")
x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}
cls = keras_hub.models.BertTextClassifier if kind == "task" else keras_hub.models.Backbone
load = cls.from_preset
before, after = load(source), load(output)
def outputs(model, data):
    return [keras.ops.convert_to_numpy(v) for v in keras.tree.flatten(model(data, training=False))]
pairs = list(zip(outputs(before, x), outputs(after, x)))
result = {"class": type(after).__name__}
if kind == "task":
    pairs += list(zip([before.predict(["w1 w2 w3", "w4 w5"], verbose=0)],
                      [after.predict(["w1 w2 w3", "w4 w5"], verbose=0)]))
    result["dropout"] = after.get_config()["dropout"]
    result["backbone_dropout"] = after.backbone.get_config()["dropout"]
    history = after.fit(x=["w1 w2 w3", "w4 w5"], y=np.array([0, 2]), batch_size=2, verbose=0)
else:
    result["dropout"] = after.get_config()["dropout"]
    head = keras.layers.Dense(1)(after.output["pooled_output"])
    model = keras.Model(after.inputs, head)
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, np.zeros((2, 1)), batch_size=2, verbose=0)
result["loss"] = float(history.history["loss"][0])
result["equal"] = all(np.array_equal(a, b) for a, b in pairs)
result["difference"] = max(float(np.max(np.abs(a - b))) for a, b in pairs)
print(json.dumps(result))
"""


def _reload(kind: str, source: Path, output: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _RELOAD, kind, str(source), str(output)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# -- preset folders in and out -------------------------------------------------------


@pytest.mark.slow
def test_a_backbone_preset_gets_dropout_in_a_preset_beside_it(bert):
    before = _files(bert)
    run = _regularize("add-dropout", bert, "--rate", "0.2")
    assert run.returncode == 0, run.stderr[-3000:]
    out = bert.with_name("bert_dropout")
    assert run.stdout.splitlines() == ["updated 1 site: 1 dropout", f"wrote {out}"]
    assert _errors(run) == []
    assert _files(bert) == before  # the input is untouched
    assert _config(out)["config"]["dropout"] == 0.2
    assert _config(bert)["config"]["dropout"] == 0.1
    after = _files(out)
    assert sorted(after) == sorted(before)
    for name in BACKBONE_KEPT:  # the weights file too: the input's bytes, one copy
        assert after[name] == before[name], name
    result = _reload("backbone", bert, out)
    assert result["class"] == "BertBackbone"
    assert result["dropout"] == 0.2
    assert result["equal"], result
    assert np.isfinite(result["loss"])


@pytest.mark.slow
def test_a_task_preset_keeps_its_class_tokenizer_and_assets(bert_task, tmp_path):
    before = _files(bert_task)
    out = tmp_path / "out"
    run = _regularize("add-dropout", bert_task, "--rate", "0.2", "-o", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["updated 2 sites: 2 dropout", f"wrote {out}"]
    assert _errors(run) == []
    task = _config(out, "task.json")["config"]
    assert task["dropout"] == 0.2
    assert task["backbone"]["config"]["dropout"] == 0.2
    assert _config(out)["config"]["dropout"] == 0.2
    after = _files(out)
    assert sorted(after) == sorted(before)
    for name in TASK_KEPT:
        assert after[name] == before[name], name
    result = _reload("task", bert_task, out)
    assert result["class"] == "BertTextClassifier"
    assert (result["dropout"], result["backbone_dropout"]) == (0.2, 0.2)
    assert result["equal"], result  # token ids and raw strings through the preprocessor
    assert np.isfinite(result["loss"])


KERNEL_SWITCH = (
    "Warning: bert_backbone: dropout crossed 0, so its attention runs Keras' other kernel "
    "(fused at 0, explicit above): "
)


@pytest.mark.slow
def test_remove_dropout_from_a_task_preset(bert_task):
    run = _regularize("remove-dropout", bert_task)
    assert run.returncode == 0, run.stderr[-3000:]
    out = bert_task.with_name("bert_task_nodropout")
    assert run.stdout.splitlines() == ["removed 2 sites: 2 dropout", f"wrote {out}"]
    task = _config(out, "task.json")["config"]
    assert (task["dropout"], task["backbone"]["config"]["dropout"]) == (0.0, 0.0)
    for name in TASK_KEPT:
        assert (out / name).read_bytes() == (bert_task / name).read_bytes(), name
    result = _reload("task", bert_task, out)
    assert result["class"] == "BertTextClassifier"
    # 0.1 -> 0 moves attention from the explicit kernel to the fused one: on
    # this CPU both compute the same bits; where they do not, it is warned.
    warnings = _errors(run)
    if result["equal"]:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "crossed 0" in warnings[0]
        assert result["difference"] < 1e-5


@pytest.mark.slow
def test_dropout_from_0_warns_of_the_attention_kernel_it_switches(bert):
    config = _config(bert)
    config["config"]["dropout"] = 0.0
    (bert / "config.json").write_text(json.dumps(config, indent=4))
    run = _regularize("add-dropout", bert, "--rate", "0.2")
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = _errors(run)
    assert len(warnings) == 1 and warnings[0].startswith(KERNEL_SWITCH), warnings
    out = bert.with_name("bert_dropout")
    assert _config(out)["config"]["dropout"] == 0.2
    assert (out / "model.weights.h5").read_bytes() == (bert / "model.weights.h5").read_bytes()
    result = _reload("backbone", bert, out)
    assert result["dropout"] == 0.2
    assert result["difference"] < 1e-5
    exact = _regularize("add-dropout", bert, "--rate", "0.2", "--exact", "--force")
    assert exact.returncode == 3  # --exact leaves the argument at 0: no dropout anywhere
    assert "Nothing written" in exact.stderr


@pytest.mark.slow
def test_inspect_a_preset_writes_nothing(bert_task):
    before = sorted(bert_task.parent.iterdir())
    run = _regularize("inspect", bert_task, "--rate", "0.2", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout)
    updates = {(s["layer"], s["rate"]) for s in data["sites"] if s["action"] == "update"}
    assert updates == {
        ("bert_text_classifier/bert_backbone", 0.2),
        ("bert_text_classifier", 0.2),
    }
    assert sorted(bert_task.parent.iterdir()) == before


@pytest.mark.slow
def test_force_replaces_an_earlier_preset_output(bert):
    out = bert.with_name("bert_dropout")
    assert _regularize("add-dropout", bert, "--rate", "0.2").returncode == 0
    again = _regularize("add-dropout", bert, "--rate", "0.3")
    assert again.returncode == 2
    assert "the folder already exists" in again.stderr
    forced = _regularize("add-dropout", bert, "--rate", "0.3", "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert _config(out)["config"]["dropout"] == 0.3
    assert [p.name for p in bert.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_an_output_link_is_replaced_never_followed(bert, tmp_path):
    elsewhere = Path(shutil.copytree(bert, tmp_path / "elsewhere"))
    kept = _files(elsewhere)
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    run = _regularize("add-dropout", bert, "--rate", "0.2", "-o", link, "--force")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not link.is_symlink() and link.is_dir()
    assert _config(link)["config"]["dropout"] == 0.2
    assert _files(elsewhere) == kept


# Refused before TensorFlow is imported: exit 2, one line.
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("input", "it is the input model. Expected another path."),
        ("inside", "it is inside the input folder"),
        ("parent", "it is a folder that holds the input model"),
        ("other", "it is a folder that is not a keras-hub preset (no `config.json`)"),
        ("file", "it is a file. Expected a folder path for a keras-hub preset"),
    ],
)
def test_output_rules_of_a_preset_folder(bert, tmp_path, where, message):
    (tmp_path / "other").mkdir()
    (tmp_path / "file").write_text("x")
    output = {
        "input": bert,
        "inside": bert / "out",
        "parent": tmp_path,
        "other": tmp_path / "other",
        "file": tmp_path / "file",
    }[where]
    before = _files(tmp_path)
    run = _regularize("add-dropout", bert, "-o", output, "--force")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Invalid value for '-o'")
    assert message in lines[0]
    assert _files(tmp_path) == before


# -- one copy for `.keras` files ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "bert_task"])
def test_a_keras_file_keeps_the_weights_member_bytes(saved, tmp_path, name):
    source = saved / f"{name}.keras"
    out = tmp_path / "out.keras"
    run = _regularize("add-dropout", source, "--rate", "0.2", "-o", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _errors(run) == []
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(out) as b:
        assert a.namelist() == b.namelist()
        for info in a.infolist():
            if info.filename != "config.json":
                assert b.getinfo(info.filename).compress_type == info.compress_type
                assert a.read(info) == b.read(info.filename), info.filename
        config = json.loads(b.read("config.json"))["config"]
    original = keras.saving.load_model(source)
    new = keras.saving.load_model(out)
    assert type(new) is type(original)
    if name == "bert_task":
        assert (config["dropout"], config["backbone"]["config"]["dropout"]) == (0.2, 0.2)
        assert new.backbone.get_config()["dropout"] == 0.2
        np.testing.assert_array_equal(
            original.predict(TEXTS, verbose=0), new.predict(TEXTS, verbose=0)
        )
    else:
        assert config["dropout"] == 0.2
    assert new.get_config()["dropout"] == 0.2
    x = _tokens()
    for a, b in zip(
        keras.tree.flatten(original(x, training=False)),
        keras.tree.flatten(new(x, training=False)),
        strict=True,
    ):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


# -- the Python API ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_api_takes_a_preset_path_and_returns_the_new_model(bert):
    before = _files(bert)
    original = keras_hub.models.Backbone.from_preset(str(bert))
    new = regularize.add_dropout(str(bert), rate=0.2)
    assert type(new) is keras_hub.models.BertBackbone
    assert new.get_config()["dropout"] == 0.2
    stripped = regularize.remove_dropout(bert)
    assert stripped.get_config()["dropout"] == 0.0
    x = _tokens()
    for a, b in zip(
        keras.tree.flatten(original(x, training=False)),
        keras.tree.flatten(new(x, training=False)),
        strict=True,
    ):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert _files(bert) == before
    assert sorted(p.name for p in bert.parent.iterdir()) == ["bert"]  # nothing written


@pytest.mark.slow
def test_process_writes_a_preset_with_the_inputs_weights(bert):
    outcome = regularize.process(bert, "add", policy=Policy(rate=0.2))
    assert (outcome.output, outcome.written) == (bert.with_name("bert_dropout"), True)
    assert (outcome.output / "model.weights.h5").read_bytes() == (
        bert / "model.weights.h5"
    ).read_bytes()
    assert _config(outcome.output)["config"]["dropout"] == 0.2


def test_default_outputs_and_handles(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert preset_folder.is_preset_folder(folder)
    assert service.default_output(folder, "add") == tmp_path / "bert_dropout"
    assert service.default_output(folder, "strip") == tmp_path / "bert_nodropout"
    handle = "kaggle://keras/bert/keras/bert_tiny_en_uncased/2"
    assert preset_folder.is_handle(handle) and service.is_preset(handle)
    assert service.default_output(handle, "add") == Path("bert_tiny_en_uncased_dropout")
    assert preset_folder.is_handle("hf://org/bert")
    assert preset_folder.is_handle("bert_base_en")
    assert not preset_folder.is_handle("model.keras")
    assert not preset_folder.is_handle(str(tmp_path / "missing"))


# -- the pre-load check: each attack, refused, then with --unsafe ---------------------


def _link_out(folder: Path, tmp: Path) -> str:
    secret = tmp / "secret.txt"
    secret.write_text("\n".join(VOCABULARY) + "\n")
    vocabulary = folder / "assets" / "tokenizer" / "vocabulary.txt"
    vocabulary.unlink()
    vocabulary.symlink_to(secret)
    return "is a symbolic link to"


def _file_in_config(folder: Path, tmp: Path) -> str:
    secret = tmp / "secret.txt"
    secret.write_text("\n".join(VOCABULARY) + "\n")
    config = _config(folder, "tokenizer.json")
    config["config"]["vocabulary"] = str(secret)
    (folder / "tokenizer.json").write_text(json.dumps(config, indent=4))
    return "reads `vocabulary` from the local file"


def _python_lambda(folder: Path, tmp: Path) -> str:
    config = _config(folder, "task.json")
    config["config"]["activation"] = {
        "module": "builtins",
        "class_name": "__lambda__",
        "config": {"code": "not bytecode", "defaults": None, "closure": None},
        "registered_name": None,
    }
    (folder / "task.json").write_text(json.dumps(config, indent=4))
    return "Python-lambda"


def _not_hdf5(folder: Path, tmp: Path) -> str:
    (folder / "model.weights.h5").write_bytes(b"\x80\x04not a weights file")
    return "'model.weights.h5' is not an HDF5 file"


def _over_budget(folder: Path, tmp: Path) -> str:
    for name in ("config.json", "task.json"):
        config = _config(folder, name)
        inner = (
            config["config"] if name == "config.json" else config["config"]["backbone"]["config"]
        )
        inner["vocabulary_size"] = 8_000_000
        (folder / name).write_text(json.dumps(config, indent=4))
    return "would allocate"


def _shard_outside(folder: Path, tmp: Path) -> str:
    (folder / "model.weights.h5").rename(tmp / "elsewhere.weights.h5")
    index = {"metadata": {}, "weight_map": {"/vars": "../elsewhere.weights.h5"}}
    (folder / "model.weights.json").write_text(json.dumps(index))
    return "not a plain file name"


def _external_link(folder: Path, tmp: Path) -> str:
    other = tmp / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.arange(4)
    with h5py.File(folder / "task.weights.h5", "a") as f:
        f["stolen"] = h5py.ExternalLink(str(other), "/data")
    return "is an external link to"


def _pipe(folder: Path, tmp: Path) -> str:
    os.mkfifo(folder / "assets" / "pipe")
    return "'assets/pipe' is not a regular file"


# attack -> what `--unsafe` does with the same folder: "written" (the check is
# lifted), "refused" (a resource or format bound: never lifted), or "fails"
# (lifted, and keras-hub's own loader then says in one line what it cannot load).
ATTACKS = {
    _link_out: "written",
    _file_in_config: "written",
    _python_lambda: "fails",
    _not_hdf5: "refused",
    _over_budget: "refused",
    _shard_outside: "refused",
    _external_link: "refused",
    _pipe: "refused",
}


@pytest.mark.slow
@pytest.mark.parametrize("attack", list(ATTACKS), ids=lambda f: f.__name__.strip("_"))
def test_each_attack_on_a_preset_is_one_line_and_unsafe_does_what_is_documented(
    bert_task, tmp_path, attack
):
    phrase = attack(bert_task, tmp_path)
    out = tmp_path / "out"
    run = _regularize("add-dropout", bert_task, "--rate", "0.2", "-o", out)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(("Error: Refusing to read", "Error: Refusing to load")), lines[0]
    assert phrase in lines[0]
    assert "Received: path=" in lines[0]
    assert not out.exists()
    unsafe = _regularize("add-dropout", bert_task, "--rate", "0.2", "-o", out, "--unsafe")
    expected = ATTACKS[attack]
    if expected == "written":
        assert unsafe.returncode == 0, unsafe.stderr[-3000:]
        assert unsafe.stdout.splitlines()[-1] == f"wrote {out}"
        vocabulary = out / "assets" / "tokenizer" / "vocabulary.txt"
        assert not vocabulary.is_symlink() and vocabulary.read_text().split() == VOCABULARY
    else:
        assert unsafe.returncode == 1
        lines = unsafe.stderr.strip().splitlines()
        assert len(lines) == 1, unsafe.stderr[-3000:]
        if expected == "refused":
            assert phrase in lines[0]
        else:
            assert lines[0].startswith("Error: Cannot read preset: keras-hub could not load it")
        assert not out.exists()


# -- what the docs promise besides -------------------------------------------------------


@pytest.mark.slow
def test_a_link_inside_the_folder_is_read_and_written_as_a_file(bert_task):
    vocabulary = bert_task / "assets" / "tokenizer" / "vocabulary.txt"
    vocabulary.rename(bert_task / "vocabulary_copy.txt")
    vocabulary.symlink_to(Path("..") / ".." / "vocabulary_copy.txt")
    run = _regularize("add-dropout", bert_task, "--rate", "0.2")
    assert run.returncode == 0, run.stderr[-3000:]
    written = bert_task.with_name("bert_task_dropout") / "assets" / "tokenizer" / "vocabulary.txt"
    assert not written.is_symlink()
    assert written.read_text().split() == VOCABULARY


@pytest.mark.slow
def test_a_name_that_is_no_file_and_no_preset_is_one_line(tmp_path):
    run = _regularize("inspect", "no_such_preset_here", cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "Error: Cannot read model: no such file or folder, and no keras-hub preset of that "
        "name. Expected a model file, a keras-hub preset folder (written by `save_to_preset`), "
        "or a keras-hub handle. Received: path='no_such_preset_here'"
    ]


def test_the_working_folder_is_never_replaced(bert, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run = _regularize("add-dropout", bert, "-o", ".", "--force", cwd=work)
    assert run.returncode == 2
    assert "it is the working folder or a folder above it" in run.stderr
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_a_handle_is_resolved_by_keras_hub_and_its_copy_checked(bert, monkeypatch, tmp_path):
    """keras-hub's own `get_file` resolves the handle (here to a local copy: no network)."""
    from keras_hub.src.utils import preset_utils

    asked = []

    def get_file(preset, path):
        asked.append(preset)
        return str(bert / path)

    monkeypatch.setattr(preset_utils, "get_file", get_file)
    monkeypatch.setitem(preset_utils.BUILTIN_PRESETS, "tiny_bert_test", {})
    for handle in ("tiny_bert_test", "kaggle://someone/bert/keras/tiny_bert_test/1"):
        model = regularize.load_model(handle)
        assert type(model) is keras_hub.models.BertBackbone
    assert asked[0] == "tiny_bert_test"
    assert any(preset.startswith("kaggle://") for preset in asked)
    (bert / "extra.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(regularize.ModelLoadError, match="outside the preset folder"):
        regularize.load_model("tiny_bert_test")


def test_a_transformers_config_is_refused(tmp_path):
    folder = tmp_path / "hf_bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    with pytest.raises(regularize.ModelLoadError, match="not a serialized Keras object"):
        regularize.load_model(folder)


@pytest.mark.slow
def test_a_backbone_whose_dropout_goes_into_its_graph_needs_a_keras_output(tmp_path):
    folder = tmp_path / "resnet"
    keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64],
        stackwise_num_blocks=[1],
        stackwise_num_strides=[1],
        block_type="basic_block",
        image_shape=(32, 32, 3),
        name="tiny_resnet",  # not auto-numbered: the message names it
    ).save_to_preset(str(folder))
    run = _regularize("add-dropout", folder, "--rate", "0.2")
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: Cannot write 'tiny_resnet' as a keras-hub preset")
    assert "Expected a `.keras` output path for it" in lines[-1]
    assert not (tmp_path / "resnet_dropout").exists()
    out = tmp_path / "resnet_dropout.keras"
    run = _regularize("add-dropout", folder, "--rate", "0.2", "-o", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert type(keras.saving.load_model(out)).__name__ == "Functional"  # not a ResNetBackbone


@pytest.mark.slow
def test_exact_writes_the_preset_with_keras_hubs_own_saver(bert, tmp_path):
    config = _config(bert)
    config["config"]["dropout"] = 0.0
    (bert / "config.json").write_text(json.dumps(config, indent=4))
    out = tmp_path / "out"
    run = _regularize("add-dropout", bert, "--rate", "0.2", "--exact", "--allow-empty", "-o", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _config(out)["config"]["dropout"] == 0.0  # --exact left it at 0
    result = _reload("backbone", bert, out)
    assert result["equal"] and result["class"] == "BertBackbone"


@pytest.mark.slow
def test_an_output_that_predicts_otherwise_is_never_published(saved, tmp_path):
    """The check compares the written output with the input's outputs recorded before."""
    import dataclasses

    from regularize.core.report import Report
    from regularize.keras3 import hub_edit

    source = saved / "bert.keras"
    model = keras.saving.load_model(source)
    edit = hub_edit.plan(model, Policy(rate=0.2), "add", Report())
    assert edit.backbone == {"dropout": 0.2} and edit.crossing == ()
    off = dataclasses.replace(edit, outputs=tuple(a + 1 for a in edit.outputs))
    out = tmp_path / "out.keras"
    with pytest.raises(regularize.UnsupportedModelError, match="bit-identical outputs"):
        hub_edit.write(source, out, off, Report())
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary file left
    hub_edit.write(source, out, edit, Report())
    assert json.loads(zipfile.ZipFile(out).read("config.json"))["config"]["dropout"] == 0.2


def test_a_link_to_a_folder_inside_the_preset_is_refused(tmp_path):
    folder = tmp_path / "preset"
    (folder / "assets" / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "assets" / "again").symlink_to(folder / "assets" / "tokenizer")
    with pytest.raises(regularize.ModelLoadError, match="is a symbolic link to a folder") as info:
        preset_folder.check_tree(folder, "Received: path='preset'", unsafe=True)
    expected = "Expected plain folders inside the preset. Received: path='preset'"
    assert str(info.value).endswith(expected)
