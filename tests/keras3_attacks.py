"""Builds the Keras 3 (`.keras`) attack files of tests/test_security.py.

Imported by the tests (Keras 3 and keras-hub in the pytest process are fine:
the command line under test runs in its own process). Every attack is a
small legitimate model saved by Keras and then edited the way an attacker
would: `config.json` rewritten inside the zip, the rest copied byte for byte
(an asset dropped where it would otherwise take the attacker's place).

What each file does when Keras loads it (checked, with `--unsafe`, by the
tests):

- `sp_truncate.keras`: a `Lambda` whose `function` is the registered
  keras-hub function `keras_hub>compute_sentence_piece_proto`, called on a
  list of two tensors with `proto_output_file` in its `arguments`: the
  function opens that path for writing (creating or truncating it) before it
  fails. A keras-hub layer earlier in the graph imports keras-hub, which
  registers the function.
- `activation_string.keras`: a `Dense` whose `activation` is that registered
  name as a plain string.
- `parseq_vocab.keras` (and `bpe_vocab`, `whisper_vocab`, `sentencepiece_proto`):
  a keras-hub tokenizer whose `vocabulary` / `merges` / `proto` is a path to a
  local file, its own asset removed: the constructor reads that file and the
  saved output holds it as the tokenizer's asset.
- `decode_predictions.keras` (and `.h5`, Keras 3's HDF5 format): a `Lambda`
  calling the public Keras function
  `keras.applications.imagenet_utils.decode_predictions` on a `(None, 1000)`
  tensor: it downloads the ImageNet class index into `$KERAS_HOME/models`.
- `big_dense.keras`: a `Dense(60000)` on a 60000-wide input (a 14.4 GB kernel)
  declared in the config, while `model.weights.h5` holds 6x6 kernels.
- `get_file.keras`, `load_model.keras`, `private_module.keras`,
  `os_module.keras`, `builtins_registered.keras`: functions Keras itself
  refuses or cannot find (`keras.utils.get_file`, `keras.saving.load_model`,
  a private `keras.src` module, `os.system`, a `builtins` function under a
  registered name); the tests keep them refused.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import keras
import keras_hub

L = keras.layers

# The Dense that the config declares: 60000 x 60000 float32 = 14.4 GB.
BIG_UNITS = 60_000
SP_FUNCTION = "keras_hub>compute_sentence_piece_proto"


@keras.saving.register_keras_serializable(package="regularize_tests")
def pair_sum(tensors):
    """The legitimate function the truncation attack's `Lambda` replaces."""
    return tensors[0] + tensors[1]


