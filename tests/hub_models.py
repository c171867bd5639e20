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


def _albert():
    return M.AlbertBackbone(**_TEXT, embedding_dim=8, max_sequence_length=16)


def _electra():
    return M.ElectraBackbone(
        vocab_size=50, num_layers=1, num_heads=2, hidden_dim=16, embedding_dim=8,
        intermediate_dim=32, max_sequence_length=16,
    )  # fmt: skip


def _xlm_roberta():
    return M.XLMRobertaBackbone(**_TEXT, max_sequence_length=16)


def _f_net():
    return M.FNetBackbone(
        vocabulary_size=50, num_layers=1, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=16,
    )  # fmt: skip


def _roformer_v2():
    return M.RoformerV2Backbone(**_TEXT, head_size=8)


def _xlnet():
    return M.XLNetBackbone(**_TEXT)


def _esm():
    return M.ESMBackbone(**_TEXT, max_sequence_length=16)


def _opt():
    return M.OPTBackbone(**_TEXT, max_sequence_length=16)


def _bloom():
    return M.BloomBackbone(**_TEXT)


def _falcon():
    return M.FalconBackbone(
        vocabulary_size=50, num_layers=1, num_attention_heads=2, hidden_dim=16,
        intermediate_dim=32,
    )  # fmt: skip


def _gpt_neo_x():
    return M.GPTNeoXBackbone(**_TEXT, max_sequence_length=16)


def _llama3():
    return M.Llama3Backbone(**_DECODER)


def _mixtral():
    return M.MixtralBackbone(**_DECODER, num_experts=2)


def _qwen_moe():
    return M.QwenMoeBackbone(
        **_DECODER, moe_intermediate_dim=16, shared_expert_intermediate_dim=16, num_experts=2,
        top_k=1,
    )  # fmt: skip


def _qwen3_moe():
    return M.Qwen3MoeBackbone(
        **_DECODER, moe_intermediate_dim=16, num_experts=2, head_dim=8, top_k=1
    )


def _gpt_oss():
    return M.GptOssBackbone(**_DECODER, num_experts=2, head_dim=8)


def _smollm3():
    return M.SmolLM3Backbone(
        vocabulary_size=50, hidden_dim=16, intermediate_dim=32, num_layers=1,
        num_attention_heads=2, num_key_value_heads=1, attention_bias=False,
        attention_dropout=0.0, rope_layer_enabled_list=[True], layer_types=["attention"],
        mlp_bias=False, layer_norm_epsilon=1e-6, max_position_embeddings=16, rope_theta=10000.0,
        partial_rotary_factor=1.0,
    )  # fmt: skip


def _t5gemma():
    return M.T5GemmaBackbone(
        vocabulary_size=50, encoder_hidden_dim=16, encoder_intermediate_dim=32,
        encoder_num_layers=1, encoder_num_attention_heads=2, encoder_num_key_value_heads=1,
        encoder_head_dim=8, encoder_layer_types=["full_attention"], decoder_hidden_dim=16,
        decoder_intermediate_dim=32, decoder_num_layers=1, decoder_num_attention_heads=2,
        decoder_num_key_value_heads=1, decoder_head_dim=8, decoder_layer_types=["full_attention"],
    )  # fmt: skip


def _moonshine():
    return M.MoonshineBackbone(
        vocabulary_size=50, filter_dim=16, encoder_num_layers=1, decoder_num_layers=1,
        hidden_dim=16, intermediate_dim=32, encoder_num_heads=2, decoder_num_heads=2,
    )  # fmt: skip


def _rwkv7():
    return M.RWKV7Backbone(
        hidden_size=16, head_size=8, num_layers=1, vocabulary_size=50, intermediate_dim=32,
        gate_lora=4, mv_lora=4, aaa_lora=4, decay_lora=4,
    )  # fmt: skip


def _edrec():
    return M.EdRecBackbone(
        vocab_size=50, num_layers_enc=1, num_layers_dec=1, hidden_dim=16, intermediate_dim=32,
        num_heads=2,
    )  # fmt: skip


def _resnet4(image_shape=(32, 32, 3)):
    # Four stages: pyramid outputs P2 to P5, as the models built on a ResNet expect.
    return M.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block", image_shape=image_shape,
    )  # fmt: skip


