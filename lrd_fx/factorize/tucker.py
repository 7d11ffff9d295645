"""Tucker-2 decomposition of conv kernels on the output/input channel modes (HOOI)."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import Tensor

from ..errors import ConfigError, FactorizationError
from .svd import _label, _work, check_finite, check_rank, serial_math, singular_values, top_eigvecs


def unfold(weight: Tensor, mode: int) -> Tensor:
    """Mode-`mode` unfolding: that axis becomes the rows, all others (in order) the columns."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


@contextlib.contextmanager
def _pytorch_backend():
    """Use tensorly's pytorch backend in this thread only, restoring exactly what was there.

    tl.backend_context() resets the *global* default on exit, which would clobber a backend the
    caller chose in another thread; the thread-local slot alone is swapped here.
    """
    import tensorly as tl
    from tensorly import backend as tlb

    local = getattr(tlb, "_THREAD_LOCAL_DATA", None)
    if local is None:  # tensorly internals changed: fall back to the public context manager
        with tl.backend_context("pytorch", local_threadsafe=True):
            yield
        return
    had = "backend" in local.__dict__
    old = local.__dict__.get("backend")
    tl.set_backend("pytorch", local_threadsafe=True)
    try:
        yield
    finally:
        if had:
            local.backend = old
        else:
            local.__dict__.pop("backend", None)


