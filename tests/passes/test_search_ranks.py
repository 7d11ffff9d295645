"""search_ranks pass: rewrite to the chosen rank or revert, dedupe, cache, budget, Ctrl-C, distributed."""
import math

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.cost import cache
from lrd_fx.cost.timer import use_cost_fn
from lrd_fx.factorize import FactorChain


def chain_rank(m):
    """Lead rank of a chain: r_out of a Tucker-2 core, r of an SVD chain."""
    if "core" in m.roles():
        return m.core.out_channels
    return m.first.out_features if isinstance(m.first, nn.Linear) else m.first.out_channels


class Staircase:
    """Fake cost: chains jump by 20% after every multiple of `step`; originals cost `original`."""

    def __init__(self, step=16, original=10.0, cache_tag=None):
        self.step, self.original, self.calls = step, original, []
        if cache_tag:
            self.cache_tag = cache_tag

    def __call__(self, module, shape, mode):
        self.calls.append((type(module).__name__, tuple(shape), mode))
        if isinstance(module, FactorChain):
            r = chain_rank(module)
            return 1.0 + 0.001 * r + 0.2 * math.ceil(r / self.step)
        return self.original


def convs(n=2, c=32):
    layers = []
    for _ in range(n):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


X = torch.randn(2, 32, 5, 5)


def test_chain_rewritten_to_rank_below_edge():
    model = convs(1)
    fake = Staircase(step=16)
    with use_cost_fn(fake):
        gm = lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False)
    rec = gm.lrd.plan["0"]
    assert rec["decision"] == "searched" and rec["estimate"] == [20, 20] and rec["ranks"] == [16, 16]
    assert "16->17" in rec["reason"]
    assert rec["time_original_s"] == 10.0 and rec["time_chosen_s"] < rec["time_estimate_s"]
    assert all(15 <= int(k.split("/")[0]) <= 25 for k in rec["candidates"])   # the +-25% window
    chain = gm.get_submodule("0")
    assert isinstance(chain, FactorChain) and chain.core.in_channels == 16 and chain.core.out_channels == 16
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][:3] == ["0.first", "0.core", "0.last"]
    assert rec["params_after"] == sum(p.numel() for p in chain.parameters())
    assert 0 < rec["flops_after"] < rec["flops_before"]
    # the chain is the real factorization at the chosen ranks, not a random one
    ref = lrd_fx.compile(model, (X,), rank=16)
    torch.testing.assert_close(gm(X), ref(X), rtol=1e-4, atol=1e-4)
    assert all(mode == "infer" for _, _, mode in fake.calls)
    assert ("Conv2d", (2, 32, 5, 5), "infer") in fake.calls       # the original, at its real shape


def test_reverts_when_the_original_is_faster():
    model = convs(1)
    with use_cost_fn(Staircase(original=0.5)):
        gm = lrd_fx.compile(model, (X,), rank=20, rank_search="train", progress=False)
    rec = gm.lrd.plan["0"]
    assert rec["decision"] == "reverted" and rec["ranks"] is None and "reverted" in rec["reason"]
    assert rec["params_after"] == rec["params_before"]
    assert type(gm.get_submodule("0")) is nn.Conv2d
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in nodes] == ["0", "1"] and nodes[0].meta["lrd"].decision == "reverted"
    torch.testing.assert_close(gm(X), model(X))
    assert gm.get_submodule("0") is not model[0]     # a copy: the caller's model is not shared
    assert "reverted" in gm.lrd.report()


def test_revert_with_shared_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model = Twice()
    x = torch.randn(3, 32)
    with use_cost_fn(Staircase(original=0.1)):
        gm = lrd_fx.compile(model, (x,), rank=8, rank_search="infer", progress=False)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin", "lin"]
    torch.testing.assert_close(gm(x), model(x))


def test_identical_layers_measured_once():
    one, two = Staircase(step=16), Staircase(step=16)
    with use_cost_fn(one):
        lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False)
    with use_cost_fn(two):
        gm = lrd_fx.compile(convs(3), (X,), rank=20, rank_search="infer", progress=False)
    assert len(two.calls) == len(one.calls) > 5
    assert [gm.lrd.plan[n]["ranks"] for n in ("0", "2", "4")] == [[16, 16]] * 3


