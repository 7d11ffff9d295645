"""Hugging Face transformers models (tiny random configs, no download) compile: exact at rank="full",
smaller at ratio=0.5, attention masks, KV caches and generate() keep working."""
import warnings

import pytest
import torch
import torch.nn as nn

import lrd_fx
from conftest import unpickled
from lrd_fx.factorize import FactorChain

tf = pytest.importorskip("transformers")

V = 96   # vocabulary
B, T = 2, 8


def _ids(t=T):
    return torch.randint(2, V, (B, t))


def _mask(t=T):
    m = torch.ones(B, t, dtype=torch.long)
    m[1, t - 3:] = 0   # the second sequence is padded
    return m


def _text(*extra):
    return lambda: (_ids(), _mask()) + extra


# name -> (model builder, example inputs, output field, {layer left as it is: words of its reason})
MODELS = {
    "bert": (lambda: tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=32)),
             _text(), "last_hidden_state", {}),
    "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         max_position_embeddings=40, pad_token_id=1)),
                _text(), "last_hidden_state", {}),
    "distilbert": (lambda: tf.DistilBertModel(tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                                                  hidden_dim=64, max_position_embeddings=32)),
                   _text(), "last_hidden_state", {}),
    # GPT-2's positional order is (input_ids, cache, attention_mask)
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)),
             lambda: (_ids(), None, _mask()), "logits",
             {"lm_head": "weight shared with transformer.wte"}),   # tied to the token embedding
    # grouped-query attention: 2 key/value heads for 4 query heads
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=32,
                                                         bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                         tie_word_embeddings=False)),
              _text(), "logits", {}),
    "t5": (lambda: tf.T5Model(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                          decoder_start_token_id=0)),
           lambda: (_ids(), _mask(), _ids(5)), "last_hidden_state", {}),
    # the patch projection has 3 input channels (< min_channels=8)
    "vit": (lambda: tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)),
            lambda: (torch.randn(B, 3, 32, 32),), "last_hidden_state",
            {"embeddings.patch_embeddings.projection": "min_channels"}),
    "clip_text": (lambda: tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=32, bos_token_id=0,
                                                             eos_token_id=1, pad_token_id=1)),
                  _text(), "last_hidden_state", {}),
    # tied word embeddings (the head stays tied), grouped-query attention
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=32,
                                                         bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                         tie_word_embeddings=True)),
              _text(), "logits", {"lm_head": "weight shared with model.embed_tokens"}),
    # speech encoder-decoder: two nn.Conv1d over mel bins, then attention; positional order
    # (input_features, attention_mask, decoder_input_ids)
    "whisper": (lambda: tf.WhisperModel(tf.WhisperConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                                         encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                                         max_source_positions=16, max_target_positions=16,
                                                         pad_token_id=1, bos_token_id=0, eos_token_id=1,
                                                         decoder_start_token_id=0)),
                lambda: (torch.randn(B, 16, 32), None, _ids(5)), "last_hidden_state", {}),
    # raw audio through a Conv1d feature encoder (the first has 1 input channel) and a weight-normed
    # grouped positional conv
    "wav2vec2": (lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                                            conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                            num_conv_pos_embedding_groups=4)),
                 lambda: (torch.randn(B, 400),), "last_hidden_state",
                 {"feature_extractor.conv_layers.0.conv": "min_channels",
                  "encoder.pos_conv_embed.conv": "WeightNorm"}),
    # every Linear is a FalconLinear (an nn.Linear subclass whose forward is x @ W.T + b): factorized;
    # forward(input_ids, past_key_values, attention_mask): the ids only
    "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, bos_token_id=0, eos_token_id=1,
                                                            pad_token_id=1)),
               lambda: (_ids(),), "logits", {"lm_head": "weight shared with transformer.word_embeddings"}),
    # the embeddings are traced apart (the root does not trace) and get inputs_embeds=None at run time, which
    # their graph traced as given: that graph fails on the inputs, so they stay eager, their Linear factorized
    "mobilebert": (lambda: tf.MobileBertModel(tf.MobileBertConfig(vocab_size=V, hidden_size=32, embedding_size=16,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  intermediate_size=32, true_hidden_size=16,
                                                                  intra_bottleneck_size=16, num_feedforward_networks=2,
                                                                  max_position_embeddings=32)),
                   _text(), "last_hidden_state", {}),
    # the encoder is traced apart and returns a ModelOutput that its eager parent reads by attribute
    "yolos": (lambda: tf.YolosModel(tf.YolosConfig(image_size=[32, 32], patch_size=8, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                                   num_detection_tokens=5)),
              lambda: (torch.randn(B, 3, 32, 32),), "last_hidden_state",
              {"embeddings.patch_embeddings.projection": "min_channels"}),
}


