"""fuse: inference-only rewrites — drop no-op nodes, fold BatchNorm into the conv before it, merge adjacent linear maps where cheaper."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from ..errors import ConfigError
from ..pipeline import PassResult, graph_modules

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
# Modules whose eval-mode forward returns the input unchanged.
_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)
# Functional dropouts: a no-op when their `training` argument is False (position 2 or keyword).
_NOOP_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
FUSED_ATTR = "_lrd_fused"   # set on the root: the model is inference-only


def _eval_only(module: nn.Module, args) -> None:
    """Forward pre-hook of a fused model: BatchNorm is folded and dropout removed, so train mode would
    silently compute something else than the unfused model."""
    if module.training:
        raise ConfigError(
            "this model was fused for inference (lrd_fx.fuse / fuse_inference=True): BatchNorm is folded "
            "into the convolutions and dropout removed, so it cannot run in train mode; call .eval(), or "
            "train the unfused model (compile without fuse_inference) and fuse it afterwards")


def _arm(root: nn.Module) -> None:
    root.register_forward_pre_hook(_eval_only)
    root.__dict__[FUSED_ATTR] = True


def mark_eval_only(root: nn.Module) -> None:
    """Put `root` in eval mode and make a train-mode forward raise (once per model)."""
    root.eval()
    if getattr(root, FUSED_ATTR, False):
        return
    _arm(root)
    if isinstance(root, fx.GraphModule):
        # GraphModule.__deepcopy__ drops forward hooks; its deepcopy hooks run on the copy
        root._register_deepcopy_hook(_arm)


# --- helpers -------------------------------------------------------------------------------------------

def _parent(part: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    path, _, attr = target.rpartition(".")
    return (part.get_submodule(path) if path else part), attr


def _uses(part: fx.GraphModule, target: str) -> int:
    """Graph references of a submodule: its call_module nodes and get_attr nodes reaching into it."""
    n = 0
    for node in part.graph.nodes:
        if node.op == "call_module" and node.target == target:
            n += 1
        elif node.op == "get_attr" and (node.target == target or node.target.startswith(target + ".")):
            n += 1
    return n


class _Sharing:
    """Module and parameter aliasing over the whole model: a shared module or tied weight must not be
    rewritten in place, since its other users would change too."""

    def __init__(self, root: nn.Module):
        self.modules: dict[int, int] = {}
        for _, m in root.named_modules(remove_duplicate=False):
            self.modules[id(m)] = self.modules.get(id(m), 0) + 1
        self.params: dict[int, int] = {}
        for _, p in root.named_parameters(remove_duplicate=False):
            self.params[id(p)] = self.params.get(id(p), 0) + 1

    def path_private(self, part: fx.GraphModule, target: str, *, include_self: bool = True) -> bool:
        """True when every container on the way to `target` (and the module itself, unless
        include_self=False) is reached by exactly one path of the model."""
        mod = part
        names = target.split(".")
        for attr in names if include_self else names[:-1]:
            mod = getattr(mod, attr)
            if self.modules.get(id(mod), 0) > 1:
                return False
        return True

    def private(self, part: fx.GraphModule, target: str) -> bool:
        """True when the module at `target` may be replaced: one path reaches it, its parameters are its
        own, and the graph calls it once."""
        if not self.path_private(part, target):
            return False
        mod = part.get_submodule(target)
        if any(self.params.get(id(p), 0) > 1 for p in mod.parameters(recurse=False)):
            return False
        return _uses(part, target) == 1

    def add(self, m: nn.Module) -> None:
        self.modules[id(m)] = 1
        for p in m.parameters(recurse=False):
            self.params[id(p)] = 1


def _only_input(node: fx.Node) -> Optional[fx.Node]:
    """The node's single tensor input when it is called as f(x) with nothing else."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _install(part: fx.GraphModule, target: str, new: nn.Module, sharing: _Sharing) -> None:
    part.set_submodule(target, new)
    sharing.add(new)


def _remove_if_unused(part: fx.GraphModule, target: str, sharing: _Sharing) -> None:
    """Delete a submodule the graph no longer calls, unless a container holding it is shared (and may
    still call it eagerly through another path)."""
    if _uses(part, target) == 0 and sharing.path_private(part, target, include_self=False):
        parent, attr = _parent(part, target)
        delattr(parent, attr)


