"""Config: every compile option in one dataclass; overrides are validated by name."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from .errors import ConfigError

RankSpec = Union[None, int, str, dict]


@dataclass
class Config:
    # --- rank rule (decompose) -------------------------------------------------------------
    ratio: Optional[float] = None          # fraction of a layer's weights kept; None: 0.25 (one rule: see validate)
    rank: RankSpec = None                  # int, "full", "vbmf", or {name-or-glob: int} per layer
    energy: Optional[float] = None         # keep this fraction of singular-value energy (0, 1]
    conv_scheme: str = "tucker2"           # kxk convs: "tucker2" (1x1->kxk->1x1) or "conv_svd" (kxk->1x1; alias "svd")
    min_channels: int = 8                  # layers with fewer in or out channels/features are skipped
    skip: tuple = ()                       # glob patterns of qualified names never factorized
    filter_fn: Optional[Callable[[str, Any], bool]] = None   # (name, module) -> factorize?
    decompose_linear: bool = True          # factorize nn.Linear layers
    decompose_conv: bool = True            # factorize nn.Conv1d/2d/3d layers

    # --- tracing ----------------------------------------------------------------------------
    leaf_modules: tuple = ()               # extra module classes (or qualified names) kept as leaves
    fallback: bool = True                  # trace children separately when the whole model fails

    # --- rank search (cost model) -----------------------------------------------------------
    rank_search: Optional[str] = None      # None, "infer" (time forward) or "train" (fwd+bwd)
    rank_search_window: float = 0.25       # candidates within +-window of the estimate
    rank_search_margin: float = 0.03       # revert unless the chain beats the original by this much
    rank_search_prefer: str = "speed"      # "speed" or "accuracy" (choice among ties)
    rank_search_objective: str = "time"    # "time" or "time+error"
    rank_search_error_weight: float = 1.0  # weight of the reconstruction error in "time+error"
    rank_search_budget_s: Optional[float] = None   # stop measuring after this many seconds
    rank_budget: Optional[float] = None    # whole-model mode: total factor params <= this fraction
    rank_search_repeats: int = 7           # timed repeats per candidate (median taken)
    amp: Optional[str] = None              # "bf16"/"fp16": time under autocast; "off": never; None: the autocast active at compile()
    align: Union[int, str, None] = "auto"  # rank alignment of estimate + candidates; "auto": 8 on CUDA half precision, else 1
    rank_search_exec: str = "auto"         # "eager", "cuda_graph", "compile"; "auto": cuda_graph on CUDA, eager elsewhere
    whole_model_check: Optional[bool] = None   # time the whole compiled model vs the original; None: when rank_search is on
    cache: Union[bool, str] = True         # timing cache: True (default path), False, or a path
    progress: bool = True                  # tqdm progress bar during the search

    # --- freezing ---------------------------------------------------------------------------
    freeze: Optional[Any] = None           # None, "sequential", "static", or callable(epoch, layer, role)
    freeze_period: int = 1                 # epochs per schedule phase ("sequential")
    freeze_group: str = "core"             # group always frozen by "static": "core"/"outer"/"first"/"last"
    fuse_inference: bool = False           # eval-only model: fold BatchNorm, merge adjacent linear maps, drop no-ops

    # --- calibration (compile(..., calibration=batches)) ------------------------------------
    calibration_mode: str = "sequential"   # "sequential" (layer by layer, compressed inputs) or "oneshot"
    calibration_damping: float = 0.01      # ridge towards the weights, x mean input energy per feature
    recalibrate_bn: bool = True            # re-estimate BatchNorm statistics on the calibration batches

    # --- debugging ---------------------------------------------------------------------------
    debug: bool = False                    # print the graph after every pass
    dump_dir: Optional[str] = None         # write each stage's code into this directory
    check_inputs: bool = True              # run example_inputs through the model before compiling

    def __post_init__(self) -> None:
        # Normalise the shorthand forms first (validate() itself never changes a field), then check
        # everything, so a Config that exists is a valid one however it was built.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _np_int(v):
                setattr(self, f.name, int(v))      # numpy ints: downstream code tests isinstance(v, int)
        if self.ratio is None:
            self.ratio = DEFAULT_RATIO
        if isinstance(self.conv_scheme, str) and self.conv_scheme == "svd":
            self.conv_scheme = "conv_svd"          # the documented alias (1x1 convs and Linear use "svd" anyway)
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        elif isinstance(self.skip, (list, set, frozenset)):
            self.skip = tuple(self.skip)
        if isinstance(self.leaf_modules, (str, type)):
            self.leaf_modules = (self.leaf_modules,)
        elif isinstance(self.leaf_modules, (list, set, frozenset)):
            self.leaf_modules = tuple(self.leaf_modules)
        if isinstance(self.rank, dict):
            # JSON gives lists, numpy its own ints; the rank rule reads ints and tuples of ints (a new
            # dict: the caller's is not touched)
            self.rank = {k: _plain_rank(v) for k, v in self.rank.items()}
        self.validate()

    @property
    def ratio_given(self) -> bool:
        """True when ratio was set explicitly (not the default 0.25)."""
        return type(self.ratio) is not _DefaultRatio

    def replace(self, **overrides) -> "Config":
        """A copy with overrides applied; unknown names raise ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; valid options are: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)   # __post_init__ normalises and validates

    def validate(self) -> None:
        """Check every option's type and range; ConfigError says what to pass instead. Never mutates."""
        self._validate_rank_rule()
        _choice("conv_scheme", self.conv_scheme, ("tucker2", "conv_svd"))
        _int("min_channels", self.min_channels, 1, "e.g. min_channels=8 (1 factorizes every layer)")
        _names("skip", self.skip, (str,), "glob patterns of qualified layer names, e.g. skip=('fc', 'layer4.*')")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"filter_fn={self.filter_fn!r} must be None or a function (name, module) -> bool, "
                              f"e.g. filter_fn=lambda name, m: not name.startswith('head')")
        for name in ("decompose_linear", "decompose_conv", "fallback", "progress", "debug", "check_inputs",
                     "fuse_inference"):
            _bool(name, getattr(self, name))
        if self.fuse_inference and self.freeze is not None:
            raise ConfigError("fuse_inference=True gives an inference-only model, freeze= is for training: pass "
                              "one of them (train with freeze=..., then lrd_fx.fuse(model) for inference)")
        _names("leaf_modules", self.leaf_modules, (str, type),
               "module classes or qualified names, e.g. leaf_modules=(MyBlock, 'encoder.attn')")
        bad = [x for x in self.leaf_modules if isinstance(x, type) and not issubclass(x, nn.Module)]
        if bad:
            raise ConfigError(f"leaf_modules: {bad[0]!r} is not an nn.Module subclass; list module classes "
                              f"(e.g. leaf_modules=(MyBlock,)) or qualified names")
        _choice("rank_search", self.rank_search, (None, "infer", "train"))
        _real("rank_search_window", self.rank_search_window, 0, 1, "e.g. rank_search_window=0.25 (+-25%)")
        _real("rank_search_margin", self.rank_search_margin, 0, 1, "e.g. rank_search_margin=0.03 (3% faster)",
              hi_open=True)
        _choice("rank_search_prefer", self.rank_search_prefer, ("speed", "accuracy"))
        _choice("rank_search_objective", self.rank_search_objective, ("time", "time+error"))
        _real("rank_search_error_weight", self.rank_search_error_weight, 0, math.inf,
              "e.g. rank_search_error_weight=1.0")
        if self.rank_search_budget_s is not None:
            _real("rank_search_budget_s", self.rank_search_budget_s, 0, math.inf,
                  "seconds, e.g. rank_search_budget_s=60 (None: no limit)", lo_open=True)
        if self.rank_budget is not None:
            _real("rank_budget", self.rank_budget, 0, 1, "a fraction of the factorized layers' params, e.g. "
                  "rank_budget=0.25 (None: per-layer ranks)", lo_open=True)
        _int("rank_search_repeats", self.rank_search_repeats, 1, "e.g. rank_search_repeats=7")
        _choice("amp", self.amp, (None, "bf16", "fp16", "off"))
        if not (self.align in (None, "auto") or (isinstance(self.align, numbers.Integral)
                                                  and not isinstance(self.align, bool) and self.align >= 1)):
            raise ConfigError(f"align={self.align!r} must be 'auto', None (no alignment) or an int >= 1, e.g. align=8")
        _choice("rank_search_exec", self.rank_search_exec, ("auto", "eager", "cuda_graph", "compile"))
        _choice("whole_model_check", self.whole_model_check, (None, True, False))
        c = self.cache
        if not (c is None or isinstance(c, bool) or _is_path(c)):
            raise ConfigError(f"cache={c!r} must be True (default file), False (no cache) or a file path, "
                              f"e.g. cache='~/.cache/lrd_fx/timings.sqlite'")
        if self.freeze is not None and not callable(self.freeze):
            from .freezing import Schedule, schedule_names   # registered names (register_schedule)
            if not isinstance(self.freeze, Schedule) and self.freeze not in schedule_names():
                raise ConfigError(
                    f"freeze={self.freeze!r} must be None, a registered schedule name {schedule_names()}, a "
                    f"Schedule or a callable (epoch, layer_name, role) -> trainable")
        _int("freeze_period", self.freeze_period, 1, "epochs per phase, e.g. freeze_period=1")
        _choice("freeze_group", self.freeze_group, ("core", "outer", "first", "last"))
        _choice("calibration_mode", self.calibration_mode, ("sequential", "oneshot"))
        _real("calibration_damping", self.calibration_damping, 0, math.inf,
              "e.g. calibration_damping=0.01 (larger: closer to plain SVD, for few calibration samples)",
              lo_open=True)
        _bool("recalibrate_bn", self.recalibrate_bn)
        if not (self.dump_dir is None or _is_path(self.dump_dir)):
            raise ConfigError(f"dump_dir={self.dump_dir!r} must be None or a directory path, e.g. dump_dir='stages/'")

    def _validate_rank_rule(self) -> None:
        """ratio / rank / energy: each value in range, and at most one rule for any layer."""
        if not (_is_real(self.ratio) and 0 < self.ratio <= 1):
            raise ConfigError(f"ratio={self.ratio!r} must be a number in (0, 1], e.g. ratio=0.25")
        if self.energy is not None and not (_is_real(self.energy) and 0 < self.energy <= 1):
            raise ConfigError(f"energy={self.energy!r} must be a number in (0, 1], e.g. energy=0.9")
        r = self.rank
        if isinstance(r, bool) or not (r is None or isinstance(r, (int, str, dict))):
            raise ConfigError(f"rank={r!r} must be an int, 'full', 'vbmf' or a dict {{name: int}}")
        if isinstance(r, int) and r < 1:
            raise ConfigError(f"rank={r} must be >= 1")
        if isinstance(r, str) and r not in ("full", "vbmf"):
            raise ConfigError(f"rank={r!r}: the string forms are 'full' and 'vbmf'")
        if isinstance(r, dict):
            for k, v in r.items():
                if not isinstance(k, str):
                    raise ConfigError(f"rank dict key {k!r} must be a layer name or glob string")
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
                ok = ok or (isinstance(v, tuple) and len(v) in (1, 2) and
                            all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v))
                if not ok:
                    raise ConfigError(f"rank[{k!r}]={v!r} must be an int >= 1 (or a tuple (r_in, r_out) of them)")
        # One rule per layer. A rank dict names some layers; the others follow energy= or ratio=, so it
        # combines with either. A global rank (int/'full'/'vbmf') leaves nothing for energy or ratio.
        rules = []
        if r is not None and not isinstance(r, dict):
            rules.append(f"rank={r!r}")
        if self.energy is not None:
            rules.append(f"energy={self.energy!r}")
        if self.ratio_given and rules:
            rules.append(f"ratio={self.ratio!r}")
        if len(rules) > 1:
            raise ConfigError(f"{' and '.join(rules)} are rank rules that exclude each other: give one "
                              f"(set the others to None; ratio=None means the default 0.25). A rank dict "
                              f"{{name: rank}} may be combined with energy= or ratio= for the other layers")


