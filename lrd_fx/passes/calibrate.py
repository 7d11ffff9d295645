"""calibration_stats and calibrate: record layer input statistics on calibration data, refit factors to output error."""
from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn as nn

from ..bn import _forward, recalibrate_bn
from ..context import CompileContext
from ..errors import InputError, LRDError
from ..factorize import modules as fm
from ..factorize import ranks as fr
from ..factorize.svd import singular_values
from ..factorize.whiten import CHANNEL, IM2COL, LINEAR, InputStats, Whitening, features, whitened_matrix
from ..factorize.chain import FactorChain, materialize_, paused
from ..pipeline import PassResult, restore_training_flags, training_flags
from ..trace import _FACTORIZABLE


class _Stop(Exception):
    """Raised by a hook once every layer of interest has seen its inputs: the rest of the forward is skipped."""


def calibration_batches(batches) -> list:
    """The calibration data as a list (it is iterated once per refit round), checked for emptiness."""
    if isinstance(batches, (torch.Tensor, Mapping)):   # one batch (a tokenizer's BatchEncoding is a Mapping)
        batches = [batches]
    try:
        out = list(batches)
    except TypeError:
        raise InputError(f"calibration must be an iterable of input batches (tensors, (x, y) tuples or dicts "
                         f"of model kwargs), got {type(batches).__name__}") from None
    if not out:
        raise InputError("calibration=... yielded no batch; pass a few input batches, e.g. [x1, x2]")
    return out