def rewrite(src: Path, dst: Path, edit, *, drop: tuple[str, ...] = ()) -> None:
    """Copies the `.keras` zip `src` to `dst`, `config.json` passed through `edit`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename in drop:
                continue
            data = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def layer_config(config: dict, name: str) -> dict:
    """The `{"module", "class_name", "config", ...}` entry of layer `name` in a Functional."""
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == name:
            return layer
    raise KeyError(name)


def registered_function(name: str) -> dict:
    """How Keras 3 serializes a registered function (e.g. `Lambda(keras_hub's function)`)."""
    return {"module": "builtins", "class_name": "function", "config": name, "registered_name": name}


def function_entry(module: str, name: str) -> dict:
    """How Keras 3 serializes a public function of `module`."""
    return {"module": module, "class_name": "function", "config": name, "registered_name": None}


def _pair_model() -> keras.Model:
    a = keras.Input((2, 4), name="a")
    b = keras.Input((2, 4), name="b")
    # A keras-hub layer before the Lambda: loading it imports keras-hub.
    position = keras_hub.layers.PositionEmbedding(sequence_length=2, name="position")(b)
    x = L.Lambda(pair_sum, name="evil")([a, position])
    x = L.Flatten(name="flat")(x)
    x = L.Dense(4, activation="relu", name="fc")(x)
    return keras.Model([a, b], L.Dense(1, name="out")(x), name="pair")


def _hub_model() -> keras.Model:
    inp = keras.Input((2, 4), name="x")
    x = keras_hub.layers.PositionEmbedding(sequence_length=2, name="position")(inp)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(4, activation="relu", name="fc")(x)
    return keras.Model(inp, L.Dense(1, name="out")(x), name="hub")


def _vector_model(width: int) -> keras.Model:
    inp = keras.Input((width,), name="x")
    x = L.Lambda(keras.ops.negative, name="evil")(inp)
    x = L.Dense(4, activation="relu", name="fc")(x)
    return keras.Model(inp, L.Dense(1, name="out")(x), name="vector")


def _tokenizer_model(tokenizer) -> keras.Model:
    inp = keras.Input((), dtype="string", name="text")
    x = keras.ops.cast(tokenizer(inp), "float32")
    x = L.Dense(4, activation="relu", name="fc")(x)
    return keras.Model(inp, L.Dense(1, name="out")(x), name="tokenized")


def _assets(path: Path) -> tuple[str, ...]:
    with zipfile.ZipFile(path) as z:
        return tuple(n for n in z.namelist() if n.startswith("assets/"))


def build(folder: Path, *, target: Path, vocab: Path, secret: Path) -> None:
    """Writes every attack file into `folder`.

    Args:
        folder: Where the files go (created).
        target: The file the truncation attack opens for writing.
        vocab: A local text file (one word a line) the tokenizer attacks read.
        secret: A local binary file the SentencePiece attack reads.
    """
    folder.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    base = folder / "_pair.keras"
    _pair_model().save(base)

    def evil_function(function, arguments=None):
        def edit(config):
            inner = layer_config(config, "evil")["config"]
            inner["function"] = function
            if arguments is not None:
                inner["arguments"] = arguments

        return edit

    truncate = {"vocabulary_size": 10, "proto_output_file": str(target)}
    rewrite(
        base,
        folder / "sp_truncate.keras",
        evil_function(registered_function(SP_FUNCTION), truncate),
    )

    rewrite(base, folder / "sp_truncate_string.keras", evil_function(SP_FUNCTION, truncate))

    def activation(config):
        layer_config(config, "fc")["config"]["activation"] = registered_function(SP_FUNCTION)

    hub = folder / "_hub.keras"
    _hub_model().save(hub)
    rewrite(hub, folder / "activation_registered.keras", activation)

    vector = folder / "_vector1000.keras"
    _vector_model(1000).save(vector)
    applications = "keras.applications.imagenet_utils"
    rewrite(
        vector,
        folder / "decode_predictions.keras",
        evil_function(function_entry(applications, "decode_predictions")),
    )
    # The same in a Keras 3 `.h5` (Keras 3's legacy HDF5 loader builds the same Lambda).
    vector_h5 = folder / "decode_predictions.h5"
    _vector_model(1000).save(vector_h5)
    with h5py.File(vector_h5, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layer_config(config, "evil")["config"]["function"] = function_entry(
            applications, "decode_predictions"
        )
        f.attrs["model_config"] = json.dumps(config)
    small = folder / "_vector4.keras"
    _vector_model(4).save(small)
    extras = {
        "get_file": function_entry("keras.utils", "get_file"),
        "load_model": function_entry("keras.saving", "load_model"),
        "private_module": function_entry("keras.src.utils.file_utils", "get_file"),
        "os_module": function_entry("os", "system"),
        "builtins_registered": registered_function("builtins>exec"),
    }
    for name, function in extras.items():
        rewrite(small, folder / f"{name}.keras", evil_function(function, {"origin": "x"}))

    _build_big(folder)
    _build_tokenizers(folder, vocab=vocab, secret=secret)
    for path in folder.glob("_*.keras"):
        path.unlink()


def _build_big(folder: Path) -> None:
    inp = keras.Input((6,), name="x")
    x = L.Dense(6, activation="relu", name="big")(inp)
    small = folder / "_big.keras"
    keras.Model(inp, L.Dense(1, name="out")(x), name="big_model").save(small)

    def declare(config):
        text = json.dumps(config).replace("[null, 6]", f"[null, {BIG_UNITS}]")
        config.clear()
        config.update(json.loads(text))
        layer_config(config, "big")["config"]["units"] = BIG_UNITS

    rewrite(small, folder / "big_dense.keras", declare)


def _build_tokenizers(folder: Path, *, vocab: Path, secret: Path) -> None:
    parseq = folder / "_parseq.keras"
    _tokenizer_model(keras_hub.tokenizers.PARSeqTokenizer(name="tok")).save(parseq)

    def vocabulary(config):
        layer_config(config, "tok")["config"]["vocabulary"] = str(vocab)

    rewrite(parseq, folder / "parseq_vocab.keras", vocabulary, drop=_assets(parseq))

    bpe = folder / "_bpe.keras"
    words = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}
    tokenizer = keras_hub.tokenizers.BytePairTokenizer(
        vocabulary=words, merges=["a b"], sequence_length=4, name="tok"
    )
    _tokenizer_model(tokenizer).save(bpe)
    bpe_assets = _assets(bpe)

    def bpe_files(config):
        inner = layer_config(config, "tok")["config"]
        inner["vocabulary"] = str(vocab)
        inner["merges"] = str(vocab)

    rewrite(bpe, folder / "bpe_vocab.keras", bpe_files, drop=bpe_assets)

    def whisper(config):
        entry = layer_config(config, "tok")
        entry["module"] = "keras_hub.src.models.whisper.whisper_tokenizer"
        entry["class_name"] = "WhisperTokenizer"
        entry["registered_name"] = "keras_hub>WhisperTokenizer"
        entry["config"] = {
            "name": "tok",
            "trainable": True,
            "vocabulary": str(vocab),
            "merges": str(vocab),
            "special_tokens": {"<|endoftext|>": 3},
            "language_tokens": None,
        }

    rewrite(bpe, folder / "whisper_vocab.keras", whisper, drop=bpe_assets)

    def sentencepiece(config):
        entry = layer_config(config, "tok")
        entry["module"] = "keras_hub.src.tokenizers.sentence_piece_tokenizer"
        entry["class_name"] = "SentencePieceTokenizer"
        entry["registered_name"] = "keras_hub>SentencePieceTokenizer"
        entry["config"] = {
            "name": "tok",
            "trainable": True,
            "proto": str(secret),
            "sequence_length": 4,
        }

    rewrite(bpe, folder / "sentencepiece_proto.keras", sentencepiece, drop=bpe_assets)
