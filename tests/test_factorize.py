"""Tests of lrd_fx.factorize: exactness at full rank, rank rules, errors, dtypes."""
import threading

import pytest
import torch
import torch.nn as nn

from lrd_fx.errors import ConfigError, FactorizationError, LRDError, RankError
from lrd_fx.factorize import (chain_like, chain_params, effective_scheme, energy_rank, evbmf_rank,
                              factorize, factorize_conv, factorize_linear, factorize_many, full_ranks, ranks_for_energy,
                              ranks_for_ratio, ranks_for_vbmf, singular_values, svd_error, svd_params,
                              svd_rank_for_ratio, svd_split, tucker2, tucker2_error, tucker2_params,
                              tucker2_ranks_energy, tucker2_ranks_for_ratio, tucker2_ranks_vbmf,
                              tucker2_reconstruct, unsupported_reason)
from lrd_fx.factorize import modules
from lrd_fx.factorize import FactorChain


def _close(actual, expected, tol=1e-4):
    # Scale the absolute tolerance by the output magnitude: fp32 rounding grows with it.
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _seeded(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()   # unit-scale weights so the tolerance is meaningful
    return module


def _input(conv, size, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    dims = conv.weight.dim() - 2
    return torch.randn(batch, conv.in_channels, *([size] * dims), generator=g)


# --- exactness at full rank -----------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (16, 16)])
def test_linear_full_rank_exact(bias, shape):
    lin = _seeded(nn.Linear(*shape, bias=bias))
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    chain = factorize_linear(lin, full_ranks(lin, "svd")[0], name="fc")
    assert isinstance(chain, FactorChain) and chain.scheme == "svd" and chain.source == "Linear"
    assert chain.roles() == ["first", "last"]
    assert isinstance(chain.first, nn.Linear) and chain.first.bias is None
    assert (chain.last.bias is not None) == bias
    x = torch.randn(5, 3, shape[0])
    _close(chain(x), lin(x))
    # The caller's layer is untouched and shares no storage with the chain.
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])
    if bias:
        assert chain.last.bias.data_ptr() != lin.bias.data_ptr()


CONVS = [
    lambda: nn.Conv1d(6, 10, 3, stride=2, padding=1),
    lambda: nn.Conv1d(6, 10, 5, padding="same", dilation=2, padding_mode="circular", bias=False),
    lambda: nn.Conv1d(5, 7, 4, padding="same"),                     # even kernel: asymmetric 'same'
    lambda: nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), bias=False),
    lambda: nn.Conv2d(8, 12, 3, padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(8, 12, 3, dilation=2, padding=2, padding_mode="circular"),
    lambda: nn.Conv2d(8, 6, 3, padding="valid"),
    lambda: nn.Conv2d(16, 4, 3, stride=2, padding=1, padding_mode="replicate"),
    lambda: nn.Conv2d(3, 16, 7, stride=2, padding=3),               # stem-like: in*k > out
    lambda: nn.Conv2d(2, 32, 2),                                    # out > in*k: Tucker pads factors
    lambda: nn.Conv3d(4, 6, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1)),
    lambda: nn.Conv3d(4, 6, 3, padding=1, padding_mode="replicate", bias=False),
    lambda: nn.Conv3d(4, 6, 3, padding=1, padding_mode="circular"),
    # 1x1 kernels: SVD whatever the scheme, stride/padding on the first factor
    lambda: nn.Conv2d(8, 12, 1, stride=2),
    lambda: nn.Conv2d(12, 8, 1, padding=1),
    lambda: nn.Conv1d(6, 9, 1, padding=2, padding_mode="reflect", bias=False),
    lambda: nn.Conv3d(4, 6, 1, stride=(1, 2, 2)),
    lambda: nn.Conv2d(8, 12, 1, padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("scheme", ["tucker2", "svd"])
@pytest.mark.parametrize("make", CONVS, ids=lambda f: repr(f()))
def test_conv_full_rank_exact(make, scheme):
    conv = _seeded(make())
    chain = factorize_conv(conv, full_ranks(conv, scheme), scheme, name="layer1.conv")
    pointwise = all(k == 1 for k in conv.kernel_size)
    expected = "svd" if pointwise else ("tucker2" if scheme == "tucker2" else "conv_svd")
    assert chain.scheme == expected == effective_scheme(conv, scheme)
    assert chain.source == type(conv).__name__
    assert chain.roles() == (["first", "core", "last"] if expected == "tucker2" else ["first", "last"])
    assert all(type(m) is type(conv) for m in chain.children())
    # Only the last factor carries the bias; exactly one factor does the spatial work.
    assert (chain.last.bias is not None) == (conv.bias is not None)
    assert all(m.bias is None for role, m in chain.named_children() if role != "last")
    spatial = [m for m in chain.children()
               if m.kernel_size != (1,) * len(m.kernel_size) or m.padding not in ("valid", (0,) * len(m.kernel_size))
               or m.stride != (1,) * len(m.stride)]
    assert len(spatial) <= 1
    x = _input(conv, 9)
    _close(chain(x), conv(x))


def test_tucker2_chain_layout():
    conv = _seeded(nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1))
    chain = factorize_conv(conv, (5, 7), "tucker2", name="c")
    assert chain.first.in_channels == 8 and chain.first.out_channels == 5 and chain.first.kernel_size == (1, 1)
    assert chain.core.in_channels == 5 and chain.core.out_channels == 7 and chain.core.kernel_size == (3, 3)
    assert chain.core.stride == (2, 2) and chain.core.padding == (1, 1)
    assert chain.last.in_channels == 7 and chain.last.out_channels == 12
    assert chain_params(conv, (5, 7), "tucker2") == sum(p.numel() for p in chain.parameters())


