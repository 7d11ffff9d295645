"""The one timer of lrd_fx and bench/: medians of repeated (optionally interleaved) blocks on a device."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
import timeit
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

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

    def scaled(self, factor: float) -> "Measurement":
        """The same timing in another frame: every time multiplied by `factor` (n unchanged)."""
        return Measurement(self.median_s * factor, self.iqr_s * factor, self.n, self.min_s * factor)


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
    """Times `number` back-to-back calls of fn; returns seconds per call.

    fn.context (optional, a zero-argument context-manager factory, e.g. autocast) is entered around
    every block, once, as a training loop enters autocast once per step and not once per layer.
    Under use_fake_clock the block asks the clock for the time instead (the warm-up still runs fn).
    """

    def __init__(self, fn: Callable[[], object], device: torch.device):
        self.fn = fn
        self.device = device
        self.cuda = device.type == "cuda"
        self.context = getattr(fn, "context", None) or contextlib.nullcontext
        self.clock = current_fake_clock()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def warm(self, n: int) -> None:
        with self.context():
            for _ in range(max(0, n)):
                self.fn()

    def __call__(self, number: int) -> float:
        with self.context():
            if self.clock is not None:    # the warm-up calls ran the code path (autocast, layout, graphs)
                return float(self.clock(getattr(self.fn, "info", None)))
            return self._timed(number)

    def _timed(self, number: int) -> float:
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
        # The stdlib timer: perf_counter around the block, garbage collection off while it runs (as
        # torch.utils.benchmark does underneath). The warm-up ran once up front, so the block is timed
        # alone, where torch's Timer.timeit would add warm-up calls before every block.
        return max(timeit.Timer(self.fn).timeit(number), 1e-9) / number

    def calibrate(self, min_time_s: float) -> int:
        """Calls per block so that one block lasts at least min_time_s (timer resolution, launch jitter)."""
        if self.clock is not None:
            return 1
        self.sync()
        t0 = time.perf_counter()
        with self.context():
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
                        warmup: int = 2, min_time_s: float = 0.01,
                        min_times: Optional[Mapping[Hashable, float]] = None) -> dict:
    """{key: Measurement}: one block of every candidate per round, round-robin, so that drift (thermal,
    other processes on a shared machine) hits all candidates alike; median over the rounds."""
    samples = measure_rounds(fns, device=device, rounds=rounds, warmup=warmup, min_time_s=min_time_s,
                             min_times=min_times)
    return {k: summarize(v) for k, v in samples.items()}


def measure_rounds(fns: Mapping[Hashable, Callable[[], object]], *, device="cpu", rounds: int = 7,
                   warmup: int = 2, min_time_s: float = 0.01,
                   min_times: Optional[Mapping[Hashable, float]] = None) -> dict:
    """{key: [seconds per call, one per round]}: the raw samples of measure_interleaved.

    Sample i of every candidate comes from the same round, so per-round ratios of two candidates
    are paired (their median is the most drift-proof speed-up figure). min_times: shorter (or longer)
    blocks for some keys, e.g. a reference kernel that should cost little of the measuring time.
    """
    if rounds < 1:
        raise ConfigError(f"rounds={rounds!r} must be >= 1 (timed repeats per candidate)")
    dev = _device(device)
    blocks = {k: _Block(f, dev) for k, f in fns.items()}
    numbers = {}
    for k, b in blocks.items():
        b.warm(warmup)
        numbers[k] = b.calibrate((min_times or {}).get(k, min_time_s))
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


# --- what will run: precision, memory format, execution form ---------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EXEC_FORMS = ("eager", "cuda_graph", "compile")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Setting:
    """How the timed steps run: what the compiled model will be run as."""
    amp: Optional[str] = None             # "bf16" / "fp16": under torch.autocast; None: the model's dtype
    memory_format: str = "contiguous"     # "channels_last": 4-D inputs and conv weights in NHWC
    exec_form: str = "eager"              # "eager", "cuda_graph" (replayed CUDA graph) or "compile"
    align: int = 1                        # rank alignment of the estimate and the search candidates
    tf32: Optional[str] = None            # CUDA fp32 only: TF32 settings other than PyTorch's defaults

    def describe(self) -> str:
        amp = f"autocast {self.amp}" if self.amp else "no autocast"
        return f"{amp}{', ' + self.tf32 if self.tf32 else ''}, {self.memory_format}, {self.exec_form}"


def tf32_state(device, dtype, amp: Optional[str]) -> Optional[str]:
    """How fp32 CUDA kernels may use TF32 tensor cores, where that differs from PyTorch's defaults (it
    changes their timings): "tf32 matmul" when matmuls may (torch.backends.cuda.matmul.allow_tf32, or
    torch.set_float32_matmul_precision("high"/"medium")), "no tf32 conv" when cuDNN convolutions may not
    (torch.backends.cudnn.allow_tf32, on by default), both joined by "+". None off CUDA, for other dtypes,
    under autocast, and in the defaults."""
    if _device(device).type != "cuda" or dtype != torch.float32 or amp is not None:
        return None
    parts = []
    if torch.backends.cuda.matmul.allow_tf32:
        parts.append("tf32 matmul")
    if not torch.backends.cudnn.allow_tf32:
        parts.append("no tf32 conv")
    return "+".join(parts) or None


def active_amp(device) -> Optional[str]:
    """'bf16'/'fp16' when a torch.autocast for the device's type is active in this thread, else None."""
    kind = _device(device).type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        dt = torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):    # a device type autocast does not know
        return None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt)