def _build(name):
    torch.manual_seed(0)
    make, inputs, field, left = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().eval()
    return model, inputs(), field, left


def _params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _layers(model):
    """Names of the Linear-like layers (nn.Linear, HF Conv1D) of the original model."""
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize("name", list(MODELS))
def test_full_rank_is_exact_and_every_linear_is_accounted(name):
    model, x, field, left = _build(name)
    gm = lrd_fx.compile(model, x, rank="full", progress=False)
    with torch.no_grad():
        want, got = getattr(model(*x), field), getattr(gm(*x), field)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert _params(gm) > _params(model)           # full-rank factors hold more weights
    plan = gm.lrd.plan
    linears = _layers(model)
    assert linears <= set(plan), f"layers missing from the report: {sorted(linears - set(plan))}"
    not_factorized = {n: r["reason"] for n, r in plan.items() if r["decision"] != "decomposed"}
    assert set(not_factorized) == set(left), not_factorized
    for n, words in left.items():
        assert words in not_factorized[n]
    factorized = [n for n in linears if plan[n]["decision"] == "decomposed"]
    assert len(factorized) == len(linears - set(left)) >= 8
    assert all(isinstance(gm.get_submodule(n), FactorChain) for n in factorized)
    # models whose top-level forward does not trace stay eager with traced parts: the report says so
    if not isinstance(gm, torch.fx.GraphModule):
        assert "<root>" in gm.lrd.fallback_parts and "traced separately" in gm.lrd.report()
        assert type(gm) is type(model)
    assert not any(isinstance(m, FactorChain) for m in model.modules())   # the caller's model is untouched


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_half_is_smaller_and_finite(name):
    model, x, field, _ = _build(name)
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    assert _params(gm) < _params(model)
    assert sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values()) >= 8
    with torch.no_grad():
        out = getattr(gm(*x), field)
    assert out.shape == getattr(model(*x), field).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_kv_cache_attention_mask_and_generate_at_full_rank(name):
    model, x, field, _ = _build(name)
    gm = lrd_fx.compile(model, x, rank="full", progress=False)
    ids, mask = _ids(), _mask()
    nxt = _ids(1)
    mask2 = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
    outs = []
    with torch.no_grad():
        for m in (model, gm):
            first = m(input_ids=ids, attention_mask=mask, use_cache=True)
            step = m(input_ids=nxt, attention_mask=mask2, cache=first.cache, use_cache=True)
            outs.append((first.logits, step.logits))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # greedy generate() on the compiled model gives the original's tokens
    ids, mask = _ids(5), _mask(5)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(ids, **kw)
        got = gm.generate(ids, **kw)
    assert got.shape == (B, 5 + 4)
    assert torch.equal(got, want)


