"""Compile cost of big layers: the certified float32 Gram path of svd_split (issue 12 item 6)."""
import pytest
import torch

import lrd_fx.factorize.svd as svd
from lrd_fx.factorize.svd import _split64, split32, svd_split


def _matrix(m, n, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=g))
    return ((u * s) @ v.T).float()


def _err(a, left, right):
    return float((a.double() - left.double() @ right.double()).norm() / a.double().norm())


@pytest.fixture
def paths(monkeypatch):
    """Every matrix counts as big (float32 path first; no sketch), and the paths taken are counted."""
    monkeypatch.setattr(svd, "FLOAT32_MIN_NUMEL", 1)
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_NUMEL", 1 << 40)
    counts = svd.path_counts.__class__()
    monkeypatch.setattr(svd, "path_counts", counts)
    return counts


@pytest.mark.parametrize("shape", [(240, 700), (700, 240)])
def test_float32_path_accepted_on_flat_spectra_and_as_accurate_as_float64(paths, shape):
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(*shape, generator=g)
    uniform = (torch.rand(*shape, generator=g) * 2 - 1) * 0.05          # a default nn.Linear init
    for a in (gauss, uniform):
        for r in (12, 60, 200):
            left, right = svd_split(a, r)
            exact = _split64(a.double(), r, "")
            assert left.shape == (shape[0], r) and right.shape == (r, shape[1])
            assert left.dtype == right.dtype == torch.float32 and left.device == a.device
            assert left.is_contiguous() and right.is_contiguous()
            e32, e64 = _err(a, left, right), _err(a, *exact)
            assert abs(e32 - e64) <= 1e-4 * e64, (shape, r, e32, e64)
            # same subspace: the products agree, not just the errors
            torch.testing.assert_close(left @ right, (exact[0] @ exact[1]).float(), rtol=1e-3, atol=1e-4)
    assert paths["exact32"] == 6 and paths["exact64"] == 0


def test_float64_path_on_near_low_rank_and_at_full_rank(paths):
    # a near-low-rank weight: the optimal tail is tiny, the float32 perturbation bound is not
    s = torch.cat([torch.linspace(10.0, 1.0, 30), torch.full((170,), 1e-6)]).double()
    low = _matrix(200, 600, s)
    left, right = svd_split(low, 40)
    assert paths["exact64"] == 1 and paths["exact32"] == 0
    assert paths["float32_skipped"] + paths["float32_declined"] == 1
    torch.testing.assert_close(left @ right, (lambda lr: (lr[0] @ lr[1]).float())(_split64(low.double(), 40, "")),
                               rtol=1e-5, atol=1e-6)
    # the certificate itself (not only the probe's early exit) declines it
    assert split32(low, 40) is None
    # exponentially decaying: rank 40 leaves a tail of ~e^-6 of the energy -> still float64
    dec = _matrix(200, 600, torch.exp(-torch.arange(200.0) / 3).double())
    assert split32(dec, 40) is None
    # full rank: nothing truncated, the float64 path reconstructs exactly
    a = torch.randn(50, 80)
    left, right = svd_split(a, 50)
    torch.testing.assert_close(left @ right, a, rtol=1e-4, atol=1e-5)
    assert paths["exact64"] == 2 and paths["exact32"] == 0      # (split32 called directly is not counted)


def test_float32_path_keeps_dtype_device_and_zero_matrix(paths):
    a = torch.randn(100, 300).to(torch.bfloat16)
    left, right = svd_split(a, 20, dtype=torch.bfloat16)
    assert left.dtype == right.dtype == torch.bfloat16 and left.shape == (100, 20) and right.shape == (20, 300)
    assert paths["exact32"] == 1
    zero = torch.zeros(40, 90)
    left, right = svd_split(zero, 5)
    assert float(left.abs().sum()) == 0.0 and float(right.abs().sum()) == 0.0 and paths["exact64"] == 1


def test_float32_certificate_uses_a_coarser_rounding_unit_for_reduced_precision_matmuls(monkeypatch):
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert svd._gemm_eps(torch.device("cpu")) == 2.0 ** -7
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert svd._gemm_eps(torch.device("cpu")) == torch.finfo(torch.float32).eps


