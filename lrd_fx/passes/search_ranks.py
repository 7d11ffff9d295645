"""search_ranks: time each factor chain at candidate ranks on the device; keep the best rank or revert.

Ranks of a Tucker-2 layer are searched along one scale: the rank pair moves on the line through the
estimate (r_in, r_out), led by the larger of the two. Square layers (r_in = r_out: every 3x3 conv of a
ResNet) move both ranks together, which is the paper's 512->r->r->512 staircase; a 2-D search would cost
the square of the measurements for the same edges.

Candidates are timed as the compiled model will run (cost.timer.Setting): under the caller's autocast
(or Config.timing.amp), in the model's memory format, in the execution form of Config.timing.exec. A
reference kernel timed between the candidates, the spread of the repeats and the load average tell a
busy machine; disturbed timings are measured again and each keeps its least disturbed value (another
process only ever adds time), and a revert, or any decision made while the machine was busy, is
re-checked by re-measuring the ranks it rests on.

Pass-level pieces (tests drive them directly): RankLine (scalar search coordinate -> rank tuple),
LayerGroup (layers measured once together), CandidateTimer (memo -> SQLite cache -> device, with
contention handling) and time_with_refs (new ranks measured beside already-measured neighbours).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .. import dist
from ..context import CompileContext
from ..cost import cache as cache_mod
from ..cost import model as cm
from ..cost.timer import (Measurement, autocast_context, current_cost_fn, current_fake_clock, layer_step,
                          machine_load, measure_interleaved, others_load, reference_step, setting_of, summarize)
from ..errors import LRDError, PassError
from ..factorize import modules as fm
from ..factorize.chain import pending_chain
from ..factorize.ranks import aligned_in
from ..factorize.svd import singular_values
from ..factorize.tucker import unfold
from ..pipeline import PassResult, graph_modules
from ..plan import DECOMPOSED, REVERTED, SEARCHED, LayerRecord
from .decompose import install_chain

ORIGINAL = "original"       # rank key of the original layer in timings and the cache
MIN_BLOCK_S = {"cuda": 0.002, "cpu": 0.02}   # shortest timed block; longer on CPU to average out scheduling
REFINE_ROUNDS = 3           # fine-stage iterations (each narrows a suspected edge 8-fold)
SPREAD_BOUND = 0.15         # a candidate whose repeats spread more (IQR / median) is measured again
REF_BOUND = 0.25            # reference kernel this much slower than its quietest: the machine was busy
LOAD_BOUND = 0.5            # other processes' load per core above which the machine counts as busy
MAX_REMEASURE = 1           # re-measurements of one batch of disturbed timings
MAX_RECHECK = 2             # re-measurements of the ranks one decision rests on
_REF = "__reference__"      # key of the reference kernel among the interleaved candidates
# A Tucker-2 candidate whose lead rank is a multiple of this gets its other rank rounded to one too:
# the multiples of 8 among the candidates are there for aligned kernels, which need both channel counts
# aligned (a lead of 96 with the estimate 103/102 gave 96/95 before, never an aligned pair).
PAIR_ALIGN = 8
# The whole-model plan spends at least this fraction of rank_budget: the fastest model at about the
# parameters asked for (with smaller ranks faster, the fastest plan under the budget alone would be the
# smallest model the windows allow, and less accurate than asked).
BUDGET_FILL = 0.98


@dataclass
class RankLine:
    """Maps the scalar search coordinate s to the layer's rank tuple (data-flow order)."""
    estimate: tuple
    full: tuple
    align: int = 1             # the other rank of a Tucker-2 pair goes to a multiple of this too

    def __post_init__(self):
        if len(self.estimate) == 1:
            self.lead, self.q = 0, 1.0
            self.s_est, self.s_full = self.estimate[0], self.full[0]
        else:
            self.lead = 1 if self.estimate[1] >= self.estimate[0] else 0
            other = 1 - self.lead
            self.q = self.estimate[other] / self.estimate[self.lead]
            self.s_est = self.estimate[self.lead]
            self.s_full = min(self.full[self.lead], int(math.floor(self.full[other] / self.q + 1e-9)))
            self.s_full = max(self.s_full, self.s_est)

    def ranks(self, s: int) -> tuple:
        if len(self.estimate) == 1:
            return (int(s),)
        out = [0, 0]
        out[self.lead] = int(s)
        other = 1 - self.lead
        out[other] = max(1, min(self.full[other], int(round(s * self.q))))
        a = self.align
        if a <= 1 and s % PAIR_ALIGN == 0 and s * self.q >= PAIR_ALIGN:
            a = PAIR_ALIGN     # an aligned candidate is aligned in both ranks (96/95 -> 96/96)
        if a > 1 and self.full[other] >= a and out[other] < self.full[other]:
            out[other] = min(self.full[other], max(a, int(round(s * self.q / a)) * a))
        return tuple(out)


def _key(ranks) -> str:
    return "/".join(str(int(r)) for r in ranks)


def _memory_format(m: nn.Module) -> str:
    return "channels_last" if fm.weight_memory_format(m.weight) == torch.channels_last else "contiguous"


