"""torchvision's Swin attention gets a stand-in whose qkv and proj are called as layers, so they factorize."""
import copy

import pytest
import torch
from conftest import state_hash
from torchvision.models.swin_transformer import (PatchMergingV2, ShiftedWindowAttention, ShiftedWindowAttentionV2,
                                                 SwinTransformer, SwinTransformerBlockV2)

import lrd_fx


def _swin(v2: bool, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    m = SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                        num_classes=10, **kw).eval()
    with torch.no_grad():
        for a in m.modules():
            if isinstance(a, ShiftedWindowAttention):
                a.qkv.bias.uniform_(-1, 1)        # V2 ignores the keys' third: a nonzero one must stay ignored
                if not v2:
                    a.relative_position_bias_table.normal_()
    return m


def _attention(m):
    return [n for n, a in m.named_modules() if isinstance(a, ShiftedWindowAttention)]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_projections_are_factorized_and_exact_at_full_rank(v2):
    model = _swin(v2)
    before = state_hash(model)
    x = torch.randn(2, 3, 22, 26)          # padded to whole windows, shifted windows masked
    full = lrd_fx.compile(model, (x,), rank="full")
    torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)
    y = torch.randn(1, 3, 30, 18)          # another size: the windowing is computed per call
    torch.testing.assert_close(full(y), model(y), rtol=1e-5, atol=1e-5)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    assert gm.lrd.fallback_parts == {}
    plan = gm.lrd.plan
    for a in _attention(model):
        for proj in ("qkv", "proj"):
            assert plan[f"{a}.{proj}"]["decision"] == "decomposed", plan[f"{a}.{proj}"]
    assert state_hash(model) == before
    assert all(type(a) in (ShiftedWindowAttention, ShiftedWindowAttentionV2) for a in model.modules()
               if isinstance(a, ShiftedWindowAttention))          # the caller's classes unchanged


def test_swin_v2_keys_get_no_bias_and_no_gradient_through_it():
    model = _swin(True)
    x = torch.randn(2, 3, 16, 16)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    gm.train()
    gm(x).sum().backward()
    chain = gm.get_submodule(f"{_attention(model)[0]}.qkv")
    grad = chain.bias.grad.view(3, -1).abs().sum(1)
    assert grad[1] == 0 and grad[0] > 0 and grad[2] > 0
    # the original gives its keys' bias no gradient either
    model.train()
    model(x).sum().backward()
    assert model.get_submodule(f"{_attention(model)[0]}.qkv").bias.grad.view(3, -1)[1].abs().sum() == 0


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_save_load_and_script(v2, tmp_path):
    model = _swin(v2)
    x = torch.randn(2, 3, 16, 20)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(_swin(v2, seed=1), tmp_path / "m.lrd", (x,))
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
    torch.testing.assert_close(torch.jit.script(gm)(x), gm(x), rtol=1e-6, atol=1e-6)


def test_swin_attention_with_hooks_or_kept_as_leaf_stays_torchvision():
    model = _swin(False)
    x = torch.randn(1, 3, 16, 16)
    first = _attention(model)[0]
    hooked = copy.deepcopy(model)
    hooked.get_submodule(first).register_forward_hook(lambda mod, inp, out: None)
    gm = lrd_fx.compile(hooked, (x,), ratio=0.5)
    assert type(gm.get_submodule(first)) is ShiftedWindowAttention
    assert gm.lrd.plan[f"{first}.qkv"]["decision"] == "skipped"
    assert gm.lrd.plan[f"{_attention(model)[1]}.qkv"]["decision"] == "decomposed"
    leaf = lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=[ShiftedWindowAttention])
    assert "kept as a leaf" in leaf.lrd.plan[f"{first}.qkv"]["reason"]


def test_video_swin_projections_are_factorized_exact_and_saved():
    """torchvision's ShiftedWindowAttention3d (swin3d_t/s/b) hands qkv.weight and proj.weight to
    shifted_window_attention_3d: its 24 projections in swin3d_t were skipped ("weight read directly"). The
    stand-in calls them as layers: exact at full rank, for clips smaller than a window too."""
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d, SwinTransformer3d

    from lrd_fx.torchvision_modules import ShiftedWindowAttention3d as StandIn
    torch.manual_seed(0)
    m = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                          window_size=[2, 4, 4], num_classes=10).eval()
    with torch.no_grad():
        for a in m.modules():
            if isinstance(a, ShiftedWindowAttention3d):
                a.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 8, 32, 32)
    gm = lrd_fx.compile(m, (x,), rank="full", progress=False)
    assert all(type(a) is StandIn for a in gm.modules() if isinstance(a, ShiftedWindowAttention3d))
    projections = [k for k in gm.lrd.plan if k.endswith((".attn.qkv", ".attn.proj"))]
    assert len(projections) == 8 and all(gm.lrd.plan[k]["decision"] == "decomposed" for k in projections)
    with torch.no_grad():
        for inp in (x, torch.randn(1, 3, 2, 16, 24)):       # the second: smaller than a window, no shift
            torch.testing.assert_close(gm(inp), m(inp), rtol=1e-4, atol=1e-5)
    half = lrd_fx.compile(m, (x,), ratio=0.5, progress=False)
    lrd_fx.save(half, str(tmp := __import__("tempfile").mkdtemp()) + "/s.lrd")
    loaded = lrd_fx.load(m, tmp + "/s.lrd").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), half(x), rtol=0, atol=0)


def test_quantizable_model_notes_eager_markers_and_quantizes_in_fx_mode():
    """torchvision's quantizable models carry QuantStub/DeQuantStub/FloatFunctional, which the traced graph
    runs as float ops, so eager-mode prepare/convert of the compiled model fed float tensors to quantized
    convs. The report says so and names FX mode, which works on the compiled model."""
    import torch.ao.quantization.quantize_fx as qfx
    from torch.ao.quantization import get_default_qconfig_mapping
    from torchvision.models.quantization import resnet18
    torch.manual_seed(0)
    model = resnet18(weights=None, quantize=False).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    note = next(n for n in gm.lrd.notes if "quantization markers" in n)
    assert "QuantStub" in note and "prepare_fx" in note and "prepare_fx" in gm.lrd.report()
    prepared = qfx.prepare_fx(gm, get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    q = qfx.convert_fx(prepared)
    with torch.no_grad():
        want = gm(x)
        assert (q(x) - want).norm() / want.norm() < 0.2
    plain = lrd_fx.compile(_swin(False), (torch.randn(1, 3, 16, 16),), ratio=0.5, progress=False)
    assert not any("quantization markers" in n for n in plain.lrd.notes)
