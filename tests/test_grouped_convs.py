"""Grouped convolutions (ResNeXt, RegNet, NFNet) with decompose_grouped=True: each group factorized on its own,
every factor a conv with the layer's groups; depthwise and narrow groups stay as they are, with the reason.
By default they stay, with the option named."""
import pytest
import torch
import torch.nn as nn

import lrd_fx
from conftest import state_hash
from lrd_fx.cost.timer import use_cost_fn
from lrd_fx.factorize import modules as fm
from lrd_fx.passes.search_ranks import _signature


class Block(nn.Module):
    """A ResNeXt-style bottleneck: 1x1, grouped 3x3 (4 groups of 16), BatchNorm, 1x1; then a depthwise 3x3."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(24, 64, 1, bias=False)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.expand = nn.Conv2d(64, 32, 1, groups=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.expand(torch.relu(self.bn(self.grouped(torch.relu(self.reduce(x))))))
        return self.head(self.dw(y).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = Block()
    with torch.no_grad():                   # BatchNorm statistics that are not the identity
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


X = torch.randn(2, 24, 8, 8)


@pytest.mark.parametrize("scheme", ["tucker2", "conv_svd"])
def test_grouped_convs_are_exact_at_full_rank_and_keep_their_groups(scheme):
    model = _model()
    before = state_hash(model)
    gm = lrd_fx.compile(model, (X,), rank="full", conv_scheme=scheme, decompose_grouped=True, progress=False)
    assert state_hash(model) == before
    plan = gm.lrd.plan
    assert plan["grouped"]["decision"] == plan["expand"]["decision"] == "decomposed"
    assert plan["grouped"]["full_ranks"] == ([16, 16] if scheme == "tucker2" else [16])    # per group
    assert all(f.groups == 4 for f in gm.get_submodule("grouped").children())
    assert all(f.groups == 2 for f in gm.get_submodule("expand").children())
    assert gm.get_submodule("grouped").groups == 4        # the chain keeps the layer's face
    torch.testing.assert_close(gm(X), model(X), rtol=1e-4, atol=1e-5)
    x2 = torch.randn(3, 24, 5, 7)
    torch.testing.assert_close(gm(x2), model(x2), rtol=1e-4, atol=1e-5)
    # the chain's weight is the product of its factors, in the layer's own [out, in / groups, k, k]
    torch.testing.assert_close(gm.get_submodule("grouped").weight, model.grouped.weight, rtol=1e-4, atol=1e-5)


def test_by_default_grouped_convs_stay_and_the_reason_names_the_option():
    gm = lrd_fx.compile(_model(), (X,), ratio=0.5, progress=False)
    for name in ("grouped", "expand"):
        assert gm.lrd.plan[name]["decision"] == "skipped"
        assert "decompose_grouped=False" in gm.lrd.plan[name]["reason"]
    assert gm.lrd.plan["reduce"]["decision"] == "decomposed"
    assert isinstance(gm.get_submodule("grouped"), nn.Conv2d)
    # the summary counts them (9,216 + 1,056 parameters) and names the option; the depthwise conv is not
    # one of them: the option would not factorize it
    row = next(line for line in gm.lrd.report().splitlines() if line.startswith("grouped convs kept"))
    assert row.split()[3:] == ["2", "(10,272", "params)", "decompose_grouped=True", "factorizes", "them"]
    asked = lrd_fx.compile(_model(), (X,), ratio=0.5, decompose_grouped=True, progress=False).lrd.report()
    assert "grouped convs kept" not in asked


def test_depthwise_and_narrow_groups_stay_with_the_reason():
    gm = lrd_fx.compile(_model(), (X,), ratio=0.5, decompose_grouped=True, progress=False)
    dw = gm.lrd.plan["dw"]
    assert dw["decision"] == "skipped"
    assert "per group=1 < min_channels=8 (groups=32, depthwise)" in dw["reason"]
    narrow = lrd_fx.compile(_model(), (X,), ratio=0.5, min_channels=20, decompose_grouped=True,
                            progress=False).lrd.plan["grouped"]
    assert narrow["decision"] == "skipped" and "per group=16 < min_channels=20 (groups=4)" in narrow["reason"]


def test_ratio_counts_the_parameters_of_every_group():
    model = _model()
    gm = lrd_fx.compile(model, (X,), ratio=0.5, decompose_grouped=True, progress=False)
    for name in ("grouped", "expand"):
        rec, orig = gm.lrd.plan[name], model.get_submodule(name)
        chain = gm.get_submodule(name)
        got = sum(p.numel() for p in chain.parameters())
        assert rec["params_after"] == got == fm.chain_params(orig, rec["ranks"], rec["scheme"])
        assert got <= 0.5 * orig.weight.numel() + (orig.bias.numel() if orig.bias is not None else 0)
        assert rec["params_before"] == sum(p.numel() for p in orig.parameters())
    # ranks per group: the ratio rule on one group's [16, 16, 3, 3] slice
    assert tuple(gm.lrd.plan["grouped"]["ranks"]) == fm.ranks_for_ratio(nn.Conv2d(16, 16, 3), "tucker2", 0.5)


def test_energy_keeps_what_every_group_needs():
    """One group is rank 2, the others full: the energy rule keeps the rank the full groups need."""
    conv = nn.Conv2d(32, 32, 1, groups=4, bias=False)
    with torch.no_grad():
        w = conv.weight.reshape(4, 8, 8)
        w[0] = torch.randn(8, 2) @ torch.randn(2, 8)
    per_group = []
    for i in range(4):
        one = nn.Conv2d(8, 8, 1, bias=False)
        with torch.no_grad():
            one.weight.copy_(conv.weight[8 * i:8 * (i + 1)])
        per_group.append(fm.ranks_for_energy(one, "svd", 0.999)[0])
    assert per_group[0] <= 2 < max(per_group)
    assert fm.ranks_for_energy(conv, "svd", 0.999) == (max(per_group),)


def test_saved_trained_and_fused_like_any_layer(tmp_path):
    model = _model()
    gm = lrd_fx.compile(model, (X,), ratio=0.5, freeze="sequential", decompose_grouped=True, progress=False)
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in gm.lrd.freezer.epochs(2):
        loss = gm(X).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()
    path = tmp_path / "m.lrd"
    lrd_fx.save(gm, path)
    loaded = lrd_fx.load(_model(), path)
    assert all(f.groups == 4 for f in loaded.get_submodule("grouped").children())
    torch.testing.assert_close(loaded(X), gm(X), rtol=0, atol=0)
    fused = lrd_fx.fuse(loaded)
    torch.testing.assert_close(fused(X), loaded(X), rtol=1e-4, atol=1e-5)
    assert "bn" not in dict(fused.named_modules())            # folded into the grouped chain's last factor


def test_the_search_times_grouped_candidates_under_their_own_signature():
    assert _signature(nn.Conv2d(64, 64, 3, groups=2), "tucker2") != _signature(nn.Conv2d(32, 64, 3), "tucker2")
    assert _signature(nn.Conv2d(32, 64, 3), "tucker2") == "|".join(
        ["Conv2d", "64x32x3x3", "bias=True", "tucker2", "stride=(1, 1)", "padding=(0, 0)", "dilation=(1, 1)",
         "padding_mode=zeros"])                                  # groups=1 keys stay as they were

    def cost(module, shape, mode):
        """Chains of the grouped layer are cheaper the lower their per-group rank; the original costs 10."""
        if isinstance(module, nn.Conv2d) and module.groups == 4 and module.out_channels == 64:
            return 10.0
        if hasattr(module, "scheme") and getattr(module[0], "groups", 1) == 4:
            return float(module[0].out_channels // 4)          # first factor: r_in per group x 4 groups
        return 1.0

    with use_cost_fn(cost):
        gm = lrd_fx.compile(_model(), (X,), ratio=0.5, rank_search="infer", decompose_grouped=True, progress=False)
    rec = gm.lrd.plan["grouped"]
    assert rec["decision"] == "searched" and rec["candidates"]
    assert all(f.groups == 4 for f in gm.get_submodule("grouped").children())
    # every candidate was timed as a grouped chain whose first factor has 4 groups of r_in channels
    assert len(rec["candidates"]) >= 3
    assert all(t == int(key.split("/")[0]) for key, t in rec["candidates"].items())
    assert "/".join(map(str, rec["ranks"])) in rec["candidates"]


def test_grouped_statistics_are_the_diagonal_blocks_of_the_whole_layers():
    from lrd_fx.factorize.whiten import IM2COL, InputStats
    x, x_ref = torch.randn(50, 12, dtype=torch.float64), torch.randn(50, 12, dtype=torch.float64)
    whole, grouped = InputStats(12, IM2COL), InputStats(12, IM2COL, groups=3)
    whole.update_pair(x_ref, x)
    grouped.update_pair(x_ref, x)
    for i in range(3):
        block = slice(4 * i, 4 * i + 4)
        part = grouped.group(i)
        assert part.dim == 4 and part.n == 50
        torch.testing.assert_close(part.second_moment, whole.second_moment[block, block])
        torch.testing.assert_close(part.cross_moment, whole.cross_moment[block, block])
        torch.testing.assert_close(part.mean, whole.mean[block])
        torch.testing.assert_close(part.ref_mean, whole.ref_mean[block])


@pytest.mark.parametrize("scheme", ["tucker2", "conv_svd"])
@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_calibration_fits_each_group_to_its_own_inputs(scheme, mode):
    """Inputs concentrated in a few directions per group: the data-aware fit of the grouped layer has a lower
    output error on that data than the weight-only factorization at the same ranks."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=4)).eval()
    mix = torch.randn(64, 3)            # the inputs' 64 channels mix 3 sources: each group's live in 3 directions

    def batch():
        return (torch.einsum("oc,bchw->bohw", mix, torch.randn(8, 3, 8, 8)),)

    batches = [batch() for _ in range(4)]
    common = dict(rank=6, conv_scheme=scheme, decompose_grouped=True, progress=False)
    data = lrd_fx.compile(model, batches[0], calibration=batches, calibration_mode=mode, **common)
    plain = lrd_fx.compile(model, batches[0], **common)
    assert f"data-aware ({'one-shot' if mode == 'oneshot' else mode})" in data.lrd.plan["0"]["reason"]
    assert all(f.groups == 4 for f in data.get_submodule("0").children())
    test = batch()[0]
    ref = model(test)

    def err(gm):
        return float((gm(test) - ref).norm() / ref.norm())

    assert err(data) < 0.8 * err(plain)


