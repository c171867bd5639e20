"""Fuzzing the model-file checker (`regularize.core.checker`).

Real configs, mutated at random, go through `check_config` with each
engine's allowlist: the checker either passes a config or refuses it with a
`RegularizeError`; nothing else (no `KeyError`, `TypeError`,
`RecursionError`, ...) may escape, whatever the config holds. A second
property plants a known attack (a dotted old-Keras `Lambda`, a module
tf_keras or Keras would import, a Python lambda, a registered function
that opens a file, a file path as a vocabulary) at a random place in a real
config: it is refused, wherever it sits.

The corpus: Keras 3 configs of tiny models and keras-hub tiny models
serialized here, and the Keras 2 configs of `fixtures/keras2/*.h5` and of
the fixture SavedModel's `keras_metadata.pb`. The cases are derandomized
(one seed); `REGULARIZE_FUZZ_CASES` sets how many (default 300 per test),
e.g. `REGULARIZE_FUZZ_CASES=10000 python3 -m pytest tests/test_checker_fuzz.py`.
A failure names its case number; `REGULARIZE_FUZZ_SEED` changes the seed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import h5py
import keras
import keras_hub
import pytest

from regularize.core import checker
from regularize.core import safety
from regularize.core.allowlist import KERAS2
from regularize.core.allowlist import KERAS3
from regularize.core.allowlist import keras2_allowlist
from regularize.core.errors import ModelLoadError
from regularize.core.errors import RegularizeError
from regularize.keras3 import trust

L = keras.layers
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "keras2"
CASES = int(os.environ.get("REGULARIZE_FUZZ_CASES", "300"))
SEED = int(os.environ.get("REGULARIZE_FUZZ_SEED", "19"))
RECEIVED = "Received: path='fuzz.keras'"


# -- the corpus ------------------------------------------------------------------


def _keras3_models() -> list[keras.Model]:
    keras.utils.set_random_seed(0)
    mlp = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(8, activation="relu", kernel_regularizer="l2", name="fc"),
            L.Dropout(0.1),
            L.Dense(2, activation="softmax", name="out"),
        ],
        name="mlp",
    )
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    y = L.Activation("relu", name="relu")(x)
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    cnn = keras.Model(inp, L.Dense(3, name="head")(x), name="residual")
    seq = keras.Input((5, 3))
    x = L.LSTM(4, return_sequences=True, recurrent_dropout=0.1, name="lstm")(seq)
    x = L.Bidirectional(L.GRU(2), name="bi")(x)
    x = L.Lambda(keras.ops.tanh, name="tanh")(x)
    rnn = keras.Model(seq, L.Dense(1, name="out")(x), name="rnn")
    text = keras.Input((), dtype="string")
    x = L.TextVectorization(max_tokens=10, output_sequence_length=4, vocabulary=["a", "b"])(text)
    x = L.Embedding(10, 4)(x)
    vec = keras.Model(text, L.Dense(1)(L.Flatten()(x)), name="text")
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=8,
        max_sequence_length=8,
    )
    vit = keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3),
        patch_size=4,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        mlp_dim=8,
    )
    classifier = keras_hub.models.BertTextClassifier(
        backbone=bert, num_classes=2, preprocessor=None
    )
    return [mlp, cnn, rnn, vec, bert, vit, classifier]


def _keras3_configs() -> list[dict]:
    configs = [keras.saving.serialize_keras_object(m) for m in _keras3_models()]
    tokenizer = keras_hub.tokenizers.BytePairTokenizer(
        vocabulary={"a": 0, "b": 1, "ab": 2}, merges=["a b"], sequence_length=4
    )
    configs.append(keras.saving.serialize_keras_object(tokenizer))
    return [json.loads(json.dumps(c)) for c in configs]  # plain JSON, as a file holds it


# A fixture the checker refuses as it is (a Python-lambda `Lambda`): not in the corpus.
REFUSED_FIXTURES = ("lambda.h5",)


def _keras2_configs() -> list[dict]:
    configs = []
    for path in sorted(FIXTURES.glob("*.h5")):
        if path.name in REFUSED_FIXTURES:
            continue
        with h5py.File(path, "r") as f:
            configs.append(safety.parse_config(f.attrs["model_config"], RECEIVED))
    for node in safety.read_keras_metadata(FIXTURES / "savedmodel"):
        if node["metadata"]:
            configs.append(safety.parse_config(node["metadata"], RECEIVED))
    return configs


@pytest.fixture(scope="module")
def corpus() -> dict:
    keras3 = _keras3_configs()
    keras2 = _keras2_configs()
    assert len(keras3) >= 8 and len(keras2) >= 6, (len(keras3), len(keras2))
    return {
        KERAS3: (keras3, trust.keras3_allowlist()),
        KERAS2: (keras2, keras2_allowlist()),
    }


# -- mutations -----------------------------------------------------------------

STRINGS = [
    "",
    "relu",
    "Dense",
    "Lambda",
    "function",
    "builtins",
    "keras",
    "keras.layers",
    "keras.src.utils.file_utils",
    "keras_hub>compute_sentence_piece_proto",
    "keras_hub>BertBackbone",
    "core.Lambda",
    "tensorflow.python.keras.layers",
    "os",
    "system",
    "__lambda__",
    "__keras_tensor__",
    "__tuple__",
    "TypeSpec",
    "_CONSTANT_VALUE",
    "lambda",
    "raw",
    "/etc/passwd",
    "../../secret",
    "vocab.txt",
    "a>b>c",
    ">",
    "x" * 5000,
    "\x00\x1b[31m\u202e",
    "math.add",
    "io.write_file",
    "float32",
    "mixed_float16",
]
NUMBERS = [0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1e308, float("inf"), float("nan"), 0.5, True]
KEYS = [
    "module",
    "class_name",
    "config",
    "registered_name",
    "name",
    "function",
    "function_type",
    "output_shape",
    "output_shape_type",
    "arguments",
    "vocabulary",
    "merges",
    "proto",
    "layer",
    "layers",
    "inbound_nodes",
    "build_config",
    "shared_object_id",
    "dtype",
    "units",
    "kernel_initializer",
    "activation",
    "standardize",
    "items",
    "proto_output_file",
]


def _random_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(STRINGS)
    if roll < 0.55:
        return rng.choice(NUMBERS)
    if roll < 0.6:
        return None
    if roll < 0.8 and depth < 4:
        return {rng.choice(KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice(STRINGS)


def _deep(rng: random.Random, depth: int):
    """A value nested `depth` levels (built iteratively)."""
    value = rng.choice(STRINGS)
    for _ in range(depth):
        value = {"class_name": "Dense", "config": value} if rng.random() < 0.5 else [value]
    return value


def _copy(value):
    """A deep copy of a JSON value, iteratively (mutations nest past the recursion limit)."""
    root = [value]
    stack = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        item = parent[key]
        if isinstance(item, dict):
            parent[key] = dict(item)
            stack.extend((parent[key], k) for k in item)
        elif isinstance(item, list):
            parent[key] = list(item)
            stack.extend((parent[key], i) for i in range(len(item)))
    return root[0]


def _containers(config) -> list:
    """Every dict and list in `config`, iteratively."""
    found, stack = [], [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


def _mutate(rng: random.Random, config):
    """One random edit of a container somewhere in `config` (in place)."""
    target = rng.choice(_containers(config))
    roll = rng.random()
    if isinstance(target, dict):
        keys = list(target)
        if keys and roll < 0.3:
            target[rng.choice(keys)] = _random_value(rng)
        elif keys and roll < 0.45:
            del target[rng.choice(keys)]
        elif roll < 0.65:
            target[rng.choice(KEYS)] = _random_value(rng)
        elif keys and roll < 0.75:
            key = rng.choice(keys)  # a value of another type: a dict's list, a string's dict
            value = target[key]
            target[key] = (
                list(value.values())
                if isinstance(value, dict)
                else {"config": value, "items": value}
            )
        elif roll < 0.8:
            target[rng.choice(KEYS)] = _deep(rng, rng.choice([10, 300, 3000]))
        elif keys:
            target[rng.choice(keys)] = _copy(rng.choice(_containers(config)))
    elif target:
        i = rng.randrange(len(target))
        if roll < 0.4:
            target[i] = _random_value(rng)
        elif roll < 0.6:
            del target[i]
        elif roll < 0.8:
            target.insert(i, _random_value(rng))
        else:
            target.extend(_copy(target[: rng.randint(1, 3)]))
    else:
        target.append(_random_value(rng))


def _check(config, allowlist, *, unsafe: bool) -> None:
    checker.check_config(config, allowlist, received=RECEIVED, unsafe=unsafe)


def _case_rng(test: str, case: int) -> random.Random:
    return random.Random(f"{SEED}:{test}:{case}")


def test_mutated_configs_pass_or_are_refused(corpus):
    """Random edits of real configs: the checker passes them or raises `RegularizeError`."""
    outcomes = {"passed": 0, "refused": 0}
    for case in range(CASES):
        rng = _case_rng("mutate", case)
        engine = rng.choice(sorted(corpus))
        configs, allowlist = corpus[engine]
        config = _copy(rng.choice(configs))
        for _ in range(rng.randint(1, 8)):
            _mutate(rng, config)
        unsafe = rng.random() < 0.2
        try:
            _check(config, allowlist, unsafe=unsafe)
        except RegularizeError as err:
            assert str(err).count("\n") == 0, (case, str(err)[:500])
            outcomes["refused"] += 1
        except Exception as err:  # noqa: BLE001 - the property: nothing else escapes
            pytest.fail(
                f"case {case} ({engine}, unsafe={unsafe}): {type(err).__name__}: {err!r:.500}"
            )
        else:
            outcomes["passed"] += 1
    # Both outcomes occur: the mutations neither break every config nor leave all intact.
    assert outcomes["passed"] > 0 and outcomes["refused"] > 0, outcomes


def test_real_configs_pass(corpus):
    """The unmutated corpus is clean: a refusal in the fuzz test is the mutation's doing."""
    for configs, allowlist in corpus.values():
        for config in configs:
            _check(_copy(config), allowlist, unsafe=False)
    for name in REFUSED_FIXTURES:
        with h5py.File(FIXTURES / name, "r") as f:
            config = safety.parse_config(f.attrs["model_config"], RECEIVED)
        with pytest.raises(ModelLoadError, match="Python-lambda"):
            _check(config, keras2_allowlist(), unsafe=False)