def _mobilenet():
    return M.MobileNetBackbone(
        stackwise_expansion=[[1]], stackwise_num_blocks=[1], stackwise_num_filters=[[8]],
        stackwise_kernel_size=[[3]], stackwise_num_strides=[[2]], stackwise_se_ratio=[[None]],
        stackwise_activation=[["relu"]], stackwise_padding=[[1]], output_num_filters=16,
        depthwise_filters=8, depthwise_stride=1, depthwise_residual=False, last_layer_filter=16,
        input_num_filters=8, image_shape=(32, 32, 3),
    )  # fmt: skip


def _hgnetv2():
    return M.HGNetV2Backbone(
        depths=[1], embedding_size=8, hidden_sizes=[16], stem_channels=[3, 8, 8],
        hidden_act="relu", use_learnable_affine_block=False,
        stackwise_stage_filters=[(8, 8, 16, 1, 1, 3)], apply_downsample=[False],
        use_lightweight_conv_block=[False], image_shape=(32, 32, 3),
    )  # fmt: skip


def _swin():
    return M.SwinTransformerBackbone(
        image_shape=(32, 32, 3), embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4
    )


def _vit_det():
    return M.ViTDetBackbone(
        hidden_size=8, num_layers=2, intermediate_dim=16, num_heads=2,
        global_attention_layer_indices=[1], image_shape=(16, 16, 3), patch_size=4,
        num_output_channels=4, window_size=2,
    )  # fmt: skip


def _dinov3():
    return M.DINOV3Backbone(
        patch_size=8, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3),
    )  # fmt: skip


def _siglip():
    vision = M.SigLIPVisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3),
    )  # fmt: skip
    text = M.SigLIPTextEncoder(
        vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
        intermediate_dim=32, max_sequence_length=8,
    )  # fmt: skip
    return M.SigLIPBackbone(vision_encoder=vision, text_encoder=text)


def _metaclip2():
    vision = M.MetaCLIP2VisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3),
    )  # fmt: skip
    text = M.MetaCLIP2TextEncoder(
        vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
        intermediate_dim=32, max_sequence_length=8,
    )  # fmt: skip
    return M.MetaCLIP2Backbone(vision_encoder=vision, text_encoder=text, projection_dim=16)


def _segformer():
    return M.SegFormerBackbone(image_encoder=_mit(), projection_filters=8)


def _deeplab_v3():
    return M.DeepLabV3Backbone(
        image_encoder=_resnet4(), spatial_pyramid_pooling_key="P5", upsampling_size=8,
        dilation_rates=[6], low_level_feature_key="P2", projection_filters=8,
    )  # fmt: skip


def _retinanet():
    return M.RetinaNetBackbone(image_encoder=_resnet4(), min_level=3, max_level=5, use_p5=False)


def _basnet():
    return M.BASNetBackbone(
        image_encoder=_resnet4(image_shape=(None, None, 3)), num_classes=1, projection_filters=64
    )


