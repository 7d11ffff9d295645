"""More architectures for `python -m bench.hf_sweep` (added 2026-11-29): vision-language and composite models,
recent text LMs (hybrid Mamba/attention, MoE, linear attention), detection/segmentation/depth, audio and time
series. Same conventions as bench/hf_sweep.py's models(); `h` holds its helpers (ids, mask, text, s2s, img,
llama_like, bart_like, bert_like, tok, V, B, T).

Vision-language entries: text vocabulary 128 (ordinary tokens drawn from [3, 99) as in the sweep; special ids
100-103 are the image / video / vision-start / vision-end tokens). Images: 32 px, patch 8 -> a 4x4 patch grid;
every tower that merges 2x2 patches therefore yields 4 image tokens per image, the others 16.
"""


def add_multimodal(M, tf, torch, h):
    V, B, T = h.V, h.B, h.T
    TV = 128                          # text vocab with room for the special ids below
    IMG, VID, VST, VEN = 100, 101, 102, 103
    S, P = 32, 8                      # image size, patch size -> 4x4 = 16 patches
    llama = {**h.llama_like, "vocab_size": TV}
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

    def seq(n_img, pre=(), post=(), t=T):
        """input_ids (B, len): [bos, *pre, IMG * n_img, *post, t random text tokens]; image run at 1 + len(pre)."""
        head = [0, *pre] + [IMG] * n_img + list(post)
        ids = torch.cat([torch.tensor(head).expand(B, -1), torch.randint(3, V, (B, t))], 1)
        return ids

    def vl(n_img, extra=lambda: {}, pre=(), post=(), mask=True, mm_types=False):
        def make():
            ids = seq(n_img, pre, post)
            d = {"input_ids": ids}
            if mask:
                d["attention_mask"] = h.mask(ids.shape[1])
            if mm_types:
                d["mm_token_type_ids"] = (ids == IMG).int()
            d.update(extra())
            return d
        return make

    pix = lambda: {"pixel_values": torch.randn(B, 3, S, S)}

    # ---- LLaVA: CLIP tower (feature layer -2, CLS dropped) -> 16 tokens
    M["llava"] = (lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(image_size=S, patch_size=P, projection_dim=32, **vit),
        text_config=tf.LlamaConfig(**llama), image_token_index=IMG, image_seq_length=16, vision_feature_layer=-2)),
        vl(16, pix), "logits")

    # ---- Qwen-VL family: flattened patches (n_patches, C * temporal_patch * P * P), grid [1, 4, 4] -> 4 tokens
    def qwen_pix():
        return {"pixel_values": torch.randn(B * 16, 3 * 2 * P * P),
                "image_grid_thw": torch.tensor([[1, 4, 4]] * B)}
    qwen_ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VST, vision_end_token_id=VEN)
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}   # head_dim 8 -> 4 freqs
    qwen_in = vl(4, qwen_pix, pre=(VST,), post=(VEN,), mm_types=True)

    M["qwen2_vl"] = (lambda: tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
        text_config={**llama, "rope_parameters": mrope},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=P,
                           spatial_merge_size=2, temporal_patch_size=2),
        **qwen_ids)), qwen_in, "logits")
    M["qwen2_5_vl"] = (lambda: tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
        text_config={**llama, "rope_parameters": mrope},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=P,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, window_size=16,
                           fullatt_block_indexes=[1]),
        **qwen_ids)), qwen_in, "logits")
    M["qwen3_vl"] = (lambda: tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(
        text_config={**llama, "head_dim": 8, "rope_parameters": {**mrope, "mrope_interleaved": True}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=P,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **qwen_ids)), qwen_in, "logits")

    # ---- PaliGemma: SigLIP tower, 16 tokens
    M["paligemma"] = (lambda: tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(image_size=S, patch_size=P, **vit),
        text_config=tf.GemmaConfig(**llama, head_dim=8), image_token_index=IMG, projection_dim=32, hidden_size=32)),
        vl(16, pix), "logits")

    # ---- Gemma 3 multimodal: SigLIP tower, 4x4 patches avg-pooled to mm_tokens_per_image=4
    M["gemma3_mm"] = (lambda: tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(image_size=S, patch_size=P, **vit),
        text_config=tf.Gemma3TextConfig(**llama, head_dim=8, sliding_window=4), mm_tokens_per_image=4,
        image_token_index=IMG, boi_token_index=VST, eoi_token_index=VEN)),
        vl(4, pix, pre=(VST,), post=(VEN,)), "logits")

    # ---- Idefics3 / SmolVLM: pixel_values (B, n_images, C, H, W); pixel shuffle scale 2 -> 4 tokens
    pix5 = lambda: {"pixel_values": torch.randn(B, 1, 3, S, S)}
    M["idefics3"] = (lambda: tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(image_size=S, patch_size=P, **vit),
        text_config=tf.LlamaConfig(**llama), image_token_id=IMG, scale_factor=2)),
        vl(4, pix5), "logits")
    M["smolvlm"] = (lambda: tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(
        vision_config=tf.SmolVLMVisionConfig(image_size=S, patch_size=P, **vit),
        text_config=tf.LlamaConfig(**llama), image_token_id=IMG, scale_factor=2)),
        vl(4, pix5), "logits")

    # ---- Mistral3: Pixtral tower + 2x2 patch merger -> 4 tokens; needs image_sizes
    M["mistral3"] = (lambda: tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(
        vision_config=tf.PixtralVisionConfig(image_size=S, patch_size=P, head_dim=8, **vit),
        text_config=tf.MistralConfig(**llama, head_dim=8), image_token_index=IMG, spatial_merge_size=2,
        vision_feature_layer=-1)),
        vl(4, lambda: {**pix(), "image_sizes": torch.tensor([[S, S]] * B)}), "logits")

    # ---- InternVL: InternViT + pixel shuffle 0.5 -> 4 tokens, Qwen2 text
    M["internvl"] = (lambda: tf.InternVLForConditionalGeneration(tf.InternVLConfig(
        vision_config=tf.InternVLVisionConfig(image_size=[S, S], patch_size=[P, P], **vit),
        text_config=tf.Qwen2Config(**llama), image_token_id=IMG, image_seq_length=4, downsample_ratio=0.5)),
        vl(4, pix), "logits")

    # ---- dual encoders
    clip_text = dict(vocab_size=V, max_position_embeddings=32, **vit, **h.tok)
    M["clip"] = (lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=clip_text, vision_config=dict(image_size=S, patch_size=P, **vit),
        projection_dim=32)),
        lambda: {"input_ids": h.ids(), "pixel_values": torch.randn(B, 3, S, S), "attention_mask": h.mask()},
        "logits_per_image")
    M["siglip"] = (lambda: tf.SiglipModel(tf.SiglipConfig(
        text_config=clip_text, vision_config=dict(image_size=S, patch_size=P, **vit))),
        lambda: {"input_ids": h.ids(), "pixel_values": torch.randn(B, 3, S, S)}, "logits_per_image")

    # ---- BLIP-2: ViT -> Q-Former (4 queries) -> OPT; input_ids carry 4 image tokens
    M["blip2"] = (lambda: tf.Blip2ForConditionalGeneration(tf.Blip2Config(
        vision_config=dict(image_size=S, patch_size=P, **vit),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=V, max_position_embeddings=32),
        text_config=tf.OPTConfig(vocab_size=TV, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=40,
                                 **h.tok),
        num_query_tokens=4, image_token_index=IMG)),
        vl(4, pix), "logits")

    # ---- ViT encoder + GPT-2 decoder with cross-attention
    def ved():
        enc = tf.ViTConfig(image_size=S, patch_size=P, **vit)
        dec = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=64,
                            add_cross_attention=True, is_decoder=True, **h.tok)
        cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.pad_token_id = 0, 1
        return tf.VisionEncoderDecoderModel(cfg)
    M["vision_encoder_decoder"] = (ved, lambda: {"pixel_values": torch.randn(B, 3, S, S),
                                                 "decoder_input_ids": h.ids(5)}, "logits")