def test_second_compile_hits_the_cache(tmp_path):
    path = tmp_path / "t.sqlite"
    first = Staircase(cache_tag="fake-staircase")
    with use_cost_fn(first):
        gm1 = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False, cache=str(path))
    assert first.calls and cache.cache_info(path)["entries"] == len(first.calls)
    second = Staircase(cache_tag="fake-staircase")
    with use_cost_fn(second):
        gm2 = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False, cache=str(path))
    assert second.calls == []                                   # measured nothing
    assert gm2.lrd.plan["0"]["ranks"] == gm1.lrd.plan["0"]["ranks"] == [16, 16]
    assert "from the cache" in " ".join(gm2.lrd.notes)
    # another mode is another key: measured again
    third = Staircase(cache_tag="fake-staircase")
    with use_cost_fn(third):
        lrd_fx.compile(convs(1), (X,), rank=20, rank_search="train", progress=False, cache=str(path))
    assert third.calls


def test_fake_without_cache_tag_never_reaches_the_cache(tmp_path):
    path = tmp_path / "t.sqlite"
    with use_cost_fn(Staircase()):
        lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False, cache=str(path))
    assert cache.cache_info(path)["entries"] == 0


class _SteppingTime:
    """The search's `time` module with a fake perf_counter that advances one second per call."""

    def __init__(self):
        import time as real
        self._real, self.now = real, 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_time_budget_keeps_estimates(monkeypatch):
    from lrd_fx.passes import search_ranks as sr
    monkeypatch.setattr(sr, "time", _SteppingTime())      # a fake clock: the budget is spent at the first look
    with use_cost_fn(Staircase()):
        gm = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False,
                            rank_search_budget_s=0.5)
    rec = gm.lrd.plan["0"]
    assert rec["decision"] == "decomposed" and rec["ranks"] == [20, 20]
    assert "rank_search_budget_s" in rec["reason"] and "kept the estimate" in rec["reason"]


def test_ctrl_c_keeps_what_was_measured():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1))
    fake = Staircase()

    def interrupting(module, shape, mode):
        if isinstance(module, nn.Conv2d) and module.out_channels == 24:
            raise KeyboardInterrupt
        return fake(module, shape, mode)

    with use_cost_fn(interrupting):
        gm = lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False)
    plan = gm.lrd.plan
    assert plan["0"]["decision"] == "searched" and plan["0"]["ranks"] == [16, 16]
    assert plan["2"]["decision"] == "decomposed" and "interrupted" in plan["2"]["reason"]
    assert "interrupted" in " ".join(gm.lrd.notes)


def test_prefer_accuracy_and_window():
    with use_cost_fn(Staircase(step=64)):
        fast = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False)
        acc = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False,
                             rank_search_prefer="accuracy")
        narrow = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False,
                                rank_search_window=0.1, rank_search_prefer="accuracy")
    # no edge in [15, 25] (edges at 64): speed keeps 20, accuracy climbs to the window top
    assert fast.lrd.plan["0"]["ranks"] == [20, 20]
    assert acc.lrd.plan["0"]["ranks"] == [25, 25]
    assert narrow.lrd.plan["0"]["ranks"] == [22, 22]


def test_time_plus_error_objective_keeps_more_rank():
    torch.manual_seed(0)
    with use_cost_fn(Staircase(step=16)):
        t = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False)
        te = lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False,
                            rank_search_objective="time+error", rank_search_error_weight=50.0)
    assert t.lrd.plan["0"]["ranks"][0] < te.lrd.plan["0"]["ranks"][0]
    assert "error" in te.lrd.plan["0"]["reason"]


def test_rank_budget_whole_model():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1))
    # originals are faster than every chain: layer by layer, both layers revert
    with use_cost_fn(Staircase(step=16, original=1.0)):
        free = lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False)
        gm = lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False, rank_budget=0.8)
    assert [free.lrd.plan[n]["decision"] for n in ("0", "2")] == ["reverted", "reverted"]
    # under the budget only one of them can stay original
    plan = gm.lrd.plan
    assert sorted(plan[n]["decision"] for n in ("0", "2")) == ["reverted", "searched"]
    assert all("whole-model plan" in plan[n]["reason"] for n in ("0", "2"))
    before = sum(plan[n]["params_before"] for n in ("0", "2"))
    assert sum(plan[n]["params_after"] for n in ("0", "2")) <= 0.8 * before