def test_conv_svd_chain_layout():
    conv = _seeded(nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2), padding_mode="reflect"))
    chain = factorize_conv(conv, (6,), "svd", name="c")
    assert chain.scheme == "conv_svd"
    assert chain.first.kernel_size == (3, 5) and chain.first.stride == (2, 2) and chain.first.padding_mode == "reflect"
    assert chain.first.out_channels == 6 and chain.last.kernel_size == (1, 1) and chain.last.in_channels == 6
    assert chain_params(conv, 6, "svd") == sum(p.numel() for p in chain.parameters())


def test_low_rank_error_decreases_with_rank():
    conv = _seeded(nn.Conv2d(12, 16, 3, padding=1))
    x = _input(conv, 8)
    ref = conv(x).detach()
    errs = [float((factorize_conv(conv, r, "tucker2")(x) - ref).detach().norm()) for r in ((2, 2), (6, 6), (12, 16))]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * float(ref.norm())


def test_train_mode_and_requires_grad_copied():
    lin = nn.Linear(10, 12).eval()
    lin.bias.requires_grad_(False)
    chain = factorize_linear(lin, 4)
    assert not chain.training and not chain.first.training
    assert chain.first.weight.requires_grad and not chain.last.bias.requires_grad


# --- matrix / tensor math -------------------------------------------------------------------------

def test_svd_split_shapes_and_balance():
    torch.manual_seed(0)
    a = torch.randn(30, 20, dtype=torch.float64)
    left, right = svd_split(a, 7)
    assert left.shape == (30, 7) and right.shape == (7, 20)
    assert left.dtype == right.dtype == torch.float32
    # sqrt(S) in both factors: column norms of L equal row norms of R.
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1), rtol=1e-4, atol=1e-5)
    s = singular_values(a)
    assert s.dtype == torch.float32 and bool((s[:-1] >= s[1:]).all())
    err = float((left @ right - a.float()).norm() / a.float().norm())
    assert err == pytest.approx(svd_error(s, 7), rel=1e-3)
    _close(torch.matmul(*svd_split(a, 20)), a.float())


