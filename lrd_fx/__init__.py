"""lrd_fx: a torch.fx compiler that makes low-rank-decomposed networks fast."""
from .api import LRDInfo, compile, fuse, load, save
from .bn import recalibrate_bn
from .config import Calibration, Config, Freeze, RankSearch, Timing
from .errors import (CacheError, ConfigError, FactorizationError, FreezeError, InputError, LoadError,
                     LRDError, PassError, RankError, SaveError, TraceError, UnsupportedError)
from .dist import wrap_ddp
from .freezing import FreezeController, Schedule, register_schedule, schedule_names
from .passes.gates import strip_gates
from .trace import register_leaf_function, register_leaf_module

__version__ = "0.1.0"

__all__ = [
    "compile", "fuse", "save", "load", "Config", "RankSearch", "Timing", "Freeze", "Calibration", "LRDInfo",
    "LRDError", "ConfigError", "RankError", "InputError", "TraceError", "FactorizationError",
    "PassError", "CacheError", "FreezeError", "LoadError", "SaveError", "UnsupportedError",
    "register_leaf_module", "register_leaf_function",
    "FreezeController", "Schedule", "register_schedule", "schedule_names", "strip_gates",
    "recalibrate_bn", "wrap_ddp",
]
