"""Rank search measures what will run (autocast, channels_last, execution form), survives a busy machine,
aligns ranks, and checks the whole model: all with cost functions or a fake clock, no real clock."""
import math
import random

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.cost import cache, timer
from lrd_fx.cost.timer import use_cost_fn, use_fake_clock
from lrd_fx.factorize.ranks import align_rank, aligned_in
from lrd_fx.factorize import FactorChain
from lrd_fx.passes import search_ranks as sr
from tests.conftest import state_hash

X = torch.randn(2, 32, 5, 5)


def convs(n=1, c=32):
    layers = []
    for _ in range(n):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def lead_rank(m):
    return m.core.out_channels if "core" in m.roles() else (
        m.first.out_features if isinstance(m.first, nn.Linear) else m.first.out_channels)


def stair(module, original=10.0, step=16):
    """Synthetic staircase: chains jump by 20% after every multiple of `step`; originals cost `original`."""
    if isinstance(module, FactorChain):
        r = lead_rank(module)
        return 1.0 + 0.001 * r + 0.2 * math.ceil(r / step)
    return original


def nhwc_3x3(module) -> bool:
    """A 3x3 conv weight of the module is laid out channels_last (and therefore not contiguous)."""
    ws = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    return bool(ws) and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                            for w in ws)


# --- 1. the search measures what will run ------------------------------------------------------

def test_cost_fn_runs_under_the_callers_autocast_and_layout():
    seen = []

    def cost(module, shape, mode):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), nhwc_3x3(module)))
        return stair(module)

    model = convs()
    x = X.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_cost_fn(cost):
        gm = lrd_fx.compile(model, (x,), rank=20, rank_search="infer", progress=False)
    assert seen and all(s == (True, torch.bfloat16, True) for s in seen)
    assert gm.lrd.setting.amp == "bf16" and gm.lrd.setting.memory_format == "channels_last"
    assert gm.lrd.plan["0"]["ranks"] == [16, 16]
    assert "autocast bf16, channels_last, eager" in " ".join(gm.lrd.notes)
    # outside the compile call nothing is left on, and the model was searched, not changed
    assert not torch.is_autocast_enabled("cpu")


def test_amp_option_and_off():
    seen = []

    def cost(module, shape, mode):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return stair(module)

    with use_cost_fn(cost):     # no autocast active: amp= asks for it
        lrd_fx.compile(convs(), (X,), rank=20, rank_search="train", amp="bf16", progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), use_cost_fn(cost):   # amp="off" wins over autocast
        gm = lrd_fx.compile(convs(), (X,), rank=20, rank_search="train", amp="off", progress=False)
    assert seen and set(seen) == {False}
    assert gm.lrd.setting.amp is None


def test_weights_channels_last_without_channels_last_inputs():
    seen = []

    def cost(module, shape, mode):
        if isinstance(module, nn.Conv2d) or isinstance(module, FactorChain):
            seen.append(nhwc_3x3(module))
        return stair(module)

    model = convs().to(memory_format=torch.channels_last)
    with use_cost_fn(cost):
        lrd_fx.compile(model, (X,), rank=20, rank_search="infer", progress=False)
    assert seen and all(seen)


@pytest.mark.parametrize("scheme", ["tucker2", "conv_svd"])
def test_factors_of_a_channels_last_model_are_stored_channels_last(tmp_path, scheme):
    """The chains that replace a channels_last model's convs hold channels_last k x k factors, as the
    search timed them (compile, load and fuse alike); 1 x 1 factors are both layouts at once."""
    model = convs(2).eval().to(memory_format=torch.channels_last)
    x = X.contiguous(memory_format=torch.channels_last)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, conv_scheme=scheme, progress=False)
    chains = [m for m in gm.modules() if isinstance(m, FactorChain)]
    assert len(chains) == 2 and all(nhwc_3x3(c) for c in chains)
    path = str(tmp_path / "m.safetensors")
    lrd_fx.save(gm, path)
    loaded = lrd_fx.load(model, path)
    assert all(nhwc_3x3(c) for c in loaded.modules() if isinstance(c, FactorChain))
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    assert nhwc_3x3(lrd_fx.fuse(gm))
    plain = lrd_fx.compile(convs(2).eval(), (X,), ratio=0.5, conv_scheme=scheme, progress=False)
    assert not any(nhwc_3x3(c) for c in plain.modules() if isinstance(c, FactorChain))


