"""guard: a decomposed model that is slower than the original as a whole gives layers back.

Per-layer timings do not always add up (extra kernels, launches and activation traffic between the
factors). After the factors are made, the whole model is timed against the original on the example
inputs, as the whole-model check does (same precision, memory format, execution form and mode). When
it is slower, the factorized layers with the least measured gain go back to their original layer, a
quarter at a time (those never timed first), and the model is timed again, until it is at least as
fast as the original. The steps are tried on a copy: when no step gets there, every layer goes back if
that is measurably faster than keeping them all (by NO_HELP), else every factor stays (the time is lost
outside the factorized layers, e.g. in the traced graph's own Python overhead); the report says which.
On by default whenever the rank search is (whole_model_guard=None), except with rank_budget= (giving
layers back would break the parameter budget); whole_model_guard=False only reports, like the check.
Runs before freeze and fuse, so gates and fusion apply to the layers kept.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

from .. import dist
from ..context import CompileContext
from ..cost.timer import current_cost_fn, current_fake_clock
from ..pipeline import PassResult, graph_modules
from .check_speed import _measure
from .search_ranks import give_back, revert_layer

STEPS = (0.25, 0.5, 0.75)       # cumulative fractions of the factorized layers reverted before all of them
NO_HELP = 0.02                  # giving layers back helps only when some step gains more than this speed-up


def wants_guard(cfg) -> bool:
    """Config.whole_model_guard; None (default): on whenever the rank search is, except for the
    whole-model plan (rank_budget=: layers given back would break the parameter budget asked for)."""
    on = cfg.whole_model_guard
    if on is not None:
        return bool(on)
    rs = cfg.rank_search
    return rs is not None and rs.param_budget is None and cfg.whole_model_check is not False


def revert_order(records: dict) -> list[str]:
    """Factorized layers, the first to give back first: layers whose speed was never measured (the search
    stopped before them, or no search ran), least FLOP saving first; then measured layers, least measured
    gain (chosen time / original time, largest first)."""
    unmeasured, measured = [], []
    for name, rec in records.items():
        if not rec.factorized:
            continue
        if rec.time_original_s and rec.time_chosen_s:
            measured.append((-(rec.time_chosen_s / rec.time_original_s), name))
        else:
            saving = rec.flops_after / rec.flops_before if rec.flops_before else 1.0
            unmeasured.append((-saving, name))
    return [n for _, n in sorted(unmeasured)] + [n for _, n in sorted(measured)]


def step_counts(n: int) -> list[int]:
    """How many layers are given back at each step: a quarter, half, three quarters, then all."""
    return sorted({min(n, max(1, math.ceil(n * f))) for f in STEPS} | {n}) if n else []


def _recompile(gm) -> None:
    for _, part in graph_modules(gm):
        part.recompile()


def guard(ctx: CompileContext):
    """Factory of the guard pass (see the module docstring)."""

    def run(gm):
        cfg = ctx.config
        cost_fn = current_cost_fn()     # build_passes adds this pass only with example inputs
        if cost_fn is not None and cfg.whole_model_guard is not True and current_fake_clock() is None:
            return PassResult(gm, False)    # as the check: a cost function times whole models only when asked
        order = [n for n in revert_order(ctx.records) if n in ctx.originals]
        if not order:
            return PassResult(gm, False)
        names: list = []
        summary: Optional[dict] = None
        err = None
        if dist.rank() == 0:
            try:
                names, summary = _search(gm, ctx, order, cost_fn)
            except Exception as e:   # advice, as the check: the compiled model stands without it
                err = f"{type(e).__name__}: {e}"
        box = dist.broadcast_object({"names": names, "summary": summary, "error": err,
                                     "whole_model": ctx.whole_model, "done": ctx.whole_model_done})
        names, summary, err = box["names"], box["summary"], box["error"]
        # every process skips the check together (it broadcasts from process 0) and reports the same timing
        ctx.whole_model, ctx.whole_model_done = box["whole_model"], box["done"]
        if err is not None:
            ctx.notes.append(f"whole-model guard failed, nothing was given back: {err[:300]}")
            return PassResult(gm, False)
        if dist.rank() != 0:
            for name in names:
                revert_layer(gm, ctx, name)
                ctx.records[name].reason = summary["reasons"][name]
        if summary is not None:
            ctx.guard = summary
            ctx.notes.append(summary["note"])
        return PassResult(gm, bool(names))

    run.name = "guard"
    run.requires = ("decompose",)
    return run


def _search(gm, ctx: CompileContext, order: list, cost_fn) -> tuple[list, Optional[dict]]:
    # every timing runs on one copy of each model, and the steps are tried on the copy of gm: when
    # giving layers back does not help, the factors stay
    work = copy.deepcopy(gm)
    private = {"original": copy.deepcopy(ctx.model), "lrd": True}
    first = _measure(work, ctx, cost_fn, private=private)
    s0 = first.get("speedup")
    if s0 is None or s0 >= 1.0:
        if _final(ctx):             # the check need not time the same model again
            ctx.whole_model, ctx.whole_model_done = first, True
        return [], None
    where = f"{first['mode']}, {first['setting']}"
    n = len(order)
    steps, timed = [(0, s0)], {0: first}
    k_final = None
    for k in step_counts(n):
        for name in order[steps[-1][0]:k]:
            give_back(work, ctx, name)
        _recompile(work)
        timed[k] = _measure(work, ctx, cost_fn, private=private)
        steps.append((k, timed[k].get("speedup")))
        if steps[-1][1] is not None and steps[-1][1] >= 1.0:
            k_final = k
            break
    del work, private
    tried = ", ".join(f"{k}: {sp:.2f}x" for k, sp in steps[1:] if sp is not None)
    s_all = timed[n].get("speedup") if n in timed else None
    if k_final is None and (s_all is None or s_all < s0 + NO_HELP):
        note = (f"whole-model guard: the decomposed model is {s0:.2f}x the original ({where}), and giving layers "
                f"back did not help (layers given back of {n}: {tried}): the time is lost outside the factorized "
                f"layers (e.g. the traced graph's own overhead), so the factors stay")
        if _final(ctx):
            ctx.whole_model, ctx.whole_model_done = first, True
        return [], {"before": s0, "after": s0, "steps": steps, "reverted": [], "of": n, "note": note, "reasons": {}}
    k = n if k_final is None else k_final
    done = order[:k]
    reason = f"whole-model guard: the decomposed model was {s0:.2f}x the original ({where}); given back: "
    for name in done:
        rec = ctx.records[name]
        why = ("its measured gain was among the smallest" if rec.time_original_s and rec.time_chosen_s
               else "its speed was never measured")
        revert_layer(gm, ctx, name)
        rec.reason = reason + why
    last = timed.get(k)
    if k == n and last is not None:
        last = dict(last, all_given_back=True)      # the report then says what the remaining gap is
    end = last.get("speedup") if last is not None else None
    shown = ", ".join(done[:6]) + (f", … ({len(done) - 6} more)" if len(done) > 6 else "")
    if k == n:
        note = (f"whole-model guard: the decomposed model was {s0:.2f}x the original ({where}); giving back part "
                f"of its layers was not enough (of {n}: {tried}), so all {n} were given back: the model keeps the "
                f"original layers{f', now {end:.2f}x' if end is not None else ''} (whole_model_guard=False keeps "
                f"the factors)")
    else:
        note = (f"whole-model guard: the decomposed model was {s0:.2f}x the original ({where}); {len(done)} of "
                f"{n} factorized layers given back ({shown}), now {end:.2f}x")     # k < n: end >= 1.0, measured
    if _final(ctx):
        ctx.whole_model, ctx.whole_model_done = last, True
    return done, {"before": s0, "after": end, "steps": steps, "reverted": done, "of": n, "note": note,
                  "reasons": {name: ctx.records[name].reason for name in done}}


def _final(ctx: CompileContext) -> bool:
    """Whether the guard's model is the compiled model (no gates or fusion follow): then its last
    timing is the whole-model check's, and check_speed does not time the same model again."""
    return ctx.config.freeze is None and not ctx.config.fuse_inference
