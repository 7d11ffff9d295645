"""The timer: medians over interleaved blocks, layer steps for inference and training."""
import pytest
import torch
import torch.nn as nn

from lrd_fx.cost.timer import (Measurement, current_cost_fn, layer_step, measure, measure_interleaved, measure_rounds,
                               summarize, use_cost_fn)
from lrd_fx.errors import ConfigError


def test_summarize_median_and_iqr():
    m = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert m == Measurement(3.0, 2.0, 5, 1.0)
    assert summarize([2.0]).iqr_s == 0.0 and summarize([2.0]).rel_noise == 0.0


def test_measure_counts_calls_and_blocks():
    calls = []
    m = measure(lambda: calls.append(1), device="cpu", repeats=3, warmup=2, min_time_s=0.0)
    assert m.n == 3 and m.median_s > 0
    # warmup + calibration + 3 blocks of >= 1 call
    assert len(calls) >= 2 + 1 + 3


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


def test_interleaved_tells_slow_from_fast():
    a = torch.randn(256, 256)
    fns = {"small": lambda: a[:32, :32] @ a[:32, :32], "big": lambda: a @ a @ a}
    res = measure_interleaved(fns, device="cpu", rounds=3, warmup=1, min_time_s=0.002)
    assert res["big"].median_s > res["small"].median_s


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
    step = layer_step(nn.Conv2d(4, 8, 1), (2, 4, 5, 5), torch.float32, "cpu", "train",
                      memory_format=torch.channels_last)
    step()


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
    a = torch.randn(128, 128)
    fns = {"small": lambda: a[:16, :16] @ a[:16, :16], "big": lambda: a @ a @ a}
    got = measure_rounds(fns, device="cpu", rounds=4, warmup=0, min_time_s=0.001)
    assert list(got) == ["small", "big"] and all(len(v) == 4 and min(v) > 0 for v in got.values())
    assert sorted(b / s for b, s in zip(got["big"], got["small"]))[2] > 1.0
    with pytest.raises(ConfigError, match="rounds"):
        measure_rounds(fns, rounds=0)