def _plants(engine: str) -> list[tuple[str, dict]]:
    """(what, object) for each attack a config may hide, as the engine's files write it."""
    dotted = {
        "module": "tensorflow.python.keras.layers",
        "class_name": "core.Lambda",
        "config": {
            "name": "dotted",
            "function": ["4wEAAAAA", None, None],
            "function_type": "lambda",
        },
    }
    # A module the engine would import: tf_keras imports any; Keras 3 only its
    # own packages (a class of `os` is unknown to it), so a private one of those.
    imported = {"module": "os", "class_name": "system", "config": {}}
    private = {"module": "keras.src.utils.file_utils", "class_name": "get_file", "config": {}}
    # Keras 3 resolves a `__typespec__`'s `spec_name` like a class, then calls `_deserialize`.
    typespec = {
        "class_name": "__typespec__",
        "spec_name": "get_file",
        "module": "keras.src.utils.file_utils",
        "config": [],
        "registered_name": None,
    }
    python_lambda = {"class_name": "__lambda__", "config": {"code": "4wEAAAAA", "defaults": None}}
    truncate = {
        "module": "builtins",
        "class_name": "function",
        "config": "keras_hub>compute_sentence_piece_proto",
        "registered_name": "function",
    }
    vocabulary = {
        "module": "keras_hub.src.models.parseq.parseq_tokenizer",
        "class_name": "PARSeqTokenizer",
        "config": {"name": "tok", "vocabulary": "/etc/passwd"},
        "registered_name": "keras_hub>PARSeqTokenizer",
    }
    keras2_lambda = {
        "class_name": "Lambda",
        "config": {"name": "lam", "function": ["4wEAAAAA", None, None], "function_type": "lambda"},
    }
    if engine == KERAS3:
        return [
            ("dotted class", dotted),
            ("private module", private),
            ("type spec", typespec),
            ("python lambda", python_lambda),
            ("registered function", truncate),
            ("vocabulary file", vocabulary),
        ]
    return [
        ("dotted class", dotted),
        ("imported module", imported),
        ("python lambda", keras2_lambda),
    ]


