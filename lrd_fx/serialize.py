"""save() and load(): a compiled model as one safetensors file whose header holds the plan and config as JSON."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import typing
from typing import Any, Optional

import torch
import torch.nn as nn

from . import api
from .config import Config, Freeze
from .context import CompileContext
from .errors import InputError, LoadError, LRDError, SaveError
from .plan import DECOMPOSED, REVERTED, SEARCHED, SKIPPED, LayerRecord
from .trace import FIXABLE_DEFAULTS

FORMAT = "lrd_fx/2"
FORMAT_VERSION = 2
_HEADER = "lrd_fx"                   # safetensors metadata key holding the JSON header
_MAX_HEADER = 100 * 1024 * 1024      # safetensors' own limit on the header size

# Config fields load() takes from a file: they decide how the saved architecture is rebuilt (tracing,
# chain scheme, gates, fusion). Every other saved field is informational only: the plan fixes the ranks,
# and nothing that names a path (dump_dir, cache) or prints (debug, progress) is ever taken from a file.
_REBUILD_FIELDS = ("conv_scheme", "min_channels", "decompose_linear", "decompose_conv", "decompose_grouped",
                   "fallback", "fuse_inference")

# Options the caller may give to load(): none of them changes the saved ranks or decisions. The first
# four are never read from a file (paths and printing); the freezing and leaf options are, unless given.
_CALLER_OPTIONS = ("debug", "progress", "dump_dir", "check_inputs")
LOAD_OPTIONS = _CALLER_OPTIONS + ("freeze", "freeze_period", "freeze_group", "leaf_modules")

# LayerRecord fields recomputed by the rebuild; the others (decision, reason, timings...) come from the file.
_REBUILT_RECORD_FIELDS = {"name", "kind", "scheme", "full_ranks", "ranks", "params_before", "params_after",
                          "fallback", "in_shape", "out_shape", "flops_before", "flops_after"}
_DECISIONS = (DECOMPOSED, SEARCHED, REVERTED, SKIPPED)


# ---------------------------------------------------------------------------------------------------
# save

def save(gm: nn.Module, path) -> None:
    """Write a compiled model to `path` (any name or suffix): one safetensors file holding every tensor of
    the state_dict once, and in its header, as JSON, the format, lrd_fx and torch versions, the plan, the
    config and the freezing schedule. The file holds no code: lrd_fx.load reads it without unpickling."""
    info = getattr(gm, "lrd", None)
    if not isinstance(info, api.LRDInfo):
        raise SaveError("save() takes a model returned by lrd_fx.compile or lrd_fx.load (it has no .lrd)")
    target = _save_path(path)
    header = {
        "format": FORMAT,
        "lrd_fx_version": _lrd_fx_version(),
        "torch_version": torch.__version__,
        "plan": info.plan,
        "freeze": _freeze_spec(gm, info.config),
    }
    # lrd_fx.fuse(gm) after compile leaves fuse_inference=True in the fused copy's config
    header["config"], header["config_not_saved"] = _config_dict(info.config)
    tensors, aliases = _distinct_tensors(gm.state_dict())
    header["aliases"] = aliases
    header["freezer_keys"] = _freezer_keys(gm)
    header["kept_eager"] = dict(getattr(info, "kept_eager", {}))
    header["traced_none"] = list(getattr(info, "traced_none", []))
    header["traced_defaults"] = dict(getattr(info, "traced_defaults", {}))
    header["stand_ins"] = list(getattr(info, "stand_ins", []))
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as e:
        raise SaveError(f"the plan of this model cannot be written as JSON ({e}); this is an lrd_fx bug: "
                        f"please report it") from e
    from safetensors.torch import save_file
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        # write beside the target, then rename: an interrupted save never leaves half a file at `path`
        save_file(tensors, tmp, metadata={"format": FORMAT, _HEADER: text})
        os.replace(tmp, target)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SaveError(f"cannot write '{target}': {type(e).__name__}: {e}") from e


def _save_path(path) -> str:
    try:
        target = os.fspath(path)
    except TypeError:
        raise SaveError(f"save() needs a file path (str or os.PathLike), got {type(path).__name__}") from None
    if isinstance(target, bytes):
        target = os.fsdecode(target)
    if os.path.isdir(target):
        raise SaveError(f"'{target}' is a directory; give save() a file name, e.g. '{os.path.join(target, 'model.lrd')}'")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        # no directory is created on the caller's behalf: a typo in a path should fail, not spread files
        raise SaveError(f"cannot save to '{target}': the directory '{parent}' does not exist; create it first "
                        f"(os.makedirs('{parent}', exist_ok=True))")
    return target


def _lrd_fx_version() -> str:
    from . import __version__
    return __version__


def _config_dict(cfg) -> tuple[dict, list]:
    """The config as JSON, generically: a dataclass becomes {field: value}, a sub-config (RankSearch,
    Freeze, ...) a nested dict, recursively. Values JSON cannot hold (functions, classes, tensors: their
    effect is in the plan) are left out and their dotted names listed. Leaf module classes are written by
    qualified name ("leaf_classes"), so that load() can check the caller passes the same ones again; the
    freezing schedule the model runs is saved apart (_freeze_spec)."""
    left: list[str] = []
    out = _as_json(cfg, "", left)
    leaves = tuple(cfg.leaf_modules)
    out["leaf_modules"] = [x for x in leaves if isinstance(x, str)]              # qualified module names
    out["leaf_classes"] = [_leaf_name(x) for x in leaves if not isinstance(x, str)]
    return out, [n for n in left if n != "leaf_modules"]


_LEFT_OUT = object()


def _as_json(v, path: str, left: list):
    """`v` as JSON data (a dataclass as {field: value}, recursively), or _LEFT_OUT with `path` noted in
    `left` when JSON cannot hold it."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        out = {}
        for f in dataclasses.fields(v):
            got = _as_json(getattr(v, f.name), f"{path}.{f.name}" if path else f.name, left)
            if got is not _LEFT_OUT:
                out[f.name] = got
        return out
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        left.append(path)
        return _LEFT_OUT
    return v


