"""torch.distributed helpers: one process decides, every process builds the same architecture."""
from __future__ import annotations

from typing import Any

import torch


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