def _signature(m: nn.Module, scheme: str) -> str:
    """Everything about a layer that changes its speed except the input shape and rank."""
    parts = [type(m).__name__, "x".join(map(str, m.weight.shape)), f"bias={m.bias is not None}", scheme]
    for attr in ("stride", "padding", "dilation", "padding_mode"):
        if hasattr(m, attr):
            parts.append(f"{attr}={getattr(m, attr)}")
    if fm.groups_of(m) > 1:     # the weight's shape does not tell a grouped conv from a plain one
        parts.append(f"groups={fm.groups_of(m)}")
    return "|".join(parts)


@dataclass
class LayerGroup:
    """Layers with identical signature, input shape and rank line: measured once."""
    names: list
    module: nn.Module          # the first layer's original (timing uses copies)
    scheme: str
    signature: str
    shape: tuple
    line: RankLine
    memory_format: str
    times: dict = field(default_factory=dict)      # s -> Measurement
    original: Optional[Measurement] = None
    status: str = "pending"    # pending | coarse | done | skipped
    busy: bool = False         # a batch of this group was disturbed (a burst, or spread repeats)
    settled: Optional[dict] = None   # a decision no two successive measurements agreed on (_recheck)
    fresh: bool = False        # some timing of this group was measured in this compile (not all cached)
    timed_original: Optional[nn.Module] = None   # what the original is timed as, where not `module` (std_conv)

    def original_module(self) -> nn.Module:
        return self.module if self.timed_original is None else self.timed_original


