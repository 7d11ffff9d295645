"""Robustness sweep: lrd_fx on tiny random Hugging Face architectures (no download), one child process each.

    python -m bench.hf_sweep                     # every architecture below and in hf_sweep_more.py (about 14 min on 2 cores)
    python -m bench.hf_sweep mobilebert yolos    # some of them
    python -m bench.hf_sweep --out /tmp/sweep    # results to /tmp/sweep.{jsonl,txt}

Each architecture is built from a small random config (hidden size 32, 1-3 layers, vocabulary 99, images
32-64 px), in eval mode, and run in its own process (one torch thread, --timeout seconds) through:
1. compile(rank="full"): the output equals the original's within 1e-4 relative (max |diff| / max |out|);
   called with output_hidden_states=True and output_attentions=True (where forward takes them), every
   tensor of the output equals the original's, or the call is an LRDError (the graph traced them as None),
   never silently fewer or different (outputs_asked); compiled with them in the example inputs (where
   forward names them), equal (outputs_given);
2. compile(ratio=0.5): finite output of the same shape, fewer parameters;
3. save, then load(model, path) without example inputs: the loaded output equals the compiled one;
4. the ratio=0.5 model in train mode: a backward pass of every floating-point output runs and gives finite
   gradients, some nonzero, to the factor layers (how many of their parameters got one is recorded:
   train_factor_grads);
and after each compile and load, the caller's state_dict and module tree are unchanged. Models whose
random init outputs all zeros (some zero-initialised final norms) get N(0, 0.2) weights first.
Status per model: PASS; CLEAR-ERROR (an LRDError: a refusal with a message); NOT-SMALLER (nothing to
factorize at ratio 0.5); BUG (a wrong output, a mutated caller model, an exception that is not an
LRDError, a hang); BUILD-FAIL (the installed transformers cannot build that config: not lrd_fx's).
Results: bench/results/hf_sweep-<date>.{jsonl,txt} (or --out PREFIX), a line per model and a summary.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V = 99
B, T = 2, 8


# ---------------------------------------------------------------------------------------------- models
def models():
    import torch
    import transformers as tf

    def ids(t=T):
        return torch.randint(3, V, (B, t))

    def mask(t=T):
        m = torch.ones(B, t, dtype=torch.long)
        m[1, t - 3:] = 0
        return m

    def text():
        return {"input_ids": ids(), "attention_mask": mask()}

    def s2s():
        return {"input_ids": ids(), "attention_mask": mask(), "decoder_input_ids": ids(5)}

    def img(s=32):
        return lambda: {"pixel_values": torch.randn(B, 3, s, s)}

    tok = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    llama_like = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **tok)
    bart_like = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=32, decoder_start_token_id=2, **tok)
    bert_like = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40)

    M = {}
    # ---- decoder-only LMs
    M["mistral"] = (lambda: tf.MistralModel(tf.MistralConfig(**llama_like, sliding_window=4)), text, "last_hidden_state")
    M["gemma"] = (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**llama_like, head_dim=8)), text, "logits")
    M["gemma2"] = (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**llama_like, head_dim=8, sliding_window=4)), text, "logits")
    M["gemma3"] = (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=4)), text, "logits")
    M["phi3"] = (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**llama_like)), text, "logits")
    M["phi"] = (lambda: tf.PhiForCausalLM(tf.PhiConfig(**llama_like, partial_rotary_factor=0.5)), text, "logits")
    M["opt"] = (lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                      num_attention_heads=4, word_embed_proj_dim=32,
                                                      max_position_embeddings=32, **tok)), text, "logits")
    M["gpt_neox"] = (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=2, num_attention_heads=4,
                                                                   rotary_pct=0.25, max_position_embeddings=32,
                                                                   tie_word_embeddings=False, **tok)), text, "logits")
    M["falcon"] = (lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, **tok)), text, "logits")
    M["bloom"] = (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, **tok)),
                  text, "logits")
    M["gptj"] = (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                         n_positions=32, **tok)), text, "logits")
    M["codegen"] = (lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                  rotary_dim=4, n_positions=32, n_ctx=32, **tok)),
                    text, "logits")
    M["gpt_neo"] = (lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                                                attention_types=[[["global", "local"], 1]],
                                                                window_size=4, max_position_embeddings=32, **tok)),
                    text, "logits")
    M["olmo"] = (lambda: tf.OlmoForCausalLM(tf.OlmoConfig(**llama_like)), text, "logits")
    M["starcoder2"] = (lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**llama_like)), text, "logits")
    M["stablelm"] = (lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**llama_like)), text, "logits")
    M["granite"] = (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**llama_like)), text, "logits")
    M["qwen3"] = (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**llama_like, head_dim=8)), text, "logits")
    M["mixtral"] = (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**llama_like, num_local_experts=4,
                                                                  num_experts_per_tok=2)), text, "logits")
    M["qwen2_moe"] = (lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**llama_like, num_experts=4, num_experts_per_tok=2,
                                                                      moe_intermediate_size=32,
                                                                      shared_expert_intermediate_size=32)),
                      text, "logits")
    M["mamba"] = (lambda: tf.MambaModel(tf.MambaConfig(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2,
                                                      expand=2, conv_kernel=4, **tok)),
                  lambda: {"input_ids": ids()}, "last_hidden_state")
    # ---- encoder-decoder
    M["bart"] = (lambda: tf.BartModel(tf.BartConfig(**bart_like)), s2s, "last_hidden_state")
    M["mbart"] = (lambda: tf.MBartModel(tf.MBartConfig(**bart_like)), s2s, "last_hidden_state")
    M["pegasus"] = (lambda: tf.PegasusModel(tf.PegasusConfig(**bart_like)), s2s, "last_hidden_state")
    M["marian"] = (lambda: tf.MarianMTModel(tf.MarianConfig(**bart_like)), s2s, "logits")
    # ---- encoders
    M["albert"] = (lambda: tf.AlbertModel(tf.AlbertConfig(**bert_like, embedding_size=16, num_hidden_groups=1)),
                   text, "last_hidden_state")
    M["electra"] = (lambda: tf.ElectraModel(tf.ElectraConfig(**bert_like, embedding_size=16)), text, "last_hidden_state")
    M["deberta_v2"] = (lambda: tf.DebertaV2Model(tf.DebertaV2Config(**bert_like, relative_attention=True,
                                                                   position_buckets=8, pos_att_type=["p2c", "c2p"])),
                       text, "last_hidden_state")
    M["deberta"] = (lambda: tf.DebertaModel(tf.DebertaConfig(**bert_like, relative_attention=True,
                                                            pos_att_type=["p2c", "c2p"])),
                    text, "last_hidden_state")
    M["mobilebert"] = (lambda: tf.MobileBertModel(tf.MobileBertConfig(vocab_size=V, hidden_size=32, embedding_size=16,
                                                                     num_hidden_layers=2, num_attention_heads=4,
                                                                     intermediate_size=32, true_hidden_size=16,
                                                                     intra_bottleneck_size=16,
                                                                     num_feedforward_networks=2,
                                                                     max_position_embeddings=32)),
                       text, "last_hidden_state")
    M["xlm_roberta"] = (lambda: tf.XLMRobertaModel(tf.XLMRobertaConfig(**bert_like, pad_token_id=1)), text,
                        "last_hidden_state")
    M["convbert"] = (lambda: tf.ConvBertModel(tf.ConvBertConfig(**bert_like, embedding_size=32)), text,
                     "last_hidden_state")
    M["mpnet"] = (lambda: tf.MPNetModel(tf.MPNetConfig(**bert_like, pad_token_id=1)), text, "last_hidden_state")
    M["funnel"] = (lambda: tf.FunnelModel(tf.FunnelConfig(vocab_size=V, d_model=32, n_head=4, d_head=8, d_inner=64,
                                                         block_sizes=[1, 1], num_decoder_layers=1)), text,
                   "last_hidden_state")
    # ---- vision
    M["swin"] = (lambda: tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                    num_heads=[2, 2], window_size=4, mlp_ratio=2.0)),
                 img(32), "last_hidden_state")
    M["convnext"] = (lambda: tf.ConvNextModel(tf.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1],
                                                               num_stages=2, image_size=32)),
                     img(32), "last_hidden_state")
    M["deit"] = (lambda: tf.DeiTModel(tf.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)),
                 img(32), "last_hidden_state")
    M["beit"] = (lambda: tf.BeitModel(tf.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    use_relative_position_bias=True, vocab_size=V)),
                 img(32), "last_hidden_state")
    M["dinov2"] = (lambda: tf.Dinov2Model(tf.Dinov2Config(image_size=32, patch_size=8, hidden_size=32,
                                                         num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2)),
                   img(32), "last_hidden_state")
    M["segformer"] = (lambda: tf.SegformerModel(tf.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1],
                                                                  sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                                                  patch_sizes=[7, 3], strides=[4, 2],
                                                                  num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                                                  decoder_hidden_size=32)),
                      img(64), "last_hidden_state")
    M["resnet"] = (lambda: tf.ResNetModel(tf.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                         depths=[1, 1], layer_type="bottleneck")),
                   img(32), "last_hidden_state")
    M["regnet"] = (lambda: tf.RegNetModel(tf.RegNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                         depths=[1, 1], groups_width=8)),
                   img(32), "last_hidden_state")
    M["mobilevit"] = (lambda: tf.MobileViTModel(tf.MobileViTConfig(image_size=64, patch_size=2, hidden_sizes=[32, 48, 64],
                                                                  neck_hidden_sizes=[8, 8, 16, 16, 32, 32, 64],
                                                                  num_attention_heads=2)),
                      img(64), "last_hidden_state")

    # ---- batch 2
    M["gpt_bigcode"] = (lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                            n_positions=32, multi_query=True, **tok)),
                        text, "logits")
    M["xglm"] = (lambda: tf.XGLMForCausalLM(tf.XGLMConfig(vocab_size=V, d_model=32, num_layers=2, attention_heads=4,
                                                         ffn_dim=64, max_position_embeddings=32, **tok)), text, "logits")
    M["mpt"] = (lambda: tf.MptForCausalLM(tf.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                                      expansion_ratio=2, **tok)), text, "logits")
    M["persimmon"] = (lambda: tf.PersimmonForCausalLM(tf.PersimmonConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                                        num_hidden_layers=2, num_attention_heads=4,
                                                                        max_position_embeddings=32, **tok)), text, "logits")
    M["cohere"] = (lambda: tf.CohereForCausalLM(tf.CohereConfig(**llama_like)), text, "logits")
    M["olmo2"] = (lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**llama_like)), text, "logits")
    M["nemotron"] = (lambda: tf.NemotronForCausalLM(tf.NemotronConfig(**llama_like)), text, "logits")
    M["qwen3_moe"] = (lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**llama_like, head_dim=8, num_experts=4,
                                                                      num_experts_per_tok=2, moe_intermediate_size=32)),
                      text, "logits")
    M["gpt_oss"] = (lambda: tf.GptOssForCausalLM(tf.GptOssConfig(**llama_like, head_dim=8, num_local_experts=4,
                                                                num_experts_per_tok=2, sliding_window=4)),
                    text, "logits")
    M["deepseek_v3"] = (lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        **{**llama_like, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)), text, "logits")
    M["olmoe"] = (lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(**llama_like, num_experts=4, num_experts_per_tok=2)),
                  text, "logits")
    M["llama4"] = (lambda: tf.Llama4ForCausalLM(tf.Llama4TextConfig(
        **llama_like, head_dim=8, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=16)), text, "logits")
    M["rwkv"] = (lambda: tf.RwkvModel(tf.RwkvConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                   attention_hidden_size=32, intermediate_size=64, context_length=32)),
                 lambda: {"input_ids": ids()}, "last_hidden_state")
    M["mamba2"] = (lambda: tf.Mamba2Model(tf.Mamba2Config(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2,
                                                         expand=2, conv_kernel=4, num_heads=8, head_dim=8, n_groups=1,
                                                         chunk_size=4, **tok)),
                   lambda: {"input_ids": ids()}, "last_hidden_state")
    M["falcon_mamba"] = (lambda: tf.FalconMambaModel(tf.FalconMambaConfig(vocab_size=V, hidden_size=32, state_size=8,
                                                                         num_hidden_layers=2, expand=2, conv_kernel=4,
                                                                         **tok)),
                         lambda: {"input_ids": ids()}, "last_hidden_state")
    M["recurrent_gemma"] = (lambda: tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, lru_width=32, attention_window_size=4, conv1d_width=4, **tok)), text, "logits")
    M["blenderbot"] = (lambda: tf.BlenderbotModel(tf.BlenderbotConfig(**bart_like)), s2s, "last_hidden_state")
    M["led"] = (lambda: tf.LEDModel(tf.LEDConfig(**{k: v for k, v in bart_like.items() if k != "max_position_embeddings"},
                                               max_encoder_position_embeddings=32, max_decoder_position_embeddings=32,
                                               attention_window=4)), s2s, "last_hidden_state")
    M["m2m_100"] = (lambda: tf.M2M100Model(tf.M2M100Config(**bart_like)), s2s, "last_hidden_state")
    M["mt5"] = (lambda: tf.MT5Model(tf.MT5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, feed_forward_proj="gated-gelu")),
                s2s, "last_hidden_state")
    M["switch_transformers"] = (lambda: tf.SwitchTransformersModel(tf.SwitchTransformersConfig(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
        encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=8, decoder_start_token_id=0)),
        s2s, "last_hidden_state")
    M["longformer"] = (lambda: tf.LongformerModel(tf.LongformerConfig(**bert_like, attention_window=4, pad_token_id=1)),
                       text, "last_hidden_state")
    M["big_bird"] = (lambda: tf.BigBirdModel(tf.BigBirdConfig(**bert_like, attention_type="original_full")), text,
                     "last_hidden_state")
    M["roformer"] = (lambda: tf.RoFormerModel(tf.RoFormerConfig(**bert_like, embedding_size=32)), text, "last_hidden_state")
    M["esm"] = (lambda: tf.EsmModel(tf.EsmConfig(**bert_like, pad_token_id=1, position_embedding_type="rotary")), text,
                "last_hidden_state")
    M["squeezebert"] = (lambda: tf.SqueezeBertModel(tf.SqueezeBertConfig(**bert_like, embedding_size=32, q_groups=2,
                                                                        k_groups=2, v_groups=2, post_attention_groups=2,
                                                                        intermediate_groups=4, output_groups=4)),
                        text, "last_hidden_state")
    M["rembert"] = (lambda: tf.RemBertModel(tf.RemBertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, intermediate_size=64,
                                                            input_embedding_size=16, output_embedding_size=16,
                                                            max_position_embeddings=40)), text, "last_hidden_state")
    M["hubert"] = (lambda: tf.HubertModel(tf.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                                         conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                         num_conv_pos_embedding_groups=4)),
                   lambda: {"input_values": torch.randn(B, 400)}, "last_hidden_state")
    M["speech_to_text"] = (lambda: tf.Speech2TextModel(tf.Speech2TextConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, input_feat_per_channel=16,
        input_channels=1, conv_channels=32, num_conv_layers=2, conv_kernel_sizes=[5, 5],
        max_source_positions=64, max_target_positions=32, decoder_start_token_id=2, **tok)),
        lambda: {"input_features": torch.randn(B, 32, 16), "decoder_input_ids": ids(5)}, "last_hidden_state")
    M["levit"] = (lambda: tf.LevitModel(tf.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
                                                      depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16,
                                                      down_ops=[["Subsample", 8, 2, 2, 2, 2], ["Subsample", 8, 2, 2, 2, 2]])),
                  img(64), "last_hidden_state")
    M["cvt"] = (lambda: tf.CvtModel(tf.CvtConfig(embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2],
                                                patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1],
                                                mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0],
                                                drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.0], qkv_bias=[True, True],
                                                cls_token=[False, True], padding_q=[1, 1], padding_kv=[1, 1],
                                                kernel_qkv=[3, 3], stride_kv=[2, 2], stride_q=[1, 1],
                                                qkv_projection_method=["dw_bn", "dw_bn"])),
                img(32), "last_hidden_state")
    M["efficientnet"] = (lambda: tf.EfficientNetModel(tf.EfficientNetConfig(image_size=32, width_coefficient=0.25,
                                                                           depth_coefficient=0.25, hidden_dim=320)),
                         img(32), "last_hidden_state")
    M["poolformer"] = (lambda: tf.PoolFormerModel(tf.PoolFormerConfig(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1])),
                       img(64), "last_hidden_state")
    M["convnextv2"] = (lambda: tf.ConvNextV2Model(tf.ConvNextV2Config(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
                       img(32), "last_hidden_state")
    M["focalnet"] = (lambda: tf.FocalNetModel(tf.FocalNetConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                               focal_levels=[2, 2], focal_windows=[3, 3])),
                     img(32), "last_hidden_state")
    M["mobilenet_v2"] = (lambda: tf.MobileNetV2Model(tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35)),
                         img(32), "last_hidden_state")
    M["yolos"] = (lambda: tf.YolosModel(tf.YolosConfig(image_size=[32, 32], patch_size=8, hidden_size=32,
                                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                                      num_detection_tokens=5)), img(32), "last_hidden_state")
    M["glpn"] = (lambda: tf.GLPNModel(tf.GLPNConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                   hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                                   num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32)),
                 img(64), "last_hidden_state")

    # ---- batch 3 (2026-11-29): vision-language/composite, recent text LMs, vision, audio, time series
    import types

    from bench import hf_sweep_more
    h = types.SimpleNamespace(V=V, B=B, T=T, ids=ids, mask=mask, text=text, s2s=s2s, img=img, tok=tok,
                              llama_like=llama_like, bart_like=bart_like, bert_like=bert_like)
    hf_sweep_more.add_multimodal(M, tf, torch, h)
    hf_sweep_more.add_recent(M, tf, torch, h)
    return M


# ---------------------------------------------------------------------------------------------- one model
def n_params(m):
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def lrd_frames(tb):
    fr = [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(os.path.join(ROOT, 'lrd_fx')) else f.filename}:"
          f"{f.lineno} in {f.name}: {f.line}" for f in traceback.extract_tb(tb)]
    inside = [x for x in fr if x.startswith("lrd_fx/")]
    return inside[-6:], fr[-4:]


def failing_report(gm):
    out = {}
    try:
        lrd = gm.lrd
        plan = lrd.plan
        out["not_decomposed"] = {n: (r.get("decision"), r.get("reason")) for n, r in plan.items()
                                 if r.get("decision") != "decomposed"}
        out["n_decomposed"] = sum(r.get("decision") == "decomposed" for r in plan.values())
        fp = getattr(lrd, "fallback_parts", None)
        out["fallback_parts"] = {k: str(v)[:200] for k, v in dict(fp).items()} if fp else fp
    except Exception as e:   # noqa
        out["report_error"] = repr(e)[:200]
    return out


def run_one(name):
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import lrd_fx
    from lrd_fx import api
    from lrd_fx.errors import LRDError

    res = {"name": name, "status": "PASS", "steps": {}}
    make, inputs, field = models()[name]
    torch.manual_seed(0)
    try:
        model = make().eval()
        kw = inputs()
        x = api._as_tuple(kw, model)   # in forward's positional order, as compile maps a dict
        with torch.no_grad():
            want = model(*x)[field]
            if want.abs().max() == 0:   # HF zero-initialises some final norms: the comparison would be vacuous
                for p in model.parameters():
                    p.normal_(0, 0.2)
                want = model(*x)[field]
                res["reinit"] = True
    except Exception as e:
        res["status"] = "BUILD-FAIL"
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return res
    res["params"] = n_params(model)
    res["out_shape"] = list(want.shape)
    sd0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mods0 = [(n, type(m).__name__) for n, m in model.named_modules()]

    def caller_untouched():
        sd = model.state_dict()
        if sd.keys() != sd0.keys():
            return f"state_dict keys changed: +{sorted(set(sd) - set(sd0))[:5]} -{sorted(set(sd0) - set(sd))[:5]}"
        bad = [k for k in sd0 if sd0[k].shape != sd[k].shape or not torch.equal(sd0[k], sd[k])]
        if bad:
            return f"state_dict values changed: {bad[:5]}"
        mods = [(n, type(m).__name__) for n, m in model.named_modules()]
        if mods != mods0:
            return "module tree changed"
        return None

    def fail(step, kind, msg, exc=None, gm=None):
        res["status"] = kind
        res["failed_step"] = step
        res["error"] = msg
        if exc is not None:
            res["lrd_frames"], res["last_frames"] = lrd_frames(exc.__traceback__)
        if gm is not None:
            res["report"] = failing_report(gm)

    def compile_step(step, inputs=None, **opt):
        t0 = time.time()
        try:
            gm = lrd_fx.compile(model, x if inputs is None else inputs, progress=False, **opt)
        except LRDError as e:
            fail(step, "CLEAR-ERROR", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:600]}", e)
            return None
        except Exception as e:
            fail(step, "BUG", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:300]}", e)
            return None
        res["steps"][step + "_s"] = round(time.time() - t0, 1)
        u = caller_untouched()
        if u:
            fail(step, "BUG", "caller model mutated: " + u, gm=gm)
            return None
        return gm

    def run_gm(step, gm):
        try:
            with torch.no_grad():
                return gm(*x)[field]
        except Exception as e:
            fail(step, "BUG", f"calling compiled model: {type(e).__name__}: {str(e)[:300]}", e, gm)
            return None

    # 1. full rank is exact
    gm = compile_step("full", rank="full")
    if gm is None:
        return res
    got = run_gm("full", gm)
    if got is None:
        return res
    scale = want.abs().max().item() or 1.0
    rel = (got - want).abs().max().item() / scale if got.shape == want.shape else float("inf")
    res["steps"]["full_rel_diff"] = rel
    try:
        res["steps"]["full_n_decomposed"] = sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values())
        res["steps"]["full_root_type"] = type(gm).__name__
    except Exception as e:
        res["steps"]["full_plan_error"] = repr(e)[:200]
    if not rel <= 1e-4:
        fail("full", "BUG", f"rank='full' output differs: max abs diff / max|out| = {rel:.3e} "
                            f"(shape {list(got.shape)} vs {list(want.shape)})", gm=gm)
        return res

    # 1b. hidden states / attentions asked for at call time: the original's, or an InputError (the graph
    # traced them as None), never silently fewer; compiled with them among the inputs, the original's
    flags, named = _output_flags(model)
    want_all = None
    if flags:
        try:
            with torch.no_grad():
                want_all = _tensors_by_path(model(*x, **flags))
        except Exception:   # noqa: BLE001 - the model itself does not take them: nothing to compare
            want_all = None
    if want_all:
        try:
            with torch.no_grad():
                diff = _differs(want_all, _tensors_by_path(gm(*x, **flags)))
        except LRDError as e:
            res["steps"]["outputs_asked"] = f"refused: {type(e).__name__}"
        except Exception as e:
            fail("outputs", "BUG", f"calling the compiled model with {flags}: {type(e).__name__}: {str(e)[:300]}",
                 e, gm)
            return res
        else:
            if diff:
                fail("outputs", "BUG", f"called with {flags}: {diff}", gm=gm)
                return res
            res["steps"]["outputs_asked"] = f"equal ({len(want_all)} tensors)"
    del gm
    if want_all and named:
        given = dict(kw, **{k: v for k, v in flags.items() if k in named})
        gm = compile_step("outputs", inputs=given, rank="full")
        if gm is None:
            return res
        try:
            with torch.no_grad():
                diff = _differs(want_all, _tensors_by_path(gm(*x, **flags)))
        except Exception as e:
            fail("outputs", "BUG", f"compiled with {sorted(named)} given, then called with them: {type(e).__name__}: "
                                   f"{str(e)[:300]}", e, gm)
            return res
        if diff:
            fail("outputs", "BUG", f"compiled with {sorted(named)} given: {diff}", gm=gm)
            return res
        res["steps"]["outputs_given"] = f"equal ({len(want_all)} tensors)"
        del gm

    # 2. ratio 0.5: smaller, finite, same shape
    gm = compile_step("ratio", ratio=0.5)
    if gm is None:
        return res
    out = run_gm("ratio", gm)
    if out is None:
        return res
    res["steps"]["ratio_params"] = n_params(gm)
    try:
        res["steps"]["ratio_n_decomposed"] = sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values())
    except Exception:
        pass
    if out.shape != want.shape or not torch.isfinite(out).all():
        fail("ratio", "BUG", f"ratio=0.5 output bad: shape {list(out.shape)} vs {list(want.shape)}, "
                             f"finite={bool(torch.isfinite(out).all())}", gm=gm)
        return res
    if not n_params(gm) < n_params(model):
        fail("ratio", "NOT-SMALLER", f"ratio=0.5 not smaller: {n_params(gm)} >= {n_params(model)}", gm=gm)
        return res          # nothing factorized: the steps below have no factors to check

    # 3. save / load
    path = os.path.join(tempfile.mkdtemp(prefix="lrd_hf_sweep_"), f"{name}.lrd")
    try:
        lrd_fx.save(gm, path)
        loaded = lrd_fx.load(model, path)
    except LRDError as e:
        fail("save_load", "CLEAR-ERROR", f"{type(e).__name__}: {str(e)[:600]}", e, gm)
        return res
    except Exception as e:
        fail("save_load", "BUG", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:300]}", e, gm)
        return res
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(os.path.dirname(path))
    u = caller_untouched()
    if u:
        fail("save_load", "BUG", "caller model mutated by load: " + u)
        return res
    try:
        with torch.no_grad():
            lo = loaded.eval()(*x)[field]
    except Exception as e:
        fail("save_load", "BUG", f"calling loaded model: {type(e).__name__}: {str(e)[:300]}", e, loaded)
        return res
    d = (lo - out).abs().max().item() / (out.abs().max().item() or 1.0) if lo.shape == out.shape else float("inf")
    res["steps"]["load_rel_diff"] = d
    if not d <= 1e-5:
        fail("save_load", "BUG", f"loaded output differs from compiled: rel {d:.3e}", gm=loaded)
        return res

    # 4. train mode: a backward pass reaches the factors, with finite gradients
    from lrd_fx.factorize import FactorChain
    try:
        gm.train()
        # every floating-point output (a pooler's too): a factor that only feeds one of them gets a gradient
        sum(t.float().pow(2).mean() for t in _float_tensors(gm(*x))).backward()
    except Exception as e:
        fail("train", "BUG", f"backward through the compiled model: {type(e).__name__}: {str(e)[:300]}", e, gm)
        return res
    grads = [p.grad for m in gm.modules() if isinstance(m, FactorChain) for p in m.parameters()]
    got = [g for g in grads if g is not None]
    res["steps"]["train_factor_grads"] = f"{len(got)}/{len(grads)}"
    if not got or not all(bool(torch.isfinite(g).all()) for g in got) or not any(bool(g.abs().sum() > 0) for g in got):
        fail("train", "BUG", f"factor gradients missing, zero or not finite ({len(got)} of {len(grads)} set)", gm=gm)
    return res


def _output_flags(model) -> tuple[dict, set]:
    """({output_hidden_states: True, output_attentions: True} for those the forward takes by name or
    through **kwargs, {those it names})."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}, set()
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    keys = ("output_hidden_states", "output_attentions")
    named = {k for k in keys if k in params and params[k].kind == params[k].POSITIONAL_OR_KEYWORD}
    return {k: True for k in keys if k in params or var_kw}, named


