"""The timer: medians over interleaved blocks, layer steps for inference and training."""
import gc

import pytest
import torch
import torch.nn as nn

from lrd_fx.cost.timer import (Measurement, Setting, StepInfo, current_cost_fn, layer_step, measure,
                               measure_interleaved, measure_rounds, summarize, use_cost_fn, use_fake_clock)
from lrd_fx.errors import ConfigError


def test_summarize_median_and_iqr():
    m = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert m == Measurement(3.0, 2.0, 5, 1.0)
    assert summarize([2.0]).iqr_s == 0.0 and summarize([2.0]).rel_noise == 0.0


def test_measure_counts_calls_and_blocks():
    calls = []
    m = measure(lambda: calls.append(gc.isenabled()), device="cpu", repeats=3, warmup=2, min_time_s=0.0)
    assert m.n == 3 and m.median_s > 0
    # warmup + calibration + 3 blocks of 1 call: each block is timed alone (no warm-up calls of its own)
    assert len(calls) == 2 + 1 + 3
    # the timed blocks run with garbage collection off (a collection inside would be timed), the rest not
    assert calls == [True] * 3 + [False] * 3


def test_interleaved_runs_round_robin():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    res = measure_interleaved(fns, device="cpu", rounds=3, warmup=0, min_time_s=0.0)
    assert set(res) == set("abc") and all(r.n == 3 for r in res.values())
    assert len(order) == 3 + 9             # one calibration call each, then 3 rounds of 1-call blocks
    rounds = [order[i:i + 3] for i in range(3, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert rounds[0] != rounds[1]          # the order rotates between rounds
    with pytest.raises(ConfigError, match="rounds"):
        measure_interleaved(fns, rounds=0)


class _DriftingClock:
    """A fake clock for lrd_fx.cost.use_fake_clock: a block of a step lasts the step's cost times the
    machine's slowdown, which grows by `drift` every round of `per_round` blocks (a machine that gets
    busier while it is measured)."""

    def __init__(self, costs, per_round, drift=0.5):
        self.costs, self.per_round, self.drift, self.blocks = costs, per_round, drift, 0

    def __call__(self, info):
        t = self.costs[info.label] * (1 + self.drift * (self.blocks // self.per_round))
        self.blocks += 1
        return t

    def steps(self):
        """One step per cost, labelled so that the clock knows which block it times."""
        def make(label):
            def step():
                pass
            step.info = StepInfo(label, None, (), "infer", Setting())
            return step
        return {label: make(label) for label in self.costs}


def test_interleaved_tells_slow_from_fast():
    clock = _DriftingClock({"small": 1e-3, "big": 5e-3}, per_round=2)
    with use_fake_clock(clock):
        res = measure_interleaved(clock.steps(), device="cpu", rounds=5, warmup=0, min_time_s=0.0)
    # the machine slows down 3x over the rounds; interleaving hits both alike: medians keep the ratio
    assert res["small"].median_s == pytest.approx(2e-3) and res["big"].median_s == pytest.approx(1e-2)
    assert res["small"].min_s == pytest.approx(1e-3) and res["big"].n == 5
    assert res["big"].iqr_s == pytest.approx(5e-3)           # the drift shows as spread: 7.5 to 12.5 ms
    assert clock.blocks == 10                                 # one block per candidate and round


def test_layer_step_infer_makes_no_grads_and_copies():
    layer = nn.Conv2d(4, 8, 3)
    before = layer.weight.detach().clone()
    step = layer_step(layer, (2, 4, 9, 9), torch.float32, "cpu", "infer")
    step()
    assert layer.weight.grad is None and torch.equal(layer.weight, before)


def test_layer_step_train_runs_backward_on_a_copy():
    layer = nn.Linear(16, 8)
    seen = []
    layer.register_full_backward_hook(lambda *a: seen.append(1))
    step = layer_step(layer, (3, 16), torch.float32, "cpu", "train")
    step()
    step()
    assert len(seen) == 2            # the copy keeps the hook: backward really ran, twice
    assert layer.weight.grad is None  # the caller's layer is untouched


def test_layer_step_channels_last():
    step = layer_step(nn.Conv2d(4, 8, 3), (2, 4, 7, 7), torch.float32, "cpu", "train",
                      memory_format=torch.channels_last)
    step()
    w = step.info.module.weight          # the copy the step runs
    assert not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    assert step.info.setting.memory_format == "channels_last" and step.info.input_shape == (2, 4, 7, 7)
    assert w.grad is not None and w.grad.shape == w.shape     # the backward ran on the NHWC copy


def test_layer_step_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="mode"):
        layer_step(nn.Linear(2, 2), (1, 2), torch.float32, "cpu", "eval")


def test_use_cost_fn_nests():
    f, g = (lambda m, s, mode: 1.0), (lambda m, s, mode: 2.0)
    assert current_cost_fn() is None
    with use_cost_fn(f):
        with use_cost_fn(g):
            assert current_cost_fn() is g
        assert current_cost_fn() is f
    assert current_cost_fn() is None
    with pytest.raises(ConfigError):
        use_cost_fn(3)


def test_measure_rounds_gives_paired_samples():
    clock = _DriftingClock({"small": 1e-3, "big": 4e-3}, per_round=2, drift=1.0)
    with use_fake_clock(clock):
        got = measure_rounds(clock.steps(), device="cpu", rounds=4, warmup=0, min_time_s=0.0)
    assert list(got) == ["small", "big"] and all(len(v) == 4 for v in got.values())
    assert got["small"] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])      # drift: each round slower
    # sample i of both comes from round i: every paired ratio is exact despite the drift
    assert [b / s for b, s in zip(got["big"], got["small"])] == pytest.approx([4.0] * 4)
    with pytest.raises(ConfigError, match="rounds"):
        measure_rounds(clock.steps(), rounds=0)


def test_fake_clock_still_runs_the_warm_up():
    """Under a fake clock the warm-up calls run the step (autocast, layout, graphs are exercised) and
    the timed blocks do not."""
    calls = []
    step = (lambda: calls.append(1))
    with use_fake_clock(lambda info: 2e-3):
        m = measure(step, device="cpu", repeats=4, warmup=3, min_time_s=1.0)
    assert len(calls) == 3 and m == Measurement(2e-3, 0.0, 4, 2e-3)


def test_real_clock_smoke():
    """The real timer runs (its verdict is only that it measured something: no machine timing)."""
    a = torch.randn(64, 64)
    got = measure_rounds({"mm": lambda: a @ a}, device="cpu", rounds=2, warmup=0, min_time_s=0.001)
    assert len(got["mm"]) == 2 and min(got["mm"]) > 0
