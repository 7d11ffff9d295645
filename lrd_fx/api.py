"""compile(): Config -> list of passes -> PassManager.run (save() and load() are in serialize.py)."""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .config import Calibration, Config
from .context import CompileContext
from .errors import ConfigError, InputError, TraceError, warn
from .flops import count_flops, fused_attention_off
from .passes.shape_prop import DIFFERS, NEEDS_GIVEN
from .pipeline import PassManager, PassTimer, default_instruments, eval_mode, graph_modules
from .plan import LayerRecord
from .report import outside_layers
from .std_conv import folded_params, use_plain_convs_
from .std_conv import restore_unfactorized_ as restore_std_convs_
from .torch_modules import use_stand_ins_
from .trace import (FIXABLE_DEFAULTS, PartFailed, install_output_recorders, is_hf_model, mark_graph_holders, trace,
                    traced_defaults)


class LRDInfo:
    """What `compile` attaches as `gm.lrd`: plan, per-layer report, freezer, pass times."""

    def __init__(self, root: nn.Module, ctx: CompileContext):
        self._root = root
        self.config = ctx.config
        self.fallback_parts = dict(ctx.fallback_parts)
        self.kept_eager = dict(ctx.kept_eager)   # parts whose traced graph failed on the inputs (save keeps them)
        self.traced_none = list(ctx.traced_none or [])   # root inputs traced as None (save keeps them)
        self.traced_defaults = dict(ctx.traced_defaults or {})   # root inputs traced at their default (save keeps them)
        self.stand_ins = list(ctx.stand_ins or [])   # nn.MultiheadAttention / MoE experts paths given stand-ins (save keeps them)
        self.pass_times = dict(ctx.pass_times)
        self.notes = list(ctx.notes)
        self.freezer = ctx.freezer
        self.flops_before = ctx.flops_before
        self.flops_after = ctx.flops_after
        self.params_before = ctx.params_before
        self.params_after = sum(p.numel() for p in root.parameters())
        self.whole_model = ctx.whole_model   # whole compiled model vs original, timed (check_speed)
        self.guard = ctx.guard               # what the whole-model guard gave back (None: nothing)
        self.setting = ctx.setting           # precision / layout / execution form timed in
        self._eager_records = {n: r for n, r in ctx.records.items()}
        # parameters no Conv/Linear layer holds, by module type (report); read from the caller's model
        self.outside = outside_layers(ctx.model, ctx.records, ctx.stand_ins or ())

    def records(self) -> dict[str, LayerRecord]:
        """Per-layer records, read from the graph's node.meta["lrd"] (layers in eager parts from the
        compile context), in model order."""
        out: dict[str, LayerRecord] = {}
        for _, part in graph_modules(self._root):
            for node in part.graph.nodes:
                rec = node.meta.get("lrd")
                if isinstance(rec, LayerRecord) and rec.name not in out:
                    out[rec.name] = rec
        for name, rec in self._eager_records.items():
            out.setdefault(name, rec)
        # graph records come part by part, eager ones after: sort by the layers' places in the model
        order = {n: i for i, (n, _) in enumerate(self._root.named_modules())}

        def place(name: str) -> float:
            probe = name
            while probe:
                if probe in order:
                    return order[probe] + (0 if probe == name else 0.5)
                probe = probe.rpartition(".")[0]
            return len(order)
        return dict(sorted(out.items(), key=lambda kv: place(kv[0])))

    @property
    def plan(self) -> dict[str, dict]:
        """{qualified name: layer decision}, JSON-serialisable."""
        return {name: rec.to_dict() for name, rec in self.records().items()}

    def report(self, *, all_layers: bool = True, each_expert: bool = False) -> str:
        """The per-layer table and the totals. all_layers=False lists factorized layers only; a
        mixture-of-experts projection's experts share one row (summed), each_expert=True lists each."""
        from .report import format_report
        return format_report(self, all_layers=all_layers, each_expert=each_expert)

    def __repr__(self) -> str:
        recs = self.records().values()
        n = sum(r.factorized for r in recs)
        return f"LRDInfo({n} of {len(recs)} Conv/Linear layers factorized)"


def _as_tuple(example_inputs, model: Optional[nn.Module] = None) -> Optional[tuple]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping) and model is not None:
        return _keyword_inputs(model, example_inputs)
    raise InputError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs (e.g. a "
                     f"tokenizer's BatchEncoding), got {type(example_inputs).__name__}")


def _keyword_inputs(model: nn.Module, kw: Mapping) -> tuple:
    """Keyword example inputs ({"input_ids": ..., "attention_mask": ...}) as the positional tuple
    model.forward takes: its parameters in order up to the last one given, their defaults between."""
    what = f"{type(model).__name__}.forward"
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError) as e:
        raise InputError(f"example_inputs is a dict, but the signature of {what} cannot be read ({e}); "
                         f"pass the inputs as a tuple in its positional order") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    if not kw:
        raise InputError(f"example_inputs is an empty dict; give the inputs of {what} ({', '.join(names)})")
    other = [k for k in kw if k not in names]
    if other:
        raise InputError(f"example_inputs key(s) {other} are not positional parameters of {what} "
                         f"({', '.join(names) or 'none'}); lrd_fx runs the model with positional inputs only: "
                         f"leave them out or wrap the model in a module that takes them positionally")
    last = max(names.index(k) for k in kw)
    out = []
    for p in positional[:last + 1]:
        if p.name in kw:
            out.append(kw[p.name])
        elif p.default is not p.empty:
            out.append(p.default)
        else:
            raise InputError(f"example_inputs has no {p.name!r}, which {what} requires before "
                             f"{names[last]!r}; add it to the dict")
    return tuple(out)


