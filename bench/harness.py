"""Benchmark harness: original vs lrd_fx variants vs peers, timed interleaved; table, JSON, CSV and PNG.

    python -m bench                       # resnet18, resnet50, vit_small_patch16_224, convnext_tiny
    python -m bench --quick               # CI smoke run: 2 small models, small batch and resolution
    python -m bench --models resnet50 --batch 64 --device cuda --amp bf16 --compile
    python -m bench --from-json bench/results/cpu-2025-01-01.json     # print a saved table again

Variants (rows per model):
  original              the model as created (random init)
  traced                lrd_fx.compile with no layer factorized (decompose_conv=decompose_linear=False): the
                        traced graph alone, so its own overhead is told apart from the factors'
  lrd                   lrd_fx.compile(model, (x,), ratio=R): ranks from the ratio estimate
  lrd+search            + rank_search="infer" (--search-mode): ranks timed on this device, reverts kept
  lrd+search+budget     + rank_budget=R: the whole-model plan, every layer's rank (or the original layer)
                        chosen together to minimise the summed measured time within the parameters that
                        ratio=R gives the factorized layers (re-uses lrd+search's timings from the cache)
  lrd+round8            the divisor rule (AIMET / msModelSlim style): the lrd row's estimated ranks rounded
                        down to a multiple of 8 (--round-multiple), scaled so that the model has the
                        parameters of the lrd+search+budget row (of lrd+search when that one is not run):
                        the search against the simple rule at equal parameters
                        (lrd_fx.compile(rank={layer: ranks}, skip=<the rest>))
  lrd+fuse              lrd with fuse_inference=True: BatchNorm folded, adjacent linear maps merged, no-op
                        nodes dropped; inference only (its training columns stay empty)
  lrd+search+budget+fuse
                        lrd_fx.fuse of the lrd+search+budget row's model (compiled with the whole-model plan
                        and fuse_inference=True when that row is not run): the whole-model plan fused for
                        inference; inference only
  lrd+search+seqfreeze  the lrd+search plan and weights with freeze="sequential" (lrd_fx.save, then
                        lrd_fx.load(..., freeze="sequential"): no second search, so the row differs from
                        lrd+search by the gates alone); training speed = mean step time over the
                        schedule's distinct states (epochs 0 and 1)
  tltorch               tensorly-torch factorized layers (implementation="factorized") at the ranks
                        of the `lrd` plan, on the same layers
  composer              Composer's Factorize in plain torch: every Conv2d/Linear split at latent size
                        int(F * min(in, out)) (--composer-fraction F), no search

Each variant is one builder function in the VARIANT_BUILDERS table (@register_variant(name)); --models
takes torchvision/timm names and the models registered with @register_model(name). Results are Row objects
(one per model and variant), written as JSON and CSV and printed as a table.

Every model's variants are timed round-robin (lrd_fx.cost.timer.measure_interleaved): after warm-up, one
block of each variant per round, the variant order rotating each round; the table shows the median over
the rounds and the spread (interquartile range / median). Speed-ups are ratios of medians measured side
by side, so they hold when a shared machine drifts; absolute samples/s do not.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lrd_fx  # noqa: E402
from lrd_fx.api import count_flops  # noqa: E402
from lrd_fx.cost.timer import measure_interleaved  # noqa: E402
from lrd_fx.errors import ConfigError, LRDError  # noqa: E402
from lrd_fx.registry import Registry  # noqa: E402

from bench import peers  # noqa: E402

FORMAT = "lrd_fx-bench/1"
# the default rows, in the order they are built and printed (a variant may reuse one built before it)
VARIANTS = ("original", "traced", "lrd", "lrd+search", "lrd+search+budget", "lrd+round8", "lrd+search+seqfreeze", "lrd+fuse",
            "lrd+search+budget+fuse", "tltorch", "composer")
DEFAULT_MODELS = ("resnet18", "resnet50", "vit_small_patch16_224", "convnext_tiny")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --quick: a CI smoke run (< 2 min on a 2-core CPU) that still produces every variant's numbers.
# resnet10t (timm) exercises the Tucker-2 path at half resnet18's decomposition cost; vit_tiny the SVD path.
QUICK = dict(models=("resnet10t", "vit_tiny_patch16_224"), batch=4, size=32, rounds=3, warmup=0,
             search_budget_s=5.0, search_repeats=3)
DEFAULTS = dict(models=DEFAULT_MODELS, batch=16, size=224, rounds=5, warmup=1, search_budget_s=None,
                search_repeats=None)


# --- models ---------------------------------------------------------------------------------------------

# Models of the benchmark's own besides torchvision's and timm's (those are found by name in make_model).
MODELS: Registry[Callable[[], nn.Module]] = Registry(
    "bench model", hint="add one with @bench.harness.register_model('name'), or use a torchvision/timm name")


def register_model(name: str):
    """Make a model factory `() -> nn.Module` (3-channel image input) available to --models by name."""
    return MODELS.register(name)


@register_model("tiny_cnn")
def tiny_cnn() -> nn.Module:
    """A four-layer CNN + linear head: every kind of layer the variants touch, in a fraction of a second."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def make_model(name: str, size: int) -> nn.Module:
    """A random-init model by name (registered, torchvision or timm); timm models that fix their input
    resolution (ViT) are created for `size`."""
    if name in MODELS:
        return MODELS[name]()
    from lrd_fx.models import create_model
    model = create_model(name)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and tuple(cfg.get("input_size", ()))[-1:] != (size,):
        try:
            model = create_model(name, img_size=size)
        except Exception:
            pass    # the model takes any resolution (CNNs) or does not know img_size
    return model


# --- settings -------------------------------------------------------------------------------------------