def test_fine_tuning_steps_train_mode_dropout_and_save_load(tmp_path):
    """A compiled BERT trains (dropout active in train mode, as in the original), and its traced parts
    read the mode: eval output stays deterministic."""
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.5,
                        attention_probs_dropout_prob=0.5)
    model = tf.BertModel(cfg).eval()
    x = _text()()
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    gm.train()
    a, b = gm(*x).last_hidden_state, gm(*x).last_hidden_state
    assert not torch.allclose(a, b)                 # dropout is on in train mode
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    before = [p.detach().clone() for p in gm.parameters()]
    for _ in range(2):
        loss = gm(*x).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(p0, p) for p0, p in zip(before, gm.parameters()))
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*x).last_hidden_state, gm(*x).last_hidden_state)
    path = tmp_path / "bert.lrd"
    lrd_fx.save(gm, path)
    loaded = lrd_fx.load(model, path)
    assert type(loaded) is type(model) and loaded.lrd.plan.keys() == gm.lrd.plan.keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(*x).last_hidden_state, gm(*x).last_hidden_state)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_keyword_example_inputs_dict_or_batch_encoding(name):
    """A dict / BatchEncoding of keyword inputs works as example_inputs: mapped onto forward's positional
    order (GPT-2: input_ids, cache, attention_mask; the cache takes its default), same model as the tuple."""
    model, inputs, field, _ = _build(name)
    ids, mask = inputs[0], inputs[-1]
    by_tuple = lrd_fx.compile(model, inputs, ratio=0.5, progress=False)
    batch = tf.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    for kw in (dict(batch), batch):
        gm = lrd_fx.compile(model, kw, ratio=0.5, progress=False)
        assert {n: r.get("ranks") for n, r in gm.lrd.plan.items()} == \
            {n: r.get("ranks") for n, r in by_tuple.lrd.plan.items()}
        with torch.no_grad():
            torch.testing.assert_close(getattr(gm(**batch), field), getattr(by_tuple(**batch), field))


def test_part_kept_eager_after_its_graph_failed_is_rebuilt_by_load_without_inputs(tmp_path):
    """MobileBERT's embeddings graph fails on the inputs (inputs_embeds traced as given): compile keeps them
    eager, the report says why, and the file records it, so load() without example inputs rebuilds the
    same model (the weights fit) and gives the same outputs."""
    model, x, field, _ = _build("mobilebert")
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    assert set(gm.lrd.kept_eager) == {"", "embeddings"}     # the root: a Hugging Face model
    assert "kept eager: its traced graph failed" in gm.lrd.fallback_parts["embeddings"]
    assert "NoneType" in gm.lrd.report()
    assert isinstance(gm.get_submodule("embeddings.embedding_transformation"), FactorChain)
    path = tmp_path / "mobilebert.lrd"
    lrd_fx.save(gm, path)
    for loaded in (lrd_fx.load(model, path), lrd_fx.load(model, path, x)):
        assert set(loaded.lrd.kept_eager) == {"", "embeddings"}
        with torch.no_grad():
            torch.testing.assert_close(getattr(loaded(*x), field), getattr(gm(*x), field), rtol=0, atol=0)


def test_save_pretrained_checkpoint_resumes_into_the_same_compiled_model(tmp_path):
    # what the Trainer's checkpoints hold: the compiled model's state_dict, factors included; it loads into
    # a model compiled the same way (from_pretrained on the original class cannot rebuild the factors)
    import safetensors.torch
    torch.manual_seed(0)
    build, inputs, field, _ = MODELS["bert"]
    model = build().eval()
    x = inputs()
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    gm.save_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert any(".first." in k for k in state)
    again = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    with torch.no_grad():
        for p in again.parameters():
            p.mul_(0.5)
    missing, unexpected = again.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(getattr(again(*x), field), getattr(gm(*x), field), rtol=0, atol=0)


def _resnet():
    torch.manual_seed(0)
    return tf.ResNetModel(tf.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                          layer_type="bottleneck")).eval()


