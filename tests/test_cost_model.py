"""Choice rule of the rank search on synthetic staircases: edges, alignment, window, revert, budget."""
import itertools
import math
import random

import pytest

from lrd_fx.cost import model as cm
from lrd_fx.cost.timer import Measurement
from lrd_fx.errors import ConfigError


def stairs(step=128, jump=0.13, slope=0.001):
    """Time grows slowly with rank and jumps at every multiple of `step` (CPU-like staircase)."""
    return lambda r: 1.0 + slope * r + jump * math.ceil(r / step)


def curve(f, ranks):
    return {r: f(r) for r in ranks}


def test_picks_rank_just_below_the_edge_under_the_estimate():
    f = stairs()
    for est, want in [(257, 256), (260, 256), (300, 256), (129, 128), (256, 256)]:
        ch = cm.staircase(curve(f, range(1, 513)), estimate=est, full=512, original=10.0)
        assert (ch.rank, ch.reverted) == (want, False), (est, ch.reason)
        assert f"{want}->" in ch.reason or est == want
        assert 128 in ch.edges or 256 in ch.edges


def test_no_edge_in_window_keeps_estimate_on_its_step():
    f = stairs(slope=0.0)
    ch = cm.staircase(curve(f, range(150, 251)), estimate=210, full=512, original=10.0)
    # speed: flat step, the best-aligned rank within 1/16 below the estimate
    assert ch.rank == 208 and not ch.reverted      # multiple of 16; 192 would lose more than 1/16
    ch = cm.staircase(curve(f, range(150, 251)), estimate=210, full=512, original=10.0, prefer="accuracy")
    assert ch.rank == 250    # same time up to the window's top


def test_prefers_aligned_rank_when_times_tie():
    # edge at 259 -> 260 (not a hardware-aligned spot): speed snaps down to 256 at equal time
    f = lambda r: 1.0 + (0.2 if r >= 260 else 0.0)
    c = curve(f, range(200, 330))
    assert cm.staircase(c, estimate=280, full=512, original=10.0).rank == 256
    assert cm.staircase(c, estimate=280, full=512, original=10.0, prefer="accuracy").rank == 259
    # but not when the aligned rank is measurably slower (no tie)
    g = lambda r: f(r) + (0.5 if r == 256 else 0.0)
    assert cm.staircase(curve(g, range(200, 330)), estimate=280, full=512, original=10.0).rank != 256


def test_reverts_when_original_is_faster():
    f = stairs()
    ch = cm.staircase(curve(f, range(200, 330)), estimate=260, full=512, original=1.0)
    assert ch.reverted and ch.rank is None and "reverted" in ch.reason and ch.time_s == 1.0


def test_margin_takes_largest_rank_that_beats_the_original():
    f = lambda r: 1.0 + 0.01 * r      # no steps: the estimate would be chosen
    c = curve(f, range(75, 126))
    ch = cm.staircase(c, estimate=100, full=512, original=2.0, margin=0.03)
    assert ch.rank == 94               # 1.94 <= 2.0 * 0.97, 1.95 is not
    assert not ch.reverted and "not 3% faster" in ch.reason


def test_window_and_full_rank_are_respected():
    f = stairs(step=16)
    c = curve(f, range(1, 1000))
    for est, window, full in [(100, 0.25, 512), (60, 0.1, 64), (40, 0.5, 45)]:
        lo, hi = cm.window_bounds(est, full, window)
        for prefer in ("speed", "accuracy"):
            ch = cm.staircase(c, estimate=est, full=full, original=100.0, window=window, prefer=prefer)
            assert lo <= ch.rank <= hi and ch.rank <= full
        cands = cm.candidate_ranks(est, full, window)
        assert min(cands) >= lo and max(cands) <= min(hi, full) and est in cands


def test_noise_hides_small_jumps():
    f = stairs(jump=0.06, slope=0.0)
    c = {r: Measurement(f(r), 0.4 * f(r), 7) for r in range(200, 330)}   # very noisy medians
    ch = cm.staircase(c, estimate=260, full=512, original=10.0)
    assert ch.edges == [] and "no step edge" in ch.reason   # estimate kept, snapped to 256 (aligned)
    quiet = {r: Measurement(f(r), 0.0, 7) for r in range(200, 330)}
    assert cm.staircase(quiet, estimate=260, full=512, original=10.0).edges == [256]


def test_coarse_to_fine_locates_the_edge():
    f = stairs()
    est, full = 300, 512
    c = curve(f, cm.candidate_ranks(est, full))
    assert 257 not in c
    for _ in range(4):
        new = cm.refine_ranks(c, est, full)
        if not new:
            break
        c.update(curve(f, new))
    assert 256 in c and 257 in c
    assert len(c) < 40       # far fewer than the 151 ranks of the window
    assert cm.staircase(c, estimate=est, full=full, original=10.0).rank == 256


