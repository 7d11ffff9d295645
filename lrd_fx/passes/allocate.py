"""allocate: share the parameters of ratio= among the layers by how much each one's truncation changes
the model's output on the calibration data (calibration_allocate="sensitivity").

A uniform ratio gives every layer the same fraction of its weights, but layers are not equally
sensitive: on the pretrained MiniLM, truncating one FFN input layer to half its uniform rank moves the
sentence embeddings ten times more than doing the same to an attention projection. This pass measures
that, then moves rank to where it buys the most output accuracy, at the same total parameters:

1. Candidates: each factorized layer at FRACTIONS of its uniform ranks (both ranks of a Tucker-2 pair
   scaled together; aligned when `align` is on; only ranks that still save parameters).
2. Sensitivity: for every candidate, the layer alone is replaced by its data-aware fit at that rank (the
   one-shot whitened factorization, as calibrate makes it) and the relative squared error of the
   model's outputs against the original's is measured on the calibration batches (every other layer
   exact: decompose's chains are still pending and run their source layer).
3. Allocation: starting from every layer's smallest candidate, repeatedly take the upgrade (to any
   larger candidate of one layer) with the largest error drop per added parameter that fits in the
   parameter budget of the uniform ranks, until none fits. Summed single-layer errors are the
   objective (ASVD's sensitivity-based truncation).

The layers whose ranks change get new pending chains; calibrate fits every layer at its final ranks.
Cost: one pass over the batches per candidate (len(FRACTIONS) per layer); `calibration_allocate_batches`
bounds the batches it uses.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..context import CompileContext
from ..errors import InputError
from ..factorize import modules as fm
from ..factorize import ranks as fr
from ..factorize.chain import FactorChain, paused, pending_chain
from ..pipeline import PassResult, restore_training_flags, training_flags
from .calibrate import factor_chains, run_batch, whitening_of
from .decompose import install_chain

FRACTIONS = (0.5, 0.75, 1.0, 1.25, 1.5)   # candidate ranks, as fractions of the uniform rule's ranks
MAX_STORED_OUTPUT_BYTES = 1 << 29          # keep the original's outputs up to this size, else recompute them


def candidate_ranks(module: nn.Module, scheme: str, uniform: tuple, align: int = 1) -> list[tuple]:
    """The ranks tried for one layer, fewest parameters first: FRACTIONS of its uniform ranks that
    still save parameters (the uniform ranks themselves always included)."""
    full = fm.full_ranks(module, scheme)
    limit = sum(p.numel() for p in (module.weight, module.bias) if p is not None)
    out = [tuple(uniform)]
    for f in FRACTIONS:
        r = tuple(fr.align_rank(max(1, min(fu, round(u * f))), align, fu) for u, fu in zip(uniform, full))
        if r not in out and fm.chain_params(module, r, scheme) < limit:
            out.append(r)
    return sorted(out, key=lambda r: fm.chain_params(module, r, scheme))


def allocate_ranks(costs: dict, errors: dict, budget: int) -> dict:
    """{layer: index of its chosen candidate}: from each layer's first (cheapest) candidate, take the
    upgrade with the largest error drop per added parameter that fits in `budget`, until none fits.

    costs/errors: {layer: [parameters], [output error]} per candidate, cheapest first. An upgrade may
    skip candidates (a layer whose error falls late is not stuck behind a flat step); an error that
    rises with the rank (measurement noise) counts as no gain.
    """
    idx = {n: 0 for n in costs}
    used = sum(c[0] for c in costs.values())
    while True:
        best = None
        for n, c in costs.items():
            i = idx[n]
            for j in range(i + 1, len(c)):
                extra = c[j] - c[i]
                if extra <= 0 or used + extra > budget:
                    continue
                gain = max(errors[n][i] - errors[n][j], 0.0) / extra
                if best is None or gain > best[0]:
                    best = (gain, n, j, extra)
        if best is None:
            return idx
        _, n, j, extra = best
        idx[n] = j
        used += extra


def _tensors(out) -> list:
    """The floating-point tensors of a model output (tensors, tuples/lists, dicts, transformers' ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out.detach()] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


class _OutputError:
    """Relative squared error of a model's outputs against the original's on the calibration batches."""

    def __init__(self, gm: nn.Module, batches: list):
        self.gm, self.batches = gm, batches
        self.device = next((p.device for p in gm.parameters()), None)
        first = self._run(batches[0])
        size = sum(t.numel() * t.element_size() for t in first) * len(batches)
        self.stored = [first] + [self._run(b) for b in batches[1:]] if size <= MAX_STORED_OUTPUT_BYTES else None
        if not first:
            raise InputError("calibration_allocate='sensitivity': the model's output holds no floating-point "
                             "tensor to compare; use calibration_allocate='uniform'")

    def _run(self, batch) -> list:
        out = run_batch(self.gm, batch, "measuring layer sensitivity (calibration_allocate)", self.device)
        return [t.double() for t in _tensors(out)]

    def reference(self, i: int) -> list:
        if self.stored is not None:
            return self.stored[i]
        with _exact():
            return self._run(self.batches[i])

    def __call__(self) -> float:
        num = den = 0.0
        for i, b in enumerate(self.batches):
            ref, out = self.reference(i), self._run(b)
            for r, o in zip(ref, out):
                num += float((o - r).pow(2).sum())
                den += float(r.pow(2).sum())
        return num / den if den > 0 else 0.0


_EXACT: list = []   # non-empty inside _exact(): candidate hooks stand aside


@contextlib.contextmanager
def _exact():
    """Inside: every candidate hook is off, so the model computes the original's outputs."""
    _EXACT.append(True)
    try:
        yield
    finally:
        _EXACT.pop()


def _substitute(chain: FactorChain, candidate: nn.Module) -> list:
    """Hooks making the (pending, paused) chain return the candidate's output instead of its source's.

    The traced graph calls a chain's factors one by one (eager parts call the chain, which calls them
    too): the first factor's input is kept, and the last factor's output replaced by the candidate's
    on it (this hook runs after the chain's own, which returns the source layer's output)."""
    seen: list = []

    def keep(module, args):
        if not _EXACT:
            seen.append(args)

    def swap(module, args, output):
        if _EXACT or not seen:
            return output
        return candidate(*seen.pop())
    return [chain[0].register_forward_pre_hook(keep), chain[-1].register_forward_hook(swap)]


def allocate(ctx: CompileContext):
    """Factory of the allocate pass (calibration_allocate="sensitivity"; after decompose, before the
    rank search and calibrate)."""

    def run(gm):
        from ..cost.timer import setting_of
        from tqdm.auto import tqdm
        cal = ctx.config.calibrate
        batches = ctx.calibration[:cal.allocate_batches] if cal.allocate_batches else ctx.calibration
        align = setting_of(ctx).align
        per_layer = ctx.config.rank if isinstance(ctx.config.rank, dict) else {}
        from .decompose import _override_of
        names = [n for n in factor_chains(gm, ctx) if _override_of(n, per_layer) is None]
        if len(names) < 2:
            ctx.notes.append(f"calibration_allocate='sensitivity': {len(names)} layer(s) to share parameters "
                             f"among; ranks left as the uniform rule set them")
            return PassResult(gm, False)
        cands = {n: candidate_ranks(ctx.originals[n], ctx.records[n].scheme, tuple(ctx.records[n].ranks), align)
                 for n in names}
        costs = {n: [fm.chain_params(ctx.originals[n], r, ctx.records[n].scheme) for r in cands[n]] for n in names}
        budget = sum(ctx.records[n].params_after for n in names)
        errors: dict = {}
        flags = training_flags(gm)
        gm.eval()
        bar = tqdm(total=sum(map(len, cands.values())), desc="allocate ranks", unit="candidate", leave=False,
                   disable=not ctx.config.progress)
        try:
            with torch.no_grad(), paused(gm):
                measure = _OutputError(gm, batches)
                for n in names:
                    rec, orig = ctx.records[n], ctx.originals[n]
                    wh = whitening_of(ctx, n)
                    errors[n] = []
                    bar.set_postfix_str(n[-40:])
                    for r in cands[n]:
                        cand = fm.factorize(orig, r, rec.scheme, name=n, whiten=wh).eval()
                        handles = _substitute(gm.get_submodule(n), cand)
                        try:
                            errors[n].append(measure())
                        finally:
                            for h in handles:
                                h.remove()
                        bar.update(1)
        finally:
            bar.close()
            restore_training_flags(flags)
        chosen = allocate_ranks(costs, errors, budget)
        uni_err = sum(errors[n][cands[n].index(tuple(ctx.records[n].ranks))] for n in names)
        new_err = sum(errors[n][chosen[n]] for n in names)
        changed = 0
        for n in names:
            rec = ctx.records[n]
            uniform, ranks = tuple(rec.ranks), cands[n][chosen[n]]
            if ranks != uniform:
                install_chain(gm, ctx, n, ranks, pending_chain(ctx.originals[n], ranks, rec.scheme, name=n))
                rec.reason += f"; ranks {list(uniform)} -> {list(ranks)} by output sensitivity (calibration_allocate)"
                changed += 1
        used = sum(costs[n][chosen[n]] for n in names)
        ctx.notes.append(
            f"calibration_allocate='sensitivity': {len(names)} layers measured at up to {len(FRACTIONS)} ranks each "
            f"on {len(batches)} batch(es); {changed} changed rank; factor parameters {used:,} (uniform {budget:,}); "
            f"summed single-layer output error {new_err:.3g} (uniform {uni_err:.3g})")
        return PassResult(gm, changed > 0)

    run.name = "allocate"
    run.requires = ("decompose",)
    return run

