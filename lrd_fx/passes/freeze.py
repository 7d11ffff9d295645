"""freeze: put a grad_gate on the weight (and bias) of every factor layer, driven by a FreezeController."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..context import CompileContext
from ..errors import FreezeError
from ..freezing import (FREEZER_NAME, FreezeController, FreezerLink, gate_module_, grad_gate,
                        make_schedule)
from ..layers import FactorChain
from ..pipeline import PassResult, graph_modules
from ..plan import LayerRecord

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_GATE_META = "lrd_gate"          # on gate nodes: the factor key
_FACTOR_META = "lrd_factor"      # on the functional conv/linear node: the factor's module target
_PAD_META = "lrd_gate_pad"       # on the F.pad node of a non-zero padding_mode conv


def _ungatable_reason(m: nn.Module) -> Optional[str]:
    if type(m) is nn.Linear or type(m) in _CONV_FN:
        return None
    return f"factor of type {type(m).__name__} is not a plain nn.Linear/nn.ConvNd"


def _factor_nodes(part: fx.GraphModule):
    for node in part.graph.nodes:
        if node.op != "call_module" or "lrd_role" not in node.meta:
            continue
        rec = node.meta.get("lrd")
        if isinstance(rec, LayerRecord) and not rec.factorized:
            continue
        yield node, rec


def _input_of(node: fx.Node):
    if node.args:
        return node.args[0]
    if "input" in node.kwargs:
        return node.kwargs["input"]
    raise FreezeError(f"freeze: factor node {node.format_node()} has no input argument")


def gate_node(part: fx.GraphModule, node: fx.Node, m: nn.Module, freezer: fx.Node, key: str) -> fx.Node:
    """Replace `call_module` node by get_attr weight -> grad_gate -> F.linear/F.convNd (same result).

    The bias, when the factor has one (only "last" factors do: the original layer's bias), goes through
    the same gate: a frozen factor is frozen whole.
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
            out = g.call_function(_CONV_FN[type(m)],
                                  (x, wg, b, tuple(m.stride), padding, tuple(m.dilation), m.groups))
    out.meta.update(node.meta)
    out.meta[_FACTOR_META] = target
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return out


def ungate_graph(part: fx.GraphModule) -> bool:
    """Inverse of the gating rewrite on one GraphModule: call_module nodes again, gates removed."""
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


def _already_gated(gm: nn.Module) -> bool:
    return any(isinstance(m, (FreezeController, FreezerLink)) for m in gm.modules())


def freeze(ctx: CompileContext):
    """Factory of the freeze pass (config.freeze: a schedule name, Schedule or callable)."""
    cfg = ctx.config

    def run(gm):
        if _already_gated(gm):
            raise FreezeError("freeze: the model already has freezing gates; call "
                              "lrd_fx.strip_gates(model) first or compile the original model again")
        if hasattr(gm, FREEZER_NAME):
            raise FreezeError(f"freeze: the model already has an attribute '{FREEZER_NAME}'; rename it")
        schedule = make_schedule(cfg.freeze, cfg)
        # graph factors: (part, node, module, key); eager factors: (module, key); factors: key -> (layer, role, scheme)
        graph_sites = []
        factors: dict[str, tuple] = {}
        seen: set = set()            # factor keys met in a graph, gated or not
        for prefix, part in graph_modules(gm):
            for node, rec in _factor_nodes(part):
                m = part.get_submodule(node.target)
                key = prefix + node.target
                seen.add(key)
                reason = _ungatable_reason(m)
                if reason is not None:
                    ctx.notes.append(f"freeze: '{key}' left ungated: {reason}")
                    continue
                role = node.meta["lrd_role"]
                layer = rec.name if isinstance(rec, LayerRecord) else key.rpartition(".")[0]
                scheme = rec.scheme if isinstance(rec, LayerRecord) else None
                factors.setdefault(key, (layer, role, scheme))
                graph_sites.append((part, node, m, key))
        eager_sites = []
        for name, chain in gm.named_modules():
            if not isinstance(chain, FactorChain):
                continue
            for role, m in chain.named_children():
                key = f"{name}.{role}"
                if key in seen:
                    continue
                if _ungatable_reason(m) is not None:
                    ctx.notes.append(f"freeze: '{key}' left ungated: {_ungatable_reason(m)}")
                    continue
                # a chain inside a part the tracer kept eager (or called outside any graph)
                eager_sites.append((m, key))
                factors.setdefault(key, (name, role, chain.scheme))
        controller = FreezeController(schedule, factors)
        gm.add_module(FREEZER_NAME, controller)
        for prefix, part in graph_modules(gm):
            if part is not gm and any(p is part for p, *_ in graph_sites):
                part.add_module(FREEZER_NAME, FreezerLink(controller))
        freezer_nodes: dict[int, fx.Node] = {}
        for part, node, m, key in graph_sites:
            fnode = freezer_nodes.get(id(part))
            if fnode is None:
                first = next(iter(n for n in part.graph.nodes if n.op != "placeholder"))
                with part.graph.inserting_before(first):
                    fnode = part.graph.get_attr(FREEZER_NAME)
                freezer_nodes[id(part)] = fnode
            gate_node(part, node, m, fnode, key)
        for m, key in eager_sites:
            gate_module_(m, controller, key)
        ctx.freezer = controller
        ctx.notes.append(f"freeze: {schedule.describe()}; {len(factors)} factor layers gated")
        return PassResult(gm, True)

    run.name = "freeze"
    run.requires = ("decompose",)
    return run