class TokenMask:
    """Keeps padding out of the statistics (Calibration.token_mask): while a dict batch holding the mask key
    runs, a LINEAR-view layer input shaped [B, T, features], with [B, T] the mask's shape, contributes only
    the rows at the mask's non-zero positions. Other inputs (convs, pooled [B, features], another length)
    and batches without the key (tensors, tuples, dicts lacking it) are recorded whole."""

    def __init__(self, key: Optional[str]):
        self.key = key
        self.current: Optional[torch.Tensor] = None   # bool [B, T] of the batch running now
        self.tokens = self.padding = self.batches = 0   # counted by start(..., count=True)
        self.unmasked = 0                               # batches without a mask
        self.layers: set = set()                        # layers whose inputs were masked

    def start(self, batch, count: bool = False) -> None:
        """The mask of the batch about to run (None where it has none); counts its tokens if `count`."""
        self.current = m = self.of(batch)
        if count:
            if m is None:
                self.unmasked += 1
            else:
                self.batches += 1
                self.tokens += int(m.sum())
                self.padding += m.numel() - int(m.sum())

    def of(self, batch) -> Optional[torch.Tensor]:
        if self.key is None or not isinstance(batch, Mapping) or batch.get(self.key) is None:
            return None
        m = batch[self.key]
        what = (f"calibration_token_mask={self.key!r}: a calibration batch's {self.key!r} must be a [batch, tokens] "
                f"tensor of 0/1 (1 = a real token)")
        fix = "; pass calibration_token_mask=None to record every position"
        if not isinstance(m, torch.Tensor):
            raise InputError(f"{what}, got {type(m).__name__}{fix}")
        if m.dim() != 2:
            raise InputError(f"{what}, got shape {list(m.shape)}{fix}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise InputError(f"{what}, got values other than 0 and 1{fix}")
        return m != 0

    def select(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`x` (a LINEAR-view layer input) without its padding rows, where its leading dims are the mask's."""
        m = self.current
        if m is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(m.shape):
            return x
        self.layers.add(name)
        return x[m.to(x.device)]

    def note(self) -> Optional[str]:
        """The report line: tokens used and padding left out (None when no batch had a mask)."""
        if not self.batches:
            return None
        head = f"calibration: token mask {self.key!r} in {self.batches} batch(es)"
        rest = f"; {self.unmasked} batch(es) without it recorded whole" if self.unmasked else ""
        if not self.layers:
            return (f"{head}, but no Linear input has its [batch, tokens] shape: every position recorded "
                    f"({self.tokens + self.padding} positions){rest}")
        return (f"{head}: {self.tokens} token(s) used, {self.padding} padding position(s) left out of the "
                f"input statistics of {len(self.layers)} Linear layer(s){rest}")


def view_of(module: nn.Module, scheme: str) -> Optional[str]:
    """The feature view a layer's statistics are recorded in, None where none is supported."""
    if fm.is_linear_like(module):   # nn.Linear and its kin, HF Conv1D (GPT-2) included
        return LINEAR
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    if scheme == "tucker2":
        return CHANNEL
    if module.weight.dim() > 4 or isinstance(module.padding, str):
        return None   # im2col needs unfold (1-D/2-D) and numeric padding
    return IM2COL


def _layer_features(module: nn.Module, view: str, x: torch.Tensor, mask: Optional[TokenMask] = None,
                    name: str = "") -> torch.Tensor:
    if view == LINEAR and mask is not None:
        x = mask.select(name, x)
    if view == IM2COL:
        return features(x, view, kernel_size=module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation)
    return features(x, view)


def _dim(module: nn.Module, view: str) -> int:
    if view == LINEAR:
        return fm.layer_dims(module)[1]       # in-features, whatever the weight's layout ([in, out] in HF Conv1D)
    w = module.weight           # a grouped conv's holds in / groups channels: every input channel counts
    return (w.shape[1] if view == CHANNEL else w[0].numel()) * fm.groups_of(module)


def run_batch(model: nn.Module, batch, what: str, device=None):
    """The model's output on one calibration batch; a failure (other than an LRDError or a hook's _Stop)
    is an InputError saying what was being done."""
    try:
        return _forward(model, batch, device)
    except (_Stop, LRDError):
        raise
    except Exception as e:
        raise InputError(f"calibration: the model does not run on a calibration batch while {what} "
                         f"({type(e).__name__}: {e}); pass batches shaped like example_inputs") from e


def _run_all(model: nn.Module, batches: list, what: str, mask: Optional[TokenMask] = None,
             count: bool = False) -> None:
    device = next((p.device for p in model.parameters()), None)
    for b in batches:
        if mask is not None:
            mask.start(b, count)
        try:
            run_batch(model, b, what, device)
        except _Stop:
            pass


def whitening_of(ctx: CompileContext, name: str) -> Optional[Whitening]:
    """The one-shot calibration statistics of a layer (calibration_stats pass), or None."""
    st = (ctx.calibration_stats or {}).get(name)
    return None if st is None else Whitening(st, ctx.config.calibrate.damping)


def energy_ranks(module: nn.Module, scheme: str, wh: Whitening, energy: float, *, name: str = "") -> tuple:
    """Ranks (data-flow order) keeping `energy` of the layer's *output* energy on the calibration data:
    the singular values of W C^1/2 (Tucker-2: of its channel unfoldings) instead of W's."""
    def rule(w):
        if scheme == "tucker2":
            return fr.tucker2_ranks_energy(w, energy, name=name)
        return (fr.energy_rank(singular_values(w.reshape(w.shape[0], -1), name=name), energy),)

    return fm.largest_ranks(rule(w) for w in _whitened_groups(module, wh, name))   # grouped: every group's


def _whitened_groups(module: nn.Module, wh: Whitening, name: str) -> list:
    """W C^1/2 of the layer, or of each group of a grouped conv (with that group's statistics)."""
    parts = fm.group_weights(module)
    if len(parts) == 1:
        return [whitened_matrix(parts[0], wh, name=name)]
    return [whitened_matrix(w, Whitening(wh.stats.group(i), wh.damping), name=f"{name} (group {i})")
            for i, w in enumerate(parts)]


class WhitenedWeight:
    """Stand-in layer whose weight is W C^1/2 (a grouped conv's groups, each whitened by its own
    statistics, stacked as its weight is): its reconstruction error is the relative output error."""

    def __init__(self, weight: torch.Tensor, groups: int = 1):
        self.weight, self.groups = weight, groups


def error_source(ctx: CompileContext, name: str):
    """What the rank search measures a layer's error on: the whitened weight when calibration data was
    given (so "time+error" trades time against output error), else the original layer."""
    orig = ctx.originals[name]
    wh = whitening_of(ctx, name)
    if wh is None:
        return orig
    cache = ctx.calibration_whitened
    if name not in cache:
        cache[name] = WhitenedWeight(torch.cat(_whitened_groups(orig, wh, name)), fm.groups_of(orig))
    return cache[name]


def calibration_stats(ctx: CompileContext):
    """Factory of the pass that runs the calibration batches once through the (not yet decomposed)
    model and records each eligible layer's input second moment in ctx.calibration_stats."""
    from .decompose import _skip_reason, collect_sites

    def run(gm):
        batches = ctx.calibration
        cfg = ctx.config
        layers = {}
        for name, site in collect_sites(gm, ctx.eager_parts).items():
            m = site.module
            if not isinstance(m, _FACTORIZABLE) or _skip_reason(name, m, cfg) is not None:
                continue
            view = view_of(m, fm.effective_scheme(m, cfg.conv_scheme))
            if view is not None:
                layers[name] = (m, view)
        stats, mask = record_input_stats(gm, layers, batches, cfg.calibrate.token_mask)
        ctx.calibration_stats = {n: s for n, s in stats.items() if s.n > 0}
        n = sum(1 for s in stats.values() if s.n)
        ctx.notes.append(f"calibration: {len(batches)} batch(es); input statistics of {n} layer(s)")
        note = mask.note()
        if note:
            ctx.notes.append(note)
        return PassResult(gm, False)

    run.name = "calibration_stats"
    return run


def record_input_stats(model: nn.Module, layers: dict, batches: list,
                       token_mask: Optional[str] = "attention_mask") -> tuple[dict, TokenMask]:
    """Run `batches` once through `model` (eval mode, no grad) and return ({name: InputStats} of
    `layers` = {name: (module, view)}, the TokenMask with its counts); padding rows are left out of
    LINEAR-view inputs as TokenMask says."""
    mask = TokenMask(token_mask)
    stats: dict[str, InputStats] = {}
    handles = []
    for name, (m, view) in layers.items():
        stats[name] = InputStats(_dim(m, view), view, device=m.weight.device, groups=fm.groups_of(m))

        def hook(mod, args, name=name, view=view):
            if args and isinstance(args[0], torch.Tensor):
                stats[name].update(_layer_features(mod, view, args[0], mask, name))
        handles.append(m.register_forward_pre_hook(hook))
    flags = training_flags(model)
    model.eval()   # inference behaviour (dropout off, BatchNorm running statistics untouched)
    try:
        with torch.no_grad():
            _run_all(model, batches, "recording layer input statistics", mask, count=True)
    finally:
        for h in handles:
            h.remove()
        restore_training_flags(flags)
        mask.current = None
    return stats, mask


def factor_chains(gm: nn.Module, ctx: CompileContext) -> list[str]:
    """Names of the factorized layers whose FactorChain sits in `gm` (calibrate and allocate work on these)."""
    out = []
    for name, rec in ctx.records.items():
        if rec.factorized and name in ctx.originals:
            try:
                m = gm.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(m, FactorChain):
                out.append(name)
    return out


def _probe(gm: nn.Module, names: list, batch) -> tuple[list, dict]:
    """Run one batch; return the layers grouped by shared input tensor in call order, and calls per batch."""
    order, inputs, calls = [], {}, collections.Counter()
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            calls[name] += 1
            if name not in inputs:
                order.append(name)
                inputs[name] = args[0] if args else None   # held: ids stay unique while probing
        handles.append(gm.get_submodule(name)[0].register_forward_pre_hook(hook))
    try:
        _run_all(gm, [batch], "probing the layer order")
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list] = {}
    for name in order:
        groups.setdefault(id(inputs[name]), []).append(name)
    return list(groups.values()), dict(calls)


def _round(ref: nn.Module, gm: nn.Module, group: list, calls: dict, ctx: CompileContext, batches: list) -> dict:
    """Paired statistics (original-model input, compressed-model input) of the layers in `group`."""
    stats, queues, handles = {}, {}, []
    left = {"ref": 0, "gm": 0}
    mask = TokenMask(ctx.config.calibrate.token_mask)   # the same rows on both sides: pairs stay aligned
    for name in group:
        orig = ctx.originals[name]
        view = view_of(orig, ctx.records[name].scheme)
        stats[name] = InputStats(_dim(orig, view), view, device=orig.weight.device, groups=fm.groups_of(orig))
        queues[name] = collections.deque()

        def ref_hook(mod, args, name=name, orig=orig, view=view):
            queues[name].append(_layer_features(orig, view, args[0], mask, name))
            left["ref"] -= 1
            if left["ref"] == 0:
                raise _Stop

        def gm_hook(mod, args, name=name, orig=orig, view=view):
            if queues[name]:
                stats[name].update_pair(queues[name].popleft(), _layer_features(orig, view, args[0], mask, name))
            left["gm"] -= 1
            if left["gm"] == 0:
                raise _Stop
        handles.append(ref.get_submodule(name).register_forward_pre_hook(ref_hook))
        handles.append(gm.get_submodule(name)[0].register_forward_pre_hook(gm_hook))
    total = sum(calls[n] for n in group)
    try:
        for b in batches:
            left["ref"] = left["gm"] = total
            _run_all(ref, [b], "running the original model", mask)
            _run_all(gm, [b], "running the compressed model", mask)
            for q in queues.values():
                q.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def _can_pair(ref: nn.Module, name: str, orig: nn.Module) -> bool:
    try:
        m = ref.get_submodule(name)
    except AttributeError:
        return False
    return type(m) is type(orig) and m.weight.shape == orig.weight.shape


def calibrate(ctx: CompileContext):
    """Factory of the pass that refits every factor chain to the output error on the calibration data
    (sequential: layer by layer in call order, on the compressed model's own inputs, towards the
    original model's outputs), then re-estimates BatchNorm statistics on the same batches."""

    def run(gm):
        cfg = ctx.config
        batches = ctx.calibration
        names = factor_chains(gm, ctx)
        damping = cfg.calibrate.damping
        used: dict[str, InputStats] = {}
        flags = training_flags(gm)
        gm.eval()
        try:
            with torch.no_grad():
                if cfg.calibrate.mode == "sequential" and names:
                    from ..api import copy_model   # deepcopy that also copes with weight-norm/pruned layers
                    ref = copy_model(ctx.model).eval()
                    # layers without a feature view (e.g. string padding under an SVD scheme) get no
                    # paired statistics
                    pairable = [n for n in names if _can_pair(ref, n, ctx.originals[n])
                                and view_of(ctx.originals[n], ctx.records[n].scheme) is not None]
                    # what the rounds will not fit is fitted first (one-shot statistics, else the plain
                    # factorization), so the rounds run it as it will be
                    _fit_one_shot(gm, ctx, [n for n in names if n not in pairable], used)
                    # The chains still pending stay so while the rounds run the model (each is fitted,
                    # hence factorized, once), computing their original layer meanwhile. A round stops
                    # at its layers' last call, so their inputs come from layers fitted in earlier
                    # rounds, except behind a layer fitted later that runs first (one called again
                    # later): its original output is the best stand-in for its fit.
                    with paused(gm):
                        groups, calls = _probe(gm, pairable, batches[0])
                        for group in groups:
                            stats = _round(ref, gm, group, calls, ctx, batches)
                            for name in group:
                                if stats[name].n:
                                    used[name] = stats[name]
                                    _refit(gm, ctx, name, stats[name], damping)
                    del ref
                # one-shot statistics (from calibration_stats) for the layers not fitted yet
                _fit_one_shot(gm, ctx, [n for n in names if n not in used and n in (ctx.calibration_stats or {})],
                              used)
        finally:
            restore_training_flags(flags)
        _report(ctx, names, used, damping)
        if cfg.calibrate.recalibrate_bn:
            # BatchNorm statistics of the final model: chains without calibration data get their plain
            # factorization now (in one call; otherwise one by one on first use)
            materialize_(gm, progress=cfg.progress)
            recalibrate_bn(gm, batches)
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules()):
                ctx.notes.append(f"calibration: BatchNorm statistics re-estimated on {len(batches)} batch(es)")
        return PassResult(gm, bool(used))

    run.name = "calibrate"
    run.requires = ("decompose",)
    return run