def test_time_plus_error_trades_rank_for_accuracy():
    f = stairs()
    c = curve(f, range(200, 330))
    # error falls with rank; a heavy weight pushes the choice to the window's top
    err = {r: 1.0 - r / 512 for r in c}
    light = cm.time_plus_error(c, estimate=260, full=512, original=10.0, errors=err, error_weight=0.0)
    heavy = cm.choose(c, model="time+error", estimate=260, full=512, original=10.0, errors=err,
                      error_weight=100.0)
    assert light.rank < heavy.rank == 325
    # weight 0 is time alone: the fastest rank of the window (the bottom of the cheapest step)
    assert light.rank == min((r for r in c if 195 <= r <= 325), key=lambda r: (f(r), -r))
    assert "error" in heavy.reason and "x vs original" in heavy.reason
    with pytest.raises(ValueError, match="needs errors"):
        cm.time_plus_error(c, estimate=260, full=512)


def test_time_plus_error_reverts_like_staircase():
    c = {r: 5.0 for r in range(8, 13)}
    ch = cm.time_plus_error(c, estimate=10, full=16, original=5.0, errors={r: 0.0 for r in c})
    assert ch.reverted and ch.rank is None and ch.time_s == 5.0 and "reverted" in ch.reason


def test_objective_selects_the_cost_model():
    assert cm.model_for("time") == "staircase" and cm.model_for("time+error") == "time+error"
    assert cm.get_cost_model(cm.model_for("time+error")) is cm.time_plus_error
    mine = (lambda curve, **_: cm.Choice(1, False, "mine"))
    assert cm.model_for("time+error", mine) is mine            # a named model wins over the objective
    with pytest.raises(ConfigError, match="objective"):
        cm.model_for("error")


def test_bad_options_raise_config_errors():
    c = {10: 1.0}
    with pytest.raises(ConfigError, match="prefer"):
        cm.staircase(c, estimate=10, full=16, prefer="fast")
    with pytest.raises(ConfigError, match="prefer"):
        cm.time_plus_error(c, estimate=10, full=16, errors={10: 0.0}, prefer="fast")
    with pytest.raises(TypeError, match="objective"):
        cm.staircase(c, estimate=10, full=16, objective="time+error")   # time+error is its own model
    with pytest.raises(ConfigError, match="not"):
        cm.get_cost_model("nope")


def test_registry_swaps_the_rule():
    @cm.register_cost_model("always_lowest")
    def lowest(curve, *, estimate, full, original=None, **_):
        r = min(curve)
        return cm.Choice(r, False, "lowest")
    try:
        assert cm.choose({5: 1.0, 9: 0.5}, model="always_lowest", estimate=9, full=16).rank == 5
        assert cm.choose({5: 1.0, 9: 0.5}, model=lowest, estimate=9, full=16).rank == 5
    finally:
        del cm.COST_MODELS["always_lowest"]


def _brute(tables, budget, floor=0.0):
    best = None
    for combo in itertools.product(*tables.values()):
        p = sum(o.params for o in combo)
        if p > budget or p < floor:
            continue
        t = sum(o.time_s for o in combo)
        if best is None or t < best[0] - 1e-12:
            best = (t, combo)
    return best


def test_budget_plan_respects_budget_and_is_near_optimal():
    rng = random.Random(0)
    for trial in range(20):
        tables = {}
        for i in range(4):
            opts = [cm.Option(None, 1000, rng.uniform(0.5, 2.0))]
            for r in (8, 16, 24):
                opts.append(cm.Option(r, r * 20 + rng.randint(0, 30), rng.uniform(0.3, 1.5)))
            tables[f"l{i}"] = opts
        budget = rng.choice([800, 1500, 2500, 4000])
        picked = cm.plan_budget(tables, budget, spend=0.0)
        chosen = [next(o for o in tables[n] if o.key == k) for n, k in picked.items()]
        assert sum(o.params for o in chosen) <= budget
        t_opt, _ = _brute(tables, budget)
        # parameter rounding to buckets may only cost the exact optimum very little
        assert sum(o.time_s for o in chosen) <= t_opt * 1.02 + 1e-9, trial


def test_budget_plan_spends_budget_on_rank_when_times_tie():
    tables = {"a": [cm.Option(8, 100, 1.0), cm.Option(16, 200, 1.0), cm.Option(None, 1000, 3.0)]}
    assert cm.plan_budget(tables, 250) == {"a": 16}
    assert cm.plan_budget(tables, 150) == {"a": 8}
    # infeasible: the smallest options are taken
    assert cm.plan_budget(tables, 10) == {"a": 8}