def _partial_tucker(tensor: Tensor, ranks: list[int]):
    from tensorly.decomposition import partial_tucker

    # At full rank the SVD initialisation (HOSVD) is already exact: skip further HOOI sweeps.
    n_iter = 1 if list(ranks) == list(tensor.shape[:2]) else 100
    kw = dict(modes=[0, 1], n_iter_max=n_iter, init="svd", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # tensorly >= 0.7: `rank`, returns ((core, factors), rec_errors)
            res = partial_tucker(tensor, rank=ranks, **kw)
        except TypeError:  # tensorly <= 0.6: `ranks`, returns (core, factors)
            res = partial_tucker(tensor, ranks=ranks, **kw)
    first = res[0]
    if torch.is_tensor(first):
        core, factors = res
    else:
        core, factors = first
    return core, list(factors)


# The float64 sweep of _hooi converts the weight this many elements at a time.
BLOCK_NUMEL = 1 << 17


def _check_weight(weight: Tensor, name: str) -> Tensor:
    if weight.dim() < 3:
        raise FactorizationError(
            f"{_label(name)}: Tucker-2 needs a conv kernel [out, in, *k], got shape {list(weight.shape)}")
    w = weight.detach()
    check_finite(w, name)
    return w


def _top_left(a: Tensor, rank: int, name: str) -> Tensor:
    """Leading `rank` left singular vectors of `a`, as float64 (eigh of the Gram matrix in a's dtype)."""
    return top_eigvecs(a, rank, side="left", name=name).double()


# HOOI stops when a sweep lowers the relative error by at most this fraction of itself.
HOOI_TOL = 1e-3


def _hooi(weight: Tensor, r_out: int, r_in: int, name: str, n_iter_max: int = 100, tol: float = HOOI_TOL,
          exact64: bool = True):
    """Partial HOOI on modes 0/1 with HOSVD init: the algorithm of tensorly's partial_tucker (svd
    init, sweeps until the relative error stops falling), with every SVD done as an eigh of a Gram
    matrix and each sweep's error from the eigenvalues of its last Gram (no product for the core).

    It stops when a sweep lowers the relative error e by at most tol x e (tensorly: by 1e-4 absolute).
    Sweeps gain less and less: on a random-init 1024x1024x3x3 kernel at ratio 0.25, e = 0.8079 after
    the first sweep, 0.8033 after the fourth (where tol=1e-3 stops) and 0.8027 after the eighth
    (where 1e-4 absolute stopped), each sweep about 0.6 s on 2 threads.

    The HOSVD and the sweeps run in float32 (they only steer the two subspaces: half the time of
    float64 at the same converged error). With exact64 (float64 weights or factors), one last sweep
    in float64 then gives factors orthonormal to float64 precision and the core; without it (float32
    factors) the core comes from the last float32 sweep, which saves a sweep that would change the
    factors by less than their float32 rounding plus one more sweep's gain (a third of the time of
    a 1024x1024x3x3 kernel). Full rank takes neither: its HOSVD in float64 is exact.

    Working memory (A: the weight's size in float32): the float32 weight is the caller's tensor
    itself when it is float32, the only weight-sized float64 tensor is the short-lived one of the
    norm, and the last sweep converts the weight in blocks: a 512x512x3x3 kernel (A = 9 MB) peaks
    at about 28 MB (96 MB when a float64 copy, a float32 copy and their transposed unfoldings were
    all alive in the last sweep).
    """
    out, inp = weight.shape[:2]
    sq = _work(weight)                                  # float64 copy (the weight itself if float64)
    norm2 = float((sq.pow(2) if sq.data_ptr() == weight.data_ptr() else sq.pow_(2)).sum())
    del sq
    if (r_out, r_in) == (out, inp) or norm2 == 0.0:
        # Square orthonormal factors: the HOSVD (in float64) is exact, iterating cannot improve it.
        w64 = _work(weight)
        u_out = _top_left(unfold(w64, 0), r_out, name)
        u_in = _top_left(unfold(w64, 1), r_in, name)
        return torch.einsum("oi...,oa,ib->ab...", w64, u_out, u_in), u_out, u_in
    w = _work(weight, torch.float32)                    # no copy for a float32 weight
    w_out = w.reshape(out, -1)                          # mode-0 unfolding [out, in*k]
    # HOSVD init: only u_in is used, the first sweep's mode-0 step replaces the HOSVD's u_out before
    # anything reads it (as in tensorly's partial_tucker), so that Gram and eigh are not computed.
    u_in = _top_left(unfold(w, 1), r_in, name)
    w_oki = w.movedim(1, -1).reshape(-1, inp)           # [out*k, in]: W x1 U_in^T is one GEMM

    def mode0(w_oki, u_in, dtype):
        # Gram matrices do not depend on the column order of an unfolding: y keeps (k, r_in) columns.
        y = (w_oki @ u_in.to(dtype)).reshape(out, -1)                     # unfold(W x1 U_in^T, 0)
        return _top_left(y, r_out, name)

    def mode1(w_out, u_out, dtype):
        z = (u_out.to(dtype).T @ w_out).reshape(r_out, inp, -1).movedim(1, 0).reshape(inp, -1)
        # from unfold(W x0 U_out^T, 1); ||core||^2 = ||u_in^T z||^2 is the sum of the top r_in eigenvalues of z z^T
        vals, u_in = top_eigvecs(z, r_in, side="left", name=name, values=True)
        return u_in, float(vals.double().clamp_min(0).sum()), z

    prev = None
    for _ in range(n_iter_max):
        u_out = mode0(w_oki, u_in, torch.float32)
        u_in, core2, z = mode1(w_out, u_out, torch.float32)
        err = math.sqrt(max(norm2 - core2, 0.0) / norm2)
        if prev is not None and abs(prev - err) <= tol * err:
            break
        prev = err
    if not exact64:                                     # core[a, b, k] = sum_i u_in[i, b] z[i, (a, k)]
        core = (u_in.T @ z).reshape(r_in, r_out, *weight.shape[2:]).movedim(0, 1)
        return core, u_out, u_in
    del z
    u_in = u_in.double()
    # The last sweep in float64, by blocks of about BLOCK_NUMEL weight elements converted at a time:
    # no weight-sized float64 copy exists. The products are the same dot products as on a float64
    # copy of the weight, so the factors agree with the unblocked sweep to float64 rounding (float32
    # factors of every ResNet-50 layer: bitwise equal but for one core element in each of two
    # layers, 1e-13 apart; tests/test_factorize_memory.py). The core comes from the mode-1 step's z
    # (core[a, b, k] = sum_i u_in[i, b] z[i, (a, k)]) instead of another pass over the weight.
    rows = w_oki.shape[0]
    y = torch.empty(rows, r_in, dtype=torch.float64, device=w.device)
    step = max(1, BLOCK_NUMEL // inp)
    for s0 in range(0, rows, step):
        torch.matmul(w_oki[s0:s0 + step].double(), u_in, out=y[s0:s0 + step])   # u_in: float64
    del w_oki
    u_out = _top_left(y.reshape(out, -1), r_out, name)
    del y
    ksz = w_out.shape[1] // inp
    z = torch.empty(inp, r_out, ksz, dtype=torch.float64, device=w.device)
    step = max(1, BLOCK_NUMEL // (out * ksz))
    for i0 in range(0, inp, step):
        blk = w[:, i0:i0 + step].reshape(out, -1).double()                 # [out, |I| k]
        z[i0:i0 + step] = (u_out.T @ blk).reshape(r_out, -1, ksz).movedim(1, 0)
    del w, w_out, blk
    z = z.reshape(inp, -1)                                                  # unfold(W x0 U_out^T, 1)
    u_in = _top_left(z, r_in, name)
    core = (u_in.T @ z).reshape(r_in, r_out, *weight.shape[2:]).movedim(0, 1)
    return core, u_out, u_in


def tucker2(weight: Tensor, rank_out: int, rank_in: int, *, name: str = "",
            method: str = "hooi", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a kernel [out, in, *k]: (core [r_out, r_in, *k], u_out [out, r_out], u_in [in, r_in]).

    weight ≈ core ×0 u_out ×1 u_in, i.e. W[o, i] = sum_ab u_out[o, a] core[a, b] u_in[i, b].
    rank_out / rank_in are the ranks kept on the kernel's mode 0 (out) and mode 1 (in); pass them by
    keyword: rank tuples elsewhere in lrd_fx are in data-flow order (r_in, r_out) (factorize/ranks.py).
    In `dtype` (float32 unless asked) on the weight's device; exact (to that precision) at
    rank_out=out, rank_in=in.
    method="hooi" (default) runs HOOI here (_hooi: float32 sweeps, and a last one in float64 for a
    float64 weight or dtype); method="tensorly" calls
    tensorly.decomposition.partial_tucker (pytorch backend, float32), the reference it is tested against.
    """
    w = _check_weight(weight, name)
    out, inp = w.shape[:2]
    r_out = check_rank(rank_out, 1, out, name, "rank_out", shape=w.shape)
    r_in = check_rank(rank_in, 1, inp, name, "rank_in", shape=w.shape)
    if method == "hooi":
        with serial_math(w):
            core, u_out, u_in = _hooi(w, r_out, r_in, name,
                                      exact64=torch.float64 in (w.dtype, dtype))
    elif method == "tensorly":
        try:
            with _pytorch_backend():
                core, (u_out, u_in) = _partial_tucker(w.to(torch.float32), [r_out, r_in])
        except RuntimeError as e:  # torch.linalg.LinAlgError (SVD did not converge) is a RuntimeError
            raise FactorizationError(f"{_label(name)}: Tucker-2 failed for shape {list(w.shape)}: {e}") from e
    else:
        raise ConfigError(f"tucker2 method={method!r} must be 'hooi' or 'tensorly'")
    core, u_out, u_in = (torch.as_tensor(t).to(device=w.device, dtype=dtype).contiguous()
                         for t in (core, u_out, u_in))
    if not (bool(torch.isfinite(core).all()) and bool(torch.isfinite(u_out).all())
            and bool(torch.isfinite(u_in).all())):
        raise FactorizationError(f"{_label(name)}: Tucker-2 produced NaN/Inf for shape {list(w.shape)}")
    return core, u_out, u_in


def tucker2_reconstruct(core: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    """Inverse of tucker2: the [out, in, *k] kernel the three factors represent."""
    return torch.einsum("oa,ab...,ib->oi...", u_out, core, u_in)


def tucker2_error(weight: Tensor, rank_out: int, rank_in: int, *, name: str = "") -> float:
    """Cheap estimate of tucker2's relative error: the truncated-HOSVD bound.

    sqrt(discarded energy of the mode-0 unfolding + that of mode-1) / ||W||; HOOI (what tucker2
    runs) starts from the HOSVD and only lowers the error, so this is an upper bound.
    """
    w = _check_weight(weight, name)
    out, inp = w.shape[:2]
    r_out = check_rank(rank_out, 1, out, name, "rank_out", shape=w.shape)
    r_in = check_rank(rank_in, 1, inp, name, "rank_in", shape=w.shape)
    total = float(_work(w).pow(2).sum())
    if total == 0.0:
        return 0.0
    lost = 0.0
    for mode, r in ((0, r_out), (1, r_in)):
        s2 = singular_values(unfold(w, mode), name=name).double().pow(2)
        lost += float(s2[r:].sum())
    return min(1.0, math.sqrt(lost / total))