def test_cache_keys_differ_by_amp_and_execution_form(tmp_path):
    base = dict(device="cpu", dtype=torch.float32, memory_format="contiguous", signature="s", input_shape=(2, 3),
                rank="8", objective="infer")
    fp32, bf16 = cache.make_key(**base), cache.make_key(**base, amp="bf16")
    graphed = cache.make_key(**base, exec_form="cuda_graph")
    assert len({tuple(k.values()) for k in (fp32, bf16, graphed)}) == 3
    assert fp32 == cache.make_key(**base, amp=None, exec_form="eager")   # old rows stay valid

    path = tmp_path / "t.sqlite"

    def cost(module, shape, mode):
        calls.append(1)
        return stair(module)
    cost.cache_tag = "stair"
    calls = []
    with use_cost_fn(cost):
        lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, cache=str(path))
    first = len(calls)
    n = cache.cache_info(path)["entries"]
    with torch.autocast("cpu", dtype=torch.bfloat16), use_cost_fn(cost):
        lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, cache=str(path))
    assert len(calls) == 2 * first                     # nothing from the fp32 rows
    assert cache.cache_info(path)["entries"] == 2 * n
    with use_cost_fn(cost):
        lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, cache=str(path))
    assert len(calls) == 2 * first                     # fp32 again: all from the cache


@pytest.fixture
def tf32_flags():
    """Set torch.backends' TF32 flags (mm, conv) for a test and put them back after (its modules'
    attributes are properties, which monkeypatch cannot undo)."""
    was = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    def set_(mm, conv):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm, conv
    yield set_
    set_(*was)


def test_tf32_settings_key_cuda_fp32_timings_only(tf32_flags):
    """TF32 changes what fp32 CUDA kernels cost: settings other than PyTorch's defaults are part of the
    timing's key (and the search's note); off CUDA, in other dtypes or under autocast they say nothing."""
    cuda = torch.device("cuda")
    tf32_flags(False, True)
    assert timer.tf32_state(cuda, torch.float32, None) is None            # the defaults
    tf32_flags(True, True)
    assert timer.tf32_state(cuda, torch.float32, None) == "tf32 matmul"
    assert timer.tf32_state("cpu", torch.float32, None) is None
    assert timer.tf32_state(cuda, torch.bfloat16, None) is None
    assert timer.tf32_state(cuda, torch.float32, "bf16") is None
    tf32_flags(True, False)
    assert timer.tf32_state(cuda, torch.float32, None) == "tf32 matmul+no tf32 conv"
    base = dict(device="cpu", dtype=torch.float32, memory_format="contiguous", signature="s", input_shape=(2, 3),
                rank="8", objective="infer")
    keys = [cache.make_key(**base, tf32=t) for t in (None, "tf32 matmul", "tf32 matmul+no tf32 conv")]
    assert len({k["dtype"] for k in keys}) == 3 and keys[0] == cache.make_key(**base)
    assert "tf32 matmul" in timer.Setting(tf32="tf32 matmul").describe()
    assert "tf32" not in timer.Setting().describe()


def test_execution_form_compile_builds_compiled_steps(monkeypatch):
    compiled = []

    def fake_compile(m, *a, **k):      # stands in for torch.compile: records, runs eagerly
        compiled.append(type(m).__name__)
        return m
    monkeypatch.setattr(torch, "compile", fake_compile)
    infos = []

    def clock(info):
        infos.append(info)
        return 1e-3 if info.label == "reference" else stair(info.module) * 1e-3

    with use_fake_clock(clock):
        gm = lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False,
                            rank_search_exec="compile", cache=False)
    assert "FactorChain" in compiled and "Conv2d" in compiled
    assert {i.setting.exec_form for i in infos if i.label == "candidate"} == {"compile"}
    assert gm.lrd.plan["0"]["ranks"] == [16, 16] and gm.lrd.whole_model["exec_form"] == "compile"


def test_cuda_graph_needs_cuda():
    with pytest.raises(lrd_fx.LRDError, match="rank_search_exec='cuda_graph'"):
        lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", rank_search_exec="cuda_graph", progress=False)