def _plain_conv(m: nn.Module) -> bool:
    return type(m) in _CONVS and m.groups == 1 and not m.transposed


# --- 1. no-op nodes --------------------------------------------------------------------------------------

def _drop_noops(part: fx.GraphModule, sharing: _Sharing) -> int:
    from ..freezing import grad_gate
    from .gates import ungate_graph

    dropped = 0
    if any(n.op == "call_function" and n.target is grad_gate for n in part.graph.nodes):
        ungate_graph(part)    # gates only steer gradients: call the factors directly again
        dropped += 1
    for node in list(part.graph.nodes):
        src = None
        if node.op == "call_module":
            m = part.get_submodule(node.target)
            if type(m) in _NOOP_MODULES:
                src = _only_input(node)
        elif node.op == "call_function" and node.target in _NOOP_FUNCTIONS:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if training is False and node.args and isinstance(node.args[0], fx.Node):
                src = node.args[0]
        if src is None:
            continue
        node.replace_all_uses_with(src)
        part.graph.erase_node(node)
        if node.op == "call_module":
            _remove_if_unused(part, node.target, sharing)
        dropped += 1
    return dropped


# --- 2. BatchNorm folding -------------------------------------------------------------------------------

def fold_bn_weights(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.modules.batchnorm._BatchNorm):
    """(weight, bias) of conv∘bn (eval statistics), computed in float64, returned in the weight's dtype."""
    w = weight.detach().double()
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + beta
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def _foldable_bn(conv: nn.Module, bn: nn.Module) -> bool:
    # any groups (depthwise too): BatchNorm scales whole output channels
    return (type(conv) in _CONVS and not conv.transposed and type(bn) is _BN_FOR[type(conv)] and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels)


def _fold_bns(part: fx.GraphModule, sharing: _Sharing) -> int:
    folded = 0
    for bn_node in list(part.graph.nodes):
        if bn_node.op != "call_module":
            continue
        conv_node = _only_input(bn_node)
        if conv_node is None or conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        conv = part.get_submodule(conv_node.target)
        bn = part.get_submodule(bn_node.target)
        if not _foldable_bn(conv, bn) or not sharing.private(part, conv_node.target):
            continue
        new = copy.deepcopy(conv)
        w, b = fold_bn_weights(conv.weight, conv.bias, bn)
        new.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
        new.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        _install(part, conv_node.target, new, sharing)
        bn_node.replace_all_uses_with(conv_node)
        part.graph.erase_node(bn_node)
        _remove_if_unused(part, bn_node.target, sharing)
        folded += 1
    return folded


# --- 3. merging adjacent linear maps --------------------------------------------------------------------

def _pointwise_plain(m: nn.Module) -> bool:
    """A 1x1 conv that is a per-position matrix multiply: no stride, padding or dilation."""
    return (_plain_conv(m) and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
            and all(p == 0 for p in m.padding) and isinstance(m.padding, tuple))