def test_budget_plan_fill_spends_the_budget_on_the_fastest_plan():
    # smaller ranks are faster: without fill the plan is about the smallest model; with fill=0.95 it is
    # the fastest plan holding 95-100% of the budget
    rng = random.Random(5)
    for trial in range(15):
        tables = {f"l{i}": [cm.Option(None, 1000, rng.uniform(0.8, 2.0))] +
                  [cm.Option(r, r * 20 + rng.randint(0, 30), 0.2 + 0.01 * r + rng.uniform(0, 0.1))
                   for r in (8, 16, 24, 32)] for i in range(5)}
        budget = rng.uniform(5 * 450, 5 * 650)
        free = cm.plan_budget(tables, budget, spend=0.0)
        filled = cm.plan_budget(tables, budget, spend=0.0, fill=0.95)
        assert _plan_params(tables, free) < 0.95 * budget, trial
        p = _plan_params(tables, filled)
        assert 0.95 * budget * 0.999 <= p <= budget, trial
        t_opt, _ = _brute(tables, budget, floor=0.95 * budget)
        t = sum(next(o for o in tables[n] if o.key == k).time_s for n, k in filled.items())
        assert t <= t_opt * 1.02 + 1e-9, trial
    # a budget no plan can fill: the largest plan there is
    small = {"a": [cm.Option(8, 100, 1.0), cm.Option(16, 200, 2.0)]}
    assert cm.plan_budget(small, 1000, fill=0.9) == {"a": 16}
    with pytest.raises(ValueError, match="fill"):
        cm.plan_budget(small, 1000, fill=1.0)


def test_one_disturbed_timing_makes_no_edge():
    flat = {r: 1.0 for r in range(240, 280)}
    spike = {**flat, 257: 2.0}                 # one timing hit by another process
    assert cm.find_edges(spike, 0.05) == []
    step = {r: (1.2 if r >= 257 else 1.0) for r in flat}
    assert [(a, b) for a, b, _ in cm.find_edges(step, 0.05)] == [(256, 257)]
    assert cm.staircase(spike, estimate=260, full=512, original=10.0).edges == []


def test_single_fast_aligned_rank_is_an_edge():
    # blocked CPU kernels: multiples of 16 are much faster than their neighbours (a comb, not stairs)
    comb = {r: (0.6 if r % 16 == 0 else 1.0) + 0.002 * r for r in range(38, 65)}
    ch = cm.staircase(comb, estimate=51, full=128, original=10.0)
    assert ch.rank == 48 and 48 in ch.edges


def test_huge_noise_never_ties_a_much_slower_aligned_rank():
    c = {r: Measurement(1.0, 5.0, 3) for r in range(146, 196)}    # IQRs five times the medians
    c[192] = Measurement(4.0, 5.0, 3)
    ch = cm.staircase(c, estimate=195, full=512, original=100.0)
    assert ch.rank != 192 and c[ch.rank].median_s == 1.0


def test_never_goes_down_to_an_edge_slower_than_the_estimate():
    # an "edge" at 19->20 below the estimate 26, but 26 itself measured faster than 19
    c = {19: 0.5, **{r: 1.5 for r in range(20, 26)}, **{r: 0.4 for r in range(26, 33)}}
    ch = cm.staircase(c, estimate=26, full=64, original=10.0)
    assert ch.edges == [19] and ch.rank == 26


def _plan_params(tables, picked):
    return sum(next(o for o in tables[n] if o.key == k).params for n, k in picked.items())


def test_budget_plan_holds_a_tight_budget_over_many_layers():
    # issue 10: 60 layers, a budget 0.5% above the smallest plan; rounding every option up to a bucket
    # made the plan infeasible and the original layers (twice the parameters) came back
    tables = {f"l{i}": [cm.Option(8, 1006, 1.0), cm.Option(16, 1900 + i, 0.9), cm.Option(None, 2001, 0.5)]
              for i in range(60)}
    smallest = 60 * 1006
    for slack in (0.0, 0.005, 0.02, 0.3, 2.0):
        budget = smallest * (1 + slack)
        for buckets in (100, 4000):
            picked = cm.plan_budget(tables, budget, buckets=buckets)
            assert _plan_params(tables, picked) <= budget, (slack, buckets)
    # 2% of slack (1207 params) buys exactly one upgrade: the original (+995, fastest)
    assert _plan_params(tables, cm.plan_budget(tables, smallest * 1.02)) == smallest + 995
    assert set(cm.plan_budget(tables, smallest * 3.0).values()) == {None}


def test_budget_plan_with_few_buckets_stays_feasible():
    # buckets=100 used to walk the back-pointers off the table (IndexError)
    rng = random.Random(3)
    for trial in range(30):
        tables = {f"l{i}": [cm.Option(None, 1000, rng.uniform(0.5, 2.0))] +
                  [cm.Option(r, r * 20 + rng.randint(0, 30), rng.uniform(0.3, 1.5)) for r in (8, 16, 24)]
                  for i in range(12)}
        budget = rng.uniform(12 * 190, 12 * 1000)
        picked = cm.plan_budget(tables, budget, buckets=100, spend=0.0)
        assert set(picked) == set(tables) and _plan_params(tables, picked) <= budget, trial
    with pytest.raises(ValueError, match="buckets"):
        cm.plan_budget(tables, 5000, buckets=0)
