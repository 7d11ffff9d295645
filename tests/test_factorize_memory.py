"""Working memory of the factorization: the blocked float64 HOOI sweep, the memory-bounded layer
scheduler of factorize_many and the heap release (no clock or RSS in the verdicts)."""
import math
import threading

import pytest
import torch
import torch.nn as nn

from lrd_fx.errors import FactorizationError
from lrd_fx.factorize import factorize, factorize_many, modules, svd, tucker


def _hooi_unblocked(w64, r_out, r_in, n_iter_max=100, tol=tucker.HOOI_TOL):
    """The HOOI before the memory work: float32 sweeps (each one's error from a product for the core),
    then one sweep and the core (einsum) on a whole float64 copy of the weight (the reference the
    blocked sweep, and its errors from eigenvalues, must agree with)."""
    out, inp = w64.shape[:2]
    w = w64.float()
    w_out, w_oki = w.reshape(out, -1), w.movedim(1, -1).reshape(-1, inp)
    norm2 = float(w64.pow(2).sum())

    def top(a, r):
        return svd.top_eigvecs(a, r, side="left").double()

    u_in = top(tucker.unfold(w, 1), r_in)

    def sweep(w_oki, w_out, u_in, dtype):
        u_out = top((w_oki @ u_in.to(dtype)).reshape(out, -1), r_out)
        z = (u_out.to(dtype).T @ w_out).reshape(r_out, inp, -1).movedim(1, 0).reshape(inp, -1)
        return u_out, top(z, r_in), z

    prev = None
    for _ in range(n_iter_max):
        u_out, u_in, z = sweep(w_oki, w_out, u_in, torch.float32)
        err = math.sqrt(max(norm2 - float((u_in.float().T @ z).pow(2).sum()), 0.0) / norm2)
        if prev is not None and abs(prev - err) <= tol * err:
            break
        prev = err
    u_out, u_in, _ = sweep(w64.movedim(1, -1).reshape(-1, inp), w64.reshape(out, -1), u_in, torch.float64)
    return torch.einsum("oi...,oa,ib->ab...", w64, u_out, u_in), u_out, u_in


def _aligned(a, b):
    """b's columns with the sign of a's (eigenvectors are defined up to sign)."""
    return b * torch.sign((a * b).sum(0, keepdim=True))


@pytest.mark.parametrize("shape,ranks,block", [((24, 20, 3, 3), (7, 5), 64), ((24, 20, 3, 3), (7, 5), 1),
                                               ((16, 12, 5), (6, 4), 50), ((10, 14, 2, 3), (3, 9), 1 << 17)])
def test_blocked_float64_sweep_matches_the_whole_weight_sweep(monkeypatch, shape, ranks, block):
    # block=1 and 64: one input/output channel per block, and blocks that do not divide the channels
    monkeypatch.setattr(tucker, "BLOCK_NUMEL", block)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    for weight in (w, w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w.half().float()):
        core, u_out, u_in = tucker._hooi(weight, ranks[0], ranks[1], "x")
        ref_core, ref_out, ref_in = _hooi_unblocked(weight.double(), ranks[0], ranks[1])
        assert core.shape == ref_core.shape and u_out.shape == ref_out.shape and u_in.shape == ref_in.shape
        torch.testing.assert_close(u_out, _aligned(u_out, ref_out), rtol=0, atol=1e-10)
        torch.testing.assert_close(u_in, _aligned(u_in, ref_in), rtol=0, atol=1e-10)
        rebuilt = tucker.tucker2_reconstruct(core, u_out, u_in)
        ref_rebuilt = tucker.tucker2_reconstruct(ref_core, ref_out, ref_in)
        torch.testing.assert_close(rebuilt, ref_rebuilt, rtol=0, atol=1e-10)


def test_tucker2_full_rank_stays_exact_in_float64():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    core, u_out, u_in = tucker.tucker2(w, rank_out=6, rank_in=5, dtype=torch.float64)
    torch.testing.assert_close(tucker.tucker2_reconstruct(core, u_out, u_in), w, rtol=0, atol=1e-12)


def _run_schedule(costs, budget, workers):
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "running": 0, "pairs": 0}
    started = []

    def run(i):
        with lock:
            started.append(i)
            state["now"] += costs[i]
            state["running"] += 1
            state["most"] = max(state["most"], state["now"] if state["running"] > 1 else 0)
        try:
            return i * 10
        finally:
            with lock:
                state["now"] -= costs[i]
                state["running"] -= 1
    done, failed = modules.schedule(costs, budget, workers, run)
    return done, failed, started, state["most"]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_schedule_keeps_jobs_in_flight_within_the_budget(workers):
    costs = [5, 40, 3, 100, 7, 60, 2, 2, 30]
    done, failed, started, most = _run_schedule(costs, 70, workers)
    assert failed == {} and done == {i: i * 10 for i in range(len(costs))}
    assert most <= 70      # several jobs at once only within the budget (100 > 70 runs alone)
    if workers == 1:
        assert started == sorted(range(len(costs)), key=lambda i: (-costs[i], i))   # largest first


