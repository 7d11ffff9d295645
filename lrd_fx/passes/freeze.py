"""freeze: put a grad_gate on the weight (and bias) of every factor layer, driven by a FreezeController."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from ..context import CompileContext
from ..errors import FreezeError
from ..factorize.chain import FactorChain
from ..freezing import FREEZER_NAME, FreezeController, FreezerLink, gate_module_, make_schedule
from ..pipeline import PassResult, graph_modules
from ..plan import LayerRecord
from .gates import CONV_FN, gate_node


def _ungatable_reason(m: nn.Module) -> Optional[str]:
    if type(m) is nn.Linear or type(m) in CONV_FN:
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


def _already_gated(gm: nn.Module) -> bool:
    return any(isinstance(m, (FreezeController, FreezerLink)) for m in gm.modules())


def freeze(ctx: CompileContext):
    """Factory of the freeze pass (config.freeze: an lrd_fx.Freeze)."""
    cfg = ctx.config

    def run(gm):
        if _already_gated(gm):
            raise FreezeError("freeze: the model already has freezing gates; call "
                              "lrd_fx.strip_gates(model) first or compile the original model again")
        if hasattr(gm, FREEZER_NAME):
            raise FreezeError(f"freeze: the model already has an attribute '{FREEZER_NAME}'; rename it")
        schedule = make_schedule(cfg.freeze.schedule, cfg.freeze)
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