class CandidateTimer:
    """Times modules at one shape: in-memory memo, then the SQLite cache, then the device (or cost_fn)."""

    def __init__(self, ctx: CompileContext, cost_fn: Optional[Callable]):
        cfg = ctx.config
        self.ctx = ctx
        self.mode = cfg.rank_search.mode
        self.cost_fn = cost_fn
        self.setting = setting_of(ctx)
        self.repeats = max(1, int(cfg.timing.repeats))
        tag = getattr(cost_fn, "cache_tag", None) if cost_fn is not None else None
        self.objective = self.mode if cost_fn is None else f"{self.mode}:{tag}"
        path = cache_mod.resolve(cfg.timing.cache) if (cost_fn is None or tag) else None
        self.cache = cache_mod.TimingCache(path) if path is not None else None
        self.memo: dict = {}
        self.measured = 0
        self.cached = 0
        # contention: what the reference kernel, the spread of repeats and the load average showed
        self.batches = 0
        self.busy_batches = 0
        self.ref_quiet: Optional[float] = None   # the reference kernel's fastest median: the machine at rest
        self.ref_worst = 1.0                     # its slowest median relative to that
        self.ref_seen: list = []                 # its median in every batch so far
        self.loads: list = []                    # other processes' load per core, one per batch
        self.remeasured = 0                      # timings measured again because they were disturbed
        self.rechecked = 0                       # decisions re-checked by re-measurement
        self.changed = 0                         # ... of which the re-measurement changed
        self.settled = 0                         # ... where no two measurements in a row agreed
        self.edge_checked = 0                    # choices below the estimate re-checked (idle or not)
        self.edge_dropped = 0                    # ... that the re-measurement did not confirm
        self.last_busy = False
        self._ref = None

    def cache_key(self, g: LayerGroup, rank_key: str) -> dict:
        return cache_mod.make_key(device=self.ctx.device, dtype=self.ctx.dtype, memory_format=g.memory_format,
                                  signature=g.signature, input_shape=g.shape, rank=rank_key,
                                  objective=self.objective, amp=self.setting.amp, tf32=self.setting.tf32,
                                  exec_form=self.setting.exec_form)

    def time(self, g: LayerGroup, wanted: dict, refs: Optional[dict] = None) -> dict:
        """{rank key: Measurement} for wanted {rank key: zero-arg module factory}: this compile's memo,
        then the cache, then the device. refs {key: (factory, Measurement)}: already-measured neighbours
        timed in the same batch as what is measured; the new timings are scaled by the median ratio of
        the refs' timings to their new ones, into the frame the refs were measured in (a cost function
        does not drift: refs are then not needed)."""
        out = self.lookup(g, wanted)
        todo = {k: make for k, make in wanted.items() if k not in out}
        if not todo:
            return out
        if not refs or self.cost_fn is not None:
            out.update(self.store(g, self._measure(g, todo)))
            return out
        got = self._measure(g, {**todo, **{k: make for k, (make, _) in refs.items()}})
        ratios = [old.median_s / got[k].median_s for k, (_, old) in refs.items() if got[k].median_s > 0]
        scale = statistics.median(ratios) if ratios else 1.0
        out.update(self.store(g, {k: got[k] for k in todo}, scale))
        return out

    def lookup(self, g: LayerGroup, keys) -> dict:
        """{rank key: Measurement} for those of `keys` already timed: in this compile (the memo), else in
        the cache (counted in `cached`)."""
        out = {}
        for k in keys:
            hit = self.memo.get(self._memo_key(g, k))
            if hit is None and self.cache is not None:
                hit = self.cache.get(self.cache_key(g, k))
                if hit is not None:
                    self.cached += 1
                    self.memo[self._memo_key(g, k)] = hit
            if hit is not None:
                out[k] = hit
        return out

    def store(self, g: LayerGroup, got: dict, scale: float = 1.0) -> dict:
        """Keep fresh measurements {rank key: Measurement} (counted in `measured`): the memo holds them
        times `scale` (the frame the search compares them in), the cache as measured, with the scale.
        Returns the scaled ones."""
        out = {k: m.scaled(scale) if scale != 1.0 else m for k, m in got.items()}
        self.memo.update((self._memo_key(g, k), m) for k, m in out.items())
        self.measured += len(got)
        if self.cache is not None:
            self.cache.put_many((self.cache_key(g, k), m, scale) for k, m in got.items())
        return out

    @staticmethod
    def _memo_key(g: LayerGroup, rank_key: str) -> tuple:
        return (g.signature, g.shape, g.memory_format, rank_key)

    def remeasure(self, g: LayerGroup, wanted: dict, merge: bool = True) -> dict:
        """Measure already-timed keys again; each keeps the less disturbed of its old and new timing
        (merge=False: the new one, an independent sample; _measure has already re-measured what the
        batch saw disturbed)."""
        got = self._measure(g, wanted)
        out, rows = {}, []
        for k, m in got.items():
            mk = self._memo_key(g, k)
            old = self.memo.get(mk)
            best = m if old is None or not merge else _least_disturbed(old, m)
            self.memo[mk] = out[k] = best
            # the cache holds what was measured: `best` may be an older timing rescaled into the
            # coarse stage's frame, which must not be stored as a raw measurement
            rows.append((self.cache_key(g, k), m))
        if self.cache is not None:
            self.cache.put_many(rows)
        return out

    def _measure(self, g: LayerGroup, todo: dict) -> dict:
        """One interleaved batch; timings whose repeats spread beyond SPREAD_BOUND (all of them when the
        reference kernel saw the machine busy) are measured again, up to MAX_REMEASURE times, and
        each keeps its least disturbed value."""
        got = self._measure_once(g, todo)
        for _ in range(MAX_REMEASURE):
            again = list(got) if self.last_busy else [
                k for k, m in got.items() if m.n > 1 and m.rel_noise > SPREAD_BOUND]
            if not again:
                break
            g.busy = True
            fresh = self._measure_once(g, {k: todo[k] for k in again})
            self.remeasured += len(again)
            for k in again:
                got[k] = _least_disturbed(got[k], fresh[k])
        return got

    def _measure_once(self, g: LayerGroup, todo: dict) -> dict:
        mods = {k: make() for k, make in todo.items()}
        dev = self.ctx.device
        self.batches += 1
        g.fresh = True
        if self.cost_fn is not None:
            # the cost function runs in the setting the device would: autocast on, layout applied
            out = {}
            with autocast_context(dev, self.setting.amp):
                for k, m in mods.items():
                    if g.memory_format == "channels_last":
                        m = copy.deepcopy(m).to(memory_format=torch.channels_last)
                    out[k] = _as_measurement(self.cost_fn(m, g.shape, self.mode))
            self.last_busy = False
            return out
        setting = replace(self.setting, memory_format=g.memory_format)
        steps = {k: layer_step(m, g.shape, self.ctx.dtype, dev, self.mode, setting=setting)
                 for k, m in mods.items()}
        del mods
        block = MIN_BLOCK_S["cuda" if dev.type == "cuda" else "cpu"]
        steps[_REF] = self._reference(block)
        got = measure_interleaved(steps, device=dev, rounds=self.repeats, warmup=1, min_time_s=block,
                                  min_times={_REF: block / 4})
        self._observe(g, got.pop(_REF))
        return got

    def _reference(self, block: float):
        """The reference kernel; its quiet time is taken once, on its own, before the first batch."""
        if self._ref is None:
            self._ref = reference_step(self.ctx.device)
            quiet = measure_interleaved({_REF: self._ref}, device=self.ctx.device, rounds=5, warmup=1,
                                        min_time_s=block / 4)[_REF]
            self.ref_quiet = quiet.median_s
        return self._ref

    def _observe(self, g: LayerGroup, ref: Measurement) -> None:
        """Was the machine busy during this batch? The reference kernel slower than its quietest (the
        report says so), or than its usual time, or spread (then the batch is measured again: under a
        load that lasts, its usual time is the frame every candidate shares, and measuring again would
        only cost time); other processes' load is noted (a 1-minute average: it marks the group)."""
        quiet = self.ref_quiet if self.ref_quiet else ref.median_s
        usual = statistics.median(self.ref_seen + [quiet])
        self.ref_seen.append(ref.median_s)
        self.ref_quiet = min(quiet, ref.median_s)
        slow = ref.median_s / quiet if quiet > 0 else 1.0
        self.ref_worst = max(self.ref_worst, slow)
        if slow > 1 + REF_BOUND:
            self.busy_batches += 1
        self.last_busy = (ref.median_s > usual * (1 + REF_BOUND) if usual > 0 else False) or (
            ref.n > 1 and ref.rel_noise > SPREAD_BOUND)
        if self.last_busy:
            g.busy = True
        if current_fake_clock() is None:      # under a fake clock the machine's load says nothing
            load = others_load(*machine_load())
            if load is not None:
                self.loads.append(load)

    def contention(self) -> Optional[str]:
        """A report line when the machine was seen busy, else None."""
        load = max(self.loads) if self.loads else None
        if not (self.busy_batches or self.remeasured or (load is not None and load > LOAD_BOUND)):
            return None
        parts = []
        if self.busy_batches:
            parts.append(f"reference kernel up to {self.ref_worst:.2f}x its quiet time in {self.busy_batches} "
                         f"of {self.batches} batches")
        if load is not None and load > LOAD_BOUND:
            parts.append(f"other processes' load up to {load:.1f} per core")
        parts.append(f"{self.remeasured} timings measured again (each keeps its least disturbed value)")
        if self.rechecked:
            parts.append(f"{self.rechecked} decisions re-checked by re-measurement, {self.changed} changed"
                         + (f", {self.settled} settled by majority" if self.settled else ""))
        return ("rank search: the machine was busy (" + "; ".join(parts) + "); timings are less reliable "
                "than on an idle machine: search again with the machine otherwise idle for the best ranks")

    def close(self):
        if self.cache is not None:
            self.cache.close()


