"""Truncated SVD of weight matrices (float64 Gram eigensolver; certified randomized SVD for big low-rank cases), with rank/finite checks."""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Optional

import torch
from torch import Tensor

from ..errors import FactorizationError, RankError


def _label(name: str) -> str:
    return f"layer {name!r}" if name else "the weight"


def check_finite(t: Tensor, name: str = "", what: str = "weight") -> None:
    """Raise FactorizationError when `t` holds NaN or Inf (SVD would return garbage or fail)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FactorizationError(
            f"{_label(name)}: {what} of shape {list(t.shape)} has {bad} NaN/Inf value(s) and cannot be "
            f"factorized; fix the weights (or skip this layer with skip=[{name!r}])")


def check_rank(rank, low: int, high: int, name: str = "", what: str = "rank", shape=None) -> int:
    """Return `rank` as an int if low <= rank <= high, else raise RankError naming the valid range."""
    where = f" for weight shape {list(shape)}" if shape is not None else ""
    try:
        if isinstance(rank, bool):
            raise TypeError
        rank = operator.index(rank)   # accepts numpy/torch integers, rejects floats
    except TypeError:
        raise RankError(f"{_label(name)}: {what}={rank!r} must be an int in [{low}, {high}]{where}") from None
    if not low <= rank <= high:
        raise RankError(
            f"{_label(name)}: {what}={rank} is out of range; valid values are {low}..{high}{where}. "
            f"Pick a rank in that range (or use ratio=/energy= to choose it)")
    return rank


def _as_matrix(matrix: Tensor, name: str) -> Tensor:
    if matrix.dim() != 2:
        raise FactorizationError(f"{_label(name)}: expected a 2-D matrix, got shape {list(matrix.shape)}")
    if matrix.numel() == 0:
        raise FactorizationError(f"{_label(name)}: cannot factorize an empty matrix {list(matrix.shape)}")
    a = matrix.detach()
    check_finite(a, name)
    return a


def _work(a: Tensor) -> Tensor:
    """float64 copy on a device that has float64 (MPS has none: use the CPU there)."""
    dev = a.device if a.device.type not in ("mps", "meta") else torch.device("cpu")
    return a.to(device=dev, dtype=torch.float64)


# Weights up to this many elements are factorized on one CPU thread (see serial_math).
SERIAL_MAX_NUMEL = 1 << 22


@contextlib.contextmanager
def serial_math(t: Tensor):
    """Run the factorization math of a small CPU tensor on one thread, restoring the count after.

    The eigensolvers and the small GEMMs here are barrier-bound, and on a busy machine every
    barrier waits for a descheduled thread: on this 2-core box a float64 128x128 eigh took 1.8 s
    with 2 threads and 1 ms with 1, and factorizing all of ResNet-50 took 44 s vs 9 s. Big
    weights (LLM-sized) keep all threads, where GEMM throughput wins.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1 or t.numel() > SERIAL_MAX_NUMEL:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def top_eigvecs(a64: Tensor, rank: int, *, side: str, name: str = "") -> Tensor:
    """The `rank` leading left (side="left": of a a^T) or right (a^T a) singular vectors of `a64`.

    An eigendecomposition of the float64 Gram matrix of the smaller side: 10-50x faster than
    torch.linalg.svd on CPU for the wide/tall weights we see, and the returned basis is
    orthonormal to float64 precision, so projecting onto all of it reconstructs exactly.
    """
    gram = a64 @ a64.T if side == "left" else a64.T @ a64
    try:
        _, vecs = torch.linalg.eigh(gram)
    except RuntimeError as e:  # torch.linalg.LinAlgError: the eigensolver did not converge
        raise FactorizationError(f"{_label(name)}: eigendecomposition failed for shape {list(a64.shape)}: {e}") from e
    return vecs.flip(-1)[:, :rank]   # eigh sorts ascending


def singular_values(matrix: Tensor, *, name: str = "") -> Tensor:
    """Singular values of a 2-D tensor, descending, float32, on the tensor's device.

    From the float64 Gram matrix: accurate to about 1e-8 of the largest value, ample for rank rules.
    """
    a = _as_matrix(matrix, name)
    with serial_math(a):
        a64 = _work(a)
        gram = a64 @ a64.T if a64.shape[0] <= a64.shape[1] else a64.T @ a64
        try:
            ev = torch.linalg.eigvalsh(gram)
        except RuntimeError as e:
            raise FactorizationError(f"{_label(name)}: eigendecomposition failed for shape {list(a.shape)}: {e}") from e
    return ev.flip(0).clamp_min(0).sqrt().to(device=a.device, dtype=torch.float32)