def _left_out_inputs(model: nn.Module, inputs: Optional[tuple]) -> tuple[list, dict]:
    """The parameters of model.forward that the example inputs do not give a tensor or value for:
    - [names] of those None in them, given so or left out with a None default (e.g. `mask=None`): traced
      as None. fx would otherwise trace them as given, through `if mask is not None:`, and the graph would
      fail or differ when called without them. A call that passes one later is an InputError
      (trace.traced_as_none).
    - {name: default} of those left out with a bool/int/float/str default (timm's `is_causal=False`):
      trace fixes them at it only where the forward does not trace otherwise (trace's `defaults`)."""
    if inputs is None:
        return [], {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [], {}
    none, defaults, pos = [], {}, 0
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            given = p.kind != p.KEYWORD_ONLY and pos < len(inputs)
            value = inputs[pos] if given else p.default
            pos += p.kind != p.KEYWORD_ONLY
            if value is None:
                none.append(p.name)
            elif not given and type(value) in FIXABLE_DEFAULTS and value == value:     # NaN equals nothing
                defaults[p.name] = value
    return sorted(none), defaults


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _check_input_types(inputs: tuple, device, dtype) -> None:
    """Name the input whose device/dtype does not fit the model's parameters (no forward)."""
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if x.device != device:
            raise InputError(f"example_inputs[{i}] is on {x.device} but the model's parameters are on "
                             f"{device}; move the inputs (x.to('{device}')) or the model")
        if x.is_floating_point() and x.dtype != dtype:
            raise InputError(f"example_inputs[{i}] has dtype {x.dtype} but the model's parameters are "
                             f"{dtype}; cast the inputs (x.to({dtype})) to match")


def _lazy_layers(model: nn.Module) -> list[str]:
    """Names of the lazy layers with uninitialised parameters: they get their shapes from a forward of the
    eager model, which must come before tracing."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]


def _check_inputs(model: nn.Module, inputs: tuple, device, dtype) -> tuple:
    """Name the input whose device/dtype/shape does not fit: a forward of the eager model (eval, no grad),
    which counts its FLOPs as well. Returns (FLOPs, None), or (None, what went wrong) when torch's FLOP
    counter fails on a model that runs without it; raises InputError when the model fails on the inputs.
    The device and dtype are _early_check's (_check_input_types), which every caller has passed.

    compile() runs it before tracing only for lazy layers (_lazy_layers); otherwise shape_prop's
    forward of the traced model checks the inputs and counts the FLOPs (one forward of the model in all),
    and this runs only when that forward fails, to say whether the inputs are at fault."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.no_grad(), eval_mode(model):
            try:
                with fused_attention_off(), FlopCounterMode(display=False) as fc:
                    model(*inputs)
                return int(fc.get_total_flops()), None
            except Exception as e:  # noqa: BLE001 - the counter's failure or the model's: a plain run tells
                counter_error = f"{type(e).__name__}: {str(e)[:200]}"
            model(*inputs)
            return None, counter_error
    except Exception as e:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        example = ("a dict of every keyword input its forward needs, such as {'input_ids': ..., "
                   "'decoder_input_ids': ...} for an encoder-decoder" if is_hf_model(model) else
                   "torch.randn(1, 3, 224, 224) for an ImageNet model")
        raise InputError(f"the model does not run on example_inputs of shape {shapes} "
                         f"({type(e).__name__}: {e}); pass inputs shaped as the model expects, e.g. "
                         f"{example}") from e


def _check_not_empty(inputs: tuple) -> None:
    """The rank search times layers on these inputs: a tensor with a 0-size dim would time empty work."""
    def walk(x, where):
        if isinstance(x, torch.Tensor):
            if x.numel() == 0:
                raise InputError(f"{where} has shape {tuple(x.shape)} (a dimension of size 0): rank_search and "
                                 f"whole_model_check would time empty tensors (and revert every layer); pass "
                                 f"at least one sample, e.g. a batch of the size you will run")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}[{k!r}]")
    for i, x in enumerate(inputs):
        walk(x, f"example_inputs[{i}]")


def _flops_or_note(model: nn.Module, ctx: CompileContext, when: str, counted: Optional[tuple] = None) -> Optional[int]:
    """count_flops (or `counted`, the (FLOPs, error) _check_inputs already got), or None with a note in the
    report when torch's FLOP counter fails on this model (e.g. an AssertionError inside it for timm's
    cait): an optional measurement must not sink the compile."""
    if counted is not None:
        flops, err = counted
    else:
        try:
            return count_flops(model, ctx.example_inputs)
        except Exception as e:  # noqa: BLE001 - any failure of the counter only loses the FLOP figures
            flops, err = None, f"{type(e).__name__}: {str(e)[:200]}"
    if err is not None:
        ctx.notes.append(f"FLOPs unknown: torch.utils.flop_counter failed on the model {when} ({err})")
    return flops


def _flops_after(gm: nn.Module, ctx: CompileContext) -> Optional[int]:
    """The compiled model's FLOPs: the original's, less each changed layer's, plus its factor chain's
    (the records' per-layer counts use the formulas torch's counter applies to conv/linear), which saves
    a forward pass of the whole model. Counted on the model instead where the records cannot tell: after
    fusion (merged factor layers have no record of their own), or when a factorized layer has no
    recorded shapes."""
    changed = [r for r in ctx.records.values() if r.factorized]
    if ctx.config.fuse_inference or any(r.flops_before <= 0 or r.flops_after <= 0 for r in changed):
        return _flops_or_note(gm, ctx, "after compiling")
    return ctx.flops_before + sum(r.flops_after - r.flops_before for r in changed)


