"""Tracer with a leaf-module registry, and tracing with a per-child fallback."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import operator
import os
import re
import sys
import threading
import traceback
import types
import typing
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError, TraceError, warn
from .factorize.modules import HFConv1D
from .pipeline import graph_modules, restore_training_flags, training_flags
from .registry import Registry

_FX_DIR = os.path.dirname(fx.__file__)
_TORCH_DIR = os.path.dirname(torch.__file__)
_STDLIB_DIR = os.path.dirname(os.__file__)


def _qualified(obj) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    name = f"{getattr(obj, '__module__', None) or ''}.{name}"
    # lambdas and classes made inside functions share a qualname: each object is its own entry
    return f"{name}@{id(obj):x}" if "<" in name or "." not in name.lstrip(".") else name


# Module classes always kept as leaves (besides torch.nn's own); register_leaf_module adds to it.
LEAF_MODULES: Registry[type] = Registry("leaf module", key=_qualified,
                                        hint="register one with @lrd_fx.register_leaf_module")
# Functions never traced into (kept as one call_function node).
LEAF_FUNCTIONS: Registry[Callable] = Registry("leaf function", key=_qualified,
                                              hint="register one with @lrd_fx.register_leaf_function")

# Layers the decompose pass rewrites must stay call_module nodes, even subclasses outside torch.nn.
_FACTORIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, HFConv1D)   # HFConv1D: transformers' GPT-2 Conv1D


def register_leaf_module(cls: type) -> type:
    """Keep every instance of `cls` as a single call_module node (usable as a decorator)."""
    return LEAF_MODULES.register(cls)


def register_leaf_function(fn: Callable) -> Callable:
    """Keep calls of `fn` as a single call_function node (usable as a decorator)."""
    return LEAF_FUNCTIONS.register(fn)


def _timm_leaves() -> tuple[set, set]:
    try:
        import timm.models  # noqa: F401  (importing registers timm's no-trace modules)
        from timm.layers import _fx as timm_fx
    except Exception:  # timm absent or changed: nothing to add
        return set(), set()
    mods = set(timm_fx.get_notrace_modules())
    fns = {f for f in timm_fx.get_notrace_functions() if callable(f)}
    return mods, fns


def _notrace_reason(m: nn.Module, leaf_classes: tuple = ()) -> Optional[str]:
    """Why `m`'s own forward is not traced (timm registers its class as not traceable: MobileViT, TinyViT and
    NFNet blocks, VGG's ConvMlp, ...; some of these trace into a wrong graph), or None. Such a module is kept
    whole in its parent's graph, runs its own forward eagerly, and its children are traced apart, so its
    layers are factorized like those of any eager part. A class the caller names as a leaf (leaf_modules=,
    register_leaf_module) stays whole, layers included."""
    timm_mods, _ = _timm_leaves()
    if not timm_mods or not isinstance(m, tuple(timm_mods)) or isinstance(m, _FACTORIZABLE):
        return None
    user = tuple(leaf_classes) + tuple(LEAF_MODULES.values())
    if (user and isinstance(m, user)) or not _has_factorizable(m):
        return None
    return (f"timm registers {type(m).__name__} as not traceable (register_notrace_module): its forward runs "
            f"eagerly, its children are traced apart")


class LRDTracer(fx.Tracer):
    """fx.Tracer that keeps registered leaves and remembers which module a failure came from."""

    def __init__(self, leaf_modules: Iterable = (), leaf_names: Iterable[str] = ()):
        timm_mods, timm_fns = _timm_leaves()
        super().__init__(autowrap_functions=tuple(set(LEAF_FUNCTIONS.values()) | timm_fns))
        self.leaf_classes = tuple(set(leaf_modules) | set(LEAF_MODULES.values()) | timm_mods)
        self.leaf_names = set(leaf_names)
        self._stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names:
            return True
        if self.leaf_classes and isinstance(m, self.leaf_classes):
            return True
        if isinstance(m, _FACTORIZABLE) or call_reason(m) is not None or _eager_by_design(m):
            return True     # hooked modules: called as modules, so their hooks run (trace() opens them)
        return super().is_leaf_module(m, qualname)

    def create_arg(self, a):
        # transformers' ModelOutput is a dict subclass and a dataclass: fx's dict branch would make it a plain
        # dict, and code reading its attributes (out.last_hidden_state in an eager parent) would fail. Build
        # the class in the graph, as fx does for other dataclasses; an OrderedDict (torchvision's
        # segmentation models) stays one too.
        if isinstance(a, dict) and type(a) is not dict:
            if dataclasses.is_dataclass(a):
                kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a) if f.init}
                return self.create_node("call_function", type(a), (), kwargs)
            if type(a) is collections.OrderedDict:
                return self.create_node("call_function", collections.OrderedDict,
                                        (self.create_arg([tuple(kv) for kv in a.items()]),), {})
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self._stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # the innermost traced-through module tags the error first
            if not hasattr(e, "_lrd_module_path"):
                e._lrd_module_path = qualname
            raise
        finally:
            self._stack.pop()


def _user_line(exc: BaseException) -> str:
    """The last frame of the traceback outside torch, lrd_fx and Python's own library (random.uniform's
    frame): the user's line that broke tracing."""
    where = getattr(exc, "_lrd_user_line", None)      # set where the failure is found after the user's code ran
    if where:
        return where
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        stdlib = fr.filename.startswith(_STDLIB_DIR) and "-packages" not in fr.filename
        if not fr.filename.startswith(_TORCH_DIR) and "lrd_fx" not in fr.filename and not stdlib:
            return f'{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}'
    if frames:
        fr = frames[-1]
        return f'{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}'
    return "<unknown line>"


@contextlib.contextmanager
def attributes_kept(root: nn.Module, changed: Optional[list] = None):
    """Every module's attributes, parameters, buffers and submodules as they were, afterwards. A forward
    on proxies (tracing) or fake tensors (shape_prop) runs the model's Python, which may store what it
    computes (a cache, a recorded activation, a reassigned buffer): no Proxy or fake tensor stays behind.
    `changed` receives (module path, [attribute names]) for each module whose attributes were assigned."""
    saved = [(name, m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for name, m in root.named_modules()]
    try:
        yield
    finally:
        for name, m, attrs, params, buffers, subs in saved:
            keys: set = set()
            for store, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, subs)):
                diff = _assigned(store, old)
                if diff:
                    keys |= diff
                    store.clear()
                    store.update(old)
            diff = _assigned(m.__dict__, attrs)
            if diff:
                keys |= diff
                m.__dict__.clear()
                m.__dict__.update(attrs)
            if keys and changed is not None:
                changed.append((name, sorted(keys)))


