"""What `add_dropout` does to modern architectures: a markdown table, measured in this run.

Run from the repository root (keras-hub installed; nothing is downloaded):

    python benchmarks/modern_models_table.py           # about 3 minutes on 2 cores
    python benchmarks/modern_models_table.py --only vit,bert

Models: keras-hub BERT, ViT, a ResNet image classifier (a task, with its preprocessor),
EfficientNet and a Llama decoder backbone, built from their constructors at tiny sizes; Keras
Applications ResNet50, MobileNetV2, EfficientNetB0 and ConvNeXtTiny with `weights=None` and
32x32 inputs. `attention_rate` and `drop_path` are passed only where `regularize.add_dropout`
takes them.

Columns: graph sites inserted; constructor dropout arguments set (keras-hub) or owned dropout
updated; drop-path sites; whether the model kept its class; whether the saved `.keras` file
loads again (plain `keras.saving.load_model`) with bit-identical inference; the rewrite time.
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import regularize  # noqa: E402
from regularize.core.report import INSERT  # noqa: E402
from regularize.core.report import UPDATE  # noqa: E402
from regularize.core.report import Report  # noqa: E402

IMAGE = (32, 32, 3)


def _images():
    return np.random.default_rng(0).uniform(0, 1, size=(2, *IMAGE)).astype("float32")


def _tokens(segments=False):
    x = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8), "int32")}
    if segments:
        x["segment_ids"] = np.zeros((2, 8), "int32")
    return x


def bert():
    import keras_hub

    model = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=16, dropout=0.0,
    )  # fmt: skip
    return model, _tokens(segments=True)


def vit():
    import keras_hub

    model = keras_hub.models.ViTBackbone(
        image_shape=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
    )  # fmt: skip
    return model, _images()


def resnet_classifier():
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=IMAGE,
    )  # fmt: skip
    converter = keras_hub.layers.ResNetImageConverter(image_size=IMAGE[:2], scale=1 / 255.0)
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter)
    model = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=preprocessor
    )
    return model, _images()


def efficientnet():
    import keras_hub

    model = keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 2],
        stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2], stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 1], stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
        dropout=0.0, input_shape=IMAGE,
    )  # fmt: skip
    return model, _images()


def llama():
    import keras_hub

    model = keras_hub.models.LlamaBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, dropout=0.0,
    )  # fmt: skip
    return model, _tokens()


def application(name):
    def build():
        model = getattr(keras.applications, name)(weights=None, input_shape=IMAGE, classes=10)
        return model, _images()

    build.__name__ = name
    return build


MODELS = {
    "bert": ("BERT (keras-hub)", bert),
    "vit": ("ViT (keras-hub)", vit),
    "resnet_classifier": ("ResNet image classifier task (keras-hub)", resnet_classifier),
    "efficientnet": ("EfficientNet (keras-hub)", efficientnet),
    "llama": ("Llama decoder (keras-hub)", llama),
    "resnet50": ("ResNet50 (Applications)", application("ResNet50")),
    "mobilenetv2": ("MobileNetV2 (Applications)", application("MobileNetV2")),
    "efficientnetb0": ("EfficientNetB0 (Applications)", application("EfficientNetB0")),
    "convnexttiny": ("ConvNeXtTiny (Applications)", application("ConvNeXtTiny")),
}


def _options() -> dict:
    """`attention_rate` / `drop_path` where this version of `add_dropout` takes them."""
    parameters = inspect.signature(regularize.add_dropout).parameters
    options = {}
    if "attention_rate" in parameters:
        options["attention_rate"] = 0.1
    if "drop_path" in parameters:
        options["drop_path"] = 0.1
    return options


def _outputs(model, x):
    return [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(model(x, training=False))]


def _is_drop_path(site) -> bool:
    return site.kind == "DropPath"


# Kinds of sites that put a dropout layer into the graph (the rest set a layer's or a
# constructor's own dropout key: `owned`, or a keras-hub argument such as `dropout_rate`).
_LAYER_KINDS = ("Dropout", "SpatialDropout", "GaussianDropout", "AlphaDropout", "recurrent")


def _is_owned(site) -> bool:
    return not site.kind.startswith(_LAYER_KINDS) and not _is_drop_path(site)


def _describe_owned(sites) -> str:
    """`dropout_rate=0.2` per keras-hub argument; `owned ×N` for layers of the graph."""
    graph = [s for s in sites if s.kind == "owned"]
    named = [f"{s.kind}={s.rate:g}" for s in sites if s.kind != "owned"]
    if graph:
        named.append(f"{len(graph)} layers")
    return ", ".join(named) or "0"


def row(label, build, options, folder) -> dict:
    model, x = build()
    before = _outputs(model, x)
    report = Report()
    start = time.perf_counter()
    try:
        new = regularize.add_dropout(model, rate=0.2, report=report, **options)
    except regularize.RegularizeError as err:  # reported in the table, not raised
        first = str(err).splitlines()[0][:100]
        return dict.fromkeys(("inserted", "owned", "drop_path", "class_kept", "exact"), "-") | {
            "model": label,
            "reload": f"refused: {first}",
            "seconds": time.perf_counter() - start,
        }
    seconds = time.perf_counter() - start
    changed = [s for s in report.sites if s.action in (INSERT, UPDATE)]
    drop_path = [s for s in changed if _is_drop_path(s)]
    owned = [s for s in changed if _is_owned(s)]
    inserted = [s for s in changed if s not in drop_path and s not in owned]
    exact = all(np.array_equal(a, b) for a, b in zip(before, _outputs(new, x), strict=True))
    try:
        path = regularize.save_model(new, Path(folder) / f"{model.name}.keras")
        reloaded = keras.saving.load_model(path)
        same = all(np.array_equal(a, b) for a, b in zip(before, _outputs(reloaded, x), strict=True))
        reload = "yes" if same else "loads, outputs differ"
    except Exception as err:  # reported in the table, not raised
        reload = f"no: {str(err).splitlines()[0][:80]}"
    return {
        "model": label,
        "inserted": len(inserted),
        "owned": _describe_owned(owned),
        "drop_path": len(drop_path),
        "class_kept": "yes" if type(new) is type(model) else f"no ({type(new).__name__})",
        "exact": "yes" if exact else "NO",
        "reload": reload,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated keys: " + ",".join(MODELS))
    args = parser.parse_args()
    keys = args.only.split(",") if args.only else list(MODELS)
    options = _options()
    given = "".join(f", {k}={v}" for k, v in options.items())
    print(f"add_dropout(rate=0.2{given})\n")
    header = (
        "| model | sites inserted | owned-dropout keys set | drop-path sites | class kept "
        "| inference exact | reload OK | time (s) |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    with tempfile.TemporaryDirectory() as folder:
        for key in keys:
            label, build = MODELS[key]
            r = row(label, build, options, folder)
            print(
                f"| {r['model']} | {r['inserted']} | {r['owned']} | {r['drop_path']} "
                f"| {r['class_kept']} | {r['exact']} | {r['reload']} | {r['seconds']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
