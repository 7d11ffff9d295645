"""Cost models of the rank search ("staircase": time only, "time+error"): from a measured {rank: time}
curve pick a rank, or revert; plus the whole-model plan under a parameter budget."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError
from ..registry import Registry
from .timer import Measurement

Time = Union[float, Measurement]

# Relative noise below which two medians are never called different (interleaved medians on a quiet
# machine are good to about 1%; a shared 2-core machine is worse, which the IQRs then show).
NOISE_FLOOR = 0.01
# A jump between neighbouring measured ranks counts as a step edge only above this relative size
# (the CPU staircase steps are +12-13%; GPU tile steps are larger).
EDGE_THRESHOLD = 0.05
# Snapping down to an aligned rank may cost at most this fraction of the rank.
ALIGN_LOSS = 1 / 16
ALIGNMENTS = (64, 32, 16, 8)
# Medians further apart than this are never "tied", however noisy the machine: on a badly shared
# machine the IQRs can exceed the medians, and a 4x slower rank must still not count as equal.
TIE_CAP = 0.25


@dataclass
class Choice:
    """Outcome of a cost model for one layer (ranks are the scalar search coordinate)."""
    rank: Optional[int]          # chosen rank; None when reverted
    reverted: bool
    reason: str
    time_s: Optional[float] = None   # median time at the chosen rank (the original's when reverted)
    edges: list = field(default_factory=list)   # ranks just below detected step edges


# --- registry -----------------------------------------------------------------------------------

COST_MODELS: Registry[Callable[..., Choice]] = Registry(
    "cost model", hint="add one with @lrd_fx.cost.register_cost_model('name') and select it with "
                       "compile(..., rank_search_cost_model='name')")


def register_cost_model(name: Optional[str] = None, fn=None):
    """Make `fn(curve, *, estimate, full, original, **options) -> Choice` selectable by name (decorator,
    or a call with fn)."""
    return COST_MODELS.register(name) if fn is None else COST_MODELS.register(name, fn)


def get_cost_model(name_or_fn) -> Callable[..., Choice]:
    """A registered cost model by name (ConfigError listing the known ones), or a callable as is."""
    return COST_MODELS.get(name_or_fn)


# --- helpers ------------------------------------------------------------------------------------

def median_of(t: Time) -> float:
    return t.median_s if isinstance(t, Measurement) else float(t)


def estimate_noise(curve: Mapping[int, Time], floor: float = NOISE_FLOOR) -> float:
    """Relative uncertainty of one median: ~0.93 * IQR / sqrt(n) for near-normal samples, taken as the
    median over the candidates (so one disturbed candidate does not blind the rule)."""
    rel = [m.rel_noise * 0.93 / math.sqrt(m.n) for m in curve.values()
           if isinstance(m, Measurement) and m.n > 1 and m.median_s > 0]
    return max(floor, statistics.median(rel)) if rel else floor


def window_bounds(estimate: int, full: int, window: float) -> tuple[int, int]:
    """[lo, hi]: estimate +- window (fraction), clipped to [1, full]."""
    lo = max(1, int(math.floor(estimate * (1 - window))))
    hi = min(int(full), int(math.ceil(estimate * (1 + window))))
    return min(lo, hi), hi


def alignment(r: int) -> int:
    """Largest of 64/32/16/8 dividing r, else 1."""
    for a in ALIGNMENTS:
        if r % a == 0:
            return a
    return 1


def find_edges(times: Mapping[int, float], threshold: float) -> list[tuple[int, int, float]]:
    """Step edges (a, b, jump) between neighbouring measured ranks a < b (the paper's "local maximum of
    the derivative of time vs rank").

    The step must persist above a: jump = min(t(b), t(rank after b)) / t(a) - 1, so that one timing
    slowed down by another process makes no edge (such noise only ever adds time), while a single fast
    rank (the valley at a multiple of 16 that blocked CPU kernels show) still is one. The jump must
    exceed `threshold` plus what the curve's ordinary slope (median per-rank slope) explains over b - a.
    """
    rs = sorted(r for r in times if times[r] > 0)
    if len(rs) < 2:
        return []
    slope = max(0.0, statistics.median((times[b] / times[a] - 1.0) / (b - a) for a, b in zip(rs, rs[1:])))
    out = []
    for i in range(len(rs) - 1):
        a, b = rs[i], rs[i + 1]
        right = min(times[r] for r in rs[i + 1:i + 3])
        jump = right / times[a] - 1.0
        if jump - slope * (b - a) > threshold:
            out.append((a, b, jump))
    return out


def candidate_ranks(estimate: int, full: int, window: float = 0.25, max_coarse: int = 12) -> list[int]:
    """Coarse stage: the estimate, the window ends, a power-of-two grid, the multiples of 64/32/16 in
    the window (up to 16 of each), and the estimate rounded down to 8/16/32/64 (never above full rank)."""
    lo, hi = window_bounds(estimate, full, window)
    step = 1
    while (hi - lo) / step > max_coarse:
        step *= 2
    ranks = {min(estimate, full), lo, hi}
    ranks.update(r for r in range(-(-lo // step) * step, hi + 1, step) if r >= 1)
    for a in (64, 32, 16):
        aligned = [r for r in range(-(-lo // a) * a, hi + 1, a) if r >= 1]
        if len(aligned) <= 16:   # very wide windows: the coarser multiples only
            ranks.update(aligned)
    for a in ALIGNMENTS:
        r = (estimate // a) * a
        if lo <= r <= hi:
            ranks.add(r)
    return sorted(r for r in ranks if 1 <= r <= full)


def refine_ranks(curve: Mapping[int, Time], estimate: int, full: int, window: float = 0.25, *,
                 threshold: float = EDGE_THRESHOLD, noise: Optional[float] = None,
                 per_edge: int = 8) -> list[int]:
    """Fine stage: unmeasured ranks that would locate the suspected edges in the window more exactly
    (every rank when the gap is <= per_edge, else per_edge evenly spaced ones: call again until it
    returns []), plus the multiples of 8 just below each located edge at or under the estimate."""
    lo, hi = window_bounds(estimate, full, window)
    times = {r: median_of(t) for r, t in curve.items()}
    thr = max(threshold, min(TIE_CAP, 2 * (noise if noise is not None else estimate_noise(curve))))
    want: set[int] = set()
    for a, b, _ in find_edges(times, thr):
        if b < lo or a > hi:
            continue
        gap = b - a
        if gap > 1:
            stride = 1 if gap <= per_edge else -(-gap // per_edge)
            want.update(range(a + stride, b, stride))
        elif a <= estimate:
            floor_ = max(lo, int(a * (1 - ALIGN_LOSS)))
            want.update(r for r in range(-(-floor_ // 8) * 8, a, 8))
    return sorted(r for r in want if r not in times and 1 <= r <= full)


# --- shared by the per-layer rules ----------------------------------------------------------------

@dataclass
class Frame:
    """One layer's measured curve as the per-layer rules read it."""
    times: dict                # rank -> median seconds, every measured rank in [1, full]
    lo: int                    # the window [lo, hi] around the estimate
    hi: int
    win: list                  # measured ranks in the window, ascending
    estimate: int              # the estimate, or the measured window rank nearest to it
    tol: float                 # relative difference under which two medians tie
    edge_at: dict              # a -> (b, jump): step edges between neighbouring measured ranks a < b
    original: Optional[float]  # median time of the original layer (None: not measured)


def frame(curve: Mapping[int, Time], estimate: int, full: int, original: Optional[Time] = None, *,
          window: float = 0.25, noise: Optional[float] = None,
          edge_threshold: float = EDGE_THRESHOLD) -> Frame:
    """Medians in the window, the tie tolerance tol = 2 * noise (estimated from the IQRs unless given;
    at least 1%, capped at TIE_CAP) and the step edges above max(edge_threshold, tol)."""
    times = {int(r): median_of(t) for r, t in curve.items() if 1 <= int(r) <= full}
    lo, hi = window_bounds(estimate, full, window)
    win = sorted(r for r in times if lo <= r <= hi)
    if not win:
        raise ValueError(f"no measured rank in the window [{lo}, {hi}] around estimate {estimate}")
    if estimate not in times:   # measured nearest rank stands in for the estimate
        estimate = min(win, key=lambda r: (abs(r - estimate), r))
    tol = min(TIE_CAP, 2 * (noise if noise is not None else estimate_noise(curve)))
    edges = {a: (b, j) for a, b, j in find_edges(times, max(edge_threshold, tol))}
    return Frame(times, lo, hi, win, estimate, tol, edges,
                 median_of(original) if original is not None else None)


def _ms(t: float) -> str:
    return f"{t * 1e3:.3g} ms"


def _check_prefer(prefer: str) -> None:
    if prefer not in ("speed", "accuracy"):
        raise ConfigError(f"prefer={prefer!r} must be 'speed' or 'accuracy'")


def beat_original(f: Frame, chosen: int, reason: str, margin: float) -> Choice:
    """The Choice for `chosen`, unless it is not faster than the original by `margin`: then the largest
    window rank that is, and when none is, the original layer (reverted)."""
    t, edges = f.times, sorted(f.edge_at)
    if f.original is None:
        return Choice(chosen, False, reason, t[chosen], edges)
    limit = f.original * (1 - margin)
    if t[chosen] > limit:
        faster = [r for r in f.win if t[r] <= limit]
        if not faster:
            best = min(f.win, key=lambda r: t[r])
            return Choice(None, True, f"original layer ({_ms(f.original)}) is not beaten by {margin:.0%} by any "
                          f"rank in [{f.lo}, {f.hi}] (fastest: rank {best}, {_ms(t[best])}): reverted",
                          f.original, edges)
        was, chosen = chosen, max(faster)
        reason = (f"rank {was} ({_ms(t[was])}) is not {margin:.0%} faster than the original "
                  f"({_ms(f.original)}); largest rank that is: {chosen}")
    return Choice(chosen, False, f"{reason}; {f.original / t[chosen]:.2f}x vs original", t[chosen], edges)


# --- the default rule: time only ----------------------------------------------------------------

@register_cost_model("staircase")
def staircase(curve: Mapping[int, Time], *, estimate: int, full: int, original: Optional[Time] = None,
              window: float = 0.25, margin: float = 0.03, prefer: str = "speed", noise: Optional[float] = None,
              edge_threshold: float = EDGE_THRESHOLD, align_loss: float = ALIGN_LOSS) -> Choice:
    """Choose a rank from a measured step-time curve (the paper's rule).

    Candidates are the measured ranks in [estimate*(1-window), estimate*(1+window)], never above `full`.
    Two medians are "tied" when they differ by less than tol = 2 * noise (noise: the relative
    uncertainty of one median, estimated from the IQRs unless given; at least 1%), capped at 25%.

      1. Find step edges: neighbouring measured ranks a < b whose time jumps by more than
         max(edge_threshold, tol) beyond the curve's ordinary slope.
      2. Base rank: a, for the nearest edge with a <= estimate inside the window whose time is below
         the estimate's ("the rank just below the nearest step edge at or under the estimate":
         257 -> 256). With no such edge the estimate is already on the cheapest step the window
         allows: base = estimate.
      3. prefer="speed": among ranks on base's step that are within align_loss (1/16) below base and
         tie with it, take the one with the largest alignment (64, then 32, 16, 8), else base.
         prefer="accuracy": take the highest rank of base's step (inside the window) whose time ties
         with base's: rank that costs no measurable time (this may be above the estimate).
    Revert: when `original` is given and the choice is not faster than it by `margin`, take the largest
    window rank that is; when none is, revert to the original layer.
    """
    _check_prefer(prefer)
    f = frame(curve, estimate, full, original, window=window, noise=noise, edge_threshold=edge_threshold)
    base, reason = _base_rank(f)
    step = _step_of(f, base)
    if prefer == "accuracy":
        chosen = max(step)
        if chosen != base:
            reason += f"; rank {chosen} costs the same (top of the step, prefer='accuracy')"
    else:
        chosen, why = _aligned(step, base, align_loss)
        reason += why
    return beat_original(f, chosen, reason, margin)


def _base_rank(f: Frame) -> tuple[int, str]:
    """Step 2: the rank just below the nearest edge at or under the estimate, if faster than the estimate
    (on a clean staircase it always is; noise or a comb can break that), else the estimate."""
    t, est = f.times, f.estimate
    below = [a for a in f.edge_at if f.lo <= a <= est and (a == est or t[a] < t[est])]
    if not below:
        return est, f"no step edge in [{f.lo}, {est}]: estimate {est} is on the cheapest step"
    base = max(below)
    nxt, jump = f.edge_at[base]
    return base, f"rank {base} is just below the step {base}->{nxt} (+{jump:.0%})"


def _step_of(f: Frame, base: int) -> list[int]:
    """The measured window ranks between the edges around `base` whose time ties with base's."""
    step_lo = max([a for a in f.edge_at if a < base] + [f.lo - 1]) + 1
    step_hi = min([a for a in f.edge_at if a >= base] + [f.hi])
    return [r for r in f.win if step_lo <= r <= step_hi and f.times[r] <= f.times[base] * (1 + f.tol)]


def _aligned(step: list[int], base: int, align_loss: float) -> tuple[int, str]:
    """Step 3, prefer="speed": the most aligned rank of the step within align_loss below base."""
    near = [r for r in step if r <= base and base - r <= align_loss * base]
    for a in ALIGNMENTS:
        aligned = [r for r in near if r % a == 0]
        if aligned and alignment(base) < a:
            chosen = max(aligned)
            return chosen, f"; aligned to {chosen} (multiple of {a}, same time)"
    return base, ""


# --- time and reconstruction error ---------------------------------------------------------------

@register_cost_model("time+error")
def time_plus_error(curve: Mapping[int, Time], *, estimate: int, full: int, original: Optional[Time] = None,
                    errors: Optional[Mapping[int, float]] = None, error_weight: float = 1.0,
                    window: float = 0.25, margin: float = 0.03, prefer: str = "speed",
                    noise: Optional[float] = None, edge_threshold: float = EDGE_THRESHOLD) -> Choice:
    """Minimise t(r) / t_ref + error_weight * errors[r] over the window (Config objective "time+error").

    t_ref is the original layer's time (the estimate's if not given), errors[r] the relative
    reconstruction error at rank r (from singular values). Scores within tol (as in `staircase`, in
    units of t_ref) tie; ties go to lower time ("speed") or higher rank ("accuracy"). The margin and
    revert are those of `staircase`.
    """
    _check_prefer(prefer)
    f = frame(curve, estimate, full, original, window=window, noise=noise, edge_threshold=edge_threshold)
    missing = [r for r in f.win if errors is None or r not in errors]
    if missing:
        raise ValueError(f"the 'time+error' cost model needs errors for ranks {missing[:8]}")
    t = f.times
    t_ref = f.original if f.original else t[f.estimate]
    score = {r: t[r] / t_ref + error_weight * errors[r] for r in f.win}
    best = min(score.values())
    ties = [r for r in f.win if score[r] <= best + f.tol * t[r] / t_ref]
    chosen = max(ties) if prefer == "accuracy" else min(ties, key=lambda r: (t[r], -r))
    reason = (f"min time/t_ref + {error_weight:g}*error in [{f.lo}, {f.hi}]: rank {chosen} "
              f"({_ms(t[chosen])}, error {errors[chosen]:.3g})")
    return beat_original(f, chosen, reason, margin)


# RankSearch.objective -> the cost model it selects when no cost model is named.
OBJECTIVES = {"time": "staircase", "time+error": "time+error"}


def model_for(objective: str = "time", cost_model=None):
    """The cost model a rank search applies: `cost_model` (a registered name or a callable) when given,
    else the one `objective` names ("time": "staircase", "time+error": "time+error")."""
    if cost_model is not None:
        return cost_model
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise ConfigError(f"objective={objective!r} must be one of {sorted(OBJECTIVES)}") from None


def choose(curve: Mapping[int, Time], *, model="staircase", **options) -> Choice:
    """Apply the cost model `model` (a registered name or a callable) to one layer's curve."""
    return get_cost_model(model)(curve, **options)


# --- whole-model mode ---------------------------------------------------------------------------

@dataclass
class Option:
    key: object           # a rank, or None for "keep the original layer"
    params: int
    time_s: float
    error: float = 0.0    # relative reconstruction error (0 for the original)


def plan_budget(tables: Mapping[str, Sequence[Option]], budget_params: float, *,
                error_weight: float = 0.0, spend: float = 0.02, buckets: int = 4000, fill: float = 0.0) -> dict:
    """Whole-model choice: one option per layer minimising total time under a parameter budget.

    Cost of an option = time_s + error_weight * error * (time of the layer's original) - a small
    credit for parameters, so that among near-optimal plans the budget is spent on rank:
    filling the whole budget is worth `spend` (2%) of the total time. Group knapsack by dynamic
    programming over `buckets` buckets of the slack (the budget minus every layer's smallest option):
    each layer's smallest option costs no bucket and every larger one is rounded up, so the plan of
    smallest options is always reachable and every plan returned holds the budget exactly.
    `fill` in [0, 1): the plan must also spend at least that fraction of the budget (to within a bucket
    per layer, as options are rounded up), where some plan can (else the largest plan there is): the
    fastest plan at about the parameters asked for, not a smaller model.
    Returns {layer: key}; when even the smallest options exceed the budget, those are taken.
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets={buckets!r} must be an int >= 1")
    if not 0.0 <= fill < 1.0:
        raise ValueError(f"fill={fill!r} must be in [0, 1)")
    names = list(tables)
    if not names:
        return {}
    for n in names:
        if not tables[n]:
            raise ValueError(f"layer {n!r} has no options")
    base = {n: min(o.params for o in tables[n]) for n in names}
    smallest = sum(base.values())
    if smallest > budget_params:
        return {n: min(tables[n], key=lambda o: (o.params, o.time_s)).key for n in names}
    orig_t = {n: max((o.time_s for o in tables[n] if o.key is None), default=0.0) for n in names}
    total_t = sum(min(o.time_s for o in tables[n]) for n in names)
    credit = spend * total_t / max(budget_params, 1.0)
    slack = budget_params - smallest
    unit = slack / buckets if slack > 0 else 0.0
    cap = buckets

    def weight(o: Option, n: str) -> int:
        extra = o.params - base[n]
        if extra <= 0:
            return 0
        # rounded up: the rounded plan never holds more parameters than the budget allows
        return cap + 1 if unit <= 0 else int(math.ceil(extra / unit - 1e-9))

    dp = np.full(cap + 1, np.inf)     # min cost with used weight exactly c
    dp[0] = 0.0
    back = []
    for n in names:
        opts = tables[n]
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for i, o in enumerate(opts):
            wi = weight(o, n)
            if wi > cap:
                continue
            ci = o.time_s + error_weight * o.error * orig_t[n] - credit * o.params
            cand = np.full(cap + 1, np.inf)
            cand[wi:] = dp[:cap + 1 - wi] + ci
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        dp = new
        back.append(arg)
    # the cheapest plan spending at least fill * budget (in buckets above the smallest options; when no
    # plan spends that much, the largest that any plan spends); the smaller plan among equal costs
    floor_ = int(math.floor((fill * budget_params - smallest) / unit)) if unit > 0 and fill > 0 else 0
    floor_ = min(max(floor_, 0), int(np.flatnonzero(np.isfinite(dp)).max()))
    c = floor_ + int(np.argmin(dp[floor_:]))
    out = {}
    for n, arg in zip(reversed(names), reversed(back)):
        i = int(arg[c])
        if i < 0:    # unreachable: c starts at a finite entry, and each step back lands on one
            raise AssertionError(f"plan_budget: no plan for layer {n!r} at bucket {c}")
        o = tables[n][i]
        out[n] = o.key
        c -= weight(o, n)
    return {n: out[n] for n in names}