def resolve_amp(option: Optional[str], active: Optional[str]) -> Optional[str]:
    """Config.timing.amp -> the autocast precision to time in: 'bf16'/'fp16' as given, 'off' never, None: the
    autocast that was active when compile() was called."""
    if option == "off":
        return None
    return option if option is not None else active


def default_align(device, dtype: torch.dtype, amp: Optional[str]) -> int:
    """8 where tensor-core tiles want it (CUDA with bf16/fp16 autocast or a half-precision model), else 1."""
    half = amp in AMP_DTYPES or dtype in _HALF
    return 8 if _device(device).type == "cuda" and half else 1


def resolve_exec(option: str, device) -> str:
    """Config.timing.exec -> the execution form: 'auto' is a replayed CUDA graph on CUDA (launch
    overhead, which compiled or graphed models do not pay, must not decide a rank), eager elsewhere."""
    kind = _device(device).type
    if option == "auto":
        return "cuda_graph" if kind == "cuda" else "eager"
    if option == "cuda_graph" and kind != "cuda":
        raise ConfigError(f"rank_search_exec='cuda_graph' needs a model on a CUDA device (it is on {kind}); "
                          f"use 'auto' (eager here), 'eager' or 'compile'")
    return option


def memory_format_of(model: nn.Module, inputs: Optional[Sequence] = None) -> str:
    """'channels_last' when a 4-D example input or a 4-D conv weight of the model is channels_last (and
    not also contiguous, as 1x1 spatial tensors are): activations then run NHWC through the convs."""
    def nhwc(t) -> bool:   # (an uninitialised lazy parameter has no shape yet)
        return (isinstance(t, torch.Tensor) and not nn.parameter.is_lazy(t) and t.dim() == 4
                and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last))
    if any(nhwc(x) for x in (inputs or ())):
        return "channels_last"
    return "channels_last" if any(nhwc(p) for p in model.parameters()) else "contiguous"


def autocast_context(device, amp: Optional[str], *, cache_enabled: bool = True):
    """A torch.autocast for the device in the given precision, or a no-op context when amp is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(device).type, dtype=AMP_DTYPES[amp], cache_enabled=cache_enabled)


def setting_of(ctx) -> Setting:
    """The Setting of one compile (a CompileContext), resolved once and kept in ctx.setting:
    Config.timing.amp (else the autocast active when compile() was called, ctx.autocast), the memory
    format of the model's weights / example inputs, Config.timing.exec and Config.align."""
    got = ctx.setting
    if got is not None:
        return got
    cfg = ctx.config
    # nothing is timed without a search or a whole-model check: then only the alignment is used, and
    # options that fit another device (a config saved on a GPU machine) are not errors
    timed = cfg.rank_search is not None or cfg.whole_model_check is True or cfg.whole_model_guard is True
    amp = resolve_amp(cfg.timing.amp, ctx.autocast)
    if timed and amp is not None and ctx.dtype in _HALF and AMP_DTYPES[amp] != ctx.dtype:
        raise ConfigError(f"amp={amp!r} but the model's weights are {ctx.dtype}: autocast would time a "
                          f"mixed precision that does not run; pass amp='off' or cast the model")
    align = cfg.align
    if align == "auto":
        align = default_align(ctx.device, ctx.dtype, amp)
    exec_option = cfg.timing.exec
    if not timed and exec_option == "cuda_graph" and _device(ctx.device).type != "cuda":
        exec_option = "eager"
    got = Setting(amp=amp, memory_format=memory_format_of(ctx.model, ctx.example_inputs),
                  exec_form=resolve_exec(exec_option, ctx.device), align=int(align or 1),
                  tf32=tf32_state(ctx.device, ctx.dtype, amp))
    ctx.setting = got
    return got


