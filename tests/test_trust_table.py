"""The README's trust table says the refusals in the words the tool prints.

Every quoted "Refusing ..." message of the README's "Models from strangers"
section is turned into a pattern ('X', '...', (...) and sizes are
placeholders) and must match a message that the checker really produces on a
crafted config, so a reworded message or a README row without a refusal
behind it fails here. The same crafted configs with `unsafe=True` pass,
except the resource bounds, which `unsafe` does not lift.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import keras_hub  # noqa: F401  registers its objects, as loading a keras-hub file does
import numpy as np
import pytest

from regularize.core import budget
from regularize.core import checker
from regularize.core import safety
from regularize.core.allowlist import keras2_allowlist
from regularize.core.errors import ModelLoadError
from regularize.keras3 import trust

ROOT = Path(__file__).resolve().parent.parent
R = "Received: path='m'"


def _readme_messages() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Models from strangers") : text.index("## Presets")]
    return re.findall(r'"((?:Refusing|Cannot)[^"]*)"', " ".join(section.split()))


def _pattern(message: str) -> re.Pattern:
    out = re.escape(message)
    for placeholder, regex in (
        (re.escape("'X'"), r"'[^']*'"),
        (re.escape("'...'"), r"'.*?'"),
        (re.escape("(...)"), r"\(.*?\)"),
        (re.escape("..."), r".*?"),
    ):
        out = out.replace(placeholder, regex)
    out = re.sub(r"\d+(?:\\\.\d+)?\\ (?:GB|MB|kB|B)", r"[\\d.]+ (?:GB|MB|kB|B)", out)
    return re.compile(out)


def _layer(kind, config, **extra):
    return {"class_name": kind, "config": {"name": "x", **config}, **extra}


def _model(*layers):
    return {"class_name": "Functional", "config": {"name": "m", "layers": list(layers)}}


def _op(function, inbound):
    layer = _layer("TFOpLambda", {"function": function})
    layer["inbound_nodes"] = inbound
    return layer


KERAS3 = {
    "python lambda": _layer(
        "Lambda", {"function": {"class_name": "__lambda__", "config": {"code": "4wEA"}}}
    ),
    "dotted class": _layer("core.Lambda", {}, module="tensorflow.python.keras.layers"),
    "registered function": _layer(
        "Lambda",
        {
            "function": {
                "module": "builtins",
                "class_name": "function",
                "config": "keras_hub>compute_sentence_piece_proto",
                "registered_name": "function",
            },
            "arguments": {"proto_output_file": "victim"},
        },
    ),
    "downloading function": _layer(
        "Lambda",
        {
            "function": {
                "module": "keras.applications.imagenet_utils",
                "class_name": "function",
                "config": "decode_predictions",
                "registered_name": None,
            }
        },
    ),
    "vocabulary file": _layer(
        "PARSeqTokenizer",
        {"vocabulary": "/etc/hosts"},
        module="keras_hub.src.models.parseq.parseq_tokenizer",
        registered_name="keras_hub>PARSeqTokenizer",
    ),
}
KERAS2 = {
    "op layer": _op("io.write_file", [["_CONSTANT_VALUE", -1, "/tmp/x", {}]]),
    "attribute layer": _layer("InstanceMethod", {"attr_name": "numpy"}),
    "module": _layer("Dense", {}, module="tensorflow.python.keras.layers"),
    "python lambda": _layer("Lambda", {"function": ["4wEA", None, None]}),
}


def _messages() -> list[str]:
    messages = []
    allow3 = trust.keras3_allowlist()
    for layer in KERAS3.values():
        with pytest.raises(ModelLoadError) as info:
            checker.check_config(_model(layer), allow3, received=R)
        messages.append(str(info.value))
        checker.check_config(_model(layer), allow3, received=R, unsafe=True)  # lifted
    allow2 = keras2_allowlist()
    for layer in KERAS2.values():
        with pytest.raises(ModelLoadError) as info:
            checker.check_config(_model(layer), allow2, received=R)
        messages.append(str(info.value))
        checker.check_config(_model(layer), allow2, received=R, unsafe=True)
    big = _op("fill", [["_CONSTANT_VALUE", -1, [60000, 10000], {"value": 1.0}]])
    for unsafe in (False, True):  # a resource bound: `unsafe` does not lift it
        with pytest.raises(ModelLoadError) as info:
            checker.check_config(_model(big), allow2, received=R, unsafe=unsafe)
    messages.append(str(info.value))
    with pytest.raises(ModelLoadError) as info:
        budget.check_weight_budget(
            [budget.LayerWeights("x", "Dense", 14_400_240_000)],
            stored=11_200,
            available=None,
            received=R,
        )
    messages.append(str(info.value))
    messages.append(safety.safe_mode_refusal("TFSMLayer ... safe_mode=False", R))
    return messages


def test_every_refusal_in_the_readme_is_a_message_the_tool_prints(tmp_path):
    messages = _messages() + [_savedmodel_message(tmp_path), _external_message(tmp_path)]
    readme = _readme_messages()
    assert len(readme) >= 12, readme
    for message in readme:
        pattern = _pattern(message)
        assert any(pattern.search(m) for m in messages), (message, messages)


def test_the_unsafe_hint_ends_every_refusal_it_lifts():
    for message in _messages()[: len(KERAS3) + len(KERAS2)]:
        assert message.endswith(f"{checker.UNSAFE_HINT} {R}"), message


def _savedmodel_message(tmp_path: Path) -> str:
    from regularize import keras2

    folder = tmp_path / "sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"")
    metadata = b'{"class_name": "MyModel"}'
    node = b"\x1a\x04root" + b"\x2a" + bytes([len(metadata)]) + metadata
    (folder / "keras_metadata.pb").write_bytes(b"\x0a" + bytes([len(node)]) + node)
    with pytest.raises(ModelLoadError) as info:
        keras2.check_model_file(folder, unsafe=False)
    return str(info.value)


def _external_message(tmp_path: Path) -> str:
    data = tmp_path / "data.bin"
    data.write_bytes(np.zeros(4, np.float32).tobytes())
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("model_weights/fc/kernel", (4,), np.float32, external=[(str(data), 0, 16)])
    with pytest.raises(ModelLoadError) as info:
        safety.check_h5_storage(path, R)
    return str(info.value)
