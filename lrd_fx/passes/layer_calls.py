"""layer_calls: `F.linear(x, layer.weight, bias)` in a traced graph becomes a call of the layer, so it can be factorized.

timm's BEiT, EVA and Swin-V2 attention compute their qkv projection as `F.linear(x, self.qkv.weight,
qkv_bias)` with a bias made of separate q/v parameters (the layer itself has none). A graph that reads a
layer's weight cannot call a factor chain, so those layers were skipped. Where a graph reads an
nn.Linear's weight only to pass it to F.linear, this pass writes the call as the layer's own,
`layer(x)`, plus the call's bias cast to the result's dtype (the dtype F.linear's bias gets under autocast);
a layer with a bias of its own must be called with exactly that bias. Runs before shape_prop, so the
layer's calls are recorded like any other's.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..context import CompileContext
from ..pipeline import PassResult, graph_modules
from ..trace import call_reason

_LINEAR = (F.linear, torch._C._nn.linear)


def _operands(node: fx.Node) -> Optional[tuple]:
    """(input, weight, bias) of an F.linear call node, or None when its arguments do not bind."""
    names = ("input", "weight", "bias")
    values = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names or k in values:
            return None
        values[k] = v
    if "input" not in values or "weight" not in values:
        return None
    return values["input"], values["weight"], values.get("bias")


def _calls_of(part: fx.GraphModule, prefix: str, model: nn.Module, weight: fx.Node) -> Optional[tuple[str, nn.Module]]:
    """(path in part, the caller's layer) when `weight` reads the weight of a plain nn.Linear (in the caller's
    model `model`: no hooks, no parametrization) that every one of the node's users passes to F.linear as
    the weight, else None."""
    if weight.op != "get_attr" or not weight.target.endswith(".weight"):
        return None
    path = weight.target[: -len(".weight")]
    try:
        original = model.get_submodule(prefix + path)
    except AttributeError:
        return None
    if type(original) is not nn.Linear or call_reason(original) is not None:
        return None      # its hooks never ran (F.linear is no call of the layer): a call would start them
    for user in weight.users:
        ops = _operands(user) if user.op == "call_function" and user.target in _LINEAR else None
        if ops is None or ops[1] is not weight or ops[0] is weight or ops[2] is weight:
            return None
    return path, original


def _layer_in(part: fx.GraphModule, path: str, original: nn.Linear) -> nn.Linear:
    """The nn.Linear at `path` of `part`, made there when tracing kept only the tensors the graph read (fx
    builds a bare container for them): a Linear of the original's shape holding those same tensors."""
    holder = part.get_submodule(path)
    if isinstance(holder, nn.Linear):
        return holder
    layer = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None, device="meta")
    layer.weight = holder.weight
    if original.bias is not None:
        layer.bias = holder.bias
    layer.train(holder.training)
    part.set_submodule(path, layer)
    return layer


def _rewritable(part: fx.GraphModule, prefix: str, model: nn.Module):
    """(node, input, weight read, bias read, bias to add or None, path, the caller's layer) of each F.linear
    call in `part` that is a call of a layer (see the module docstring), one at a time (checked when reached,
    so a rewrite of the one before counts)."""
    for node in list(part.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR:
            continue
        ops = _operands(node)
        if ops is None or not isinstance(ops[1], fx.Node):
            continue
        x, weight, bias = ops
        found = _calls_of(part, prefix, model, weight)
        if found is None:
            continue
        path, original = found
        extra = bias
        if original.bias is not None:
            # the layer adds its own bias: only a call with exactly that bias is the layer's call
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias"):
                continue
            extra = None
        yield node, x, weight, bias, extra, path, original


def wants_layer_calls(gm: nn.Module, model: nn.Module) -> bool:
    """Whether any traced part of `gm` has an F.linear call this pass rewrites (compile adds it only then)."""
    return any(next(_rewritable(part, prefix, model), None) is not None for prefix, part in graph_modules(gm))


def rewrite_layer_calls_(part: fx.GraphModule, prefix: str, model: nn.Module) -> int:
    """Rewrite, in `part`'s graph (the traced module at `prefix` of the caller's `model`), every F.linear of
    an nn.Linear's weight as a call of the layer (see the module docstring). Returns how many calls were
    rewritten."""
    graph = part.graph
    done = 0
    for node, x, weight, bias, extra, path, original in _rewritable(part, prefix, model):
        _layer_in(part, path, original)
        with graph.inserting_before(node):
            out = graph.call_module(path, (x,))
            if extra is not None:
                dtype = graph.call_function(getattr, (out, "dtype"))
                cast = graph.call_method("to", (extra, dtype))
                out = graph.call_function(operator.add, (out, cast))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
        for read in (weight, bias):
            if isinstance(read, fx.Node) and read.op == "get_attr" and not read.users:
                graph.erase_node(read)
    return done


def layer_calls(ctx: CompileContext):
    """Factory of the layer_calls pass (compile runs it first, where Linear layers are factorized and
    wants_layer_calls finds a call to rewrite)."""

    def run(gm):
        total = sum(rewrite_layer_calls_(part, prefix, ctx.model) for prefix, part in graph_modules(gm))
        if total:
            ctx.notes.append(f"layer_calls: {total} F.linear call(s) of a layer's weight written as the layer's "
                             f"call, so the layer can be factorized")
        return PassResult(gm, bool(total))

    run.name = "layer_calls"
    return run
