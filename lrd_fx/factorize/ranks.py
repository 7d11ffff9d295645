"""Rank rules: parameter counts, ratio/energy budgets and the EVBMF rank estimate.

Rank tuples are in data-flow order everywhere in lrd_fx: SVD (r,), Tucker-2 (r_in, r_out) (the
first 1x1 maps in -> r_in, the core r_in -> r_out, the last 1x1 r_out -> out), as in LayerRecord.ranks,
saved plans and the rank= option.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .svd import singular_values
from .tucker import unfold

# Relative slack when comparing float budgets, so e.g. ratio=0.25 of 64*64 admits exactly 1024.
_EPS = 1e-9


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (ratio > 0):
        raise ConfigError(f"ratio={ratio!r} must be a number in (0, 1], e.g. ratio=0.25")
    return float(ratio)


def _check_energy(energy: float) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0 < energy <= 1):
        raise ConfigError(f"energy={energy!r} must be in (0, 1], e.g. energy=0.9")
    return float(energy)


# --- parameter counts and ratio rules -----------------------------------------------------------

def svd_params(m: int, n: int, r: int) -> int:
    """Weights of an [m, n] matrix split into [m, r] @ [r, n] (bias not included)."""
    return r * (m + n)


def svd_rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Largest r >= 1 with r*(m+n) <= ratio*m*n, capped at min(m, n)."""
    ratio = _check_ratio(ratio)
    budget = ratio * m * n * (1 + _EPS)
    r = int(math.floor(budget / (m + n)))
    while r > 1 and r * (m + n) > budget:   # float floor can land one too high
        r -= 1
    return max(1, min(r, m, n))


def tucker2_params(out: int, inp: int, kernel_numel: int, ranks: tuple[int, int]) -> int:
    """Weights of a Tucker-2 chain at ranks (r_in, r_out): 1x1 in->r_in, k r_in->r_out, 1x1 r_out->out
    (bias not included)."""
    r_in, r_out = ranks
    return inp * r_in + r_in * r_out * kernel_numel + r_out * out


def tucker2_ranks_for_ratio(out: int, inp: int, kernel_numel: int, ratio: float) -> tuple[int, int]:
    """(r_in, r_out) with r_in/inp ≈ r_out/out, the largest whose params <= ratio*out*inp*k.

    With r_out = a*out, r_in = a*inp the budget is the quadratic
    (out*inp*k) a^2 + (inp^2 + out^2) a - ratio*out*inp*k = 0; its root is floored per mode,
    each mode then gets +1 where the bound still holds. Ranks never go below 1, so a tiny
    ratio can give (1, 1) above the bound.
    """
    ratio = _check_ratio(ratio)
    k = kernel_numel
    c = out * inp * k
    budget = ratio * c * (1 + _EPS)
    b = inp * inp + out * out
    a = (-b + math.sqrt(b * b + 4.0 * c * ratio * c)) / (2.0 * c)
    r_out = max(1, min(out, int(math.floor(a * out))))
    r_in = max(1, min(inp, int(math.floor(a * inp))))

    def fits(ri, ro):
        return tucker2_params(out, inp, k, (ri, ro)) <= budget

    # Undo the flooring where the bound allows (never past ceil(a*dim), which keeps the balance),
    # the mode that lags the common fraction first.
    cap_out = max(1, min(out, int(math.ceil(a * out))))
    cap_in = max(1, min(inp, int(math.ceil(a * inp))))
    for _, mode in sorted(((r_out / out, "out"), (r_in / inp, "in"))):
        if mode == "out" and r_out < cap_out and fits(r_in, r_out + 1):
            r_out += 1
        elif mode == "in" and r_in < cap_in and fits(r_in + 1, r_out):
            r_in += 1
    # Shrink the relatively larger mode while over budget (only reachable through the >= 1 clamp).
    while not fits(r_in, r_out) and (r_out > 1 or r_in > 1):
        if r_in == 1 or (r_out > 1 and r_out / out >= r_in / inp):
            r_out -= 1
        else:
            r_in -= 1
    return r_in, r_out


# --- energy rule --------------------------------------------------------------------------------