def _assigned(now: dict, before: dict) -> set:
    """Keys added, removed or bound to another object since `before`."""
    return (now.keys() ^ before.keys()) | {k for k, v in before.items() if k in now and now[k] is not v}


class CheckpointInTrace(TraceError):
    """A forward called torch.utils.checkpoint while being traced: the graph would run the checkpointed
    code inline and drop the checkpoint (the memory it saves in training), so that module stays eager."""


class RandomInTrace(TraceError):
    """A forward drew Python or NumPy random numbers while being traced: the graph would keep the numbers
    drawn then (a LayerDrop decision fixed for good), so that module stays eager."""


# What every torch.utils.checkpoint.checkpoint call goes through, whichever name the caller bound it to
# (torch 2.11: CheckpointFunction / _checkpoint_without_reentrant_generator; later: _checkpoint_impl).
_CHECKPOINT_ENTRIES = ("_checkpoint_impl", "CheckpointFunction", "_checkpoint_without_reentrant_generator")
# Python's random: every Random method draws through these two (the module's own random.random and
# random.getrandbits are bound to a hidden instance, and are refused as module attributes).
_PY_RANDOM_ENTRIES = ("random", "getrandbits")
_NUMPY_RANDOM_ENTRIES = ("random", "random_sample", "rand", "randn", "randint", "uniform", "normal",
                         "standard_normal", "choice", "permutation", "shuffle", "binomial", "beta",
                         "default_rng")   # a generator made inside forward (its draws cannot be patched)
_CHECKPOINT_WHY = ("calls torch.utils.checkpoint (gradient checkpointing), which a traced graph would drop: "
                   "kept eager so it still checkpoints")
_RANDOM_WHY = ("draws Python or NumPy random numbers (random.uniform, np.random.random), which a traced graph "
               "would fix at the numbers drawn while tracing: kept eager so it draws them on every call")
_refusing = threading.local()
_patch_lock = threading.Lock()
_patched: list = []      # (owner, attribute, original, owner had it in its own __dict__), while any thread traces
_patch_users = [0]


def _refused_entries() -> list:
    """(owner, attribute, exception class, message) of what a forward may not call while being traced."""
    import random

    import torch.utils.checkpoint as ckpt
    out = [(ckpt, n, CheckpointInTrace, _CHECKPOINT_WHY) for n in _CHECKPOINT_ENTRIES if hasattr(ckpt, n)]
    out += [(random.Random, n, RandomInTrace, _RANDOM_WHY) for n in _PY_RANDOM_ENTRIES]
    # random.random() itself is the hidden instance's bound builtin method, which the class entry misses
    out += [(random, n, RandomInTrace, _RANDOM_WHY) for n in ("random", "getrandbits")]
    np = sys.modules.get("numpy")
    if np is not None:
        out += [(np.random, n, RandomInTrace, _RANDOM_WHY) for n in _NUMPY_RANDOM_ENTRIES
                if hasattr(np.random, n)]
    return out


def _refuse_in_trace(orig, exc: type, why: str):
    """`orig` that raises exc(why) while this thread traces and is itself otherwise."""
    def refuse():
        raise exc(why)

    if isinstance(orig, type):       # CheckpointFunction: called as CheckpointFunction.apply(...)
        class Refused:
            @staticmethod
            def apply(*args, **kwargs):
                if getattr(_refusing, "on", False):
                    refuse()
                return orig.apply(*args, **kwargs)
        return Refused

    def stub(*args, **kwargs):
        if getattr(_refusing, "on", False):
            refuse()
        return orig(*args, **kwargs)
    return stub


@contextlib.contextmanager
def refused_while_tracing():
    """While tracing (in this thread only), a call of torch.utils.checkpoint raises CheckpointInTrace and a
    draw of Python or NumPy random numbers raises RandomInTrace: a graph would drop the one and freeze the
    other, so the module that calls them stays eager (trace's fallback)."""
    if getattr(_refusing, "on", False):
        yield
        return
    with _patch_lock:
        if not _patch_users[0]:
            for owner, name, exc, why in _refused_entries():
                orig = getattr(owner, name)
                _patched.append((owner, name, orig, name in vars(owner)))
                setattr(owner, name, _refuse_in_trace(orig, exc, why))
        _patch_users[0] += 1
    _refusing.on = True
    try:
        yield
    finally:
        _refusing.on = False
        with _patch_lock:
            _patch_users[0] -= 1
            if not _patch_users[0]:
                for owner, name, orig, own in reversed(_patched):
                    if own:
                        setattr(owner, name, orig)
                    else:
                        delattr(owner, name)     # it was inherited (random.Random.random)
                _patched.clear()


def _rng_fingerprint(state):
    """A comparable form of a NumPy generator's state (nested dicts, tuples, ints and arrays)."""
    if isinstance(state, dict):
        return tuple((k, _rng_fingerprint(v)) for k, v in sorted(state.items()))
    if isinstance(state, (list, tuple)):
        return tuple(_rng_fingerprint(v) for v in state)
    if hasattr(state, "tobytes") and hasattr(state, "dtype"):
        return (str(state.dtype), tuple(getattr(state, "shape", ())), state.tobytes())
    return state


def _rng_get(obj):
    import numpy as np
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    if isinstance(obj, np.random.RandomState):
        return obj.get_state(legacy=False)
    return obj.state                      # a BitGenerator


def _rng_set(obj, state) -> None:
    import numpy as np
    if isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state
    elif isinstance(obj, np.random.RandomState):
        obj.set_state(state)
    else:
        obj.state = state


def numpy_generators(module: nn.Module) -> list:
    """(module path, how it is reached, generator) for every NumPy random generator a forward may draw from
    through an object (np.random.Generator, RandomState, BitGenerator), which refused_while_tracing cannot
    patch: those held as module attributes (self.rng) and the globals a module's forward names (_RNG)."""
    np = sys.modules.get("numpy")
    if np is None:
        return []
    kinds = (np.random.Generator, np.random.RandomState, np.random.BitGenerator)
    out, seen = [], set()
    for path, m in module.named_modules():
        found = [(f"self.{k}", v) for k, v in vars(m).items() if isinstance(v, kinds)]
        fn = getattr(type(m), "forward", None)
        code, glob = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
        if code is not None and glob is not None:
            found += [(f"global {n}", glob[n]) for n in code.co_names if isinstance(glob.get(n), kinds)]
        for how, gen in found:
            if id(gen) not in seen:
                seen.add(id(gen))
                out.append((path, how, gen))
    return out