def test_schedule_runs_jobs_that_fit_together_at_once():
    # two jobs that fit the budget together must overlap: each waits for the other (a serialized
    # schedule would break the barrier, whose timeout only bounds the failure)
    barrier = threading.Barrier(2, timeout=60)

    def run(i):
        barrier.wait()
        return i
    done, failed = modules.schedule([10, 10], 20, 2, run)
    assert failed == {} and done == {0: 0, 1: 1}


def test_schedule_stops_starting_later_jobs_after_a_failure():
    started = []

    def run(i):
        started.append(i)
        if i == 1:
            raise ValueError("boom")
        return i
    done, failed = modules.schedule([9, 8, 7, 6], 100, 1, run)   # one worker: order 0, 1, then stop
    assert started == [0, 1] and list(failed) == [1] and done == {0: 0}


def test_factorize_many_with_a_tight_budget_runs_one_layer_at_a_time_and_matches(monkeypatch):
    torch.manual_seed(0)
    jobs = [("a", nn.Conv2d(16, 24, 3, padding=1), (6, 8), "tucker2"), ("b", nn.Linear(20, 30), (5,), "svd"),
            ("c", nn.Conv2d(16, 16, 1), (4,), "svd"), ("d", nn.Conv2d(12, 20, 3), (5,), "svd")]
    free = factorize_many(jobs, workers=3)
    monkeypatch.setattr(modules, "WORK_BUDGET_FRACTION", 1e-9)
    real = modules.factorize
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def spy(module, ranks, scheme, *, name="", **kw):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            return real(module, ranks, scheme, name=name, **kw)
        finally:
            with lock:
                state["now"] -= 1
    monkeypatch.setattr(modules, "factorize", spy)
    tight = factorize_many(jobs, workers=3)
    assert state["most"] == 1 and list(tight) == ["a", "b", "c", "d"]
    for name, module, ranks, scheme in jobs:
        ref = real(module, ranks, scheme, name=name)
        for chain in (free[name], tight[name]):
            for (k, p), (_, q) in zip(chain.state_dict().items(), ref.state_dict().items()):
                assert torch.equal(p, q), (name, k)
    jobs[1][1].weight.data[0, 0] = float("nan")
    with pytest.raises(FactorizationError, match="'b'"):
        factorize_many(jobs, workers=3)


def test_work_bytes_counts_the_weight_and_whitening_statistics():
    lin = nn.Linear(20, 30)
    assert modules.work_bytes(lin) == modules.WORK_BYTES_PER_ELEMENT * 600

    class Stats:
        xx = torch.zeros(20, 20, dtype=torch.float64)

    class Wh:
        stats = Stats()
    assert modules.work_bytes(lin, Wh()) == modules.WORK_BYTES_PER_ELEMENT * 600 + 2 * 8 * 400


def test_release_free_memory_reports_whether_the_c_library_can_trim(monkeypatch):
    import ctypes.util
    lib = ctypes.util.find_library("c")
    has = bool(lib) and hasattr(ctypes.CDLL(lib), "malloc_trim")
    assert svd.release_free_memory() is has
    monkeypatch.setattr(svd, "_TRIM", [None])                  # a C library without malloc_trim
    assert svd.release_free_memory() is False


def test_split64_drops_nothing_from_the_answer():
    # the exact path rebuilds the float64 copy after the eigensolver: still exact at full rank
    a = torch.randn(30, 50, dtype=torch.float64)
    for m in (a, a.T.contiguous()):
        left, right = svd._split64(m, 30, "x")
        torch.testing.assert_close(left @ right, m, rtol=0, atol=1e-12)
        layer = nn.Linear(m.shape[1], m.shape[0]).double()
        layer.weight.data.copy_(m)
        chain = factorize(layer, (30,), "svd")
        torch.testing.assert_close(chain[-1].weight @ chain[0].weight, m, rtol=0, atol=1e-12)


def test_hooi_stops_at_the_first_sweep_that_gains_at_most_tol_of_its_error(monkeypatch):
    # The errors each float32 sweep sees (from the eigenvalues of its mode-1 Gram), in order.
    errs, real = [], tucker.top_eigvecs
    w = torch.randn(24, 20, 3, 3, generator=torch.Generator().manual_seed(5))
    norm2 = float(w.double().pow(2).sum())

    def spy(a, rank, **kw):
        out = real(a, rank, **kw)
        if kw.get("values"):
            errs.append(math.sqrt(max(norm2 - float(out[0].double().sum()), 0.0) / norm2))
        return out
    monkeypatch.setattr(tucker, "top_eigvecs", spy)
    tol = 2e-3
    tucker._hooi(w, 7, 5, "x", tol=tol)
    gains = [(a - b) / b for a, b in zip(errs, errs[1:])]
    assert len(errs) >= 3 and gains[-1] <= tol and all(g > tol for g in gains[:-1])
    assert all(g >= -1e-6 for g in gains)            # HOOI does not raise the error


