"""Factor-chain containers that replace a Conv/Linear: plain nn layers, callable on their own."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

# Roles of the factor layers; the freezing schedules group layers by these names.
ROLE_FIRST = "first"   # input projection (SVD: in -> r; Tucker-2: 1x1 in -> r_in)
ROLE_CORE = "core"     # Tucker-2 only: kxk r_in -> r_out
ROLE_LAST = "last"     # output projection (r -> out), carries the original bias


class FactorChain(nn.Sequential):
    """A factorized layer: children named first/[core]/last, applied in that order.

    The compiled graph calls the children directly (so every factor is a node);
    the container itself stays callable so the cost model can time it alone.
    """

    def __init__(self, layers: "OrderedDict[str, nn.Module]", *, scheme: str, source: str):
        super().__init__(layers)
        self.scheme = scheme    # "svd" | "tucker2" | "conv_svd"
        self.source = source    # class name of the layer it replaces, e.g. "Conv2d"

    def roles(self) -> list[str]:
        return list(self._modules.keys())

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, source={self.source}"
