"""The whole-model guard: a decomposed model slower than the original as a whole gives layers back."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.cost.timer import use_cost_fn, use_fake_clock
from lrd_fx.factorize import FactorChain
from lrd_fx.passes import check_speed, guard
from lrd_fx.passes.guard import revert_order, step_counts
from lrd_fx.plan import LayerRecord
from tests.test_precision_search import X, convs, stair

LAYERS = ["0", "2", "4", "6"]        # the convs of convs(4)


def chains_in(model) -> set:
    return {n for n, m in model.named_modules() if isinstance(m, FactorChain)}


class WholeClock:
    """A fake clock: per layer a staircase where every chain beats its original (so the search keeps
    them all); the whole original model costs 10 ms, the decomposed one `whole(chain names)` ms."""

    def __init__(self, whole):
        self.whole, self.models = whole, []

    def __call__(self, info):
        if info.label == "reference":
            return 1e-3
        if info.label == "original":
            return 10e-3
        if info.label == "lrd":
            names = chains_in(info.module)
            self.models.append(names)
            return self.whole(names) * 1e-3
        return stair(info.module) * 1e-3


@pytest.fixture
def timings(monkeypatch):
    """The chain names of each whole-model timing (one per call of the check's measurement), in order."""
    seen = []

    def counted(measure):
        def wrapper(gm, ctx, cost_fn, **kw):
            seen.append(chains_in(gm))
            return measure(gm, ctx, cost_fn, **kw)
        return wrapper
    monkeypatch.setattr(guard, "_measure", counted(guard._measure))
    monkeypatch.setattr(check_speed, "_measure", counted(check_speed._measure))
    return seen


def _compile(clock, model=None, **kw):
    with use_fake_clock(clock):
        return lrd_fx.compile(model or convs(4), (X,), rank=20, rank_search="infer", progress=False,
                              cache=False, **kw)


def test_slower_whole_model_gives_back_the_layer_that_costs(timings):
    """Layer "0"'s factors cost the whole model 5 ms (per layer they look faster): with every layer's
    measured gain equal, "0" goes back first, the model is then 10/7 = 1.43x and the guard stops there."""
    clock = WholeClock(lambda names: 10 - len(names) + (5 if "0" in names else 0))
    gm = _compile(clock)
    plan = gm.lrd.plan
    assert plan["0"]["decision"] == "reverted" and "whole-model guard" in plan["0"]["reason"]
    assert all(plan[n]["decision"] == "searched" for n in LAYERS[1:])
    assert isinstance(gm.get_submodule("0"), nn.Conv2d) and chains_in(gm) == set(LAYERS[1:])
    g = gm.lrd.guard
    assert g["before"] == pytest.approx(10 / 11) and g["after"] == pytest.approx(10 / 7) and g["reverted"] == ["0"]
    assert gm.lrd.whole_model["speedup"] == pytest.approx(10 / 7)   # the guard's last timing is the check's
    assert timings == [set(LAYERS), set(LAYERS[1:])]                # no third timing of the same model
    assert "1 of 4 factorized layers given back (0), now 1.43x" in " ".join(gm.lrd.notes)
    assert "NOT faster" not in gm.lrd.report()


def test_always_slower_gives_every_layer_back(timings):
    """Any chain slows the whole model: a quarter, half, three quarters and all are tried; only all
    reach the original's speed, so all go back and the model computes what the original does."""
    clock = WholeClock(lambda names: 10 + len(names))
    model = convs(4)
    gm = _compile(clock, model)
    assert all(gm.lrd.plan[n]["decision"] == "reverted" for n in LAYERS) and not chains_in(gm)
    assert [len(m) for m in timings] == [4, 3, 2, 1, 0]        # each step timed, on a copy
    assert gm.lrd.guard["after"] == pytest.approx(1.0) and gm.lrd.whole_model["speedup"] == pytest.approx(1.0)
    assert "all 4 were given back" in " ".join(gm.lrd.notes)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    assert gm.lrd.params_after == sum(p.numel() for p in model.parameters())


def test_guard_off_keeps_the_factors_and_says_not_faster():
    gm = _compile(WholeClock(lambda names: 10 + len(names)), whole_model_guard=False)
    assert chains_in(gm) == set(LAYERS) and gm.lrd.guard is None
    assert "NOT faster than the original" in gm.lrd.report()


def test_a_faster_model_is_timed_once_and_kept(timings):
    clock = WholeClock(lambda names: 10 - len(names))
    gm = _compile(clock)
    assert chains_in(gm) == set(LAYERS) and gm.lrd.guard is None and timings == [set(LAYERS)]
    assert gm.lrd.whole_model["speedup"] == pytest.approx(10 / 6)


def test_gates_apply_to_the_layers_kept_and_the_final_model_is_timed_again(timings):
    clock = WholeClock(lambda names: 10 - len(names) + (5 if "0" in names else 0))
    gm = _compile(clock, freeze="sequential")
    assert isinstance(gm.get_submodule("0"), nn.Conv2d) and chains_in(gm) == set(LAYERS[1:])
    assert timings == [set(LAYERS), set(LAYERS[1:]), set(LAYERS[1:])]   # guard twice, then the gated model
    gm.lrd.freezer.set_epoch(1)
    gm(X).sum().backward()
    assert gm.get_submodule("0").weight.grad is not None


def test_a_guarded_model_saves_and_loads(tmp_path):
    gm = _compile(WholeClock(lambda names: 10 - len(names) + (5 if "0" in names else 0)))
    path = tmp_path / "m.lrd"
    lrd_fx.save(gm, path)
    back = lrd_fx.load(convs(4), path, (X,))
    assert back.lrd.plan["0"]["decision"] == "reverted" and chains_in(back) == set(LAYERS[1:])
    with torch.no_grad():
        torch.testing.assert_close(back(X), gm(X))


def test_cost_function_guards_only_when_asked():
    def cost(module, shape, mode):
        if isinstance(module, torch.fx.GraphModule):
            return 1.0 + len(chains_in(module))
        return 1.0 if isinstance(module, nn.Sequential) else stair(module)
    with use_cost_fn(cost):
        quiet = lrd_fx.compile(convs(4), (X,), rank=20, rank_search="infer", progress=False)
        asked = lrd_fx.compile(convs(4), (X,), rank=20, rank_search="infer", progress=False,
                               whole_model_guard=True)
    assert chains_in(quiet) == set(LAYERS) and quiet.lrd.guard is None
    assert not chains_in(asked) and asked.lrd.guard["before"] == pytest.approx(0.2)


def test_guard_options_are_checked():
    with pytest.raises(lrd_fx.ConfigError, match="whole_model_guard"):
        lrd_fx.compile(convs(), (X,), whole_model_guard="yes")
    with pytest.raises(lrd_fx.ConfigError, match="whole_model_guard=True needs example_inputs"):
        lrd_fx.compile(convs(), whole_model_guard=True)


def test_revert_order_unmeasured_first_then_least_gain():
    def rec(name, t_orig=None, t_chosen=None, flops=(100, 50), decision="searched"):
        return LayerRecord(name=name, kind="Conv2d", decision=decision, time_original_s=t_orig, time_chosen_s=t_chosen,
                           flops_before=flops[0], flops_after=flops[1])
    records = {"a": rec("a", 1.0, 0.5), "b": rec("b", 1.0, 0.9), "c": rec("c", flops=(100, 30), decision="decomposed"),
               "d": rec("d", flops=(100, 60), decision="decomposed"), "e": rec("e", 1.0, 0.7),
               "f": rec("f", decision="reverted"), "g": rec("g", decision="skipped")}
    assert revert_order(records) == ["d", "c", "b", "e", "a"]


@pytest.mark.parametrize("n, want", [(0, []), (1, [1]), (2, [1, 2]), (4, [1, 2, 3, 4]), (10, [3, 5, 8, 10]),
                                     (53, [14, 27, 40, 53])])
def test_step_counts(n, want):
    assert step_counts(n) == want


def _slower_with_chains(module, shape, mode):
    if isinstance(module, torch.fx.GraphModule):
        return 1.0 + len(chains_in(module))
    return 1.0 if isinstance(module, nn.Sequential) else stair(module)


def _guard_worker(rank: int) -> dict:
    out = {}
    # without gates the check reuses the guard's timing: every process must skip it together, or the
    # others would wait for process 0's broadcast forever
    for freeze in ("sequential", None):
        with use_cost_fn(_slower_with_chains):
            gm = lrd_fx.compile(convs(4), (X,), rank=20, rank_search="infer", progress=False,
                                whole_model_guard=True, whole_model_check=True, freeze=freeze)
        out[freeze] = {"chains": sorted(chains_in(gm)), "plan": {n: p["decision"] for n, p in gm.lrd.plan.items()},
                       "reasons": {n: p["reason"] for n, p in gm.lrd.plan.items()},
                       "whole_model": gm.lrd.whole_model}
    return out


def test_every_process_gives_back_the_same_layers(tmp_path):
    """Under torch.distributed process 0 times and decides; the others give back the layers it names."""
    from tests.test_ddp import spawn_two
    r0, r1 = spawn_two(_guard_worker, tmp_path, "guard workers")
    assert r0 == r1
    for run in r0.values():
        assert run["chains"] == [] and set(run["plan"].values()) == {"reverted"}
        assert all("whole-model guard" in why for why in run["reasons"].values())
    assert r0[None]["whole_model"]["speedup"] == pytest.approx(1.0)     # the guard's last timing, on both


def test_when_giving_back_does_not_help_the_factors_stay(timings):
    """The decomposed model is slower whatever it keeps (time lost outside the factorized layers): every
    step is tried on a copy, none helps, and the returned model keeps all its factors."""
    gm = _compile(WholeClock(lambda names: 11.0))
    assert chains_in(gm) == set(LAYERS) and all(gm.lrd.plan[n]["decision"] == "searched" for n in LAYERS)
    assert [len(m) for m in timings] == [4, 3, 2, 1, 0]
    assert gm.lrd.guard["reverted"] == [] and "giving layers back did not help" in " ".join(gm.lrd.notes)
    assert gm.lrd.whole_model["speedup"] == pytest.approx(10 / 11)


def test_all_go_back_when_that_is_measurably_faster_even_below_the_original():
    """The traced graph itself costs 5% here: giving every layer back reaches 0.95x, not 1.0x, but that is
    measurably faster than the 0.69x with all factors, so all go back and the note gives the speed."""
    gm = _compile(WholeClock(lambda names: 10.5 + len(names)))
    assert not chains_in(gm) and gm.lrd.guard["after"] == pytest.approx(10 / 10.5)
    assert "all 4 were given back: the model keeps the original layers, now 0.95x" in " ".join(gm.lrd.notes)
    rep = gm.lrd.report()
    assert "gave every factorized layer back, and what remains is the traced graph's own overhead" in rep
    assert "per-layer gains did not add up" not in rep


def test_the_whole_model_plan_keeps_its_parameter_budget_unless_the_guard_is_asked_for():
    """rank_budget= asks for a parameter budget that layers given back would break: the guard is off by
    default there (the check still says the model is not faster), and whole_model_guard=True turns it on."""
    slow = WholeClock(lambda names: 10 + len(names))
    planned = _compile(slow, rank_budget=0.5)
    assert chains_in(planned) and planned.lrd.guard is None
    assert "NOT faster than the original" in planned.lrd.report()
    asked = _compile(WholeClock(lambda names: 10 + len(names)), rank_budget=0.5, whole_model_guard=True)
    assert not chains_in(asked) and asked.lrd.guard["reverted"]