def _least_disturbed(a: Measurement, b: Measurement) -> Measurement:
    """Of two timings of the same thing, the faster: another process can only add time."""
    return a if a.median_s <= b.median_s else b


def _as_measurement(t) -> Measurement:
    """A cost function's answer: seconds, or one sample per repeat (then summarized like real ones)."""
    if isinstance(t, Measurement):
        return t
    if isinstance(t, (list, tuple)):
        return summarize(t)
    t = float(t)
    return Measurement(t, 0.0, 1, t)


def _factory(module: nn.Module, ranks: tuple, scheme: str):
    return lambda: fm.chain_like(module, ranks, scheme)


def _measure_group(g: LayerGroup, timer: CandidateTimer, cfg, deadline: Optional[float]) -> None:
    """Coarse stage (original + grid), then fine stages around suspected edges (deadline permitting)."""
    line, m = g.line, g.module
    coarse = cm.candidate_ranks(line.s_est, line.s_full, cfg.rank_search.window)
    # every aligned rank in the window is a candidate: of Config.align, or, for the whole-model plan, of 8
    # (the ranks the divisor rule would pick are then options of the plan)
    align = line.align if line.align > 1 else PAIR_ALIGN if cfg.rank_search.param_budget is not None else 1
    if align > 1:
        lo, hi = cm.window_bounds(line.s_est, line.s_full, cfg.rank_search.window)
        coarse = sorted(set(coarse) | set(aligned_in(lo, hi, align)))
    wanted = {ORIGINAL: g.original_module}
    wanted.update({_key(line.ranks(s)): _factory(m, line.ranks(s), g.scheme) for s in coarse})
    got = timer.time(g, wanted)
    g.original = got[ORIGINAL]
    g.times = {s: got[_key(line.ranks(s))] for s in coarse}
    g.status = "coarse"
    for _ in range(REFINE_ROUNDS):
        if deadline is not None and time.perf_counter() > deadline:
            return
        new = cm.refine_ranks(g.times, line.s_est, line.s_full, cfg.rank_search.window)
        if not new:
            break
        # Re-time the neighbours with the new ranks and rescale the new ones into the coarse stage's
        # frame, so that drift between the stages does not show up as a step.
        refs = sorted({max([t for t in g.times if t < s] or [min(g.times)]) for s in new} |
                      {min([t for t in g.times if t > s] or [max(g.times)]) for s in new})
        fresh = time_with_refs(timer, g, refs, new)
        g.times.update(fresh)
    g.status = "done"