def test_planted_attacks_are_refused_wherever_they_sit(corpus):
    """An attack object put at a random place in a real config is refused."""
    for case in range(CASES):
        rng = _case_rng("plant", case)
        engine = rng.choice(sorted(corpus))
        configs, allowlist = corpus[engine]
        config = _copy(rng.choice(configs))
        what, plant = rng.choice(_plants(engine))
        target = rng.choice([c for c in _containers(config) if isinstance(c, dict)])
        key = rng.choice([*target, *KEYS]) if target else rng.choice(KEYS)
        if rng.random() < 0.5 or key not in target:
            target[key] = _copy(plant)
        else:
            target[key] = [target[key], _copy(plant)]
        with pytest.raises(ModelLoadError, match="Refusing"):
            _check(config, allowlist, unsafe=False)
            pytest.fail(f"case {case} ({engine}): the {what} under key {key!r} passed")


def _mutate_text(rng: random.Random, text: str) -> str:
    """One edit of a JSON text: a cut, a spliced token, a character flipped."""
    if not text:
        return rng.choice(['{"class_name": "Dense"}', "[]", "{"])
    i = rng.randrange(len(text))
    roll = rng.random()
    if roll < 0.2:
        return text[:i]
    if roll < 0.6:
        token = rng.choice(['"', "{", "}", "[", "]", ",", ":", "\\", "null", '"module": "os"'])
        return text[:i] + token + text[i:]
    if roll < 0.8:
        return text[:i] + chr(rng.randrange(1, 0x3000)) + text[i + 1 :]
    j = rng.randrange(len(text))
    return text[:i] + text[j : j + rng.randint(1, 200)] + text[i:]


def test_mutated_texts_pass_or_are_refused(corpus):
    """Edits of a config's JSON text, parsed as the loaders parse it, then checked."""
    texts = {engine: [json.dumps(c) for c in configs] for engine, (configs, _) in corpus.items()}
    for case in range(CASES):
        rng = _case_rng("text", case)
        engine = rng.choice(sorted(corpus))
        text = rng.choice(texts[engine])
        for _ in range(rng.randint(1, 4)):
            text = _mutate_text(rng, text)
        try:
            config = safety.parse_config(text, RECEIVED)
            _check(config, corpus[engine][1], unsafe=False)
        except RegularizeError as err:
            assert str(err).count("\n") == 0, (case, str(err)[:500])
        except Exception as err:  # noqa: BLE001 - the property: nothing else escapes
            pytest.fail(f"case {case} ({engine}): {type(err).__name__}: {err!r:.500}")
