"""Data-aware (whitened) factorization: input second moments, damping, and SVD/Tucker-2 fits of output error."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FactorizationError, InputError
from .svd import _label, balanced_split, check_finite, serial_math
from .tucker import tucker2

# How a layer's input is viewed as samples of feature vectors (the columns its weight matrix sees):
LINEAR = "linear"     # x[..., in]                  -> [N, in]
IM2COL = "im2col"     # conv input, unfolded patches -> [N, in * k]   (SVD of the [out, in*k] matrix)
CHANNEL = "channel"   # conv input, one pixel each   -> [N, in]       (Tucker-2's input-channel mode)

DEFAULT_DAMPING = 0.01   # ridge, as a fraction of the mean input energy per feature


def features(x: Tensor, view: str, *, kernel_size=(), stride=(), padding=(), dilation=()) -> Tensor:
    """The [N, d] float64 samples a layer with input `x` multiplies its weight by, for `view`."""
    if view == LINEAR:
        return x.detach().reshape(-1, x.shape[-1]).double()
    if x.dim() < 3:
        raise InputError(f"a conv input needs [batch, channels, *spatial], got shape {list(x.shape)}")
    if view == CHANNEL:
        return x.detach().movedim(1, -1).reshape(-1, x.shape[1]).double()
    if view != IM2COL:
        raise ValueError(f"unknown feature view {view!r}")
    dims = x.dim() - 2
    if dims > 2:
        raise InputError("im2col statistics support Conv1d/Conv2d; use the Tucker-2 scheme for Conv3d")
    if isinstance(padding, str):
        raise InputError(f"im2col statistics need numeric padding, got padding={padding!r}")
    if dims == 1:   # unfold is 2-D only: a 1-D conv is a 2-D conv over a height-1 image
        x = x.unsqueeze(2)
        kernel_size, stride, padding, dilation = ((1,) + tuple(t) for t in (kernel_size, stride, padding, dilation))
        padding = (0,) + tuple(padding[1:])
    cols = F.unfold(x.detach(), tuple(kernel_size), dilation=tuple(dilation), padding=tuple(padding),
                    stride=tuple(stride))                       # [B, in*k, L], channel-major like the weight
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()


class InputStats:
    """Running sums of one layer's input features: second moment, mean and (paired) cross moment.

    `update(x)` records samples x [N, d]. `update_pair(x_ref, x)` records the same samples seen by
    the original model (x_ref) and by the compressed one (x): the fit then maps x to the original
    layer's output W x_ref (error-correcting, as in sequential SVD-LLM).

    groups > 1 (a grouped conv): each group's features are a contiguous block of d / groups, and only the
    blocks on the diagonal are kept (xx, rx: [groups, d / groups, d / groups]); group(i) gives one group's
    statistics, which its own factorization fits.
    """

    def __init__(self, dim: int, view: str, device=None, groups: int = 1):
        if groups < 1 or dim % groups:
            raise ValueError(f"{dim} features do not split into {groups} groups")
        self.dim, self.view, self.groups = dim, view, groups
        kw = dict(dtype=torch.float64, device=device)
        block = dim // groups
        self.xx = torch.zeros(dim, dim, **kw) if groups == 1 else torch.zeros(groups, block, block, **kw)
        self.x_sum = torch.zeros(dim, **kw)
        self.rx: Optional[Tensor] = None       # sum x_ref x^T (per group: the diagonal blocks)
        self.r_sum: Optional[Tensor] = None
        self.n = 0
        self._damped: dict = {}                 # damping -> Damped (the sums are final once fitted)
        self._groups: Optional[list] = None     # group(i)'s views, made once the sums are final

    def _blocks(self, x: Tensor) -> Tensor:
        """Samples [N, d] as [groups, N, d / groups]."""
        return x.reshape(x.shape[0], self.groups, -1).transpose(0, 1)

    def update(self, x: Tensor) -> None:
        self._check(x)
        self._damped.clear()
        self._groups = None
        if self.groups == 1:
            self.xx.addmm_(x.T, x)
        else:
            xb = self._blocks(x)
            self.xx.baddbmm_(xb.transpose(1, 2), xb)
        self.x_sum += x.sum(0)
        self.n += x.shape[0]

    def update_pair(self, x_ref: Tensor, x: Tensor) -> None:
        if x_ref.shape != x.shape:
            raise InputError(f"paired calibration samples differ in shape: {list(x_ref.shape)} vs {list(x.shape)}")
        self._check(x)
        if self.rx is None:
            self.rx = torch.zeros_like(self.xx)
            self.r_sum = torch.zeros_like(self.x_sum)
        if self.groups == 1:
            self.rx.addmm_(x_ref.T, x)
        else:
            self.rx.baddbmm_(self._blocks(x_ref).transpose(1, 2), self._blocks(x))
        self.r_sum += x_ref.sum(0)
        self.update(x)

    def group(self, i: int) -> "InputStats":
        """Group i's statistics (views of this object's sums), as an ungrouped InputStats."""
        if self.groups == 1:
            return self
        if self._groups is None:
            self._groups = []
            block = self.dim // self.groups
            for j in range(self.groups):
                part = InputStats.__new__(InputStats)
                part.dim, part.view, part.groups, part.n = block, self.view, 1, self.n
                part.xx, part.x_sum = self.xx[j], self.x_sum[j * block:(j + 1) * block]
                part.rx = None if self.rx is None else self.rx[j]
                part.r_sum = None if self.r_sum is None else self.r_sum[j * block:(j + 1) * block]
                part._damped, part._groups = {}, None
                self._groups.append(part)
        return self._groups[i]

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(f"calibration samples of shape {list(x.shape)} do not fit a layer with "
                             f"{self.dim} input features")

    @property
    def second_moment(self) -> Tensor:
        return self.xx / max(self.n, 1)

    @property
    def cross_moment(self) -> Optional[Tensor]:
        return None if self.rx is None else self.rx / max(self.n, 1)

    @property
    def mean(self) -> Tensor:
        return self.x_sum / max(self.n, 1)

    @property
    def ref_mean(self) -> Tensor:
        return self.mean if self.r_sum is None else self.r_sum / max(self.n, 1)


@dataclass
class Whitening:
    """What a data-aware factorization of one layer needs: its input statistics and the damping."""
    stats: InputStats
    damping: float = DEFAULT_DAMPING

    @property
    def view(self) -> str:
        return self.stats.view


@dataclass
class Damped:
    """C + delta*I, and whether C itself was rank-deficient (fewer samples than features, or an
    eigenvalue below 1e-6 of the largest)."""
    matrix: Tensor
    delta: float
    deficient: bool
    numerical_rank: int


def damped(c: Tensor, damping: float, n_samples: int) -> Damped:
    """The second moment with a ridge of damping * mean(diag C) added (never less than a tiny floor,
    so the matrix is positive definite and the fit stays close to the weights in unseen directions)."""
    d = c.shape[0]
    c = 0.5 * (c + c.T)
    scale = float(torch.diagonal(c).mean()) if d else 0.0
    if not math.isfinite(scale):
        raise FactorizationError("calibration statistics hold NaN/Inf: check the calibration batches")
    ev = torch.linalg.eigvalsh(c)
    top = float(ev[-1]) if d else 0.0
    rank = int((ev > 1e-6 * top).sum()) if top > 0 else 0
    deficient = n_samples < d or rank < d
    delta = max(damping, 1e-6) * (scale if scale > 0 else 1.0)
    return Damped(c + delta * torch.eye(d, dtype=c.dtype, device=c.device), delta, deficient, rank)


def _target(w: Tensor, wh: Whitening, reg: Damped) -> Tensor:
    """The unconstrained optimum W* of E||W x_ref - W* x||^2 + delta ||W* - W||^2 (= W with one set of
    statistics): (W C_rx + delta W)(C + delta I)^-1, rows of w being output units."""
    cross = wh.stats.cross_moment
    if cross is None:
        return w
    rhs = w @ cross + reg.delta * w                            # [out, d]
    chol = torch.linalg.cholesky(reg.matrix)
    return torch.cholesky_solve(rhs.T, chol).T                 # C symmetric: (C^-1 rhs^T)^T


def _sym_sqrt(c: Tensor) -> tuple[Tensor, Tensor]:
    """(C^1/2, C^-1/2) of a symmetric positive definite matrix."""
    ev, q = torch.linalg.eigh(c)
    ev = ev.clamp_min(float(ev[-1]) * 1e-12)
    return (q * ev.sqrt()) @ q.T, (q * ev.rsqrt()) @ q.T


def damped_stats(stats: "InputStats", damping: float) -> Damped:
    """damped() of a layer's second moment, computed once per damping value."""
    if damping not in stats._damped:
        stats._damped[damping] = damped(stats.second_moment, damping, stats.n)
    return stats._damped[damping]