@pytest.mark.parametrize("shape", [(6, 4, 3), (6, 4, 3, 3), (5, 3, 2, 3, 2)])
def test_tucker2_exact_and_bounded(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    core, u_out, u_in = tucker2(w, shape[0], shape[1])
    assert core.shape == shape and u_out.shape == (shape[0],) * 2 and u_in.shape == (shape[1],) * 2
    _close(tucker2_reconstruct(core, u_out, u_in), w)
    core, u_out, u_in = tucker2(w, 3, 2)
    assert core.shape == (3, 2) + shape[2:]
    err = float((tucker2_reconstruct(core, u_out, u_in) - w).norm() / w.norm())
    assert 0 < err <= tucker2_error(w, 3, 2) + 1e-5


@pytest.mark.parametrize("shape,ranks", [((12, 8, 3, 3), (5, 3)), ((6, 10, 5), (6, 10)),
                                         ((4, 3, 2, 3, 2), (2, 2)), ((16, 2, 2, 2), (16, 2))])
def test_tucker2_agrees_with_tensorly(shape, ranks):
    # Both run HOOI from the HOSVD with the same stopping rule: the errors must agree.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    errs = []
    for method in ("hooi", "tensorly"):
        core, u_out, u_in = tucker2(w, *ranks, method=method)
        assert core.shape == ranks + shape[2:] and core.dtype == torch.float32
        # tensorly completes rank-deficient factors in float32 (~1e-4 off orthonormal); ours is float64.
        atol = 1e-5 if method == "hooi" else 1e-3
        torch.testing.assert_close(u_out.T @ u_out, torch.eye(ranks[0]), rtol=0, atol=atol)
        errs.append(float((tucker2_reconstruct(core, u_out, u_in) - w).norm() / w.norm()))
    assert errs[0] == pytest.approx(errs[1], abs=2e-3)


def test_tucker2_leaves_global_state_alone():
    import tensorly as tl
    before, threads = tl.get_backend(), torch.get_num_threads()
    tucker2(torch.randn(4, 3, 3), 2, 2, method="tensorly")
    factorize_conv(nn.Conv2d(8, 8, 3), (4, 4), "tucker2")
    assert tl.get_backend() == before and torch.get_num_threads() == threads
    seen = []
    t = threading.Thread(target=lambda: seen.append(tl.get_backend()))
    t.start(); t.join()
    assert seen == [before]


# --- rank rules -----------------------------------------------------------------------------------

SHAPES = [(64, 64, 1), (64, 128, 9), (256, 64, 9), (3, 64, 49), (512, 2048, 1), (17, 31, 15), (8, 8, 9),
          (1000, 10, 1), (96, 384, 3)]


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("out,inp,k", SHAPES)
def test_ratio_rules_respect_budget(out, inp, k, ratio):
    budget = ratio * out * inp * k
    m, n = out, inp * k
    r = svd_rank_for_ratio(m, n, ratio)
    assert 1 <= r <= min(m, n)
    assert svd_params(m, n, r) <= budget or r == 1
    assert r == min(m, n) or svd_params(m, n, r + 1) > budget      # the largest such rank

    r_in, r_out = tucker2_ranks_for_ratio(out, inp, k, ratio)      # data-flow order
    assert 1 <= r_out <= out and 1 <= r_in <= inp
    p = tucker2_params(out, inp, k, (r_in, r_out))
    assert p == inp * r_in + r_in * r_out * k + r_out * out
    assert p <= budget or (r_in, r_out) == (1, 1)
    # Balanced: the two fractions differ by at most one rank step of the smaller mode.
    assert abs(r_out / out - r_in / inp) <= 1.0 / min(out, inp) + 1e-9 or min(r_out, r_in) == 1
    # Near the bound: one more rank on both modes would exceed it (±1 rounding).
    if r_out < out and r_in < inp:
        assert tucker2_params(out, inp, k, (r_in + 1, r_out + 1)) > budget


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("make", [lambda: nn.Linear(64, 48), lambda: nn.Conv2d(32, 64, 3),
                                  lambda: nn.Conv1d(24, 40, 5, bias=False), lambda: nn.Conv2d(64, 32, 1),
                                  lambda: nn.Conv3d(8, 16, 3)], ids=lambda f: type(f()).__name__)
@pytest.mark.parametrize("scheme", ["tucker2", "svd"])
def test_chain_keeps_ratio_of_params(make, scheme, ratio):
    layer = make()
    ranks = ranks_for_ratio(layer, scheme, ratio)
    bias = layer.bias.numel() if layer.bias is not None else 0
    assert chain_params(layer, ranks, scheme) - bias <= ratio * layer.weight.numel()
    chain = chain_like(layer, ranks, scheme)
    assert sum(p.numel() for p in chain.parameters()) == chain_params(layer, ranks, scheme)


def test_energy_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 -> total 22
    assert energy_rank(s, 16 / 22) == 1
    assert energy_rank(s, 16.5 / 22) == 2
    assert energy_rank(s, 20 / 22) == 2
    assert energy_rank(s, 21 / 22) == 3
    assert energy_rank(s, 1.0) == 4
    assert energy_rank(torch.zeros(5), 0.9) == 1
    with pytest.raises(ConfigError, match="energy"):
        energy_rank(s, 1.5)


def _low_rank(m, n, r, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("m,n,r,noise", [(100, 80, 5, 0.1), (64, 256, 5, 0.5), (300, 200, 12, 1.0),
                                         (128, 512, 20, 0.3)])
def test_evbmf_recovers_rank(m, n, r, noise):
    a = _low_rank(m, n, r, noise)
    assert evbmf_rank(a) == r
    assert evbmf_rank(a.t()) == r


def test_evbmf_pure_noise_and_degenerate():
    g = torch.Generator().manual_seed(0)
    assert evbmf_rank(torch.randn(100, 80, generator=g)) == 1   # nothing above the noise: clamped to 1
    assert evbmf_rank(torch.zeros(10, 12)) == 1
    assert evbmf_rank(torch.ones(1, 12)) == 1


def test_tucker2_rank_rules():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(6, 4, 3, 3, generator=g)
    u_out, u_in = torch.randn(64, 6, generator=g), torch.randn(48, 4, generator=g)
    w = tucker2_reconstruct(core, u_out, u_in)
    assert tucker2_ranks_energy(w, 0.999999) == (4, 6)            # data-flow order (r_in, r_out)
    r_in, r_out = tucker2_ranks_energy(w, 0.5)
    assert 1 <= r_out <= 6 and 1 <= r_in <= 4
    noisy = w + 0.05 * torch.randn(w.shape, generator=g)
    assert tucker2_ranks_vbmf(noisy) == (4, 6)
    conv = nn.Conv2d(48, 64, 3)
    with torch.no_grad():
        conv.weight.copy_(noisy)
    assert ranks_for_vbmf(conv, "tucker2") == (4, 6)
    assert ranks_for_energy(conv, "tucker2", 0.999) == tucker2_ranks_energy(noisy, 0.999)
    assert ranks_for_energy(conv, "svd", 1.0) == (64,)
    assert ranks_for_vbmf(nn.Linear(80, 100), "svd") == (1,)


def test_full_ranks():
    assert full_ranks(nn.Linear(20, 30), "tucker2") == (20,)
    assert full_ranks(nn.Conv2d(8, 12, 1), "tucker2") == (8,)
    assert full_ranks(nn.Conv2d(8, 12, 3), "tucker2") == (8, 12)
    assert full_ranks(nn.Conv2d(8, 12, 3), "svd") == (12,)
    assert full_ranks(nn.Conv2d(2, 32, 2), "svd") == (8,)
    assert full_ranks(nn.Conv1d(4, 30, 5), "conv_svd") == (20,)


@pytest.mark.parametrize("scheme", ["tucker2", "svd"])
def test_chain_like_matches_factorized_architecture(scheme):
    for layer, ranks in [(nn.Linear(20, 30), (7,)), (nn.Conv2d(8, 12, 3, stride=2, padding="valid"), None),
                         (nn.Conv2d(8, 12, 1, padding=1), (5,))]:
        ranks = ranks or ((3, 5) if scheme == "tucker2" else (5,))
        real = factorize(layer, ranks, scheme)
        fake = chain_like(layer, ranks, scheme)
        assert fake.scheme == real.scheme and fake.roles() == real.roles()
        assert [(n, p.shape) for n, p in fake.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
        assert repr(fake) == repr(real)
        x = torch.randn(2, 8, 7, 7) if not isinstance(layer, nn.Linear) else torch.randn(2, 20)
        assert fake(x).shape == real(x).shape == layer(x).shape


# --- dtypes and devices ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["tucker2", "svd"])
def test_low_precision_modules_keep_dtype(dtype, scheme):
    for layer in [nn.Linear(24, 16), nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(8, 12, 1)]:
        layer = _seeded(layer).to(dtype)
        chain = factorize(layer, full_ranks(layer, scheme), scheme, name="half")
        assert all(p.dtype == dtype for p in chain.parameters())
        assert all(p.dtype == dtype for p in chain_like(layer, full_ranks(layer, scheme), scheme).parameters())
        assert layer.weight.dtype == dtype          # the caller's layer is not cast
        x = torch.randn(2, 8, 6, 6) if not isinstance(layer, nn.Linear) else torch.randn(3, 24)
        # Factors are rounded to the low-precision dtype: compare in float32 with a matching tolerance.
        tol = 2e-2 if dtype == torch.float16 else 1e-1
        _close(chain.float()(x), layer.float()(x), tol=tol)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises(bad):
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[2, 3] = bad
    with pytest.raises(FactorizationError, match="encoder.fc"):
        factorize_linear(lin, 2, name="encoder.fc")
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight[0, 0, 1, 1] = bad
    for scheme in ("tucker2", "svd"):
        with pytest.raises(FactorizationError, match="body.conv"):
            factorize_conv(conv, full_ranks(conv, scheme), scheme, name="body.conv")
    with pytest.raises(FactorizationError, match="body.conv"):
        ranks_for_energy(conv, "tucker2", 0.9, name="body.conv")
    with pytest.raises(FactorizationError, match="w1"):
        svd_split(lin.weight, 2, name="w1")


def test_rank_out_of_range_raises():
    lin = nn.Linear(8, 6)
    for r in (0, -1, 7):
        with pytest.raises(RankError, match=r"fc.*1\.\.6"):
            factorize_linear(lin, r, name="fc")
    with pytest.raises(RankError, match="must be an int"):
        factorize_linear(lin, 2.5, name="fc")
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(RankError, match=r"c1.*r_in.*1\.\.4"):
        factorize_conv(conv, (5, 6), "tucker2", name="c1")
    with pytest.raises(RankError, match=r"c1.*r_out.*1\.\.6"):
        factorize_conv(conv, (4, 0), "tucker2", name="c1")
    with pytest.raises(RankError, match=r"c1.*\(r_in, r_out\)"):
        factorize_conv(conv, (4,), "tucker2", name="c1")
    with pytest.raises(RankError, match=r"c1.*1\.\.6"):
        factorize_conv(conv, (7,), "svd", name="c1")
    with pytest.raises(RankError, match="c2"):
        factorize_conv(nn.Conv2d(4, 6, 1), (3, 3), "tucker2", name="c2")
    with pytest.raises(RankError, match="w"):
        tucker2(torch.randn(4, 3, 3), 5, 1, name="w")
    with pytest.raises(RankError):
        svd_split(torch.randn(4, 3), 0)
    with pytest.raises(RankError):
        chain_like(conv, (0, 3), "tucker2")
    assert issubclass(RankError, LRDError) and issubclass(FactorizationError, LRDError)


def test_unsupported_layers_raise():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    assert "overrides" in unsupported_reason(PaddedConv(4, 4, 3))
    with pytest.raises(FactorizationError, match="pc"):
        factorize_conv(PaddedConv(4, 4, 3), (4, 4), "tucker2", name="pc")
    assert unsupported_reason(nn.ConvTranspose2d(4, 4, 3)) is not None
    assert unsupported_reason(nn.Linear(3, 4)) is None and unsupported_reason(nn.Conv3d(3, 4, 2)) is None
    with pytest.raises(ConfigError, match="scheme"):
        factorize_conv(nn.Conv2d(4, 6, 3), (2,), "cp", name="c")


def test_ratio_and_energy_argument_errors():
    with pytest.raises(ConfigError, match="ratio"):
        svd_rank_for_ratio(10, 10, 0)
    with pytest.raises(ConfigError, match="ratio"):
        tucker2_ranks_for_ratio(10, 10, 9, -0.5)
    with pytest.raises(ConfigError, match="energy"):
        energy_rank(torch.ones(3), 0.0)


def _many_jobs():
    torch.manual_seed(0)
    return [("a", nn.Conv2d(16, 24, 3, padding=1), (6, 8), "tucker2"),
            ("b", nn.Linear(20, 30), (5,), "svd"),
            ("c", nn.Conv2d(16, 16, 1), (4,), "svd"),
            ("d", nn.Conv2d(12, 20, 3), (5,), "svd")]


def test_factorize_many_matches_one_by_one_and_restores_threads():
    jobs = _many_jobs()
    threads = torch.get_num_threads()
    serial = factorize_many(jobs, workers=1)
    parallel = factorize_many(jobs, workers=3)
    assert torch.get_num_threads() == threads and list(parallel) == ["a", "b", "c", "d"]
    for name, module, ranks, scheme in jobs:
        ref = factorize(module, ranks, scheme, name=name)
        for chain in (serial[name], parallel[name]):
            assert chain.roles() == ref.roles()
            for (k, p), (_, q) in zip(chain.state_dict().items(), ref.state_dict().items()):
                assert torch.equal(p, q), (name, k)
    assert factorize_many([]) == {}


def test_factorize_many_names_the_failing_layer(monkeypatch):
    jobs = _many_jobs()
    with torch.no_grad():
        jobs[2][1].weight[0, 0] = float("nan")
    threads = torch.get_num_threads()
    with pytest.raises(FactorizationError, match="'c'.*NaN"):
        factorize_many(jobs, workers=2)
    assert torch.get_num_threads() == threads
    jobs = _many_jobs()
    real = modules.factorize

    def broken(module, ranks, scheme, *, name="", **kw):
        if name in ("b", "d"):
            raise ValueError(f"boom {name}")
        return real(module, ranks, scheme, name=name, **kw)
    monkeypatch.setattr(modules, "factorize", broken)
    with pytest.raises(FactorizationError, match=r"layer 'b' \(Linear\) could not be factorized at ranks \[5\]: ValueError: boom b"):
        factorize_many(jobs, workers=2)


def test_factorize_many_runs_big_layers_first_with_every_thread(monkeypatch):
    # layers over SERIAL_MAX_NUMEL weights ("a", "d" here) run one at a time with all torch threads
    # before the others run in parallel on one thread each; results equal the one-by-one ones
    jobs = _many_jobs()
    monkeypatch.setattr(modules, "SERIAL_MAX_NUMEL", 2000)
    real = modules.factorize
    seen = []

    def spy(module, ranks, scheme, *, name="", **kw):
        seen.append((name, torch.get_num_threads()))
        return real(module, ranks, scheme, name=name, **kw)
    monkeypatch.setattr(modules, "factorize", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = factorize_many(jobs, workers=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen[:2] == [("a", 2), ("d", 2)] and sorted(seen[2:]) == [("b", 1), ("c", 1)]
    assert list(got) == ["a", "b", "c", "d"]
    for name, module, ranks, scheme in jobs:
        ref = real(module, ranks, scheme, name=name)
        for (k, p), (_, q) in zip(got[name].state_dict().items(), ref.state_dict().items()):
            assert torch.equal(p, q), (name, k)

    def broken(module, ranks, scheme, *, name="", **kw):   # a big layer fails after an earlier small one
        if name in ("b", "d"):
            raise ValueError(f"boom {name}")
        return real(module, ranks, scheme, name=name, **kw)
    monkeypatch.setattr(modules, "factorize", broken)
    with pytest.raises(FactorizationError, match="layer 'b'"):
        factorize_many(jobs, workers=2)


def test_effective_scheme_names_what_each_layer_gets():
    k3, k1 = nn.Conv2d(8, 12, 3), nn.Conv2d(8, 12, 1)
    assert effective_scheme(k3, "tucker2") == "tucker2"
    assert effective_scheme(k3, "conv_svd") == effective_scheme(k3, "svd") == "conv_svd"   # "svd": an alias
    assert {effective_scheme(m, s) for m in (k1, nn.Linear(8, 12)) for s in ("tucker2", "conv_svd")} == {"svd"}
    with pytest.raises(ConfigError, match="conv_svd"):
        effective_scheme(k3, "cp")


def test_layer_dims_read_the_declared_sizes():
    assert modules.layer_dims(nn.Linear(20, 30)) == (30, 20, 1)
    assert modules.layer_dims(nn.Conv2d(8, 12, (3, 5), groups=4)) == (12, 8, 15)   # every input channel
    assert modules.layer_dims(nn.LazyConv2d(12, 3)) == (12, 0, 9)                 # no weight yet


# --- Linear subclasses with their own forward (svd's _computes_linear probe) ------------------------------

class MatmulLinear(nn.Linear):
    """Hugging Face Falcon's FalconLinear: F.linear written out."""

    def forward(self, x):
        h = x @ self.weight.T
        return h if self.bias is None else h + self.bias


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class TrainScaledLinear(nn.Linear):
    def forward(self, x):
        out = super().forward(x)
        return out * 0.5 if self.training else out


class ZeroLoRALinear(nn.Linear):
    """An adapter that starts at zero: a probe alone would find F.linear."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.lora_a = nn.Parameter(torch.randn(i, 2))
        self.lora_b = nn.Parameter(torch.zeros(2, o))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a @ self.lora_b


def test_linear_subclass_computing_f_linear_is_factorized_others_are_kept():
    torch.manual_seed(0)
    for bias in (True, False):
        layer = MatmulLinear(12, 10, bias=bias)
        assert unsupported_reason(layer) is None
        model = nn.Sequential(layer, nn.ReLU(), MatmulLinear(10, 9)).eval()
        import lrd_fx
        x = torch.randn(4, 12)
        gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
        assert all(isinstance(gm.get_submodule(n), FactorChain) for n in ("0", "2"))
        _close(gm(x), model(x))
    scaled = ScaledLinear(12, 10)
    assert "differs from F.linear" in unsupported_reason(scaled)
    for dtype in (torch.bfloat16, torch.float16):        # half precision and wide layers: still told apart
        assert unsupported_reason(MatmulLinear(4096, 64).to(dtype)) is None
        assert "differs from F.linear" in unsupported_reason(ScaledLinear(4096, 64).to(dtype))
    assert unsupported_reason(MatmulLinear(4096, 64)) is None
    train_scaled = TrainScaledLinear(12, 10).eval()        # equal in eval mode only: not reproduced in train mode
    assert "differs from F.linear" in unsupported_reason(train_scaled) and not train_scaled.training
    assert "more than weight and bias" in unsupported_reason(ZeroLoRALinear(12, 10))
    with torch.device("meta"):
        assert unsupported_reason(MatmulLinear(12, 10)) is not None    # no data to probe
