"""Peer factorizations the benchmark compares lrd_fx with: tensorly-torch layers and Composer-style Factorize."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

try:  # timm's Linear only adds a dtype cast to F.linear; treated as nn.Linear (lrd_fx does the same)
    from timm.layers import Linear as _TimmLinear
except Exception:  # pragma: no cover - timm absent
    _TimmLinear = None


@dataclass
class PeerResult:
    """A converted copy of a model and what happened to each layer."""
    model: nn.Module
    replaced: dict = field(default_factory=dict)   # {qualified name: {"kind", "ranks", "structure"}}
    kept: dict = field(default_factory=dict)       # {qualified name: reason it stayed as it was}


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (_TimmLinear is not None and type(m) is _TimmLinear)


def _truncated_svd(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (m x r), S_r (r), V_r (n x r) of a matrix, float32 on the CPU.

    Through the eigendecomposition of the smaller Gram matrix (float64): on a busy 2-core CPU a full
    torch.linalg.svd of a 512 x 4608 conv weight takes seconds, the 512 x 512 eigh a fraction of one.
    """
    a = w.detach().double().cpu()
    tall = a.shape[0] > a.shape[1]
    if tall:
        a = a.T
    gram = a @ a.T
    # One thread: on a shared 2-core machine LAPACK's threaded eigh spins against the other processes'
    # threads and runs 3-20x slower than single-threaded (measured: 2.4 s vs 0.2 s at 512 x 512).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evals, evecs = torch.linalg.eigh(gram)               # ascending
    finally:
        torch.set_num_threads(threads)
    evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
    s = evals.clamp_min(0).sqrt()
    u = evecs
    v = (a.T @ u) / s.clamp_min(1e-30)
    if tall:
        u, v = v, u
    return u.float(), s.float(), v.float()


