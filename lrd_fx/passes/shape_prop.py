"""shape_prop: run the example inputs once and annotate every node with its tensor shapes."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..context import CompileContext
from ..pipeline import PassResult, graph_modules
from ..trace import _FACTORIZABLE


def _shape(x):
    return list(x.shape) if isinstance(x, torch.Tensor) else None


def capture_layer_io(root: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Run root once; return ({layer name: {in, out, calls}}, {graph-module name: (args, kwargs)})."""
    layers: dict[str, dict] = {}
    part_inputs: dict[str, tuple] = {}
    handles = []
    for name, m in root.named_modules():
        if isinstance(m, _FACTORIZABLE):
            def hook(mod, inp, out, name=name):
                rec = layers.setdefault(name, {"in": _shape(inp[0]) if inp else None,
                                               "out": _shape(out), "calls": 0})
                rec["calls"] += 1
            handles.append(m.register_forward_hook(hook))
        if isinstance(m, torch.fx.GraphModule) and name:
            def pre(mod, a, kw, name=name):
                part_inputs.setdefault(name, (a, kw))
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return layers, part_inputs


def shape_prop(ctx: CompileContext):
    def run(gm):
        if ctx.example_inputs is None:
            return PassResult(gm, False)
        was_training = gm.training
        gm.eval()   # shapes only: keep BatchNorm statistics of the copy untouched
        try:
            layers, part_inputs = capture_layer_io(gm, ctx.example_inputs, ctx.example_kwargs)
            for prefix, part in graph_modules(gm):
                name = prefix[:-1]
                if name == "":
                    a, kw = ctx.example_inputs, ctx.example_kwargs
                elif name in part_inputs:
                    a, kw = part_inputs[name]
                else:
                    continue   # never called with these inputs
                if kw:
                    continue   # ShapeProp takes positional inputs only; hooks above still give layer shapes
                with torch.no_grad():
                    ShapeProp(part).propagate(*a)
        finally:
            gm.train(was_training)
        ctx.extras["layer_io"] = layers
        for prefix, part in graph_modules(gm):
            for node in part.graph.nodes:
                if node.op == "call_module" and (prefix + node.target) in layers:
                    node.meta["lrd_io"] = layers[prefix + node.target]
        return PassResult(gm, False)
    run.name = "shape_prop"
    return run