def _leaf_name(x) -> str:
    return x if isinstance(x, str) else f"{getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', repr(x))}"


def _freeze_spec(gm: nn.Module, cfg: Config) -> Optional[dict]:
    """The freezing schedule as a registered name + period/group, from the model's controller (which
    may have been switched with set_schedule since compile). A schedule that has no registered name
    cannot be written: a file holds no code."""
    from .freezing import (CallableSchedule, SequentialSchedule, StaticSchedule, find_freezer, make_schedule,
                           schedule_names)
    freezer = find_freezer(gm)
    if freezer is None:
        return None
    sched = freezer.schedule
    opts = cfg.freeze or Freeze()   # the header keeps the flat keys of format 2 (freeze_period, freeze_group)
    if type(sched) is SequentialSchedule:
        return {"schedule": "sequential", "freeze_period": sched.period, "freeze_group": opts.group}
    if type(sched) is StaticSchedule:
        return {"schedule": "static", "freeze_period": opts.period, "freeze_group": sched.group}
    name = opts.schedule if isinstance(opts.schedule, str) else getattr(sched, "name", None)
    if isinstance(name, str) and name in schedule_names() and not isinstance(sched, CallableSchedule):
        try:
            same = type(make_schedule(name, opts)) is type(sched)
        except Exception:
            same = False
        if same:
            return {"schedule": name, "freeze_period": opts.period, "freeze_group": opts.group}
    raise SaveError(
        f"cannot save the freezing schedule {sched.describe()!r}: a {type(sched).__name__} is code, and an "
        f"lrd_fx file holds none. Register it by name (@lrd_fx.register_schedule('my_schedule') on a "
        f"factory (config) -> Schedule), compile with freeze='my_schedule' (or call "
        f"gm.lrd.freezer.set_schedule('my_schedule')), then save; register it again before lrd_fx.load. "
        f"Or strip the gates first (lrd_fx.strip_gates(gm)).")


def _freezer_keys(gm: nn.Module) -> list[str]:
    from .freezing import FreezeController
    keys = []
    for mname, m in gm.named_modules():
        if isinstance(m, FreezeController):
            keys += [f"{mname}.{b}" if mname else b for b, _ in m.named_buffers(recurse=False)]
    return keys


