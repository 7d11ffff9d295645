"""torch.nn's attention and transformer modules: the stand-ins compile gives its copy compute what torch's
modules compute, and their projections are factorized."""
import copy
import itertools
import os

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx import torch_modules as tm


def _mha_calls():
    """(constructor kwargs, input builder, call kwargs) covering the forward's options."""
    L, S, N, E = 5, 7, 3, 16

    def causal(n):
        return nn.Transformer.generate_square_subsequent_mask(n)

    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 4:] = True
    cases = []
    for batch_first, need_weights, average in itertools.product((True, False), (True, False), (True, False)):
        if not need_weights and not average:
            continue
        cases.append(({"batch_first": batch_first}, "cross", {"need_weights": need_weights,
                                                              "average_attn_weights": average}))
    cases += [
        ({"batch_first": True}, "cross", {"key_padding_mask": kpm}),
        ({"batch_first": True}, "cross", {"key_padding_mask": kpm.float() * -1e4, "need_weights": False}),
        ({"batch_first": True}, "cross", {"attn_mask": torch.rand(L, S) > 0.8, "need_weights": False}),
        ({"batch_first": True}, "cross", {"attn_mask": torch.randn(N * 2, L, S)}),
        ({"batch_first": True}, "self", {"attn_mask": causal(L), "is_causal": True, "need_weights": False}),
        ({"batch_first": True}, "self", {"attn_mask": causal(L), "key_padding_mask": torch.zeros(N, L, dtype=torch.bool)}),
        ({"batch_first": False}, "unbatched", {}),
        ({"batch_first": True}, "memory", {"key_padding_mask": kpm}),      # key is value (a decoder's memory)
        ({"batch_first": False}, "detr", {"attn_mask": torch.randn(L, L)}),  # query is key, value apart
        ({"batch_first": True, "kdim": 12, "vdim": 10}, "kv_dims", {"need_weights": False}),
        ({"batch_first": True, "add_bias_kv": True}, "cross", {"key_padding_mask": kpm}),
        ({"batch_first": True, "add_zero_attn": True}, "cross", {"attn_mask": torch.randn(L, S)}),
        ({"batch_first": True, "bias": False}, "self", {"need_weights": False}),
    ]

    def inputs(kind, batch_first):
        if kind == "unbatched":
            return torch.randn(L, E), torch.randn(S, E), torch.randn(S, E)
        if kind == "self":
            x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
            return x, x, x
        shape = (lambda n: (N, n, E)) if batch_first else (lambda n: (n, N, E))
        if kind == "detr":
            x = torch.randn(*shape(L))
            return x, x, torch.randn(*shape(L))
        if kind == "memory":
            memory = torch.randn(*shape(S))
            return torch.randn(*shape(L)), memory, memory
        if kind == "kv_dims":
            return torch.randn(N, L, E), torch.randn(N, S, 12), torch.randn(N, S, 10)
        return torch.randn(*shape(L)), torch.randn(*shape(S)), torch.randn(*shape(S))

    return [(kw, inputs, kind, call) for kw, kind, call in cases]


@pytest.mark.parametrize("case", range(len(_mha_calls())))
def test_multihead_attention_stand_in_computes_what_torch_computes(case):
    kw, inputs, kind, call = _mha_calls()[case]
    torch.manual_seed(case)
    mha = nn.MultiheadAttention(16, 2, **kw).eval()
    kind_of = tm.MultiheadAttention if mha._qkv_same_embed_dim else tm.MultiheadAttentionKV
    stand_in = kind_of(copy.deepcopy(mha))
    q, k, v = inputs(kind, kw["batch_first"])
    for grad in (False, True):                  # torch's fused fast path runs without grad only
        with torch.set_grad_enabled(grad):
            want, want_w = mha(q, k, v, **call)
            got, got_w = stand_in(q, k, v, **call)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (want_w is None) == (got_w is None)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


def test_multihead_attention_stand_in_trains_like_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).train()    # dropout 0: the same in both
    stand_in = tm.MultiheadAttention(copy.deepcopy(mha)).train()
    x = torch.randn(2, 5, 16)
    mha(x, x, x)[0].square().sum().backward()
    stand_in(x, x, x)[0].square().sum().backward()
    torch.testing.assert_close(stand_in.in_proj_weight.detach(), mha.in_proj_weight.detach())
    torch.testing.assert_close(stand_in.in_proj.weight.grad, mha.in_proj_weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stand_in.out_proj.weight.grad, mha.out_proj.weight.grad, rtol=1e-4, atol=1e-5)


