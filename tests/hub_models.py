"""Tiny keras-hub backbones built from their constructors (no download), by name.

Shared by tests/test_keras_hub_matrix.py and benchmarks/keras_hub_table.py.
Default arguments except the sizes, so each model carries the dropout its
presets ship with (BERT's `dropout=0.1`, EfficientNet's 0.2).
"""

from __future__ import annotations

import keras_hub

M = keras_hub.models
_TEXT = dict(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32)
_DECODER = dict(
    vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
    intermediate_dim=32,
)  # fmt: skip


def _bert():
    return M.BertBackbone(**_TEXT, max_sequence_length=16)


def _distil_bert():
    return M.DistilBertBackbone(**_TEXT, max_sequence_length=16)


def _roberta():
    return M.RobertaBackbone(**_TEXT, max_sequence_length=16)


def _deberta_v3():
    return M.DebertaV3Backbone(**_TEXT, max_sequence_length=16, bucket_size=4)


def _gpt2():
    return M.GPT2Backbone(**_TEXT, max_sequence_length=16)


def _t5():
    return M.T5Backbone(**_TEXT)


def _bart():
    return M.BartBackbone(**_TEXT, max_sequence_length=16)


def _whisper():
    return M.WhisperBackbone(
        **_TEXT, num_mels=8, max_encoder_sequence_length=16, max_decoder_sequence_length=8
    )


def _gemma():
    return M.GemmaBackbone(**_DECODER, head_dim=8)


def _gemma3():
    return M.Gemma3Backbone(**_DECODER, head_dim=8, image_size=None, vision_encoder=None)


def _llama():
    return M.LlamaBackbone(**_DECODER)


def _mistral():
    return M.MistralBackbone(**_DECODER)


def _qwen():
    return M.QwenBackbone(**_DECODER)


def _qwen3():
    return M.Qwen3Backbone(**_DECODER, head_dim=8)


def _phi3():
    return M.Phi3Backbone(**_DECODER)


def _vit():
    return M.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )


def _deit():
    return M.DeiTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32,
    )  # fmt: skip


def _dinov2():
    return M.DINOV2Backbone(
        patch_size=8, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3),
    )  # fmt: skip


def _mit():
    return M.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2], hidden_dims=[8, 16], image_shape=(32, 32, 3),
    )  # fmt: skip


def _efficientnet():
    return M.EfficientNetBackbone(
        stackwise_kernel_sizes=[3], stackwise_num_repeats=[1], stackwise_input_filters=[8],
        stackwise_output_filters=[8], stackwise_expansion_ratios=[1],
        stackwise_squeeze_and_excite_ratios=[0.25], stackwise_strides=[1],
        stackwise_block_types=["v1"], width_coefficient=1.0, depth_coefficient=1.0,
        input_shape=(32, 32, 3),
    )  # fmt: skip


def _clip():
    vision = M.CLIPVisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3),
    )  # fmt: skip
    text = M.CLIPTextEncoder(
        vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
        intermediate_dim=32, max_sequence_length=8,
    )  # fmt: skip
    return M.CLIPBackbone(vision_encoder=vision, text_encoder=text, projection_dim=16)


def _resnet():
    return M.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
        image_shape=(32, 32, 3),
    )  # fmt: skip


def _cspnet():
    return M.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1],
        stackwise_strides=[2], stackwise_num_filters=[8], block_type="dark_block",
        stage_type="dark",
        image_shape=(32, 32, 3),
    )  # fmt: skip


def _densenet():
    return M.DenseNetBackbone(stackwise_num_repeats=[1, 1], image_shape=(32, 32, 3))


def _vgg():
    return M.VGGBackbone(
        stackwise_num_repeats=[1], stackwise_num_filters=[8], image_shape=(32, 32, 3)
    )


def _xception():
    return M.XceptionBackbone(
        stackwise_conv_filters=[[8, 8], [8, 8]], stackwise_pooling=[True, False],
        image_shape=(32, 32, 3),
    )  # fmt: skip


BACKBONES = {
    "BERT": _bert,
    "DistilBERT": _distil_bert,
    "RoBERTa": _roberta,
    "DeBERTaV3": _deberta_v3,
    "GPT-2": _gpt2,
    "T5": _t5,
    "BART": _bart,
    "Whisper": _whisper,
    "Gemma": _gemma,
    "Gemma3": _gemma3,
    "Llama": _llama,
    "Mistral": _mistral,
    "Qwen": _qwen,
    "Qwen3": _qwen3,
    "Phi3": _phi3,
    "ViT": _vit,
    "DeiT": _deit,
    "DINOv2": _dinov2,
    "MiT": _mit,
    "EfficientNet": _efficientnet,
    "CLIP": _clip,
    "ResNet": _resnet,
    "CSPNet": _cspnet,
    "DenseNet": _densenet,
    "VGG": _vgg,
    "Xception": _xception,
}