def _recheck(g: LayerGroup, timer: CandidateTimer, ctx: CompileContext, model, deadline: Optional[float] = None) -> None:
    """A revert, a rank below the estimate (it rests on a step edge, which one noisy batch can fake), or
    any decision made after a disturbed batch, must survive a re-measurement: the original and every
    measured rank are timed again in one interleaved batch (one frame: re-timing a few points only would
    compare them with disturbed neighbours), each keeps its least disturbed timing, and the choice is
    made again, up to MAX_RECHECK times, until two measurements in a row agree. When none do, the
    decision is settled (`g.settled`) by the majority of all of them, a tie going to the largest rank
    (the original layer counting as the largest): a difference that does not reproduce is not worth the
    accuracy. A deterministic cost function (single samples) has nothing to re-check."""
    if g.status == "pending" or g.original is None:
        return
    if any(m.n <= 1 for m in [g.original, *g.times.values()]):
        return
    line = g.line
    first = _choose(g, g.names[0], ctx, model)
    # (timings all from the cache were re-checked when they were measured: the cache holds the last pass)
    below = _below_estimate(g, first) and ctx.config.rank_search.param_budget is None and g.fresh
    if not (g.busy or first["reverted"] or below):
        return
    seen = [first]
    for _ in range(MAX_RECHECK):
        if deadline is not None and time.perf_counter() > deadline:
            break       # rank_search_budget_s: re-checks are measurements too
        wanted = {ORIGINAL: g.original_module}
        wanted.update({_key(line.ranks(s)): _factory(g.module, line.ranks(s), g.scheme) for s in sorted(g.times)})
        # a busy or reverted decision keeps each timing's least disturbed value; a choice below the
        # estimate is judged on the fresh batch alone: a rank that was timed too fast once would keep
        # its lucky time through a merge, and with it the edge it fakes
        got = timer.remeasure(g, wanted, merge=not below or g.busy)
        g.original = got[ORIGINAL]
        g.times = {t: got[_key(line.ranks(t))] for t in g.times}
        timer.rechecked += 1
        again = _choose(g, g.names[0], ctx, model)
        seen.append(again)
        if _decision(again) == _decision(seen[-2]):
            break
        timer.changed += 1
    else:
        if len(seen) > 1:
            g.settled = _settle(seen)
            timer.settled += 1
    if below and len(seen) > 1:
        final = g.settled if g.settled is not None else seen[-1]    # seen[-1]: the last measurement's
        timer.edge_checked += 1
        timer.edge_dropped += _decision(final) != _decision(first)


def _decision(entry: dict) -> tuple:
    return (tuple(entry["ranks"]) if entry["ranks"] is not None else None, entry["reverted"])


def _below_estimate(g: LayerGroup, entry: dict) -> bool:
    """The choice trades rank for time beyond aligning the estimate (more than ALIGN_LOSS below it)."""
    if entry["reverted"]:
        return False
    return _s_of(g.line, entry["ranks"]) < g.line.s_est * (1 - cm.ALIGN_LOSS)


def _settle(seen: list) -> dict:
    """Of decisions that no two successive measurements agreed on: the most frequent; ties go to the
    largest rank, the original layer counting as the largest."""
    def size(e):
        return (math.inf,) if e["reverted"] else tuple(e["ranks"])
    counts: dict = {}
    for e in seen:
        counts.setdefault(_decision(e), []).append(e)
    best = max(counts.values(), key=lambda es: (len(es), size(es[-1])))
    out = dict(best[-1])
    out["reason"] += (f"; settled by re-measurement: {len(best)} of {len(seen)} measurements chose this "
                      "(no two in a row agreed)")
    return out


def time_with_refs(timer: CandidateTimer, g: LayerGroup, refs: list, new: list) -> dict:
    """{s: Measurement} for the fine-stage ranks `new`, measured interleaved with the already-measured
    neighbours `refs` and rescaled into their frame (CandidateTimer.time)."""
    line, m = g.line, g.module
    keys = {_key(line.ranks(s)): s for s in new}
    wanted = {k: _factory(m, line.ranks(s), g.scheme) for k, s in keys.items()}
    neighbours = {f"ref:{_key(line.ranks(s))}": (_factory(m, line.ranks(s), g.scheme), g.times[s]) for s in refs}
    got = timer.time(g, wanted, refs=neighbours)
    return {s: got[k] for k, s in keys.items()}


def _errors(module: nn.Module, scheme: str, line: RankLine, ranks_s) -> dict:
    """Relative reconstruction error per scalar search coordinate (rank_errors)."""
    return rank_errors(module, scheme, [line.ranks(s) for s in ranks_s], keys=ranks_s)


def rank_errors(module, scheme: str, ranks_list: list, keys=None) -> dict:
    """Relative reconstruction error ||W - W'|| / ||W|| at each ranks tuple (keyed by `keys`, default the
    tuples): exact for SVD; for Tucker-2 the HOSVD bound sqrt(e_out^2 + e_in^2) from the singular values of
    the two channel unfoldings. A grouped conv (module.groups > 1; ranks per group): the groups' squared
    errors add up, over the whole weight's energy."""
    w = module.weight.detach().float()
    groups = int(getattr(module, "groups", 1) or 1)
    if scheme == "tucker2":
        spectra = [(singular_values(unfold(wg, 0)), singular_values(unfold(wg, 1))) for wg in w.chunk(groups)]
    else:
        spectra = [(singular_values(wg.reshape(wg.shape[0], -1)),) for wg in w.chunk(groups)]
    energies = [tuple(sv.double().pow(2) for sv in group) for group in spectra]   # squared, once
    total = sum(float(e[0].sum()) for e in energies)
    out = {}
    for key, ranks in zip(keys if keys is not None else ranks_list, ranks_list):
        if scheme == "tucker2":
            r_in, r_out = ranks
            lost = sum(float(e_out[r_out:].sum()) + float(e_in[r_in:].sum()) for e_out, e_in in energies)
        else:
            lost = sum(float(e[ranks[0]:].sum()) for e, in energies)
        out[key] = min(1.0, math.sqrt(max(lost, 0.0) / total)) if total > 0 else 0.0
    return out