@dataclass
class Settings:
    models: tuple = DEFAULT_MODELS
    batch: int = 16
    size: int = 224
    rounds: int = 5                      # interleaved timing rounds (median over them)
    warmup: int = 1                      # untimed calls per variant after the first (probe) call
    min_block_s: float = 0.05            # each timed block repeats the step until it lasts this long
    device: str = "cpu"
    amp: Optional[str] = None            # None or "bf16"
    channels_last: bool = False
    tf32: bool = False                   # CUDA fp32: TF32 tensor cores for matmuls and cuDNN convolutions
    compile: bool = False                # torch.compile every variant
    compile_backend: str = "inductor"    # torch.compile backend (tests use "eager": same guards, no codegen)
    round_multiple: int = 8              # lrd+round8: ranks rounded down to a multiple of this
    train: bool = True                   # time SGD training steps too
    variants: tuple = VARIANTS
    ratio: float = 0.25                  # lrd_fx ratio (fraction of each layer's params kept)
    decompose_grouped: bool = False      # lrd_fx decompose_grouped of every lrd row (grouped convs factorized)
    search_mode: str = "infer"           # rank_search of lrd+search and lrd+search+seqfreeze
    search_budget_s: Optional[float] = None
    search_repeats: Optional[int] = None
    search_window: Optional[float] = None  # rank_search_window of the search rows (None: lrd_fx's default)
    composer_fraction: float = 0.25      # Composer latent size = int(fraction * min(in, out))
    composer_min_channels: int = 8       # layers narrower than this stay (lrd_fx's min_channels default)
    threads: Optional[int] = None        # torch.set_num_threads for the run (None: torch's default)
    seed: int = 0
    quick: bool = False
    out: Optional[str] = None            # results directory (default bench/results)
    progress: bool = True


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated torchvision/timm names (default {','.join(DEFAULT_MODELS)}; "
                        f"--quick: {','.join(QUICK['models'])})")
    p.add_argument("--batch", type=_positive_int, default=None, help="batch size (default 16; --quick 4)")
    p.add_argument("--size", type=_positive_int, default=None, help="input resolution (default 224; --quick 32)")
    p.add_argument("--rounds", type=_positive_int, default=None,
                   help="interleaved timing rounds, median taken (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant before timing, after "
                   "the first call (which compiles under --compile) and the calibration call (default 1; --quick 0)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: resnet10t + vit_tiny_patch16_224, batch 4, "
                   "32x32, 3 rounds, search budget 5 s; about 2 minutes on a busy 2-core CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--round-multiple", type=_positive_int, default=8,
                   help="lrd+round8: round estimated ranks down to a multiple of this (default 8; 32/64 also common)")
    p.add_argument("--amp", choices=["bf16"], default=None, help="autocast to bfloat16 in forward")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (models and input)")
    p.add_argument("--tf32", action="store_true", help="CUDA: TF32 tensor cores for fp32 matmuls and convolutions "
                   "(torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32), the search timing in it too")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--no-train", action="store_true", help="time inference only")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--ratio", type=float, default=0.25, help="lrd_fx ratio: fraction of params kept (default 0.25)")
    p.add_argument("--decompose-grouped", action="store_true",
                   help="lrd rows: decompose_grouped=True (grouped convs factorized, each group on its own)")
    p.add_argument("--search-mode", choices=["infer", "train"], default="infer",
                   help="rank_search of the lrd+search variants (default infer)")
    p.add_argument("--search-budget", type=float, default=None,
                   help="rank_search_budget_s: seconds of measuring per compile (default: unlimited; --quick 5)")
    p.add_argument("--search-repeats", type=_positive_int, default=None,
                   help="rank_search_repeats (default: lrd_fx's; --quick 3)")
    p.add_argument("--search-window", type=float, default=None,
                   help="rank_search_window of the search rows: candidates within +-this fraction of the "
                        "estimate (default: lrd_fx's, 0.25)")
    p.add_argument("--composer-fraction", type=float, default=0.25,
                   help="Composer latent fraction of min(in, out) (default 0.25, Composer's default)")
    p.add_argument("--composer-min-channels", type=_positive_int, default=8,
                   help="Composer min_channels/min_features (default 8 = lrd_fx's min_channels; Composer's own is 256)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads for the run (default: torch's). On a shared machine use fewer "
                        "threads than free cores: OpenMP threads that lose their core stall every op")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"results directory (default {RESULTS_DIR})")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--from-json", default=None, metavar="FILE", help="print the table of a saved results file")
    p.add_argument("--markdown", action="store_true", help="with --from-json: print it as a GitHub-markdown table")
    return p


def settings_from_args(args) -> Settings:
    base = QUICK if args.quick else DEFAULTS
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else tuple(base["models"])
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants else VARIANTS
    unknown = [v for v in variants if v not in VARIANT_BUILDERS]
    if unknown:
        known = VARIANTS + tuple(n for n in VARIANT_BUILDERS.names() if n not in VARIANTS)
        raise ConfigError(f"--variants: unknown {unknown}; choose from {', '.join(known)}")
    if not models:
        raise ConfigError("--models: give at least one model name")
    if not 0 < args.ratio <= 1:
        raise ConfigError(f"--ratio {args.ratio}: must be in (0, 1]")
    if not 0 < args.composer_fraction < 1:
        raise ConfigError(f"--composer-fraction {args.composer_fraction}: must be in (0, 1)")
    if args.search_window is not None and not 0 <= args.search_window <= 1:
        raise ConfigError(f"--search-window {args.search_window}: must be in [0, 1] (e.g. 0.5: ranks within "
                          f"+-50% of the estimate)")
    if args.warmup is not None and args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup}: must be >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")
    if args.tf32 and dev.type != "cuda":
        raise ConfigError(f"--tf32: TF32 is a CUDA setting and --device is {device}; drop --tf32")
    return Settings(
        models=models, batch=args.batch or base["batch"], size=args.size or base["size"],
        rounds=args.rounds or base["rounds"],
        warmup=args.warmup if args.warmup is not None else base["warmup"], device=device, amp=args.amp,
        channels_last=args.channels_last, tf32=args.tf32, compile=args.compile, compile_backend=args.compile_backend,
        round_multiple=args.round_multiple, train=not args.no_train, variants=variants,
        ratio=args.ratio, decompose_grouped=args.decompose_grouped, search_mode=args.search_mode,
        search_budget_s=args.search_budget if args.search_budget is not None else base["search_budget_s"],
        search_repeats=args.search_repeats or base["search_repeats"], search_window=args.search_window,
        composer_fraction=args.composer_fraction, composer_min_channels=args.composer_min_channels,
        threads=args.threads, seed=args.seed, quick=args.quick, out=args.out, progress=not args.no_progress)