@contextlib.contextmanager
def numpy_draws_watched(module: nn.Module, drew: list):
    """Record in `drew` (module path, how it is reached) for each NumPy generator (numpy_generators) that
    was drawn from inside the block, and put every generator's state back as it was: a traced graph
    would keep the numbers drawn while tracing, and tracing must not use up the caller's numbers."""
    gens = [(path, how, gen, _rng_get(gen)) for path, how, gen in numpy_generators(module)]
    try:
        yield
    finally:
        for path, how, gen, state in gens:
            if _rng_fingerprint(_rng_get(gen)) != _rng_fingerprint(state):
                drew.append((path, how))
                _rng_set(gen, state)


def traced_as_none(value: Optional[Any], name: str) -> None:
    """In a graph traced with input `name` fixed to None: stop a call that gives it."""
    if value is not None:
        raise InputError(
            f"input '{name}' was traced as None (it was None or left out in example_inputs), so the compiled "
            f"graph has only its None branch and cannot take a value for it: give it in example_inputs to "
            f"lrd_fx.compile (a part whose Python code branches on it then stays eager)")


def _fixed_value_message(name: str, expected: str) -> str:
    return (f"input '{name}' was traced at its default {expected} (it was left out of example_inputs, and the "
            f"model's Python code branches on it), so the compiled graph has only that branch and cannot take "
            f"another value: give the value in example_inputs to lrd_fx.compile (the part whose code branches on "
            f"it then stays eager and takes any value)")


# One check per type of default, typed so that torch.jit.script compiles the graph that calls it
def traced_as_bool(value: bool, name: str, expected: bool) -> None:
    """In a graph traced with input `name` fixed at its default `expected`: stop a call that gives another."""
    if torch.jit.is_tracing():
        return        # torch.jit.trace (the legacy ONNX exporter) hands the default in as a tensor
    if value != expected:
        raise InputError(_fixed_value_message(name, str(expected)))


def traced_as_int(value: int, name: str, expected: int) -> None:
    """In a graph traced with input `name` fixed at its default `expected`: stop a call that gives another."""
    if torch.jit.is_tracing():
        return        # torch.jit.trace (the legacy ONNX exporter) hands the default in as a tensor
    if value != expected:
        raise InputError(_fixed_value_message(name, str(expected)))


def traced_as_float(value: float, name: str, expected: float) -> None:
    """In a graph traced with input `name` fixed at its default `expected`: stop a call that gives another."""
    if torch.jit.is_tracing():
        return        # torch.jit.trace (the legacy ONNX exporter) hands the default in as a tensor
    if value != expected:
        raise InputError(_fixed_value_message(name, str(expected)))


def traced_as_str(value: str, name: str, expected: str) -> None:
    """In a graph traced with input `name` fixed at its default `expected`: stop a call that gives another."""
    if torch.jit.is_tracing():
        return        # torch.jit.trace (the legacy ONNX exporter) hands the default in as a tensor
    if value != expected:
        raise InputError(_fixed_value_message(name, "'" + expected + "'"))


_VALUE_CHECKS = {bool: traced_as_bool, int: traced_as_int, float: traced_as_float, str: traced_as_str}
FIXABLE_DEFAULTS = tuple(_VALUE_CHECKS)     # types of a forward default that tracing can fix (api._left_out)

for _check in (traced_as_none, *_VALUE_CHECKS.values()):
    if hasattr(fx.node, "has_side_effect"):     # a graph pass's eliminate_dead_code keeps the check (no users)
        fx.node.has_side_effect(_check)
    # fx rebuilds a pickled graph by tracing its code with the graph's tracer class: the check stays a node
    # (run on a Proxy, it raised, and the model could not be unpickled)
    register_leaf_function(_check)


def traced_defaults(gm: nn.Module) -> dict:
    """{input: value} of the root inputs a graph was traced with fixed at their defaults (trace's
    `defaults`), read from its checks; {} for a module that is not a graph."""
    if not isinstance(gm, fx.GraphModule):
        return {}
    checks = set(_VALUE_CHECKS.values())
    return {n.args[1]: n.args[2] for n in gm.graph.nodes if n.op == "call_function" and n.target in checks}


def _forward_annotations(module: nn.Module) -> dict:
    forward = inspect.unwrap(type(module).forward)
    try:
        params = inspect.signature(forward, eval_str=True).parameters
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: treated as none
        return {}
    return {k: p.annotation for k, p in params.items() if p.annotation is not inspect.Parameter.empty}