def test_tucker_pair_aligned_with_its_lead():
    from lrd_fx.passes import search_ranks as sr
    line = sr.RankLine((103, 102), (256, 256))
    assert line.ranks(103) == (103, 102) and line.ranks(100) == (100, 99)   # unaligned lead: proportional
    assert line.ranks(96) == (96, 96) and line.ranks(104) == (104, 104)     # before: 96/95, 104/103
    assert sr.RankLine((24, 100), (64, 256)).ranks(96) == (24, 96)            # lead second: 23 -> 24
    assert sr.RankLine((16, 4), (64, 64)).ranks(16) == (16, 4)                # other below 8: left as is
    assert sr.RankLine((16, 14), (64, 12)).ranks(16) == (16, 12)              # never above full rank


def test_rank_budget_options_are_every_measured_window_rank(monkeypatch):
    """The whole-model plan chooses among every rank measured in the window, and the coarse stage
    measures every multiple of 8 there, so the divisor rule's ranks are among its options."""
    from lrd_fx.cost import model as cm
    tables = {}
    real = cm.plan_budget

    def spy(t, budget, **kw):
        tables.update(t)
        return real(t, budget, **kw)

    monkeypatch.setattr(cm, "plan_budget", spy)
    model = nn.Sequential(nn.Linear(512, 512))
    with use_cost_fn(Staircase(step=16)):
        gm = lrd_fx.compile(model, (torch.randn(2, 512),), rank=200, rank_search="infer", progress=False,
                            rank_budget=0.8)
    rec = gm.lrd.plan["0"]
    measured = {int(k) for k in rec["candidates"]}
    options = {o.key for o in tables["0"]}
    # window [150, 250]: the coarse grid's step is 16 there, the multiples of 8 between are added
    assert set(range(152, 251, 8)) <= measured
    assert {r for r in measured if 150 <= r <= 250} | {None} == options
    assert "whole-model plan" in rec["reason"]
    # smaller ranks are faster, yet the plan spends the budget (BUDGET_FILL): the largest measured rank
    # that fits it, not the window's low end
    budget = 0.8 * rec["params_before"]
    assert rec["ranks"] == [max(r for r in measured if 1024 * r + 512 <= budget)]
    assert rec["params_after"] >= 0.9 * budget


def test_linear_and_svd_conv_schemes():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 25, 32))
    with use_cost_fn(Staircase(step=16)):
        gm = lrd_fx.compile(model, (X,), rank=20, conv_scheme="svd", rank_search="infer", progress=False)
    assert gm.lrd.plan["0"]["ranks"] == [16] and gm.lrd.plan["2"]["ranks"] == [16]
    assert gm(X).shape == (2, 32)


def test_real_measurement_by_default():
    """No fake installed: the chain and the original are timed on the CPU (results not asserted).
    One layer, one repeat, one thread: on a machine shared with other work, two threads spin against
    the other processes and a few microsecond steps took minutes."""
    model = nn.Sequential(nn.Linear(48, 48))
    x = torch.randn(4, 48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gm = lrd_fx.compile(model, (x,), ratio=0.5, rank_search="train", progress=False,
                            rank_search_repeats=1, min_channels=8)
    finally:
        torch.set_num_threads(threads)
    recs = [r for r in gm.lrd.plan.values() if r["decision"] in ("searched", "reverted")]
    assert recs and all(r["time_original_s"] > 0 and len(r["candidates"]) >= 3 for r in recs)
    assert cache.cache_info()["entries"] >= sum(len(r["candidates"]) + 1 for r in recs)
    torch.testing.assert_close(gm(x).shape, model(x).shape)


# --- distributed: process 0 searches, every process gets the same plan ---------------------------

def _dist_worker(rank: int) -> dict:
    model = convs(1)
    # each process would choose differently on its own: step 16 -> 16, step 64 -> 20
    with use_cost_fn(Staircase(step=16 if rank == 0 else 64)):
        gm = lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False)
    return {"ranks": gm.lrd.plan["0"]["ranks"], "shape": tuple(gm.get_submodule("0.core").weight.shape)}


