"""Randomized truncated SVD: accurate where certified (decaying spectrum), exact fallback on flat spectra."""
import torch

import lrd_fx.factorize.svd as svd
from lrd_fx.factorize.svd import _split64, randomized_svd_split, svd_split


def _matrix(m, n, s):
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=g))
    return ((u * s) @ v.T).float()


def _err(a, left, right):
    return float((a.double() - left.double() @ right.double()).norm() / a.double().norm())


def test_randomized_error_within_one_percent_of_exact_on_decaying_spectra():
    for s in (torch.exp(-torch.arange(200.0) / 12), 1.0 / torch.arange(1, 201.0)):
        a = _matrix(200, 600, s.double())
        for r in (10, 40):
            res = randomized_svd_split(a, r)
            assert res is not None, (r, "certified on a decaying spectrum")
            exact = _err(a, *_split64(a.double(), r, ""))
            assert _err(a, *res) <= 1.01 * exact
            assert res[0].shape == (200, r) and res[1].shape == (r, 600)
    # tall matrices are sketched on their smaller side; factors keep the [m, r] @ [r, n] layout
    tall = _matrix(600, 200, torch.exp(-torch.arange(200.0) / 12).double())
    left, right = randomized_svd_split(tall, 20)
    assert left.shape == (600, 20) and right.shape == (20, 200)
    assert _err(tall, left, right) <= 1.01 * _err(tall, *_split64(tall.double(), 20, ""))


def test_flat_spectrum_falls_back_to_exact(monkeypatch):
    flat = _matrix(200, 600, torch.ones(200, dtype=torch.float64))
    gauss = torch.randn(200, 600)          # a random init: Marchenko-Pastur, hardly decaying
    for a in (flat, gauss):
        assert randomized_svd_split(a, 40) is None
    # svd_split tries the randomized path on big matrices and returns the exact result when it declines
    # (the flatness pre-test, which would skip this sketch, is switched off here; tested below)
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_NUMEL", 1)
    monkeypatch.setattr(svd, "sketch_pays", lambda shape, r: True)     # toy sizes: the Gram path is cheaper
    monkeypatch.setattr(svd, "FLAT_LEVEL", float("inf"))
    calls = []
    real = svd.randomized_svd_split
    monkeypatch.setattr(svd, "randomized_svd_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    left, right = svd_split(gauss, 40)
    assert calls
    exact = _split64(gauss.double(), 40, "")
    torch.testing.assert_close(left @ right, (exact[0] @ exact[1]).float(), rtol=1e-4, atol=1e-5)
    # ... and the randomized factors when it accepts (decaying spectrum)
    dec = _matrix(200, 600, torch.exp(-torch.arange(200.0) / 12).double())
    left, right = svd_split(dec, 40)
    assert len(calls) == 2 and _err(dec, left, right) <= 1.01 * _err(dec, *_split64(dec.double(), 40, ""))


def _spy(monkeypatch):
    """Lower the big-weight thresholds to 1 and record the paths svd_split takes."""
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_NUMEL", 1)
    monkeypatch.setattr(svd, "FLOAT32_MIN_NUMEL", 1)
    monkeypatch.setattr(svd, "sketch_pays", lambda shape, r: True)     # toy sizes: the Gram path is cheaper
    counts = svd.path_counts.__class__()
    monkeypatch.setattr(svd, "path_counts", counts)
    calls = []
    real = svd.randomized_svd_split
    monkeypatch.setattr(svd, "randomized_svd_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    return counts, calls


def test_flatness_pretest_skips_the_sketch_on_flat_spectra_and_keeps_it_on_decaying(monkeypatch):
    counts, calls = _spy(monkeypatch)
    for flat in (torch.randn(200, 600), (torch.rand(600, 200) * 2 - 1), _matrix(200, 600, torch.ones(200).double())):
        total, ritz = svd.spectrum_probe(svd._rows_small(flat))
        assert svd.is_flat(total, ritz, 200)
        left, right = svd_split(flat, 40)
        assert not calls, "a flat spectrum skips the sketch"
        exact = _split64(flat.double(), 40, "")
        assert _err(flat, left, right) <= 1.0001 * _err(flat, *exact)
    assert counts["sketch_skipped"] == 3 and counts["randomized"] == 0
    for s in (torch.exp(-torch.arange(200.0) / 12), 1.0 / torch.arange(1, 201.0)):
        dec = _matrix(200, 600, s.double())
        total, ritz = svd.spectrum_probe(svd._rows_small(dec))
        assert not svd.is_flat(total, ritz, 200)
        left, right = svd_split(dec, 40)
        assert left.shape == (200, 40) and right.shape == (40, 600) and left.dtype == torch.float32
        assert _err(dec, left, right) <= 1.01 * _err(dec, *_split64(dec.double(), 40, ""))
    assert len(calls) == 2 and counts["randomized"] == 2
    # a matrix of rank below the probe's block is not "flat" (all its energy is in the block)
    low = _matrix(200, 600, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    total, ritz = svd.spectrum_probe(svd._rows_small(low))
    assert not svd.is_flat(total, ritz, 200)


def test_no_probe_or_sketch_where_the_gram_path_costs_less(monkeypatch):
    # ViT-H/14's 1280 x 5120 weights at rank 256: the Gram path is cheaper; a low rank pays for a sketch
    assert not svd.sketch_pays((1280, 5120), 256) and not svd.sketch_pays((5120, 1280), 256)
    assert svd.sketch_pays((1280, 5120), 32) and svd.sketch_pays((4096, 9216), 100)
    assert all(svd.sketch_pays((2904, 2904), r) >= svd.sketch_pays((2904, 2904), r + 50) for r in range(1, 1400, 50))
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_NUMEL", 1)
    monkeypatch.setattr(svd, "FLOAT32_MIN_NUMEL", 1)
    counts = svd.path_counts.__class__()
    monkeypatch.setattr(svd, "path_counts", counts)
    probes = []
    real = svd.spectrum_probe
    monkeypatch.setattr(svd, "spectrum_probe", lambda *a, **k: probes.append(1) or real(*a, **k))
    a = torch.randn(200, 600)
    assert not svd.sketch_pays(a.shape, 40)
    left, right = svd_split(a, 40)
    assert counts == {"sketch_costlier": 1, "exact32": 1} and not probes
    assert _err(a, left, right) <= 1.0001 * _err(a, *_split64(a.double(), 40, ""))
    # without the probe the float32 certificate alone sends a near-low-rank weight to float64
    low = _matrix(200, 600, torch.cat([torch.linspace(10.0, 1.0, 30), torch.full((170,), 1e-6)]).double())
    left, right = svd_split(low, 40)
    assert counts["float32_declined"] == 1 and counts["exact64"] == 1 and not probes
    torch.testing.assert_close(left @ right, (lambda lr: (lr[0] @ lr[1]).float())(_split64(low.double(), 40, "")),
                               rtol=1e-5, atol=1e-6)
    # a rank where the sketch pays probes first
    svd_split(a, 8)
    assert probes == [1] and counts["sketch_skipped"] == 1
