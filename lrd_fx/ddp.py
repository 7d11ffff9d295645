"""wrap_ddp: DistributedDataParallel set up the way a gated (freezing) model needs it."""
from __future__ import annotations

import torch.nn as nn

from .errors import FreezeError
from .freezing import is_gated


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """`DistributedDataParallel(model, find_unused_parameters=True, **ddp_kwargs)` for gated models.

    A frozen factor's weight is detached in forward, so it takes no part in backward: DDP must be told
    to look for unused parameters, or it raises "Expected to have finished reduction" on the first
    frozen epoch. static_graph=True is refused because the set of used parameters changes with the
    schedule's phase. Models without gates are wrapped with the given arguments unchanged.
    Call `freezer.set_epoch(e)` with the same epoch on every process (the gates read a Python-side
    state that DDP's buffer broadcast does not update).
    """
    from torch.nn.parallel import DistributedDataParallel
    if is_gated(model):
        if ddp_kwargs.get("find_unused_parameters") is False:
            raise FreezeError("wrap_ddp: a model with freezing gates needs find_unused_parameters=True "
                              "(frozen weights get no gradient); drop find_unused_parameters=False")
        if ddp_kwargs.get("static_graph"):
            raise FreezeError("wrap_ddp: static_graph=True does not fit freezing gates: the parameters "
                              "that receive gradients change with the schedule's phase; drop static_graph")
        ddp_kwargs["find_unused_parameters"] = True
    return DistributedDataParallel(model, **ddp_kwargs)