def test_multihead_attention_stand_in_loads_torch_state_dict():
    torch.manual_seed(0)
    a, b = nn.MultiheadAttention(16, 2), nn.MultiheadAttention(16, 2, kdim=8, vdim=4)
    for mha, kind_of in ((a, tm.MultiheadAttention), (b, tm.MultiheadAttentionKV)):
        stand_in = kind_of(nn.MultiheadAttention(16, 2, kdim=mha.kdim, vdim=mha.vdim))
        stand_in.load_state_dict(mha.state_dict())
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            want, got = getattr(mha, name), getattr(stand_in, name)
            assert (want is None) == (got is None), name
            if want is not None:
                assert torch.equal(got, want), name


class EncoderModel(nn.Module):
    def __init__(self, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        self.head = nn.Linear(32, 24)

    def forward(self, x, pad=None):
        return self.head(self.enc(x, src_key_padding_mask=pad))


def _pad():
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 7:] = True
    return pad


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_compiles_exactly_and_factorizes_attention_and_mlp(norm_first):
    torch.manual_seed(0)
    model = EncoderModel(norm_first).eval()
    before = copy.deepcopy(model.state_dict())
    x, pad = torch.randn(3, 9, 32), _pad()
    full = lrd_fx.compile(model, (x, pad), rank="full")
    with torch.no_grad():       # torch takes its nested-tensor path here: zeros at the padded positions
        torch.testing.assert_close(full(x, pad), model(x, pad), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full(x, pad), model(x, pad), rtol=1e-4, atol=1e-5)     # and with grad
    gm = lrd_fx.compile(model, (x, pad), ratio=0.5)
    plan = gm.lrd.plan
    for i in range(2):
        for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"):
            assert plan[f"enc.layers.{i}.{name}"]["decision"] == "decomposed", (name, plan.get(f"enc.layers.{i}.{name}"))
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters())
    assert "2 nn.MultiheadAttention module(s) ('enc.layers.0.self_attn', ...) run as" in gm.lrd.report()
    assert isinstance(gm.enc, nn.TransformerEncoder)      # eager (its forward does not trace), its layers traced
    # the caller's model is as it was: torch's classes, its weights
    assert type(model.enc) is nn.TransformerEncoder and type(model.enc.layers[0].self_attn) is nn.MultiheadAttention
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_transformer_encoder_trains_with_sequential_freezing_and_saves(tmp_path):
    torch.manual_seed(0)
    model = EncoderModel().eval()
    x, pad = torch.randn(3, 9, 32), _pad()
    gm = lrd_fx.compile(model, (x, pad), ratio=0.5, freeze="sequential")
    gm.train()
    gm(x, pad).square().mean().backward()
    factored = [n for n, p in gm.named_parameters() if "in_proj" in n or "linear1" in n]
    assert factored and any(gm.get_parameter(n).grad is not None for n in factored)
    gm.eval()
    path = os.path.join(tmp_path, "enc.lrd")
    lrd_fx.save(gm, path)
    for inputs in (None, (x, pad)):
        loaded = lrd_fx.load(EncoderModel().eval(), path, inputs)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, pad), gm(x, pad))


def test_transformer_with_decoder_compiles_exactly():
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 1, 2, 64, batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = model

        def forward(self, src, tgt, tgt_mask):
            return self.t(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)

    wrapper = Seq2Seq().eval()
    full = lrd_fx.compile(wrapper, (src, tgt, mask), rank="full")
    with torch.no_grad():
        torch.testing.assert_close(full(src, tgt, mask), wrapper(src, tgt, mask), rtol=1e-4, atol=1e-5)
    plan = lrd_fx.compile(wrapper, (src, tgt, mask), ratio=0.5).lrd.plan
    for name in ("t.decoder.layers.1.multihead_attn.in_proj", "t.decoder.layers.0.self_attn.in_proj",
                 "t.decoder.layers.0.linear2", "t.encoder.layers.0.self_attn.out_proj"):
        assert plan[name]["decision"] == "decomposed", (name, plan.get(name))


