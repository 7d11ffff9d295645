"""Factor-chain containers that replace a Conv/Linear: plain nn layers, callable on their own."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

# Roles of the factor layers; the freezing schedules group layers by these names.
ROLE_FIRST = "first"   # input projection (SVD: in -> r; Tucker-2: 1x1 in -> r_in)
ROLE_CORE = "core"     # Tucker-2 only: kxk r_in -> r_out
ROLE_LAST = "last"     # output projection (r -> out), carries the original bias

# Source classes whose weight is stored [in, out] (transformers' Conv1D: y = x @ W + b).
_IN_OUT_LAYOUT = {"Conv1D"}


def _product(layers) -> torch.Tensor:
    """The weight of applying `layers` (Linear or ConvNd, groups=1, at most one non-1x1 kernel) in order,
    as one [out, in, *kernel] tensor."""
    w = None
    for layer in layers:
        lw = layer.weight
        if w is None:
            w = lw
            continue
        c2, c1 = lw.shape[:2]
        if all(k == 1 for k in lw.shape[2:]):      # pointwise after anything: a matmul over channels
            w = (lw.reshape(c2, c1) @ w.reshape(c1, -1)).reshape(c2, *w.shape[1:])
        else:                                      # a kxk core after a pointwise factor
            w = torch.einsum("ock,ci->oik", lw.reshape(c2, c1, -1), w.reshape(c1, -1))
            w = w.reshape(c2, w.shape[1], *lw.shape[2:])
    return w


class FactorChain(nn.Sequential):
    """A factorized layer: children named first/[core]/last, applied in that order.

    The compiled graph calls the children directly (so every factor is a node);
    the container itself stays callable so the cost model can time it alone.

    It keeps the face of the layer it replaced, so code that reads the layer's attributes keeps working:
    in_features/out_features (Linear), in_channels/out_channels/kernel_size/stride/padding/dilation/groups/
    padding_mode (Conv), nx/nf (transformers' Conv1D), `.bias` (the last factor's) and `.weight`.
    `.weight` is the product of the factors, computed on every read (one matmul of the factor sizes, with
    autograd), in the replaced layer's layout, dtype and device: fine for `.weight.dtype` checks, but code
    that reads it per forward pays that matmul each time.
    """

    def __init__(self, layers: "OrderedDict[str, nn.Module]", *, scheme: str, source: str):
        super().__init__(layers)
        self.scheme = scheme    # "svd" | "tucker2" | "conv_svd"
        self.source = source    # class name of the layer it replaces, e.g. "Conv2d"

    def roles(self) -> list[str]:
        return list(self._modules.keys())

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, source={self.source}"

    # --- the replaced layer's face -------------------------------------------------------------

    def _first(self) -> nn.Module:
        return self._modules[ROLE_FIRST]

    def _last(self) -> nn.Module:
        return self._modules[ROLE_LAST]

    def _spatial(self) -> nn.Module:
        """The factor that carries kernel/stride/padding (Tucker-2: the core; otherwise the first)."""
        return self._modules.get(ROLE_CORE) or self._first()

    def _conv_attr(self, name: str):
        sp = self._spatial()
        if isinstance(sp, nn.Linear):
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute '{name}'")
        return getattr(sp, name)

    def _linear_attr(self, name: str, value):
        if not isinstance(self._first(), nn.Linear):
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute '{name}'")
        return value

    @property
    def in_features(self) -> int:
        return self._linear_attr("in_features", self._first().in_features)

    @property
    def out_features(self) -> int:
        return self._linear_attr("out_features", self._last().out_features)

    @property
    def nx(self) -> int:   # transformers' Conv1D names
        if self.source not in _IN_OUT_LAYOUT:
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute 'nx'")
        return self._first().in_features

    @property
    def nf(self) -> int:
        if self.source not in _IN_OUT_LAYOUT:
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute 'nf'")
        return self._last().out_features

    @property
    def in_channels(self) -> int:
        self._conv_attr("in_channels")
        return self._first().in_channels

    @property
    def out_channels(self) -> int:
        self._conv_attr("out_channels")
        return self._last().out_channels

    @property
    def kernel_size(self):
        return self._conv_attr("kernel_size")

    @property
    def stride(self):
        return self._conv_attr("stride")

    @property
    def padding(self):
        return self._conv_attr("padding")

    @property
    def dilation(self):
        return self._conv_attr("dilation")

    @property
    def padding_mode(self):
        return self._conv_attr("padding_mode")

    @property
    def groups(self) -> int:
        self._conv_attr("groups")
        return 1   # only groups=1 layers are factorized

    @property
    def transposed(self) -> bool:
        self._conv_attr("transposed")
        return False

    @property
    def output_padding(self):
        return self._conv_attr("output_padding")

    @property
    def bias(self):
        return self._last().bias

    @property
    def weight(self) -> torch.Tensor:
        w = _product(self._modules.values())
        if self.source in _IN_OUT_LAYOUT:
            return w.t()
        return w