def test_flat_big_layer_skips_the_sketch_and_takes_float32(monkeypatch):
    # the whole big-layer pipeline as a random-init AlexNet classifier sees it, at toy size
    monkeypatch.setattr(svd, "FLOAT32_MIN_NUMEL", 1)
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_NUMEL", 1)
    counts = svd.path_counts.__class__()
    monkeypatch.setattr(svd, "path_counts", counts)
    lin = torch.nn.Linear(900, 400)
    from lrd_fx.factorize import factorize_linear
    chain = factorize_linear(lin, 60)
    assert counts == {"sketch_skipped": 1, "exact32": 1}
    x = torch.randn(3, 900)
    exact = _split64(lin.weight.detach().double(), 60, "")
    ref = x @ (exact[0] @ exact[1]).float().T + lin.bias
    torch.testing.assert_close(chain(x), ref, rtol=1e-4, atol=1e-5)


# --- peak memory: compile shares the caller's Conv/Linear weights until it hands the model out ----------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.keep = torch.nn.Conv2d(16, 16, 1)         # skipped below: stays as it is, weights included
        self.fc = torch.nn.Linear(16 * 8 * 8, 64)
        self.head = torch.nn.Linear(64, 10)
        self.head2 = torch.nn.Linear(64, 10)
        self.head2.weight = self.head.weight           # a tied weight stays tied

    def forward(self, x):
        x = self.keep(torch.relu(self.bn(self.conv(x))))
        h = torch.relu(self.fc(x.flatten(1)))
        return self.head(h) + self.head2(h)


def _storages(m):
    return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}


def test_compiled_model_shares_no_storage_with_the_callers_and_never_changes_it():
    import lrd_fx
    from lrd_fx import api
    torch.manual_seed(0)
    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    # the working copy does share (that is the memory saving) ...
    work = api.copy_model(model, share_layer_weights=True)
    assert work.fc.weight.untyped_storage().data_ptr() == model.fc.weight.untyped_storage().data_ptr()
    assert work.fc.weight is not model.fc.weight and work.head2.weight is work.head.weight
    assert work.bn.weight.untyped_storage().data_ptr() != model.bn.weight.untyped_storage().data_ptr()
    assert api.unshare(work, model) == 9     # w+b of conv, keep, fc, head; head2: its bias (weight tied)
    assert not (_storages(work) & _storages(model)) and work.head2.weight is work.head.weight
    # ... the compiled model does not
    gm = lrd_fx.compile(model, (x,), ratio=0.5, skip=("keep",), min_channels=1, progress=False)
    assert gm.lrd.plan["keep"]["decision"] != "decomposed" and gm.lrd.plan["fc"]["decision"] == "decomposed"
    assert not (_storages(gm) & _storages(model))
    # training the compiled model (grads, in-place updates of every parameter) leaves the caller's as it was
    out = gm(x)
    out.sum().backward()
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model(x), _Net.forward(model, x))


def test_pipelines_that_write_weights_copy_them_up_front():
    from lrd_fx import Config, api
    assert api._shares_nothing_written(Config(), None)
    assert not api._shares_nothing_written(Config().replace(rank_search="infer"), None)
    assert not api._shares_nothing_written(Config().replace(fuse_inference=True), None)
    assert not api._shares_nothing_written(Config(), [torch.randn(1, 3)])


def test_all_finite_sees_nan_and_inf_anywhere():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = torch.randn(50, 70).to(dtype)
        assert svd.all_finite(t)
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[17, 33] = bad
            assert not svd.all_finite(u), (dtype, bad)
    assert svd.all_finite(torch.empty(0, 3)) and svd.all_finite(torch.arange(5))