def test_defaults_by_device_and_precision():
    assert timer.default_align("cuda", torch.float32, "bf16") == 8
    assert timer.default_align("cuda", torch.float16, None) == 8
    assert timer.default_align("cuda", torch.float32, None) == 1
    assert timer.default_align("cpu", torch.bfloat16, "bf16") == 1
    assert timer.resolve_exec("auto", "cuda") == "cuda_graph" and timer.resolve_exec("auto", "cpu") == "eager"
    assert timer.resolve_amp(None, "fp16") == "fp16" and timer.resolve_amp("off", "bf16") is None
    with pytest.raises(lrd_fx.LRDError, match="amp"):
        lrd_fx.compile(convs().to(torch.bfloat16), (X.to(torch.bfloat16),), amp="fp16", whole_model_check=True)
    # nothing timed: options for another device are no error (a config written on a GPU machine)
    lrd_fx.compile(convs(), (X,), rank=20, rank_search_exec="cuda_graph")


def test_factorization_is_full_precision_under_the_callers_autocast():
    model = convs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = lrd_fx.compile(model, (X,), rank="full", progress=False)
    torch.testing.assert_close(gm(X), model(X), rtol=1e-4, atol=1e-4)


# --- contention: a noisy burst does not flip the decision ----------------------------------------

class FakeDevice:
    """A fake clock: a staircase device (original 1.3, chains ~1.0-1.6, reference kernel 1) whose calls
    in [burst_from, burst_to) are slowed by a random factor in [1, 4] (another process: only adds time)."""

    def __init__(self, burst=None, seed=0):
        self.burst, self.calls, self.rng = burst, 0, random.Random(seed)
        self.labels = []

    def __call__(self, info):
        self.calls += 1
        self.labels.append(info.label)
        if info.label == "reference":
            t = 1.0
        elif isinstance(info.module, FactorChain):
            t = stair(info.module)
        else:
            t = 1.3
        if self.burst and self.burst[0] <= self.calls < self.burst[1]:
            t *= 1 + 3 * self.rng.random()
        return t * 1e-3


def _search(fake, **kw):
    with use_fake_clock(fake):
        return lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, cache=False,
                              whole_model_check=False, **kw)


def test_noisy_burst_does_not_flip_the_decision(monkeypatch):
    quiet = _search(FakeDevice())
    want = quiet.lrd.plan["0"]
    assert want["decision"] == "searched" and want["ranks"] == [16, 16]
    assert not any("busy" in n for n in quiet.lrd.notes)
    # a burst over the first rounds of the first batch (after the reference kernel's 5 quiet timings)
    burst = (6, 80)
    # without re-measurement the burst does flip it (so the test tests something)
    monkeypatch.setattr(sr, "MAX_REMEASURE", 0)
    monkeypatch.setattr(sr, "MAX_RECHECK", 0)
    naive = _search(FakeDevice(burst))
    assert (naive.lrd.plan["0"]["ranks"], naive.lrd.plan["0"]["decision"]) != (want["ranks"], want["decision"])
    monkeypatch.undo()
    fake = FakeDevice(burst)
    got = _search(fake)
    assert (got.lrd.plan["0"]["ranks"], got.lrd.plan["0"]["decision"]) == (want["ranks"], want["decision"])
    notes = " ".join(got.lrd.notes)
    assert "the machine was busy" in notes and "measured again" in notes
    assert "reference" in fake.labels


def test_lasting_load_is_reported_but_not_measured_again_and_again():
    """Everything twice as slow after the reference kernel's quiet timing (another process that stays):
    the report says the machine was busy; only the first batch, where the slowdown began, is re-measured,
    and the decision is the quiet one."""
    class Loaded(FakeDevice):
        def __call__(self, info):
            t = super().__call__(info)
            return t if self.calls <= 5 else 2 * t
    fake = Loaded()
    gm = _search(fake)
    assert gm.lrd.plan["0"]["ranks"] == [16, 16]
    notes = " ".join(gm.lrd.notes)
    assert "the machine was busy" in notes and "reference kernel up to 2.00x" in notes
    import re
    again = int(re.search(r"(\d+) timings measured again", notes).group(1))
    first_batch = len(gm.lrd.plan["0"]["candidates"]) + 1     # coarse ranks + the original
    assert 0 < again <= first_batch