def test_plan_broadcast_two_process_gloo(tmp_path):
    from tests.test_ddp import spawn_two
    got = spawn_two(_dist_worker, tmp_path, "search workers")
    assert got[0] == got[1] and got[0]["ranks"] == [16, 16]


def test_broadcast_is_identity_outside_distributed():
    from lrd_fx import dist
    assert not dist.is_distributed() and dist.rank() == 0
    plan = {"a": [1, 2]}
    assert dist.broadcast_plan(plan) is plan


def test_deferred_factorization_factorizes_every_kept_layer_once(monkeypatch):
    """With a search, decompose installs pending chains and a changed layer gets a new one: each kept
    layer is factorized once, at its final ranks (the materialize pass): the result equals a plain
    compile at those ranks."""
    from lrd_fx.factorize import modules as fm

    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1))

    def cost(module, shape, mode):
        if isinstance(module, nn.Conv2d) and module.out_channels == 24:
            return 0.1          # last layer: the original wins -> reverted
        return Staircase(step=16)(module, shape, mode)

    calls = []
    real = fm.factorize

    def counting(module, ranks, scheme="tucker2", *, name="", **kw):
        calls.append((name, tuple(ranks)))
        return real(module, ranks, scheme, name=name, **kw)
    monkeypatch.setattr(fm, "factorize", counting)
    with use_cost_fn(cost):
        gm = lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False)
    monkeypatch.setattr(fm, "factorize", real)
    plan = gm.lrd.plan
    assert [plan[n]["decision"] for n in ("0", "2", "4")] == ["searched", "searched", "reverted"]
    assert sorted(calls) == [("0", (16, 16)), ("2", (16, 16))]     # once each, never at rank 20
    ref = lrd_fx.compile(model, (X,), rank={"0": 16, "2": 16}, skip=("4",))
    torch.testing.assert_close(gm(X), ref(X), rtol=1e-4, atol=1e-4)


def _fine_stage_timer(tmp_path, monkeypatch, scripted):
    """A CandidateTimer whose device measurement is replaced by scripted times: {rank key: seconds}."""
    from lrd_fx.config import Config
    from lrd_fx.context import CompileContext
    from lrd_fx.cost.timer import Measurement
    from lrd_fx.passes import search_ranks as sr

    layer = nn.Linear(32, 32)
    cfg = Config().replace(rank_search="infer", rank_search_repeats=3, cache=str(tmp_path / "c.sqlite"))
    timer = sr.CandidateTimer(CompileContext(config=cfg, model=layer), cost_fn=None)
    asked = []

    def measure(g, todo):
        asked.append(sorted(todo))
        return {k: Measurement(scripted[k], 0.1 * scripted[k], 3, 0.9 * scripted[k]) for k in todo}
    monkeypatch.setattr(timer, "_measure", measure)
    g = sr.LayerGroup(["lin"], layer, "svd", "Linear|32x32", (4, 32), sr.RankLine((8,), (32,)), "contiguous")
    return timer, g, asked