def _prepare(weight: Tensor, wh: Whitening, name: str) -> tuple[Tensor, Damped]:
    w = weight.detach()
    check_finite(w, name)
    if wh.stats.n == 0:
        raise FactorizationError(f"{_label(name)}: no calibration samples reached this layer; pass batches "
                                 f"that run through it, or skip it")
    return w.to(device=wh.stats.xx.device, dtype=torch.float64), damped_stats(wh.stats, wh.damping)


def whitened_svd_split(weight: Tensor, rank: int, wh: Whitening, *, name: str = "") -> tuple[Tensor, Tensor, Damped]:
    """(L [m, r], R [r, d], damping info): the rank-r W' = L @ R minimising the output error
    E||W x_ref - W' x||^2 (+ the ridge), weight [m, d] a Linear weight or a conv's [out, in*k] matrix.

    W' = U_r U_r^T W*, U_r the top eigenvectors of W* C W*^T: this equals the truncated SVD of W* C^1/2
    mapped back by C^-1/2 (ASVD / SVD-LLM's whitening) without inverting the square root.
    sqrt of each component's norm goes into both factors, as svd_split does.
    """
    w2 = weight.reshape(weight.shape[0], -1)
    w64, reg = _prepare(w2, wh, name)
    if w64.shape[1] != wh.stats.dim:
        raise FactorizationError(f"{_label(name)}: weight {list(w2.shape)} does not fit calibration statistics "
                                 f"of {wh.stats.dim} features")
    with serial_math(w64):
        wt = _target(w64, wh, reg)
        m, d = wt.shape
        if m <= d:
            gram = wt @ reg.matrix @ wt.T
            _, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
            u = vecs.flip(-1)[:, :rank]                          # [m, r]
        else:   # the smaller eigenproblem: right singular vectors of B = W* C^1/2, then U = B V / s
            b = wt @ _sym_sqrt(reg.matrix)[0]
            _, vecs = torch.linalg.eigh(b.T @ b)
            u = b @ vecs.flip(-1)[:, :rank]
            u = u / u.norm(dim=0).clamp_min(1e-300)
        left, right = balanced_split(u, u.T @ wt)              # u^T W*: [r, d]
    out = dict(device=weight.device, dtype=torch.float32)
    return left.to(**out).contiguous(), right.to(**out).contiguous(), reg