@pytest.mark.parametrize("scheme", ["conv_svd", "tucker2"])
def test_the_searchs_error_of_a_grouped_conv_is_its_groups_error(scheme):
    """The error the search trades time against ("time+error"): for SVD exactly the factorized layer's
    relative weight error, summed over groups (not the SVD of the groups' weights stacked); Tucker-2's bound
    holds above it."""
    from lrd_fx.passes.search_ranks import rank_errors
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, groups=4, bias=False)
    with torch.no_grad():
        conv.weight[:8] *= 10                       # one loud group: its error dominates
    for ranks in ([(2,), (5,), (8,)] if scheme == "conv_svd" else [(3, 3), (6, 5), (8, 8)]):
        chain = fm.factorize_conv(conv, ranks, scheme)
        actual = float((chain.weight - conv.weight).norm() / conv.weight.norm())
        got = rank_errors(conv, scheme, [ranks])[ranks]
        if scheme == "conv_svd":
            assert got == pytest.approx(actual, rel=1e-4, abs=1e-6)
        else:
            assert actual <= got + 1e-6


def test_a_rank_above_a_groups_full_rank_says_ranks_count_per_group():
    from lrd_fx.errors import RankError
    with pytest.raises(RankError, match=r"rank \(per group of groups=4: weight \[8, 8, 3, 3\]\)=12 is out of range; "
                                        r"valid values are 1\.\.8"):
        fm.factorize_conv(nn.Conv2d(32, 32, 3, groups=4), (12,), "conv_svd", name="g")
