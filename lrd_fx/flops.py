"""FLOP counts: the whole model (torch.utils.flop_counter) and the per-layer formulas the report uses."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from .factorize.modules import layer_dims

# FLOPs are 2 x multiply-adds, as torch.utils.flop_counter counts them. A layer's `io` is what the
# shape_prop pass records for it: {"in": input shape, "out": output shape, "calls": calls per forward}.


@contextlib.contextmanager
def fused_attention_off():
    """torch's fused attention fast path off (nn.MultiheadAttention and nn.TransformerEncoderLayer in eval
    without grad), for FLOP counting: torch's counter has no formula for those kernels, so their
    projections and attention went uncounted (torchvision's ViT-B/16: 22.5 of its 34.9 GFLOPs)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def count_flops(model: nn.Module, inputs: tuple) -> int:
    """Total FLOPs of one forward (torch.utils.flop_counter), in eval mode so no statistics change."""
    from torch.utils.flop_counter import FlopCounterMode
    from .pipeline import eval_mode
    with torch.no_grad(), eval_mode(model), fused_attention_off(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return int(fc.get_total_flops())


def layer_flops(m: nn.Module, io: Optional[dict]) -> int:
    """FLOPs of a Linear / HF Conv1D / Conv*d layer over all its calls (0 when it never ran)."""
    if not io or io.get("out") is None:
        return 0
    out, inp, k = layer_dims(m)
    groups = getattr(m, "groups", 1)
    positions = math.prod(io["out"]) // out      # batch x spatial (or leading dims for Linear)
    return 2 * positions * out * (inp // groups) * k * io["calls"]


def chain_flops(chain: nn.Module, io: Optional[dict]) -> int:
    """FLOPs of a factor chain (FactorChain: `scheme`, children first[, core], last) standing for a layer
    with that `io`: every factor runs at the layer's output positions, except Tucker-2's first 1x1, which
    runs at the input positions (the core does the striding)."""
    if not io or io.get("out") is None or io.get("in") is None:
        return 0
    out_ch = layer_dims(chain[-1])[0]
    in_ch = layer_dims(chain[0])[1]
    out_pos = math.prod(io["out"]) // out_ch
    in_pos = math.prod(io["in"]) // in_ch
    total = 0
    for role, layer in chain.named_children():
        o, i, k = layer_dims(layer)
        pos = in_pos if (chain.scheme == "tucker2" and role == "first") else out_pos
        total += 2 * pos * o * (i // getattr(layer, "groups", 1)) * k
    return total * io["calls"]
