"""Config: every compile option, grouped as the workflow is (rank rule, RankSearch, Timing, Freeze, Calibration).

Sub-configs are small frozen dataclasses validated when built (torchao's quantize_(model, config) style):

    lrd_fx.compile(model, x, config=Config(ratio=0.25, rank_search=RankSearch(mode="train", window=0.3),
                                          freeze=Freeze("sequential", period=2)))

The flat keywords stay as shorthand wherever options are given (Config(...), Config.replace, compile, the
CLI): rank_search="infer" builds RankSearch(mode="infer"), freeze="sequential" builds Freeze(schedule=...),
and rank_search_window=0.3, freeze_period=2, amp="bf16", calibration_mode="oneshot", ... set that field of
their sub-config (SHORTHAND lists them). The Config itself only holds the grouped fields.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from .errors import ConfigError

RankSpec = Union[None, int, str, dict]


class _SubConfig:
    """Base of the frozen sub-configs: numpy ints become ints, then every field is checked, when built."""

    def __post_init__(self) -> None:
        _plain_ints(self)
        self.validate()


@dataclass(frozen=True)
class RankSearch(_SubConfig):
    """The on-device rank search (search_ranks pass). Shorthand: rank_search="infer", rank_search_<field>=."""
    mode: str = "infer"                    # "infer" (time forward) or "train" (forward + backward)
    window: float = 0.25                   # candidates within +-window of the estimate
    margin: float = 0.03                   # revert unless the chain beats the original by this much
    prefer: str = "speed"                  # "speed" or "accuracy" (choice among ties)
    objective: str = "time"                # "time" or "time+error" (picks the cost model when none is named)
    error_weight: float = 1.0              # weight of the reconstruction error in "time+error"
    budget_s: Optional[float] = None       # stop measuring after this many seconds
    param_budget: Optional[float] = None   # whole-model plan: total factor params <= this fraction, >= 98% of it (rank_budget=)
    cost_model: Any = None                 # a name registered with lrd_fx.cost.register_cost_model, or a callable

    def validate(self) -> None:
        """Check every field; ConfigError names the field (and its shorthand). Never mutates."""
        with _context("RankSearch"):
            _choice("rank_search", self.mode, ("infer", "train"))
            _real("rank_search_window", self.window, 0, 1, "e.g. rank_search_window=0.25 (+-25%)")
            _real("rank_search_margin", self.margin, 0, 1, "e.g. rank_search_margin=0.03 (3% faster)", hi_open=True)
            _choice("rank_search_prefer", self.prefer, ("speed", "accuracy"))
            _choice("rank_search_objective", self.objective, ("time", "time+error"))
            _real("rank_search_error_weight", self.error_weight, 0, math.inf, "e.g. rank_search_error_weight=1.0")
            if self.budget_s is not None:
                _real("rank_search_budget_s", self.budget_s, 0, math.inf,
                      "seconds, e.g. rank_search_budget_s=60 (None: no limit)", lo_open=True)
            if self.param_budget is not None:
                _real("rank_budget", self.param_budget, 0, 1, "a fraction of the factorized layers' params, e.g. "
                      "rank_budget=0.25 (None: per-layer ranks)", lo_open=True)
            cm = self.cost_model
            fn = cm
            if isinstance(cm, str):
                from .cost.model import COST_MODELS   # ConfigError listing the registered cost models
                fn = COST_MODELS.get(cm)
            elif not (cm is None or callable(cm)):
                raise ConfigError(f"rank_search_cost_model={cm!r} must be None (the objective's model), a name "
                                  f"registered with lrd_fx.cost.register_cost_model, or a callable")
            if self.objective == "time+error" and cm is not None and not _takes(fn, "errors", "error_weight"):
                raise ConfigError(f"rank_search_objective='time+error' passes errors= and error_weight= to the "
                                  f"cost model, and rank_search_cost_model={cm!r} does not take them: leave "
                                  f"rank_search_cost_model unset (the objective selects 'time+error') or name a "
                                  f"cost model whose signature has errors= and error_weight=")


def _takes(fn, *names: str) -> bool:
    """True when callable `fn` accepts every keyword in `names` (or **kwargs); unknown signatures pass."""
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    have = {p.name for p in params}
    return all(n in have for n in names)


@dataclass(frozen=True)
class Timing(_SubConfig):
    """How layers and models are timed on the device, by the rank search and the whole-model check."""
    amp: Optional[str] = None              # "bf16"/"fp16": time under autocast; "off": never; None: the autocast active at compile()
    exec: str = "auto"                     # "eager", "cuda_graph", "compile"; "auto": cuda_graph on CUDA, eager elsewhere (rank_search_exec=)
    repeats: int = 7                       # timed repeats per candidate, median taken (rank_search_repeats=)
    cache: Union[bool, str, None] = True   # timing cache: True (default path), False/None (off), or a path

    def validate(self) -> None:
        with _context("Timing"):
            _choice("amp", self.amp, (None, "bf16", "fp16", "off"))
            _choice("rank_search_exec", self.exec, ("auto", "eager", "cuda_graph", "compile"))
            _int("rank_search_repeats", self.repeats, 1, "e.g. rank_search_repeats=7")
            c = self.cache
            if not (c is None or isinstance(c, bool) or _is_path(c)):
                raise ConfigError(f"cache={c!r} must be True (default file), False (no cache) or a file path, "
                                  f"e.g. cache='~/.cache/lrd_fx/timings.sqlite'")


@dataclass(frozen=True)
class Freeze(_SubConfig):
    """Sequential-freezing gates (freeze pass). Shorthand: freeze="sequential", freeze_period=, freeze_group=."""
    schedule: Any = "sequential"           # a registered name ("sequential", "static", ...), a Schedule, or callable(epoch, layer, role)
    period: int = 1                        # epochs per schedule phase ("sequential")
    group: str = "core"                    # group always frozen by "static": "core"/"outer"/"first"/"last"

    def validate(self) -> None:
        with _context("Freeze"):
            if not callable(self.schedule):
                from .freezing import Schedule, schedule_names   # registered names (register_schedule)
                if not isinstance(self.schedule, Schedule) and not (
                        isinstance(self.schedule, str) and self.schedule in schedule_names()):
                    raise ConfigError(
                        f"freeze={self.schedule!r} must be None, a registered schedule name {schedule_names()}, "
                        f"a Schedule or a callable (epoch, layer_name, role) -> trainable")
            _int("freeze_period", self.period, 1, "epochs per phase, e.g. freeze_period=1")
            _choice("freeze_group", self.group, ("core", "outer", "first", "last"))


@dataclass(frozen=True)
class Calibration(_SubConfig):
    """Data-aware factorization, used when compile(..., calibration=batches) is given (calibrate pass)."""
    mode: str = "sequential"               # "sequential" (layer by layer, compressed inputs) or "oneshot"
    damping: float = 0.01                  # ridge towards the weights, x mean input energy per feature
    recalibrate_bn: bool = True            # re-estimate BatchNorm statistics on the calibration batches
    # key of a dict batch's [batch, tokens] 0/1 mask: Linear inputs shaped [batch, tokens, features] enter
    # the statistics at its non-zero positions only (padding left out); None: every position counts
    token_mask: Optional[str] = "attention_mask"
    # "uniform": every layer keeps `ratio` of its weights; "sensitivity": the same total parameters shared
    # by how much each layer's truncation changes the model's output on the calibration data (allocate pass)
    allocate: str = "uniform"
    allocate_batches: Optional[int] = 4     # calibration batches the sensitivity measurement runs (None: all)

    def validate(self) -> None:
        with _context("Calibration"):
            _choice("calibration_allocate", self.allocate, ("uniform", "sensitivity"))
            if self.allocate_batches is not None and (isinstance(self.allocate_batches, bool) or not isinstance(
                    self.allocate_batches, int) or self.allocate_batches < 1):
                raise ConfigError(f"calibration_allocate_batches={self.allocate_batches!r} must be a positive int "
                                  f"(how many calibration batches measure sensitivity) or None (all)")
            _choice("calibration_mode", self.mode, ("sequential", "oneshot"))
            _real("calibration_damping", self.damping, 0, math.inf,
                  "e.g. calibration_damping=0.01 (larger: closer to plain SVD, for few calibration samples)",
                  lo_open=True)
            _bool("recalibrate_bn", self.recalibrate_bn)
            if self.token_mask is not None and not (isinstance(self.token_mask, str) and self.token_mask):
                raise ConfigError(f"calibration_token_mask={self.token_mask!r} must be the key of the mask in "
                                  f"dict calibration batches, e.g. 'attention_mask', or None (no masking)")


# Flat keyword -> (Config field of its sub-config, field of the sub-config). Accepted by Config(...),
# Config.replace and compile(); the two toggles rank_search="infer" / freeze="sequential" are the fields
# themselves, given a mode or schedule instead of a sub-config.
SHORTHAND: dict[str, tuple[str, str]] = {
    "rank_search_window": ("rank_search", "window"),
    "rank_search_margin": ("rank_search", "margin"),
    "rank_search_prefer": ("rank_search", "prefer"),
    "rank_search_objective": ("rank_search", "objective"),
    "rank_search_error_weight": ("rank_search", "error_weight"),
    "rank_search_budget_s": ("rank_search", "budget_s"),
    "rank_budget": ("rank_search", "param_budget"),
    "rank_search_cost_model": ("rank_search", "cost_model"),
    "amp": ("timing", "amp"),
    "rank_search_exec": ("timing", "exec"),
    "rank_search_repeats": ("timing", "repeats"),
    "cache": ("timing", "cache"),
    "freeze_period": ("freeze", "period"),
    "freeze_group": ("freeze", "group"),
    "calibration_mode": ("calibrate", "mode"),
    "calibration_damping": ("calibrate", "damping"),
    "recalibrate_bn": ("calibrate", "recalibrate_bn"),
    "calibration_token_mask": ("calibrate", "token_mask"),
    "calibration_allocate": ("calibrate", "allocate"),
    "calibration_allocate_batches": ("calibrate", "allocate_batches"),
}
# Sub-config fields, their class and, for the two optional stages, the field a plain value sets.
_GROUPS: dict[str, tuple[type, Optional[str]]] = {
    "rank_search": (RankSearch, "mode"), "freeze": (Freeze, "schedule"),
    "timing": (Timing, None), "calibrate": (Calibration, None),
}


@dataclass(init=False)
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
    decompose_grouped: bool = False        # also grouped convs, each group on its own (fewer parameters; slower here)
    align: Union[int, str, None] = "auto"  # rank alignment of estimate + candidates; "auto": 8 on CUDA half precision, else 1

    # --- tracing ----------------------------------------------------------------------------
    leaf_modules: tuple = ()               # extra module classes (or qualified names) kept as leaves
    fallback: bool = True                  # trace children separately when the whole model fails

    # --- stages after decompose (None: the stage is off) --------------------------------------
    rank_search: Optional[RankSearch] = None   # on-device rank search; shorthand rank_search="infer"/"train"
    timing: Timing = field(default_factory=Timing)   # how the search and the whole-model check time things
    whole_model_check: Optional[bool] = None   # time the whole compiled model vs the original; None: when rank_search is on
    whole_model_guard: Optional[bool] = None   # give layers back while the whole model is slower than the original; None: when rank_search is on
    freeze: Optional[Freeze] = None        # freezing gates; shorthand freeze="sequential"/"static"/Schedule/callable
    fuse_inference: bool = False           # eval-only model: fold BatchNorm, merge adjacent linear maps, drop no-ops
    calibrate: Calibration = field(default_factory=Calibration)   # options of compile(..., calibration=batches)

    # --- debugging ---------------------------------------------------------------------------
    progress: bool = True                  # tqdm progress bars (factorization, calibration, search)
    debug: bool = False                    # print the graph after every pass
    dump_dir: Optional[str] = None         # write each stage's code into this directory
    check_inputs: bool = True              # check example_inputs fit (device, dtype; shapes: the eager model when the first forward fails) and that each traced part computes what its module does on them

    def __init__(self, **options) -> None:
        """Config(field=..., shorthand=...): every field of the dataclass plus the SHORTHAND keywords."""
        kw = _fold(None, options)
        for f in dataclasses.fields(Config):
            setattr(self, f.name, kw[f.name] if f.name in kw else _default(f.name))
        self.__post_init__()

    def __post_init__(self) -> None:
        # Normalise the shorthand forms first (validate() itself never changes a field), then check
        # everything, so a Config that exists is a valid one however it was built.
        _plain_ints(self)                          # numpy ints: downstream code tests isinstance(v, int)
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

    @classmethod
    def option_names(cls) -> list[str]:
        """Every keyword Config(...), Config.replace and compile() accept: the fields and the shorthand."""
        return sorted({f.name for f in dataclasses.fields(cls)} | set(SHORTHAND))

    @property
    def ratio_given(self) -> bool:
        """True when ratio was set explicitly (not the default 0.25)."""
        return type(self.ratio) is not _DefaultRatio

    def replace(self, **overrides) -> "Config":
        """A copy with overrides applied (fields or shorthand, applied on top of this config's sub-configs:
        replace(rank_search_window=0.3) keeps the other RankSearch fields); unknown names raise ConfigError."""
        kw = _fold(self, overrides)
        return Config(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **kw})

    def validate(self) -> None:
        """Check every option's type and range; ConfigError says what to pass instead. Never mutates."""
        self._validate_rank_rule()
        _choice("conv_scheme", self.conv_scheme, ("tucker2", "conv_svd"))
        _int("min_channels", self.min_channels, 1, "e.g. min_channels=8 (1 factorizes every layer)")
        _names("skip", self.skip, (str,), "glob patterns of qualified layer names, e.g. skip=('fc', 'layer4.*')")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"filter_fn={self.filter_fn!r} must be None or a function (name, module) -> bool, "
                              f"e.g. filter_fn=lambda name, m: not name.startswith('head')")
        for name in ("decompose_linear", "decompose_conv", "decompose_grouped", "fallback", "progress", "debug",
                     "check_inputs", "fuse_inference"):
            _bool(name, getattr(self, name))
        _names("leaf_modules", self.leaf_modules, (str, type),
               "module classes or qualified names, e.g. leaf_modules=(MyBlock, 'encoder.attn')")
        bad = [x for x in self.leaf_modules if isinstance(x, type) and not issubclass(x, nn.Module)]
        if bad:
            raise ConfigError(f"leaf_modules: {bad[0]!r} is not an nn.Module subclass; list module classes "
                              f"(e.g. leaf_modules=(MyBlock,)) or qualified names")
        if not (self.align in (None, "auto") or (isinstance(self.align, numbers.Integral)
                                                  and not isinstance(self.align, bool) and self.align >= 1)):
            raise ConfigError(f"align={self.align!r} must be 'auto', None (no alignment) or an int >= 1, e.g. align=8")
        for name, (cls, toggle) in _GROUPS.items():
            v = getattr(self, name)
            if v is None and toggle is not None:
                continue
            if not isinstance(v, cls):
                off = " None (off)," if toggle else ""
                short = f" (or the shorthand {name}=<{toggle}>)" if toggle else ""
                raise ConfigError(f"{name}={v!r} must be{off} an lrd_fx.{cls.__name__}{short}")
            v.validate()
        _choice("whole_model_check", self.whole_model_check, (None, True, False))
        _choice("whole_model_guard", self.whole_model_guard, (None, True, False))
        if self.fuse_inference and self.freeze is not None:
            raise ConfigError("fuse_inference=True gives an inference-only model, freeze= is for training: pass "
                              "one of them (train with freeze=..., then lrd_fx.fuse(model) for inference)")
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
        global_rule = (r is not None and not isinstance(r, dict)) or self.energy is not None
        if getattr(self.calibrate, "allocate", None) == "sensitivity" and global_rule:
            raise ConfigError(f"calibration_allocate='sensitivity' shares the parameters of ratio= among the "
                              f"layers; it does not combine with {rules[0]} (use ratio=..., or "
                              f"calibration_allocate='uniform')")