def test_fine_stage_is_rescaled_to_the_coarse_frame(tmp_path, monkeypatch):
    """New ranks are timed together with already-measured neighbours and put on their scale, so drift
    between the coarse and the fine stage cannot fake a step. No real clock: the measurement is
    scripted, the machine three times slower in the fine stage than in the coarse one."""
    from lrd_fx.cost.timer import Measurement
    from lrd_fx.passes import search_ranks as sr

    scripted = {"ref:4": 3.0, "ref:8": 3.3, "5": 3.0, "6": 4.5}
    timer, g, asked = _fine_stage_timer(tmp_path, monkeypatch, scripted)
    g.times = {4: Measurement(1.0, 0.0, 3), 8: Measurement(1.1, 0.0, 3)}     # the coarse stage's frame
    out = sr.time_with_refs(timer, g, refs=[4, 8], new=[5, 6])
    assert asked == [["5", "6", "ref:4", "ref:8"]]          # new ranks interleaved with both references
    # both references ran 3x slower: the new ranks are divided by 3 (median of the refs' ratios)
    assert out[5].median_s == pytest.approx(1.0) and out[6].median_s == pytest.approx(1.5)
    assert out[6].iqr_s == pytest.approx(0.15) and out[6].min_s == pytest.approx(1.35)
    assert timer.measured == 2
    # the cache holds the measurements as taken, marked with the scale that was applied
    with cache.TimingCache(tmp_path / "c.sqlite") as c:
        k6 = timer.cache_key(g, "6")
        assert c.get(k6, raw=True).median_s == pytest.approx(4.5)
        assert c.is_rescaled(k6) and c.get(k6).median_s == pytest.approx(1.5)
        assert c.get(timer.cache_key(g, "ref:4")) is None                         # references are not stored
    info = cache.cache_info(tmp_path / "c.sqlite")
    assert info["entries"] == 2 and info["rescaled"] == 2
    # a second fine stage finds rank 6 in the memo and measures only rank 7 with the references
    scripted["7"] = 6.0
    out = sr.time_with_refs(timer, g, refs=[4, 8], new=[6, 7])
    assert asked[-1] == ["7", "ref:4", "ref:8"] and out[6].median_s == pytest.approx(1.5)
    assert out[7].median_s == pytest.approx(2.0)
    timer.close()


def test_remeasure_stores_the_new_measurement_not_a_rescaled_one(tmp_path, monkeypatch):
    """A re-check keeps the least disturbed timing in memory, which may be a fine-stage timing rescaled
    into the coarse frame; the cache must still get only what was measured."""
    from lrd_fx.cost.timer import Measurement
    from lrd_fx.passes import search_ranks as sr

    scripted = {"ref:4": 3.0, "ref:8": 3.3, "6": 4.5}
    timer, g, _ = _fine_stage_timer(tmp_path, monkeypatch, scripted)
    g.times = {4: Measurement(1.0, 0.0, 3), 8: Measurement(1.1, 0.0, 3)}
    sr.time_with_refs(timer, g, refs=[4, 8], new=[6])          # memo: 1.5 (rescaled), cache: 4.5 raw
    scripted["6"] = 2.0                                           # re-measured: faster than raw, slower than 1.5
    out = timer.remeasure(g, {"6": lambda: None})
    timer.close()
    assert out["6"].median_s == pytest.approx(1.5)                # the least disturbed value is kept
    with cache.TimingCache(tmp_path / "c.sqlite") as c:
        k6 = timer.cache_key(g, "6")
        assert c.get(k6, raw=True).median_s == pytest.approx(2.0)  # the measurement as taken
        assert c.is_rescaled(k6) is False


def test_fine_stage_without_drift_is_not_rescaled(tmp_path, monkeypatch):
    from lrd_fx.cost.timer import Measurement
    from lrd_fx.passes import search_ranks as sr

    timer, g, _ = _fine_stage_timer(tmp_path, monkeypatch, {"ref:4": 1.0, "ref:8": 1.1, "5": 1.05})
    g.times = {4: Measurement(1.0, 0.0, 3), 8: Measurement(1.1, 0.0, 3)}
    out = sr.time_with_refs(timer, g, refs=[4, 8], new=[5])
    timer.close()
    assert out[5].median_s == pytest.approx(1.05)
    with cache.TimingCache(tmp_path / "c.sqlite") as c:
        assert c.is_rescaled(timer.cache_key(g, "5")) is False
    assert cache.cache_info(tmp_path / "c.sqlite")["rescaled"] == 0


def test_search_returns_plan_and_note_as_annotated(monkeypatch):
    import typing

    from lrd_fx.passes import search_ranks as sr

    ret = typing.get_type_hints(sr._search)["return"]
    assert typing.get_origin(ret) is tuple and typing.get_args(ret) == (dict, str)
    seen = []
    real = sr._search

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(sr, "_search", spy)
    with use_cost_fn(Staircase()):
        lrd_fx.compile(convs(1), (X,), rank=20, rank_search="infer", progress=False)
    plan, note = seen[0]
    assert isinstance(plan, dict) and "0" in plan and isinstance(note, str) and "rank search" in note