def test_spread_of_repeats_triggers_remeasurement():
    """Cost functions may answer one sample per repeat: a spread beyond the bound is measured again."""
    calls = {"n": 0}

    def cost(module, shape, mode):
        calls["n"] += 1
        t = stair(module, original=1.3)
        return [t] * 7 if calls["n"] > 30 else [t, t, t, 3 * t, 4 * t, t * 5, t * 4]
    with use_cost_fn(cost):
        gm = lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False,
                            whole_model_check=False)
    assert gm.lrd.plan["0"]["ranks"] == [16, 16]
    assert "measured again" in " ".join(gm.lrd.notes)


class Smooth(FakeDevice):
    """A fake clock on a smooth curve (a chain costs 1 + 0.01 * rank, no step anywhere, original 1.3)
    where, up to call `until`, ranks above 16 look 15% slower (`fake="edge"`) or rank 16 15% faster
    (`fake="lucky"`): one noisy pass faking a step edge just below the estimate 20."""

    def __init__(self, until=0, fake="edge"):
        super().__init__()
        self.until, self.fake = until, fake

    def __call__(self, info):
        self.calls += 1
        self.labels.append(info.label)
        if info.label == "reference":
            return 1e-3
        if not isinstance(info.module, FactorChain):
            return 1.3e-3
        r = lead_rank(info.module)
        t = 1.0 + 0.01 * r
        if self.calls <= self.until:
            if self.fake == "edge" and r > 16:
                t *= 1.15
            elif self.fake == "lucky" and r == 16:
                t *= 0.85
        return t * 1e-3


def _first_pass_calls() -> int:
    """Clock calls of one search pass over `convs()` on the smooth curve (its choice, the estimate,
    needs no re-check)."""
    quiet = Smooth()
    gm = _search(quiet)
    assert gm.lrd.plan["0"]["ranks"] == [20, 20] and "re-measured" not in " ".join(gm.lrd.notes)
    return quiet.calls


@pytest.mark.parametrize("fake", ["edge", "lucky"])
def test_a_step_edge_seen_once_does_not_decide(monkeypatch, fake):
    """A choice below the estimate rests on a step edge: it is re-measured even on an idle machine, and
    an edge that one pass faked (a slow stretch, or one rank timed too fast) does not survive."""
    first = _first_pass_calls()
    got = _search(Smooth(until=first, fake=fake))
    assert got.lrd.plan["0"]["ranks"] == [20, 20]
    assert "1 choices below the estimate re-measured, 0 confirmed" in " ".join(got.lrd.notes)
    # without the re-check the fake edge decides (so the test tests something)
    monkeypatch.setattr(sr, "MAX_RECHECK", 0)
    assert _search(Smooth(until=first, fake=fake)).lrd.plan["0"]["ranks"] == [16, 16]
    if fake == "lucky":
        # and merging the re-measurement into the old timings would keep the lucky one, and its edge
        monkeypatch.undo()
        plain = sr.CandidateTimer.remeasure
        monkeypatch.setattr(sr.CandidateTimer, "remeasure",
                            lambda self, g, wanted, merge=True: plain(self, g, wanted, merge=True))
        assert _search(Smooth(until=first, fake=fake)).lrd.plan["0"]["ranks"] == [16, 16]


def test_a_real_step_edge_is_confirmed_by_one_re_measurement():
    first = _first_pass_calls()
    fake = Smooth(until=10 ** 9)
    got = _search(fake)
    assert got.lrd.plan["0"]["ranks"] == [16, 16]
    assert "1 choices below the estimate re-measured, 1 confirmed" in " ".join(got.lrd.notes)
    assert first < fake.calls < 2.5 * first          # one re-measurement, not MAX_RECHECK of them


def test_a_choice_from_cached_timings_is_not_re_measured(tmp_path):
    """The cache holds the re-measured pass: a second compile decides the same from it, measuring nothing."""
    db = str(tmp_path / "t.sqlite")
    with use_fake_clock(Smooth(until=10 ** 9)):
        cold = lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, cache=db,
                              whole_model_check=False)
    warm_clock = Smooth(until=10 ** 9)
    with use_fake_clock(warm_clock):
        warm = lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, cache=db,
                              whole_model_check=False)
    assert cold.lrd.plan["0"]["ranks"] == warm.lrd.plan["0"]["ranks"] == [16, 16]
    assert "1 choices below the estimate re-measured" in " ".join(cold.lrd.notes)
    assert "re-measured" not in " ".join(warm.lrd.notes) and "0 timings measured" in " ".join(warm.lrd.notes)
    assert warm_clock.calls == 0