def test_keyword_options_left_out_of_the_inputs_work_at_call_time():
    """HF ResNetModel's forward traces whole. Traced with output_hidden_states / return_dict left out (None),
    one graph had their None branch only: output_hidden_states=True went into its **kwargs and the output
    silently had no hidden states (later, an InputError). A Hugging Face root whose forward takes options
    the inputs leave None now stays eager (its parts traced), so calls that give them work; the labels
    of ResNetForImageClassification too."""
    model = _resnet()
    x = torch.randn(B, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert not isinstance(gm, torch.fx.GraphModule) and "a Hugging Face model" in gm.lrd.fallback_parts["<root>"]
    assert gm.lrd.traced_none == ["output_hidden_states", "return_dict"]
    with torch.no_grad():
        want, got = model(x, output_hidden_states=True), gm(x, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == 3
        for a, b in zip(got.hidden_states, want.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        as_tuple = gm(x, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], model(x).last_hidden_state, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    head = tf.ResNetForImageClassification(tf.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                           depths=[1, 1], layer_type="bottleneck",
                                                           num_labels=3)).eval()
    labels = torch.tensor([0, 2])
    gm = lrd_fx.compile(head, (x,), rank="full", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, labels=labels).loss, head(x, labels=labels).loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hidden_states_and_attentions_match_the_original(name):
    """Output capture (transformers' hooks on layers of given classes) still finds every layer."""
    model, x, field, _ = _build(name)
    if name == "bert":
        model.config._attn_implementation = "eager"
    else:
        model.set_attn_implementation("eager")
    gm = lrd_fx.compile(model, x, rank="full", progress=False)
    with torch.no_grad():
        want = model(*x, output_hidden_states=True, output_attentions=True)
        got = gm(*x, output_hidden_states=True, output_attentions=True)
    for key in ("hidden_states", "attentions"):
        assert len(got[key]) == len(want[key]) > 0
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["convnext", "yolos"])
def test_hidden_states_asked_for_after_compile_are_all_there(name):
    """transformers installs its output-recording hooks on the first call that asks for hidden states, on
    modules found by class. ConvNeXt's stages and YOLOS's layers trace into graphs, which are no longer of
    that class: compiled first and asked after, the output had no hidden states at all. The hooks are
    installed on the copy before tracing now, so those modules stay eager and are found."""
    if name == "yolos":
        model, x, _, _ = _build("yolos")
    else:
        torch.manual_seed(0)
        model = tf.ConvNextModel(tf.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1],
                                                          num_stages=2)).eval()
        x = (torch.randn(B, 3, 32, 32),)
    gm = lrd_fx.compile(model, x, rank="full", progress=False)
    assert not getattr(model, "_output_capturing_hooks_installed", False)   # the caller's model untouched
    with torch.no_grad():
        got, want = gm(*x, output_hidden_states=True), model(*x, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) >= 3
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "yolos"])
def test_compiled_model_pickles_whole_with_its_output_hooks(name):
    """Compile installs transformers' output-capturing hooks on its copy up front (above). Those hooks are
    closures, so torch.save(gm) failed ("Can't pickle local object ... output_capturing_hook") where the
    original pickles. They are swapped for picklable hooks that make the same call: the model saves, loads
    and still returns every hidden state, equal to the original's."""
    import io
    model, x, field, _ = _build(name)
    gm = lrd_fx.compile(model, x, rank="full", progress=False)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    with torch.no_grad():
        want, got = model(*x, output_hidden_states=True), back(*x, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) >= 2
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deberta_compiled_with_a_mask_takes_calls_without_one():
    """DeBERTa-v2's root traces whole; compiled with an attention mask, its graph failed inside its own
    code when called without one ('NoneType' object has no attribute 'dim'). Its root is kept eager now
    (a Hugging Face model; the optional-input check would keep it eager too), and both calls give the
    original's output."""
    torch.manual_seed(0)
    model = tf.DebertaV2Model(tf.DebertaV2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=40, relative_attention=True,
                                                 position_buckets=8, pos_att_type=["p2c", "c2p"])).eval()
    ids, mask = _ids(), _mask()
    gm = lrd_fx.compile(model, {"input_ids": ids, "attention_mask": mask}, ratio=0.5, progress=False)
    assert "<root>" in gm.lrd.fallback_parts and not isinstance(gm, torch.fx.GraphModule)
    full = lrd_fx.compile(model, {"input_ids": ids, "attention_mask": mask}, rank="full", progress=False)
    with torch.no_grad():
        for kw in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            assert torch.isfinite(gm(**kw).last_hidden_state).all()
            torch.testing.assert_close(full(**kw).last_hidden_state, model(**kw).last_hidden_state,
                                       rtol=1e-4, atol=1e-5)