def _optional_type(annotation):
    """Optional[X] for a parameter annotated X, X | None or Optional[X] with X a tensor or a Python
    scalar type (Optional[Tensor] when unannotated): TorchScript then sees that None is allowed."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    args = [a for a in args if a is not type(None)]
    if len(args) == 1 and args[0] in (bool, int, float, str, torch.Tensor):
        return Optional[args[0]]
    return Optional[torch.Tensor]


def _name_fixed_inputs(graph: fx.Graph, fixed: Optional[dict], module: nn.Module) -> None:
    """fx names the placeholder of a parameter fixed by concrete_args `{name}_1`, so the graph's forward
    no longer takes it by its name. A keyword call then raised TypeError, or, where forward has **kwargs,
    was swallowed by them and silently ignored (a Hugging Face ResNetModel called with
    output_hidden_states=True returned no hidden states). The placeholders get their names back, and fx's
    checks become traced_as_none (None) or traced_as_<type> (a default), which say what to do."""
    if not fixed:
        return
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    taken = {n.target for n in holders}
    hints = _forward_annotations(module)
    for n in holders:
        for name, value in fixed.items():
            if n.target == name or (n.target == f"{name}_1" and name not in taken):
                n.target = name
                if value is None:
                    n.type = _optional_type(hints.get(name))   # torch.jit.script: None, or a value stopped here
                    for user in list(n.users):
                        if user.op == "call_function" and user.target is fx._symbolic_trace._assert_is_none:
                            user.target, user.args = traced_as_none, (n, name)
                else:
                    n.type = type(value)
                    _check_value(graph, n, name, value)
    graph.lint()


def _check_value(graph: fx.Graph, holder: fx.Node, name: str, value) -> None:
    """fx checks an input fixed at a value with `torch._assert(x == value, msg)`, an AssertionError that
    names no way out: the check becomes traced_as_<type>, an InputError that does."""
    check = _VALUE_CHECKS[type(value)]
    for eq in list(holder.users):
        if not (eq.op == "call_function" and eq.target is operator.eq and eq.args == (holder, value)):
            continue
        for user in list(eq.users):
            if user.op == "call_function" and user.target is torch._assert:
                user.target, user.args, user.kwargs = check, (holder, name, value), {}
        if not eq.users:
            graph.erase_node(eq)


def _trace_once(module: nn.Module, leaf_modules, leaf_names, concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """One trace of `module`. fx reads buffers as values, so what forward computes from them alone
    (`self.scale.float()`, `self.inv_freq[None, :, None]`) would be kept as a constant of the graph
    (`_tensor_constant0`), the buffer dropped from the compiled model and later changes to it
    (load_state_dict, a cache written in place) ignored. Where the graph holds such constants and the
    module has buffers, it is traced again with its buffers as graph reads (proxy_buffer_attributes), so
    those values are computed on every call. Where that second trace fails (Python logic on a buffer's
    value: `if self.count > 0:`, `.item()`, a shape taken as an int), the first graph is kept. A module
    whose first trace fails is traced once only."""
    gm = _trace_once_with(module, leaf_modules, leaf_names, concrete_args, proxy_buffers=False)
    if not _holds_constants(gm) or not any(True for _ in module.buffers()):
        return gm
    try:
        return _trace_once_with(module, leaf_modules, leaf_names, concrete_args, proxy_buffers=True)
    except Exception:  # noqa: BLE001 - the buffers' values steer Python code: keep the first graph
        return gm


def _holds_constants(gm: fx.GraphModule) -> bool:
    return any(n.op == "get_attr" and str(n.target).startswith("_tensor_constant") for n in gm.graph.nodes)


def _rename_self_nodes(graph: fx.Graph) -> None:
    """torch.fx names a node after the module it calls, and does not reserve `self`: a leaf child named `self`
    (Hugging Face SwinV2's and CLAP's `attention.self`, kept eager when it does not trace) gave a node `self`,
    whose assignment in the generated forward shadowed the GraphModule, and the next module call failed
    ("'tuple' object has no attribute '_modules'")."""
    for node in graph.nodes:
        if node.name == "self":
            node._rename("self_out")


def _trace_once_with(module: nn.Module, leaf_modules, leaf_names, concrete_args: Optional[dict],
                     proxy_buffers: bool) -> fx.GraphModule:
    tracer = LRDTracer(leaf_modules, leaf_names)
    tracer.proxy_buffer_attributes = proxy_buffers
    changed: list = []
    # grad enabled: code that checkpoints only when gradients are on (transformers' checkpointing layers)
    # must show it even when compile runs under torch.no_grad()
    drew: list = []
    with attributes_kept(module, changed), refused_while_tracing(), torch.enable_grad(), \
            numpy_draws_watched(module, drew):
        graph = tracer.trace(module, concrete_args=concrete_args or None)
        _name_fixed_inputs(graph, concrete_args, module)
        _rename_self_nodes(graph)
        name = module.__class__.__name__
        gm = fx.GraphModule(tracer.root, graph, name)
    if drew:
        path, how = drew[0]
        err = RandomInTrace(f"{_RANDOM_WHY} (a NumPy generator, {how} of "
                            f"{repr(path) if path else 'the module'}, was drawn from while tracing)")
        err._lrd_module_path = path
        forward = getattr(type(module.get_submodule(path) if path else module), "forward", None)
        code = getattr(forward, "__code__", None)
        if code is not None:            # the drawing forward, not this function, is the user's line
            err._lrd_user_line = f"{code.co_filename}:{code.co_firstlineno} in {forward.__qualname__}"
        raise err
    # fx stores tensor constants on the traced module (_tensor_constant0, ...); the GraphModule has its own
    # reference, and the module is left as it was, so a second trace names them the same way. Anything
    # else the forward assigned (self.cache = x, self.count = self.count + 1) is state a graph cannot
    # keep: tracing it would silently drop it, so that module is not traced (it stays eager).
    changed = [(path, [k for k in keys if not (path == "" and k.startswith("_tensor_constant"))])
               for path, keys in changed]
    changed = [(path, keys) for path, keys in changed if keys]
    if changed:
        path, keys = changed[0]
        err = TraceError(f"forward assigns {', '.join('self.' + k for k in keys[:3])} of "
                         f"{repr(path) if path else 'the module'}: a traced graph cannot assign attributes, so "
                         f"tracing would drop that state")
        err._lrd_module_path = path
        raise err
    keep_plain_attributes(gm, module)
    return gm


# methods of a traced module's class that read only names and settings, not the forward's structure: timm's
# parameter-group and weight-decay metadata (create_optimizer_v2's layer decay and no-decay lists) and its
# classifier getter. The traced replacement keeps them (GraphModule parts get them on their own class).
KEPT_METHODS = ("no_weight_decay", "no_weight_decay_keywords", "group_matcher", "get_classifier")
# methods that would need the module's own structure (its blocks called eagerly, its head replaced): the traced
# replacement refuses them with what to do, rather than an AttributeError (or, for a head swapped by hand, a
# KeyError from the graph)
REFUSED_METHODS = ("reset_classifier", "set_grad_checkpointing", "forward_features", "forward_head",
                   "forward_intermediates", "prune_intermediate_layers", "set_input_size")


class RefusedMethod:
    """Stands in for a method the compiled model cannot run (REFUSED_METHODS on a traced module's class;
    transformers' resize_token_embeddings with a factorized LM head, api._refuse_resizing_a_factorized_head):
    calling it raises UnsupportedError with `why`, which says what to do instead."""

    def __init__(self, why: str):
        self.why = why

    def __call__(self, *args, **kwargs):
        from .errors import UnsupportedError
        raise UnsupportedError(self.why)


def _source_methods(gm: nn.Module, module: nn.Module) -> None:
    """Record on `gm` (a GraphModule traced from `module`) the KEPT_METHODS and REFUSED_METHODS of module's
    class; fix_graph_part_protocols_ puts them on gm's own class (and again on copies and unpickled parts)."""
    cls = type(module)
    found = {}
    for name in KEPT_METHODS + REFUSED_METHODS:
        fn = inspect.getattr_static(cls, name, None)
        if fn is None or hasattr(nn.Module, name) or hasattr(fx.GraphModule, name):
            continue
        if name in KEPT_METHODS and inspect.isfunction(fn):
            found[name] = fn
        elif name in REFUSED_METHODS and callable(fn):
            found[name] = RefusedMethod(
                f"{cls.__name__}.{name}() is not available on the compiled model: its graph has the forward "
                f"only, and its layers are factor chains. Call {name}(...) on the original model before "
                f"lrd_fx.compile (e.g. reset_classifier(num_classes) or set_grad_checkpointing(True)), or compile "
                f"a model whose forward returns what you need (timm: features_only=True, or reset_classifier(0) "
                f"for pooled features)")
    if found:
        gm.__dict__["_lrd_methods"] = found


def apply_source_methods(gm: nn.Module) -> None:
    """Put the methods _source_methods recorded on gm's own class (fx makes one class per GraphModule)."""
    found = gm.__dict__.get("_lrd_methods")
    if not found or type(gm) is fx.GraphModule:
        return
    for name, fn in found.items():
        setattr(type(gm), name, fn)


def keep_plain_attributes(gm: nn.Module, module: nn.Module) -> None:
    """Copy module's plain attributes (not modules, tensors or private names; e.g. a HF `config`, RAFT's
    `hidden_state_size`) onto its traced replacement, so code outside the graph that reads them still works.
    The same for the bare containers fx builds for the submodules traced into the graph (an eager
    nn.TransformerDecoder reads `layers[0].self_attn.batch_first`). Also the class's metadata methods
    (KEPT_METHODS) and stand-ins that refuse the structural ones (REFUSED_METHODS)."""
    _copy_plain_attributes(gm, module)
    if isinstance(gm, fx.GraphModule):
        _source_methods(gm, module)
        apply_source_methods(gm)
    for name, sub in gm.named_modules():
        if name and type(sub) is nn.Module:
            try:
                _copy_plain_attributes(sub, module.get_submodule(name))
            except AttributeError:
                continue


def _copy_plain_attributes(gm: nn.Module, module: nn.Module) -> None:
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training" or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        if key in vars(gm) or hasattr(type(gm), key):
            continue   # never shadow what the GraphModule itself defines (graph, code, forward, ...)
        setattr(gm, key, value)


def by_mode(training: bool, if_training, if_eval):
    """A value that depends on the module's train/eval mode (`training` is the module's own flag)."""
    return if_training if training else if_eval


# by_mode for TorchScript, which needs one type per function (api._prepare_scriptable retargets by_mode
# nodes whose two values share one of these types).
def by_mode_bool(training: bool, if_training: bool, if_eval: bool) -> bool:
    return if_training if training else if_eval


def by_mode_int(training: bool, if_training: int, if_eval: int) -> int:
    return if_training if training else if_eval


def by_mode_float(training: bool, if_training: float, if_eval: float) -> float:
    return if_training if training else if_eval


BY_MODE_TYPED = {bool: by_mode_bool, int: by_mode_int, float: by_mode_float}


# Re-tracing a graph that holds by_mode nodes (fx rebuilds a pickled GraphModule by tracing its code with
# the graph's tracer class) keeps them as nodes: their `training` input is a Proxy there.
register_leaf_function(by_mode)


class TrainingFlag(nn.Module):
    """Returns its own `training` flag, which .train()/.eval() on the model set: lets a graph read the mode."""

    def forward(self) -> bool:
        return self.training


_FLAG = "lrd_training"


class _Mismatch(Exception):
    pass


def _merge_arg(g: fx.Graph, flag, a, b, before: fx.Node):
    """a (traced in train mode) and b (eval mode), equal up to constants: a merged argument whose
    differing constants are by_mode(self.training, a, b) nodes; _Mismatch when the structure differs."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name:
            return a
        raise _Mismatch
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if type(a) is not type(b) or len(a) != len(b):
            raise _Mismatch
        return type(a)(_merge_arg(g, flag, x, y, before) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        if type(a) is not type(b) or list(a) != list(b):
            raise _Mismatch
        return {k: _merge_arg(g, flag, a[k], b[k], before) for k in a}
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if a is b:
            return a
        raise _Mismatch
    if type(a) is type(b) and a == b:
        return a
    if isinstance(a, slice) or isinstance(b, slice):
        raise _Mismatch
    with g.inserting_before(before):
        return g.call_function(by_mode, (flag, a, b))


def _merge_modes(gm_train: fx.GraphModule, gm_eval: fx.GraphModule) -> bool:
    """Make gm_train's graph exact in both modes when the two traces differ only in constants (dropout
    probabilities, `training=` flags): those become by_mode(self.training, ...) nodes. False (graph left
    as traced) when the structure differs, e.g. an aux head that only runs in train mode."""
    a_nodes, b_nodes = list(gm_train.graph.nodes), list(gm_eval.graph.nodes)
    if len(a_nodes) != len(b_nodes):
        return False
    for x, y in zip(a_nodes, b_nodes):
        if (x.op, x.name) != (y.op, y.name) or not (x.target == y.target or x.target is y.target):
            return False
    g = gm_train.graph
    if hasattr(gm_train, _FLAG):
        return False
    gm_train.add_module(_FLAG, TrainingFlag())
    body = next(n for n in a_nodes if n.op != "placeholder")
    with g.inserting_before(body):
        flag = g.call_module(_FLAG)
    try:
        merged = [(x, _merge_arg(g, flag, x.args, y.args, x), _merge_arg(g, flag, x.kwargs, y.kwargs, x))
                  for x, y in zip(a_nodes, b_nodes)]
    except _Mismatch:
        for n in reversed(list(g.nodes)):
            if n.op == "call_function" and n.target is by_mode:
                g.erase_node(n)
        g.erase_node(flag)
        delattr(gm_train, _FLAG)
        return False
    for x, args, kwargs in merged:
        x.args, x.kwargs = args, kwargs
    gm_train.recompile()
    return True


def _mode_leaf_candidates(model: nn.Module, leaf_classes, leaf_names) -> set:
    """Submodules (relative names) with no factorizable layer whose forward reads self.training."""
    out = set()
    for qn, m in model.named_modules():
        if not qn or qn in leaf_names or any(qn.startswith(n + ".") for n in leaf_names | out):
            continue
        if _is_torch_builtin(m) or (leaf_classes and isinstance(m, leaf_classes)) or _has_factorizable(m):
            continue
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        try:
            src = inspect.getsource(type(m).forward)
        except (OSError, TypeError):
            continue
        if "training" in src:
            out.add(qn)
    return out


def _trace_both_modes(module: nn.Module, leaf_modules, leaf_names,
                      concrete_args: Optional[dict] = None) -> tuple[fx.GraphModule, Optional[str]]:
    """Trace in the module's mode and in the other one. Python branches on self.training are fixed by
    tracing, so a graph must hold for both modes: constants that differ become by_mode nodes; a
    structure that differs is returned with a reason (the caller keeps that module eager)."""
    gm = _trace_once(module, leaf_modules, leaf_names, concrete_args)
    flags = training_flags(module)
    was = module.training
    try:
        module.train(not was)
        try:
            other = _trace_once(module, leaf_modules, leaf_names, concrete_args)
        except Exception as e:  # noqa: BLE001 - traces in one mode only: keep it eager
            return gm, (f"forward traces in {'train' if was else 'eval'} mode only "
                        f"({type(e).__name__}: {str(e)[:120]})")
    finally:
        restore_training_flags(flags)
    if gm.code == other.code:
        return _copy_modes(gm, module), None
    train_gm, eval_gm = (gm, other) if module.training else (other, gm)
    if _merge_modes(train_gm, eval_gm):
        return _copy_modes(train_gm, module), None
    return _copy_modes(gm, module), ("forward depends on self.training (train and eval mode trace to "
                                     "different graphs, e.g. an aux head): kept eager so both modes "
                                     "behave as the original")


def _copy_modes(gm: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """The GraphModule and the containers fx creates for it start in train mode: give every module the
    mode of the module at the same path in the traced one (an eval model stays in eval mode)."""
    for name, sub in gm.named_modules():
        try:
            src = module.get_submodule(name) if name else module
        except AttributeError:
            src = module      # a container fx made for a path the original does not have
        sub.training = src.training
    return gm


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _has_factorizable(m: nn.Module) -> bool:
    """True when m holds Conv/Linear layers we may rewrite. torch.nn's own composite layers
    (e.g. MultiheadAttention, which reads out_proj.weight directly) are never opened up."""
    if _is_torch_builtin(m):
        return False
    return any(isinstance(x, _FACTORIZABLE) for x in m.modules())


def call_reason(m: nn.Module) -> Optional[str]:
    """Why module `m` must be called as a module, or None: it has forward or backward hooks (nn.Module.__call__
    runs them) or its class overrides __call__ (transformers 4's checkpointing layers); a graph traced
    through it, or the module replaced by its own graph, would skip them."""
    kinds = [k for k, d in (("forward", m._forward_hooks), ("forward pre", m._forward_pre_hooks),
                            ("backward", m._backward_hooks), ("backward pre", m._backward_pre_hooks)) if d]
    if kinds:
        return (f"has {'/'.join(kinds)} hooks, which a traced graph would not run: kept eager so they still "
                f"run (its children are traced)")
    call = type(m).__call__
    if call is not nn.Module.__call__ and not isinstance(m, fx.GraphModule):
        return (f"{type(m).__name__} overrides __call__ ({getattr(call, '__qualname__', call)}), which a traced "
                f"graph would not run: kept eager (its children are traced)")
    return None


def is_hf_model(model: nn.Module) -> bool:
    """True for a transformers PreTrainedModel (only when transformers is already imported)."""
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(model, base)


def install_output_recorders(model: nn.Module) -> None:
    """Install transformers' output-recording hooks on `model` (a copy about to be traced), where
    transformers would install them.

    transformers 5 records `output_hidden_states` / `output_attentions` with forward hooks that it
    installs, on the first call that asks for them, on the modules of given classes (`isinstance`) or
    names. A module traced into a graph is no longer of its class: hooks installed after compile missed
    it, and the output silently lacked those hidden states (HF ConvNeXt and YOLOS). Installed before
    tracing, the hooks keep those modules eager (call_reason) and are there when a call asks; they do
    nothing until then."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    install = getattr(capturing, "maybe_install_capturing_hooks", None)
    if install is None:
        return                      # no transformers 5 model can be here

    def walk(m: nn.Module) -> None:
        if is_hf_model(m):
            install(m)              # transformers walks its submodels itself, with their own records
            return
        for child in m.children():
            walk(child)

    walk(model)
    _picklable_capture_hooks(model, capturing)


_CAPTURE_HOOK = "install_output_capuring_hook.<locals>.output_capturing_hook"


class CaptureHook:
    """transformers' output-capturing forward hook, which is a closure: pickle cannot store it, so a compiled
    Hugging Face model (its hooks installed up front, above) could not be pickled whole or sent to another
    process. This holds what the closure holds (key, index, whether to capture the initial hidden state) and
    rebuilds it with transformers' own installer on first use, also after unpickling."""

    def __init__(self, key: str, index: int, capture_initial: bool):
        self.key, self.index, self.capture_initial = key, index, capture_initial
        self._hook = None

    def __call__(self, module, args, output):
        if self._hook is None:
            # loaded by the Hugging Face model this hook sits on (lrd_fx itself never imports transformers)
            capturing = sys.modules["transformers.utils.output_capturing"]
            holder = nn.Module()
            capturing.install_output_capuring_hook(holder, self.key, self.index, self.capture_initial)
            self._hook = next(iter(holder._forward_hooks.values()))
        return self._hook(module, args, output)

    def __getstate__(self):
        return {"key": self.key, "index": self.index, "capture_initial": self.capture_initial}

    def __setstate__(self, state):
        self.__init__(state["key"], state["index"], state["capture_initial"])


def _picklable_capture_hooks(model: nn.Module, capturing) -> None:
    """Swap each of transformers' capturing closures on `model` for a CaptureHook (the same call), where the
    closure is the one this transformers installs (its name, and the values it holds), and drop a module's
    second hook recording the same output.

    Second hooks: transformers installs a composite model's hooks from its root, and that walk installs them on
    every Hugging Face submodel without asking whether the submodel has them already. A vision tower that a
    LLaVA-like model's forward had run (it asks the tower for one layer's hidden state) has them, and so has
    the copy being compiled; installed again from the root, each of its layers recorded its output twice: a
    vision tower's hidden states came back twice as many, the layer a VLM selects was the wrong one or None."""
    if not hasattr(capturing, "install_output_capuring_hook"):
        return
    for m in model.modules():
        seen = set()
        for hid, hook in list(m._forward_hooks.items()):
            if isinstance(hook, CaptureHook):
                what = (hook.key, hook.index, hook.capture_initial)
            else:
                code = getattr(hook, "__code__", None)
                if getattr(code, "co_qualname", "") != _CAPTURE_HOOK or hook.__closure__ is None:
                    continue
                held = dict(zip(code.co_freevars, (c.cell_contents for c in hook.__closure__)))
                if not {"key", "index", "capture_initial_hidden_state"} <= set(held):
                    continue
                what = (held["key"], held["index"], held["capture_initial_hidden_state"])
                m._forward_hooks[hid] = CaptureHook(*what)
            if what in seen:
                del m._forward_hooks[hid]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(m, extra, {}).pop(hid, None)
            seen.add(what)


class HookOnHolder:
    """Stands in, as an instance attribute, for `register_forward_hook` / `register_forward_pre_hook` of a
    module that a traced graph holds but does not call (a block whose layers the graph calls one by one:
    `gm.layer3`). A hook registered on it after compile never runs, which no error showed (Grad-CAM and
    feature hooks on a compiled model collected nothing). It warns, then registers the hook as asked."""

    def __init__(self, module: nn.Module, method: str, path: str, read: bool = False):
        self.module, self.method, self.path, self.read = module, method, path, read

    def __call__(self, *args, **kwargs):
        kind = "forward pre-hook" if self.method == "register_forward_pre_hook" else "forward hook"
        how = ("reads this layer's weights instead of calling it (as freezing gates do)" if self.read
               else "calls its layers one by one")
        warn(f"module '{self.path}' ({type(self.module).__name__}) is not called by the compiled model's graph, "
             f"which {how}, so this {kind} will never run. Register it on the model "
             f"before lrd_fx.compile (that module then stays a module and runs its hooks), or on a module "
             f"the graph calls (print(gm.code) shows them)")
        return getattr(nn.Module, self.method)(self.module, *args, **kwargs)


def mark_graph_holders(root: nn.Module) -> None:
    """Give every module that a traced graph holds but does not call (see HookOnHolder) the warning
    stand-ins for its hook registration."""
    for m in root.modules():      # again after the graph changed (strip_gates, fuse): marks made before go
        for method in ("register_forward_hook", "register_forward_pre_hook"):
            if isinstance(m.__dict__.get(method), HookOnHolder):
                del m.__dict__[method]
    for prefix, part in graph_modules(root):
        called = {n.target for n in part.graph.nodes if n.op == "call_module"}
        # modules whose parameters the graph reads (get_attr) without calling them: factor layers under
        # freezing gates, F.linear(x, grad_gate(first.weight))
        read = {str(n.target).rpartition(".")[0] for n in part.graph.nodes if n.op == "get_attr"}
        for rel, m in part.named_modules():
            atoms = rel.split(".")
            leaf = not any(True for _ in m.children())
            if (not rel or isinstance(m, fx.GraphModule) or (leaf and rel not in read)
                    or any(".".join(atoms[:i]) in called for i in range(1, len(atoms) + 1))):
                continue        # the part itself, a graph, a layer called, or a module called (or inside one)
            for method in ("register_forward_hook", "register_forward_pre_hook"):
                object.__setattr__(m, method, HookOnHolder(m, method, prefix + rel, read=leaf))


def _eager_by_design(m: nn.Module) -> bool:
    """lrd_fx's own stand-ins that run eagerly (moe.Experts: data-dependent routing); their layers are
    swapped in place, like those of an nn.ModuleList."""
    return getattr(type(m), "_lrd_eager", False)


_CHILD_CALL = re.compile(r"\bself\.(\w+)\.(\w+)\s*\(")
_CHILD_CALLS: dict = {}


def _methods_called_on_children(module: nn.Module) -> dict:
    """{child attribute: {method names}} that the source of `module`'s classes calls as `self.<child>.<name>(`
    (cached per class; classes of torch.nn and those without source are not read)."""
    cls = type(module)
    if cls not in _CHILD_CALLS:
        found: dict = {}
        for klass in cls.__mro__:
            if klass in (nn.Module, object) or klass.__module__.startswith(("torch.nn", "torch.fx")):
                continue
            try:
                src = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            for child, name in _CHILD_CALL.findall(src):
                found.setdefault(child, set()).add(name)
        _CHILD_CALLS[cls] = found
    return _CHILD_CALLS[cls]


def methods_called_reason(parent: nn.Module, cname: str, child: nn.Module) -> Optional[str]:
    """Why `child` (the attribute `cname` of `parent`, which stays eager) must keep its class, or None: the
    parent's code calls a method of the child other than forward (torchvision RetinaNet's and FCOS's
    `self.head.compute_loss(...)` in training). A graph of the child's forward has only forward: traced
    apart, the child lost that method and the first training call failed with an AttributeError."""
    names = _methods_called_on_children(parent).get(cname, ())
    own = sorted(n for n in names if n not in ("forward", "__call__") and not hasattr(nn.Module, n)
                 and inspect.isfunction(inspect.getattr_static(type(child), n, None)))
    if not own:
        return None
    return (f"its parent calls its {', '.join(f'{n}()' for n in own)}, which a graph of its forward would not "
            f"have: kept eager (its children are traced)")


def _no_forward(m: nn.Module) -> bool:
    """True for a container that cannot be called (nn.ModuleList, nn.ModuleDict: no forward of its own)."""
    return getattr(type(m), "forward", None) is getattr(nn.Module, "forward", None)


def _is_torch_builtin(m: nn.Module) -> bool:
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return type(m).__module__.startswith("torch.nn") and not isinstance(m, containers + _FACTORIZABLE)


class PartFailed(TraceError):
    """A part's traced graph fails on the example inputs where the model runs eagerly (shape_prop raises it;
    compile and load then trace the model again with that part kept eager). `part`: its path ("" for the
    root), `reason`: the failure."""

    def __init__(self, part: str, reason: str):
        super().__init__(f"traced part '{part or '<root>'}' fails on the example inputs where the model runs "
                         f"eagerly ({reason})")
        self.part, self.reason = part, reason


def trace(model: nn.Module, *, leaf_modules: Iterable = (), fallback: bool = True,
          fallback_parts: Optional[dict] = None, eager_parts: Optional[set] = None,
          concrete_args: Optional[dict] = None, keep_eager_parts: Optional[dict] = None,
          defaults: Optional[dict] = None, _path: str = "") -> nn.Module:
    """Trace `model` (which the caller owns: it is rewired, not copied).

    Returns a GraphModule when the model traces. Where a submodule breaks tracing, that submodule is
    made a leaf, the rest is traced, and the submodule is traced on its own, recursively down to single
    layers (fallback). A module whose own forward does not trace stays eager, with its children traced
    separately. `fallback_parts` receives {module path: reason} for every part that fell back.
    `concrete_args` ({forward parameter: None}) fixes inputs of this module's forward that will be None
    (fx would trace them as given, e.g. through `if mask is not None:`); not passed to parts traced apart.
    `defaults` ({forward parameter: its bool/int/float/str default}, inputs the example inputs leave out):
    where this module's trace fails, it is traced again with them fixed too (timm's ViT branches on
    `is_causal=False`); they stay fixed where that gets further (a graph, or a failure elsewhere), and the
    graph then stops a call that gives another value (traced_as_<type>; `traced_defaults` reads them back).
    `keep_eager_parts` ({module path: reason}, "" for the root): modules kept eager whatever their trace
    gives (parts whose graph failed on the example inputs, see PartFailed), their children traced apart.
    Raises TraceError when fallback is off, or when nothing at all could be traced.
    """
    leaf_modules = tuple(leaf_modules)
    classes = tuple(x for x in leaf_modules if isinstance(x, type))
    names = {x for x in leaf_modules if isinstance(x, str)}
    # names are given relative to the whole model; make them relative to this part
    local_names = {n[len(_path) + 1:] if _path and n.startswith(_path + ".") else n for n in names}
    parts = fallback_parts if fallback_parts is not None else {}
    eager = eager_parts if eager_parts is not None else set()
    forced: dict[str, str] = {}   # relative path -> reason, children that broke tracing
    kept = keep_eager_parts if keep_eager_parts is not None else {}

    def trace_children(module: nn.Module, path: str) -> None:
        for cname, child in list(module.named_children()):
            if isinstance(child, _FACTORIZABLE) or not _has_factorizable(child):
                continue   # a single layer needs no graph: the decompose pass swaps it directly
            cpath = _join(path, cname)
            if _no_forward(child) or _eager_by_design(child):
                # a ModuleList / ModuleDict (or any module without a forward of its own): nothing to trace,
                # and no failure to report; it stays as it is (its own layers are swapped in place, see
                # decompose.collect_sites) and its children are traced apart
                eager.add(cpath)
                trace_children(child, cpath)
                continue
            if (why := methods_called_reason(module, cname, child)) is not None:
                parts[cpath] = why
                eager.add(cpath)
                trace_children(child, cpath)
                continue
            if isinstance(child, nn.Sequential) and call_reason(child) is None:
                # the eager parent may iterate, index or slice it (timm's checkpoint_seq and
                # forward_intermediates, torch's checkpoint_sequential), which a GraphModule does not
                # allow: it stays an nn.Sequential (subclasses too) and its layers are traced one by one
                eager.add(cpath)
                trace_children(child, cpath)
                continue
            setattr(module, cname, trace(child, leaf_modules=leaf_modules, fallback=True,
                                         fallback_parts=parts, eager_parts=eager, keep_eager_parts=kept,
                                         _path=cpath))

    def keep_eager(reason: str) -> nn.Module:
        # this module's own forward does not trace (or not for both modes): keep it eager, trace each child apart
        parts[_path or "<root>"] = reason
        eager.add(_path)
        trace_children(model, _path)
        return model

    if _path in kept:
        return keep_eager(kept[_path])
    if _eager_by_design(model):
        eager.add(_path)
        trace_children(model, _path)
        return model
    if (why := call_reason(model)) is not None or (why := _notrace_reason(model, classes)) is not None:
        return keep_eager(why)
    trigger, tried, plain = None, set(), concrete_args   # trigger: the failure that made `defaults` fixed
    while True:
        try:
            gm, mode_reason = _trace_both_modes(model, classes, local_names | set(forced), concrete_args)
            break
        except Exception as e:  # noqa: BLE001 - any tracing failure is reported or handled below
            where = getattr(e, "_lrd_module_path", "")
            line = _user_line(e)
            full = _join(_path, where) or "<root>"
            reason = f"{type(e).__name__}: {e} (at {line})"
            if defaults:
                if trigger is None and (where, reason) not in tried:
                    # once more with the left-out inputs fixed at their defaults
                    trigger, plain = (where, reason), concrete_args
                    tried.add(trigger)
                    concrete_args = {**(concrete_args or {}), **defaults}
                    continue
                if (where, reason) == trigger:     # fixing them changed nothing: keep the graph general
                    trigger, concrete_args = None, plain
            if not fallback:
                raise TraceError(
                    f"torch.fx cannot trace module '{full}' ({type(model.get_submodule(where)).__name__ if where else type(model).__name__}): "
                    f"{reason}. Mark it a leaf (leaf_modules=[{'<its class>' if not where else repr(full)}]) "
                    f"so it is kept whole, or allow fallback=True to trace its children separately.") from e
            if where and where not in forced:
                forced[where] = reason
                continue
            return keep_eager(reason)
    if mode_reason is not None:
        # Small modules with no Conv/Linear inside that read self.training (timm's DropPath, ...) lose
        # nothing as leaves: keep them whole and retry, so the rest of this module stays one graph.
        mode_leaves = _mode_leaf_candidates(model, classes, local_names | set(forced))
        if mode_leaves:
            try:
                gm2, reason2 = _trace_both_modes(model, classes, local_names | set(forced) | mode_leaves,
                                                 concrete_args)
            except Exception:  # noqa: BLE001 - no better: keep the module eager below
                reason2 = mode_reason
            if reason2 is None:
                gm, mode_reason = gm2, None
    if mode_reason is not None:
        if not fallback:
            raise TraceError(
                f"module '{_path or '<root>'}' ({type(model).__name__}): {mode_reason}; one graph cannot "
                f"reproduce both modes. Allow fallback=True (that module then stays eager, its children are "
                f"traced), or mark it a leaf (leaf_modules=[...]).")
        return keep_eager(mode_reason)
    # leaves to trace apart: those that broke tracing (with their reason), those called as modules for
    # their hooks or __call__, and timm's not-traceable classes the caller did not name as leaves (trace()
    # keeps them eager, with the reason, and traces their children)
    apart: dict[str, Optional[str]] = dict(forced)
    apart.update((rel, None) for rel in sorted({n.target for n in gm.graph.nodes if n.op == "call_module"})
                 if rel not in forced and (call_reason(gm.get_submodule(rel)) is not None
                                           or _eager_by_design(gm.get_submodule(rel))
                                           or (rel not in local_names and
                                               _notrace_reason(gm.get_submodule(rel), classes) is not None)))
    for rel, reason in apart.items():
        full = _join(_path, rel)
        if reason is not None:
            parts[full] = reason
        sub = gm.get_submodule(rel)
        if isinstance(sub, _FACTORIZABLE) or not _has_factorizable(sub):
            continue
        new = trace(sub, leaf_modules=leaf_modules, fallback=True, fallback_parts=parts,
                    eager_parts=eager, keep_eager_parts=kept, _path=full)
        gm.set_submodule(rel, new)
    return gm