def _error_source(ctx: CompileContext, name: str):
    """The original layer, or with calibration data its whitened weight (error = output error)."""
    if ctx.calibration_stats is None:
        return ctx.originals[name]
    from .calibrate import error_source
    return error_source(ctx, name)


def _first_input_shape(gm: fx.GraphModule, rec: LayerRecord) -> Optional[tuple]:
    for _, part in graph_modules(gm):
        for node in part.graph.nodes:
            if node.meta.get("lrd") is rec and node.meta.get("lrd_role") == "first" and node.args:
                tm = getattr(node.args[0], "meta", {}).get("tensor_meta")
                if tm is not None and hasattr(tm, "shape"):
                    return tuple(tm.shape)
    return None


def _choose(g: LayerGroup, name: str, ctx: CompileContext, model) -> dict:
    """Plan entry for one layer of a measured group."""
    cfg = ctx.config
    line = g.line
    errors, options = None, {}
    if cfg.rank_search.objective == "time+error":
        errors = _errors(_error_source(ctx, name), g.scheme, line, list(g.times))
        options = {"errors": errors, "error_weight": cfg.rank_search.error_weight}
    ch = cm.choose(g.times, model=model, estimate=line.s_est, full=line.s_full, original=g.original,
                   window=cfg.rank_search.window, margin=cfg.rank_search.margin,
                   prefer=cfg.rank_search.prefer, **options)
    return _entry(g, ch.rank, ch.reason, errors)


def _entry(g: LayerGroup, s: Optional[int], reason: str, errors=None) -> dict:
    line = g.line
    status = "" if g.status == "done" else " (from the coarse grid: the fine search was cut short)"
    return {
        "ranks": list(line.ranks(s)) if s is not None else None,
        "reverted": s is None,
        "reason": reason + status,
        "time_original_s": g.original.median_s if g.original else None,
        "time_estimate_s": g.times[line.s_est].median_s if line.s_est in g.times else None,
        "time_chosen_s": (g.times[s].median_s if s is not None else g.original.median_s),
        "candidates": {_key(line.ranks(t)): m.median_s for t, m in sorted(g.times.items())},
    }


def _budget_plan(groups: dict, by_name: dict, ctx: CompileContext, model) -> dict:
    """Whole-model mode (RankSearch.param_budget, rank_budget=): per-layer options -> cost.model.plan_budget."""
    cfg = ctx.config
    recs = ctx.records
    tables, entries = {}, {}
    fixed = 0
    total_before = 0
    for name, gid in by_name.items():
        total_before += recs[name].params_before
        g = groups[gid] if gid is not None else None
        if g is None or g.status == "pending":
            fixed += recs[name].params_after
            continue
        orig = ctx.originals[name]
        line = g.line
        rule = _choose(g, name, ctx, model)
        errors = (_errors(_error_source(ctx, name), g.scheme, line, list(g.times))
                  if cfg.rank_search.objective == "time+error" else {})
        lo, hi = cm.window_bounds(line.s_est, line.s_full, cfg.rank_search.window)
        times = {s: m.median_s for s, m in g.times.items()}
        # every measured rank of the window is an option, the multiples of 8 among them (_measure_group)
        keys = {t for t in times if lo <= t <= hi} | {line.s_est}
        if not rule["reverted"]:
            keys.add(_s_of(line, rule["ranks"]))
        opts = [cm.Option(s, fm.chain_params(orig, line.ranks(s), g.scheme), times[s],
                          errors.get(s, 0.0)) for s in sorted(k for k in keys if k in times)]
        opts.append(cm.Option(None, recs[name].params_before, g.original.median_s, 0.0))
        tables[name] = opts
        entries[name] = g
    budget = cfg.rank_search.param_budget * total_before - fixed
    picked = cm.plan_budget(tables, budget, error_weight=cfg.rank_search.error_weight
                            if cfg.rank_search.objective == "time+error" else 0.0, fill=BUDGET_FILL)
    plan = {}
    for name, s in picked.items():
        g = entries[name]
        why = (f"whole-model plan (rank_budget={cfg.rank_search.param_budget}): "
               + ("original layer kept" if s is None else f"rank {_key(g.line.ranks(s))}"))
        plan[name] = _entry(g, s, why)
    return plan


def _s_of(line: RankLine, ranks) -> int:
    return int(ranks[line.lead])


# --- graph rewrite ------------------------------------------------------------------------------

def _revert_nodes(gm: fx.GraphModule, rec: LayerRecord) -> None:
    """Replace every first->[core]->last node run of `rec` by one call of the original layer."""
    for _, part in graph_modules(gm):
        firsts = [n for n in part.graph.nodes
                  if n.meta.get("lrd") is rec and n.meta.get("lrd_role") == "first"]
        for first in firsts:
            run = [first]
            while run[-1].meta.get("lrd_role") != "last":
                nxt = [u for u in run[-1].users if u.op == "call_module" and u.meta.get("lrd") is rec]
                if len(nxt) != 1:
                    raise PassError(f"search_ranks: factor chain of layer '{rec.name}' is broken after "
                                    f"{run[-1].format_node()}; re-run with debug=True to see the graph")
                run.append(nxt[0])
            last = run[-1]
            target = first.target[: -len(".first")]
            with part.graph.inserting_before(first):
                node = part.graph.call_module(target, first.args, first.kwargs)
            node.meta.update({k: v for k, v in last.meta.items() if k != "lrd_role"})
            node.meta["lrd"] = rec
            last.replace_all_uses_with(node)
            for n in reversed(run):
                part.graph.erase_node(n)


