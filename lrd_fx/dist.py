"""torch.distributed: one process decides, every process builds the same architecture; wrap_ddp sets up
DistributedDataParallel the way a gated (freezing) model needs it."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError, FreezeError


def is_distributed() -> bool:
    """True inside an initialized process group with more than one process."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from process `src` on every process (picklable objects; identity outside distributed).

    Uses broadcast_object_list, which moves the pickled bytes through the current CUDA device when the
    backend is NCCL and through the CPU for gloo.
    """
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_plan(plan: dict, src: int = 0) -> dict:
    """The rank-search plan ({layer: choice}) of process `src`, on every process."""
    return broadcast_object(plan, src=src)


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """`DistributedDataParallel(model, find_unused_parameters=True, **ddp_kwargs)` for gated models.

    A frozen factor's weight is detached in forward, so it takes no part in backward: DDP must be told
    to look for unused parameters, or it raises "Expected to have finished reduction" on the first
    frozen epoch. static_graph=True is refused because the set of used parameters changes with the
    schedule's phase. Models without gates are wrapped with the given arguments unchanged.
    Call `freezer.set_epoch(e)` with the same epoch on every process (the gates read a Python-side
    state that DDP's buffer broadcast does not update). A model with factorized mixture-of-experts layers
    (moe.Experts) gets the same (an expert no token reaches in a batch gets no gradient); ConfigError for
    the arguments that break it. Llama-4's (moe.BatchedExperts) run every expert on every call: unchanged.
    """
    from torch.nn.parallel import DistributedDataParallel

    from .freezing import is_gated   # here, not at the top: the passes import this module
    from .moe import BatchedExperts, Experts
    if is_gated(model):
        if ddp_kwargs.get("find_unused_parameters") is False:
            raise FreezeError("wrap_ddp: a model with freezing gates needs find_unused_parameters=True "
                              "(frozen weights get no gradient); drop find_unused_parameters=False")
        if ddp_kwargs.get("static_graph"):
            raise FreezeError("wrap_ddp: static_graph=True does not fit freezing gates: the parameters "
                              "that receive gradients change with the schedule's phase; drop static_graph")
        ddp_kwargs["find_unused_parameters"] = True
    if any(isinstance(m, Experts) and not isinstance(m, BatchedExperts) for m in model.modules()):
        # each expert is its own layers now: one the router sends no token in a batch gets no gradient
        # (transformers' 3-D weight got zeros for it)
        if ddp_kwargs.get("find_unused_parameters") is False or ddp_kwargs.get("static_graph"):
            raise ConfigError("wrap_ddp: a model whose mixture-of-experts layers were factorized (lrd_fx.moe.Experts) "
                              "needs find_unused_parameters=True and no static_graph: an expert the router sends "
                              "no token in a batch gets no gradient; drop those arguments")
        ddp_kwargs["find_unused_parameters"] = True
    return DistributedDataParallel(model, **ddp_kwargs)