def _tensors_by_path(out, path="") -> dict:
    """{path: tensor} for every tensor of a model output (tuples of hidden states included)."""
    import torch
    if isinstance(out, torch.Tensor):
        return {path: out}
    items = (out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else ())
    found = {}
    for k, v in items:
        found.update(_tensors_by_path(v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"))
    return found


def _differs(want: dict, got: dict):
    """What differs between two _tensors_by_path results (None: same keys, values within 1e-4)."""
    import torch
    if want.keys() != got.keys():
        return (f"outputs differ: only in the original {sorted(set(want) - set(got))[:6]}, only in the compiled "
                f"model {sorted(set(got) - set(want))[:6]}")
    for k, a in want.items():
        b = got[k]
        if a.shape != b.shape:
            return f"{k}: shape {list(b.shape)}, the original's {list(a.shape)}"
        if a.is_floating_point():
            rel = (a - b).abs().max().item() / (a.abs().max().item() or 1.0) if a.numel() else 0.0
            if not rel <= 1e-4:
                return f"{k}: max abs diff / max|out| = {rel:.3e}"
        elif not bool(torch.equal(a, b)):
            return f"{k}: values differ"
    return None


def _float_tensors(out) -> list:
    """The floating-point tensors that require grad in a model output (tensors, tuples/lists, dicts and
    ModelOutputs; caches and other objects are passed over)."""
    return [t for t in _tensors_by_path(out).values() if t.is_floating_point() and t.requires_grad]


# ---------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="architectures (default: all)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per architecture")
    ap.add_argument("--out", default=None, help="results prefix (default bench/results/hf_sweep-<date>)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)     # the child process
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT:" + json.dumps(run_one(args.one), default=str))
        return 0
    known = list(models())
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"unknown architectures {unknown}; known: {', '.join(known)}")
    names = args.names or known
    prefix = args.out or os.path.join(ROOT, "bench", "results", f"hf_sweep-{datetime.date.today().isoformat()}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    t_all = time.time()
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    with open(prefix + ".jsonl", "w") as f:
        for name in names:
            t0 = time.time()
            try:
                p = subprocess.run([sys.executable, "-m", "bench.hf_sweep", "--one", name], capture_output=True,
                                   text=True, timeout=args.timeout, env=env, cwd=ROOT)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT:")]
                r = (json.loads(line[-1][7:]) if line else
                     {"name": name, "status": "BUG", "error": f"child crashed, rc={p.returncode}: {p.stderr[-800:]}"})
            except subprocess.TimeoutExpired:
                r = {"name": name, "status": "BUG", "error": f"hang: timeout after {args.timeout:g} s"}
            r["wall_s"] = round(time.time() - t0, 1)
            results.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{name:20s} {r['status']:12s} {r['wall_s']:6.1f}s  {r.get('failed_step', '')} "
                  f"{str(r.get('error', ''))[:160]}", flush=True)
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    import torch
    lines = [f"torch {torch.__version__}, transformers {_transformers_version()}, {len(results)} architectures in "
             f"{time.time() - t_all:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    lines += [f"{r['name']:20s} {r['status']:12s} {r.get('failed_step', '')} {str(r.get('error', ''))[:200]}"
              for r in results]
    with open(prefix + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[0])
    return 0 if all(r["status"] in ("PASS", "CLEAR-ERROR", "BUILD-FAIL") for r in results) else 1


def _transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