def test_a_decision_no_two_passes_agree_on_goes_to_the_majority():
    """Edge, no edge, edge again (three passes, none agreeing with the one before): the majority (the
    edge, 2 of 3) is what the plan takes, and the reason says so."""
    first = _first_pass_calls()
    confirmed = Smooth(until=10 ** 9)
    _search(confirmed)
    second = confirmed.calls          # the end of the first re-measurement

    class Flip(Smooth):
        def __call__(self, info):
            self.until = 0 if first <= self.calls < second else 10 ** 9
            return super().__call__(info)
    fake = Flip()
    got = _search(fake)
    entry = got.lrd.plan["0"]
    assert entry["ranks"] == [16, 16] and "settled by re-measurement: 2 of 3" in entry["reason"]
    assert "1 choices below the estimate re-measured, 1 confirmed" in " ".join(got.lrd.notes)


def test_decisions_no_two_measurements_agree_on_are_settled_by_majority():
    def e(ranks):
        return {"ranks": ranks, "reverted": ranks is None, "reason": "r"}
    assert sr._settle([e([16]), e([24]), e([16])])["ranks"] == [16]
    assert sr._settle([e([16]), e([24]), e([20])])["ranks"] == [24]        # a tie: the largest rank
    assert sr._settle([e(None), e([24]), e([20])])["reverted"]             # ... the original the largest
    assert "2 of 3 measurements" in sr._settle([e([16]), e([24]), e([16])])["reason"]


# --- 2. hardware-aligned ranks -------------------------------------------------------------------

def test_align_rank_rule():
    assert align_rank(76, 8, 512) == 72           # down to the multiple
    assert align_rank(5, 8, 64) == 8              # never below one unit
    assert align_rank(512, 8, 512) == 512         # full rank (exact) stays
    assert align_rank(5, 8, 6) == 5               # full rank below one unit: as it was
    assert align_rank(77, 1, 512) == 77 and align_rank(77, None, 512) == 77
    assert aligned_in(15, 25, 8) == [16, 24] and aligned_in(1, 9, 8) == [8] and aligned_in(3, 90, 1) == []


def test_estimate_is_aligned_but_given_ranks_are_not():
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Conv2d(64, 64, 3))
    x = torch.randn(2, 100)
    gm = lrd_fx.compile(model[:1], (x,), ratio=0.25, align=8)
    rec = gm.lrd.plan["0"]
    assert rec["estimate"] == [12] and rec["ranks"] == [8] and "aligned to a multiple of 8" in rec["reason"]
    assert gm(x).shape == (2, 100)
    plain = lrd_fx.compile(model[:1], (x,), ratio=0.25)     # CPU fp32: align "auto" is 1
    assert plain.lrd.plan["0"]["ranks"] == [12] and plain.lrd.setting.align == 1
    given = lrd_fx.compile(model[:1], (x,), rank=12, align=8)
    assert given.lrd.plan["0"]["ranks"] == [12]
    conv = lrd_fx.compile(model[2:], (torch.randn(1, 64, 6, 6),), ratio=0.25, align=8)
    rec = conv.lrd.plan["2"]
    assert rec["estimate"] != rec["ranks"] and all(r % 8 == 0 for r in rec["ranks"])


def test_search_candidates_include_every_aligned_rank_in_the_window():
    seen = set()

    def cost(module, shape, mode):
        if isinstance(module, FactorChain):
            seen.add(lead_rank(module))
            assert module.core.in_channels % 8 == 0      # the other rank of the pair is aligned too
        return stair(module, step=64)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1))
    with use_cost_fn(cost):
        gm = lrd_fx.compile(model, (torch.randn(1, 64, 4, 4),), rank={"0": (30, 60)}, rank_search="infer",
                            rank_search_window=0.5, align=8, progress=False)
    assert set(range(32, 88, 8)) <= seen          # window [30, 90] around 60
    assert gm.lrd.plan["0"]["ranks"][0] % 8 == 0      # r_in on the line, aligned


# --- 3. whole-model check ------------------------------------------------------------------------