def _fold(base: Optional[Config], options: dict) -> dict:
    """Keywords (fields and SHORTHAND) -> field values: a plain mode/schedule given for rank_search/freeze
    becomes its sub-config, a shorthand keyword sets its field of the sub-config, on top of the one given
    in the same call, else `base`'s, else the default. Unknown names raise ConfigError."""
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(k for k in options if k not in fields and k not in SHORTHAND)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; valid options are: {', '.join(Config.option_names())}")
    kw = {k: v for k, v in options.items() if k in fields}
    for name, (cls, toggle) in _GROUPS.items():
        subs = {attr: options[flat] for flat, (group, attr) in SHORTHAND.items() if group == name and flat in options}
        if name in kw:
            current = kw[name]
            if toggle is not None and current is not None and not isinstance(current, cls):
                # rank_search="train" / freeze="static": the mode or schedule of the sub-config in force
                prev = getattr(base, name, None) if base is not None else None
                subs = {toggle: current, **subs}
                current = prev if isinstance(prev, cls) else None
        else:
            current = getattr(base, name) if base is not None else _default(name)
        if not subs:
            continue
        if toggle is not None and current is None and toggle not in subs:
            flat = ", ".join(f"{k}=" for k, (g, _) in SHORTHAND.items() if g == name and k in options)
            example = "rank_search='infer'" if name == "rank_search" else "freeze='sequential'"
            raise ConfigError(f"{flat} set(s) an option of {name}, which is off: turn it on in the same call "
                              f"(e.g. {example}) or pass {name}=lrd_fx.{cls.__name__}(...)")
        if current is None:
            kw[name] = cls(**subs)
        elif isinstance(current, cls):
            kw[name] = dataclasses.replace(current, **subs)
        else:
            raise ConfigError(f"{name}={current!r} must be an lrd_fx.{cls.__name__} to take "
                              f"{', '.join(sorted(subs))} on top")
    return kw


def _default(name: str):
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class _context:
    """Prefix ConfigErrors raised inside with the sub-config's class name ("RankSearch: ...")."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if isinstance(exc, ConfigError) and not str(exc).startswith(self.where):
            raise type(exc)(f"{self.where}: {exc}") from None
        return False


def _plain_ints(obj) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if _np_int(v):
            object.__setattr__(obj, f.name, int(v))   # frozen: numpy ints become ints once, at construction


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