def _check_model(model: nn.Module, cfg: Config, inputs: Optional[tuple]) -> None:
    """Refuse models lrd_fx cannot work on, saying what to pass instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"model is a TorchScript module ({type(model).__name__}); lrd_fx needs the eager "
                         f"nn.Module: compile the model before torch.jit.script/trace, then script the result")
    scripted = [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        # fx traces into a scripted submodule's C++ module (its weights vanish from .parameters()), and a
        # deep copy of one holds non-leaf tensors no optimizer accepts: neither trains
        raise InputError(f"submodule '{scripted[0]}' is a TorchScript module; lrd_fx needs eager nn.Modules "
                         f"throughout: compile the eager model, then torch.jit.script/trace the result")
    from .factorize.chain import FactorChain
    compiled = isinstance(getattr(model, "lrd", None), LRDInfo) or any(
        isinstance(m, FactorChain) for m in model.modules())
    if compiled and cfg.rank != "full":
        raise InputError("model was already compiled by lrd_fx (it has .lrd or factor chains inside); pass the "
                         "original model instead (to change ranks, compile the original again), or rank='full' "
                         "to re-factorize it exactly")
    lazy = _lazy_layers(model)
    if lazy and (inputs is None or not cfg.check_inputs):
        raise InputError(f"lazy layer {lazy[0] or '<root>'} has uninitialized parameters; pass example_inputs "
                         f"(with check_inputs=True) so lrd_fx initialises them on its copy of the model, or run "
                         f"one forward before compiling")
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not nn.parameter.is_lazy(t) and t.is_meta]
    if meta:
        raise InputError(f"model has tensors on the meta device ({meta[0]}{' ...' if len(meta) > 1 else ''}): "
                         f"there are no weights to factorize; materialise them first, e.g. "
                         f"model.to_empty(device='cpu') then load_state_dict(...)")


def copy_model(model: nn.Module, *, share_layer_weights: bool = False) -> nn.Module:
    """A deep copy of `model`, original or compiled: how lrd_fx keeps the caller's model unchanged.

    share_layer_weights: the Conv/Linear parameters of the copy are new Parameter objects on the
    caller's storage instead of copies (most of a big model's bytes, and most of them are replaced
    by factors anyway). Only for pipelines that never write a weight in place (compile() decides);
    unshare() must then give what is still shared its own copy before the model is handed out.

    Like copy.deepcopy(model), with two repairs:
    - modules holding non-leaf tensors (computed by hooks: old-style torch.nn.utils.weight_norm,
      torch.nn.utils.prune; or kept from the last forward, also in lists, tuples or dicts: torchvision
      RAFT's correlation pyramid) are copied with those tensors detached; the hooks recompute them on
      the next forward;
    - GraphModule.__deepcopy__ rebuilds a GraphModule from the attributes its graph references, which
      turns containers such as FactorChain into plain nn.Modules and drops attributes like `.lrd`;
      the memo of the same deepcopy holds the faithful copies, so they are put back.
    """
    memo: dict = _shared_layer_weights(model) if share_layer_weights else {}
    try:
        new = copy.deepcopy(model, memo)
    except RuntimeError as e:
        if "deepcopy protocol" not in str(e):
            raise InputError(f"copy.deepcopy(model) failed ({e}); lrd_fx works on a copy so that your model is "
                             f"never changed: make the model deep-copyable") from e
        memo = _shared_layer_weights(model) if share_layer_weights else {}
        for m in model.modules():
            for t in _tensors_in(list(vars(m).values())):
                if not t.is_leaf:
                    memo[id(t)] = t.detach().clone()
        try:
            new = copy.deepcopy(model, memo)
        except Exception as e:
            raise InputError(f"copy.deepcopy(model) failed ({type(e).__name__}: {e}); lrd_fx works on a copy "
                             f"so that your model is never changed: remove what cannot be copied (e.g. "
                             f"torch.nn.utils.remove_weight_norm) first") from e
    for _, old in model.named_modules():
        part = memo.get(id(old)) if isinstance(old, fx.GraphModule) else None
        if part is not None:
            _repair_copy(old, part, lambda v: copy.deepcopy(v, memo))
    _restore_modes(model, new, memo)
    return new


def _tensors_in(values: list):
    """The tensors in `values`, also inside (nested) lists, tuples and dict values."""
    todo = list(values)
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())


def _restore_modes(model: nn.Module, new: nn.Module, memo: dict) -> None:
    """Give every module of the copy its original's mode. copy.deepcopy of torchvision's DualGraphModule
    (create_feature_extractor) returns every module in train mode, running its train graph, whatever
    the original's mode: an eval-mode feature extractor was compiled into a train-mode model (BatchNorm
    on batch statistics, outputs far off). A GraphModule with a train() of its own is switched first,
    so that it runs the graph of its mode."""
    pairs = [(old, memo.get(id(old))) for old in model.modules()]
    pairs = [(old, cp) for old, cp in pairs if isinstance(cp, nn.Module)]
    for old, cp in pairs:
        if cp.training != old.training and isinstance(cp, fx.GraphModule) and type(cp).train is not nn.Module.train:
            cp.train(old.training)
    for old, cp in pairs:
        cp.training = old.training


def _repair_copy(old: fx.GraphModule, part: fx.GraphModule, copy_value) -> None:
    """Put back in `part`, fx's copy of `old` (GraphModule.__deepcopy__ / __copy__), what that copy drops:
    old's submodules and other attributes (`.lrd`, a Hugging Face model's `.config`, ...), each through
    `copy_value` (a deep copy with the memo of the same deepcopy, which holds the faithful copies of the
    submodules; the value itself for a shallow copy), and its class name (fx makes one class per
    instance; fx's own class is never renamed)."""
    for cname, child in old._modules.items():
        part._modules[cname] = copy_value(child)
    for k, v in old.__dict__.items():
        if k not in part.__dict__:
            part.__dict__[k] = copy_value(v)
    _name_class(part, type(old).__name__)


def _name_class(part: fx.GraphModule, name: str) -> None:
    """Give `part`'s own class (fx makes one per instance) the name `name`; fx's GraphModule class itself is
    never renamed."""
    if type(part) is not fx.GraphModule:
        type(part).__name__ = name


def _graph_module_deepcopy(self, memo):
    res = fx.GraphModule.__deepcopy__(self, memo)
    _repair_copy(self, res, lambda v: copy.deepcopy(v, memo))
    fix_graph_part_protocols_(res)
    return res


def _graph_module_copy(self):
    res = fx.GraphModule.__copy__(self)
    _repair_copy(self, res, lambda v: v)
    fix_graph_part_protocols_(res)
    return res


def _graph_module_reduce(self):
    fn, args = fx.GraphModule.__reduce__(self)[:2]
    return _unpickled_part, (fn, args, type(self).__name__, tuple(self.state_dict(keep_vars=True)))


def _unpickled_part(fn, args, class_name: str, state_keys: Optional[tuple] = None):
    """How pickle (torch.save of a whole model) rebuilds a graph part lrd_fx returned: fx's own rebuild,
    then the part's class name and fix_graph_part_protocols_, which fx's plain GraphModule would not have.
    fx's rebuild traces the part's code again and registers every tensor that code reads as a buffer (a
    non-persistent buffer, a tensor a node holds as an argument: a new _tensor_constant<N>), so the state_dict
    gained keys, the unpickled model refused the compiled model's state_dict, and lrd_fx.save of it wrote a
    file load refused: buffers whose keys the part's state_dict did not have (`state_keys`) are
    non-persistent again."""
    part = fn(*args)
    if isinstance(part, fx.GraphModule) and type(part) is not fx.GraphModule:
        _name_class(part, class_name)
        fix_graph_part_protocols_(part)
    if state_keys is not None and isinstance(part, nn.Module):
        keep = set(state_keys)
        for path, m in part.named_modules():
            for name in m._buffers:
                if (f"{path}.{name}" if path else name) not in keep:
                    m._non_persistent_buffers_set.add(name)
    return part


def _prepare_scriptable(self):
    """What torch.jit.script compiles in place of this graph part (TorchScript calls it on every
    submodule): the same part sharing its submodules and parameters, with fx's plain generated code
    instead of fastcalls' `self._modules[...]` look-ups, which TorchScript cannot compile. A part with
    freezing gates is refused: the gates read Python state per call."""
    from .errors import FreezeError
    from .fastcalls import plain_codegen_
    from .freezing import FreezeController, FreezerLink
    if any(isinstance(m, (FreezeController, FreezerLink)) for m in self.modules()):
        raise FreezeError("a model with freezing gates cannot be scripted (the gates read Python state on "
                          "every call): script lrd_fx.strip_gates(model) (same outputs and parameter names), "
                          "or use torch.jit.trace or torch.export")
    from .trace import BY_MODE_TYPED, by_mode
    graph = copy.deepcopy(self.graph)
    changed = plain_codegen_(graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is by_mode:
            a, b = node.args[1:]
            typed = BY_MODE_TYPED.get(type(a)) if type(a) is type(b) else None
            if typed is None:
                raise TraceError(f"graph part {type(self).__name__}: a value that depends on train/eval mode "
                                 f"({a!r} in training, {b!r} in eval) has a type TorchScript cannot switch; use "
                                 f"torch.jit.trace or torch.export on the model in the mode it will run in")
            node.target = typed
            changed = True
    if not changed:
        return self
    from .trace import keep_plain_attributes
    scriptable = fx.GraphModule(self, graph, class_name=type(self).__name__)
    keep_plain_attributes(scriptable, self)    # eager code around the part may read them (batch_first)
    return scriptable


def fix_graph_part_protocols_(root: nn.Module) -> None:
    """Make `copy.deepcopy` / `copy.copy` of every graph part of `root` faithful (see _repair_copy), and
    `torch.jit.script` of it possible (_prepare_scriptable).

    fx's GraphModule.__deepcopy__ rebuilds a GraphModule from the attributes its graph reads, so a
    user's `copy.deepcopy(gm)` (an EMA or reference model, a best-checkpoint copy) lost `.lrd` (report,
    freezer, save), the model's own attributes (`.config`) and its class name. Each GraphModule
    instance has a class of its own (fx makes one per instance), so the fix is set on that class and
    touches no other GraphModule; the copies get it too, and so does a part pickled whole (torch.save
    of the model), through _unpickled_part."""
    from .trace import apply_source_methods
    for _, part in graph_modules(root):
        apply_source_methods(part)
        cls = type(part)
        if cls is fx.GraphModule or cls.__dict__.get("__deepcopy__") is _graph_module_deepcopy:
            continue
        cls.__deepcopy__ = _graph_module_deepcopy
        cls.__reduce__ = _graph_module_reduce
        cls.__prepare_scriptable__ = _prepare_scriptable
        if hasattr(fx.GraphModule, "__copy__"):
            cls.__copy__ = _graph_module_copy


def _shared_layer_weights(model: nn.Module) -> dict:
    """deepcopy memo {id(param): new Parameter on the same storage} for Conv/Linear parameters."""
    from .factorize.modules import is_linear_like
    memo: dict = {}
    for m in model.modules():
        if not (is_linear_like(m) or isinstance(m, nn.modules.conv._ConvNd)):
            continue
        for p in m._parameters.values():
            # not lazy/uninitialised or subclasses; nor inference tensors (made under torch.inference_mode:
            # deepcopy's clone of one is an ordinary tensor, which autograd and requires_grad accept)
            if type(p) is nn.Parameter and id(p) not in memo and not p.is_inference():
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return memo


def _shares_nothing_written(cfg: Config, calibration) -> bool:
    """True when no pass of this compile writes weights in place or trains them (copy_model may share)."""
    return cfg.rank_search is None and calibration is None and not cfg.fuse_inference


def unshare(model: nn.Module, original: nn.Module) -> int:
    """Give every parameter/buffer of `model` whose storage is `original`'s its own copy (ties kept).

    Returns how many tensors were copied. compile() ends with it, so the model it returns never
    shares memory with the caller's, whatever copy_model shared."""
    theirs = {t.untyped_storage().data_ptr() for t in list(original.parameters()) + list(original.buffers())
              if t.device.type != "meta" and not nn.parameter.is_lazy(t) and t.untyped_storage().nbytes() > 0}
    if not theirs:
        return 0
    done: dict = {}
    for m in model.modules():
        for table, make in ((m._parameters, lambda t: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)),
                            (m._buffers, lambda t: t.detach().clone())):
            for k, t in table.items():
                if t is None or t.device.type == "meta" or t.untyped_storage().data_ptr() not in theirs:
                    continue
                if id(t) not in done:
                    done[id(t)] = make(t)
                table[k] = done[id(t)]
    return len(done)


def build_passes(ctx: CompileContext, gm: Optional[nn.Module] = None) -> list:
    """The pass list for a config (and the traced model `gm`): [layer_calls], shape_prop, [calibration_stats],
    decompose, [allocate], [search_ranks], [calibrate], [materialize], [guard], [freeze], [fuse], [check_speed]."""
    from .passes.decompose import decompose
    from .passes.layer_calls import layer_calls, wants_layer_calls
    from .passes.shape_prop import shape_prop
    calibrated = ctx.calibration is not None
    passes = []
    if ctx.config.decompose_linear and gm is not None and wants_layer_calls(gm, ctx.model):
        passes.append(layer_calls(ctx))   # F.linear(x, layer.weight, b) -> layer(x) + b
    passes.append(shape_prop(ctx))
    if calibrated:   # data-aware factorization (compile(..., calibration=batches))
        from .passes.calibrate import calibrate, calibration_stats
        passes.append(calibration_stats(ctx))
    passes.append(decompose(ctx))
    if calibrated and ctx.config.calibrate.allocate == "sensitivity" and not ctx.empty_init:
        from .passes.allocate import allocate   # ranks shared by output sensitivity, before search/fit
        passes.append(allocate(ctx))
    if ctx.config.rank_search is not None:
        from .passes.search_ranks import search_ranks
        passes.append(search_ranks(ctx))
    if calibrated:
        passes.append(calibrate(ctx))
    from .passes.materialize import defers, materialize
    if defers(ctx):   # decompose left chains pending: factorize what the passes above did not fill
        passes.append(materialize(ctx))
    from .passes.guard import guard, wants_guard
    if wants_guard(ctx.config) and ctx.example_inputs is not None and not ctx.empty_init:
        passes.append(guard(ctx))   # before gates and fusion: they apply to the layers it keeps
    if ctx.config.freeze is not None:
        from .passes.freeze import freeze
        passes.append(freeze(ctx))
    if ctx.config.fuse_inference:
        from .passes.fuse import fuse as fuse_pass
        passes.append(fuse_pass(ctx))
    from .passes.check_speed import check_speed, wants_check
    if wants_check(ctx.config):    # last: it times the model every other pass made
        passes.append(check_speed(ctx))
    return passes


def outside_inference_mode(fn):
    """Run `fn` with torch.inference_mode off. Tensors made under inference mode can never join autograd,
    so a model compiled (loaded, fused) inside `with torch.inference_mode():` would get factor weights,
    and copies of its other weights, that fail the first forward outside it with grad on ("Inference
    tensors cannot be saved for backward"): training, or an eval forward whose weights require grad."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


@outside_inference_mode
def fuse(model: nn.Module, *, debug: bool = False) -> nn.Module:
    """An inference-only copy of `model` (eval mode): freezing gates and no-op nodes (Identity, eval
    dropout) dropped, BatchNorm folded into the conv before it, adjacent linear maps with nothing between
    them merged where the merged layer is cheaper. Exact up to float rounding in eval mode; running the
    copy in train mode raises ConfigError. Takes a model from lrd_fx.compile (or any model: it is traced
    first). The given model is not changed."""
    from .freezing import is_gated
    from .passes.fuse import fuse as fuse_pass
    from .passes.gates import strip_gates
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fuse() takes a torch.nn.Module, got {type(model).__name__}")
    work = strip_gates(model) if is_gated(model) else copy_model(model)
    if not graph_modules(work):
        install_output_recorders(work)
        work = trace(work, fallback=True)
    info = getattr(work, "lrd", None)
    if isinstance(info, LRDInfo):
        info.notes = list(info.notes)      # the copy's own list: the given model's notes stay as they were
        # the copy's config says what it is now: fused, without gates (save/load rebuild from it)
        info.config = dataclasses.replace(info.config, fuse_inference=True, freeze=None)
        info.freezer = None
    notes = info.notes if isinstance(info, LRDInfo) else None
    pm = PassManager([fuse_pass(None, notes=notes)], instruments=default_instruments(debug, None))
    fused = pm.run(work).graph_module
    mark_graph_holders(fused)
    from .fastcalls import fast_module_calls_
    fast_module_calls_(fused)
    fix_graph_part_protocols_(fused)
    return fused


@outside_inference_mode
def compile(model: nn.Module, example_inputs=None, *, config: Optional[Config] = None, calibration=None,
            **overrides) -> nn.Module:
    """Trace `model`, factorize its Conv/Linear layers and return a GraphModule with `.lrd`.

    The caller's model is never mutated: a deep copy is traced and rewritten. Every Config field can be
    given as a keyword, and so can the flat shorthand of the sub-configs (e.g. ratio=0.25,
    rank_search="infer", rank_search_window=0.3, freeze="sequential", freeze_period=2, debug=True).
    calibration: a few input batches (tensors, (x, y) tuples or dicts of keyword inputs): factors are
    then fitted to each layer's output error on them, and BatchNorm statistics re-estimated.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, Config):
        raise ConfigError(f"config must be an lrd_fx.Config, got {type(config).__name__}")
    cfg = (config or Config()).replace(**overrides)
    if isinstance(calibration, Calibration):
        raise ConfigError("calibration= takes the calibration batches; give the options as calibrate="
                          "lrd_fx.Calibration(...) (or calibration_mode=, calibration_damping=, "
                          "calibration_token_mask=, recalibrate_bn=)")
    if calibration is None and cfg.calibrate.allocate != "uniform":
        raise ConfigError(f"calibration_allocate={cfg.calibrate.allocate!r} measures each layer's effect on the "
                          f"model's output on calibration data: pass calibration=batches too")
    inputs = _as_tuple(example_inputs, model)
    if cfg.rank_search is not None and inputs is None:
        raise ConfigError("rank_search needs example_inputs: the layers are timed at their real input shapes")
    if cfg.whole_model_guard and inputs is None:
        raise ConfigError("whole_model_guard=True needs example_inputs: the whole model is timed on them")
    if inputs is not None and (cfg.rank_search is not None or cfg.whole_model_check or cfg.whole_model_guard):
        _check_not_empty(inputs)      # both time the model on these inputs
    _check_model(model, cfg, inputs)
    device, dtype = _model_device_dtype(model)
    batches = None
    if calibration is not None:
        from .passes.calibrate import calibration_batches
        batches = calibration_batches(calibration)
    from .cost.timer import active_amp, no_autocast
    amp = active_amp(device)   # the caller's precision: the rank search times in it

    def new_ctx() -> CompileContext:
        ctx = CompileContext(config=cfg, model=model, example_inputs=inputs, device=device, dtype=dtype)
        ctx.calibration, ctx.autocast = batches, amp
        return ctx

    with no_autocast(device):   # the passes' own math (factorization) stays in full precision
        # Conv/Linear weights are shared with `model` (read only) until _run's unshare: peak memory
        return copy_and_run(model, new_ctx, share_layer_weights=_shares_nothing_written(cfg, calibration))


# compile and load trace the model again at most this many times, each time keeping eager one more part
# whose traced graph failed on the example inputs (PartFailed)
MAX_RETRACES = 8


def copy_and_run(model: nn.Module, new_ctx, *, share_layer_weights: bool = False,
                 kept_eager: Optional[dict] = None) -> nn.Module:
    """copy_model, _early_check and _run on the copy, with the context new_ctx() makes (its config, inputs,
    device and dtype).

    fx traces a part called apart (under a parent that does not trace) without its call's values, so its
    graph can take a branch its real call does not (a parameter that defaults to None traced as given:
    Hugging Face MobileBERT's embeddings). When shape_prop finds a part's graph failing on the inputs while
    the eager model runs them (PartFailed), the model is copied and traced again with that part kept eager
    (its children traced apart; the reason in the report's kept-eager parts), at most MAX_RETRACES times.
    The other traced parts of the same class are kept eager with it (the same code traced the same way:
    BEiT's 12 blocks, each traced apart with an argument that is None, would otherwise take 12 retraces).
    kept_eager: such parts known already ({path: reason}; load() takes them from the file, so a model
    loaded without example inputs is rebuilt the same way).
    """
    kept: dict[str, str] = dict(kept_eager or {})
    retraces = 0
    while True:
        ctx = new_ctx()
        work = copy_model(model, share_layer_weights=share_layer_weights)
        install_output_recorders(work)
        # torch.nn's attention and transformer layers get stand-ins whose projections factorize
        use = ctx.config.decompose_linear and not ctx.stand_ins_off
        ctx.stand_ins = use_stand_ins_(work, ctx.stand_ins, ctx.config.leaf_modules) if use else []
        _note_stand_ins(work, ctx)
        # timm's weight-standardized convolutions run as plain ones holding the standardized weight
        ctx.std_convs = use_plain_convs_(work, ctx.config.leaf_modules) if ctx.config.decompose_conv else {}
        counted = _early_check(work, ctx.config, ctx.example_inputs, ctx.device, ctx.dtype)
        try:
            return _run(work, ctx, counted, kept)
        except PartFailed as e:
            same = _same_class_parts(model, work, e.part)
            del work
            where = e.part or "<root>"
            differs = e.reason.startswith((DIFFERS, NEEDS_GIVEN))   # a reason of its own, not a failure on the inputs
            what = (f": {e.reason}" if differs else
                    f" fails on example_inputs although the model runs eagerly on them ({e.reason})")
            if not ctx.config.fallback:
                raise TraceError(
                    f"traced part '{where}'{what}: its graph is not what its real call runs. Allow "
                    f"fallback=True to keep it eager, or mark it a leaf (leaf_modules=[...])") from e
            if e.part in kept or retraces >= MAX_RETRACES:
                raise TraceError(
                    f"the traced model fails on example_inputs although the model runs eagerly on them: traced "
                    f"part '{where}': {e.reason} (parts kept eager for this already: {sorted(kept) or 'none'}). "
                    f"Mark that module a leaf (leaf_modules=[...]) so it is not traced, and please report it"
                ) from e
            retraces += 1
            why = (e.reason[:240] if differs else
                   f"its traced graph failed on the example inputs, which the module runs eagerly ({e.reason[:160]})")
            kept[e.part] = f"kept eager: {why}"
            for path in same:
                kept.setdefault(path, f"kept eager like '{where}', a module of the same class ({why[:160]})")


def _note_quant_stubs(work: nn.Module, ctx: CompileContext) -> None:
    """A report note where the model carries eager-mode quantization markers (torchvision's quantizable
    models): traced, QuantStub/DeQuantStub are the identity and FloatFunctional's add a torch.add, so
    torch.ao.quantization.prepare/convert of the compiled model would hand float tensors to quantized layers."""
    from torch.ao.nn.quantized import FloatFunctional
    from torch.ao.quantization import DeQuantStub, QuantStub
    kinds = sorted({type(m).__name__ for m in work.modules() if isinstance(m, (QuantStub, DeQuantStub, FloatFunctional))})
    if kinds:
        ctx.notes.append(f"the model has eager-mode quantization markers ({', '.join(kinds)}), which the traced "
                         f"graph runs as float ops: quantize the compiled model in FX mode "
                         f"(torch.ao.quantization.quantize_fx.prepare_fx / convert_fx), not with "
                         f"torch.ao.quantization.prepare / convert")


def _note_stand_ins(work: nn.Module, ctx: CompileContext) -> None:
    from .moe import BatchedExperts, Experts
    experts = [p for p in ctx.stand_ins if isinstance(work.get_submodule(p), Experts)]
    attention = [p for p in ctx.stand_ins if p not in experts]
    if attention:
        ctx.notes.append(f"{len(attention)} nn.MultiheadAttention module(s) ('{attention[0]}', ...) run as "
                         f"lrd_fx.torch_modules.MultiheadAttention, their projections as layers (in_proj, "
                         f"out_proj) that can be factorized")
    if experts:
        m = work.get_submodule(experts[0])
        how = ("each expert runs its slice of the tokens" if isinstance(m, BatchedExperts) else
               "the experts run in a loop over those the router picked")
        ctx.notes.append(f"{len(experts)} mixture-of-experts module(s) ('{experts[0]}', {m.experts_class.rpartition('.')[2]}, "
                         f"{len(m.down_proj)} experts) run as lrd_fx.moe.{type(m).__name__}: each expert's projections "
                         f"are layers ({m._up_name}.<expert>, down_proj.<expert>) that can be factorized, and {how}")


def _same_class_parts(model: nn.Module, work: nn.Module, part: str) -> list[str]:
    """The paths of `work`'s traced parts other than `part` whose module in `model` has part's class."""
    try:
        cls = type(model.get_submodule(part) if part else model)
    except AttributeError:
        return []
    out = []
    for prefix, _ in graph_modules(work):
        path = prefix[:-1]
        if path == part:
            continue
        try:
            m = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if type(m) is cls:
            out.append(path)
    return out


def _early_check(work: nn.Module, cfg: Config, inputs: Optional[tuple], device, dtype) -> Optional[tuple]:
    """The input checks before tracing: device and dtype always (with check_inputs), a forward only where lazy
    layers need one (its (FLOPs, error), else None: shape_prop's forward checks the shapes and counts)."""
    if inputs is None or not cfg.check_inputs:
        return None
    _check_input_types(inputs, device, dtype)
    return _check_inputs(work, inputs, device, dtype) if _lazy_layers(work) else None


# A Hugging Face model's root takes, at call time, keyword options that the example inputs leave None
# (labels=, output_hidden_states=, output_attentions=, return_dict=). One graph would have the None branch of
# each only, and every call giving one would be an InputError (a Trainer's first step, with labels); the
# root stays eager instead, its parts traced, as the roots of most HF models are anyway (their forward
# does not trace).
_HF_ROOT_EAGER = ("kept eager: a Hugging Face model, whose forward takes options the example inputs leave None "
                  "({names}); one graph would have their None branch only, so calls that give them "
                  "(labels=, output_hidden_states=, return_dict=) would fail")


def _run(work: nn.Module, ctx: CompileContext, counted: Optional[tuple] = None,
         keep_eager_parts: Optional[dict] = None) -> nn.Module:
    """The passes on `work` (the caller's model's copy). counted: (FLOPs, error) of the model from a
    forward of _check_inputs before tracing; without it, shape_prop's forward counts them.
    keep_eager_parts: {module path: reason} kept eager by trace (copy_and_run's retries)."""
    cfg = ctx.config
    ctx.params_before = sum(p.numel() for p in work.parameters()) + folded_params(ctx.std_convs)
    if ctx.example_inputs is not None:
        if counted is not None:
            ctx.flops_before = _flops_or_note(work, ctx, "before compiling", counted)
        else:
            ctx.count_flops = True
        if cfg.check_inputs:
            # an eager copy of the caller's model (weights shared, read only; `work` is traced in place), for
            # the input check and shape_prop's check of the traced parts; with lazy layers, of `work` before
            # tracing: the weights the forward before tracing gave them, not new ones
            if _lazy_layers(ctx.model):
                reference = copy_model(work, share_layer_weights=True)
                ctx.reference = lambda: reference
            else:
                ctx.reference = lambda: copy_model(ctx.model, share_layer_weights=True)
            ctx.input_check = lambda: _check_inputs(ctx.reference(), ctx.example_inputs, ctx.device, ctx.dtype)
    eager: set = set()
    leaves = tuple(cfg.leaf_modules)
    none, defaults = _left_out_inputs(work, ctx.example_inputs)
    if ctx.traced_none is None:
        ctx.traced_none = none
    if ctx.traced_defaults is None:
        ctx.traced_defaults = defaults
    kept = dict(keep_eager_parts or {})
    if ctx.traced_none and is_hf_model(work) and "" not in kept:
        names = ", ".join(ctx.traced_none[:4]) + (", …" if len(ctx.traced_none) > 4 else "")
        kept[""] = _HF_ROOT_EAGER.format(names=names)
    _note_quant_stubs(work, ctx)
    gm = trace(work, leaf_modules=leaves, fallback=cfg.fallback, fallback_parts=ctx.fallback_parts,
               eager_parts=eager, concrete_args=dict.fromkeys(ctx.traced_none), keep_eager_parts=kept,
               defaults=ctx.traced_defaults)
    ctx.traced_defaults = traced_defaults(gm)      # those that were fixed
    if ctx.traced_defaults:
        ctx.notes.append(f"input(s) {', '.join(f'{k}={v!r}' for k, v in ctx.traced_defaults.items())} left out of "
                         f"example_inputs: traced at that default, which the model's code branches on (a call "
                         f"giving another value is an InputError; give it in example_inputs to compile for it)")
    ctx.eager_parts = eager
    ctx.kept_eager = kept
    ctx.retrace = True         # copy_and_run traces again when shape_prop finds a part's graph failing
    timer = PassTimer()
    pm = PassManager(build_passes(ctx, gm), instruments=default_instruments(cfg.debug, cfg.dump_dir) + [timer])
    gm = pm.run(gm).graph_module
    ctx.pass_times.update(timer.times)
    ctx.input_check = ctx.reference = None
    if ctx.count_flops:
        ctx.flops_before = _flops_or_note(work, ctx, "before compiling", ctx.flops_counted or (None, "not counted"))
    if ctx.example_inputs is not None and ctx.flops_before is not None:
        ctx.flops_after = _flops_after(gm, ctx)
    ctx.originals.clear()
    from .moe import restore_unfactorized_
    restore_unfactorized_(gm, ctx)
    restore_std_convs_(gm, ctx)
    mark_graph_holders(gm)     # a forward hook registered later on a block the graph does not call warns
    unshare(gm, ctx.model)     # layers kept as they were get their own weights (copy_model may have shared them)
    from .fastcalls import fast_module_calls_
    fast_module_calls_(gm)     # module calls without nn.Module.__getattr__ (after the passes: their dumps stay plain)
    gm.lrd = LRDInfo(gm, ctx)
    fix_graph_part_protocols_(gm)
    _refuse_resizing_a_factorized_head(gm)
    if not _warn_if_nothing_factorized(ctx):
        _warn_if_mostly_outside(gm.lrd, ctx)
    return gm


def _refuse_resizing_a_factorized_head(gm: nn.Module) -> None:
    """transformers' `resize_token_embeddings` resizes the input embeddings first, then fails on a factorized
    LM head ("Old language model head is of type FactorChain"), leaving the model half resized: on such a
    model an instance attribute refuses it before anything changes, saying what to do."""
    from .factorize.chain import FactorChain
    from .trace import RefusedMethod
    if not is_hf_model(gm) or not callable(getattr(gm, "resize_token_embeddings", None)):
        return
    try:
        head = gm.get_output_embeddings()
    except Exception:  # noqa: BLE001 - a model without output embeddings, or one that cannot tell
        return
    if isinstance(head, FactorChain):
        name = next((n for n, m in gm.named_modules() if m is head), "lm_head")
        gm.resize_token_embeddings = RefusedMethod(
            f"resize_token_embeddings: the LM head '{name}' of this compiled model is factorized (a FactorChain), "
            f"which transformers cannot resize. Resize the original model's embeddings, then compile it; or "
            f"compile with skip=['{name}'] to keep the head a Linear layer")


def _warn_if_nothing_factorized(ctx: CompileContext) -> bool:
    """A UserWarning when the model has Conv/Linear layers and every one was skipped (none factorized, none
    reverted by timing): the returned model computes what the original does, which the caller would not
    otherwise notice; the warning gives the most common reason. Returns whether it warned."""
    from .plan import SKIPPED
    recs = list(ctx.records.values())
    if not recs or ctx.empty_init or any(r.decision != SKIPPED for r in recs):
        return False
    reasons = collections.Counter(r.reason for r in recs)
    reason, n = reasons.most_common(1)[0]
    warn(f"lrd_fx.compile factorized none of the model's {len(recs)} Conv/Linear layers ({n} of them: {reason}); "
         f"the model is returned as it was, see model.lrd.report()")
    return True


# compile warns when at least this share of the model's parameters sits outside Conv/Linear layers
MOSTLY_OUTSIDE = 0.5


def _warn_if_mostly_outside(info: LRDInfo, ctx: CompileContext) -> None:
    """A UserWarning when most of the model's parameters are outside Conv/Linear layers (a mixture of
    experts' 3-D expert tensors, a large embedding), so that the model shrinks far less than the rank rule
    says: naming where they are, which the caller would otherwise find only in the report."""
    n, rows = info.outside
    total = info.params_before
    if ctx.empty_init or not rows or not total or n < MOSTLY_OUTSIDE * total:
        return
    from .report import describe_outside
    warn(f"lrd_fx.compile: {n / total:.0%} of the model's parameters are outside Conv/Linear layers and are left "
         f"as they are ({describe_outside(rows, total, 2)}), so the model keeps {info.params_after / total:.2f}x "
         f"its parameters; see model.lrd.report()")


# save() and load() live in serialize.py (a file format that cannot run code); re-exported here.
from .serialize import load, save  # noqa: E402,F401  (imported last: serialize uses this module)