# --- machine --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> Optional[list]:
    """The 1/5/15-minute load averages, rounded to 0.01 (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str) -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "device_name": name, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_start": load_avg()}


def machine_line(m: dict) -> str:
    load = m.get("load_avg_start")
    end = m.get("load_avg_end")
    line = (f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
            f"device {m['device']} ({m['device_name']})")
    if load:
        line += f", load avg {load[0]:g} at start" + (f", {end[0]:g} at end" if end else "")
    return line


# --- result rows ------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results: a variant of a model, its size and its measured speed. JSON (`to_dict`), CSV
    (`write_results`) and the printed table (`cells`) are all made from it; a saved file's rows are read
    back with `from_dict`."""
    model: str
    variant: str
    status: str = "failed"                  # ok | partial (inference timed, training failed) | failed
    error: Optional[str] = None
    notes: list = field(default_factory=list)
    compile_s: Optional[float] = None       # lrd_fx.compile / peer conversion wall time
    layers_factorized: int = 0
    layers_total: int = 0                   # candidate Conv/Linear layers
    params: Optional[int] = None
    gflops: Optional[float] = None          # forward GFLOPs per sample
    infer_s: Optional[float] = None         # median seconds per batch
    infer_spread: Optional[float] = None    # IQR / median
    infer_sps: Optional[float] = None       # samples per second
    first_call_infer_s: Optional[float] = None          # --compile: the first call (it compiles)
    train_s: Optional[float] = None
    train_spread: Optional[float] = None
    train_sps: Optional[float] = None
    train_sps_by_epoch: Optional[dict] = None           # freezing schedules: {epoch: samples/s} per state
    first_call_train_s: Optional[float] = None
    graphs_compiled_while_timing: Optional[dict] = None  # --compile: {phase: graphs} (should be 0)
    flop_reduction: Optional[float] = None  # original GFLOPs / this row's
    speedup_infer: Optional[float] = None   # samples/s over the original's, same rounds
    speedup_train: Optional[float] = None
    eff_infer: Optional[float] = None       # speed-up / FLOP reduction
    eff_train: Optional[float] = None

    # written even when empty (None); the measurements only once measured, as the saved files have them
    ALWAYS: ClassVar[tuple] = ("model", "variant", "status", "error", "notes", "compile_s", "layers_factorized",
                               "layers_total", "flop_reduction", "speedup_infer", "speedup_train",
                               "eff_infer", "eff_train")
    HEADERS: ClassVar[tuple] = ("model", "variant", "params M", "GFLOPs", "FLOP red.", "infer/s", "train/s",
                                "speed-up inf", "speed-up train", "eff. inf", "eff. train", "compile s",
                                "layers", "note")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in self.ALWAYS or getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def note(self, width: int = 60) -> str:
        note = self.error or "; ".join(self.notes or [])
        if self.error:
            note = ("FAILED: " if self.status == "failed" else "") + note
        return note[:width - 1] + "…" if len(note) > width else note

    def _sps(self, mode: str) -> str:
        v = getattr(self, f"{mode}_sps")
        return "-" if v is None else f"{v:.1f} ±{100 * (getattr(self, f'{mode}_spread') or 0):.0f}%"

    def cells(self, note_width: int = 60) -> list:
        """The printed table's cells, in HEADERS order."""
        layers = "-" if self.variant == "original" or not self.layers_total else \
            f"{self.layers_factorized or 0}/{self.layers_total}"
        return [self.model, self.variant, _f(self.params and self.params / 1e6, ".2f"), _f(self.gflops, ".3f"),
                _f(self.flop_reduction, ".2f"), self._sps("infer"), self._sps("train"),
                _f(self.speedup_infer, ".2f"), _f(self.speedup_train, ".2f"), _f(self.eff_infer, ".2f"),
                _f(self.eff_train, ".2f"), _f(self.compile_s, ".1f"), layers, self.note(note_width)]


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


# --- variants -------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    module: Optional[nn.Module] = None      # what is measured (params, FLOPs)
    run: Optional[nn.Module] = None         # what is called (the module, or its torch.compile wrapper)
    compile_s: Optional[float] = None
    error: Optional[str] = None
    freezer: object = None
    plan: dict = field(default_factory=dict)   # {layer: [scheme or structure, ranks, decision]}
    layers: tuple = (0, 0)                   # (factorized, candidates)
    notes: list = field(default_factory=list)
    inference_only: bool = False             # fused for eval: no training rows


# A builder makes one variant of the model: (model, x, settings, built) -> Variant with module, compile_s,
# plan, layers and notes filled in. `built` holds the variants of this model built before it (in VARIANTS
# order), so a row can reuse another's plan; a builder never changes `model`.
Builder = Callable[[nn.Module, torch.Tensor, Settings, dict], Variant]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    build: Builder
    inference_only: bool = False     # eval-only model (fused): timed for inference, no training row


VARIANT_BUILDERS: Registry[VariantSpec] = Registry(
    "bench variant", hint="add one with @bench.harness.register_variant('name') (see VARIANTS)")


def register_variant(name: str, *, inference_only: bool = False):
    """Make `builder(model, x, settings, built) -> Variant` the variant `name` (--variants picks it)."""
    def deco(fn: Builder) -> Builder:
        VARIANT_BUILDERS.register(name, VariantSpec(name, fn, inference_only))
        return fn
    return deco


