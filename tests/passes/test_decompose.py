"""decompose pass: structure of the rewrite and numeric equivalence at full rank, on toy modules."""
import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.factorize import FactorChain


def _chain_nodes(gm):
    return [(n.target, n.meta.get("lrd_role")) for n in gm.graph.nodes if n.op == "call_module"]


CONVS = [
    ("conv1d", lambda: nn.Conv1d(16, 24, 5, stride=2, padding=2), (2, 16, 33)),
    ("conv2d_same", lambda: nn.Conv2d(16, 32, 3, padding="same", bias=False), (2, 16, 12, 12)),
    ("conv2d_dil_nonsq", lambda: nn.Conv2d(12, 20, (3, 5), stride=(2, 1), padding=(2, 1), dilation=2), (2, 12, 15, 17)),
    ("conv2d_reflect", lambda: nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), (2, 16, 9, 9)),
    ("conv2d_1x1_stride", lambda: nn.Conv2d(32, 48, 1, stride=2), (2, 32, 10, 10)),
    ("conv3d", lambda: nn.Conv3d(8, 12, 3, padding=1, bias=False), (1, 8, 6, 7, 5)),
    ("linear", lambda: nn.Linear(40, 24), (3, 5, 40)),
    ("linear_nobias", lambda: nn.Linear(24, 40, bias=False), (4, 24)),
]


@pytest.mark.parametrize("scheme", ["tucker2", "svd"])
@pytest.mark.parametrize("name,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_full_rank_is_exact(name, make, shape, scheme):
    layer = make()
    model = nn.Sequential(nn.Identity(), layer, nn.ReLU())
    x = torch.randn(*shape)
    gm = lrd_fx.compile(model, (x,), rank="full", conv_scheme=scheme, min_channels=1)
    chain = gm.get_submodule("1")
    assert isinstance(chain, FactorChain)
    roles = [r for _, r in _chain_nodes(gm) if r]
    assert roles == chain.roles() and len(roles) in (2, 3)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_tucker_chain_structure_and_meta():
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(1, 32, 8, 64)
    gm = lrd_fx.compile(model, (x,), ratio=0.25)
    targets = _chain_nodes(gm)
    assert targets[:3] == [("0.first", "first"), ("0.core", "core"), ("0.last", "last")]
    assert targets[-2:] == [("2.first", "first"), ("2.last", "last")]
    first = next(n for n in gm.graph.nodes if n.target == "0.first")
    rec = first.meta["lrd"]
    assert rec.name == "0" and rec.scheme == "tucker2" and rec.decision == "decomposed"
    assert rec.in_shape == [1, 32, 8, 64] and rec.out_shape == [1, 64, 8, 64]
    assert rec.params_after <= 0.25 * rec.params_before * 1.1
    assert rec.flops_after < rec.flops_before
    assert gm.get_submodule("0.core").stride == (1, 1) and gm.get_submodule("0.core").padding == (1, 1)


def test_shared_module_factorized_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model = Twice()
    x = torch.randn(2, 64)
    gm = lrd_fx.compile(model, (x,), rank="full")
    firsts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lin.first"]
    assert len(firsts) == 2
    assert sum(1 for m in gm.modules() if isinstance(m, FactorChain)) == 1
    rec = gm.lrd.plan["lin"]
    assert rec["flops_before"] == 2 * 2 * 64 * 64 * 2   # two calls counted
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_skips_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, groups=16, padding=1),     # depthwise
        nn.Conv2d(16, 4, 1),                             # below min_channels
        nn.Conv2d(4, 32, 3, padding=1),                  # below min_channels
        nn.Conv2d(32, 32, 3, padding=1),                 # excluded by skip=
        nn.Flatten(), nn.Linear(32 * 16, 10))
    x = torch.randn(1, 16, 4, 4)
    gm = lrd_fx.compile(model, (x,), ratio=0.25, skip=["3"], filter_fn=lambda n, m: n != "5")
    plan = gm.lrd.plan
    assert "groups=16" in plan["0"]["reason"] and plan["0"]["decision"] == "skipped"
    assert "min_channels" in plan["1"]["reason"] and "min_channels" in plan["2"]["reason"]
    assert plan["3"]["reason"] == "excluded by skip="
    assert plan["5"]["reason"] == "excluded by filter_fn"
    assert not any(isinstance(m, FactorChain) for m in gm.modules())


def test_no_saving_is_skipped():
    model = nn.Sequential(nn.Linear(16, 16))
    gm = lrd_fx.compile(model, (torch.randn(1, 16),), rank=12)
    assert gm.lrd.plan["0"]["decision"] == "skipped"
    assert "no parameter saving" in gm.lrd.plan["0"]["reason"]


def test_compression_ratio_bound():
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.Conv2d(128, 256, 1))
    x = torch.randn(1, 64, 6, 6)
    for ratio in (0.1, 0.25, 0.5):
        gm = lrd_fx.compile(model, (x,), ratio=ratio)
        for name in ("0", "1"):
            rec = gm.lrd.records()[name]
            m = model.get_submodule(name)
            per_rank = (m.in_channels + m.out_channels) * (9 if name == "0" else 1)
            assert rec.params_after <= ratio * rec.params_before + per_rank + m.out_channels


