"""shape_prop: run the example inputs once through the whole model and annotate every part's nodes with shapes
(and count the model's FLOPs in that same forward)."""
from __future__ import annotations

import contextlib
import inspect
import io
import sys
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..context import CompileContext
from ..errors import LRDError
from ..flops import fused_attention_off
from ..pipeline import PassResult, graph_modules, restore_training_flags, training_flags
from ..trace import _FACTORIZABLE, PartFailed, attributes_kept


def _is_fake(x) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(x, FakeTensor)


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
        n.meta["type"] = torch.Tensor if _is_fake(result) else type(result)
        return result

    def placeholder(self, target, args, kwargs):
        name = str(target).lstrip("*")
        if name in self._inputs:
            return self._inputs[name]
        if args:
            return args[0]   # the default recorded at trace time
        raise TypeError(f"no value for input '{name}' of traced part {type(self.module).__name__}")


def _record_once(part: fx.GraphModule, failed: dict, name: str, calls: Optional[dict] = None):
    """A forward for `part` that records shapes on its first call and runs the plain forward after. An
    exception out of the part's graph is tagged with the part's path (`_lrd_traced_part`, the innermost
    part first), so that shape_prop can name the graph that failed. `calls`: where to keep a copy of
    the first call's (args, kwargs, output), for check_parts."""
    plain = type(part).forward.__get__(part)
    state = {"done": False}

    def run(*args, **kwargs):
        if state["done"]:
            return plain(*args, **kwargs)
        state["done"] = True
        kept = _copied((args, kwargs)) if calls is not None else None
        env = _ambient(part) if kept is not None else None
        try:
            out = RecordShapes(part).call(args, kwargs)
        except Exception as e:   # noqa: BLE001 - shapes are annotations: run the part plainly instead
            failed[name] = f"{type(e).__name__}: {e}"
            out = plain(*args, **kwargs)
        if kept is not None:
            calls[name] = (*kept, _copied(out), env)
        return out

    def forward(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except Exception as e:
            if not hasattr(e, "_lrd_traced_part"):
                e._lrd_traced_part = "" if name == "<root>" else name
            raise
    return forward


def _ambient(part: nn.Module) -> dict:
    """What a part's call depends on besides its inputs and its parameters, as it is when the call starts:
    the random number generators' states (a graph that draws torch random numbers, e.g. a VAE's sampling or
    MC dropout, draws the same ones in the eager check), the autocast its eager caller runs it under, and
    the part's buffers (its eager caller may have written them in this forward, a cache reset in place;
    the fresh reference copy would not have them)."""
    env = {"rng": torch.random.get_rng_state(), "cuda_rng": None, "autocast": {},
           "buffers": _copied(dict(part.named_buffers()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        env["cuda_rng"] = torch.cuda.get_rng_state_all()
    for dev in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(dev):
                env["autocast"][dev] = torch.get_autocast_dtype(dev)
        except (RuntimeError, TypeError, AttributeError):  # older torch: no per-device query
            pass
    return env


@contextlib.contextmanager
def _replayed(env: Optional[dict]):
    """Run a block with the random states and autocast of `env` (_ambient), the caller's restored after."""
    if env is None:
        yield
        return
    devices = list(range(len(env["cuda_rng"]))) if env["cuda_rng"] is not None else []
    with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
        torch.random.set_rng_state(env["rng"])
        if env["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(env["cuda_rng"])
        for dev, dtype in env["autocast"].items():
            stack.enter_context(torch.autocast(dev, dtype=dtype))
        yield


def _load_buffers(module: nn.Module, buffers: Optional[dict]) -> None:
    """Copy the buffers a traced part had when its graph ran into the same-named buffers of its reference
    module (the reference is a fresh copy of the caller's model; its buffers are its own)."""
    if not buffers:
        return
    for name, value in buffers.items():
        try:
            mine = module.get_buffer(name)
        except AttributeError:
            continue
        if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and mine.shape == value.shape:
            mine.copy_(value)


def _copied(obj):
    """A copy of a call's inputs or output as they are now (the model may change them in place later),
    or None when it cannot be copied."""
    import copy
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - an object that does not copy: that part is not checked
        return None


def _difference(got, want, where: str = "output") -> Optional[str]:
    """What differs between a traced part's output (`got`) and its module's (`want`), or None: the same
    structure (sequence lengths, dict keys, types), tensor shapes and dtypes, and values within float
    reordering (rtol 1e-3, atol 1e-4 of the largest magnitude)."""
    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
            return f"{where} is a {type(got).__name__}, the module's a {type(want).__name__}"
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"{where} is {got.dtype} {tuple(got.shape)}, the module's {want.dtype} "
                    f"{tuple(want.shape)}")
        if want.is_floating_point() or want.is_complex():
            scale = float(want.detach().abs().nan_to_num().max()) if want.numel() else 0.0
            ok = torch.allclose(got.detach(), want.detach(), rtol=1e-3, atol=1e-4 * scale + 1e-12,
                                equal_nan=True)
        else:
            ok = torch.equal(got, want)
        return None if ok else f"{where} has other values than the module's"
    if isinstance(want, dict) and isinstance(got, dict):
        if list(got) != list(want):
            return f"{where} has keys {list(got)[:6]}, the module's {list(want)[:6]}"
        for k in want:
            why = _difference(got[k], want[k], f"{where}[{k!r}]")
            if why:
                return why
        return None
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(got) != len(want):
            return f"{where} has {len(got)} items, the module's {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            why = _difference(g, w, f"{where}[{i}]")
            if why:
                return why
        return None
    if type(got) is not type(want):
        return f"{where} is a {type(got).__name__}, the module's a {type(want).__name__}"
    if isinstance(want, (int, float, bool, str)) and got != want:
        return f"{where} is {got!r}, the module's {want!r}"
    return None


DIFFERS = "its traced graph computes something else than the module on the example inputs"


def check_parts(calls: dict, reference: nn.Module) -> Optional[tuple]:
    """(part, why) for the first traced part whose recorded call gives another output than the same module
    of `reference` (an eager copy of the caller's model) on the same inputs, eval mode, no grad; None when
    all agree. A graph can trace without error and still compute something else: timm's FeatureHookNet
    reads what forward hooks collected, and its traced graph returned an empty list."""
    from ..pipeline import eval_mode
    for name, (args, kwargs, got, env) in calls.items():
        if args is None or kwargs is None or got is None:
            continue
        module = reference if name == "<root>" else reference.get_submodule(name)
        try:
            with torch.no_grad():
                _load_buffers(module, (env or {}).get("buffers"))
            with torch.no_grad(), eval_mode(module), _replayed(env):
                want = module(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the module itself fails on these inputs: nothing to compare
            continue
        why = _difference(got, want)
        if why is not None:
            return name, why
    return None


# shape_prop runs models holding at least this many bytes of parameters and buffers on fake tensors
# (torch's FakeTensorMode: shapes and dtypes, no arithmetic, no activation memory). Fake tensors cost
# a fixed ~0.3-1 ms per op, more than a small model's real forward (ResNet-18 at 8 px: 25 ms real,
# 100 ms fake; DenseNet-121 at 224 px: 0.22 s against 0.16-1.1 s), far less than a big one's
# (ViT-H/14 at 224 px: about 4 s real on 2 cores).
FAKE_MIN_BYTES = 1 << 28


def fake_pays(root: nn.Module) -> bool:
    """True when root's forward is worth running on fake tensors (FAKE_MIN_BYTES of weights)."""
    total = 0
    for t in list(root.parameters()) + list(root.buffers()):
        total += t.numel() * t.element_size()
    return total >= FAKE_MIN_BYTES


def capture_shapes(root: nn.Module, args: tuple, kwargs: dict, *, fake: bool = False,
                   counter=None, calls: Optional[dict] = None) -> tuple[dict, dict]:
    """Run root once on (args, kwargs), eval mode, no grad. Every traced part records its nodes'
    tensor_meta on its first call; every Conv/Linear records its input/output shapes and call count.
    The attributes forward assigns are restored after (attributes_kept). fake: on fake tensors. counter:
    a TorchDispatchMode (torch's FLOP counter) entered for the forward, inside the fake mode.

    calls: receives {part: (args, kwargs, output)} of the first call of every outermost traced part (no
    traced part above it), for check_parts.

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
    prefixes = [prefix for prefix, _ in graph_modules(root)]
    for prefix, part in graph_modules(root):
        outermost = not any(other != prefix and prefix.startswith(other) for other in prefixes)
        # an instance attribute shadows the class's generated forward for this one run
        part.forward = _record_once(part, failed, prefix[:-1] or "<root>",
                                    calls if (outermost and calls is not None) else None)
        patched.append(part)
    modes = training_flags(root)
    root.eval()   # shapes only: keep BatchNorm statistics of the copy untouched
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(attributes_kept(root))   # what forward assigns (no fake tensor) does not stay
            if fake:
                from torch._subclasses.fake_tensor import FakeTensorMode
                stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            if counter is not None:
                stack.enter_context(fused_attention_off())   # the counter has no formula for those kernels
                stack.enter_context(counter)
            root(*args, **kwargs)
    finally:
        restore_training_flags(modes)
        for h in handles:
            h.remove()
        for part in patched:
            part.__dict__.pop("forward", None)
    return layers, failed


def capture_counting(root: nn.Module, args: tuple, kwargs: dict,
                     calls: Optional[dict] = None) -> tuple[dict, dict, Optional[int], Optional[str]]:
    """capture_shapes under torch's FLOP counter, so that one forward gives both: (layers, failed, FLOPs,
    None), or (layers, failed, None, what went wrong) when the counter fails on a model that runs without
    it (the run is then repeated without it; a failure of that one is the model's and is raised)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        fc = FlopCounterMode(display=False)
        layers, failed = capture_shapes(root, args, kwargs, counter=fc, calls=calls)
        return layers, failed, int(fc.get_total_flops()), None
    except Exception as e:  # noqa: BLE001 - the counter's failure or the model's: a plain run tells
        counter_error = f"{type(e).__name__}: {str(e)[:200]}"
    if calls is not None:
        calls.clear()
    layers, failed = capture_shapes(root, args, kwargs, calls=calls)
    return layers, failed, None, counter_error


def capture_fake(root: nn.Module, args: tuple, kwargs: dict, count: bool):
    """capture_shapes (under the FLOP counter when `count`) on fake tensors: (layers, failed[, FLOPs, None]),
    or a string saying why not when the fake forward fails anywhere (data-dependent Python, an op without a
    fake kernel, a traced part that fails to record): the caller then runs the model for real, which says
    what is wrong, if anything."""
    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False) if count else None
    try:
        layers, failed = capture_shapes(root, args, kwargs, fake=True, counter=fc)
    except Exception as e:  # noqa: BLE001 - any failure on fake tensors: the real forward decides
        return f"{type(e).__name__}: {e}"
    if failed:
        part, why = next(iter(failed.items()))
        return f"traced part '{part}': {why}"
    return (layers, failed, int(fc.get_total_flops()), None) if count else (layers, failed)


@contextlib.contextmanager
def _stderr_kept_unless_failing():
    """Hold what is written to sys.stderr and write it out after, unless the block raises out of a traced
    part's graph: a GraphModule whose code fails prints its generated code and the whole traceback to
    stderr (torch.fx's _WrappedCall), which would show on a compile that then succeeds (compile keeps
    that part eager and traces again) or that raises an error of its own."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except Exception as e:
        if getattr(e, "_lrd_traced_part", None) is None:
            sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())


def _raise_if_a_part_differs(calls: dict, ctx: CompileContext) -> None:
    """check_parts against ctx.reference(): a part whose graph computes something else is kept eager (the
    model traced again: PartFailed), or a TraceError where compile cannot trace again."""
    from ..errors import TraceError
    found = check_parts(calls, ctx.reference())
    calls.clear()
    if found is None:
        return
    part, why = found
    reason = f"{DIFFERS}: {why}"
    if ctx.retrace:
        raise PartFailed("" if part == "<root>" else part, reason)
    raise TraceError(f"traced part '{part}': {reason}. Mark that module a leaf (leaf_modules=[...]) so it "
                     f"is not traced")


NEEDS_GIVEN = "its traced graph took the branch of an optional input given in example_inputs"


def _left_out(model: nn.Module, args: tuple) -> list:
    """(what, args without it) for each thing the model may be called without: a parameter of
    model.forward that defaults to None and that `args` (the example inputs, in forward's positional
    order) give a value (passed as None), and a key of a dict input (left out of the dict)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out = [(repr(p.name), args[:i] + (None,) + args[i + 1:]) for i, p in enumerate(positional[:len(args)])
           if p.default is None and args[i] is not None]
    for i, a in enumerate(args):
        if type(a) is dict and len(a) > 1:
            out += [(f"key {k!r} of input {i}", args[:i] + ({j: v for j, v in a.items() if j != k},) + args[i + 1:])
                    for k in a]
    return out


def _raise_if_root_needs_given_inputs(root: fx.GraphModule, ctx: CompileContext) -> None:
    """A root traced whole took the branch of every optional input the example inputs give (`if mask is not
    None:`, `if batch.get("mask") is not None:`). Called without one, as the model allows, its graph failed inside its
    own code (HF DeBERTa compiled with an attention mask: "'NoneType' object has no attribute 'dim'"; a
    dict input without a key: KeyError), or could compute something else. Each such input is tried once
    left out (None, or the dict without that key) on the graph and on the eager model; where the model
    runs and the graph fails or differs, the root is kept eager (PartFailed), so the compiled model takes
    both calls."""
    from ..pipeline import eval_mode
    given = _left_out(ctx.model, ctx.example_inputs)
    if not given:
        return
    reference = ctx.reference()
    for name, without in given:
        try:
            with torch.no_grad(), eval_mode(reference):
                want = reference(*without, **ctx.example_kwargs)
        except Exception:  # noqa: BLE001 - the model itself needs it: the graph may too
            continue
        held = io.StringIO()    # torch.fx prints a failing graph's code and traceback to stderr
        try:
            with torch.no_grad(), eval_mode(root), contextlib.redirect_stderr(held):
                got = root(*without, **ctx.example_kwargs)
        except Exception as e:  # noqa: BLE001 - the reason the root stays eager (report), not printed
            why = f"fails: {type(e).__name__}: {str(e)[:160]}"
        else:
            sys.stderr.write(held.getvalue())
            why = _difference(got, want)
            why = None if why is None else f"computes something else: {why}"
        if why is not None:
            raise PartFailed("", f"{NEEDS_GIVEN} ({name}): called without it, as the model allows, that graph {why}")


def shape_prop(ctx: CompileContext):
    def run(root):
        if ctx.example_inputs is None:
            return PassResult(root, False)
        args, kwargs = ctx.example_inputs, ctx.example_kwargs
        calls: Optional[dict] = None
        try:
            with _stderr_kept_unless_failing():
                got = capture_fake(root, args, kwargs, ctx.count_flops) if fake_pays(root) else None
                if isinstance(got, str):
                    ctx.notes.append(f"shape_prop: the forward on fake tensors failed ({got[:160]}); ran the real one")
                    got = None
                if got is None:
                    calls = {} if ctx.reference is not None else None
                    got = (capture_counting(root, args, kwargs, calls) if ctx.count_flops
                           else capture_shapes(root, args, kwargs, calls=calls))
            layers, failed = got[:2]
            if ctx.count_flops:
                ctx.flops_counted = tuple(got[2:])
        except Exception as e:
            if ctx.input_check is not None:
                try:
                    ctx.input_check()     # the eager model on the inputs: an InputError when it fails there too
                except LRDError as err:
                    err._lrd_pass_named = True  # about the inputs, not this pass: no pass prefix
                    raise
            part = getattr(e, "_lrd_traced_part", None)
            if part is not None and ctx.retrace and not isinstance(e, LRDError):
                # the eager model runs (or was not checked): the graph traced for that part is wrong for these
                # inputs (e.g. an argument traced as given that is None here); compile/load keep it eager
                raise PartFailed(part, f"{type(e).__name__}: {str(e)[:200]}") from e
            raise                         # it runs eagerly: the traced model does not
        if calls:
            _raise_if_a_part_differs(calls, ctx)
        if ctx.retrace and ctx.reference is not None and isinstance(root, fx.GraphModule):
            _raise_if_root_needs_given_inputs(root, ctx)
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