def _merged(a: nn.Module, b: nn.Module) -> Optional[tuple[nn.Module, int, int]]:
    """(the layer computing b(a(x)), its cost, the pair's cost) — costs in multiply-adds per output
    position of b — or None when the pair cannot be merged exactly."""
    if type(a) is nn.Linear and type(b) is nn.Linear:
        mid = a.out_features
        new = skip_init(nn.Linear, a.in_features, b.out_features, bias=a.bias is not None or b.bias is not None,
                        device=a.weight.device, dtype=a.weight.dtype)
        wa, wb = a.weight.detach().double(), b.weight.detach().double()
        w = wb @ wa
        bias = wb @ a.bias.detach().double() if a.bias is not None else None
        cost_new, cost_old = a.in_features * b.out_features, a.in_features * mid + mid * b.out_features
    elif _plain_conv(a) and _plain_conv(b) and type(a) is type(b):
        ka, kb = math.prod(a.kernel_size), math.prod(b.kernel_size)
        mid = a.out_channels
        wa, wb = a.weight.detach().double(), b.weight.detach().double()
        if _pointwise_plain(b):
            # b mixes channels at each position of a's output: fold it into a's kernel, keep a's geometry
            w = torch.einsum("om,mi...->oi...", wb.reshape(b.out_channels, mid), wa)
            bias = wb.reshape(b.out_channels, mid) @ a.bias.detach().double() if a.bias is not None else None
            proto = a
            cost_new = a.in_channels * b.out_channels * ka
            cost_old = a.in_channels * mid * ka + mid * b.out_channels
        elif _pointwise_plain(a) and (a.bias is None or all(p == 0 for p in b.padding)):
            # a mixes channels before b's kernel; its bias would be wrong where b reads zero padding
            w = torch.einsum("om...,mi->oi...", wb, wa.reshape(mid, a.in_channels))
            bias = wb.sum(dim=tuple(range(2, wb.dim()))) @ a.bias.detach().double() if a.bias is not None else None
            proto = b
            # a runs at every input position of b: stride^d more positions than b's output
            cost_new = a.in_channels * b.out_channels * kb
            cost_old = a.in_channels * mid * math.prod(b.stride) + mid * b.out_channels * kb
        else:
            return None
        new = copy.deepcopy(proto)
        new.in_channels, new.out_channels = a.in_channels, b.out_channels
    else:
        return None
    if b.bias is not None:
        bias = b.bias.detach().double() if bias is None else bias + b.bias.detach().double()
    grad = a.weight.requires_grad
    new.weight = nn.Parameter(w.to(a.weight.dtype), requires_grad=grad)
    new.bias = None if bias is None else nn.Parameter(bias.to(a.weight.dtype), requires_grad=grad)
    return new, cost_new, cost_old


def _merge_pairs(part: fx.GraphModule, sharing: _Sharing) -> int:
    merged = 0
    changed = True
    while changed:
        changed = False
        for b_node in list(part.graph.nodes):
            if b_node.op != "call_module":
                continue
            a_node = _only_input(b_node)
            if a_node is None or a_node.op != "call_module" or len(a_node.users) != 1:
                continue
            if a_node.kwargs or len(a_node.args) != 1:
                continue
            a, b = part.get_submodule(a_node.target), part.get_submodule(b_node.target)
            if not isinstance(a, (nn.Linear,) + _CONVS) or not isinstance(b, (nn.Linear,) + _CONVS):
                continue
            if not sharing.private(part, a_node.target):
                continue     # a is replaced in place; b is only read (and dropped if nothing else calls it)
            res = _merged(a, b)
            if res is None or res[1] >= res[2]:
                continue   # merging would undo a decomposition that saves work: keep the pair
            _install(part, a_node.target, res[0], sharing)
            b_node.replace_all_uses_with(a_node)
            if "tensor_meta" in b_node.meta:
                a_node.meta["tensor_meta"] = b_node.meta["tensor_meta"]
            part.graph.erase_node(b_node)
            _remove_if_unused(part, b_node.target, sharing)
            merged += 1
            changed = True
            break
    return merged


# --- the pass --------------------------------------------------------------------------------------------

def fuse_graphs_(root: nn.Module) -> dict[str, int]:
    """Fuse every GraphModule part of `root` in place; counts of what was done. Idempotent."""
    counts = {"noops": 0, "bn_folded": 0, "merged": 0}
    sharing = _Sharing(root)
    for _, part in graph_modules(root):
        n = _drop_noops(part, sharing)
        f = _fold_bns(part, sharing)
        m = _merge_pairs(part, sharing)
        counts["noops"] += n
        counts["bn_folded"] += f
        counts["merged"] += m
        if n or f or m:
            part.graph.lint()
            part.recompile()
    mark_eval_only(root)
    return counts


def describe(counts: dict) -> str:
    return (f"fuse (inference only): {counts['bn_folded']} BatchNorm folded, {counts['merged']} adjacent "
            f"layers merged, {counts['noops']} no-op nodes dropped")


def fuse(ctx=None, *, notes: Optional[list] = None):
    """Factory of the fuse pass (config.fuse_inference): eval-only rewrites of every traced part.
    What it did goes into ctx.notes (compile) or `notes` (lrd_fx.fuse)."""

    def run(gm):
        counts = fuse_graphs_(gm)
        out = ctx.notes if ctx is not None else notes
        if out is not None:
            out.append(describe(counts))
        return PassResult(gm, any(counts.values()))

    run.name = "fuse"
    return run