def test_per_layer_rank_dict_and_glob():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    gm = lrd_fx.compile(model, (torch.randn(2, 64),), rank={"0": 4, "[23]": 8})
    plan = gm.lrd.plan
    assert plan["0"]["ranks"] == [4] and plan["2"]["ranks"] == [8] and plan["3"]["ranks"] == [8]


def test_low_precision_models_keep_dtype():
    for dtype in (torch.bfloat16, torch.float16):
        model = nn.Sequential(nn.Linear(64, 64)).to(dtype)
        x = torch.randn(3, 64, dtype=dtype)
        gm = lrd_fx.compile(model, (x,), rank="full")
        assert all(p.dtype == dtype for p in gm.parameters())
        torch.testing.assert_close(gm(x).float(), model(x).float(), rtol=5e-2, atol=5e-2)


def test_energy_and_vbmf_rules_run():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():   # a rank-6 weight: both rules should find a small rank
        lin.weight.copy_(torch.randn(64, 6) @ torch.randn(6, 64))
    model = nn.Sequential(lin)
    x = torch.randn(2, 64)
    gm_e = lrd_fx.compile(model, (x,), energy=0.999)
    assert gm_e.lrd.plan["0"]["ranks"][0] <= 6
    gm_v = lrd_fx.compile(model, (x,), rank="vbmf")
    assert 1 <= gm_v.lrd.plan["0"]["ranks"][0] <= 8
    torch.testing.assert_close(gm_e(x), model(x), rtol=1e-3, atol=1e-3)


# --- one rule, one implementation: decompose asks factorize/modules.py ----------------------------

class _Mixed(nn.Module):
    """A 1x1 conv, a kxk conv (in != out, so (r_in, r_out) differ), an HF Conv1D and a Linear."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.pw = nn.Conv2d(24, 40, 1)
        self.kxk = nn.Conv2d(40, 24, 3, padding=1)
        self.hf = Conv1D(48, 24)                  # nf=out=48, nx=in=24: weight stored [in, out]
        self.lin = nn.Linear(48, 32)

    def forward(self, x):
        return self.lin(self.hf(self.kxk(self.pw(x)).mean((2, 3))))


@pytest.mark.parametrize("rule", [dict(ratio=0.3), dict(energy=0.8), dict(rank="vbmf")], ids=lambda r: next(iter(r)))
@pytest.mark.parametrize("conv_scheme", ["tucker2", "conv_svd"])
def test_ranks_are_the_factorizer_rules(rule, conv_scheme):
    from lrd_fx.factorize import modules as fm
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(2, 24, 6, 6)
    gm = lrd_fx.compile(model, (x,), conv_scheme=conv_scheme, progress=False, **rule)
    recs = gm.lrd.records()
    for name in ("pw", "kxk", "hf", "lin"):
        m = model.get_submodule(name)
        if "ratio" in rule:
            want = fm.ranks_for_ratio(m, conv_scheme, rule["ratio"])
        elif "energy" in rule:
            want = fm.ranks_for_energy(m, conv_scheme, rule["energy"])
        else:
            want = fm.ranks_for_vbmf(m, conv_scheme)
        assert recs[name].estimate == list(want), name
        assert recs[name].scheme == fm.effective_scheme(m, conv_scheme)
    assert [recs[n].scheme for n in ("pw", "kxk", "hf", "lin")] == \
        ["svd", conv_scheme, "svd", "svd"]
    if "ratio" in rule:   # every layer saves parameters at ratio 0.3: the chains are built at those ranks
        assert all(recs[n].decision == "decomposed" for n in ("pw", "kxk", "hf", "lin"))
        if conv_scheme == "tucker2":   # data-flow order: first 1x1 40 -> r_in, core r_in -> r_out
            r_in, r_out = recs["kxk"].ranks
            assert r_in > r_out     # 40 in, 24 out: the balanced ranks keep r_in/40 ~ r_out/24
            assert gm.get_submodule("kxk.first").out_channels == r_in
            assert gm.get_submodule("kxk.core").out_channels == r_out
        else:
            assert gm.get_submodule("kxk.first").kernel_size == (3, 3)


def test_svd_conv_scheme_is_an_alias_of_conv_svd():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 1))
    x = torch.randn(1, 16, 6, 6)
    gm = lrd_fx.compile(model, (x,), ratio=0.25, conv_scheme="svd", progress=False)
    assert gm.lrd.config.conv_scheme == "conv_svd"
    recs = gm.lrd.records()
    assert recs["0"].scheme == "conv_svd" and recs["1"].scheme == "svd"   # what each layer got
    assert "Conv2d/conv_svd" in gm.lrd.report()
    ref = lrd_fx.compile(model, (x,), ratio=0.25, conv_scheme="conv_svd", progress=False)
    assert ref.lrd.plan == gm.lrd.plan
    with pytest.raises(lrd_fx.ConfigError, match="conv_svd"):
        lrd_fx.compile(model, (x,), conv_scheme="cp")
