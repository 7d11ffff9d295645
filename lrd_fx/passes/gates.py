"""Gate rewrites of a graph: gate_node (a factor call -> gated functional call), its inverse ungate_graph,
and strip_gates (a copy of a gated model without gates or controller)."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..api import copy_model, outside_inference_mode
from ..errors import FreezeError
from ..freezing import FREEZER_NAME, FreezeController, FreezerLink, grad_gate, ungate_module_
from ..trace import mark_graph_holders

CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_GATE_META = "lrd_gate"          # on gate nodes: the factor key
_FACTOR_META = "lrd_factor"      # on the functional conv/linear node: the factor's module target
_PAD_META = "lrd_gate_pad"       # on the F.pad node of a non-zero padding_mode conv


def gate_node(part: fx.GraphModule, node: fx.Node, m: nn.Module, freezer: fx.Node, key: str) -> fx.Node:
    """Replace `call_module` node by get_attr weight -> grad_gate -> F.linear/F.convNd (same result).

    The bias, when the factor has one (only "last" factors do: the original layer's bias), goes through
    the same gate: a frozen factor is frozen whole. The caller lints and recompiles.
    """
    g = part.graph
    target = node.target
    with g.inserting_before(node):
        x = _input_of(node)
        w = g.get_attr(f"{target}.weight")
        wg = g.call_function(grad_gate, (w, freezer, key))
        wg.meta[_GATE_META] = key
        b = None
        if m.bias is not None:
            b = g.get_attr(f"{target}.bias")
            b = g.call_function(grad_gate, (b, freezer, key))
            b.meta[_GATE_META] = key
        if isinstance(m, nn.Linear):
            out = g.call_function(F.linear, (x, wg, b))
        else:
            dims = m.weight.dim() - 2
            padding = m.padding
            if m.padding_mode != "zeros":
                # what nn.ConvNd does for reflect/replicate/circular: pad explicitly, conv unpadded
                x = g.call_function(F.pad, (x, tuple(m._reversed_padding_repeated_twice)),
                                    {"mode": m.padding_mode})
                x.meta[_PAD_META] = True
                padding = (0,) * dims
            out = g.call_function(CONV_FN[type(m)],
                                  (x, wg, b, tuple(m.stride), padding, tuple(m.dilation), m.groups))
    out.meta.update(node.meta)
    out.meta[_FACTOR_META] = target
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return out


def _input_of(node: fx.Node):
    if node.args:
        return node.args[0]
    if "input" in node.kwargs:
        return node.kwargs["input"]
    raise FreezeError(f"freeze: factor node {node.format_node()} has no input argument")


def ungate_graph(part: fx.GraphModule) -> bool:
    """Inverse of gate_node on one GraphModule, in place: call_module nodes again, gates removed."""
    g = part.graph
    changed = False
    for node in list(g.nodes):
        target = node.meta.get(_FACTOR_META)
        if node.op != "call_function" or target is None:
            continue
        x = node.args[0]
        pad = x if isinstance(x, fx.Node) and x.meta.get(_PAD_META) else None
        if pad is not None:
            x = pad.args[0]
        with g.inserting_before(node):
            new = g.call_module(target, (x,))
        new.meta.update({k: v for k, v in node.meta.items() if k != _FACTOR_META})
        node.replace_all_uses_with(new)
        g.erase_node(node)
        if pad is not None and not pad.users:
            g.erase_node(pad)
        changed = True
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is grad_gate and not node.users:
            src = node.args[0]
            g.erase_node(node)
            if isinstance(src, fx.Node) and src.op == "get_attr" and not src.users:
                g.erase_node(src)
            changed = True
    for node in list(g.nodes):
        if node.op == "get_attr" and node.target == FREEZER_NAME and not node.users:
            g.erase_node(node)
            changed = True
    if changed:
        g.lint()
        part.recompile()
    return changed


@outside_inference_mode
def strip_gates(model: nn.Module) -> nn.Module:
    """A copy of a gated model without gates or controller: factor calls are call_module nodes again.

    For inference and export (same outputs, same parameter names). The given model is not changed.
    """
    new = copy_model(model)
    for _, part in list(new.named_modules()):
        if isinstance(part, fx.GraphModule):
            ungate_graph(part)
    for _, m in list(new.named_modules()):
        ungate_module_(m)
    for _, m in list(new.named_modules()):
        for cname, child in list(m._modules.items()):
            if isinstance(child, (FreezeController, FreezerLink)):
                del m._modules[cname]
    info = getattr(new, "lrd", None)
    if info is not None and hasattr(info, "freezer"):
        info.freezer = None
    mark_graph_holders(new)      # the factors are called again: hooks on them run, and warn no more
    return new