def no_autocast(device):
    """A context with autocast off for the CPU and the model's device type."""
    stack = contextlib.ExitStack()
    for kind in {"cpu", _device(device).type}:
        if kind in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


@dataclass
class StepInfo:
    """What a timed step runs (attached to the step as `step.info`; fake clocks read it)."""
    label: str                       # "candidate", "reference", "original", "lrd"
    module: Optional[nn.Module]      # the module the step calls (a copy, moved and laid out)
    input_shape: tuple
    mode: str
    setting: Setting


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _float_leaves(out) -> list:
    from torch.utils._pytree import tree_leaves
    if hasattr(out, "to_tuple"):     # Hugging Face ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.requires_grad]


def module_step(module: nn.Module, inputs: Sequence[torch.Tensor], *, device="cpu", mode: str = "infer",
                setting: Setting = Setting(), input_grad: bool = False, label: str = "candidate",
                copy_module: bool = True) -> Callable[[], None]:
    """A zero-argument callable running one step of `module` on `inputs`, as `setting` says it will run.

    "infer": forward under no_grad, eval mode. "train": forward + backward of every floating output
    (random output gradients) in train mode; weight gradients are reset to None each step, as
    optimizer.zero_grad does. input_grad: the inputs require grad (a layer inside a network).
    Execution forms: "eager"; "compile" (torch.compile'd module; the first, untimed calls compile);
    "cuda_graph" (the step captured once in a CUDA graph and replayed: no per-kernel launch cost).
    """
    _check_mode(mode)
    dev = _device(device)
    if setting.exec_form not in EXEC_FORMS:
        raise ConfigError(f"execution form {setting.exec_form!r} must be one of {EXEC_FORMS}")
    if setting.exec_form == "cuda_graph" and dev.type != "cuda":
        raise ConfigError("rank_search_exec='cuda_graph' needs a CUDA device; use 'eager' or 'compile'")
    m = copy.deepcopy(module) if copy_module else module
    m = m.to(device=dev)
    xs = [x.detach().to(dev) if isinstance(x, torch.Tensor) else x for x in inputs]
    if setting.memory_format == "channels_last":
        m = m.to(memory_format=torch.channels_last)
        xs = [_channels_last(x) if isinstance(x, torch.Tensor) else x for x in xs]
    info = StepInfo(label, m, tuple(xs[0].shape) if xs and isinstance(xs[0], torch.Tensor) else (),
                    mode, setting)
    graphed = setting.exec_form == "cuda_graph"
    # CUDA graph capture must not reuse autocast's cast cache across replays
    amp_ctx = (lambda: autocast_context(dev, setting.amp, cache_enabled=not graphed))
    run = torch.compile(m) if setting.exec_form == "compile" else m
    if mode == "infer":
        m.eval()

        def step():
            with torch.no_grad():
                run(*xs)
    else:
        m.train()
        params = [p for p in m.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        if input_grad:
            for x in xs:
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    x.requires_grad_(True)
        with amp_ctx():
            outs = _float_leaves(m(*xs))
        if not outs:
            raise ConfigError(f"mode='train' cannot time {type(module).__name__}: its output has no floating "
                              f"tensor that requires grad; use 'infer'")
        grads = [torch.randn_like(o) for o in outs]
        del outs

        def step():
            for p in params:
                p.grad = None
            for x in xs:
                if isinstance(x, torch.Tensor):
                    x.grad = None
            torch.autograd.backward(_float_leaves(run(*xs)), grads)
    if graphed:
        step = _cuda_graph(step, dev, amp_ctx)
        step.context = None       # autocast was captured with the graph
    else:
        step.context = amp_ctx
    step.info = info
    return step


def _cuda_graph(step: Callable[[], None], dev: torch.device, amp_ctx) -> Callable[[], None]:
    """Warm `step` up on a side stream, capture it in a CUDA graph, return the graph's replay."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), amp_ctx():
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), amp_ctx():
        step()

    def replay():
        graph.replay()
    replay.graph = graph      # keep the graph (and its memory pool) alive with the step
    return replay


def layer_step(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
               device="cpu", mode: str = "infer", *,
               memory_format: Optional[torch.memory_format] = None,
               setting: Optional[Setting] = None) -> Callable[[], None]:
    """A zero-argument callable running one step of a copy of `module` on a random input.

    "infer": forward under no_grad, eval mode. "train": forward + backward in train mode; the input
    requires grad (as inside a network, where every layer but the first propagates gradients) and
    the weight gradients are computed; grads are reset to None each step, as optimizer.zero_grad does.
    setting: precision (autocast), memory format and execution form (default: eager, the module's
    dtype; memory_format=torch.channels_last is the older spelling of the layout).
    """
    _check_mode(mode)
    dev = _device(device)
    if setting is None:
        setting = Setting(memory_format="channels_last" if memory_format == torch.channels_last else "contiguous")
    m = copy.deepcopy(module).to(device=dev, dtype=dtype)
    x = torch.randn(*input_shape, dtype=dtype, device=dev)
    return module_step(m, (x,), device=dev, mode=mode, setting=setting, input_grad=True, copy_module=False)


def reference_step(device="cpu", dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A fixed kernel (a 256x256 matmul) timed between the candidates: it never changes, so when its
    time moves, the machine changed (another process, clocks), not the candidate."""
    dev = _device(device)
    a = torch.randn(256, 256, device=dev, dtype=dtype)
    b = torch.randn(256, 256, device=dev, dtype=dtype)

    def step():
        torch.mm(a, b)
    step.info = StepInfo("reference", None, (256, 256), "infer", Setting())
    return step


def machine_load() -> tuple[Optional[float], int]:
    """(1-minute load average or None where the OS has none, CPU cores usable by this process)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return load, cores


def others_load(load: Optional[float], cores: int) -> Optional[float]:
    """Load put on the machine by other processes: the load average minus this process's own busy
    threads (torch runs min(threads, cores) of them while timing), as a fraction of the cores."""
    if load is None:
        return None
    own = min(torch.get_num_threads(), cores)
    return max(0.0, load - own) / max(1, cores)


# --- test hooks: a cost function or a fake clock instead of the device -----------------------------

class _StackedHook:
    """Base of the test hooks below: `with Hook(fn):` installs fn for the block; the innermost one
    installed is `Hook.current()`. Each subclass keeps its own stack."""

    wants = "a callable"    # what fn must be, for the error message

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._stack: list = []

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise ConfigError(f"{type(self).__name__} needs {self.wants}, got {fn!r}")
        self.fn = fn

    def __enter__(self):
        self._stack.append(self.fn)
        return self.fn

    def __exit__(self, *exc):
        self._stack.remove(self.fn)

    @classmethod
    def current(cls) -> Optional[Callable]:
        return cls._stack[-1] if cls._stack else None


class use_cost_fn(_StackedHook):
    """Context manager: the rank search calls `fn(module, input_shape, mode) -> seconds` instead of
    timing on the device (for tests: a synthetic staircase). Timings from such a function reach the
    timing cache only when fn has a `cache_tag` attribute (a string kept apart from real timings).

        with lrd_fx.cost.use_cost_fn(fake):
            gm = lrd_fx.compile(model, (x,), rank_search="infer")
    """

    wants = "a callable (module, input_shape, mode) -> seconds"


def current_cost_fn() -> Optional[Callable]:
    return use_cost_fn.current()


class use_fake_clock(_StackedHook):
    """Context manager: every timed block (measure, measure_interleaved, the rank search, the whole-model
    check) takes its seconds per call from `clock(info)` instead of a real clock (warm-up calls still run
    the step);
    info is the step's StepInfo (label, module, input_shape, mode, setting) or None for a plain callable.
    Unlike use_cost_fn, everything else runs for real: step building, autocast, memory format,
    interleaving, re-measurement. For tests of decisions that must not depend on the machine.
    """

    wants = "a callable info -> seconds"


def current_fake_clock() -> Optional[Callable]:
    return use_fake_clock.current()