def tucker2_hosvd(w: torch.Tensor, r_in: int, r_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(core (r_out, r_in, *k), U_out (out x r_out), U_in (in x r_in)) of a conv kernel (out, in, *k):
    leading singular vectors of the output- and input-channel unfoldings, core = W x0 U_out^T x1 U_in^T."""
    w = w.detach().float().cpu()
    out_c, in_c = w.shape[:2]
    u_out = _truncated_svd(w.reshape(out_c, -1), r_out)[0]
    u_in = _truncated_svd(w.transpose(0, 1).reshape(in_c, -1), r_in)[0]
    core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)
    return core, u_out, u_in


# --- tensorly-torch at lrd_fx's ranks ------------------------------------------------------------------
#
# "Same ranks" per layer type (the ranks are those of lrd_fx's plan, data-flow order):
#   Tucker-2 kxk conv, lrd ranks (r_in, r_out)  -> tltorch.FactorizedConv, factorization="tucker",
#       rank=(r_out, r_in, kh, kw) with fixed_rank_modes="spatial": the same 1x1 in->r_in, kxk core
#       r_in->r_out, 1x1 r_out->out chain (tltorch rebuilds the kxk core from the Tucker core and two
#       full-rank kxk spatial factors on every call); weights from a truncated HOSVD (tltorch's own
#       Tucker decomposition, HOOI through tensorly, took minutes per ResNet on a busy 2-core CPU).
#   1x1 conv, lrd SVD rank r                     -> tltorch.FactorizedConv, factorization="cp", rank=r:
#       a CP decomposition of an (out, in, 1, 1) kernel at rank r is a rank-r matrix factorization;
#       tltorch runs it as 1x1 in->r, one depthwise 1-tap conv per spatial mode, 1x1 r->out.
#   Linear, lrd SVD rank r                       -> tltorch.FactorizedLinear, factorization="cp", rank=r on
#       the untensorized matrix (in_tensorized_features=(in,), out_tensorized_features=(out,)): a
#       rank-r matrix, applied as x @ V (in->r), scale, @ U^T (r->out).
#   CP factors are set from the truncated SVD (the optimal rank-r fit) rather than by tltorch's ALS:
#   same structure, much faster on large layers. Speed does not depend on the values.
#   lrd's conv "svd" scheme (kxk in->r, 1x1 r->out; conv_scheme="svd") has no tltorch layer of the same
#   structure: such layers are kept as they are and listed in `kept`.

def tltorch_layer(module: nn.Module, scheme: str, ranks) -> tuple[nn.Module, str]:
    """A tensorly-torch factorized layer (implementation="factorized") replacing `module` at `ranks`."""
    import tltorch
    dev, dt = module.weight.device, module.weight.dtype
    src = copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
    if _is_linear(src):
        (r,) = ranks
        layer = tltorch.FactorizedLinear(in_tensorized_features=(src.in_features,),
                                         out_tensorized_features=(src.out_features,),
                                         bias=src.bias is not None, factorization="cp", rank=int(r),
                                         implementation="factorized")
        u, s, v = _truncated_svd(src.weight, int(r))
        with torch.no_grad():
            layer.weight.weights.copy_(s)
            layer.weight.factors[0].copy_(u)
            layer.weight.factors[1].copy_(v)
            if src.bias is not None:
                layer.bias.copy_(src.bias)
        structure = f"CP rank {r} on the {src.out_features}x{src.in_features} matrix"
    elif isinstance(src, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if len(set(src.stride)) != 1:
            raise ValueError(f"tltorch.FactorizedConv takes one stride for all modes, layer has {src.stride}")
        if src.padding_mode != "zeros" or isinstance(src.padding, str):
            raise ValueError(f"tltorch.FactorizedConv takes numeric zero padding, layer has "
                             f"padding={src.padding!r}, padding_mode={src.padding_mode!r}")
        kernel = tuple(src.kernel_size)
        if scheme == "tucker2":
            r_in, r_out = (int(r) for r in ranks)
            layer = tltorch.FactorizedConv.from_conv(src, rank=[r_out, r_in, *kernel], factorization="tucker",
                                                     fixed_rank_modes="spatial", implementation="factorized",
                                                     decompose_weights=False)
            core, u_out, u_in = tucker2_hosvd(src.weight, r_in, r_out)
            with torch.no_grad():
                layer.weight.core.copy_(core)
                layer.weight.factors[0].copy_(u_out)
                layer.weight.factors[1].copy_(u_in)
                for f in layer.weight.factors[2:]:
                    f.copy_(torch.eye(f.shape[0]))
                if src.bias is not None:
                    layer.bias.copy_(src.bias)
            structure = f"Tucker rank {(r_out, r_in, *kernel)} (spatial modes full)"
        elif scheme == "svd" and all(k == 1 for k in kernel):
            (r,) = (int(x) for x in ranks)
            layer = tltorch.FactorizedConv.from_conv(src, rank=r, factorization="cp", implementation="factorized",
                                                     decompose_weights=False)
            u, s, v = _truncated_svd(src.weight.reshape(src.out_channels, src.in_channels), r)
            with torch.no_grad():
                layer.weight.weights.copy_(s)
                layer.weight.factors[0].copy_(u)
                layer.weight.factors[1].copy_(v)
                for f in layer.weight.factors[2:]:
                    f.fill_(1.0)
                if src.bias is not None:
                    layer.bias.copy_(src.bias)
            structure = f"CP rank {r} (1x1 kernel: a rank-{r} matrix)"
        else:
            raise ValueError(f"no tltorch layer has the structure of lrd_fx's {scheme!r} scheme")
    else:
        raise ValueError(f"{type(src).__name__} has no tltorch factorized counterpart")
    return layer.to(device=dev, dtype=dt), structure


def tltorch_factorize(model: nn.Module, plan: dict) -> PeerResult:
    """A copy of `model` with every layer that lrd_fx's `plan` factorized replaced by a tltorch layer at
    the same ranks. `plan` is `gm.lrd.plan` ({qualified name: record dict with scheme/ranks/decision})."""
    if not torch.backends.opt_einsum.is_available():
        # tltorch contracts CP/Tucker linear layers with one torch.einsum; without opt_einsum torch
        # contracts left to right through a (rows x in x rank x out) intermediate: 90 s and 4 GB per
        # ViT-tiny forward at batch 8 here, which would measure the missing package, not tltorch.
        raise RuntimeError("tensorly-torch's factorized layers need opt_einsum for a sane torch.einsum "
                           "contraction order: pip install opt_einsum (or lrd_fx[bench])")
    new = copy.deepcopy(model)
    out = PeerResult(new)
    for name, rec in plan.items():
        if rec.get("decision") not in ("decomposed", "searched") or not rec.get("ranks"):
            continue
        try:
            layer, structure = tltorch_layer(new.get_submodule(name), rec["scheme"], rec["ranks"])
        except (ValueError, AttributeError) as e:
            out.kept[name] = str(e)
            continue
        new.set_submodule(name, layer)
        out.replaced[name] = {"kind": rec.get("kind"), "ranks": list(rec["ranks"]), "structure": structure}
    return out


# --- Composer's Factorize, in plain torch ---------------------------------------------------------------
#
# composer.algorithms.factorize (mosaicml/composer, factorize.py / factorize_modules.py): every nn.Conv2d
# and nn.Linear whose min(in, out) >= min_channels is split into two layers with a latent size
# r = max(1, int(fraction * min(in, out))) -- conv: kxk in->r (original stride/padding/dilation, no bias)
# then 1x1 r->out (bias); linear: in->r (no bias) then r->out -- provided the split reduces multiply-adds
# (r <= ceil(fan_in*out/(fan_in+out) - 1), Composer's factorizing_could_speedup). No search, no Tucker.
# Composer re-initialises the new layers randomly (it targets training from scratch); here they start
# from the truncated SVD of the original weight, which changes nothing about speed.

class ComposerFactorized(nn.Module):
    """module0 then module1, as Composer's _FactorizedModule runs them."""

    def __init__(self, module0: nn.Module, module1: nn.Module, latent: int):
        super().__init__()
        self.module0 = module0
        self.module1 = module1
        self.latent = latent

    def forward(self, x):
        return self.module1(self.module0(x))

    def extra_repr(self) -> str:
        return f"latent={self.latent}"


def composer_latent(fraction: float, in_size: int, out_size: int) -> int:
    """Composer's _clean_latent_size: a fraction < 1 of min(in, out), at least 1; an int >= 1 as is."""
    if fraction < 1:
        return max(1, int(fraction * min(in_size, out_size)))
    return int(fraction)


def composer_max_rank(in_size: int, out_size: int, kernel_numel: int = 1) -> int:
    """Largest latent size for which the split still saves multiply-adds (Composer's break-even rule)."""
    fan_in = in_size * kernel_numel
    return int(math.ceil(fan_in * out_size / (fan_in + out_size) - 1))


def composer_layer(module: nn.Module, fraction: float, min_channels: int) -> tuple[Optional[nn.Module], str]:
    """(replacement, note): the Composer-style split of one layer, or (None, why it is kept)."""
    if _is_linear(module):
        i, o, k = module.in_features, module.out_features, 1
    elif type(module) is nn.Conv2d:
        if module.groups != 1:
            return None, f"grouped conv (groups={module.groups}): Composer does not factorize it"
        i, o, k = module.in_channels, module.out_channels, math.prod(module.kernel_size)
    else:
        return None, f"{type(module).__name__}: Composer factorizes only nn.Conv2d and nn.Linear"
    if min(i, o) < min_channels:
        return None, f"min(in, out)={min(i, o)} < min_channels={min_channels}"
    r = composer_latent(fraction, i, o)
    if r > composer_max_rank(i, o, k):
        return None, f"latent {r} > {composer_max_rank(i, o, k)}: no multiply-add saving"
    dev, dt = module.weight.device, module.weight.dtype
    w = module.weight.detach()
    u, s, v = _truncated_svd(w.reshape(o, -1), r)
    root = s.sqrt()
    first_w = (v * root).T           # r x (in*k)
    last_w = u * root                # out x r
    bias = module.bias.detach() if module.bias is not None else None
    if _is_linear(module):
        m0 = nn.Linear(i, r, bias=False)
        m1 = nn.Linear(r, o, bias=bias is not None)
        shapes = (first_w, last_w)
    else:
        m0 = nn.Conv2d(i, r, module.kernel_size, stride=module.stride, padding=module.padding,
                       dilation=module.dilation, bias=False, padding_mode=module.padding_mode)
        m1 = nn.Conv2d(r, o, 1, bias=True)
        shapes = (first_w.reshape(r, i, *module.kernel_size), last_w.reshape(o, r, 1, 1))
    with torch.no_grad():
        m0.weight.copy_(shapes[0])
        m1.weight.copy_(shapes[1])
        if m1.bias is not None:
            m1.bias.copy_(bias if bias is not None else torch.zeros(o))
    return ComposerFactorized(m0, m1, r).to(device=dev, dtype=dt), f"latent {r}"


def composer_factorize(model: nn.Module, fraction: float = 0.25, min_channels: int = 8) -> PeerResult:
    """A copy of `model` with every nn.Conv2d/nn.Linear split Composer-style at latent fraction `fraction`
    of min(in, out). Composer's own defaults skip layers narrower than 256 (min_channels/min_features);
    the benchmark uses lrd_fx's min_channels so that the same layers are candidates."""
    new = copy.deepcopy(model)
    out = PeerResult(new)
    targets = [(n, m) for n, m in new.named_modules() if _is_linear(m) or isinstance(m, nn.Conv2d)
               or isinstance(m, (nn.Conv1d, nn.Conv3d))]
    for name, m in targets:
        layer, note = composer_layer(m, fraction, min_channels)
        if layer is None:
            out.kept[name] = note
            continue
        new.set_submodule(name, layer)
        out.replaced[name] = {"kind": type(m).__name__, "ranks": [layer.latent], "structure": note}
    return out
