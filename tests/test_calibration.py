"""Data-aware factorization: whitened SVD/Tucker-2 math, compile(calibration=...), energy/time+error, BN."""
import copy

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.cost.timer import use_cost_fn
from lrd_fx.factorize import modules as fm
from lrd_fx.factorize.whiten import (CHANNEL, IM2COL, LINEAR, InputStats, Whitening, damped, features,
                                     output_error, whitened_svd_split)
from lrd_fx.factorize import FactorChain
from conftest import state_hash


def correlated(n, d, decay=3.0, gen=None):
    """Samples whose second moment spans decades (like real activations): whitening has something to use."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    return (torch.randn(n, d, generator=gen) * torch.logspace(0, -decay, d)) @ q.T


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def stats_of(x, view=LINEAR, **kw):
    f = features(x, view, **kw)
    st = InputStats(f.shape[1], view)
    st.update(f)
    return st


# --- tensor math ---------------------------------------------------------------------------------

def test_whitened_svd_is_the_optimal_output_fit():
    w = torch.randn(24, 40, dtype=torch.float64)
    x = correlated(4000, 40, decay=2.0).double()
    st = stats_of(x)
    r = 6
    left, right, reg = whitened_svd_split(w, r, Whitening(st, damping=1e-9))
    approx = left.double() @ right.double()
    # reference: truncated SVD of W C^1/2, mapped back with C^-1/2
    c = st.second_moment
    ev, q = torch.linalg.eigh(c)
    root, inv = (q * ev.sqrt()) @ q.T, (q * ev.rsqrt()) @ q.T
    u, s, vt = torch.linalg.svd(w @ root)
    ref = (u[:, :r] * s[:r]) @ vt[:r] @ inv
    torch.testing.assert_close(approx, ref, atol=2e-4, rtol=1e-3)
    plain = fm.svd_split(w.float(), r)
    assert output_error(w, approx, st) < 0.8 * output_error(w, plain[0].double() @ plain[1].double(), st)
    assert not reg.deficient


def test_rank_deficient_statistics_are_damped_and_flagged():
    x = correlated(10, 32)                       # 10 samples, 32 features
    st = stats_of(x)
    d = damped(st.second_moment, 0.01, st.n)
    assert d.deficient and d.numerical_rank <= 10 and d.delta > 0
    assert bool(torch.linalg.eigvalsh(d.matrix).min() > 0)
    w = torch.randn(16, 32)
    left, right, _ = whitened_svd_split(w, 4, Whitening(st))
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


def test_im2col_view_reproduces_the_conv():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=False)
    x = torch.randn(2, 3, 7, 7)
    f = features(x, IM2COL, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                 dilation=conv.dilation)
    y = conv(x).detach()
    y2 = (f @ conv.weight.detach().reshape(5, -1).double().T).reshape(2, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(y2.float(), y, atol=1e-5, rtol=1e-5)
    assert features(x, CHANNEL).shape == (2 * 49, 3)


@pytest.mark.parametrize("scheme,view,ranks", [("tucker2", CHANNEL, (4, 5)), ("svd", IM2COL, (5,))])
def test_whitened_conv_beats_plain_and_is_exact_at_full_rank(scheme, view, ranks):
    conv = nn.Conv2d(12, 16, 3, padding=1)
    x = correlated(20 * 64, 12).reshape(20, 8, 8, 12).permute(0, 3, 1, 2).contiguous()
    st = stats_of(x, view, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation)
    wh = Whitening(st, damping=1e-6)
    with torch.no_grad():
        y = conv(x)
        plain = fm.factorize(conv, ranks, scheme)(x)
        aware = fm.factorize(conv, ranks, scheme, whiten=wh)(x)
        full = fm.factorize(conv, fm.full_ranks(conv, scheme), scheme, whiten=wh)(x)
    assert rel_err(aware, y) < 0.8 * rel_err(plain, y)
    torch.testing.assert_close(full, y, atol=1e-4, rtol=1e-4)


def test_linear_bias_absorbs_the_mean_error():
    lin = nn.Linear(20, 12)
    x = correlated(500, 20) + 3.0                # large mean: the rank-2 fit cannot hold it all
    st = InputStats(20, LINEAR)
    st.update_pair(features(x, LINEAR), features(x + 0.5, LINEAR))   # the compressed model's input drifted
    chain = fm.factorize(lin, 2, whiten=Whitening(st))
    with torch.no_grad():
        err = (chain(x + 0.5) - lin(x)).mean(0)
    assert float(err.abs().max()) < 1e-3        # mean output error folded into the bias


def test_wrong_statistics_are_refused():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    st = stats_of(torch.randn(2, 8, 5, 5), CHANNEL)
    with pytest.raises(lrd_fx.FactorizationError, match="per-channel"):
        fm.factorize(conv, (4,), "svd", whiten=Whitening(st))
    with pytest.raises(lrd_fx.InputError):
        InputStats(7, LINEAR).update(torch.randn(3, 8).double())


# --- compile(calibration=...) --------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, 48), nn.Linear(48, 48), nn.Linear(48, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _data(n=6, bs=64, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -3, d)
    return [torch.randn(bs, d, generator=g) @ mix.T for _ in range(n)]


@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_compile_with_calibration_beats_plain_at_equal_params(mode):
    model = MLP().eval()
    before = state_hash(model)
    calib, test = _data(), _data(seed=1)[0]
    plain = lrd_fx.compile(model, (test[:2],), ratio=0.3, progress=False)
    aware = lrd_fx.compile(model, (test[:2],), ratio=0.3, progress=False, calibration=calib, calibration_mode=mode)
    assert state_hash(model) == before                               # caller's model untouched
    assert not any(m._forward_pre_hooks for m in model.modules())   # no hook left behind
    assert sum(p.numel() for p in aware.parameters()) == sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        y = model(test)
        assert rel_err(aware(test), y) < 0.85 * rel_err(plain(test), y)
    plan = aware.lrd.plan
    assert all(f"data-aware ({'one-shot' if mode == 'oneshot' else 'sequential'})" in plan[n]["reason"]
               for n in ("a", "b", "c"))
    assert "calibration: 6 batch(es)" in aware.lrd.report()


def test_sequential_uses_compressed_inputs_and_original_targets():
    model = MLP().eval()
    calib, test = _data(n=8), _data(seed=2)[0]
    errs = {}
    for mode in ("oneshot", "sequential"):
        gm = lrd_fx.compile(model, (test[:2],), ratio=0.2, progress=False, calibration=calib, calibration_mode=mode)
        with torch.no_grad():
            errs[mode] = rel_err(gm(test), model(test))
    assert errs["sequential"] < errs["oneshot"]


def test_rank_deficient_calibration_is_reported():
    model = MLP().eval()
    gm = lrd_fx.compile(model, (torch.randn(2, 32),), ratio=0.3, progress=False, calibration=[torch.randn(4, 32)])
    rep = gm.lrd.report()
    assert "rank-deficient input statistics" in rep and "calibration_damping=0.01" in rep


def test_calibration_accepts_kwargs_batches_and_untraceable_models():
    from conftest import Wrapper
    model = Wrapper().eval()
    calib = _data(n=3)
    gm = lrd_fx.compile(model, (calib[0][:2],), ratio=0.3, progress=False, calibration=iter(calib))
    assert gm.lrd.fallback_parts                                     # root stayed eager
    assert all("data-aware" in r["reason"] for r in gm.lrd.plan.values() if r["decision"] == "decomposed")


def test_energy_uses_output_energy_with_calibration():
    lin = nn.Sequential(nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.linalg.qr(torch.randn(32, 32))[0])   # flat spectrum: weight energy needs r=29
    x = torch.zeros(64, 32)
    x[:, :3] = torch.randn(64, 3)                                      # but the data lives in 3 dimensions
    plain = lrd_fx.compile(lin, (x[:2],), energy=0.9, progress=False)
    aware = lrd_fx.compile(lin, (x[:2],), energy=0.9, progress=False, calibration=[x], calibration_damping=1e-6)
    assert plain.lrd.plan["0"]["decision"] == "skipped" or plain.lrd.plan["0"]["estimate"][0] >= 28
    assert aware.lrd.plan["0"]["ranks"][0] <= 3
    with torch.no_grad():
        assert rel_err(aware(x), lin(x)) < 0.35


def test_time_error_search_measures_output_error():
    from lrd_fx.passes.calibrate import WhitenedWeight, error_source
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    x = torch.zeros(64, 32)
    x[:, :4] = torch.randn(64, 4)
    seen = []

    def cost(module, shape, mode):
        seen.append(shape)
        return 1.0 if not isinstance(module, FactorChain) else 0.5
    with use_cost_fn(cost):
        gm = lrd_fx.compile(model, (x[:2],), ratio=0.3, rank_search="infer", rank_search_objective="time+error",
                            progress=False, calibration=[x], cache=False)
    searched = [r for r in gm.lrd.plan.values() if r["decision"] == "searched"]
    assert seen and len(searched) == 2            # chains cost half the original: both layers are searched
    assert all("data-aware" in r["reason"] for r in searched)


def test_error_source_is_whitened_weight():
    from lrd_fx.config import Config
    from lrd_fx.context import CompileContext
    from lrd_fx.passes.calibrate import WhitenedWeight, error_source
    lin = nn.Linear(8, 8)
    ctx = CompileContext(config=Config(), model=lin)
    ctx.originals["l"] = lin
    assert error_source(ctx, "l") is lin                               # no calibration: the weight itself
    ctx.calibration_stats = {"l": stats_of(torch.randn(100, 8) * 2)}
    src = error_source(ctx, "l")
    assert isinstance(src, WhitenedWeight) and src.weight.shape == (8, 8)
    assert not torch.allclose(src.weight, lin.weight.detach())


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=False)

    def forward(self, x):
        return self.conv3(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def test_batchnorm_recalibrated_from_the_calibration_batches():
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.fill_(5.0)                                # stale statistics
    model.eval()
    calib = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    gm = lrd_fx.compile(model, (calib[0][:1],), ratio=0.5, min_channels=3, progress=False, calibration=calib)
    assert float(gm.bn2.running_mean.abs().max()) < 4.0
    assert "BatchNorm statistics re-estimated" in gm.lrd.report()
    kept = lrd_fx.compile(model, (calib[0][:1],), ratio=0.5, min_channels=3, progress=False, calibration=calib,
                          recalibrate_bn=False)
    torch.testing.assert_close(kept.bn2.running_mean, model.bn2.running_mean)
    assert isinstance(gm.conv2, FactorChain) and gm.lrd.plan["conv2"]["scheme"] == "tucker2"
    assert model.bn1.running_mean[0] == 5.0                            # caller's model untouched


def test_calibrated_model_saves_and_loads(tmp_path):
    model = MLP().eval()
    calib = _data(n=2)
    gm = lrd_fx.compile(model, (calib[0][:2],), ratio=0.3, progress=False, calibration=calib)
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(model, tmp_path / "m.lrd")
    with torch.no_grad():
        torch.testing.assert_close(back(calib[0]), gm(calib[0]))


def test_bad_calibration_options_raise_lrd_errors():
    model = MLP()
    x = torch.randn(2, 32)
    with pytest.raises(lrd_fx.InputError, match="no batch"):
        lrd_fx.compile(model, (x,), calibration=[])
    with pytest.raises(lrd_fx.InputError, match="calibration"):
        lrd_fx.compile(model, (x,), calibration=[torch.randn(4, 7)], progress=False)
    with pytest.raises(lrd_fx.InputError, match="iterable"):
        lrd_fx.compile(model, (x,), calibration=3)
    with pytest.raises(lrd_fx.ConfigError, match="calibration_mode"):
        lrd_fx.compile(model, (x,), calibration=[x], calibration_mode="greedy")
    with pytest.raises(lrd_fx.ConfigError, match="calibration_damping"):
        lrd_fx.compile(model, (x,), calibration=[x], calibration_damping=0)
    with pytest.raises(lrd_fx.ConfigError, match="recalibrate_bn"):
        lrd_fx.compile(model, (x,), recalibrate_bn="yes")
