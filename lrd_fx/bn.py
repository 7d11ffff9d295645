"""recalibrate_bn: re-estimate BatchNorm running statistics of a (decomposed) model on a few batches."""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .errors import ConfigError, InputError
from .pipeline import restore_training_flags, training_flags


def _forward(model: nn.Module, batch, device):
    """Run `model` on one batch (a tensor, an (x, y, ...) tuple/list: x, or a Mapping of keyword inputs); its output."""
    if isinstance(batch, Mapping):   # a dict of keyword inputs, or a tokenizer's BatchEncoding
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError("recalibrate_bn: got an empty batch tuple; pass tensors or (x, y) tuples")
        batch = batch[0]   # (x, y): the inputs come first
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"recalibrate_bn: a batch must be a tensor, an (x, y) tuple or a dict of model "
                         f"kwargs, got {type(batch).__name__}")
    return model(batch.to(device) if device is not None else batch)


def recalibrate_bn(model: nn.Module, batches: Iterable, *, momentum: Optional[float] = None,
                   max_batches: Optional[int] = None) -> nn.Module:
    """Re-estimate the running mean/var of every BatchNorm in `model` from `batches`; returns `model`.

    Updates the given model IN PLACE (only BatchNorm running statistics change; weights do not).
    Decomposition changes the activations every BatchNorm sees, so the stored statistics no longer
    fit: a digits ResNet-18 fell to chance right after decomposition and came back without any
    fine-tuning once they were re-estimated on 8 training batches.

    batches: an iterable of input tensors, (x, y, ...) tuples/lists (x is used) or dicts of keyword
      inputs; moved to the model's device. `max_batches` stops after that many.
    momentum: None (default) resets the statistics and takes the exact average over the batches;
      a float keeps the current statistics and updates them as an exponential average with it.
    Runs under torch.no_grad with only the BatchNorm layers in train mode (dropout etc. stay in eval
    mode, as at inference); every module's train/eval mode and momentum are restored afterwards.
    """
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
        raise ConfigError(f"recalibrate_bn: momentum={momentum!r} must be None (exact average) or in (0, 1]")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"recalibrate_bn: max_batches={max_batches!r} must be an int >= 1 or None")
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    it = iter(batches)
    if max_batches is not None:
        it = itertools.islice(it, max_batches)
    try:
        first = next(it)
    except StopIteration:
        raise InputError("recalibrate_bn: `batches` yielded no batch; pass at least one input batch") from None
    device = next((p.device for p in model.parameters()), None)
    modes = training_flags(model)
    saved_momentum = {m: m.momentum for m in bns}
    # a failing batch must not leave half-reset statistics behind
    saved_stats = {m: {k: b.clone() for k, b in m._buffers.items() if b is not None} for m in bns}
    ok = False
    try:
        model.eval()
        for m in bns:
            if momentum is None:
                m.reset_running_stats()
                m.momentum = None          # cumulative average: every batch weighs the same
            else:
                m.momentum = momentum
            m.train()
        with torch.no_grad():
            for batch in itertools.chain([first], it):
                _forward(model, batch, device)
        ok = True
    finally:
        if not ok:
            with torch.no_grad():
                for m, stats in saved_stats.items():
                    for k, b in stats.items():
                        m._buffers[k].copy_(b)
        restore_training_flags(modes)
        for m, mom in saved_momentum.items():
            m.momentum = mom
    return model
