"""Truncated SVD of weight matrices (float64 Gram eigensolver; certified float32 Gram for big and near-square weights, randomized SVD for big ones), with rank/finite checks."""
from __future__ import annotations

import collections
import contextlib
import math
import operator
import threading
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import FactorizationError, RankError


def _label(name: str) -> str:
    return f"layer {name!r}" if name else "the weight"


def all_finite(t: Tensor) -> bool:
    """True when `t` holds no NaN/Inf: from torch.aminmax, which propagates NaN and shows +-Inf (one
    pass, no bool copy: 20x faster than isfinite(t).all() on a 4096 x 25088 weight)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(t: Tensor, name: str = "", what: str = "weight") -> None:
    """Raise FactorizationError when `t` holds NaN or Inf (SVD would return garbage or fail)."""
    if not all_finite(t):
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


def _work_device(a: Tensor) -> torch.device:
    """Where `a`'s factorization math runs: its own device, or the CPU for MPS (no float64, no eigh) and meta."""
    return a.device if a.device.type not in ("mps", "meta") else torch.device("cpu")


def _work(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """float64 (or `dtype`) copy on _work_device(a); `a` itself when it already is that."""
    return a.to(device=_work_device(a), dtype=dtype)


_TRIM = []


def release_free_memory() -> bool:
    """Hand the free memory of every malloc arena back to the OS (glibc malloc_trim(0)); False where
    the C library has no malloc_trim (macOS, Windows, musl): nothing is done there."""
    if not _TRIM:
        fn = None
        try:
            import ctypes
            import ctypes.util
            lib = ctypes.util.find_library("c")
            fn = getattr(ctypes.CDLL(lib), "malloc_trim", None) if lib else None
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _TRIM.append(fn)
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True


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


def top_eigvecs(a64: Tensor, rank: int, *, side: str, name: str = "", values: bool = False):
    """The `rank` leading left (side="left": of a a^T) or right (a^T a) singular vectors of `a64`
    (with values=True: (their squared singular values, descending; the vectors)).

    An eigendecomposition of the float64 Gram matrix of the smaller side: 10-50x faster than
    torch.linalg.svd on CPU for the wide/tall weights we see, and the returned basis is
    orthonormal to float64 precision, so projecting onto all of it reconstructs exactly.
    """
    return gram_top_eigvecs(a64 @ a64.T if side == "left" else a64.T @ a64, rank, name=name, shape=a64.shape,
                            values=values)


def gram_top_eigvecs(gram: Tensor, rank: int, *, name: str = "", shape=None, values: bool = False):
    """The `rank` leading eigenvectors of the symmetric `gram` (of a matrix of `shape`, for errors),
    as a [n, rank] tensor that does not keep the n x n eigenvector matrix alive; with values=True,
    (their eigenvalues, descending; the vectors)."""
    try:
        vals, vecs = torch.linalg.eigh(gram)
    except RuntimeError as e:  # torch.linalg.LinAlgError: the eigensolver did not converge
        shape = list(shape) if shape is not None else list(gram.shape)
        raise FactorizationError(f"{_label(name)}: eigendecomposition failed for shape {shape}: {e}") from e
    del gram
    top = vecs[:, vecs.shape[-1] - rank:].flip(-1)   # eigh sorts ascending
    return (vals[vals.shape[-1] - rank:].flip(-1), top) if values else top


def balanced_split(u: Tensor, raw: Tensor, tiny: float = 1e-300) -> tuple[Tensor, Tensor]:
    """(L, R) = (u sqrt(s), diag(1/sqrt(s)) raw) for raw = u^T A [r, n] with row norms s: sqrt(S) in both
    factors (svd_split's convention). Rows with s == 0 are zero already and stay zero instead of 0/0."""
    s = raw.norm(dim=1)
    root = s.sqrt()
    inv = torch.where(s > 0, 1.0 / root.clamp_min(tiny), torch.zeros_like(root))
    return u * root, raw * inv[:, None]


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

    Weights of at least FLOAT32_MIN_NUMEL elements go through, in order: where the randomized path
    would cost less than the Gram path (sketch_pays: a low rank), a cheap spectrum probe
    (spectrum_probe) and the randomized path unless the probe finds the spectrum flat (a sketch on a
    flat spectrum would be declined after paying for it); the float32 Gram path when its certificate
    holds (split32); the float64 Gram path otherwise. Smaller CPU weights whose smaller side is at least
    SQUARE32_MIN_N try split32 with torch's eigensolver before the float64 path (memory; not counted in
    `path_counts`). Every result is within 1% of the optimal rank-r error or is the float64 answer.
    `path_counts` counts the paths of big weights.
    """
    a = _as_matrix(matrix, name)
    m, n = a.shape
    r = check_rank(rank, 1, min(m, n), name, shape=(m, n))
    split = None
    big = a.numel() >= min(FLOAT32_MIN_NUMEL, RANDOMIZED_MIN_NUMEL)
    if big:
        w = _rows_small(a)
        total = ritz = None
        if a.numel() >= RANDOMIZED_MIN_NUMEL and r <= RANDOMIZED_MAX_FRACTION * min(m, n):
            if not sketch_pays(w.shape, r):
                _count("sketch_costlier")
            else:
                with serial_math(a):
                    total, ritz = spectrum_probe(w)
                if is_flat(total, ritz, w.shape[0]):
                    _count("sketch_skipped")
                else:
                    split = randomized_svd_split(a, r, name=name)     # None: not certified, exact below
                    _count("randomized" if split is not None else "sketch_declined")
        if split is None and a.numel() >= FLOAT32_MIN_NUMEL:
            if ritz is not None and _float32_hopeless(total, ritz, w.shape, r, a.device):
                _count("float32_skipped")
            else:
                with serial_math(a):
                    split = split32(a, r, name=name, total=total)
                _count("exact32" if split is not None else "float32_declined")
    if split is None and not big and min(m, n) >= SQUARE32_MIN_N and a.device.type == "cpu":
        with serial_math(a):
            split = split32(a, r, name=name, subset=False)
    if split is None:
        with serial_math(a):
            split = _split64(a, r, name)
        if big:
            _count("exact64")
    left, right = split
    out = dict(device=a.device, dtype=dtype)
    return left.to(**out).contiguous(), right.to(**out).contiguous()


# What svd_split did for big weights, counted by path name ("randomized", "sketch_costlier", "sketch_skipped",
# "sketch_declined", "exact32", "float32_declined", "float32_skipped", "exact64"): tests and the
# benchmark read it; nothing else depends on it.
path_counts: collections.Counter = collections.Counter()
_count_lock = threading.Lock()


def _count(path: str) -> None:
    with _count_lock:
        path_counts[path] += 1


def _rows_small(a: Tensor) -> Tensor:
    """`a` (or its transpose, a view) as float32 with the smaller side as rows, on a device with eigh."""
    w = a.to(device=_work_device(a), dtype=torch.float32)      # no copy for a float32 weight
    return w if w.shape[0] <= w.shape[1] else w.T


# Mid-size weights whose smaller side is at least this also try split32 first (torch's eigensolver, not
# scipy's: it runs in factorize_many's worker threads, and scipy's holds the GIL): the float64 Gram's
# eigendecomposition of a 1000 x 1024 classifier peaks at 35 MB for 4 MB of weight, the float32 one at half.
SQUARE32_MIN_N = 1000
# Big weights: at least this many elements try the float32 Gram path (split32) before float64.
FLOAT32_MIN_NUMEL = 1 << 22
FLOAT32_TOL = 0.01             # accepted when its error is certified within 1% of the optimal one
# spectrum_probe: block power iteration on this many vectors, this many iterations.
PROBE_VECTORS = 8
PROBE_ITERS = 4
# is_flat: the spectrum is flat when the mean energy per direction outside the probe's block is at
# least this fraction of the block's smallest Ritz value.
FLAT_LEVEL = 0.1


# sketch_pays: the Gram path's eigensolver counted as this many multiply-adds per n^3 (its tridiagonal
# reduction is half BLAS-2; measured on 2 cores: float32 ssyrk 44 G multiply-adds/s, LAPACK's MRRR
# for the top n/5 eigenpairs 0.16 s at n = 1280 and 1.1 s at n = 2904, i.e. about 2 n^3 of them).
EIGH_MADDS_PER_N3 = 2.0


def sketch_pays(shape, r: int) -> bool:
    """True when the randomized path's products cost fewer multiply-adds than the float32 Gram path for a
    [n, k] weight (n <= k) at rank r: 2 (q + 1) passes with l = r + p vectors (2 (q + 1) n k l) against
    the Gram by syrk (n^2 k / 2) and its eigensolver (EIGH_MADDS_PER_N3 n^3). Where it does not (e.g.
    ViT-H/14's 1280 x 5120 weights at r = 256: a sketch took 0.37 s, the Gram path 0.26 s), neither the
    sketch nor the probe that decides on it (0.065 s, a fifth of such a layer's time) is run."""
    n_s, k = min(shape), max(shape)
    l = min(n_s, r + max(10, r // 2))          # randomized_svd_split's default oversampling
    sketch = 2 * (RANDOMIZED_POWER_ITERS + 1) * n_s * k * l
    return sketch < n_s * n_s * (k / 2 + EIGH_MADDS_PER_N3 * n_s)


def spectrum_probe(w: Tensor, seed: int = 0) -> tuple[float, Tensor]:
    """(||w||_F^2 in float64, Ritz values of w w^T on a PROBE_VECTORS block, descending, float64).

    A few block power iterations (float32 products with b vectors: about 2 (PROBE_ITERS + 1) b
    passes over the weight, a fraction of a second for a 4096 x 9216 weight, against seconds for
    a sketch of r + p vectors). The Ritz values are lower bounds of the top eigenvalues
    lambda_1..lambda_b of w w^T, and their sum is the energy one b-dimensional subspace captures,
    so ||w||^2 - sum(ritz) bounds the optimal rank-b (hence rank-r, r >= b) error from above.
    """
    n_s, k = w.shape
    total = _energy(w)
    b = min(PROBE_VECTORS, n_s, k)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    q = torch.linalg.qr(_thin_mm(w, torch.randn(k, b, device=w.device, generator=gen))).Q
    for _ in range(PROBE_ITERS):
        q = torch.linalg.qr(_thin_mm(w, _thin_mm(w.T, q))).Q
    z = _thin_mm(w.T, q).double()                                    # [k, b]
    ritz = torch.linalg.eigvalsh(z.T @ z).flip(0).clamp_min(0)
    return total, ritz


def _energy(w: Tensor) -> float:
    """||w||_F^2: float32 row norms summed in float64 (a float64 reduction of a big weight is 15x slower)."""
    return float(torch.linalg.vector_norm(w, dim=-1).double().pow(2).sum())


def _thin_mm(w: Tensor, x: Tensor) -> Tensor:
    """w @ x for a thin x; a transposed (non-contiguous) w is multiplied as (x^T w^T)^T, which the CPU
    BLAS runs ~6x faster for a few columns (4096 x 9216 weight, 8 vectors: 0.23 s against 1.5 s)."""
    return w @ x if w.is_contiguous() else (x.T @ w.T).T


def is_flat(total: float, ritz: Tensor, n_small: int) -> bool:
    """True when the spectrum is too flat for the randomized path to be certified (skip its sketch).

    The randomized path's estimate declines when (s_l / s_r)^2 is near 1 or the power iterations
    still gain energy, i.e. unless the spectrum falls clearly around the rank. That is judged from
    the probe: the mean energy per direction outside the b-vector block, (||W||^2 - sum ritz) /
    (n - b), against the block's smallest Ritz value. Measured (b = 8): a random initialisation,
    Gaussian or uniform (Marchenko-Pastur), 0.31 (square) to 0.67 (1:8); power-law energies
    sigma_i^2 ~ i^-alpha on n x 3n: n = 512: 0.51, 0.29, 0.076, 0.046, 0.030, 0.016 for alpha 0.3,
    0.5, 1, 1.25, 1.5, 2; n = 2048: 0.022 (alpha 1), 0.012 (1.25). The sketch was certified from
    alpha 1.25 (rank n/16) or 1.5 (n/4) on and declined below, so FLAT_LEVEL = 0.1 skips it only
    where it would decline (2x margin to the first certified case, 3x to a random init). A
    heuristic that only decides where time is spent: a wrong call runs the exact path (always
    correct) or a sketch that declines.
    """
    b = len(ritz)
    outside = total - float(ritz.sum())
    if n_small <= b or outside <= 1e-6 * total:
        return False                  # (numerically) all of the energy in the block: low rank
    return outside / (n_small - b) >= FLAT_LEVEL * float(ritz[-1])


def _gemm_eps(device: torch.device) -> float:
    """Unit of float32 product rounding: eps32, or TF32's/bf16's where matmuls are allowed to use them."""
    prec = torch.get_float32_matmul_precision()
    eps = {"highest": torch.finfo(torch.float32).eps, "high": 2.0 ** -10}.get(prec, 2.0 ** -7)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        eps = max(eps, 2.0 ** -10)
    return eps


def _float32_tol_energy(tol: float) -> float:
    return (1.0 + tol) ** 2 - 1.0    # error within (1 + tol) x optimal  <=>  err^2 within this of opt^2


def _float32_hopeless(total: float, ritz: Tensor, shape, r: int, device) -> bool:
    """True when split32's certificate cannot hold (then its Gram and eigh are not paid for).

    The optimal tail is at most ||W||^2 - sum(ritz) (the probe's subspace); the certificate needs
    2 r delta <= tol' x tail with delta >= (k + n) eps lambda_1 >= (k + n) eps ritz_1.
    """
    n_s, k = shape
    if r >= n_s:
        return True                  # nothing truncated: the float64 path reconstructs exactly
    delta = (k + n_s) * _gemm_eps(device) * float(ritz[0])
    return 2.0 * r * delta > _float32_tol_energy(FLOAT32_TOL) * max(total - float(ritz.sum()), 0.0)


def _gram_top_eigh(w: Tensor, r: int, subset: bool = True) -> tuple[Tensor, Tensor]:
    """The r largest eigenvalues (descending) and their eigenvectors of the float32 Gram w w^T.

    On CPU through scipy (which comes with tensorly): the Gram's lower triangle by BLAS ssyrk (half
    the flops of w @ w.T: 3.1-3.5 s against 5.0-5.5 s for a 4096 x 9216 weight on a busy 2-core
    machine; no copy of w) and LAPACK's MRRR driver for the index subset (it skips the full
    eigenvector back-transformation: about half the time of torch.linalg.eigh for r = n/6).
    Elsewhere, without scipy, or with subset=False (callers in worker threads: scipy's call holds the
    GIL), w @ w.T and torch.linalg.eigh.
    """
    n = w.shape[0]
    if subset and w.device.type == "cpu" and r < n:
        try:
            import scipy.linalg
            from scipy.linalg import blas
        except ImportError:
            scipy = None
        if scipy is not None:
            arr = w.numpy()
            if arr.flags.f_contiguous:                   # arr = w as a Fortran matrix: C = arr arr^T
                gram = blas.ssyrk(1.0, arr, trans=0, lower=1)
            else:                                        # arr.T is Fortran-contiguous: C = (arr^T)^T arr^T
                gram = blas.ssyrk(1.0, np.ascontiguousarray(arr).T, trans=1, lower=1)
            mu, vecs = scipy.linalg.eigh(gram, lower=True, subset_by_index=[n - r, n - 1], driver="evr",
                                         overwrite_a=True, check_finite=False)
            return torch.from_numpy(mu[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())
    mu, vecs = torch.linalg.eigh(w @ w.T)
    return mu.flip(0)[:r], vecs.flip(-1)[:, :r]


def split32(matrix: Tensor, rank: int, *, name: str = "", tol: float = FLOAT32_TOL,
            total: Optional[float] = None, subset: bool = True) -> Optional[tuple[Tensor, Tensor]]:
    """svd_split from a float32 Gram matrix and float32 eigh, or None when that is not certified.

    Cheaper than the float64 path (a 4096 x 9216 weight on 2 threads: float32 Gram 2.5 s + eigh 9.5 s,
    less with BLAS syrk and only the top r eigenpairs (_gram_top_eigh), against 4.3 s + 14 s) and no
    float64 copy of the weight. Certificate (a-posteriori, from the computed eigenvalues mu_i of the
    float32 Gram G~ = G + dG of the smaller side, n x n, inner dimension k):
    - the float32 product and eigensolver are modelled as an exact eigendecomposition of G + dG
      with ||dG||_2 <= delta = (k + n) eps lambda_1 (eps: unit of the product's rounding, see
      _gemm_eps). This is the standard bound with its dimension factors taken linearly, and
      conservative in practice: measured ||dG|| and max |mu_i - lambda_i| are 1.5e-7 and 5e-7 of
      lambda_1 for random 1024 x 2304 and 2048 x 4608 weights, where delta is 4e-4 and 8e-4 of it.
      (The elementwise worst case k eps |A| |A|^T is ~||A||_F^2, not lambda_1, and would reject
      every wide layer; it assumes all rounding errors align.)
    - Ky Fan: the top-r eigenvectors U of G~ capture tr(U^T G U) >= sum_{i<=r} lambda_i - 2 r delta,
      so the squared error exceeds the optimal tail T = ||A||^2 - sum_{i<=r} lambda_i by <= 2 r delta.
    - Weyl: sum_{i<=r} lambda_i <= sum_{i<=r} mu_i + r delta, so T >= ||A||^2 - sum_{i<=r} mu_i - r delta
      (||A||^2 from float32 row norms summed in float64, lowered by their worst-case k eps rounding).
    Accepted when 2 r delta <= ((1 + tol)^2 - 1) x that lower bound of T: the error is then within
    (1 + tol) of the optimum. Flat spectra (random init; most trained weights at these ratios)
    have huge tails and pass by orders of magnitude; near-low-rank weights (tiny tails) and
    r = min(m, n) are declined and go to the float64 path.
    """
    a = _as_matrix(matrix, name)
    m, n = a.shape
    r = check_rank(rank, 1, min(m, n), name, shape=(m, n))
    w = _rows_small(a)                   # [n_s, k], float32
    n_s, k = w.shape
    if total is None:
        total = _energy(w)
    if r >= n_s or total == 0.0:
        return None
    try:
        mu, vecs = _gram_top_eigh(w, r, subset=subset)
    except (RuntimeError, ValueError) as e:  # LinAlgError (torch's is a RuntimeError, scipy's a ValueError)
        raise FactorizationError(f"{_label(name)}: eigendecomposition failed for shape {list(a.shape)}: {e}") from e
    mu = mu.double()
    delta = (k + n_s) * _gemm_eps(w.device) * max(float(mu[0]), 0.0)
    total_low = total * (1.0 - k * torch.finfo(torch.float32).eps)      # float32 row norms: <= k eps relative
    tail_low = total_low - float(mu[:r].sum()) - r * delta
    if not 2.0 * r * delta <= _float32_tol_energy(tol) * tail_low:
        return None
    u = vecs[:, :r]                                                    # [n_s, r]
    left, right = balanced_split(u, u.T @ w, tiny=1e-30)              # u^T w: [r, k] = S V^T (of w)
    if m <= n:                                                         # w = A:  A ~ u (u^T A)
        return left, right
    return right.T, left.T                                             # w = A^T: A ~ (A u) u^T


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
    left, right = balanced_split(u, evecs[:, :r].T @ z64.T)             # [r, n] = u^T A = S V^T
    if transpose:                        # A = (L R)^T = R^T L^T
        left, right = right.T, left.T
    return left, right


# _split64 converts the weight to float64 about this many elements at a time, and at least
# BLOCK_MIN_STEP rows or columns: thinner blocks would make the Gram's accumulation (one n x n
# read and write a block) cost more than its multiply-adds.
BLOCK_NUMEL = 1 << 17
BLOCK_MIN_STEP = 256


def _blocks64(a: Tensor, dim: int):
    """(slice, float64 block) over `a`'s dimension `dim` (see BLOCK_NUMEL, BLOCK_MIN_STEP). The blocks
    are one buffer, refilled: use each before taking the next."""
    size, other = a.shape[dim], a.shape[1 - dim]
    step = min(size, max(BLOCK_MIN_STEP, BLOCK_NUMEL // max(other, 1)))
    dev = _work_device(a)
    direct = a.dtype == torch.float64 and a.device == dev
    buf = None if direct else torch.empty((other, step) if dim == 1 else (step, other), dtype=torch.float64,
                                          device=dev)
    for i in range(0, size, step):
        sl = slice(i, min(i + step, size))
        part = a[:, sl] if dim == 1 else a[sl]
        if direct:
            yield sl, part
            continue
        b = buf[:, :sl.stop - sl.start] if dim == 1 else buf[:sl.stop - sl.start]
        b.copy_(part)
        yield sl, b


def _split64(a: Tensor, r: int, name: str) -> tuple[Tensor, Tensor]:
    """svd_split's exact path: the top-r eigenvectors of the float64 Gram of the smaller side, then the
    weight's projection on them. No float64 copy of the whole weight: the Gram and the projection are
    summed and written by blocks of the long side (_blocks64), so the eigensolver's n x n buffers are
    the big ones: the Gram, the eigenvectors and torch.linalg.eigh's 2 n^2 workspace (a 512 x 4608
    weight, 9 MB in float32, peaked at 30 MB above what it started with, now 13 MB; a near-square
    1000 x 1024 classifier still at 35 MB, all of it the eigensolver's)."""
    m, n = a.shape
    wide = m <= n
    dev = _work_device(a)
    k = min(m, n)
    gram = torch.zeros(k, k, dtype=torch.float64, device=dev)
    for _, b in _blocks64(a, 1 if wide else 0):
        if wide:
            gram.addmm_(b, b.T)
        else:
            gram.addmm_(b.T, b)
        del b
    vecs = gram_top_eigvecs(gram, r, name=name, shape=a.shape)
    del gram
    if wide:                                                   # u^T A: [r, n] = S V^T
        raw = torch.empty(r, n, dtype=torch.float64, device=dev)
        for sl, b in _blocks64(a, 1):
            raw[:, sl] = vecs.T @ b
        return balanced_split(vecs, raw)
    raw = torch.empty(m, r, dtype=torch.float64, device=dev)   # A v: [m, r]
    for sl, b in _blocks64(a, 0):
        raw[sl] = b @ vecs
    left, right = balanced_split(vecs, raw.T)                  # of A^T: v^T A^T = (A v)^T, [r, m]
    return right.T, left.T                                     # A ~ (A v) v^T


def svd_error(singular_values: Tensor, rank: int) -> float:
    """Relative Frobenius error ||W - W_r|| / ||W|| of the rank-r truncation (exact for SVD)."""
    s2 = singular_values.detach().double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float(s2[rank:].sum()), 0.0) / total)