def svd_split(matrix: Tensor, rank: int, *, name: str = "",
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Truncated SVD: (L [m, r], R [r, n]) in `dtype` with L @ R ≈ matrix; sqrt(S) goes into both factors.

    Splitting sqrt(S) evenly keeps both factor layers at a similar scale, which trains better than
    putting S on one side. L @ R is the projection of the matrix on its top-r singular subspace,
    so it is exact (to fp32 output precision) at r = min(m, n).
    """
    a = _as_matrix(matrix, name)
    m, n = a.shape
    r = check_rank(rank, 1, min(m, n), name, shape=(m, n))
    split = None
    if a.numel() >= RANDOMIZED_MIN_NUMEL and r <= RANDOMIZED_MAX_FRACTION * min(m, n):
        split = randomized_svd_split(a, r, name=name)     # None: not certified, exact below
    if split is None:
        with serial_math(a):
            split = _split64(_work(a), r, name)
    left, right = split
    out = dict(device=a.device, dtype=dtype)
    return left.to(**out).contiguous(), right.to(**out).contiguous()


# Randomized truncated SVD (Halko, Martinsson & Tropp 2011) replaces the exact float64 Gram
# eigensolver for weights of at least this many elements when the rank is at most this fraction of
# min(m, n): the exact path's cost (an m x m Gram and its full eigendecomposition) does not shrink with
# the rank, the randomized one does (a few passes over the weight with r + p vectors).
RANDOMIZED_MIN_NUMEL = 1 << 22
RANDOMIZED_MAX_FRACTION = 0.5
RANDOMIZED_TOL = 0.01          # accepted when its error is certified within 1% of the optimal one
RANDOMIZED_POWER_ITERS = 2
RANDOMIZED_MAX_RHO = 0.9       # (s_l / s_r)^2 above this: the spectrum is too flat to trust the estimate


def randomized_svd_split(matrix: Tensor, rank: int, *, name: str = "", tol: float = RANDOMIZED_TOL,
                         power_iters: int = RANDOMIZED_POWER_ITERS, oversample: Optional[int] = None,
                         seed: int = 0) -> Optional[tuple[Tensor, Tensor]]:
    """svd_split by a randomized range finder with power iterations, or None when its error estimate is loose.

    Sketch Q (m x l, l = r + p) of the range with power iterations, B = Q^T A, top-r of B's SVD. The
    result's error e^2 = ||A||^2 - E (E: energy of the top r of B) is known exactly; the optimal error
    e*^2 = ||A||^2 - E* is not. Subspace iteration raises E towards E* geometrically with a ratio of
    about rho = (s_l / s_r)^2, so E* - E <= dE rho / (1 - rho), dE being the gain of the last iteration.
    The factors are returned when that estimate puts e within (1 + tol) e* and rho <= RANDOMIZED_MAX_RHO;
    on flat spectra (rho near 1, e.g. a random init of a wide layer) they are not, and the caller runs
    the exact path (after one pass: the first sketch already shows rho). float32 products (no float64
    copy of a large weight), deterministic for a seed.
    """
    a = _as_matrix(matrix, name)
    m, n = a.shape
    r = check_rank(rank, 1, min(m, n), name, shape=(m, n))
    transpose = m > n                    # sketch the range of the smaller side
    w = (a.T if transpose else a).float()
    m, n = w.shape
    p = oversample if oversample is not None else max(10, r // 2)
    l = min(m, r + p)
    total = float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2
    if total == 0.0 or l <= r:
        return None
    gen = torch.Generator(device=w.device).manual_seed(seed)
    q = torch.linalg.qr(w @ torch.randn(n, l, device=w.device, generator=gen)).Q
    energies = []
    for _ in range(power_iters + 1):
        z = w.T @ q                                                      # [n, l] = B^T
        z64 = z.double()
        evals, evecs = torch.linalg.eigh(z64.T @ z64)                    # l x l: B B^T, cheap
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(-1)
        energies.append(float(evals[:r].sum()))
        rho = min(1.0, float(evals[l - 1] / evals[r - 1]) if evals[r - 1] > 0 else 1.0)
        if len(energies) > power_iters or rho > RANDOMIZED_MAX_RHO:
            break
        q = torch.linalg.qr(w @ torch.linalg.qr(z).Q).Q              # QR after every product keeps small directions
    err2 = max(total - energies[-1], 0.0)
    gain = max(energies[-1] - energies[-2], 0.0) if len(energies) > 1 else float("inf")
    # Where the spectrum hardly falls between s_r and s_l the geometric estimate is not trustworthy:
    # that is the loose case, left to the exact path.
    excess = float("inf") if rho > RANDOMIZED_MAX_RHO else gain * rho / (1.0 - rho)
    if err2 == 0.0 or err2 - excess < err2 / (1.0 + tol) ** 2:
        return None
    u = q.double() @ evecs[:, :r]                                        # [m, r] left singular vectors
    raw = evecs[:, :r].T @ z64.T                                         # [r, n] = u^T A = S V^T
    s_ = raw.norm(dim=1)
    root = s_.sqrt()
    inv = torch.where(s_ > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    left, right = u * root, raw * inv[:, None]
    if transpose:                        # A = (L R)^T = R^T L^T
        left, right = right.T, left.T
    return left, right


def _split64(a64: Tensor, r: int, name: str) -> tuple[Tensor, Tensor]:
    m, n = a64.shape
    if m <= n:
        u = top_eigvecs(a64, r, side="left", name=name)       # [m, r]
        raw = u.T @ a64                                         # [r, n] = S V^T
        s = raw.norm(dim=1)
        root = s.sqrt()
        # Rows with s == 0 are zero already; keep them zero instead of 0/0.
        inv = torch.where(s > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
        return u * root, raw * inv[:, None]
    v = top_eigvecs(a64, r, side="right", name=name)          # [n, r]
    raw = a64 @ v                                               # [m, r] = U S
    s = raw.norm(dim=0)
    root = s.sqrt()
    inv = torch.where(s > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    return raw * inv, root[:, None] * v.T


def svd_error(singular_values: Tensor, rank: int) -> float:
    """Relative Frobenius error ||W - W_r|| / ||W|| of the rank-r truncation (exact for SVD)."""
    s2 = singular_values.detach().double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float(s2[rank:].sum()), 0.0) / total)
