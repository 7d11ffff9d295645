"""CompileContext: what every pass of one compile() call shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
    extras: dict[str, Any] = field(default_factory=dict)            # per-pass scratch (e.g. freezer)