def test_torchvision_vit_attention_is_factorized():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lrd_fx.compile(model, (x,), rank="full")(x), model(x), rtol=1e-4, atol=1e-5)
    plan = lrd_fx.compile(model, (x,), ratio=0.5).lrd.plan
    attn = [n for n in plan if ".self_attention." in n]
    assert len(attn) == 4 and all(plan[n]["decision"] == "decomposed" for n in attn), attn


def test_attention_kept_as_torch_module_where_it_must_be():
    torch.manual_seed(0)
    model = EncoderModel().eval()
    x = torch.randn(3, 9, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, decompose_linear=False)
    assert type(gm.enc.layers[0].self_attn) is nn.MultiheadAttention
    # kept as leaves, by class or by path: torch's modules as they are
    gm = lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=[nn.MultiheadAttention])
    assert type(gm.enc.layers[0].self_attn) is nn.MultiheadAttention
    gm = lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=["enc.layers.1"])
    assert type(gm.enc.layers[1]) is nn.TransformerEncoderLayer
    assert type(gm.enc.layers[1].self_attn) is nn.MultiheadAttention
    assert gm.lrd.plan["enc.layers.0.self_attn.in_proj"]["decision"] == "decomposed"
    # a hook on it must keep running: it stays torch's module, its projections skipped with the reason
    seen = []
    model.enc.layers[1].self_attn.register_forward_hook(lambda m, i, o: seen.append(o[0].shape))
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    assert type(gm.enc.layers[1].self_attn) is nn.MultiheadAttention
    assert "reads its projection weights directly" in gm.lrd.plan["enc.layers.1.self_attn.in_proj"]["reason"]
    assert gm.lrd.plan["enc.layers.0.self_attn.in_proj"]["decision"] == "decomposed"
    seen.clear()
    gm(x)
    assert seen == [torch.Size([3, 9, 32])]


def test_stand_ins_script_and_compile_as_torch_modules_do():
    torch.manual_seed(0)
    model = EncoderModel().eval()
    x, pad = torch.randn(3, 9, 32), _pad()
    gm = lrd_fx.compile(model, (x, pad), rank="full")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(gm)(x, pad), model(x, pad), rtol=1e-4, atol=1e-5)
        # under torch.compile torch's encoder does not nest (so no zeros at the padded positions): nor does ours
        want = torch.compile(model, backend="eager")(x, pad)
        torch.testing.assert_close(torch.compile(gm, backend="eager")(x, pad), want, rtol=1e-4, atol=1e-5)
    from torchvision.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    img = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(lrd_fx.compile(vit, (img,), rank="full"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(img), vit(img), rtol=1e-4, atol=1e-5)



def test_files_saved_before_the_stand_ins_load_as_they_were(tmp_path, monkeypatch):
    from test_save_load import rewrite_header
    torch.manual_seed(0)
    model = EncoderModel().eval()
    x = torch.randn(3, 9, 32)
    with monkeypatch.context() as patch:       # compile as it was before the stand-ins
        patch.setattr(lrd_fx.api, "use_stand_ins_", lambda *args, **kwargs: [])
        old = lrd_fx.compile(model, (x,), ratio=0.5)
    assert old.lrd.plan["enc.layers.0.self_attn.in_proj"]["decision"] == "skipped"
    assert old.lrd.plan["head"]["decision"] == "decomposed"
    lrd_fx.save(old, tmp_path / "new")
    rewrite_header(tmp_path / "new", tmp_path / "old", lambda h: h.pop("stand_ins"))
    for inputs in (None, (x,)):
        loaded = lrd_fx.load(model, tmp_path / "old", inputs)
        assert type(loaded.enc.layers[0].self_attn) is nn.MultiheadAttention
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)
    with pytest.raises(lrd_fx.LoadError, match="stand_ins entry is not a JSON list"):
        rewrite_header(tmp_path / "new", tmp_path / "bad", lambda h: h.update(stand_ins="enc"))
        lrd_fx.load(model, tmp_path / "bad")
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    assert sorted(gm.lrd.stand_ins) == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    lrd_fx.save(gm, tmp_path / "now")
    other = EncoderModel().eval()
    other.enc.layers[1].self_attn.register_forward_hook(lambda m, i, o: None)   # keeps torch's module
    with pytest.raises(lrd_fx.LoadError, match=r"enc\.layers\.1\.self_attn.*load onto the model the file was"):
        lrd_fx.load(other, tmp_path / "now")