def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold >= energy of the total sum of squares (>= 1)."""
    energy = _check_energy(energy)
    s2 = singular_values.detach().double().flatten().pow(2)
    if s2.numel() == 0:
        return 1
    cum = torch.cumsum(s2, 0)
    total = float(cum[-1])
    if total == 0.0:
        return 1
    # The cumulative sum's own last entry is the total, so energy=1 always finds a rank.
    need = energy * total * (1 - 1e-12)
    r = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)).item()) + 1
    return max(1, min(r, s2.numel()))


# --- EVBMF rule (Nakajima, Sugiyama, Babacan, Tomioka 2013, "Global analytic solution of
# fully-observed variational Bayesian matrix factorization", JMLR) ---------------------------------
# Follows the analytic EVBMF of the "VBMF" package (CasvandenBogaard/VBMF) that
# pytorch-tensor-decompositions uses: the noise variance sigma2 minimises the free energy over
# [lower, upper]; components whose singular value exceeds the threshold are kept.

def _tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _evb_free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    H = s.size
    alpha = L / M
    x = s ** 2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    obj = term1 + term2 + term3 + term4 + residual / (M * sigma2) + (L - H) * math.log(sigma2)
    return float(obj)


def _minimize_bounded(f, lo: float, hi: float, grid: int = 200, iters: int = 60) -> float:
    """Global-ish minimum of f on [lo, hi]: log-spaced grid, then golden section around the best."""
    if not hi > lo:
        return hi
    llo, lhi = math.log(lo), math.log(hi)
    pts = [llo + (lhi - llo) * i / (grid - 1) for i in range(grid)]
    vals = [f(math.exp(p)) for p in pts]
    best = min(range(grid), key=lambda i: (math.isnan(vals[i]), vals[i]))
    a, b = pts[max(best - 1, 0)], pts[min(best + 1, grid - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    x, fx = (c, fc) if fc < fd else (d, fd)
    return math.exp(x) if fx <= vals[best] else math.exp(pts[best])


def evbmf_rank_from_singular_values(s: Tensor, m: int, n: int) -> int:
    """EVBMF rank of an [m, n] matrix given all min(m, n) of its singular values (>= 1)."""
    # numpy: hundreds of objective evaluations on small vectors, where torch's per-op overhead dominates.
    s = np.asarray(torch.as_tensor(s).detach().double().cpu().flatten().numpy(), dtype=np.float64)
    L, M = min(m, n), max(m, n)
    H = s.size
    if L <= 1 or H == 0 or float(s.max()) == 0.0:
        return 1
    # Exact zeros (rank-deficient unfoldings) would make log(x) = -inf for every sigma2.
    s = np.maximum(s, float(s.max()) * 1e-7)
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    residual = 0.0   # all L singular values are used, so nothing is left outside the model
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (float(np.sum(s ** 2)) + residual) / (L * M)
    lower = max(float(s[eH_ub + 1] ** 2) / (M * xubar), float(np.mean(s[eH_ub + 1:] ** 2)) / M)
    sigma2 = _minimize_bounded(lambda v: _evb_free_energy(v, L, M, s, residual, xubar), lower, upper)
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


def evbmf_rank(matrix: Tensor, *, name: str = "") -> int:
    """Rank estimated by analytic Empirical Variational Bayes Matrix Factorization (>= 1)."""
    m, n = matrix.shape
    return evbmf_rank_from_singular_values(singular_values(matrix, name=name), m, n)


# --- Tucker-2 versions: the matrix rule on the mode-1 (in) and mode-0 (out) unfoldings ----------

def tucker2_ranks_energy(weight: Tensor, energy: float, *, name: str = "") -> tuple[int, int]:
    """(r_in, r_out): energy_rank of the mode-1 (in) and mode-0 (out) unfoldings of a [out, in, *k] kernel."""
    w = weight.detach()
    return (energy_rank(singular_values(unfold(w, 1), name=name), energy),
            energy_rank(singular_values(unfold(w, 0), name=name), energy))


def tucker2_ranks_vbmf(weight: Tensor, *, name: str = "") -> tuple[int, int]:
    """(r_in, r_out): evbmf_rank of the mode-1 (in) and mode-0 (out) unfoldings of a [out, in, *k] kernel."""
    w = weight.detach()
    return evbmf_rank(unfold(w, 1), name=name), evbmf_rank(unfold(w, 0), name=name)


# --- hardware alignment -------------------------------------------------------------------------

def align_rank(r: int, align: int, full: int) -> int:
    """Rank `r` rounded to the alignment unit `align` (e.g. 8: half-precision tensor-core tiles).

    The rule: round down to a multiple of `align` (fewer parameters, never more than the rule's
    budget), but never below one unit (a rank under `align` becomes `align`); the full rank (exact)
    and ranks of layers whose full rank is below one unit stay as they are; never above `full`.
    """
    r, align, full = int(r), int(align or 1), int(full)
    if align <= 1 or r >= full or full < align:
        return r
    return min(full, max(align, (r // align) * align))


def aligned_in(lo: int, hi: int, align: int) -> list[int]:
    """Every multiple of `align` in [lo, hi] (empty for align <= 1: every rank is aligned to 1)."""
    align = int(align or 1)
    if align <= 1:
        return []
    return list(range(-(-max(1, lo) // align) * align, hi + 1, align))