def test_bench_compile_cost_writes_its_table_and_files(monkeypatch, tmp_path):
    from bench import compile_cost as cc
    ok = {"model": "alexnet", "ratio": 0.25, "size": 224, "seconds": 15.1, "rss_import_mb": 727.0,
          "rss_model_mb": 960.0, "peak_mb": 1256.0, "hwm_reset": True, "model_mb": 233.0, "overhead_x": 2.27,
          "params_before": 100, "params_after": 25, "svd_paths": {"exact32": 2, "sketch_skipped": 2},
          "stage_s": {"decompose": 11.25, "model_runs": 3.5, "other": 0.35}}
    seen = []
    monkeypatch.setattr(cc, "run_child", lambda name, args: seen.append(name) or (
        dict(ok, model=name) if name == "alexnet" else {"model": name, "ratio": args.ratio, "error": "boom"}))
    assert cc.main(["--models", "alexnet, nosuchnet", "--out", str(tmp_path / "cc")]) == 0
    assert seen == ["alexnet", "nosuchnet"]
    text = (tmp_path / "cc.txt").read_text()
    assert text.startswith("machine: ") and "exact32 2, sketch_skipped 2" in text and "2.27" in text
    assert "nosuchnet" in text and "failed" in text and "boom" in text
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    row = next(line for line in text.splitlines() if line.startswith("| alexnet"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert (cells["decompose s"], cells["model runs s"], cells["other s"]) == ("11.2", "3.5", "0.3")
    # a row from before the stage split (no stage_s) still prints, with dashes
    assert "| -" in cc.table([{k: v for k, v in ok.items() if k != "stage_s"}])
    import json
    saved = json.loads((tmp_path / "cc.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["alexnet", "nosuchnet"] and "load_avg_start" in saved["machine"]


def test_bench_compile_cost_all_classification_lists_misses_and_timeouts(monkeypatch, tmp_path):
    import json
    import subprocess

    from bench import compile_cost as cc
    row = {"ratio": 0.25, "size": 224, "rss_import_mb": 700.0, "rss_model_mb": 800.0, "hwm_reset": True,
           "params_before": 100, "params_after": 25, "svd_paths": {}}
    rows = {"fast": dict(row, model="fast", seconds=3.0, peak_mb=900.0, model_mb=100.0, overhead_x=2.0),
            "slow": dict(row, model="slow", seconds=31.5, peak_mb=900.0, model_mb=100.0, overhead_x=2.0),
            "fat": dict(row, model="fat", seconds=3.0, peak_mb=1000.0, model_mb=100.0, overhead_x=3.0)}
    monkeypatch.setattr(cc, "classification_models", lambda: ["fast", "slow", "fat", "stuck"])

    def fake_run(cmd, **kw):
        name = cmd[cmd.index("--child") + 1]
        if name == "stuck":
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(rows[name]) + "\n", stderr="")
    monkeypatch.setattr(cc.subprocess, "run", fake_run)
    assert cc.main(["--all-classification", "--timeout", "5", "--out", str(tmp_path / "all")]) == 0
    saved = json.loads((tmp_path / "all.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["fast", "slow", "fat", "stuck"] and saved["complete"]
    assert saved["misses"] == ["slow: 31.5 s > 30 s", "fat: 3.00x > 2.5x", "stuck: failed (timed out after 5 s)"]
    text = (tmp_path / "all.txt").read_text()
    assert "missing the targets (<= 30 s, <= 2.5x): 3" in text and "- fat: 3.00x > 2.5x" in text
    assert "load_avg_end" in saved["machine"]
    assert cc.misses([rows["fast"]], 2.0, 1.5) == ["fast: 3.0 s > 2 s, 2.00x > 1.5x"]


def test_bench_compile_cost_warm_counts_the_peak_above_a_model_that_ran_once(monkeypatch, tmp_path):
    import json
    import subprocess

    from bench import compile_cost as cc
    row = cc.child("squeezenet1_1", 0.25, 32, None, warm=True)   # a real child, tiny input
    assert row["warm"] is True and row["rss_warm_mb"] is not None and row["first_forward_mb"] is not None
    assert row["overhead_x"] == pytest.approx((row["peak_mb"] - row["rss_warm_mb"]) / row["model_mb"] + 1,
                                              abs=0.05)
    cold = cc.child("squeezenet1_1", 0.25, 32, None)
    assert cold["warm"] is False and cold["rss_warm_mb"] is None and cold["first_forward_mb"] is None
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(dict(row, first_forward_mb=21.4)) + "\n",
                                           stderr="")
    monkeypatch.setattr(cc.subprocess, "run", fake_run)
    assert cc.main(["--models", "squeezenet1_1", "--warm", "--out", str(tmp_path / "w")]) == 0
    assert "--warm" in seen[0]
    text = (tmp_path / "w.txt").read_text()
    assert "--warm: each model ran once eagerly first" in text
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    line = next(line for line in text.splitlines() if line.startswith("| squeezenet1_1"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["first fwd MB"] == "21" and float(cells["peak/model"]) == pytest.approx(row["overhead_x"], abs=0.006)