def _distinct_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor once, on the CPU and contiguous, plus {alias key: key written}.

    safetensors refuses tensors that share memory; tied weights (one tensor under two names) are written
    once and the other names recorded as aliases. Tensors that only overlap are written as copies; load
    restores the tying the rebuilt model has."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    same: dict[tuple, str] = {}
    storages: set = set()
    for key, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise SaveError(f"state_dict entry '{key}' is a {type(v).__name__}, not a tensor; lrd_fx files hold "
                            f"tensors only")
        t = v.detach()
        if t.layout != torch.strided:
            raise SaveError(f"state_dict entry '{key}' is a {t.layout} tensor; convert it to dense (.to_dense()) "
                            f"before saving")
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            ident = (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in same:
                aliases[key] = same[ident]
                continue
            same[ident] = key
            shared = (t.device, ptr) in storages
            storages.add((t.device, ptr))
            whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
            t = t.to("cpu")
            if shared or not whole or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
        else:
            t = t.to("cpu").clone(memory_format=torch.contiguous_format)
        tensors[key] = t
    return tensors, aliases


# ---------------------------------------------------------------------------------------------------
# load

@api.outside_inference_mode
def load(model: nn.Module, path, example_inputs=None, *, trust_file: bool = False, **overrides) -> nn.Module:
    """Rebuild the compiled model saved at `path` from the original `model`: same ranks, same reverts,
    weights from the file. Nothing is re-searched or re-factorized, and the caller's model is not mutated.

    Reads only JSON and safetensors: no code in a file runs, and no path or printing option is taken from
    it. `overrides` may be only options that leave the saved architecture alone (LOAD_OPTIONS): debug,
    progress, dump_dir, check_inputs, freeze / freeze_period / freeze_group, leaf_modules. trust_file=True
    is the escape hatch for files of the old pickle format (lrd_fx/1): it unpickles them, which runs any
    code they hold; use it only on files you wrote yourself, then lrd_fx.save the model again.
    """
    if not isinstance(model, nn.Module):
        raise LoadError(f"load() takes the original torch.nn.Module first (the model compile was given), got "
                        f"{type(model).__name__}")
    if isinstance(getattr(model, "lrd", None), api.LRDInfo):
        raise LoadError("load() takes the original model (the one given to lrd_fx.compile), not a compiled one: "
                        "the file's plan is applied to a copy of the original")
    if not isinstance(trust_file, bool):
        raise LoadError(f"trust_file={trust_file!r} must be True or False (True unpickles old-format files: "
                        f"only for files you wrote yourself)")
    _check_overrides(overrides)
    where = _fspath(path)
    header, tensors = _read(where, trust_file)
    plan = _parse_plan(header, where)
    cfg = _rebuild_config(header, plan, overrides, where)
    inputs = api._as_tuple(example_inputs, model)
    device, dtype = api._model_device_dtype(model)
    # without example inputs, the inputs compile traced as None; with them, those they leave None (the
    # plan and weights fit either graph: compiled with labels for training, loaded with (x,) for inference)
    traced_none = _traced_none(header, where, model) if inputs is None else None
    traced_defaults = _traced_defaults(header, where, model) if inputs is None else None
    stand_ins = _stand_ins(header, where)

    def new_ctx() -> CompileContext:
        ctx = CompileContext(config=cfg, model=model, example_inputs=inputs, device=device, dtype=dtype)
        ctx.empty_init = True     # the factors are filled from the file, not factorized
        ctx.traced_none = traced_none
        ctx.traced_defaults = traced_defaults
        ctx.stand_ins = stand_ins
        ctx.stand_ins_off = stand_ins is None
        return ctx

    try:
        gm = api.copy_and_run(model, new_ctx, kept_eager=_kept_eager(header, where))
    except InputError:
        raise                 # the example inputs do not fit the model (shape_prop's forward failed on them)
    except LRDError as e:
        raise LoadError(f"the model does not match the plan in '{where}': {e}; load onto the model the file "
                        f"was compiled from") from e
    missing = sorted(set(stand_ins or ()) - set(gm.lrd.stand_ins))
    if missing:
        raise LoadError(f"'{where}' was compiled from a model with an nn.MultiheadAttention or mixture-of-experts "
                        f"module at '{missing[0]}', which the given model does not have (or has hooks on); load "
                        f"onto the model the file was compiled from")
    _check_rebuilt(gm, plan, where)
    _load_weights(gm, header, tensors, where)
    _restore_records(gm, plan)
    gm.lrd.notes.append(f"loaded from '{where}' ({header.get('format')}, saved by lrd_fx "
                        f"{header.get('lrd_fx_version', '?')}, torch {header.get('torch_version', '?')})")
    return gm


def _traced_none(header: dict, where: str, model: nn.Module) -> Optional[list]:
    """The root forward parameters compile traced as None (the graph has only their None branch), so that
    a model loaded without example inputs is the graph that was saved. None for files written before
    they were saved (every input is then traced as given)."""
    names = header.get("traced_none")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LoadError(f"'{where}': the header's traced_none entry is not a JSON list of strings; the file is damaged")
    _check_inputs_known(names, model, where)
    return names


def _traced_defaults(header: dict, where: str, model: nn.Module) -> dict:
    """{input: default} compile fixed in the root's graph ({} for files written before they were saved: the
    inputs are then left open, as they were traced then)."""
    values = header.get("traced_defaults", {})
    if not isinstance(values, dict) or not all(isinstance(k, str) and type(v) in FIXABLE_DEFAULTS
                                               for k, v in values.items()):
        raise LoadError(f"'{where}': the header's traced_defaults entry is not a JSON object of names to "
                        f"booleans, numbers or strings; the file is damaged")
    _check_inputs_known(values, model, where)
    return values


def _check_inputs_known(names, model: nn.Module, where: str) -> None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    unknown = [n for n in names if n not in params]
    if params and unknown:
        raise LoadError(f"'{where}' was compiled from a model whose forward takes {unknown[0]!r}, which "
                        f"{type(model).__name__}.forward does not; load onto the model the file was compiled from")


def _stand_ins(header: dict, where: str) -> Optional[list]:
    """The paths of the nn.MultiheadAttention and mixture-of-experts modules compile gave stand-ins
    (torch_modules, moe). None for files written before them: those models are rebuilt with the original
    modules, as they were saved."""
    paths = header.get("stand_ins")
    if paths is None:
        return None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise LoadError(f"'{where}': the header's stand_ins entry is not a JSON list of strings; the file is damaged")
    return paths


def _kept_eager(header: dict, where: str) -> dict:
    """The header's {module path: reason} of parts compile kept eager because their traced graph failed
    on its inputs ({} in files written before it was saved)."""
    kept = header.get("kept_eager", {})
    if not isinstance(kept, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in kept.items()):
        raise LoadError(f"'{where}': the header's kept_eager entry is not a JSON object of strings; the file is damaged")
    return kept


def _check_overrides(overrides: dict) -> None:
    fields = set(Config.option_names())
    for name in overrides:
        if name in LOAD_OPTIONS:
            continue
        if name in fields:
            raise LoadError(
                f"load() does not take {name}=: the file fixes every layer's ranks and decisions, and load "
                f"rebuilds exactly those (nothing is re-ranked or re-searched). To use {name}=, compile the "
                f"original model again: lrd_fx.compile(model, inputs, {name}=...). load() accepts: "
                f"{', '.join(LOAD_OPTIONS)}, trust_file")
        if name == "calibration":
            raise LoadError("load() does not take calibration=: the file holds the fitted weights and load "
                            "factorizes nothing; to fit to other data, compile the original model again")
        raise LoadError(f"load() got an unknown option {name}=; it accepts: {', '.join(LOAD_OPTIONS)}, trust_file")


def _fspath(path) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        raise LoadError(f"load() needs a file path (str or os.PathLike), got {type(path).__name__}") from None
    return os.fsdecode(p) if isinstance(p, bytes) else p


def _is_zip(head: bytes) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _is_pickle(head: bytes) -> bool:
    # protocol 2+ pickles (torch.save's legacy format included) open with PROTO <version>
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unsafe_message(where: str, head: bytes) -> str:
    kind = "a torch.save zip archive" if _is_zip(head) else "a pickle"
    return (f"'{where}' is {kind}: the old lrd_fx save format (lrd_fx/1) or a plain torch.save file. Loading it "
            f"would unpickle it, which runs any code it holds, so lrd_fx does not open it. If you wrote this "
            f"file yourself, convert it once: gm = lrd_fx.load(model, '{where}', trust_file=True); "
            f"lrd_fx.save(gm, 'new_file') — the new file (format {FORMAT}) holds no code. Never pass "
            f"trust_file=True for a file someone else gave you.")


def _read(where: str, trust_file: bool) -> tuple[dict, dict]:
    """(header, {key: tensor}) from a file, without unpickling unless trust_file."""
    if not os.path.exists(where):
        raise LoadError(f"no such file: '{where}'")
    if os.path.isdir(where):
        raise LoadError(f"'{where}' is a directory, not an lrd_fx file")
    if not os.path.isfile(where):        # a FIFO or a device: reading it could block or never end
        raise LoadError(f"'{where}' is not a regular file (a pipe or a device), not an lrd_fx file")
    size = os.path.getsize(where)
    try:
        with open(where, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            first = f.read(1)
            raw = first + f.read(n - 1) if first == b"{" and 0 < n <= _MAX_HEADER else b""
    except OSError as e:
        raise LoadError(f"cannot read '{where}': {e}") from e
    looks_safetensors = first == b"{" and 0 < n <= _MAX_HEADER
    if looks_safetensors and 8 + n <= size:
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            meta = None
        if isinstance(meta, dict):
            return _read_safetensors(where, meta, size, n)
    if _is_zip(head) or _is_pickle(head):
        if trust_file:
            return _read_trusted(where)
        raise LoadError(_unsafe_message(where, head))
    if looks_safetensors and 8 + n > size:
        raise LoadError(f"'{where}' is truncated: its header alone needs {8 + n} bytes, the file has {size}; "
                        f"save the model again")
    if size == 0:
        raise LoadError(f"'{where}' is empty, not an lrd_fx file (written by lrd_fx.save)")
    raise LoadError(f"'{where}' is not an lrd_fx file: it is not in the safetensors format lrd_fx.save writes "
                    f"(format {FORMAT})")


def _read_safetensors(where: str, meta: dict, size: int, n: int) -> tuple[dict, dict]:
    info = meta.get("__metadata__")
    if not isinstance(info, dict) or _HEADER not in info:
        raise LoadError(f"'{where}' is a safetensors file but not one written by lrd_fx.save (it has no lrd_fx "
                        f"header); for plain weights use model.load_state_dict(safetensors.torch.load_file(path))")
    try:
        header = json.loads(info[_HEADER])
    except (TypeError, ValueError, RecursionError) as e:
        raise LoadError(f"'{where}': the lrd_fx header is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(header, dict):
        raise LoadError(f"'{where}': the lrd_fx header is not a JSON object; the file is damaged")
    fmt = header.get("format", info.get("format"))
    m = re.fullmatch(r"lrd_fx/([0-9]{1,6})", fmt) if isinstance(fmt, str) else None
    if m is None:
        raise LoadError(f"'{where}' has an lrd_fx header without a valid format field ({fmt!r}); the file is damaged")
    if int(m.group(1)) > FORMAT_VERSION:
        raise LoadError(f"'{where}' has format {fmt}, newer than this lrd_fx reads ({FORMAT}); it was written by "
                        f"lrd_fx {header.get('lrd_fx_version', '?')}: upgrade lrd_fx (this is "
                        f"{_lrd_fx_version()})")
    if int(m.group(1)) < FORMAT_VERSION:
        raise LoadError(f"'{where}' claims format {fmt} in a safetensors file, which no lrd_fx writes; the file "
                        f"is damaged")
    for key in ("plan", "config"):
        if key not in header:
            raise LoadError(f"'{where}' is missing the '{key}' entry of its lrd_fx header; the file is damaged or "
                            f"was not written by lrd_fx.save")
    end = 0
    for key, entry in meta.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError, OverflowError):
            raise LoadError(f"'{where}': tensor '{key}' has no valid data offsets; the file is damaged") from None
    if 8 + n + end > size:
        raise LoadError(f"'{where}' is truncated: its tensors need {8 + n + end} bytes, the file has {size}; "
                        f"save the model again")
    from safetensors.torch import load_file
    try:
        tensors = load_file(where, device="cpu")
    except Exception as e:
        raise LoadError(f"cannot read the tensors of '{where}' ({type(e).__name__}: {e}); the file is damaged") from e
    return header, tensors


def _read_trusted(where: str) -> tuple[dict, dict]:
    """The old pickle format (lrd_fx/1), unpickled because the caller said trust_file=True."""
    try:
        blob = torch.load(where, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LoadError(f"cannot read '{where}' even with trust_file=True: {type(e).__name__}: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != "lrd_fx/1":
        raise LoadError(f"'{where}' is a pickle but not an lrd_fx/1 save file (no format 'lrd_fx/1')")
    for key in ("plan", "config", "state_dict"):
        if key not in blob:
            raise LoadError(f"'{where}' (lrd_fx/1) has no '{key}' entry; the file is damaged")
    from .freezing import FREEZER_NAME
    saved = dict(blob["config"]) if isinstance(blob["config"], dict) else {}
    sd = blob["state_dict"]
    if not is_state_dict(sd):
        raise LoadError(f"'{where}' (lrd_fx/1): its state_dict is not names -> tensors; the file is damaged")
    fkeys = [k for k in sd if k == f"{FREEZER_NAME}.current_epoch" or k.endswith(f".{FREEZER_NAME}.current_epoch")]
    spec = None
    if isinstance(saved.get("freeze"), str):
        spec = {"schedule": saved["freeze"], "freeze_period": saved.get("freeze_period", 1),
                "freeze_group": saved.get("freeze_group", "core")}
    leaves = tuple(saved.get("leaf_modules") or ())
    saved["leaf_modules"] = [x for x in leaves if isinstance(x, str)]
    saved["leaf_classes"] = [_leaf_name(x) for x in leaves if not isinstance(x, str)]
    header = {"format": "lrd_fx/1", "plan": blob["plan"], "config": saved, "freeze": spec,
              "aliases": {}, "freezer_keys": fkeys}
    return header, dict(sd)


def _parse_plan(header: dict, where: str) -> dict[str, LayerRecord]:
    raw = header["plan"]
    if not isinstance(raw, dict):
        raise LoadError(f"'{where}': the plan is not a JSON object; the file is damaged")
    plan = {}
    for name, d in raw.items():
        bad = f"'{where}': plan entry '{name}' is malformed"
        if not isinstance(d, dict):
            raise LoadError(f"{bad} (not an object); the file is damaged")
        try:
            rec = LayerRecord.from_dict({**d, "name": name})
        except TypeError as e:
            raise LoadError(f"{bad} ({e}); the file is damaged") from e
        if rec.decision not in _DECISIONS:
            raise LoadError(f"{bad}: decision {rec.decision!r} is not one of {list(_DECISIONS)}")
        for f, ok in _record_checks().items():
            if not ok(getattr(rec, f)):
                raise LoadError(f"{bad}: {f}={getattr(rec, f)!r} has the wrong type; the file is damaged")
        if rec.factorized:
            if not _int_list(rec.ranks):
                raise LoadError(f"{bad}: a factorized layer needs ranks (a list of ints >= 1), got {rec.ranks!r}")
        plan[name] = rec
    return plan


_KIND_CHECKS = {str: lambda v: isinstance(v, str), int: lambda v: _number(v), float: lambda v: _number(v),
                list: lambda v: isinstance(v, (list, tuple)), dict: lambda v: isinstance(v, dict)}


@functools.lru_cache(maxsize=None)
def _record_checks() -> dict:
    """{LayerRecord field: check of a value read from a file}, from the field's type (None allowed where
    it is Optional); the estimate must be a list of ints >= 1. name and decision are checked apart."""
    checks = {}
    for name, hint in typing.get_type_hints(LayerRecord).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        base = args[0] if optional and len(args) == 1 else hint
        check = _KIND_CHECKS.get(typing.get_origin(base) or base, lambda v: True)
        checks[name] = (lambda v, c=check: v is None or c(v)) if optional else check
    checks["estimate"] = lambda v: v is None or _int_list(v)
    for name in ("name", "decision"):
        del checks[name]
    return checks


def _int_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                                   for r in v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rebuild_config(header: dict, plan: dict[str, LayerRecord], overrides: dict, where: str) -> Config:
    saved = header["config"] if isinstance(header["config"], dict) else {}
    known = set(Config.option_names())
    kw: dict[str, Any] = {k: saved[k] for k in _REBUILD_FIELDS if k in saved and k in known}
    kw.update(_leaf_modules(saved, overrides, where))
    kw.update(_freeze_options(header.get("freeze"), bool(header.get("freezer_keys")), overrides, where))
    kw.update({k: overrides[k] for k in _CALLER_OPTIONS if k in overrides})
    ranks = {n: tuple(r.ranks) for n, r in plan.items() if r.factorized}
    keep = frozenset(ranks)
    kw.update(rank=ranks or None, rank_search=None, skip=(),
              # every layer the plan does not factorize stays as it is, whatever the rules would say
              filter_fn=lambda name, m: name in keep)
    try:
        return Config().replace(**kw)
    except LRDError as e:
        raise LoadError(f"the options for '{where}' do not apply: {e}") from e


def _leaf_modules(saved: dict, overrides: dict, where: str) -> dict:
    """leaf_modules decide what is traced, hence the layer names. Module paths come from the file; classes
    must be passed again (a file holds names, not code), and what the caller passes must match the file."""
    for key in ("leaf_modules", "leaf_classes"):
        if not isinstance(saved.get(key) or [], list):
            raise LoadError(f"'{where}': the config's {key} is not a list; the file is damaged")
    names = [x for x in saved.get("leaf_modules") or [] if isinstance(x, str)]
    classes = [x for x in saved.get("leaf_classes") or [] if isinstance(x, str)]
    given = overrides.get("leaf_modules")
    if given is None:
        if classes:
            raise LoadError(f"'{where}' was compiled with leaf_modules holding the classes {classes}: pass the "
                            f"same leaf_modules again, lrd_fx.load(model, path, leaf_modules=(...)) (a file holds "
                            f"class names, not classes)")
        return {"leaf_modules": tuple(names)} if names else {}
    try:
        given = tuple(given)
        got = sorted(_leaf_name(x) for x in given)
    except TypeError:
        raise LoadError(f"leaf_modules={given!r} must be a tuple of module classes or qualified names") from None
    if got != sorted(names + classes):
        raise LoadError(f"leaf_modules={got} differs from the file's {sorted(names + classes)}: the saved plan was "
                        f"traced with the file's; pass those")
    return {"leaf_modules": given}


def _freeze_options(spec, gated: bool, overrides: dict, where: str) -> dict:
    """freeze / freeze_period / freeze_group: the caller's, else the file's; freeze=None drops the gates."""
    from .freezing import schedule_names
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("schedule"), str)):
        raise LoadError(f"'{where}': the saved freezing schedule {spec!r} is malformed; pass freeze=... "
                        f"explicitly (a schedule name, or None for no gates)")
    saved = spec or {}
    out = {}
    if "freeze" in overrides:
        out["freeze"] = overrides["freeze"]
    elif gated and not saved:
        # an lrd_fx/1 file whose schedule was a function: the gates cannot be rebuilt without being told how
        raise LoadError(f"'{where}' has freezing gates but no saved schedule (it was a function); pass "
                        f"freeze=<schedule name, Schedule or callable> to keep gates, or freeze=None to drop them")
    elif saved:
        name = saved["schedule"]
        if name not in schedule_names():
            raise LoadError(f"'{where}' was saved with the freezing schedule '{name}', which is not registered "
                            f"here (known: {schedule_names()}); register it with lrd_fx.register_schedule("
                            f"'{name}') before load, or pass freeze='sequential' / freeze=None")
        out["freeze"] = name
    else:
        out["freeze"] = None
    for k in ("freeze_period", "freeze_group"):
        if k in overrides:
            if out["freeze"] is None:
                raise LoadError(f"{k}= applies to a freezing schedule, but this load has none ('{where}' has no "
                                f"gates and no freeze= was given); pass freeze='sequential' (or 'static') too")
            out[k] = overrides[k]
        elif k in saved and out["freeze"] is not None:
            out[k] = saved[k]
    return out


def _check_rebuilt(gm: nn.Module, plan: dict[str, LayerRecord], where: str) -> None:
    got = gm.lrd.records()
    for name, rec in plan.items():
        if not rec.factorized:
            continue
        new = got.get(name)
        if new is None or not new.factorized:
            raise LoadError(f"'{where}' factorizes layer '{name}', which the given model "
                            f"{'does not have' if new is None else 'keeps whole (' + new.reason + ')'}; "
                            f"load onto the model the file was compiled from")
        if list(new.ranks) != list(rec.ranks) or (rec.scheme and new.scheme != rec.scheme):
            raise LoadError(f"layer '{name}': the file has {rec.scheme} at ranks {rec.ranks}, the rebuild gave "
                            f"{new.scheme} at {new.ranks}; load onto the model the file was compiled from")


def _load_weights(gm: nn.Module, header: dict, tensors: dict, where: str) -> None:
    aliases = header.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise LoadError(f"'{where}': the alias table is malformed; the file is damaged")
    sd = dict(tensors)
    for alias, key in aliases.items():
        if alias in tensors:
            raise LoadError(f"'{where}': '{_short(alias)}' is both stored and recorded as the same tensor as "
                            f"'{_short(key)}'; the file is damaged")
        if key not in tensors:
            raise LoadError(f"'{where}': '{alias}' is recorded as the same tensor as '{key}', which the file lacks; "
                            f"the file is damaged")
        sd[alias] = tensors[key]
    own = gm.state_dict()
    now = set(_freezer_keys(gm))
    saved_keys = header.get("freezer_keys") or []
    if not isinstance(saved_keys, list) or not all(isinstance(k, str) for k in saved_keys):
        raise LoadError(f"'{where}': the freezer keys are malformed; the file is damaged")
    for k in saved_keys:
        if k not in now:
            sd.pop(k, None)        # freeze=None: the gates, and their epoch, are dropped
    for k in now:
        if k not in sd:
            sd[k] = own[k]         # gates added at load: the schedule starts at epoch 0
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        def few(ks):
            return ", ".join(ks[:5]) + (f" ... ({len(ks)} in all)" if len(ks) > 5 else "")
        raise LoadError(f"the weights in '{where}' do not fit the rebuilt model: "
                        + "; ".join(([f"missing {few(missing)}"] if missing else [])
                                    + ([f"not in the model {few(extra)}"] if extra else []))
                        + "; load onto the model the file was compiled from")
    for k, t in own.items():
        got = sd[k]
        if tuple(got.shape) != tuple(t.shape):
            raise LoadError(f"'{where}': '{k}' has shape {tuple(got.shape)} in the file but "
                            f"{tuple(t.shape)} in the rebuilt model; load onto the model the file was compiled from")
        if number_kinds_differ(got.dtype, t.dtype):
            raise LoadError(f"'{where}': '{k}' is {got.dtype} in the file but {t.dtype} in the rebuilt model; "
                            f"the file is damaged")
        if got.dtype.is_floating_point and bool(torch.isnan(got).any()):
            raise LoadError(f"'{where}': '{k}' holds NaN values; the file is damaged, or the model was saved "
                            f"after its training diverged")
    try:
        gm.load_state_dict(sd, strict=True)
    except Exception as e:
        raise LoadError(f"the weights in '{where}' do not fit the rebuilt model: {type(e).__name__}: {e}") from e


def is_state_dict(obj) -> bool:
    """True for a dict of names -> tensors."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def number_kinds_differ(got: torch.dtype, want: torch.dtype) -> bool:
    """True when a tensor of dtype `got` must not be loaded where `want` is: another kind of number (bool,
    integers where floats are, complex, or the reverse), which a damaged or foreign file holds. Another float
    precision, or another integer width, is not: load_state_dict casts it (a bf16 file onto an fp32 model)."""
    if got == want:
        return False
    return (got.is_floating_point != want.is_floating_point or got.is_complex != want.is_complex
            or torch.bool in (got, want))


def _short(name: str, n: int = 120) -> str:
    """A name from a file, for a message: printable, and cut where a damaged file makes it long."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= n else text[:n] + f"… ({len(name)} characters)"


def _restore_records(gm: nn.Module, plan: dict[str, LayerRecord]) -> None:
    """The saved decisions (searched / reverted, reasons, measured times) go back into the report; so do the
    values the rebuild leaves empty (shapes and FLOPs without example_inputs, a reverted layer's scheme)."""
    for name, rec in gm.lrd.records().items():
        old = plan.get(name)
        if old is None:
            continue
        for f in dataclasses.fields(LayerRecord):
            if f.name not in _REBUILT_RECORD_FIELDS:
                setattr(rec, f.name, getattr(old, f.name))
            elif not getattr(rec, f.name) and f.name != "ranks":
                setattr(rec, f.name, getattr(old, f.name))   # e.g. a reverted layer's scheme and full ranks
