"""Every stage is a valid model: the module after each pass runs and, at rank="full", equals the original
(with a rank search and with calibration data too, where factorization is left to later passes)."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import lrd_fx
import lrd_fx.api
from lrd_fx.cost.timer import use_cost_fn
from lrd_fx.factorize import FactorChain
from lrd_fx.pipeline import Instrument


class RunEachStage(Instrument):
    """Runs a deep copy of the model after every pass on `x` (a copy, so that running it changes
    nothing in the compile) and keeps the outputs by pass name."""

    def __init__(self, x):
        self.x = x
        self.outputs: dict = {}

    def after_pass(self, name, result):
        stage = copy.deepcopy(result.graph_module).eval()
        with torch.no_grad():
            self.outputs[name] = stage(self.x)


def compile_stages(monkeypatch, model, x, **kw):
    """lrd_fx.compile with RunEachStage as the pass manager's instrument: (compiled model, outputs)."""
    ins = RunEachStage(x)
    with monkeypatch.context() as mp:
        mp.setattr(lrd_fx.api, "default_instruments", lambda debug, dump_dir: [ins])
        gm = lrd_fx.compile(model, (x,), progress=False, whole_model_check=False, cache=False, **kw)
    return gm, ins.outputs


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


X = torch.randn(2, 3, 6, 6)


def lead_rank(module):
    first = module.first
    return first.out_features if isinstance(first, nn.Linear) else first.out_channels


def full_rank_wins(module, shape, mode):
    """Fake timings under which the search keeps full rank: chains get faster with rank, the original slow."""
    if isinstance(module, FactorChain):
        return 1.0 + 1.0 / lead_rank(module)
    return 10.0


def steps_of_4(module, shape, mode):
    """Fake staircase: a chain's time jumps after every multiple of 4; the original is slow."""
    if isinstance(module, FactorChain):
        r = lead_rank(module)
        return 1.0 + 0.001 * r + 0.2 * math.ceil(r / 4)
    return 10.0


def assert_exact(outputs, model, passes):
    with torch.no_grad():
        want = model(X)
    for name, y in outputs.items():
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"after pass '{name}': {m}")
    assert list(outputs) == passes


def test_every_stage_is_exact_at_full_rank(monkeypatch):
    model = net()
    gm, outputs = compile_stages(monkeypatch, model, X, rank="full", min_channels=3)
    assert_exact(outputs, model, ["shape_prop", "decompose"])
    assert sum(isinstance(m, FactorChain) for m in gm.modules()) == 4


def test_every_stage_is_exact_with_a_rank_search(monkeypatch):
    model = net()
    with use_cost_fn(full_rank_wins):
        gm, outputs = compile_stages(monkeypatch, model, X, rank="full", min_channels=3, rank_search="infer")
    assert all(r["decision"] == "searched" and r["ranks"] == r["full_ranks"]
               for r in gm.lrd.plan.values() if r["decision"] != "skipped")
    assert_exact(outputs, model, ["shape_prop", "decompose", "search_ranks", "materialize"])


@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_every_stage_is_exact_with_calibration(monkeypatch, mode):
    model = net()
    calib = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    gm, outputs = compile_stages(monkeypatch, model, X, rank="full", min_channels=3, calibration=calib,
                                 calibration_mode=mode)
    assert all("data-aware" in r["reason"] for r in gm.lrd.plan.values() if r["decision"] == "decomposed")
    assert_exact(outputs, model, ["shape_prop", "calibration_stats", "decompose", "calibrate", "materialize"])


def test_stages_below_full_rank_compute_their_own_ranks(monkeypatch):
    """Below full rank each stage is the model factorized at the ranks it holds: the estimates after
    decompose, the searched ranks after search_ranks."""
    model = net()
    with use_cost_fn(steps_of_4):
        gm, outputs = compile_stages(monkeypatch, model, X, rank=6, min_channels=3, rank_search="infer")
    plan = gm.lrd.plan
    searched = {n: r["ranks"] for n, r in plan.items() if r["decision"] == "searched"}
    assert searched and any(ranks != [6] * len(ranks) for ranks in searched.values())   # the search moved some
    estimate = lrd_fx.compile(model, (X,), rank=6, min_channels=3, progress=False)
    chosen = lrd_fx.compile(model, (X,), rank={n: tuple(r) for n, r in searched.items()}, min_channels=3,
                            skip=[n for n in plan if n not in searched], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(outputs["decompose"], estimate(X), rtol=1e-4, atol=1e-5)
        for name in ("search_ranks", "materialize"):
            torch.testing.assert_close(outputs[name], chosen(X), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gm(X), chosen(X), rtol=1e-4, atol=1e-5)
