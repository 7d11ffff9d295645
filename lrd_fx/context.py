"""CompileContext: what every pass of one compile() call shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .config import Config
from .plan import LayerRecord


@dataclass
class CompileContext:
    config: Config
    model: nn.Module                       # the caller's model: read only, never mutated
    example_inputs: Optional[tuple] = None
    example_kwargs: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    records: dict[str, LayerRecord] = field(default_factory=dict)   # qualified name -> record
    originals: dict[str, nn.Module] = field(default_factory=dict)   # qualified name -> copy of the original layer
    fallback_parts: dict[str, str] = field(default_factory=dict)    # module path -> why it was traced apart
    notes: list[str] = field(default_factory=list)                  # free-form lines for the report
    pass_times: dict[str, float] = field(default_factory=dict)

    # State handed from pass to pass. Each field has one writer; its readers are named.
    eager_parts: set = field(default_factory=set)       # modules left eager by tracing. W: api._run. R: decompose, calibrate
    stand_ins: Optional[list] = None                   # paths of nn.MultiheadAttention / MoE experts given a stand-in (torch_modules, moe) (load: the file's; None: every one compile can). W: api.copy_and_run, serialize.load. R: decompose.account_layers, LRDInfo (save)
    std_convs: Optional[dict] = None                   # {path: (timm weight-standardized conv, its plain stand-in)} (std_conv). W: api.copy_and_run. R: api._run (params, restore), search_ranks (timed as itself)
    stand_ins_off: bool = False                         # a file saved before the stand-ins: torch's modules stay as they are. W: serialize.load. R: api.copy_and_run
    kept_eager: dict = field(default_factory=dict)      # {path: reason} kept eager after their graph failed. W: api._run. R: LRDInfo (save)
    traced_none: Optional[list] = None                 # root forward inputs traced as None (given: load's, from the file). W: api._run, serialize.load. R: trace, LRDInfo (save)
    traced_defaults: Optional[dict] = None             # root forward inputs left out with a bool/int/float/str default, {name: value}: trace fixes them where the forward does not trace otherwise (given: load's, from the file); after tracing, those it fixed. W: api._run, serialize.load. R: trace, LRDInfo (save)
    retrace: bool = False                               # shape_prop raises PartFailed for a failing part's graph. W: api._run. R: shape_prop
    layer_io: dict = field(default_factory=dict)        # {layer: {in, out, calls}}. W: shape_prop. R: decompose, search_ranks
    count_flops: bool = False                           # shape_prop counts the FLOPs in its forward. W: api._run. R: shape_prop
    flops_counted: Optional[tuple] = None               # (FLOPs or None, counter error or None). W: shape_prop. R: api._run
    input_check: Optional[Callable] = None              # the eager model on the inputs: InputError if it fails. W: api._run. R: shape_prop
    reference: Optional[Callable] = None                # () -> an eager copy of the caller's model, to check traced parts. W: api._run. R: shape_prop
    empty_init: bool = False                            # factors filled from a file, not factorized. W: serialize.load. R: decompose, materialize.defers
    freezer: Optional[nn.Module] = None                 # the FreezeController. W: freeze. R: LRDInfo
    autocast: Optional[str] = None                      # the caller's active autocast. W: api.compile. R: cost.timer.setting_of
    setting: Any = None                                 # precision/layout/exec form timed in. W: cost.timer.setting_of. R: search_ranks, check_speed, LRDInfo
    calibration: Optional[list] = None                  # calibration batches. W: api.compile. R: calibrate passes, api.build_passes, materialize.defers
    calibration_stats: Optional[dict] = None            # {layer: InputStats}. W: calibration_stats pass. R: calibrate, decompose, search_ranks
    calibration_whitened: dict = field(default_factory=dict)   # memo of whitened weights. W/R: calibrate
    whole_model: Optional[dict] = None                  # whole model vs original, timed. W: check_speed, guard. R: LRDInfo
    whole_model_done: bool = False                      # guard timed the final model: check_speed does not. W: guard. R: check_speed
    guard: Optional[dict] = None                        # what the whole-model guard gave back. W: guard. R: LRDInfo
    params_before: int = 0                              # W: api._run. R: LRDInfo
    flops_before: Optional[int] = 0                     # None: the FLOP counter failed. W: api._run. R: LRDInfo
    flops_after: Optional[int] = 0                      # W: api._run. R: LRDInfo