def _depth_anything():
    encoder = M.DINOV2Backbone(
        patch_size=4, num_layers=4, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3), position_embedding_shape=(32, 32),
    )  # fmt: skip
    return M.DepthAnythingBackbone(
        image_encoder=encoder, reassemble_factors=[4, 2, 1, 0.5], neck_hidden_dims=[8, 8, 8, 8],
        fusion_hidden_dim=8, head_hidden_dim=8, head_in_index=-1,
        feature_keys=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip


def _pali_gemma():
    return M.PaliGemmaBackbone(
        **_DECODER, image_size=16, head_dim=8, vit_patch_size=4, vit_num_heads=2,
        vit_hidden_dim=16, vit_num_layers=1, vit_intermediate_dim=32,
    )  # fmt: skip


def _gemma4():
    return M.Gemma4Backbone(**_DECODER, image_size=None, head_dim=8)


def _qwen3_5():
    return M.Qwen3_5Backbone(
        **_DECODER, head_dim=8, layer_types=["full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip


def _qwen3_5_moe():
    return M.Qwen3_5MoeBackbone(
        vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1, head_dim=8,
        hidden_dim=16, moe_intermediate_dim=16, shared_expert_intermediate_size=16,
        num_experts=2, top_k=1, layer_types=["full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip


def _video_prism():
    return M.VideoPrismBackbone(
        num_frames=2, patch_size=8, hidden_dim=16, intermediate_dim=32, num_heads=2,
        num_spatial_layers=1, num_temporal_layers=1, num_auxiliary_layers=0,
        image_shape=(32, 32, 3),
    )  # fmt: skip


def _sam():
    encoder = M.ViTDetBackbone(
        hidden_size=8, num_layers=2, intermediate_dim=16, num_heads=2,
        global_attention_layer_indices=[1], patch_size=4, num_output_channels=8, window_size=2,
        image_shape=(32, 32, 3),
    )  # fmt: skip
    prompt = keras_hub.layers.SAMPromptEncoder(
        hidden_size=8, image_embedding_size=(8, 8), input_image_size=(32, 32), mask_in_channels=4
    )
    decoder = keras_hub.layers.SAMMaskDecoder(
        num_layers=1, hidden_size=8, intermediate_dim=16, num_heads=2, embedding_dim=8,
        num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=8,
    )  # fmt: skip
    return M.SAMBackbone(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def _mobilenetv5():
    return M.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir"]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]], stackwise_strides=[[2], [2]],
        stackwise_act_layers=[["relu"], ["relu"]], stackwise_exp_ratios=[[2.0], [2.0]],
        stackwise_se_ratios=[[0.0], [0.0]], stackwise_dw_kernel_sizes=[[0], [3]],
        stackwise_dw_start_kernel_sizes=[[0], [0]], stackwise_dw_end_kernel_sizes=[[0], [0]],
        stackwise_exp_kernel_sizes=[[3], [0]], stackwise_pw_kernel_sizes=[[1], [0]],
        stackwise_num_heads=[[0], [0]], stackwise_key_dims=[[0], [0]],
        stackwise_value_dims=[[0], [0]], stackwise_kv_strides=[[0], [0]],
        stackwise_use_cpe=[[False], [False]], stem_size=8, num_features=16, use_msfa=False,
        image_shape=(32, 32, 3),
    )  # fmt: skip


def _gemma3n():
    return M.Gemma3nBackbone(
        text_vocab_size=50, text_hidden_size=16, num_hidden_layers=1, pad_token_id=0,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=[32],
        hidden_activation="gelu_approximate", layer_types=["full_attention"], sliding_window=4,
        rope_theta=10000.0, max_position_embeddings=16, vocab_size_per_layer_input=50,
        hidden_size_per_layer_input=2, altup_num_inputs=2, laurel_rank=1,
    )  # fmt: skip


def _t5gemma2():
    return M.T5Gemma2Backbone(
        vocabulary_size=50, encoder_hidden_dim=16, encoder_intermediate_dim=32,
        encoder_num_layers=1, encoder_num_attention_heads=2, encoder_num_key_value_heads=1,
        encoder_head_dim=8, encoder_layer_types=["full_attention"], decoder_hidden_dim=16,
        decoder_intermediate_dim=32, decoder_num_layers=1, decoder_num_attention_heads=2,
        decoder_num_key_value_heads=1, decoder_head_dim=8, decoder_layer_types=["full_attention"],
    )  # fmt: skip


def _d_fine():
    hgnetv2 = M.HGNetV2Backbone(
        depths=[1, 1], embedding_size=8, hidden_sizes=[16, 32], stem_channels=[3, 8, 8],
        hidden_act="relu", use_learnable_affine_block=False,
        stackwise_stage_filters=[(8, 8, 16, 1, 1, 3), (16, 8, 32, 1, 1, 3)],
        apply_downsample=[False, True], use_lightweight_conv_block=[False, False],
        image_shape=(None, None, 3), out_features=["stage1", "stage2"],
    )  # fmt: skip
    return M.DFineBackbone(
        backbone=hgnetv2, decoder_in_channels=[16, 16], encoder_hidden_dim=16, num_denoising=0,
        num_labels=4, hidden_dim=16, learn_initial_query=False, num_queries=8,
        anchor_image_size=(32, 32), feat_strides=[4, 8], num_feature_levels=2,
        encoder_in_channels=[16, 32], encode_proj_layers=[1], num_attention_heads=2,
        encoder_ffn_dim=32, num_encoder_layers=1, hidden_expansion=0.5, depth_multiplier=0.5,
        eval_idx=-1, num_decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        decoder_n_points=[2, 2], lqe_hidden_dim=8, num_lqe_layers=1,
        out_features=["stage1", "stage2"], image_shape=(32, 32, 3), seed=0,
    )  # fmt: skip


def _parseq():
    encoder = M.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
        mlp_dim=32, use_class_token=False,
    )  # fmt: skip
    return M.PARSeqBackbone(
        image_encoder=encoder, vocabulary_size=50, max_label_length=8, decoder_hidden_dim=16,
        num_decoder_layers=1, num_decoder_heads=2, decoder_mlp_dim=32,
    )  # fmt: skip


def _blip2():
    from keras_hub.src.models.blip2.blip2_custom_opt import BLIP2CustomOPT
    from keras_hub.src.models.blip2.blip2_qformer import BLIP2QFormer
    from keras_hub.src.models.blip2.blip2_vision_encoder import BLIP2VisionEncoder

    vision = BLIP2VisionEncoder(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, use_patch_bias=True, use_class_token=True, use_mha_bias=True,
        use_mlp_bias=True, dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_range=0.02,
    )  # fmt: skip
    qformer = BLIP2QFormer(
        num_query_tokens=4, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        vision_dim=16, cross_attention_frequency=1, dropout=0.1, layer_norm_epsilon=1e-6,
    )  # fmt: skip
    language = BLIP2CustomOPT(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        num_query_tokens=4, dropout=0.1, max_sequence_length=16, qformer_hidden_dim=16,
    )  # fmt: skip
    return M.BLIP2Backbone(vision_encoder=vision, qformer=qformer, language_model=language)


def _flux():
    return M.FluxBackbone(
        input_channels=4, hidden_size=16, mlp_ratio=2.0, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=[2, 2, 4], theta=10000, use_bias=True,
        image_shape=(8, 4), text_shape=(8, 16), image_ids_shape=(8, 3), text_ids_shape=(8, 3),
        y_shape=(16,),
    )  # fmt: skip


def _stable_diffusion_3():
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    vae = VAEBackbone(
        encoder_num_filters=[32], encoder_num_blocks=[1], decoder_num_filters=[32],
        decoder_num_blocks=[1], sample_channels=8,
    )  # fmt: skip

    def clip():
        return M.CLIPTextEncoder(
            vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
            intermediate_dim=32, max_sequence_length=8, intermediate_output_index=0,
        )  # fmt: skip

    return M.StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=16, mmdit_num_layers=1, mmdit_num_heads=2,
        mmdit_position_size=8, mmdit_qk_norm=None, mmdit_dual_attention_indices=None, vae=vae,
        clip_l=clip(), clip_g=clip(), latent_channels=4, image_shape=(16, 16, 3),
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
    "ALBERT": _albert,
    "ELECTRA": _electra,
    "XLM-RoBERTa": _xlm_roberta,
    "FNet": _f_net,
    "RoformerV2": _roformer_v2,
    "XLNet": _xlnet,
    "ESM": _esm,
    "OPT": _opt,
    "Bloom": _bloom,
    "Falcon": _falcon,
    "GPT-NeoX": _gpt_neo_x,
    "Llama3": _llama3,
    "Mixtral": _mixtral,
    "QwenMoe": _qwen_moe,
    "Qwen3Moe": _qwen3_moe,
    "GptOss": _gpt_oss,
    "SmolLM3": _smollm3,
    "T5Gemma": _t5gemma,
    "Moonshine": _moonshine,
    "RWKV7": _rwkv7,
    "EdRec": _edrec,
    "MobileNet": _mobilenet,
    "HGNetV2": _hgnetv2,
    "SwinTransformer": _swin,
    "ViTDet": _vit_det,
    "DINOv3": _dinov3,
    "SigLIP": _siglip,
    "MetaCLIP2": _metaclip2,
    "SegFormer": _segformer,
    "DeepLabV3": _deeplab_v3,
    "RetinaNet": _retinanet,
    "BASNet": _basnet,
    "DepthAnything": _depth_anything,
    "PaliGemma": _pali_gemma,
    "Gemma4": _gemma4,
    "Qwen3_5": _qwen3_5,
    "Qwen3_5Moe": _qwen3_5_moe,
    "VideoPrism": _video_prism,
    "SAM": _sam,
    "MobileNetV5": _mobilenetv5,
    "Gemma3n": _gemma3n,
    "T5Gemma2": _t5gemma2,
    "DFine": _d_fine,
    "PARSeq": _parseq,
    "BLIP2": _blip2,
    "Flux": _flux,
    "StableDiffusion3": _stable_diffusion_3,
}
