"""save() and load(): a compiled model's plan, config and weights in one file."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from . import api
from .config import Config
from .context import CompileContext
from .errors import ConfigError, LoadError, LRDError
from .plan import LayerRecord


_FORMAT = "lrd_fx/1"


def _config_dict(cfg: Config) -> dict:
    d = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if callable(v):
            continue      # functions cannot be saved; pass them again to load()
        d[f.name] = v
    return d


def save(gm: nn.Module, path) -> None:
    """Write the plan, the config and the weights of a compiled model to `path` (torch.save)."""
    info = getattr(gm, "lrd", None)
    if not isinstance(info, api.LRDInfo):
        raise ConfigError("save() takes a model returned by lrd_fx.compile (it has no .lrd)")
    torch.save({"format": _FORMAT, "config": _config_dict(info.config), "plan": info.plan,
                "state_dict": gm.state_dict()}, path)


def load(model: nn.Module, path, example_inputs=None, **overrides) -> nn.Module:
    """Rebuild the compiled model saved at `path` from the original `model`: same ranks, same reverts,
    weights from the file. Nothing is re-searched or re-factorized. The caller's model is not mutated."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LoadError(f"cannot read '{path}': {type(e).__name__}: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise LoadError(f"'{path}' is not an lrd_fx save file (expected format {_FORMAT})")
    saved = blob["config"]
    plan = {n: LayerRecord.from_dict(d) for n, d in blob["plan"].items()}
    ranks = {n: tuple(r.ranks) for n, r in plan.items() if r.factorized}
    skip = tuple(n for n, r in plan.items() if not r.factorized)
    keep = {k: v for k, v in saved.items()
            if k not in ("rank", "ratio", "energy", "skip", "rank_search", "filter_fn", "rank_budget")}
    keep.update(overrides)
    try:
        cfg = Config(**{k: v for k, v in keep.items() if k in {f.name for f in dataclasses.fields(Config)}})
        cfg = cfg.replace(rank=ranks or None, skip=skip, rank_search=None, ratio=saved.get("ratio") or 0.25)
    except LRDError as e:
        raise LoadError(f"the saved config does not apply: {e}") from e
    inputs = api._as_tuple(example_inputs)
    device, dtype = api._model_device_dtype(model)
    ctx = CompileContext(config=cfg, model=model, example_inputs=inputs, device=device, dtype=dtype)
    ctx.extras["init"] = "empty"
    try:
        gm = api._run(copy.deepcopy(model), ctx)
    except LRDError as e:
        raise LoadError(f"the model does not match the plan in '{path}': {e}") from e
    try:
        gm.load_state_dict(blob["state_dict"], strict=True)
    except Exception as e:
        raise LoadError(f"the weights in '{path}' do not fit the rebuilt model: {e}") from e
    # restore the saved decisions (searched / reverted, measured times) for the report
    for name, rec in gm.lrd.records().items():
        old = plan.get(name)
        if old is not None:
            for f in ("decision", "reason", "estimate", "time_original_s", "time_estimate_s",
                      "time_chosen_s", "candidates"):
                setattr(rec, f, getattr(old, f))
    if gm.lrd.freezer is not None:
        gm.lrd.freezer.sync_from_buffer() if hasattr(gm.lrd.freezer, "sync_from_buffer") else None
    return gm
