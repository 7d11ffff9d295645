"""shape_prop: run the example inputs once through the whole model and annotate every part's nodes with shapes
(and count the model's FLOPs in that same forward)."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..context import CompileContext
from ..errors import LRDError
from ..pipeline import PassResult, graph_modules
from ..trace import _FACTORIZABLE


def _shape(x):
    return list(x.shape) if isinstance(x, torch.Tensor) else None


class RecordShapes(fx.Interpreter):
    """Runs one call of a traced part node by node, storing node.meta["tensor_meta"] as fx's ShapeProp
    does, but taking the call's keyword arguments too (parts of a model that stays eager, e.g. a Hugging
    Face encoder layer, are called with kwargs; ShapeProp binds positional inputs only)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self._inputs: dict[str, Any] = {}
        self._node = None

    def call(self, args: tuple, kwargs: dict):
        # Bind exactly as Python binds the generated forward (fx reorders keyword-only parameters).
        # (the class's forward: the instance's is patched while shapes are recorded)
        sig = inspect.signature(type(self.module).forward)
        bound = sig.bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        self._inputs = dict(bound.arguments)
        try:
            return self.run(enable_io_processing=False)
        finally:
            self._inputs = {}

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        result = super().run_node(n)
        found = False

        def meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        m = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = m
        n.meta["type"] = type(result)
        return result

    def placeholder(self, target, args, kwargs):
        name = str(target).lstrip("*")
        if name in self._inputs:
            return self._inputs[name]
        if args:
            return args[0]   # the default recorded at trace time
        raise TypeError(f"no value for input '{name}' of traced part {type(self.module).__name__}")


def _record_once(part: fx.GraphModule, failed: dict, name: str):
    """A forward for `part` that records shapes on its first call and runs the plain forward after."""
    plain = type(part).forward.__get__(part)
    state = {"done": False}

    def forward(*args, **kwargs):
        if state["done"]:
            return plain(*args, **kwargs)
        state["done"] = True
        try:
            return RecordShapes(part).call(args, kwargs)
        except Exception as e:   # noqa: BLE001 - shapes are annotations: run the part plainly instead
            failed[name] = f"{type(e).__name__}: {e}"
            return plain(*args, **kwargs)
    return forward


def capture_shapes(root: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Run root once on (args, kwargs), eval mode, no grad. Every traced part records its nodes'
    tensor_meta on its first call; every Conv/Linear records its input/output shapes and call count.

    Returns ({layer name: {in, out, calls}}, {part name: why its shapes were not recorded}).
    """
    layers: dict[str, dict] = {}
    failed: dict[str, str] = {}
    handles = []
    patched = []
    for name, m in root.named_modules():
        if isinstance(m, _FACTORIZABLE):
            def hook(mod, inp, out, name=name):
                rec = layers.setdefault(name, {"in": _shape(inp[0]) if inp else None,
                                               "out": _shape(out), "calls": 0})
                rec["calls"] += 1
            handles.append(m.register_forward_hook(hook))
    for prefix, part in graph_modules(root):
        # an instance attribute shadows the class's generated forward for this one run
        part.forward = _record_once(part, failed, prefix[:-1] or "<root>")
        patched.append(part)
    modes = {m: m.training for m in root.modules()}
    root.eval()   # shapes only: keep BatchNorm statistics of the copy untouched
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
        for part in patched:
            part.__dict__.pop("forward", None)
    return layers, failed


def capture_counting(root: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict, Optional[int], Optional[str]]:
    """capture_shapes under torch's FLOP counter, so that one forward gives both: (layers, failed, FLOPs,
    None), or (layers, failed, None, what went wrong) when the counter fails on a model that runs without
    it (the run is then repeated without it; a failure of that one is the model's and is raised)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc:
            layers, failed = capture_shapes(root, args, kwargs)
        return layers, failed, int(fc.get_total_flops()), None
    except Exception as e:  # noqa: BLE001 - the counter's failure or the model's: a plain run tells
        counter_error = f"{type(e).__name__}: {str(e)[:200]}"
    layers, failed = capture_shapes(root, args, kwargs)
    return layers, failed, None, counter_error


def shape_prop(ctx: CompileContext):
    def run(root):
        if ctx.example_inputs is None:
            return PassResult(root, False)
        try:
            if ctx.count_flops:
                layers, failed, *counted = capture_counting(root, ctx.example_inputs, ctx.example_kwargs)
                ctx.flops_counted = tuple(counted)
            else:
                layers, failed = capture_shapes(root, ctx.example_inputs, ctx.example_kwargs)
        except Exception:
            if ctx.input_check is not None:
                try:
                    ctx.input_check()     # the model itself on the inputs: an InputError when it fails there too
                except LRDError as e:
                    e._lrd_pass_named = True  # about the inputs, not this pass: no pass prefix
                    raise
            raise                         # it runs eagerly: the traced model does not
        ctx.layer_io = layers
        for part_name, why in failed.items():
            ctx.notes.append(f"shape_prop: shapes of traced part '{part_name}' not recorded ({why[:120]})")
        for prefix, part in graph_modules(root):
            for node in part.graph.nodes:
                if node.op == "call_module" and (prefix + node.target) in layers:
                    node.meta["lrd_io"] = layers[prefix + node.target]
        return PassResult(root, False)
    run.name = "shape_prop"
    return run
