"""Config: every compile option in one dataclass; overrides are validated by name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from .errors import ConfigError

RankSpec = Union[None, int, str, dict]


@dataclass
class Config:
    # --- rank rule (decompose) -------------------------------------------------------------
    ratio: Optional[float] = 0.25          # fraction of a layer's params kept; used when rank/energy unset
    rank: RankSpec = None                  # int, "full", "vbmf", or {name-or-glob: int} per layer
    energy: Optional[float] = None         # keep this fraction of singular-value energy (0, 1]
    conv_scheme: str = "tucker2"           # "tucker2" (1x1 -> kxk -> 1x1) or "svd" (kxk -> 1x1)
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
    cache: Union[bool, str] = True         # timing cache: True (default path), False, or a path
    progress: bool = True                  # tqdm progress bar during the search

    # --- freezing ---------------------------------------------------------------------------
    freeze: Optional[Any] = None           # None, "sequential", "static", or callable(epoch, layer, role)
    freeze_period: int = 1                 # epochs per schedule phase ("sequential")
    freeze_group: str = "core"             # group always frozen by "static": "core"/"outer"/"first"/"last"

    # --- debugging ---------------------------------------------------------------------------
    debug: bool = False                    # print the graph after every pass
    dump_dir: Optional[str] = None         # write each stage's code into this directory
    check_inputs: bool = True              # run example_inputs through the model before compiling

    def replace(self, **overrides) -> "Config":
        """A copy with overrides applied; unknown names raise ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; valid options are: {', '.join(sorted(names))}")
        new = dataclasses.replace(self, **overrides)
        new.validate()
        return new

    def validate(self) -> None:
        if self.rank is None and self.energy is None:
            if self.ratio is None or not isinstance(self.ratio, (int, float)) or not (0 < self.ratio <= 1):
                raise ConfigError(f"ratio={self.ratio!r} must be a number in (0, 1], e.g. ratio=0.25")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise ConfigError(f"energy={self.energy!r} must be in (0, 1], e.g. energy=0.9")
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
                ok = ok or (isinstance(v, tuple) and all(isinstance(x, int) and x >= 1 for x in v))
                if not ok:
                    raise ConfigError(f"rank[{k!r}]={v!r} must be an int >= 1 (or a tuple of them)")
        if self.conv_scheme not in ("tucker2", "svd"):
            raise ConfigError(f"conv_scheme={self.conv_scheme!r} must be 'tucker2' or 'svd'")
        if self.rank_search not in (None, "infer", "train"):
            raise ConfigError(f"rank_search={self.rank_search!r} must be None, 'infer' or 'train'")
        if not (0 <= self.rank_search_window <= 1):
            raise ConfigError(f"rank_search_window={self.rank_search_window!r} must be in [0, 1]")
        if self.rank_search_prefer not in ("speed", "accuracy"):
            raise ConfigError(f"rank_search_prefer={self.rank_search_prefer!r} must be 'speed' or 'accuracy'")
        if self.rank_search_objective not in ("time", "time+error"):
            raise ConfigError(
                f"rank_search_objective={self.rank_search_objective!r} must be 'time' or 'time+error'")
        if self.rank_budget is not None and not (0 < self.rank_budget <= 1):
            raise ConfigError(f"rank_budget={self.rank_budget!r} must be a fraction in (0, 1]")
        if self.freeze is not None and not callable(self.freeze):
            from .freezing import Schedule, schedule_names   # registered names (register_schedule)
            if not isinstance(self.freeze, Schedule) and self.freeze not in schedule_names():
                raise ConfigError(
                    f"freeze={self.freeze!r} must be None, a registered schedule name {schedule_names()}, a "
                    f"Schedule or a callable (epoch, layer_name, role) -> trainable")
        if not isinstance(self.freeze_period, int) or self.freeze_period < 1:
            raise ConfigError(f"freeze_period={self.freeze_period!r} must be an int >= 1")
        if self.freeze_group not in ("core", "outer", "first", "last"):
            raise ConfigError(f"freeze_group={self.freeze_group!r} must be 'core', 'outer', 'first' or 'last'")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ConfigError(f"min_channels={self.min_channels!r} must be an int >= 1")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