class _DefaultRatio(float):
    """The default ratio 0.25: a plain float to every reader, marked so an explicit ratio= is told apart."""
    __slots__ = ()


DEFAULT_RATIO = _DefaultRatio(0.25)


def _np_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (int, bool))


def _plain_rank(v):
    if _np_int(v):
        return int(v)
    if isinstance(v, (list, tuple)):
        return tuple(int(x) if _np_int(x) else x for x in v)
    return v


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_path(v) -> bool:
    return (isinstance(v, str) and v != "") or isinstance(v, os.PathLike)


def _bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{name}={v!r} must be True or False")


def _int(name: str, v, lo: int, example: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ConfigError(f"{name}={v!r} must be an int >= {lo}, {example}")


def _real(name: str, v, lo: float, hi: float, example: str, *, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = _is_real(v) and math.isfinite(v)
    ok = ok and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        lo_s = f"{'(' if lo_open else '['}{lo:g}"
        hi_s = f"{'inf' if hi == math.inf else f'{hi:g}'}{')' if hi_open or hi == math.inf else ']'}"
        raise ConfigError(f"{name}={v!r} must be a number in {lo_s}, {hi_s}, {example}")


def _choice(name: str, v, options: tuple) -> None:
    if not any(v is o or (isinstance(v, str) and v == o) for o in options):
        raise ConfigError(f"{name}={v!r} must be one of {', '.join(repr(o) for o in options)}")


def _names(name: str, v, kinds: tuple, example: str) -> None:
    if not isinstance(v, tuple) or not all(isinstance(x, kinds) for x in v):
        raise ConfigError(f"{name}={v!r} must be a tuple, list or set of {example}")