def give_back(gm: nn.Module, ctx: CompileContext, name: str) -> None:
    """Put layer `name`'s original back in place of its factors in `gm` (graph nodes and module; the
    record is not touched, the graph not recompiled)."""
    current = gm.get_submodule(name)
    layer = copy.deepcopy(ctx.originals[name])
    layer.train(current.training)
    _revert_nodes(gm, ctx.records[name])
    gm.set_submodule(name, layer)


def revert_layer(gm: nn.Module, ctx: CompileContext, name: str) -> None:
    """give_back, and record layer `name` as reverted (its reason is the caller's to set)."""
    give_back(gm, ctx, name)
    rec = ctx.records[name]
    rec.decision = REVERTED
    rec.ranks = None
    rec.params_after = rec.params_before
    rec.flops_after = rec.flops_before


def _apply(gm: fx.GraphModule, ctx: CompileContext, plan: dict) -> bool:
    # Nothing is factorized here: decompose left the chains pending (exact, factorized on first use);
    # a layer whose ranks change gets a new pending chain at its final ranks, and the materialize pass
    # (or calibrate) factorizes each kept layer once.
    modified = False
    for name, e in plan.items():
        rec = ctx.records[name]
        if e.get("keep"):        # not measured: the estimate stays, the reason says why
            rec.reason = e["reason"]
            continue
        rec.time_original_s = e["time_original_s"]
        rec.time_estimate_s = e["time_estimate_s"]
        rec.time_chosen_s = e["time_chosen_s"]
        rec.candidates = dict(e["candidates"])
        rec.reason = e["reason"]
        if e["reverted"]:
            revert_layer(gm, ctx, name)
            modified = True
            continue
        ranks = tuple(e["ranks"])
        if list(ranks) != list(rec.ranks):
            install_chain(gm, ctx, name, ranks, pending_chain(ctx.originals[name], ranks, rec.scheme, name=name))
            modified = True
        rec.decision = SEARCHED
    return modified   # the PassManager lints and recompiles every part


# --- the pass -----------------------------------------------------------------------------------

def search_ranks(ctx: CompileContext, *, cost_fn: Optional[Callable] = None, cost_model=None):
    """Factory of the rank-search pass.

    cost_fn(module, input_shape, mode) -> seconds replaces timing on the device (tests); default: the
    one installed by lrd_fx.cost.use_cost_fn, else real measurement. cost_model: a name registered
    with lrd_fx.cost.register_cost_model or a callable (default: the one Config.rank_search.objective
    names, cost.model.OBJECTIVES: "staircase" or "time+error").
    """
    cfg = ctx.config
    # the one place where the objective picks the cost model ("time+error" is a model of its own)
    model = cm.model_for(cfg.rank_search.objective, cost_model or cfg.rank_search.cost_model)
    cm.get_cost_model(model)   # fail early on an unknown name

    def run(gm):
        names = [n for n, r in ctx.records.items() if r.decision == DECOMPOSED and n in ctx.originals]
        if not names:
            return PassResult(gm, False)
        plan: dict = {}
        note = ""
        err: Optional[str] = None
        if dist.rank() == 0:
            try:
                plan, note = _search(gm, ctx, names, cost_fn or current_cost_fn(), model)
            except LRDError as e:
                err, exc = str(e), e
            except Exception as e:   # tell the other processes before failing, so they do not hang
                err, exc = f"{type(e).__name__}: {e}", e
        if dist.is_distributed():
            box = dist.broadcast_plan({"plan": plan, "note": note, "error": err})
            plan, note, err = box["plan"], box["note"], box["error"]
        if err is not None:
            if dist.rank() == 0:
                raise exc
            raise PassError(f"search_ranks failed on process 0: {err}")
        if note:
            ctx.notes.append(note)
        modified = _apply(gm, ctx, plan)
        return PassResult(gm, modified)

    run.name = "search_ranks"
    run.requires = ("decompose",)
    return run