def _err(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return " ".join(text.split())


def _usable(v: Optional["Variant"]) -> bool:
    return v is not None and v.error is None and v.module is not None


def _lrd_kwargs(s: Settings, search: bool = False, freeze: bool = False, budget: bool = False) -> dict:
    kw: dict = dict(ratio=s.ratio, progress=False)
    if s.decompose_grouped:
        kw["decompose_grouped"] = True
    if s.amp:
        # the precision the rows run in: the search times in it, and the estimate's ranks are aligned for
        # it (multiples of 8 on CUDA half precision); the harness compiles outside autocast
        kw["amp"] = s.amp
    if search:
        kw["rank_search"] = s.search_mode
        if torch.device(s.device).type == "cuda" and not s.compile:
            # eager rows pay every kernel's launch: time the candidates as they run (CUDA-graph replay,
            # the default on CUDA, leaves the launches out, as torch.compile does)
            kw["rank_search_exec"] = "eager"
        if budget:      # the whole-model plan, spending the parameters that ratio= gives the layers
            kw["rank_budget"] = s.ratio
        if s.search_budget_s is not None:
            kw["rank_search_budget_s"] = s.search_budget_s
        if s.search_repeats is not None:
            kw["rank_search_repeats"] = s.search_repeats
        if s.search_window is not None:
            kw["rank_search_window"] = s.search_window
    if freeze:
        kw["freeze"] = "sequential"
    return kw


def _cache_entries() -> Optional[int]:
    try:
        from lrd_fx.cost.cache import cache_info
        return int(cache_info()["entries"])
    except Exception:
        return None


def _lrd_plan_summary(gm) -> tuple[dict, tuple, list]:
    plan = gm.lrd.plan
    compact = {n: [r.get("scheme"), r.get("ranks"), r.get("decision")] for n, r in plan.items()}
    n_fact = sum(r.get("decision") in ("decomposed", "searched") for r in plan.values())
    notes = []
    decisions: dict = {}
    for r in plan.values():
        decisions[r.get("decision")] = decisions.get(r.get("decision"), 0) + 1
    stopped = sum("rank_search_budget_s" in (r.get("reason") or "") for r in plan.values())
    if "searched" in decisions or "reverted" in decisions:
        notes.append(f"{decisions.get('searched', 0)} searched, {decisions.get('reverted', 0)} reverted"
                     + (f", {stopped} not searched (budget)" if stopped else ""))
    return compact, (n_fact, len(plan)), notes


def divisor_ranks(model: nn.Module, plan: dict, multiple: int, target_params: Optional[int] = None) -> tuple[dict, float]:
    """({layer: ranks}, scale) of the divisor rule: every factorized layer's estimated ranks times `scale`,
    rounded down to a multiple of `multiple` (at least `multiple`, at most the full rank). With
    target_params, `scale` is chosen so that the whole model's parameter count is the closest to it (the
    comparison at equal parameters); else scale = 1."""
    from lrd_fx.factorize import chain_params
    layers = {n: r for n, r in plan.items() if r.get("decision") in ("decomposed", "searched") and r.get("estimate")}
    base = sum(p.numel() for p in model.parameters())

    def at(scale):
        ranks, total = {}, base
        for n, r in layers.items():
            rr = []
            for e, f in zip(r["estimate"], r["full_ranks"]):
                k = int(e * scale) // multiple * multiple
                rr.append(min(f, max(k, min(multiple, f))))
            ranks[n] = tuple(rr)
            total += chain_params(model.get_submodule(n), ranks[n], r["scheme"]) - r["params_before"]
        return ranks, total

    if target_params is None:
        return at(1.0)[0], 1.0
    lo, hi = 0.1, 10.0
    best = (float("inf"), 1.0)
    for _ in range(40):          # params grow with the scale (in steps): bisect, keep the closest
        mid = (lo * hi) ** 0.5
        total = at(mid)[1]
        best = min(best, (abs(total - target_params), mid))
        if total < target_params:
            lo = mid
        else:
            hi = mid
    return at(best[1])[0], best[1]


def _lrd_reference(built: dict, model, x, s):
    """The `lrd` variant, whose plan gives the ranks of lrd+round8 and tltorch: the row when it was built,
    else built here (untimed, not compiled)."""
    ref = built.get("lrd")
    if ref is None:
        ref = build_variant("lrd", model, x, dataclasses.replace(s, compile=False), {})
    if not _usable(ref):
        raise RuntimeError(f"needs the ranks of the lrd variant, which failed: {ref.error}")
    return ref


def _timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), wall seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _lrd_variant(gm, compile_s: float, freeze: bool = False) -> Variant:
    """A Variant around an lrd_fx-compiled model (its plan, layer counts and search notes)."""
    v = Variant("", module=gm, compile_s=compile_s, freezer=gm.lrd.freezer)
    v.plan, v.layers, v.notes = _lrd_plan_summary(gm)
    wm = gm.lrd.whole_model or {}
    if wm.get("speedup"):      # compile's own whole-model check: its prediction of this row's speed-up
        v.notes.append(f"whole-model check {wm['speedup']:.2f}x ({wm['mode']}, {wm['exec_form']})")
    g = getattr(gm.lrd, "guard", None)
    if g:                      # the whole-model guard gave layers back
        after = f"{g['after']:.2f}x" if g.get("after") else "all given back"
        v.notes.append(f"guard: {g['before']:.2f}x -> {after}, {len(g['reverted'])} of {g['of']} layers given back")
    if freeze and v.freezer is None:
        raise RuntimeError("lrd_fx.compile(..., freeze='sequential') returned a model without a freezer")
    return v


def _compile_searched(model, x, s: Settings, freeze: bool, budget: bool = False) -> Variant:
    """lrd_fx.compile with the rank search (and the freezing gates; `budget`: the whole-model plan at
    rank_budget=ratio), noting how many timings it added to the cache."""
    before = _cache_entries()
    gm, t = _timed(lrd_fx.compile, model, (x,), **_lrd_kwargs(s, search=True, freeze=freeze, budget=budget))
    v = _lrd_variant(gm, t, freeze)
    after = _cache_entries()
    if before is not None and after is not None:
        v.notes.append(f"{after - before} new timing-cache entries")
    return v


def _peer_variant(res, compile_s: float, candidates: int) -> Variant:
    """A Variant around a peer library's converted copy (bench/peers.py PeerResult)."""
    return Variant("", module=res.model, compile_s=compile_s, layers=(len(res.replaced), candidates),
                   plan={n: [r["structure"], r["ranks"], "replaced"] for n, r in res.replaced.items()})


@register_variant("original")
def _build_original(model, x, s, built) -> Variant:
    return Variant("original", module=model, compile_s=0.0)


@register_variant("traced")
def _build_traced(model, x, s, built) -> Variant:
    gm, t = _timed(lrd_fx.compile, model, (x,), decompose_conv=False, decompose_linear=False, progress=False)
    v = _lrd_variant(gm, t)
    v.notes.append("no layer factorized: the traced graph alone")
    return v


@register_variant("lrd")
def _build_lrd(model, x, s, built) -> Variant:
    gm, t = _timed(lrd_fx.compile, model, (x,), **_lrd_kwargs(s))
    return _lrd_variant(gm, t)


@register_variant("lrd+search")
def _build_lrd_search(model, x, s, built) -> Variant:
    return _compile_searched(model, x, s, freeze=False)