def _whole(fake_lrd_s, mode="train", model=None, **kw):
    infos = []

    def clock(info):
        infos.append(info)
        if info.label == "original":
            return 10e-3
        if info.label == "lrd":
            return fake_lrd_s
        return 1e-3 if info.label == "reference" else stair(info.module) * 1e-3
    with use_fake_clock(clock):
        gm = lrd_fx.compile(model or convs(1), (X,), rank=20, rank_search=mode, progress=False, cache=False, **kw)
    return gm, infos


def test_whole_model_check_faster_and_not_faster():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
    before = state_hash(model)
    gm, infos = _whole(8e-3, model=model)      # "train": BatchNorm statistics would move on the model timed
    wm = gm.lrd.whole_model
    assert wm["original_s"] == pytest.approx(10e-3) and wm["lrd_s"] == pytest.approx(8e-3)
    assert wm["speedup"] == pytest.approx(1.25) and wm["faster"] and wm["mode"] == "train"
    rep = gm.lrd.report()
    assert "whole model (train" in rep and "speed-up 1.25x" in rep and "NOT faster" not in rep
    whole = [i for i in infos if i.label in ("original", "lrd")]
    assert {i.label for i in whole} == {"original", "lrd"} and all(i.mode == "train" for i in whole)
    slow, _ = _whole(12.5e-3, mode="infer", whole_model_guard=False)     # the guard would give the layer back
    assert slow.lrd.whole_model["speedup"] == pytest.approx(0.8) and not slow.lrd.whole_model["faster"]
    assert "NOT faster than the original" in slow.lrd.report()
    assert state_hash(model) == before


def test_whole_model_check_in_the_same_precision_and_layout():
    infos = []

    def clock(info):
        infos.append((info.label, info.setting, torch.is_autocast_enabled("cpu")))
        return 1e-3 if info.label != "lrd" else 0.5e-3
    model = convs()
    x = X.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_fake_clock(clock):
        gm = lrd_fx.compile(model, (x,), ratio=0.5, whole_model_check=True, progress=False)
    whole = [(s, on) for label, s, on in infos if label in ("original", "lrd")]
    assert whole and all(s.amp == "bf16" and s.memory_format == "channels_last" and on for s, on in whole)
    assert gm.lrd.whole_model["speedup"] == pytest.approx(2.0) and gm.lrd.whole_model["mode"] == "infer"


def test_whole_model_check_does_not_touch_the_returned_model():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
    with use_fake_clock(lambda info: 1e-3):
        gm = lrd_fx.compile(model, (X,), ratio=0.5, whole_model_check=True, rank_search=None, progress=False)
        ref = lrd_fx.compile(model, (X,), ratio=0.5, progress=False)
    assert gm.lrd.whole_model is not None and ref.lrd.whole_model is None
    torch.testing.assert_close(gm.get_submodule("1").running_mean, ref.get_submodule("1").running_mean)


def test_whole_model_check_with_cost_functions():
    with use_cost_fn(lambda m, shape, mode: stair(m)):
        auto = lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False)
    assert auto.lrd.whole_model is None and "whole-model check skipped" in " ".join(auto.lrd.notes)
    seen = []

    def cost(module, shape, mode):
        seen.append(type(module).__name__)
        return 1.0 if isinstance(module, nn.Sequential) else 0.5 if isinstance(module, torch.fx.GraphModule) \
            else stair(module)
    with use_cost_fn(cost):
        gm = lrd_fx.compile(convs(), (X,), rank=20, rank_search="infer", progress=False, whole_model_check=True)
    assert gm.lrd.whole_model["speedup"] == pytest.approx(2.0) and "GraphModule" in seen


def test_whole_model_check_needs_example_inputs():
    with pytest.raises(lrd_fx.LRDError, match="whole_model_check"):
        lrd_fx.compile(convs(), whole_model_check=True)


def test_whole_model_check_failure_is_a_note_not_a_crash():
    class NoGrad(nn.Module):          # its output never requires grad: "train" cannot be timed whole
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            return self.lin(x).detach()
    x = torch.randn(2, 32)
    with use_fake_clock(lambda info: 1e-3):
        gm = lrd_fx.compile(NoGrad(), (x,), ratio=0.5, rank_search="train", progress=False, cache=False)
    assert "error" in gm.lrd.whole_model
    assert "whole-model check failed" in gm.lrd.report()