def _sibling_expert(gm, ctx: CompileContext, name: str, memo: dict) -> Optional[str]:
    """For an expert's projection in a moe.Experts stand-in that the example inputs routed no token to: the
    same projection of the expert that got the median number of tokens (same weight shape), so that it is
    timed, and decided, like its siblings. None for other layers, or when no sibling ran. `memo` holds the
    answer per projection (the records are scanned once for each, not once for each expert)."""
    from ..moe import is_expert_layer
    if not is_expert_layer(gm, name):
        return None
    prefix = name.rpartition(".")[0] + "."
    if prefix not in memo:
        ran = sorted((r.in_shape[0], n) for n, r in ctx.records.items()
                     if n.startswith(prefix) and n[len(prefix):].isdigit() and r.in_shape)
        memo[prefix] = ran[len(ran) // 2][1] if ran else None
    return memo[prefix]


def _search(gm, ctx: CompileContext, names: list, cost_fn, model) -> tuple[dict, str]:
    cfg = ctx.config
    setting = setting_of(ctx)
    groups: dict = {}
    by_name: dict = {}
    no_shape = []
    lent: dict = {}          # expert layer no example token reached -> the sibling expert whose shape it is timed at
    siblings: dict = {}      # _sibling_expert's answer per projection
    for name in names:
        rec = ctx.records[name]
        orig = ctx.originals[name]
        shape = tuple(rec.in_shape) if rec.in_shape else _first_input_shape(gm, rec)
        if not shape and (sibling := _sibling_expert(gm, ctx, name, siblings)) is not None:
            lent[name], shape = sibling, tuple(ctx.records[sibling].in_shape)
        if not shape:
            no_shape.append(name)
            by_name[name] = None
            continue
        # the decomposed ranks: the rule's estimate, aligned (Config.align) where the rule made it
        line = RankLine(tuple(rec.ranks or rec.estimate), tuple(rec.full_ranks), setting.align)
        # a weight-standardized conv runs as a plain one here (std_conv), but is put back as itself unless
        # factorized: it is timed as itself, standardization included (and cached under its own class)
        timed = (ctx.std_convs or {}).get(name, (None,))[0]
        sig = _signature(orig if timed is None else timed, rec.scheme)
        # NHWC when the model's weights or inputs are (activations stay NHWC through the convs)
        mf = "channels_last" if setting.memory_format == "channels_last" and orig.weight.dim() == 4 \
            else _memory_format(orig)
        gid = (sig, shape, mf, line.estimate, line.full)
        if gid not in groups:
            groups[gid] = LayerGroup([], orig, rec.scheme, sig, shape, line, mf, timed_original=timed)
        groups[gid].names.append(name)
        by_name[name] = gid

    timer = CandidateTimer(ctx, cost_fn)
    t0 = time.perf_counter()
    deadline = t0 + cfg.rank_search.budget_s if cfg.rank_search.budget_s is not None else None
    stopped = None
    from tqdm.auto import tqdm
    bar = tqdm(total=len(groups), desc="rank search", unit="layer", disable=not cfg.progress, leave=False)
    try:
        for g in groups.values():
            if deadline is not None and time.perf_counter() > deadline:
                stopped = f"rank_search_budget_s={cfg.rank_search.budget_s:g} s was spent before this layer"
                break
            bar.set_postfix_str(g.names[0] + (f" (+{len(g.names) - 1} alike)" if len(g.names) > 1 else ""))
            _measure_group(g, timer, cfg, deadline)
            if deadline is None or time.perf_counter() <= deadline:
                _recheck(g, timer, ctx, model, deadline)
            bar.update(1)
    except KeyboardInterrupt:
        stopped = "the rank search was interrupted (Ctrl-C) before this layer was measured"
    finally:
        bar.close()
        timer.close()
    elapsed = time.perf_counter() - t0

    if cfg.rank_search.param_budget is not None:
        plan = _budget_plan(groups, by_name, ctx, model)
    else:
        plan = {}
        for name, gid in by_name.items():
            g = groups.get(gid) if gid is not None else None
            if g is not None and g.status != "pending":
                # a settled decision holds for the group; with the time+error objective each layer's own
                # errors decide, from the last measurement
                settled = g.settled is not None and cfg.rank_search.objective == "time"
                plan[name] = dict(g.settled) if settled else _choose(g, name, ctx, model)
    for name, sibling in lent.items():
        if name in plan and "reason" in plan[name] and not plan[name].get("keep"):
            plan[name] = {**plan[name], "reason": f"{plan[name]['reason']}; timed at the input shape of expert "
                                                  f"'{sibling}' (the example inputs routed no token to this one)"}
    for name in names:
        if name not in plan:
            why = ("no input shape (the layer did not run on the example inputs)" if name in no_shape
                   else stopped or "not measured")
            plan[name] = {"keep": True,
                          "reason": f"{ctx.records[name].reason}; rank search skipped: {why}; kept the estimate"}
    done = sum(g.status != "pending" for g in groups.values())
    note = (f"rank search ({cfg.rank_search.mode}; timed with {setting.describe()}"
            + (f", ranks aligned to {setting.align}" if setting.align > 1 else "")
            + f"): {done} of {len(groups)} distinct layer shapes, "
            f"{timer.measured} timings measured, {timer.cached} from the cache, {elapsed:.1f} s"
            + (f"; {timer.edge_checked} choices below the estimate re-measured, "
               f"{timer.edge_checked - timer.edge_dropped} confirmed" if timer.edge_checked else "")
            + (f"; stopped: {stopped}" if stopped else ""))
    busy = timer.contention()
    if busy:
        note += "\n" + busy
    return plan, note