@register_variant("lrd+search+budget")
def _build_lrd_search_budget(model, x, s, built) -> Variant:
    return _compile_searched(model, x, s, freeze=False, budget=True)


# the searched row lrd+round8 matches in parameters: the whole-model plan when it was built, else lrd+search
ROUND8_TARGETS = ("lrd+search+budget", "lrd+search")


@register_variant("lrd+round8")
def _build_lrd_round8(model, x, s, built) -> Variant:
    ref = _lrd_reference(built, model, x, s)
    name = next((n for n in ROUND8_TARGETS if _usable(built.get(n))), None)
    searched = built.get(name) if name else None
    target = sum(p.numel() for p in searched.module.parameters()) if searched is not None else None
    ranks, scale = divisor_ranks(model, ref.module.lrd.plan, s.round_multiple, target)
    skip = tuple(n for n in ref.module.lrd.plan if n not in ranks)
    gm, t = _timed(lrd_fx.compile, model, (x,), ratio=s.ratio, rank=ranks or None, skip=skip,
                   decompose_grouped=s.decompose_grouped, progress=False)
    v = _lrd_variant(gm, t)
    v.notes.append(f"estimates x{scale:.2f}, rounded down to a multiple of {s.round_multiple}"
                   + (f" (scaled to {name}'s params)" if target else " (no searched row built: unscaled)"))
    return v


@register_variant("lrd+search+seqfreeze")
def _build_lrd_search_seqfreeze(model, x, s, built) -> Variant:
    src = built.get("lrd+search")
    if not _usable(src):
        return _compile_searched(model, x, s, freeze=True)     # no searched row to reuse: search here
    # The searched plan and weights, rebuilt with freezing gates: lrd_fx.save + lrd_fx.load(...,
    # freeze="sequential") searches nothing, so this row differs from lrd+search by the gates alone (a
    # second search under a time budget could stop at other layers).
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "plan.pt")
            lrd_fx.save(src.module, path)
            gm = lrd_fx.load(model, path, example_inputs=(x,), freeze="sequential")
        how = "save/load"
    except LRDError as e:
        # same plan through compile: the searched ranks per layer, everything else skipped
        ranks = {n: tuple(p[1]) for n, p in src.plan.items() if p[2] in ("decomposed", "searched")}
        skip = tuple(n for n in src.plan if n not in ranks)
        gm = lrd_fx.compile(model, (x,), ratio=s.ratio, rank=ranks or None, skip=skip,
                            freeze="sequential", decompose_grouped=s.decompose_grouped, progress=False)
        how = f"compile(rank=<searched ranks>, skip=<the rest>) because load failed: {_err(e)}"
    if gm.lrd.freezer is None:
        raise RuntimeError("lrd_fx.load(..., freeze='sequential') returned a model without a freezer")
    v = _lrd_variant(gm, (src.compile_s or 0.0) + time.perf_counter() - t0)
    v.notes = [f"lrd+search plan + freeze='sequential' via {how}"]
    return v


@register_variant("lrd+fuse", inference_only=True)
def _build_lrd_fuse(model, x, s, built) -> Variant:
    gm, t = _timed(lrd_fx.compile, model, (x,), **_lrd_kwargs(s), fuse_inference=True)
    v = _lrd_variant(gm, t)
    v.notes += _fuse_notes(gm)
    return v


def _fuse_notes(gm) -> list:
    """The fuse pass's notes of a fused model (what was folded, merged, dropped), without their prefix."""
    return [n.replace("fuse (inference only): ", "") for n in gm.lrd.notes if n.startswith("fuse")]


@register_variant("lrd+search+budget+fuse", inference_only=True)
def _build_lrd_search_budget_fuse(model, x, s, built) -> Variant:
    src = built.get("lrd+search+budget")
    if not _usable(src):      # no planned row to reuse: plan and fuse in one compile
        gm, t = _timed(lrd_fx.compile, model, (x,), **_lrd_kwargs(s, search=True, budget=True), fuse_inference=True)
        how = "compile(rank_budget=..., fuse_inference=True)"
    else:
        gm, fuse_s = _timed(lrd_fx.fuse, src.module)
        t = (src.compile_s or 0.0) + fuse_s
        how = "lrd_fx.fuse of the lrd+search+budget model"
    v = _lrd_variant(gm, t)
    v.notes = [how] + _fuse_notes(gm)
    return v


@register_variant("tltorch")
def _build_tltorch(model, x, s, built) -> Variant:
    plan = _lrd_reference(built, model, x, s).module.lrd.plan
    res, t = _timed(peers.tltorch_factorize, model, plan)
    v = _peer_variant(res, t, len(plan))
    if res.kept:
        v.notes.append(f"{len(res.kept)} lrd-factorized layers kept (no tltorch equivalent)")
    return v


@register_variant("composer")
def _build_composer(model, x, s, built) -> Variant:
    res, t = _timed(peers.composer_factorize, model, s.composer_fraction, s.composer_min_channels)
    return _peer_variant(res, t, len(res.replaced) + len(res.kept))


INFERENCE_ONLY = tuple(n for n in VARIANTS if VARIANT_BUILDERS[n].inference_only)


def variant_spec(name: str) -> VariantSpec:
    """The registered variant `name`; an unknown name raises ConfigError listing the known ones."""
    return VARIANT_BUILDERS.get(name)


def build_variant(name: str, model: nn.Module, x: torch.Tensor, s: Settings, built: dict) -> Variant:
    """One variant of `model` by its registered builder (placed in channels_last / torch.compile as `s`
    says). An unknown name raises ConfigError; failures while building are returned in Variant.error,
    never raised, so that the other rows of the table survive."""
    spec = variant_spec(name)
    try:
        v = spec.build(model, x, s, built)
        v.name, v.inference_only = name, spec.inference_only
        if s.channels_last:
            v.module = v.module.to(memory_format=torch.channels_last)
        v.run = torch.compile(v.module, backend=s.compile_backend) if s.compile else v.module
    except Exception as e:
        v = Variant(name, error=_err(e), inference_only=spec.inference_only)
        if os.environ.get("LRD_FX_BENCH_TRACEBACK"):
            traceback.print_exc()
    return v


# --- timing ---------------------------------------------------------------------------------------------

