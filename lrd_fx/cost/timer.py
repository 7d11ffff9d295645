"""The one timer of lrd_fx and bench/: medians of repeated (optionally interleaved) blocks on a device."""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError

MODES = ("infer", "train")


@dataclass(frozen=True)
class Measurement:
    median_s: float   # median seconds per call
    iqr_s: float      # interquartile range of the per-call seconds over the repeats
    n: int            # number of timed blocks the median is taken over
    min_s: float = 0.0   # fastest block (least disturbed by other processes), seconds per call

    @property
    def rel_noise(self) -> float:
        """IQR relative to the median (0 when a single block was timed)."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0


def summarize(samples: Sequence[float]) -> Measurement:
    """Median and IQR of per-call times."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("no samples to summarize")
    if len(xs) < 4:
        iqr = xs[-1] - xs[0]
    else:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        iqr = q[2] - q[0]
    return Measurement(statistics.median(xs), iqr, len(xs), xs[0])


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device or "cpu")


class _Block:
    """Times `number` back-to-back calls of fn; returns seconds per call."""

    def __init__(self, fn: Callable[[], object], device: torch.device):
        self.fn = fn
        self.device = device
        self.cuda = device.type == "cuda"
        if not self.cuda:
            # torch.utils.benchmark pins the thread count for the block and uses the best clock.
            from torch.utils.benchmark import Timer
            self._timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, number: int) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(number):
                self.fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        # Timer.timeit() runs its own warm-up calls before every block; warm-up is done once up front
        # here, so the block itself is timed alone (Timer._timeit; num_threads is the process's own).
        timeit = getattr(self._timer, "_timeit", None)
        if timeit is not None:
            return timeit(number) / number
        return self._timer.timeit(number).median

    def calibrate(self, min_time_s: float) -> int:
        """Calls per block so that one block lasts at least min_time_s (timer resolution, launch jitter)."""
        self.sync()
        t0 = time.perf_counter()
        self.fn()
        self.sync()
        once = max(time.perf_counter() - t0, 1e-7)
        return max(1, int(math.ceil(min_time_s / once)))


def measure(fn: Callable[[], object], *, device="cpu", repeats: int = 7, warmup: int = 2,
            min_time_s: float = 0.01) -> Measurement:
    """Median seconds per call of fn over `repeats` blocks, after `warmup` untimed calls."""
    return measure_interleaved({0: fn}, device=device, rounds=repeats, warmup=warmup,
                               min_time_s=min_time_s)[0]


def measure_interleaved(fns: Mapping[Hashable, Callable[[], object]], *, device="cpu", rounds: int = 7,
                        warmup: int = 2, min_time_s: float = 0.01) -> dict:
    """{key: Measurement}: one block of every candidate per round, round-robin, so that drift (thermal,
    other processes on a shared machine) hits all candidates alike; median over the rounds."""
    samples = measure_rounds(fns, device=device, rounds=rounds, warmup=warmup, min_time_s=min_time_s)
    return {k: summarize(v) for k, v in samples.items()}


def measure_rounds(fns: Mapping[Hashable, Callable[[], object]], *, device="cpu", rounds: int = 7,
                   warmup: int = 2, min_time_s: float = 0.01) -> dict:
    """{key: [seconds per call, one per round]}: the raw samples of measure_interleaved.

    Sample i of every candidate comes from the same round, so per-round ratios of two candidates
    are paired (their median is the most drift-proof speed-up figure).
    """
    if rounds < 1:
        raise ConfigError(f"rounds={rounds!r} must be >= 1 (timed repeats per candidate)")
    dev = _device(device)
    blocks = {k: _Block(f, dev) for k, f in fns.items()}
    numbers = {}
    for k, b in blocks.items():
        for _ in range(max(0, warmup)):
            b.fn()
        numbers[k] = b.calibrate(min_time_s)
    samples: dict = {k: [] for k in blocks}
    keys = list(blocks)
    for i in range(rounds):
        # Rotate the order each round so no candidate always runs right after the same neighbour.
        shift = i % len(keys)
        for k in keys[shift:] + keys[:shift]:
            samples[k].append(blocks[k](numbers[k]))
    return samples


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} must be 'infer' (forward under no_grad) or 'train' (forward+backward)")
    return mode


def layer_step(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
               device="cpu", mode: str = "infer", *,
               memory_format: Optional[torch.memory_format] = None) -> Callable[[], None]:
    """A zero-argument callable running one step of a copy of `module` on a random input.

    "infer": forward under no_grad, eval mode. "train": forward + backward in train mode; the input
    requires grad (as inside a network, where every layer but the first propagates gradients) and
    the weight gradients are computed; grads are reset to None each step, as optimizer.zero_grad does.
    """
    _check_mode(mode)
    dev = _device(device)
    m = copy.deepcopy(module).to(device=dev, dtype=dtype)
    x = torch.randn(*input_shape, dtype=dtype, device=dev)
    if memory_format is not None and x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
        m = m.to(memory_format=memory_format)
    if mode == "infer":
        m.eval()

        def step():
            with torch.no_grad():
                m(x)
        return step

    m.train()
    params = [p for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    x.requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(m(x))

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        m(x).backward(grad)
    return step


# --- test hook: replace real measurement by a cost function ---------------------------------------

# Stack of cost functions installed by use_cost_fn(); the rank search uses the innermost one.
_COST_FN_STACK: list = []


class use_cost_fn:
    """Context manager: the rank search calls `fn(module, input_shape, mode) -> seconds` instead of
    timing on the device (for tests: a synthetic staircase). Timings from such a function reach the
    timing cache only when fn has a `cache_tag` attribute (a string kept apart from real timings).

        with lrd_fx.cost.use_cost_fn(fake):
            gm = lrd_fx.compile(model, (x,), rank_search="infer")
    """

    def __init__(self, fn: Callable[[nn.Module, tuple, str], float]):
        if not callable(fn):
            raise ConfigError(f"use_cost_fn needs a callable (module, input_shape, mode) -> seconds, got {fn!r}")
        self.fn = fn

    def __enter__(self):
        _COST_FN_STACK.append(self.fn)
        return self.fn

    def __exit__(self, *exc):
        _COST_FN_STACK.remove(self.fn)


def current_cost_fn() -> Optional[Callable]:
    return _COST_FN_STACK[-1] if _COST_FN_STACK else None