def test_siglip_pooling_head_attention_is_factorized(tmp_path):
    # SigLIP's vision pooling head is an nn.MultiheadAttention: compile gives it lrd_fx's stand-in
    torch.manual_seed(0)
    cfg = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    model = tf.SiglipVisionModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    full = lrd_fx.compile(model, (x,), rank="full")
    with torch.no_grad():
        torch.testing.assert_close(full(x).pooler_output, model(x).pooler_output, rtol=1e-4, atol=1e-5)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    for name in ("head.attention.in_proj", "head.attention.out_proj"):
        assert gm.lrd.plan[name]["decision"] == "decomposed", gm.lrd.plan[name]
    with torch.no_grad():
        assert len(gm(x, output_hidden_states=True).hidden_states) == 3
    lrd_fx.save(gm, tmp_path / "siglip.lrd")
    loaded = lrd_fx.load(tf.SiglipVisionModel(cfg).eval(), tmp_path / "siglip.lrd")     # other random weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pooler_output, gm(x).pooler_output, rtol=0, atol=0)


def _llava():
    torch.manual_seed(0)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=32, **vit),
                         text_config=tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, max_position_embeddings=64),
                         image_token_index=100, image_seq_length=16, vision_feature_layer=-2)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    ids = torch.cat([torch.tensor([[0] + [100] * 16]).expand(B, -1), _ids()], 1)     # 16 image tokens, then text
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(B, 3, 32, 32)}


@pytest.mark.parametrize("ran_before", [False, True])
def test_llava_compiles_also_after_the_model_ran(ran_before):
    """A LLaVA-like model's forward asks its vision tower for one layer's hidden state, so a model that ran
    once has transformers' output hooks on the tower. Compile installs them from the root of its copy, and
    transformers' walk installed them on the tower again: each layer recorded its output twice, the layer
    selected was None and shape_prop failed. Now the second hooks are dropped."""
    model, x = _llava()
    if ran_before:
        with torch.no_grad():
            model(**x)
        assert getattr(model.model.vision_tower, "_output_capturing_hooks_installed", False)
    gm = lrd_fx.compile(model, x, rank="full", progress=False)
    assert all(len(m._forward_hooks) <= 1 for m in gm.modules())
    with torch.no_grad():
        want = model(**x, output_hidden_states=True)
        got = gm(**x, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    assert sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values()) >= 20


def test_resize_token_embeddings_with_a_factorized_head_is_refused_before_any_change(tmp_path):
    """transformers resized the input embeddings, then failed on the factorized LM head with a TypeError,
    leaving the model half resized. Now an UnsupportedError says what to do, and nothing changed; with the
    head kept (skip=), resizing works."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=False)).eval()
    x = {"input_ids": _ids(), "attention_mask": _mask()}
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    assert isinstance(gm.get_output_embeddings(), FactorChain)
    for m in (gm, unpickled(gm),
              lrd_fx.load(model, _saved(gm, tmp_path / "m.lrd"))):
        with pytest.raises(lrd_fx.UnsupportedError, match="LM head 'lm_head' .* skip=\\['lm_head'\\]"):
            m.resize_token_embeddings(V + 16)
        assert m.get_input_embeddings().weight.shape[0] == V and m.config.vocab_size == V
    kept = lrd_fx.compile(model, x, ratio=0.5, skip=["lm_head"], progress=False)
    kept.resize_token_embeddings(V + 16)
    with torch.no_grad():
        assert kept(**x).logits.shape[-1] == V + 16
    assert model.config.vocab_size == V and model.get_input_embeddings().weight.shape[0] == V


def _saved(gm, path):
    lrd_fx.save(gm, path)
    return path


def test_inputs_the_model_does_not_run_on_say_what_a_hf_model_takes():
    torch.manual_seed(0)
    model = tf.T5Model(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)).eval()
    with pytest.raises(lrd_fx.InputError, match="decoder_input_ids") as e:
        lrd_fx.compile(model, {"input_ids": _ids()}, progress=False)
    assert "224" not in str(e.value)