def whitened_tucker2(weight: Tensor, rank_out: int, rank_in: int, wh: Whitening, *,
                     name: str = "") -> tuple[Tensor, Tensor, Tensor, Damped]:
    """Tucker-2 of a kernel [out, in, *k] fitted in the whitened input-channel space.

    Returns (core [r_out, r_in, *k], u_out [out, r_out], first [r_in, in], damping info):
    W'[o, i] = sum u_out[o, a] core[a, b] first[b, i]. Each kernel tap sees the input channels with
    second moment C (pixels treated as independent samples: the CHANNEL view); the kernel is moved to
    W* (see whitened_svd_split), multiplied by C^1/2 on the input mode, Tucker-2'd by HOOI, and the
    input factor is mapped back by C^-1/2.
    """
    w64, reg = _prepare(weight, wh, name)
    out, inp = w64.shape[:2]
    if inp != wh.stats.dim:
        raise FactorizationError(f"{_label(name)}: kernel {list(weight.shape)} does not fit calibration "
                                 f"statistics of {wh.stats.dim} channels")
    with serial_math(w64):
        taps = w64.movedim(1, -1).reshape(-1, inp)               # [out*k, in]
        taps = _target(taps, wh, reg)
        root, inv_root = _sym_sqrt(reg.matrix)
        ww = (taps @ root).reshape(out, *w64.shape[2:], inp).movedim(-1, 1)
    core, u_out, u_in = tucker2(ww, rank_out, rank_in, name=name)
    first = u_in.double().T @ inv_root.to(u_in.device)          # [r_in, in]
    return core, u_out, first.to(device=weight.device, dtype=torch.float32).contiguous(), reg


def whitened_matrix(weight: Tensor, wh: Whitening, *, name: str = "") -> Tensor:
    """W C^1/2 (float32; a kernel [out, in, *k] with the CHANNEL view is whitened on its input mode):
    its singular values / unfoldings measure output energy, as the weight's own do for plain SVD."""
    w64, reg = _prepare(weight, wh, name)
    root, _ = _sym_sqrt(reg.matrix)
    if wh.view == CHANNEL and w64.dim() > 2:
        out, inp = w64.shape[:2]
        taps = w64.movedim(1, -1).reshape(-1, inp) @ root
        return taps.reshape(out, *w64.shape[2:], inp).movedim(-1, 1).float()
    return (w64.reshape(w64.shape[0], -1) @ root).float()


def output_error(weight: Tensor, approx: Tensor, stats: InputStats) -> float:
    """Relative output error sqrt(E||(W - W') x||^2 / E||W x||^2) under the recorded second moment."""
    c = stats.second_moment
    d = (weight.detach().double() - approx.detach().double()).reshape(weight.shape[0], -1).to(c.device)
    w = weight.detach().double().reshape(weight.shape[0], -1).to(c.device)
    if stats.view == CHANNEL and weight.dim() > 2:   # per tap, input channels last
        inp = weight.shape[1]
        d = (weight.detach().double() - approx.detach().double()).movedim(1, -1).reshape(-1, inp).to(c.device)
        w = weight.detach().double().movedim(1, -1).reshape(-1, inp).to(c.device)
    den = float(torch.einsum("od,de,oe->", w, c, w))
    num = float(torch.einsum("od,de,oe->", d, c, d))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