def _autocast(s: Settings):
    if s.amp == "bf16":
        return torch.autocast(device_type=torch.device(s.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _logits(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def _loss(out, y):
    out = _logits(out)
    if out.dim() == 2 and y is not None and out.shape[0] == y.shape[0]:
        return F.cross_entropy(out.float(), y % out.shape[1])
    return out.float().pow(2).mean()


def infer_step(v: Variant, x: torch.Tensor, s: Settings) -> Callable[[], None]:
    m = v.run

    def step():
        with torch.no_grad(), _autocast(s):
            m(x)
    return step


def train_steps(v: Variant, x: torch.Tensor, y: torch.Tensor, s: Settings) -> dict:
    """{key: step}: one SGD step (zero_grad, forward, loss, backward, optimizer step). A variant with a
    freezing schedule gets one step per distinct schedule state, keyed by epoch."""
    m = v.run
    params = [p for p in v.module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def one():
        opt.zero_grad(set_to_none=True)
        with _autocast(s):
            out = m(x)
        _loss(out, y).backward()
        opt.step()

    if v.freezer is None:
        return {v.name: one}
    epochs = v.freezer.state_epochs() or [0, 1]
    current = {"epoch": None}   # tracked here: reading the epoch buffer would sync a GPU

    def at(epoch):
        def step():
            if current["epoch"] != epoch:
                v.freezer.set_epoch(epoch)
                current["epoch"] = epoch
            one()
        return step
    return {(v.name, e): at(e) for e in epochs}


def timed_first_calls(fns: dict, device: str) -> tuple[dict, dict]:
    """Run every candidate once (it compiles under --compile): {key: seconds}, {key: error}."""
    first, errors = {}, {}
    for k, fn in fns.items():
        try:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            first[k] = time.perf_counter() - t0
        except Exception as e:
            errors[k] = _err(e)
            if os.environ.get("LRD_FX_BENCH_TRACEBACK"):
                traceback.print_exc()
    return first, errors


def dynamo_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far: a rise while timing means a
    recompile was timed."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - dynamo unavailable
        return 0
    return int(counters["stats"]["unique_graphs"])


def measure(fns: dict, s: Settings, compiles: Optional[dict] = None, phase: str = "") -> tuple[dict, dict, dict]:
    """({key: Measurement}, {key: error}, {key: first-call seconds}) for the candidates, interleaved.
    compiles[phase] receives how many graphs torch.compile built during the timed rounds (should be 0)."""
    first, errors = timed_first_calls(fns, s.device)
    ok = {k: f for k, f in fns.items() if k not in errors}
    if not ok:
        return {}, errors, first
    if s.compile:
        # Variants whose forward breaks the graph (the peers' layers) share frames across layers and
        # variants: calling the others can make dynamo recompile one again (automatic dynamic shapes,
        # guards on module types). Go round untimed until a whole round compiles nothing.
        for _ in range(3):
            graphs = dynamo_graphs()
            _, more = timed_first_calls(ok, s.device)
            errors.update(more)
            ok = {k: f for k, f in ok.items() if k not in more}
            if dynamo_graphs() == graphs:
                break
    graphs = dynamo_graphs()
    try:
        return _measure_ok(ok, s, errors) + (first,)
    finally:
        if compiles is not None:
            compiles[phase] = dynamo_graphs() - graphs


def _measure_ok(ok: dict, s: Settings, errors: dict) -> tuple[dict, dict]:
    try:
        res = measure_interleaved(ok, device=s.device, rounds=s.rounds, warmup=s.warmup, min_time_s=s.min_block_s)
    except Exception:
        # one candidate broke mid-run: time the others on their own so the rest of the table survives
        res = {}
        for k, f in ok.items():
            try:
                res.update(measure_interleaved({k: f}, device=s.device, rounds=s.rounds, warmup=s.warmup,
                                               min_time_s=s.min_block_s))
            except Exception as e:
                errors[k] = _err(e)
    return res, errors


def bench_model(model_name: str, s: Settings, bar=None, factory: Optional[Callable[[], nn.Module]] = None) -> tuple[list, dict]:
    """Rows (one Row per variant) and plans {variant: plan} for one model."""
    dev = torch.device(s.device)
    torch.manual_seed(s.seed)
    rows = {name: Row(model_name, name) for name in s.variants}
    plans: dict = {}

    def fail_all(msg):
        for r in rows.values():
            r.error = msg
        if bar is not None:
            bar.update(len(s.variants))
        return list(rows.values()), plans

    try:
        model = (factory() if factory is not None else make_model(model_name, s.size)).to(dev).eval()
        x = torch.randn(s.batch, 3, s.size, s.size, device=dev)
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = _logits(model(x[:1]))
        classes = out.shape[1] if out.dim() == 2 else 1
        y = torch.randint(0, classes, (s.batch,), device=dev)
    except Exception as e:
        return fail_all(f"model could not be created or run: {_err(e)}")

    compiles: dict = {}
    if s.compile:
        # Variants of one model share code objects (ResNet.forward, Conv2d.forward, ...) and so dynamo's
        # cache entries, across models too: with the default limit of 8 entries per code object, the
        # later variants and modes silently fell back to running frame by frame (slower than eager).
        # Start each model afresh with room for every variant in eval and train mode and each freezing
        # state.
        import torch._dynamo as dynamo
        dynamo.reset()
        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 4 * len(s.variants) + 8)
    variants: dict[str, Variant] = {}
    for name in s.variants:
        if bar is not None:
            bar.set_postfix_str(f"{model_name}: building {name}")
        v = build_variant(name, model, x, s, variants)
        variants[name] = v
        row = rows[name]
        row.compile_s = v.compile_s
        row.notes = list(v.notes)
        row.layers_factorized, row.layers_total = v.layers
        if v.error:
            row.error = v.error
        else:
            plans[name] = v.plan
            row.params = sum(p.numel() for p in v.module.parameters())
            try:
                row.gflops = count_flops(v.module, (x[:1],)) / 1e9
            except Exception as e:
                row.notes.append(f"FLOP count failed: {_err(e)}")
        if bar is not None:
            bar.update(1)
    live = {n: v for n, v in variants.items() if v.error is None}

    # inference: every variant in eval mode, interleaved
    if bar is not None:
        bar.set_postfix_str(f"{model_name}: timing inference ({len(live)} variants x {s.rounds} rounds)")
    for v in live.values():
        v.module.eval()
        if v.freezer is not None:
            v.freezer.set_epoch(0)
    res, errs, first = measure({n: infer_step(v, x, s) for n, v in live.items()}, s, compiles, "infer")
    for n in live:
        row = rows[n]
        if n in errs:
            row.error = f"inference failed: {errs[n]}"
            continue
        m = res[n]
        row.infer_s, row.infer_spread = m.median_s, m.rel_noise
        row.infer_sps = s.batch / m.median_s
        row.status = "ok"
        if s.compile:
            row.first_call_infer_s = first.get(n)

    # training: train mode, one SGD step per call
    if s.train:
        if bar is not None:
            bar.set_postfix_str(f"{model_name}: timing training ({len(live)} variants x {s.rounds} rounds)")
        fns: dict = {}
        owner: dict = {}
        for n, v in live.items():
            if rows[n].status != "ok":
                continue
            if v.inference_only:
                rows[n].notes.append("inference only (fused for eval: no training row)")
                continue
            v.module.train()
            try:
                for k, fn in train_steps(v, x, y, s).items():
                    fns[k] = fn
                    owner[k] = n
            except Exception as e:
                rows[n].error = f"training setup failed: {_err(e)}"
        res, errs, first = measure(fns, s, compiles, "train")
        by_variant: dict = {}
        for k, n in owner.items():
            if k in errs:
                rows[n].error = f"training failed: {errs[k]}"
                rows[n].status = "partial"
            elif k in res:
                by_variant.setdefault(n, []).append((k, res[k]))
        for n, ms in by_variant.items():
            row = rows[n]
            if row.status != "ok":
                continue
            # frozen epochs are as long as the others: the schedule's mean step time is the mean of
            # the per-state medians
            t = sum(m.median_s for _, m in ms) / len(ms)
            row.train_s, row.train_spread = t, max(m.rel_noise for _, m in ms)
            row.train_sps = s.batch / t
            if len(ms) > 1:
                row.train_sps_by_epoch = {str(k[1]): s.batch / m.median_s for k, m in ms}
                row.notes.append("train/s averaged over schedule epochs " + ", ".join(str(k[1]) for k, _ in ms))
            if s.compile:
                row.first_call_train_s = max(first.get(k) or 0.0 for k, _ in ms)

    if s.compile:
        for row in rows.values():
            row.graphs_compiled_while_timing = dict(compiles)
        if any(compiles.values()):
            for row in rows.values():
                row.notes.append(f"torch.compile recompiled while timing ({compiles}): numbers include compiling")
    _ratios(list(rows.values()))
    del variants, live, model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values()), plans


def _ratios(rows: list) -> None:
    """Speed-ups and efficiencies of every Row against the model's `original` row."""
    base = next((r for r in rows if r.variant == "original" and r.status != "failed"), None)
    if base is None:
        return
    for r in rows:
        if r.status == "failed":
            continue
        if base.gflops and r.gflops:
            r.flop_reduction = base.gflops / r.gflops
        for mode in ("infer", "train"):
            mine, theirs = getattr(r, f"{mode}_sps"), getattr(base, f"{mode}_sps")
            if mine and theirs:
                setattr(r, f"speedup_{mode}", mine / theirs)
                if r.flop_reduction:
                    setattr(r, f"eff_{mode}", mine / theirs / r.flop_reduction)


# --- the run ----------------------------------------------------------------------------------------------

def run(s: Settings, models: Optional[dict] = None, argv: Optional[list] = None) -> dict:
    """Benchmark every model of `s` (or `models`: {name: factory}) and return the results dict."""
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    limit = None
    if s.compile:
        import torch._dynamo as dynamo
        limit = dynamo.config.recompile_limit   # bench_model raises it per model
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if s.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        return _run(s, models, argv)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_num_threads(threads)
        if limit is not None:
            dynamo.config.recompile_limit = limit


def contention_warning(machine: dict) -> Optional[str]:
    """A warning when other processes already keep the cores busy (timings then mostly measure waiting)."""
    load, cores, threads = machine.get("load_avg_start"), machine.get("cores") or 1, machine["torch_threads"]
    if machine["device_name"] == "cpu" and load and load[0] + threads > cores + 0.5:
        return (f"load average {load[0]:g} on {cores} cores before the run: with {threads} torch threads the "
                f"cores are oversubscribed and OpenMP threads stall at every op (20x slower steps were seen "
                f"on a busy 2-core machine); ratios stay comparable only roughly; consider --threads 1")
    return None


def _run(s: Settings, models: Optional[dict], argv: Optional[list]) -> dict:
    torch.manual_seed(s.seed)
    dev = torch.device(s.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    names = list(models) if models else list(s.models)
    results = {"format": FORMAT, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": "python -m bench" + ("".join(" " + shlex.quote(a) for a in argv) if argv else ""),
               "machine": machine_info(s.device), "settings": dataclasses.asdict(s), "rows": [], "plans": {},
               "notes": []}
    warning = contention_warning(results["machine"])
    if warning:
        results["warnings"] = [warning]
        print(f"bench: warning: {warning}", file=sys.stderr)
    from tqdm.auto import tqdm
    t_start = time.perf_counter()
    with tqdm(total=len(names) * len(s.variants), desc="bench", unit="variant", disable=not s.progress,
              file=sys.stderr) as bar:
        for name in names:
            rows, plans = bench_model(name, s, bar, factory=(models or {}).get(name))
            results["rows"].extend(r.to_dict() for r in rows)
            results["plans"][name] = plans
    results["wall_s"] = time.perf_counter() - t_start
    end = load_avg()
    if end is not None:
        results["machine"]["load_avg_end"] = end
    results["notes"] = legend(s)
    return results


def legend(s: Settings) -> list:
    amp = f", autocast {s.amp}" if s.amp else ""
    lines = [
        f"batch {s.batch}, input {s.size}x{s.size}, {s.rounds} interleaved rounds (median; ± = IQR/median), "
        f"device {s.device}{amp}{', TF32' if s.tf32 else ''}{', channels_last' if s.channels_last else ''}"
        f"{', torch.compile' if s.compile else ', eager'}.",
        "GFLOPs: forward FLOPs per sample (torch.utils.flop_counter); FLOP red. = original GFLOPs / variant GFLOPs.",
        "speed-up = samples/s / original's samples/s (same rounds); eff. = speed-up / FLOP red.",
        "train: SGD step (zero_grad, forward, cross-entropy, backward, step) in train mode.",
        f"lrd: ratio={s.ratio}{', decompose_grouped=True' if s.decompose_grouped else ''}; "
        f"lrd+search: rank_search='{s.search_mode}'"
        + (f", rank_search_budget_s={s.search_budget_s:g}" if s.search_budget_s is not None else "")
        + (f", rank_search_repeats={s.search_repeats}" if s.search_repeats is not None else "")
        + (f", rank_search_window={s.search_window:g}" if s.search_window is not None else "")
        + f"; lrd+search+budget: also rank_budget={s.ratio} (the whole-model plan)"
        + "; seqfreeze: the lrd+search plan with freeze='sequential' (lrd_fx.save/load, or compile at the "
        "searched ranks when load fails), "
        "train/s = mean step time over the schedule's states (epochs 0, 1), compile s = search + load.",
        f"lrd+round8: the lrd estimates scaled to lrd+search+budget's parameter count (lrd+search's without it) "
        f"and rounded down to a multiple of "
        f"{s.round_multiple} (the divisor rule at equal params); lrd+fuse: lrd with fuse_inference=True "
        f"(BatchNorm folded, adjacent linear maps merged, no-op nodes dropped), inference only; "
        "lrd+search+budget+fuse: lrd_fx.fuse of the lrd+search+budget model, inference only.",
        "tltorch: tensorly-torch layers (implementation='factorized') at the lrd row's ranks on the same layers: "
        "Tucker (r_out, r_in, kh, kw) for kxk convs, CP rank r for 1x1 convs and Linear.",
        f"composer: Composer-style Factorize, every Conv2d/Linear with min(in, out) >= {s.composer_min_channels} "
        f"split at latent int({s.composer_fraction} * min(in, out)) where that saves multiply-adds.",
        "compile s: lrd_fx.compile / peer conversion wall time (search rows depend on the timing cache); "
        "layers: factorized / candidate Conv+Linear layers.",
    ]
    return lines


# --- output -----------------------------------------------------------------------------------------------

def format_table(results: dict, *, note_width: int = 60, markdown: bool = False) -> str:
    """The printed table (tabulate) with the machine line and the legend; rebuilt from a results dict.
    markdown=True: a GitHub-markdown table (for the README) without the note column or the legend."""
    from tabulate import tabulate
    headers = list(Row.HEADERS)
    body = [Row.from_dict(r).cells(note_width) for r in results["rows"]]
    if markdown:
        body = [[c.replace("±", "± ") for c in row[:-1]] for row in body]
        return "\n".join([machine_line(results["machine"]), "",
                          tabulate(body, headers=headers[:-1], tablefmt="github", disable_numparse=True)])
    lines = [machine_line(results["machine"]), tabulate(body, headers=headers, disable_numparse=True)]
    lines += ["  " + n for n in results.get("notes", [])]
    return "\n".join(lines)


def results_stem(results: dict) -> str:
    """<device>-<date>[-flags]: cpu-2025-01-31, cuda-NVIDIA-H100-80GB-HBM3-2025-01-31-resnet50-bf16-cl-compile-b64
    (-grouped: decompose_grouped=True)
    (the model when the run had one, the batch when it is not the default's or --quick's)."""
    def safe(name: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    m, s = results["machine"], results["settings"]
    dev = safe("cpu" if m["device_name"] == "cpu" else "cuda-" + m["device_name"])
    models = list(s.get("models") or ())
    one = safe(models[0]) if len(models) == 1 else ""
    tags = [t for t, on in ((one, bool(one)), ("quick", s.get("quick")), (s.get("amp") or "", bool(s.get("amp"))),
                            ("tf32", s.get("tf32")), ("cl", s.get("channels_last")), ("compile", s.get("compile")),
                            ("grouped", s.get("decompose_grouped")),
                            (f"b{s.get('batch')}", s.get("batch") not in (None, DEFAULTS["batch"], QUICK["batch"])))
            if on]
    return "-".join([dev, results["created"][:10]] + tags)


def write_results(results: dict, out_dir) -> dict:
    """Write <stem>.json, .csv and .png into out_dir (a same-named earlier run gets a time suffix)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(results)
    if (out / f"{stem}.json").exists():
        stem += "-" + results["created"][11:19].replace(":", "")
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    keys: list = []
    for r in results["rows"]:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in results["rows"]:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    try:
        plot_speedups(results, paths["png"])
    except Exception as e:
        results.setdefault("plot_error", _err(e))
        paths.pop("png")
    return {k: str(v) for k, v in paths.items()}


def plot_speedups(results: dict, path) -> None:
    """Grouped bars: speed-up over the original per model and variant (inference; training when timed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "original"]
    modes = [m for m in ("infer", "train") if any(r.get(f"speedup_{m}") for r in rows)] or ["infer"]
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6, 1.6 * len(models) * len(modes) + 3), 4.2),
                             squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, mode in zip(axes[0], modes):
        for i, v in enumerate(variants):
            vals = []
            for m in models:
                r = next((r for r in rows if r["model"] == m and r["variant"] == v), None)
                vals.append((r or {}).get(f"speedup_{mode}") or 0.0)
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(models))]
            ax.bar(xs, vals, width, label=v)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=15, fontsize=8)
        ax.set_ylabel(f"{'inference' if mode == 'infer' else 'training'} speed-up vs original")
        ax.set_title("inference" if mode == "infer" else "training")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(machine_line(results["machine"]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list] = None) -> int:
    """`python -m bench` / `lrd-fx bench`: run, print the table, write JSON + CSV + PNG. Returns 0, or 2
    on a usage error; variants that fail are reported in the table, not raised."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.from_json:
            try:
                results = json.loads(Path(args.from_json).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"--from-json {args.from_json}: cannot read a results file ({e})") from e
            if results.get("format") != FORMAT:
                raise ConfigError(f"--from-json {args.from_json}: not a bench results file (format {FORMAT})")
            print(format_table(results, markdown=args.markdown))
            return 0
        s = settings_from_args(args)
    except LRDError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    results = run(s, argv=argv)
    print(format_table(results))
    paths = write_results(results, s.out or RESULTS_DIR)
    print(f"wrote {', '.join(paths.values())} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