@pytest.mark.parametrize("shape,ranks", [((24, 20, 3, 3), (7, 5)), ((16, 12, 5), (6, 4)), ((10, 14, 2, 3), (3, 9))])
def test_float32_factors_skip_the_float64_sweep_and_keep_the_projection(monkeypatch, shape, ranks):
    # Without exact64 the core is the last float32 sweep's projection of the weight on its factors.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    core, u_out, u_in = tucker._hooi(w, *ranks, "x", exact64=False)
    ref = tucker._hooi(w, *ranks, "x", exact64=True)
    for u, r in ((u_out, ranks[0]), (u_in, ranks[1])):
        torch.testing.assert_close(u.double().T @ u.double(), torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)
    proj = torch.einsum("oi...,oa,ib->ab...", w.double(), u_out.double(), u_in.double())
    torch.testing.assert_close(core.double(), proj, rtol=0, atol=1e-5)

    def err(c, a, b):
        return float((tucker.tucker2_reconstruct(c.double(), a.double(), b.double()) - w.double()).norm() / w.norm())
    # one float64 sweep fewer: at most one more sweep's gain (<= tol x error) above the exact64 result
    assert err(core, u_out, u_in) <= err(*ref) * (1 + 2 * tucker.HOOI_TOL) + 1e-6
    # tucker2 takes it for float32 weights only
    calls, real = [], tucker._hooi
    monkeypatch.setattr(tucker, "_hooi", lambda *a, **k: calls.append(k["exact64"]) or real(*a, **k))
    tucker.tucker2(w, *ranks)
    tucker.tucker2(w.double(), *ranks)
    tucker.tucker2(w, *ranks, dtype=torch.float64)
    assert calls == [False, True, True]


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_split64_converts_the_weight_by_blocks_and_gives_the_optimal_factors(monkeypatch, shape):
    # The exact path makes the float64 Gram and projection block by block: no float64 copy of the whole
    # weight, and the same answer as the SVD.
    torch.manual_seed(0)
    a = torch.randn(*shape)
    whole = svd._split64(a, 10, "x")
    monkeypatch.setattr(svd, "BLOCK_NUMEL", 100)
    monkeypatch.setattr(svd, "BLOCK_MIN_STEP", 2)
    made, real_empty = [], torch.empty

    def empty(*size, **kw):
        t = real_empty(*size, **kw)
        made.append((t.numel(), t.dtype))
        return t
    monkeypatch.setattr(svd.torch, "empty", empty)
    converted, real_work = [], svd._work                 # no float64 copy of the weight made whole
    monkeypatch.setattr(svd, "_work", lambda t, *x: converted.append(t.numel()) or real_work(t, *x))
    left, right = svd._split64(a, 10, "x")
    assert all(n < a.numel() for n in converted)
    monkeypatch.setattr(svd.torch, "empty", real_empty)
    blocks = [n for n, dtype in made if dtype == torch.float64 and n <= max(100, *shape)]
    assert len(blocks) == 2 and max(n for n, _ in made) < a.numel()
    assert left.dtype == right.dtype == torch.float64
    torch.testing.assert_close(left @ right, whole[0] @ whole[1], rtol=0, atol=1e-10)
    s = torch.linalg.svdvals(a.double())
    assert float((a.double() - left @ right).norm()) == pytest.approx(float(s[10:].pow(2).sum().sqrt()), rel=1e-9)
    k = min(shape)                                   # full rank: exact
    left, right = svd._split64(a, k, "x")
    torch.testing.assert_close(left @ right, a.double(), rtol=0, atol=1e-10)


def test_mid_size_near_square_weights_try_the_float32_gram_with_torchs_eigensolver(monkeypatch):
    # From SQUARE32_MIN_N on the smaller side, svd_split tries split32 (certified within 1% of the optimal
    # error) with torch.linalg.eigh, which runs in factorize_many's worker threads; what it declines
    # (near-low-rank weights, full rank) takes the float64 path as before.
    torch.manual_seed(0)
    monkeypatch.setattr(svd, "SQUARE32_MIN_N", 24)
    subsets, real_eigh = [], svd._gram_top_eigh
    monkeypatch.setattr(svd, "_gram_top_eigh", lambda w, r, subset=True: subsets.append(subset) or real_eigh(w, r, subset))
    exact, real64 = [], svd._split64
    monkeypatch.setattr(svd, "_split64", lambda a, r, name: exact.append(r) or real64(a, r, name))
    flat = torch.randn(30, 40)
    left, right = svd.svd_split(flat, 8)
    assert subsets == [False] and exact == []
    s = torch.linalg.svdvals(flat.double())
    err = float((flat.double() - (left @ right).double()).norm())
    assert err <= 1.01 * float(s[8:].pow(2).sum().sqrt())
    low = torch.randn(30, 3) @ torch.randn(3, 40) + 1e-6 * torch.randn(30, 40)   # tiny tail: declined
    svd.svd_split(low, 3)
    svd.svd_split(flat, 30)                                                       # full rank: float64
    assert exact == [3, 30]
    small = torch.randn(20, 40)                                                   # below SQUARE32_MIN_N
    svd.svd_split(small, 5)
    assert exact == [3, 30, 5] and len(subsets) == 2
