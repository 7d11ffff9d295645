"""timm's weight-standardized convolutions (BiT, NFNet, NF-RegNet, hybrid ViT stems) are factorized from the
weight their forward standardizes; those not factorized are put back as they were."""
import pytest
import torch
import torch.nn as nn
from conftest import state_hash

import lrd_fx

timm_layers = pytest.importorskip("timm.layers")
STD = (timm_layers.StdConv2d, timm_layers.ScaledStdConv2d, timm_layers.StdConv2dSame, timm_layers.ScaledStdConv2dSame)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = timm_layers.StdConv2d(8, 16, 3)
        self.b = timm_layers.ScaledStdConv2d(16, 16, 3, gamma=1.7)
        self.c = timm_layers.StdConv2dSame(16, 32, 3, stride=2)      # pads 'SAME' on every call (odd input)
        self.d = timm_layers.ScaledStdConv2dSame(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(self.d(self.c(x)).mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    m = Net().eval()
    with torch.no_grad():               # filters far from standardized, gains away from 1
        for mod in (m.b, m.d):
            mod.gain.uniform_(0.5, 1.5)
        for mod in (m.a, m.b, m.c, m.d):
            mod.weight.mul_(3.0).add_(0.3)
    return m, torch.randn(2, 8, 15, 15)


def test_standardized_convs_are_factorized_and_equal_at_full_rank():
    model, x = _net()
    before = state_hash(model)
    full = lrd_fx.compile(model, (x,), rank="full")
    torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-4)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    plan = gm.lrd.plan
    for name, cls in zip("abcd", STD):
        assert plan[name]["decision"] == "decomposed", plan[name]
        assert plan[name]["kind"] == cls.__name__
    assert gm.lrd.params_before == sum(p.numel() for p in model.parameters())      # gains counted
    assert plan["b"]["params_before"] == sum(p.numel() for p in model.b.parameters())
    assert any("weight-standardized" in n and "not standardized again" in n for n in gm.lrd.notes)
    assert not any(isinstance(m, STD) for m in gm.modules())
    assert state_hash(model) == before
    gm.train()
    gm(x).sum().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


def test_standardized_convs_not_factorized_are_put_back(tmp_path):
    model, x = _net()
    gm = lrd_fx.compile(model, (x,), ratio=0.5, skip=["b", "c"])
    assert type(gm.b) is timm_layers.ScaledStdConv2d and type(gm.c) is timm_layers.StdConv2dSame
    assert gm.lrd.plan["b"]["decision"] == "skipped" and gm.lrd.plan["b"]["kind"] == "ScaledStdConv2d"
    assert gm.lrd.plan["b"]["params_after"] == gm.lrd.plan["b"]["params_before"]
    assert gm.lrd.params_after == sum(p.numel() for p in gm.parameters())
    # still standardizing its weight: a change of the stored weight's scale does not change its output
    with torch.no_grad():
        y = gm.b(torch.randn(1, 16, 7, 7, generator=torch.Generator().manual_seed(1)))
        gm.b.weight.mul_(2.0)
        torch.testing.assert_close(gm.b(torch.randn(1, 16, 7, 7, generator=torch.Generator().manual_seed(1))), y,
                                   rtol=1e-4, atol=1e-3)
        gm.b.weight.div_(2.0)
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(_net(seed=1)[0], tmp_path / "m.lrd", (x,))
    assert type(back.b) is timm_layers.ScaledStdConv2d
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)


def test_standardized_convs_reverted_by_the_search_are_put_back():
    model, x = _net()
    fake = lambda module, shape, mode: 0.1 if isinstance(module, nn.Conv2d) else 1.0   # noqa: E731
    with lrd_fx.cost.use_cost_fn(fake):
        gm = lrd_fx.compile(model, (x,), ratio=0.5, rank_search="infer", whole_model_check=False, progress=False)
    for name, cls in zip("abcd", STD):
        assert gm.lrd.plan[name]["decision"] == "reverted", gm.lrd.plan[name]
        assert type(gm.get_submodule(name)) is cls
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_standardized_convs_keep_channels_last_and_bf16():
    model, x = _net()
    model = model.to(memory_format=torch.channels_last)
    gm = lrd_fx.compile(model, (x.to(memory_format=torch.channels_last),), rank="full")
    for name in "abcd":
        for m in gm.get_submodule(name).modules():
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and m.kernel_size != (1, 1):
                assert m.weight.is_contiguous(memory_format=torch.channels_last), name
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    half, xb = _net()[0].to(torch.bfloat16), x.to(torch.bfloat16)
    gb = lrd_fx.compile(half, (xb,), rank="full")
    assert gb.lrd.plan["b"]["decision"] == "decomposed" and gb(xb).dtype == torch.bfloat16
    torch.testing.assert_close(gb(xb).float(), half(xb).float(), rtol=0.1, atol=0.5)


def test_rank_search_times_a_standardized_conv_as_itself():
    """The search compares the factors with the layer as it would be put back: the standardized conv, whose
    forward standardizes its weight on every call, not the plain stand-in (tested with a cost function: the
    plain conv is faster than the factors, the original is not)."""
    model, x = _net()
    costs = {"plain": 0.3, "chain": 0.5, "standardized": 1.0}
    seen = set()

    def cost(module, shape, mode):
        kind = ("standardized" if isinstance(module, STD) else "plain" if isinstance(module, nn.Conv2d)
                else "chain" if not isinstance(module, nn.Linear) else "linear")
        seen.add(kind)
        return costs.get(kind, 1.0)

    with lrd_fx.cost.use_cost_fn(cost):
        gm = lrd_fx.compile(model, (x,), ratio=0.5, rank_search="infer", whole_model_check=False, progress=False)
    assert "standardized" in seen and "plain" not in seen
    for name in "abcd":
        rec = gm.lrd.plan[name]
        assert rec["decision"] in ("searched", "decomposed"), rec
        assert rec["time_original_s"] == pytest.approx(1.0)


def test_standardized_convs_save_and_load(tmp_path):
    model, x = _net()
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(_net(seed=1)[0], tmp_path / "m.lrd", (x,))
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
    assert back.lrd.plan["d"]["kind"] == "ScaledStdConv2dSame"


def test_standardized_convs_kept_whole_inside_leaves_and_with_decompose_conv_off():
    model, x = _net()
    gm = lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=["a"])
    assert type(gm.a) is timm_layers.StdConv2d and gm.lrd.plan["b"]["decision"] == "decomposed"
    off = lrd_fx.compile(model, (x,), ratio=0.5, decompose_conv=False)
    assert all(type(off.get_submodule(n)) is cls for n, cls in zip("abcd", STD))
    assert off.lrd.plan["fc"]["decision"] == "decomposed"


def test_nf_regnet_is_factorized():
    """timm's NF-RegNet: every convolution is a ScaledStdConv2d inside NormFreeBlocks (which timm registers
    as not traceable); before, 1 of its 87 layers was factorized."""
    import timm
    torch.manual_seed(0)
    model, x = timm.create_model("nf_regnet_b0", pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    std = [n for n, m in model.named_modules() if isinstance(m, STD)]
    decomposed = [n for n in std if gm.lrd.plan[n]["decision"] == "decomposed"]
    assert len(decomposed) > len(std) // 2
    assert all("grouped" in gm.lrd.plan[n]["reason"] or "min_channels" in gm.lrd.plan[n]["reason"]
               for n in std if n not in decomposed)
    torch.testing.assert_close(lrd_fx.compile(model, (x,), rank="full")(x), model(x), rtol=1e-4, atol=1e-4)