def _fit_one_shot(gm, ctx: CompileContext, names: list, used: dict) -> None:
    """Fit the chains of `names` to the one-shot statistics of the calibration_stats pass, in one
    parallel call; a layer without statistics gets its plain (weight-only) factorization."""
    if not names:
        return
    stats = ctx.calibration_stats or {}
    jobs = [(n, ctx.originals[n], tuple(ctx.records[n].ranks), ctx.records[n].scheme) for n in names]
    whiten = {n: whitening_of(ctx, n) for n in names if n in stats}
    chains = fm.factorize_many(jobs, progress=ctx.config.progress, desc="calibrate", whiten=whiten)
    for n in names:
        gm.get_submodule(n).fill_(chains[n])   # in place; no longer pending
        if n in stats:
            used[n] = stats[n]
            _mark(ctx, n, "one-shot")


def _refit(gm, ctx: CompileContext, name: str, stats: InputStats, damping: float) -> None:
    rec = ctx.records[name]
    chain = fm.factorize(ctx.originals[name], tuple(rec.ranks), rec.scheme, name=name,
                         whiten=Whitening(stats, damping))
    gm.get_submodule(name).fill_(chain)
    _mark(ctx, name, "sequential")


def _mark(ctx: CompileContext, name: str, how: str) -> None:
    rec = ctx.records[name]
    tag = f"data-aware ({how})"
    if tag not in rec.reason:
        rec.reason = f"{rec.reason}; {tag}" if rec.reason else tag


def _report(ctx: CompileContext, names: list, used: dict, damping: float) -> None:
    from ..factorize.whiten import damped_stats
    missing = [n for n in names if n not in used]
    if missing:
        ctx.notes.append(f"calibration: {len(missing)} factorized layer(s) saw no calibration data and keep the "
                         f"plain weight factorization: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    deficient = []
    for n, st in used.items():
        parts = [damped_stats(st.group(i), damping) for i in range(st.groups)]
        if any(d.deficient for d in parts):
            rank = sum(d.numerical_rank for d in parts)
            per = f" in {st.groups} groups" if st.groups > 1 else ""
            deficient.append(f"{n} ({st.n} samples, {st.dim} features{per}, numerical rank {rank})")
    if deficient:
        ctx.notes.append(
            f"calibration: rank-deficient input statistics in {len(deficient)} layer(s), regularised by a ridge of "
            f"calibration_damping={damping} x mean input energy towards the original weights (more calibration "
            f"data fixes this): " + "; ".join(deficient[:8]) + (" ..." if len(deficient) > 8 else ""))
