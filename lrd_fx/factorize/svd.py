"""Truncated SVD of weight matrices (float64 Gram eigensolver, float32 results), with rank/finite checks."""
from __future__ import annotations

import contextlib
import math
import operator

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
    with serial_math(a):
        left, right = _split64(_work(a), r, name)
    out = dict(device=a.device, dtype=dtype)
    return left.to(**out).contiguous(), right.to(**out).contiguous()


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