def add_recent(M, tf, torch, h):
    V, B, T, tok, L = h.V, h.B, h.T, h.tok, h.llama_like
    text, ids, mask = h.text, h.ids, h.mask

    def ids_only():
        return {"input_ids": ids()}

    # ================================================================ text
    M["modernbert"] = (lambda: tf.ModernBertModel(tf.ModernBertConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, local_attention=4, layer_types=["full_attention", "sliding_attention"],
        pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)),
        text, "last_hidden_state")
    M["modernbert_decoder"] = (lambda: tf.ModernBertDecoderForCausalLM(tf.ModernBertDecoderConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, local_attention=4, sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
        pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)),
        text, "logits")
    # layers: 0 mamba+dense, 1 attention+MoE, 2 mamba+dense, 3 attention+MoE
    M["jamba"] = (lambda: tf.JambaForCausalLM(tf.JambaConfig(
        **{**L, "num_hidden_layers": 4}, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)),
        text, "logits")
    M["zamba2"] = (lambda: tf.Zamba2ForCausalLM(tf.Zamba2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        layers_block_type=["mamba", "hybrid"], mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1,
        n_mamba_heads=4, chunk_size=4, use_mamba_kernels=False, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=32, adapter_rank=8, **tok)),
        text, "logits")
    M["bamba"] = (lambda: tf.BambaForCausalLM(tf.BambaConfig(
        **L, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)),
        text, "logits")
    M["falcon_h1"] = (lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(
        **L, head_dim=8, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)),
        text, "logits")
    M["lfm2"] = (lambda: tf.Lfm2ForCausalLM(tf.Lfm2Config(
        **{k: v for k, v in L.items() if k != "intermediate_size"}, intermediate_size=64,
        block_auto_adjust_ff_dim=False, layer_types=["conv", "full_attention"], conv_L_cache=3)),
        text, "logits")
    M["qwen3_next"] = (lambda: tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
        **L, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"])),
        text, "logits")
    M["cohere2"] = (lambda: tf.Cohere2ForCausalLM(tf.Cohere2Config(
        **L, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
        text, "logits")
    M["exaone4"] = (lambda: tf.Exaone4ForCausalLM(tf.Exaone4Config(
        **L, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
        text, "logits")
    M["helium"] = (lambda: tf.HeliumForCausalLM(tf.HeliumConfig(**L, head_dim=8)), text, "logits")
    M["smollm3"] = (lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**L, no_rope_layers=[1, 0])), text, "logits")
    M["ernie4_5"] = (lambda: tf.Ernie4_5ForCausalLM(tf.Ernie4_5Config(**L, head_dim=8)), text, "logits")
    M["granitemoe"] = (lambda: tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(
        **L, num_local_experts=4, num_experts_per_tok=2)), text, "logits")
    M["phimoe"] = (lambda: tf.PhimoeForCausalLM(tf.PhimoeConfig(
        **L, num_local_experts=4, num_experts_per_tok=2)), text, "logits")
    M["dbrx"] = (lambda: tf.DbrxForCausalLM(tf.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=V,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}, **tok)),
        text, "logits")
    M["minimax"] = (lambda: tf.MiniMaxForCausalLM(tf.MiniMaxConfig(
        **L, head_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=4,
        layer_types=["linear_attention", "full_attention"])),
        text, "logits")
    M["olmo3"] = (lambda: tf.Olmo3ForCausalLM(tf.Olmo3Config(
        **L, sliding_window=4, layer_types=["sliding_attention", "full_attention"])), text, "logits")
    t5g = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=32, sliding_window=4,
               layer_types=["sliding_attention"], **tok)
    M["t5gemma"] = (lambda: tf.T5GemmaModel(tf.T5GemmaConfig(
        encoder=dict(t5g), decoder=dict(t5g), vocab_size=V, **tok)),
        h.s2s, "last_hidden_state")
    # patch_in_forward=False: no entropy patcher (data-dependent patch lengths); every byte is its own patch
    blt_sub = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
    M["blt"] = (lambda: tf.BltForCausalLM(tf.BltConfig(
        vocab_size=V, max_position_embeddings=64, patch_in_forward=False, patching_mode="static", patch_size=1,
        local_attention_window_len=8, cross_attn_k=2, encoder_hash_byte_group_size=[3, 4],
        encoder_hash_byte_group_vocab=50, encoder_hash_byte_group_nb_functions=1,
        encoder_config={**blt_sub, "num_hidden_layers": 1, "hidden_size_global": 64, "cross_attn_k": 2},
        decoder_config={**blt_sub, "num_hidden_layers": 1, "hidden_size_global": 64, "cross_attn_k": 2},
        global_config={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "num_hidden_layers": 1, "intermediate_size": 64, "max_position_embeddings": 64},
        patcher_config={**blt_sub, "num_hidden_layers": 1}, use_cache=False, **tok)),
        text, "logits")

    # ================================================================ vision
    img = h.img
    M["detr"] = (lambda: tf.DetrModel(tf.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                        layer_type="basic", out_features=["stage2"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5)),
        img(64), "last_hidden_state")
    M["rt_detr"] = (lambda: tf.RTDetrModel(tf.RTDetrConfig(
        backbone_config=tf.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                              layer_type="basic", out_features=["stage2", "stage3", "stage4"]),
        use_pretrained_backbone=False, encoder_in_channels=[16, 32, 64], feat_strides=[8, 16, 32],
        encoder_hidden_dim=32, encoder_ffn_dim=64, encoder_attention_heads=4, d_model=32, num_queries=10,
        decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4,
        decoder_n_points=2, num_denoising=0, num_labels=3)),
        img(64), "last_hidden_state")
    M["dpt"] = (lambda: tf.DPTModel(tf.DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16)),
        img(32), "last_hidden_state")
    M["depth_anything"] = (lambda: tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(
        backbone_config=tf.Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4,
                                        num_attention_heads=4, mlp_ratio=2, out_indices=[1, 2, 3, 4],
                                        reshape_hidden_states=False),
        patch_size=14, reassemble_hidden_size=32, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
        head_hidden_size=8)),
        img(56), "predicted_depth")
    M["upernet"] = (lambda: tf.UperNetForSemanticSegmentation(tf.UperNetConfig(
        backbone_config=tf.ConvNextConfig(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_stages=4,
                                          out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_size=32, pool_scales=[1, 2], auxiliary_channels=16, num_labels=3)),
        img(64), "logits")
    M["sam"] = (lambda: tf.SamModel(tf.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8,
                           output_channels=16, window_size=4, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))),
        lambda: {"pixel_values": torch.randn(B, 3, 64, 64), "input_points": torch.rand(B, 1, 1, 2) * 64},
        "pred_masks")
    M["hiera"] = (lambda: tf.HieraModel(tf.HieraConfig(
        embed_dim=16, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3],
        mlp_ratio=2.0, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], num_query_pool=2, query_stride=[2, 2],
        masked_unit_size=[8, 8], masked_unit_attention=[True, True, False, False])),
        img(64), "last_hidden_state")
    M["pvt_v2"] = (lambda: tf.PvtV2Model(tf.PvtV2Config(
        image_size=64, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
        img(64), "last_hidden_state")
    M["swinv2"] = (lambda: tf.Swinv2Model(tf.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, mlp_ratio=2.0)),
        img(32), "last_hidden_state")
    M["dinov2_with_registers"] = (lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        num_register_tokens=2)),
        img(32), "last_hidden_state")
    M["vitdet"] = (lambda: tf.VitDetModel(tf.VitDetConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
        pretrain_image_size=32, patch_size=8, window_block_indices=[0], window_size=2,
        use_relative_position_embeddings=True, residual_block_indices=[1])),
        img(32), "last_hidden_state")

    # ================================================================ audio / time series
    M["wav2vec2_bert"] = (lambda: tf.Wav2Vec2BertModel(tf.Wav2Vec2BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        feature_projection_input_dim=16, conv_depthwise_kernel_size=3, output_hidden_size=32,
        left_max_position_embeddings=8, right_max_position_embeddings=4, layerdrop=0.0)),
        lambda: {"input_features": torch.randn(B, 20, 16)}, "last_hidden_state")
    M["data2vec_audio"] = (lambda: tf.Data2VecAudioModel(tf.Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=2, conv_pos_kernel_size=5,
        num_conv_pos_embedding_groups=4, layerdrop=0.0)),
        lambda: {"input_values": torch.randn(B, 400)}, "last_hidden_state")
    M["encodec"] = (lambda: tf.EncodecModel(tf.EncodecConfig(
        target_bandwidths=[1.5], sampling_rate=800, hidden_size=16, num_filters=4, num_residual_layers=1,
        upsampling_ratios=[2, 2], num_lstm_layers=1, codebook_size=16, codebook_dim=16)),
        lambda: {"input_values": torch.randn(B, 1, 64)}, "audio_values")
    M["moonshine"] = (lambda: tf.MoonshineModel(tf.MoonshineConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=1, decoder_num_hidden_layers=1,
        encoder_num_attention_heads=4, decoder_num_attention_heads=4, encoder_num_key_value_heads=4,
        decoder_num_key_value_heads=4, max_position_embeddings=64, decoder_start_token_id=0, **tok)),
        lambda: {"input_values": torch.randn(B, 1600), "decoder_input_ids": ids(5)}, "last_hidden_state")
    M["clap"] = (lambda: tf.ClapModel(tf.ClapConfig(
        text_config=dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40, projection_dim=16, pad_token_id=1),
        audio_config=dict(spec_size=32, num_mel_bins=8, window_size=4, patch_size=4, patch_stride=[4, 4],
                          patch_embeds_hidden_size=16, hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2],
                          mlp_ratio=2.0, projection_dim=16, num_classes=4, enable_fusion=False),
        projection_dim=16)),
        lambda: {"input_ids": ids(), "attention_mask": mask(), "input_features": torch.randn(B, 1, 128, 8)},
        "logits_per_audio")
    M["patchtst"] = (lambda: tf.PatchTSTModel(tf.PatchTSTConfig(
        num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, d_model=32, num_attention_heads=4,
        num_hidden_layers=2, ffn_dim=64, prediction_length=8)),
        lambda: {"past_values": torch.randn(B, 32, 3)}, "last_hidden_state")
    M["timesfm"] = (lambda: tf.TimesFmModel(tf.TimesFmConfig(
        patch_length=8, context_length=32, horizon_length=8, num_hidden_layers=2, hidden_size=32,
        intermediate_size=64, head_dim=8, num_attention_heads=4)),
        lambda: {"past_values": torch.randn(B, 32), "past_values_padding": torch.zeros(B, 32, dtype=torch.long),
                 "freq": torch.zeros(B, 1, dtype=torch.long)}, "last_hidden_state")

    # encodec with its weight norms removed (as lrd_fx's skip reason suggests), so its convs can be factorized
    def encodec_nown():
        m = M["encodec"][0]()
        P = torch.nn.utils.parametrize
        for mod in m.modules():
            if P.is_parametrized(mod, "weight"):
                P.remove_parametrizations(mod, "weight")
        return m
    M["encodec_nown"] = (encodec_nown, M["encodec"][1], "audio_values")
