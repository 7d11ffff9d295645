"""allocate pass (calibration_allocate="sensitivity"): a ratio's parameters shared by output sensitivity."""
import copy
import re

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.errors import ConfigError
from lrd_fx.factorize import modules as fm
from lrd_fx.passes.allocate import FRACTIONS, allocate_ranks, candidate_ranks


class TwoBranch(nn.Module):
    """out = quiet(x) + 10 * loud(x): the same shapes, but an error in `loud` moves the output 10x more.
    `quiet` comes first, in definition and call order, so an allocation blind to the errors (every gain
    equal) would favour it."""

    def __init__(self, d=64):
        super().__init__()
        self.quiet = nn.Linear(d, d)
        self.loud = nn.Linear(d, d)

    def forward(self, x):
        return self.quiet(x) + 10.0 * self.loud(x)


def data(seed, n=4, b=64, d=64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    return [torch.randn(b, d, generator=g) @ mix + 0.1 * torch.randn(b, d, generator=g) for _ in range(n)]


def rel_error(model, ref, batches):
    with torch.no_grad():
        num = sum(float((model(x) - ref(x)).pow(2).sum()) for x in batches)
        den = sum(float(ref(x).pow(2).sum()) for x in batches)
    return num / den


def factor_params(gm, names):
    return sum(p.numel() for n in names for p in gm.get_submodule(n).parameters())


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_sensitive_layer_gets_more_rank_at_no_more_parameters(mode):
    torch.manual_seed(0)
    model = TwoBranch().eval()
    before = copy.deepcopy(model.state_dict())
    calib, held_out = data(1), data(2)
    kw = dict(ratio=0.25, calibration=calib, calibration_mode=mode, progress=False)
    uniform = lrd_fx.compile(model, (calib[0][:2],), **kw)
    shared = lrd_fx.compile(model, (calib[0][:2],), calibration_allocate="sensitivity", **kw)
    ru, rs = uniform.lrd.plan, shared.lrd.plan
    assert ru["loud"]["ranks"] == ru["quiet"]["ranks"]
    assert rs["loud"]["ranks"][0] > ru["loud"]["ranks"][0] > rs["quiet"]["ranks"][0]
    assert factor_params(shared, ["loud", "quiet"]) <= factor_params(uniform, ["loud", "quiet"])
    # the point of it: a smaller output error, on the calibration data and on data it never saw
    assert rel_error(shared, model, calib) < 0.9 * rel_error(uniform, model, calib)
    assert rel_error(shared, model, held_out) < 0.9 * rel_error(uniform, model, held_out)
    assert "by output sensitivity" in rs["loud"]["reason"]
    note = next(line for line in shared.lrd.report().splitlines() if "calibration_allocate='sensitivity'" in line)
    assert "2 layers measured" in note
    allocated, uniform_sum = (float(v) for v in re.search(r"output error (\S+) \(uniform (\S+)\)", note).groups())
    assert 0 < allocated < uniform_sum
    for k, v in model.state_dict().items():   # the caller's model is untouched
        assert torch.equal(v, before[k])


def test_allocate_batches_bounds_the_measurement():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    calib = data(1)
    gm = lrd_fx.compile(model, (calib[0][:2],), ratio=0.25, calibration=calib, calibration_mode="oneshot",
                        calibration_allocate="sensitivity", calibration_allocate_batches=1, progress=False)
    assert "on 1 batch(es)" in gm.lrd.report()


def test_allocate_ranks_takes_the_best_gain_per_parameter_within_budget():
    costs = {"a": [10, 20, 30], "b": [10, 20, 30]}
    errors = {"a": [1.0, 0.5, 0.4], "b": [0.2, 0.1, 0.05]}
    assert allocate_ranks(costs, errors, budget=40) == {"a": 1, "b": 1}   # a: +0.05/param, then b +0.01
    assert allocate_ranks(costs, errors, budget=30) == {"a": 1, "b": 0}
    assert allocate_ranks(costs, errors, budget=20) == {"a": 0, "b": 0}   # nothing fits
    # a late drop is reached by skipping a flat step; an error that rises counts as no gain
    assert allocate_ranks({"a": [10, 20, 30]}, {"a": [1.0, 1.0, 0.0]}, budget=30) == {"a": 2}
    assert allocate_ranks({"a": [10, 20], "b": [10, 20]}, {"a": [1.0, 1.1], "b": [1.0, 0.9]}, budget=30) == \
        {"a": 0, "b": 1}


def test_candidates_save_parameters_include_the_uniform_ranks_and_align():
    lin = nn.Linear(64, 48)
    full = lin.weight.numel() + lin.bias.numel()
    c = candidate_ranks(lin, "svd", (20,))
    assert (20,) in c and len(c) <= len(FRACTIONS)
    params = [fm.chain_params(lin, r, "svd") for r in c]
    assert params == sorted(params) and max(params) < full   # 1.5 x 20 = 30 would not save: dropped
    assert all(r[0] % 8 == 0 for r in candidate_ranks(lin, "svd", (16,), align=8))
    conv = nn.Conv2d(32, 64, 3)
    t = candidate_ranks(conv, "tucker2", (8, 16))
    assert (4, 8) in t and (8, 16) in t   # both ranks of the pair scaled together


def test_config_errors():
    model = TwoBranch()
    x = data(1)
    with pytest.raises(ConfigError, match="calibration=batches"):
        lrd_fx.compile(model, (x[0][:2],), calibration_allocate="sensitivity", progress=False)
    with pytest.raises(ConfigError, match="energy"):
        lrd_fx.Config(energy=0.9, calibration_allocate="sensitivity")
    with pytest.raises(ConfigError, match="rank="):
        lrd_fx.Config(rank=8, calibration_allocate="sensitivity")
    with pytest.raises(ConfigError, match="calibration_allocate"):
        lrd_fx.Config(calibration_allocate="greedy")
    with pytest.raises(ConfigError, match="calibration_allocate_batches"):
        lrd_fx.Config(calibration_allocate_batches=0)


class ConvNet(nn.Module):
    """Tucker-2 convs with BatchNorm; `loud` feeds the output with ten times the weight of `quiet`."""

    def __init__(self, c=24):
        super().__init__()
        self.quiet = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.loud = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.quiet(x) + 10.0 * self.loud(x)


def test_tucker2_convs_with_batchnorm_and_a_rank_search_after_it():
    from lrd_fx.cost.timer import use_cost_fn
    from lrd_fx.factorize.chain import FactorChain
    torch.manual_seed(0)
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(8, 24, 6, 6, generator=g) for _ in range(3)]
    kw = dict(ratio=0.3, calibration=calib, calibration_mode="oneshot", progress=False)
    uniform = lrd_fx.compile(model, (calib[0][:2],), **kw)
    shared = lrd_fx.compile(model, (calib[0][:2],), calibration_allocate="sensitivity", **kw)
    ru, rs = uniform.lrd.plan, shared.lrd.plan
    assert rs["loud.0"]["ranks"] != ru["loud.0"]["ranks"] and len(rs["loud.0"]["ranks"]) == 2
    assert sum(rs["loud.0"]["ranks"]) > sum(rs["quiet.0"]["ranks"])
    names = ["loud.0", "quiet.0"]
    assert factor_params(shared, names) <= factor_params(uniform, names)
    shared.eval()
    assert rel_error(shared, model, calib) < rel_error(uniform.eval(), model, calib)

    def cost(module, shape, mode):   # every chain costs the same and beats the original: nothing moves
        return 1.0 if isinstance(module, FactorChain) else 10.0
    with use_cost_fn(cost):
        searched = lrd_fx.compile(model, (calib[0][:2],), calibration_allocate="sensitivity",
                                  rank_search="infer", rank_search_window=0.1, **kw)
    for n in names:   # the search starts from the allocated ranks and keeps them under a flat cost
        assert searched.lrd.plan[n]["ranks"] == rs[n]["ranks"], n


def test_outputs_too_big_to_keep_are_recomputed_with_the_same_result(monkeypatch):
    import lrd_fx.passes.allocate as allocate_mod
    torch.manual_seed(0)
    model = TwoBranch().eval()
    calib = data(1)
    kw = dict(ratio=0.25, calibration=calib, calibration_mode="oneshot", calibration_allocate="sensitivity",
              progress=False)
    kept = lrd_fx.compile(model, (calib[0][:2],), **kw)
    monkeypatch.setattr(allocate_mod, "MAX_STORED_OUTPUT_BYTES", 0)   # the original's outputs run again each time
    again = lrd_fx.compile(model, (calib[0][:2],), **kw)
    for n in ("loud", "quiet"):
        assert again.lrd.plan[n]["ranks"] == kept.lrd.plan[n]["ranks"]
    note = [line for line in again.lrd.report().splitlines() if "calibration_allocate=" in line]
    assert note == [line for line in kept.lrd.report().splitlines() if "calibration_allocate=" in line]
