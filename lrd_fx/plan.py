"""LayerRecord: what the passes decided for one layer; lives in node.meta["lrd"] and in gm.lrd.plan."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# Decisions a layer can end with.
DECOMPOSED = "decomposed"   # factorized at the rule's rank
SEARCHED = "searched"       # factorized at the rank chosen by on-device timing
REVERTED = "reverted"       # timing showed the original layer is faster: kept as it was
SKIPPED = "skipped"         # never factorized (reason says why)


@dataclass
class LayerRecord:
    name: str                          # qualified module name in the original model
    kind: str                          # "Linear", "Conv2d", ...
    scheme: Optional[str] = None       # "svd", "tucker2", "conv_svd" or None when skipped
    decision: str = SKIPPED
    reason: str = ""
    in_shape: Optional[list] = None    # input shape seen in shape propagation (first call)
    out_shape: Optional[list] = None
    full_ranks: Optional[list] = None  # ranks at which the factorization is exact
    estimate: Optional[list] = None    # ranks from the rank rule (ratio/energy/vbmf/int)
    ranks: Optional[list] = None       # final ranks (data-flow order: SVD [r], Tucker-2 [r_in, r_out])
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0              # per forward call with the example inputs
    flops_after: int = 0
    time_original_s: Optional[float] = None   # measured by the rank search
    time_estimate_s: Optional[float] = None
    time_chosen_s: Optional[float] = None
    candidates: dict = field(default_factory=dict)   # {rank (str): seconds}, rank search only
    fallback: Optional[str] = None     # set when this layer was reached by the per-child fallback

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def factorized(self) -> bool:
        return self.decision in (DECOMPOSED, SEARCHED)
