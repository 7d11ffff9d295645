"""Build FactorChains (plain nn.Linear/nn.ConvNd factors) from Linear/Conv layers."""
from __future__ import annotations

import copy
import math
import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from ..errors import ConfigError, FactorizationError, LRDError, RankError
from .chain import ROLE_CORE, ROLE_FIRST, ROLE_LAST, FactorChain
from .ranks import (energy_rank, evbmf_rank, svd_rank_for_ratio, tucker2_ranks_energy,
                    tucker2_ranks_for_ratio, tucker2_ranks_vbmf)
from .svd import SERIAL_MAX_NUMEL, _label, all_finite, check_rank, release_free_memory, singular_values, svd_split  # noqa: F401 (all_finite: for decompose)
from .tucker import tucker2

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
Ranks = Union[int, Sequence[int]]


# --- what a module is and how it will be factorized ----------------------------------------------

def _is_hf_conv1d_class(cls) -> bool:
    return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers.")
               for k in getattr(cls, "__mro__", ()))


class _HFConv1DMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return _is_hf_conv1d_class(type(obj))

    def __subclasscheck__(cls, sub) -> bool:
        return _is_hf_conv1d_class(sub)


class HFConv1D(metaclass=_HFConv1DMeta):
    """Stands for transformers.pytorch_utils.Conv1D (GPT-2 family: weight [in, out], y = x @ W + b) in
    isinstance checks, so lrd_fx recognises it without importing transformers."""


def _is_timm_linear_class(cls) -> bool:
    return cls.__name__ == "Linear" and cls.__module__.startswith("timm.layers")


def same_padding_conv(module: nn.Module) -> bool:
    """timm's Conv2dSame (TensorFlow 'SAME' padding, computed from the input size on every call; the `tf_*`
    models): exactly that class, recognised by name and module, so lrd_fx never imports timm. Its forward
    pads the input, then convolves with padding 0: a factor chain reproduces it with its spatial factor of
    the same class (pointwise factors commute with zero padding)."""
    cls = type(module)
    return cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm.layers") and isinstance(module, nn.Conv2d)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or HF Conv1D: factorized by SVD into two nn.Linear layers."""
    return isinstance(module, (nn.Linear, HFConv1D))


def layer_shape(module: nn.Module) -> tuple:
    """The weight's shape as (out, in, *kernel), whatever the layer stores (HF Conv1D keeps [in, out])."""
    shape = tuple(module.weight.shape)
    return (shape[1], shape[0]) if isinstance(module, HFConv1D) else shape


def groups_of(module: nn.Module) -> int:
    """A conv's `groups` (1 for every other layer)."""
    return int(getattr(module, "groups", 1)) if isinstance(module, nn.modules.conv._ConvNd) else 1


def group_shape(module: nn.Module) -> tuple:
    """(out, in, *kernel) of one group: a grouped conv is `groups` independent convs of this shape, each
    factorized on its own at the same ranks (so ranks, like this shape, count per group)."""
    out, inp, *kernel = layer_shape(module)     # a grouped conv's weight is [out, in / groups, *kernel]
    return (out // groups_of(module), inp, *kernel)


def layer_dims(module: nn.Module) -> tuple[int, int, int]:
    """(out, in, kernel numel) of a Linear, HF Conv1D or Conv*d from its declared sizes (readable before
    the weight exists, e.g. a lazy layer); `in` counts every input channel (groups not divided out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, 1
    if is_linear_like(module):
        out, inp = layer_shape(module)
        return out, inp, 1
    return module.out_channels, module.in_channels, math.prod(module.kernel_size)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as the [out, in*k] matrix both SVD schemes split (detached)."""
    w = module.weight.detach()
    return w.t() if isinstance(module, HFConv1D) else w.reshape(w.shape[0], -1)


def _quantized(module: nn.Module) -> bool:
    mod = type(module).__module__
    return mod.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                           "torch.nn.intrinsic.quantized"))


def is_layer_like(module: nn.Module) -> bool:
    """A Conv/Linear-like layer the report accounts for, factorizable or not: Linear, Conv*d,
    ConvTranspose*d, lazy and quantized variants, HF Conv1D, nn.MultiheadAttention."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, HFConv1D, nn.MultiheadAttention)):
        return True
    name = type(module).__name__
    return _quantized(module) and ("Linear" in name or "Conv" in name) and "PackedParams" not in name


def weight_reason(module: nn.Module) -> Optional[str]:
    """Why the layer's weight is more than a plain Parameter the factors could replace (a
    parametrization, old-style weight_norm, a pruning mask, hooks), with what to do; None if plain."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm

    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module with uninitialized parameters: pass example_inputs (or run one forward) first"
    if parametrize.is_parametrized(module):
        kinds = sorted({type(p).__name__.lstrip("_") for ps in module.parametrizations.values() for p in ps})
        tensors = list(module.parametrizations.keys())
        return (f"{'/'.join(tensors)} parametrized ({', '.join(kinds)}): factor chains would drop the "
                f"parametrization; to factorize, remove it first with "
                f"torch.nn.utils.parametrize.remove_parametrizations(layer, {tensors[0]!r})")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return ("old-style torch.nn.utils.weight_norm (weight computed from weight_g/weight_v): to "
                    "factorize, remove it first with torch.nn.utils.remove_weight_norm(layer)")
        if isinstance(hook, BasePruningMethod):
            return (f"pruning mask on {hook._tensor_name!r} (torch.nn.utils.prune): to factorize, make the "
                    f"pruning permanent first with torch.nn.utils.prune.remove(layer, {hook._tensor_name!r})")
    if module._forward_pre_hooks or module._forward_hooks:
        return "has forward hooks, which factor chains would not run; remove them to factorize the layer"
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        return "weight is not an nn.Parameter (set or computed outside the layer): kept as is"
    return None


def _computes_linear(module: nn.Linear) -> bool:
    """True when a Linear subclass's own forward computes F.linear(x, weight, bias) (Hugging Face Falcon's
    FalconLinear: `x @ self.weight.T + self.bias`), so its factors reproduce it.

    Only for a layer holding nothing but its weight and bias (no other parameter, buffer or submodule:
    a LoRA-style subclass whose extra weights start at zero would pass a probe, and its factors would
    drop them), on a device with data. The probe: its forward on random inputs of 2 and 3 dimensions,
    in train and in eval mode, against F.linear, equal within 8 units of the dtype's rounding relative to
    the output's size (another summation order differs by about one; a forward that scales its output by
    1.1 fails in float32, one that doubles it fails in bfloat16).
    """
    w = module.weight
    if set(module._parameters) - {"weight", "bias"} or module._buffers or module._modules:
        return False
    if not w.is_floating_point() or w.device.type == "meta" or w.dim() != 2:
        return False
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(w):
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(*lead, w.shape[1], generator=gen).to(device=w.device, dtype=w.dtype)
              for lead in ((3,), (2, 3))]
    tol = 8 * torch.finfo(w.dtype).eps
    probe = copy.copy(module)        # its own `training` flag; parameters shared, read only
    try:
        with torch.no_grad():
            for mode in (module.training, not module.training):
                probe.training = mode
                for x in inputs:
                    got = type(module).forward(probe, x)
                    want = F.linear(x, w, module.bias)
                    if (not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype
                            or not torch.allclose(got.float(), want.float(), rtol=tol,
                                                  atol=tol * float(want.abs().max().clamp_min(1.0)))):
                        return False
    except Exception:  # noqa: BLE001 - a forward that fails on plain inputs is not F.linear
        return False
    return True


def forward_reason(module: nn.Module) -> Optional[str]:
    """Why the layer's forward is not exactly its base layer's (weight standardization, same padding,
    ...), so plain factors would not reproduce it; None when it is."""
    cls = type(module)
    if isinstance(module, HFConv1D):
        base = next(k for k in cls.__mro__ if _is_hf_conv1d_class(k) and k.__name__ == "Conv1D"
                    and k.__module__.startswith("transformers."))
        return None if cls.forward is base.forward else f"{cls.__name__} overrides Conv1D.forward"
    if isinstance(module, nn.Linear):
        if cls.forward is nn.Linear.forward:
            return None
        # timm's Linear only casts the weight to the input dtype under TorchScript: plain F.linear otherwise
        if any(_is_timm_linear_class(k) and cls.forward is k.forward for k in cls.__mro__):
            return None
        if _computes_linear(module):
            return None
        return (f"{cls.__name__} overrides Linear.forward, and its forward differs from F.linear (or holds "
                f"more than weight and bias): factors would not reproduce it")
    if same_padding_conv(module) and cls._conv_forward is nn.Conv2d._conv_forward:
        return None
    for base in _CONVS.values():
        if isinstance(module, base):
            if cls.forward is not base.forward or cls._conv_forward is not base._conv_forward:
                return f"{cls.__name__} overrides {base.__name__}.forward"
            return None
    return None


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be factorized exactly by this module's functions, or None if it can."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module with uninitialized parameters"
    if _quantized(module):
        return f"quantized layer ({type(module).__name__}): factorize the float model before quantizing it"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"transposed conv ({type(module).__name__}): lrd_fx does not factorize transposed convs"
    if not (is_linear_like(module) or isinstance(module, tuple(_CONVS.values()))):
        return f"{type(module).__name__} is not an nn.Linear, HF Conv1D or nn.Conv1d/2d/3d"
    why = weight_reason(module)
    if why is not None:
        return why
    why = forward_reason(module)
    if why is not None:
        return f"{why}: factors would not reproduce it"
    if getattr(module, "transposed", False):
        return "transposed conv"
    return None


def _require_supported(module: nn.Module, name: str) -> None:
    reason = unsupported_reason(module)
    if reason is not None:
        raise FactorizationError(
            f"{_label(name)}: cannot factorize {type(module).__name__}: {reason}; "
            f"skip it (skip=[{name!r}]) or replace it with a plain layer")


def _conv_dims(conv: nn.Module) -> int:
    return conv.weight.dim() - 2


def is_pointwise(module: nn.Module) -> bool:
    """A conv whose kernel is 1 in every dimension (factorized by SVD whatever the scheme)."""
    return not is_linear_like(module) and all(k == 1 for k in module.weight.shape[2:])


CONV_SCHEMES = ("tucker2", "conv_svd")   # what Config.conv_scheme selects for kxk convs
CONV_SCHEME_ALIASES = {"svd": "conv_svd"}   # "svd" for a kxk conv: the kernel matrix [out, in*k] split by SVD


def effective_scheme(module: nn.Module, conv_scheme: str) -> str:
    """The scheme a layer is factorized with (FactorChain.scheme, LayerRecord.scheme), given the
    conv scheme chosen for kxk convs.

    Linear, HF Conv1D and 1x1 convs: "svd" (two factors) whatever `conv_scheme` says. kxk convs:
    "tucker2" (1x1 in->r_in, kxk core r_in->r_out, 1x1 r_out->out) or "conv_svd" (kxk in->r,
    1x1 r->out); "svd" is accepted as an alias of "conv_svd" (the SVD of the [out, in*k] kernel matrix).
    """
    if is_linear_like(module) or is_pointwise(module):
        return "svd"
    scheme = CONV_SCHEME_ALIASES.get(conv_scheme, conv_scheme)
    if scheme in CONV_SCHEMES:
        return scheme
    raise ConfigError(f"conv scheme {conv_scheme!r} must be 'tucker2' or 'conv_svd' ('svd' means 'conv_svd')")


def full_ranks(module: nn.Module, scheme: str) -> tuple:
    """Ranks (data-flow order) at which the factorization is exact.

    Linear / 1x1 conv: (min(in, out),); tucker2: (in, out); conv_svd: (min(out, in*k),); a grouped conv's
    counted per group.
    """
    eff = effective_scheme(module, scheme)
    out, inp, *kernel = group_shape(module)
    k = math.prod(kernel)
    if eff == "svd":
        return (min(inp, out),)
    if eff == "tucker2":
        return (inp, out)
    return (min(out, inp * k),)


def _check_ranks(module: nn.Module, ranks: Ranks, scheme: str, name: str) -> tuple:
    full = full_ranks(module, scheme)
    eff = effective_scheme(module, scheme)
    if isinstance(ranks, (list, tuple)):
        ranks = tuple(ranks)
    else:
        ranks = (ranks,)
    if len(ranks) != len(full):
        want = "(r_in, r_out)" if eff == "tucker2" else "(r,)"
        raise RankError(
            f"{_label(name)}: {eff} factorization of {type(module).__name__} "
            f"{list(layer_shape(module))} takes ranks {want}, got {ranks!r}")
    what = ("r_in", "r_out") if eff == "tucker2" else ("rank",)
    g = groups_of(module)
    if g > 1:       # ranks count per group
        what = tuple(f"{w} (per group of groups={g}: weight {list(group_shape(module))})" for w in what)
    return tuple(check_rank(r, 1, f, name, w, shape=layer_shape(module)) for r, f, w in zip(ranks, full, what))


def chain_params(module: nn.Module, ranks: Ranks, scheme: str) -> int:
    """Parameter count of the FactorChain at `ranks`, bias included (a grouped conv: every group's)."""
    ranks = _check_ranks(module, ranks, scheme, "")
    eff = effective_scheme(module, scheme)
    out, inp, *kernel = group_shape(module)
    k = math.prod(kernel)
    g = groups_of(module)
    bias = g * out if module.bias is not None else 0
    if eff == "svd":
        return g * ranks[0] * (inp + out) + bias
    if eff == "tucker2":
        r_in, r_out = ranks
        return g * (inp * r_in + r_in * r_out * k + r_out * out) + bias
    return g * ranks[0] * (inp * k + out) + bias


# --- chain construction --------------------------------------------------------------------------

def _make_layers(module: nn.Module, ranks: tuple, eff: str, device, dtype, init: bool) -> "OrderedDict[str, nn.Module]":
    """The factor layers of the chain; `init=False` leaves weights uninitialized (about to be set)."""
    g = groups_of(module)

    def make(cls, *args, **kw):
        kw.update(device=device, dtype=dtype)
        if g > 1:           # a grouped conv: every factor is grouped alike, holding each group's factors
            kw["groups"] = g
        return cls(*args, **kw) if init else skip_init(cls, *args, **kw)

    out, inp = layer_shape(module)[:2]
    has_bias = module.bias is not None
    if is_linear_like(module):
        r, = ranks
        return OrderedDict([(ROLE_FIRST, make(nn.Linear, inp, r, bias=False)),
                            (ROLE_LAST, make(nn.Linear, r, out, bias=has_bias))])
    dims = _conv_dims(module)
    one = (1,) * dims
    conv = _CONVS[dims]
    inp *= g                        # every input channel (a grouped conv's weight holds in / groups)
    ranks = tuple(r * g for r in ranks)     # ranks count per group
    # The spatial part (stride/padding/dilation/padding_mode) lives on exactly one factor; pointwise
    # factors commute with zero/reflect/replicate/circular padding, so the result is unchanged.
    spatial = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                   padding_mode=module.padding_mode)
    spatial_conv = conv
    if same_padding_conv(module):   # the spatial factor pads as the layer does (a class of the same forward)
        spatial_conv = type(module)
        spatial = dict(stride=module.stride, dilation=module.dilation)
    if eff == "svd":        # 1x1 conv: first 1x1 carries stride/padding
        r, = ranks
        return OrderedDict([(ROLE_FIRST, make(spatial_conv, inp, r, one, bias=False, **spatial)),
                            (ROLE_LAST, make(conv, r, out, one, bias=has_bias))])
    if eff == "conv_svd":
        r, = ranks
        return OrderedDict([(ROLE_FIRST, make(spatial_conv, inp, r, module.kernel_size, bias=False, **spatial)),
                            (ROLE_LAST, make(conv, r, out, one, bias=has_bias))])
    r_in, r_out = ranks
    return OrderedDict([(ROLE_FIRST, make(conv, inp, r_in, one, bias=False)),
                        (ROLE_CORE, make(spatial_conv, r_in, r_out, module.kernel_size, bias=False, **spatial)),
                        (ROLE_LAST, make(conv, r_out, out, one, bias=has_bias))])


def weight_memory_format(w: torch.Tensor) -> Optional[torch.memory_format]:
    """torch.channels_last(_3d) for a conv weight stored so (a model moved to channels_last), else None."""
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if w.dim() == dim and not w.is_contiguous() and w.is_contiguous(memory_format=fmt):
            return fmt
    return None


def _finish(module: nn.Module, layers, eff: str) -> FactorChain:
    chain = FactorChain(layers, scheme=eff, source=type(module).__name__)
    chain.train(module.training)
    fmt = weight_memory_format(module.weight) if isinstance(module, nn.modules.conv._ConvNd) else None
    if fmt is not None:     # the factors of a channels_last conv are stored channels_last too
        chain.to(memory_format=fmt)
    return chain


def chain_like(module: nn.Module, ranks: Ranks, scheme: str) -> FactorChain:
    """A FactorChain with the architecture factorize_* would give at `ranks`, randomly initialized.

    No decomposition is run, so candidate ranks can be timed cheaply. Same device/dtype as `module`.
    """
    ranks = _check_ranks(module, ranks, scheme, "")
    eff = effective_scheme(module, scheme)
    w = module.weight
    return _finish(module, _make_layers(module, ranks, eff, w.device, w.dtype, init=True), eff)


def factor_dtype(a: torch.Tensor) -> torch.dtype:
    """dtype to build factors of weight `a` in: float64 weights keep float64 (a float64 model stays exact
    to float64 precision at full rank); any other dtype gets float32, cast to the layer's by the chain."""
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _set(param: nn.Parameter, value: torch.Tensor, requires_grad: bool) -> None:
    with torch.no_grad():
        param.copy_(value.reshape(param.shape))
    param.requires_grad_(requires_grad)


def _build(module: nn.Module, ranks: tuple, eff: str, weights: dict) -> FactorChain:
    """Chain in float32 (float64 for float64 weights) on the weight's device with the given factor
    weights, then cast back."""
    w = module.weight
    layers = _make_layers(module, ranks, eff, w.device, factor_dtype(w), init=False)
    for role, value in weights.items():
        _set(layers[role].weight, value, w.requires_grad)
    if module.bias is not None:
        _set(layers[ROLE_LAST].bias, module.bias.detach().float(), module.bias.requires_grad)
    return _finish(module, layers, eff).to(device=w.device, dtype=w.dtype)


def _whitened_svd(module: nn.Module, matrix: torch.Tensor, rank: int, whiten, name: str):
    """(left, right, bias correction or None) of the data-aware SVD (factorize/whiten.py)."""
    from .whiten import CHANNEL, whitened_svd_split
    if whiten.view == CHANNEL:
        raise FactorizationError(f"{_label(name)}: an SVD factorization needs im2col/linear calibration "
                                 f"statistics, got per-channel ones (recorded for Tucker-2)")
    left, right, _ = whitened_svd_split(matrix, rank, whiten, name=name)
    fix = None
    if module.bias is not None and whiten.stats.cross_moment is not None:
        # mean of W x_ref - W' x over the calibration samples, folded into the bias
        st = whiten.stats
        w = matrix.detach().double().to(st.xx.device)
        approx = (left.double() @ right.double()).to(st.xx.device)
        fix = (w @ st.ref_mean - approx @ st.mean).float()
    return left, right, fix


def _add_bias(chain: FactorChain, fix) -> FactorChain:
    if fix is not None:
        with torch.no_grad():
            chain[-1].bias.add_(fix.to(device=chain[-1].bias.device, dtype=chain[-1].bias.dtype))
    return chain


def factorize_linear(linear: nn.Linear, rank: int, *, name: str = "", whiten=None) -> FactorChain:
    """SVD of an nn.Linear or HF Conv1D: first = Linear(in, r, bias=False), last = Linear(r, out, bias).

    whiten: a factorize.whiten.Whitening (calibration statistics): the factors then minimise the
    error of the layer's outputs on that data instead of the weights' error.
    """
    _require_supported(linear, name)
    if not is_linear_like(linear):
        raise FactorizationError(f"{_label(name)}: factorize_linear needs an nn.Linear, got {type(linear).__name__}")
    ranks = _check_ranks(linear, rank, "svd", name)
    if whiten is not None:
        left, right, fix = _whitened_svd(linear, weight_matrix(linear), ranks[0], whiten, name)
        return _add_bias(_build(linear, ranks, "svd", {ROLE_FIRST: right, ROLE_LAST: left}), fix)
    left, right = svd_split(weight_matrix(linear), ranks[0], name=name, dtype=factor_dtype(linear.weight))
    return _build(linear, ranks, "svd", {ROLE_FIRST: right, ROLE_LAST: left})


def factorize_conv(conv: nn.Module, ranks: Ranks, scheme: str, *, name: str = "", whiten=None) -> FactorChain:
    """Factorize an nn.Conv1d/2d/3d into a FactorChain.

    1x1 kernels: SVD into two 1x1 convs, ranks=(r,), whatever `scheme` says.
    scheme="tucker2", ranks=(r_in, r_out): 1x1 in->r_in, kxk r_in->r_out (stride/padding/dilation),
    1x1 r_out->out (bias). scheme="conv_svd" (or its alias "svd"), ranks=(r,): kxk in->r, 1x1 r->out.
    A grouped conv: each group is factorized on its own at `ranks` (which count per group), and every
    factor is a conv with the same groups holding the groups' factors side by side.
    whiten: calibration statistics (factorize.whiten.Whitening; im2col view for SVD schemes, channel
    view for Tucker-2): fit the output error on that data instead of the weight error (groups=1).
    """
    _require_supported(conv, name)
    if is_linear_like(conv):
        raise FactorizationError(f"{_label(name)}: factorize_conv needs a conv layer; use factorize_linear")
    eff = effective_scheme(conv, scheme)
    ranks = _check_ranks(conv, ranks, scheme, name)
    w = conv.weight.detach()
    out, inp = w.shape[:2]
    if groups_of(conv) > 1:
        weights, fix = _grouped_factors(conv, ranks, eff, name, whiten)
        return _add_bias(_build(conv, ranks, eff, weights), fix)
    if eff in ("svd", "conv_svd"):
        if whiten is not None:
            left, right, fix = _whitened_svd(conv, w.reshape(out, -1), ranks[0], whiten, name)
            return _add_bias(_build(conv, ranks, eff, {ROLE_FIRST: right, ROLE_LAST: left}), fix)
        left, right = svd_split(w.reshape(out, -1), ranks[0], name=name, dtype=factor_dtype(w))
        return _build(conv, ranks, eff, {ROLE_FIRST: right, ROLE_LAST: left})
    r_in, r_out = ranks
    if whiten is not None:
        from .whiten import CHANNEL, whitened_tucker2
        if whiten.view != CHANNEL:
            raise FactorizationError(f"{_label(name)}: Tucker-2 needs per-channel calibration statistics, "
                                     f"got {whiten.view!r} ones")
        core, u_out, first, _ = whitened_tucker2(w, rank_out=r_out, rank_in=r_in, wh=whiten, name=name)
        return _build(conv, ranks, eff, {ROLE_FIRST: first, ROLE_CORE: core, ROLE_LAST: u_out})
    core, u_out, u_in = tucker2(w, rank_out=r_out, rank_in=r_in, name=name, dtype=factor_dtype(w))
    return _build(conv, ranks, eff, {ROLE_FIRST: u_in.t(), ROLE_CORE: core, ROLE_LAST: u_out})


def _grouped_factors(conv: nn.Module, ranks: tuple, eff: str, name: str,
                     whiten=None) -> tuple[dict, Optional[torch.Tensor]]:
    """Each group's factors (of its [out / g, in / g, *kernel] weight slice), stacked along the output
    dimension of every factor: the weights of factor convs with the conv's groups; and the bias correction
    of a data-aware fit (None without one). whiten: the layer's statistics, kept per group (InputStats.group)."""
    dtype = factor_dtype(conv.weight)
    from .whiten import CHANNEL, Whitening, whitened_tucker2
    if whiten is not None and (whiten.view == CHANNEL) != (eff == "tucker2"):
        raise FactorizationError(f"{_label(name)}: {eff} needs {'per-channel' if eff == 'tucker2' else 'im2col'} "
                                 f"calibration statistics, got {whiten.view!r} ones")
    parts, fixes = [], []
    for i, wg in enumerate(group_weights(conv)):
        label = f"{name} (group {i})" if name else f"group {i}"
        wh = None if whiten is None else Whitening(whiten.stats.group(i), whiten.damping)
        if eff == "tucker2":
            if wh is not None:
                core, u_out, first, _ = whitened_tucker2(wg, rank_out=ranks[1], rank_in=ranks[0], wh=wh, name=label)
            else:
                core, u_out, u_in = tucker2(wg, rank_out=ranks[1], rank_in=ranks[0], name=label, dtype=dtype)
                first = u_in.t()
            parts.append({ROLE_FIRST: first, ROLE_CORE: core, ROLE_LAST: u_out})
            continue
        if wh is not None:
            left, right, fix = _whitened_svd(conv, wg.reshape(wg.shape[0], -1), ranks[0], wh, label)
            fixes.append(fix)
        else:
            left, right = svd_split(wg.reshape(wg.shape[0], -1), ranks[0], name=label, dtype=dtype)
        parts.append({ROLE_FIRST: right, ROLE_LAST: left})
    fix = torch.cat(fixes) if fixes and all(f is not None for f in fixes) else None
    return {role: torch.cat([p[role] for p in parts]) for role in parts[0]}, fix


def factorize(module: nn.Module, ranks: Ranks, scheme: str = "tucker2", *, name: str = "",
              whiten=None) -> FactorChain:
    """factorize_linear or factorize_conv, whichever fits `module` (whiten: calibration statistics)."""
    if is_linear_like(module):
        r = tuple(ranks) if isinstance(ranks, (list, tuple)) else (ranks,)
        if len(r) != 1:
            raise RankError(f"{_label(name)}: a Linear layer takes one rank, got {ranks!r}")
        return factorize_linear(module, r[0], name=name, whiten=whiten)
    return factorize_conv(module, ranks, scheme, name=name, whiten=whiten)


PROGRESS_MIN_LAYERS = 16   # factorize_many shows its progress bar from this many layers on


def factorize_workers(device: torch.device) -> int:
    """Threads factorize_many uses: one per torch intra-op thread on CPU (at most 8), one on GPUs."""
    if device.type != "cpu":
        return 1
    return max(1, min(8, torch.get_num_threads(), os.cpu_count() or 1))


# Working memory of one layer's factorization, estimated from its weight: WORK_BYTES_PER_ELEMENT bytes
# per weight element (Tucker-2 peaks at about 4 float32 copies of the weight, 15 B/element measured
# for a 512x512x3x3 kernel; the float64 Gram SVD at ratio <= 0.25 at about 3), plus two float64
# copies of a whitened layer's statistics matrix.
WORK_BYTES_PER_ELEMENT = 16
# factorize_many runs layers in parallel while their estimated working memory adds up to at most
# this fraction of the bytes of all the weights it factorizes (or one layer at a time where a single
# layer needs more): the compile's peak memory then stays within about (1 + fraction) x the layers'
# bytes above the model's, whatever the number of workers.
WORK_BUDGET_FRACTION = 0.75
# After a layer whose estimated working memory is at least this, free heap memory is handed back to
# the OS (glibc malloc_trim): otherwise the arenas of the worker threads keep what the layer's
# temporaries used, and the compile's resident memory grows with every big layer (ResNet-50: 4.3x
# the model's bytes at the peak instead of 2.3x).
TRIM_MIN_BYTES = 4 << 20


def work_bytes(module: nn.Module, whiten=None) -> int:
    """Estimated working memory (bytes) of factorizing `module` (see WORK_BYTES_PER_ELEMENT)."""
    est = WORK_BYTES_PER_ELEMENT * _numel(module)
    xx = getattr(getattr(whiten, "stats", None), "xx", None)
    if isinstance(xx, torch.Tensor):
        est += 2 * 8 * xx.numel()
    return est


def schedule(costs: Sequence[int], budget: int, workers: int, run) -> tuple[dict, dict]:
    """Run job indices 0..len(costs)-1 on `workers` threads, largest cost first, starting a job only
    while the costs of the jobs in flight plus its own stay within `budget` (any job may start when
    none is in flight). run(i) does job i. Returns ({i: result}, {i: exception}); after a failure of
    job i, only jobs before i are still started (the first failure in job order is the one to raise).
    """
    pending = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    cond = threading.Condition()
    state = {"inflight": 0, "stop": len(costs)}
    results: dict = {}
    errors: dict = {}

    def take():
        with cond:
            while True:
                pending[:] = [i for i in pending if i < state["stop"]]
                if not pending:
                    return None
                for i in pending:
                    if state["inflight"] == 0 or state["inflight"] + costs[i] <= budget:
                        pending.remove(i)
                        state["inflight"] += costs[i]
                        return i
                cond.wait()

    def worker():
        while True:
            i = take()
            if i is None:
                return
            try:
                res, err = run(i), None
            except BaseException as e:   # noqa: BLE001 - handed to the caller
                res, err = None, e
            with cond:
                state["inflight"] -= costs[i]
                if err is None:
                    results[i] = res
                else:
                    errors[i] = err
                    state["stop"] = min(state["stop"], i)
                cond.notify_all()

    threads = [threading.Thread(target=worker, name=f"lrd_fx-factorize-{k}", daemon=True)
               for k in range(max(1, min(workers, len(costs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def factorize_many(jobs: Sequence[tuple], *, workers: Optional[int] = None, progress: bool = False,
                   desc: str = "factorize", whiten: Optional[dict] = None) -> dict:
    """Factorize several layers: {name: FactorChain} for jobs [(name, module, ranks, scheme), ...].

    On CPU the layers are spread over `workers` Python threads (default factorize_workers), each
    running its math on one torch thread: the small float64 GEMMs and eigensolvers of one layer do
    not scale across cores, whole layers do (about 2x on 2 cores). Big layers (weights over
    svd.SERIAL_MAX_NUMEL elements, e.g. AlexNet's 4096x9216 classifier) go first, one at a time with
    every torch thread, where their large GEMMs and eigensolver do scale. The others are started
    largest first, as long as the estimated working memory in flight (work_bytes) stays within
    WORK_BUDGET_FRACTION of the bytes of all the weights (see schedule); free heap memory is handed
    back to the OS after each layer of TRIM_MIN_BYTES or more (release_free_memory). The torch
    thread count is restored afterwards. Results do not depend on the number of workers or the
    order. `progress` shows a tqdm bar when there are at least PROGRESS_MIN_LAYERS layers. A failure
    names its layer: an LRDError is re-raised as is, anything else as FactorizationError; with
    several failures the first in job order is raised. `whiten` ({name: Whitening}) makes those
    layers data-aware.
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    if not jobs:
        return {}
    dev = jobs[0][1].weight.device
    n = factorize_workers(dev) if workers is None else max(1, int(workers))
    n = min(n, len(jobs))
    whiten = whiten or {}
    costs = [work_bytes(job[1], whiten.get(job[0])) for job in jobs]
    trim = dev.type == "cpu"                       # heap trims: host memory only
    if trim and max(costs) >= TRIM_MIN_BYTES:
        release_free_memory()    # what earlier steps freed (e.g. a forward pass's activations) is reused first
    bar = tqdm(total=len(jobs), desc=desc, unit="layer", leave=False,
               disable=not progress or len(jobs) < PROGRESS_MIN_LAYERS)
    lock = threading.Lock()

    def one(i):
        name, module, ranks, scheme = jobs[i]
        try:
            return factorize(module, ranks, scheme, name=name, whiten=whiten.get(name))
        except LRDError:
            raise
        except Exception as e:
            raise FactorizationError(f"layer '{name}' ({type(module).__name__}) could not be factorized at "
                                     f"ranks {list(ranks)}: {type(e).__name__}: {e}") from e
        finally:
            if trim and costs[i] >= TRIM_MIN_BYTES:
                release_free_memory()
            with lock:
                bar.update(1)

    out: dict = {}
    try:
        if n == 1:
            for i, job in enumerate(jobs):
                out[job[0]] = one(i)
            return out
        errors: dict = {}
        big = {i: None for i, job in enumerate(jobs) if _numel(job[1]) > SERIAL_MAX_NUMEL}   # job order
        for i in big:
            try:
                out[jobs[i][0]] = one(i)
            except BaseException as e:   # noqa: BLE001 - re-raised below, first in job order
                errors[i] = e
                break
        # the other layers, in parallel; after a failure only those before it (the first in job order is raised)
        stop = min(errors) if errors else len(jobs)
        rest = [i for i in range(stop) if i not in big]
        budget = int(WORK_BUDGET_FRACTION * sum(_numel(job[1]) * job[1].weight.element_size() for job in jobs))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            done, failed = schedule([costs[i] for i in rest], budget, n, lambda k: one(rest[k]))
        finally:
            torch.set_num_threads(threads)
        out.update({jobs[rest[k]][0]: chain for k, chain in done.items()})
        errors.update({rest[k]: e for k, e in failed.items()})
        if errors:
            raise errors[min(errors)]
        return {job[0]: out[job[0]] for job in jobs}
    finally:
        bar.close()
        if trim and max(costs) >= TRIM_MIN_BYTES:
            release_free_memory()


def _numel(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    return w.numel() if isinstance(w, torch.Tensor) else 0


# --- rank rules applied to a module (data-flow order: SVD (r,), Tucker-2 (r_in, r_out)) ------------
# The one implementation of each rule: the decompose pass calls these.

def ranks_for_ratio(module: nn.Module, scheme: str, ratio: float) -> tuple:
    """Largest ranks whose factor weights (bias excluded) are <= ratio of the layer's weights (per group:
    each group of a grouped conv alike)."""
    eff = effective_scheme(module, scheme)
    out, inp, *kernel = group_shape(module)
    k = math.prod(kernel)
    if eff == "tucker2":
        return tucker2_ranks_for_ratio(out, inp, k, ratio)
    return (svd_rank_for_ratio(out, inp * k, ratio),)


def group_weights(module: nn.Module) -> list:
    """The weight (detached) in the [out, in, *kernel] layout the rank rules and data-aware fits take (HF
    Conv1D's [in, out] transposed), as one slice per group of a grouped conv ([weight] otherwise)."""
    if is_linear_like(module):
        return [weight_matrix(module)]
    return list(module.weight.detach().chunk(groups_of(module)))


def largest_ranks(per_group) -> tuple:
    """The largest of each rank over the groups' rank tuples: every group keeps at least what its rule asks."""
    return tuple(max(r) for r in zip(*per_group))


def ranks_for_energy(module: nn.Module, scheme: str, energy: float, *, name: str = "") -> tuple:
    """Smallest ranks keeping `energy` of the singular-value energy (per unfolding for Tucker-2; in every
    group of a grouped conv)."""
    if effective_scheme(module, scheme) == "tucker2":
        return largest_ranks(tucker2_ranks_energy(w, energy, name=name) for w in group_weights(module))
    return largest_ranks((energy_rank(singular_values(w.reshape(w.shape[0], -1), name=name), energy),)
                         for w in group_weights(module))


def ranks_for_vbmf(module: nn.Module, scheme: str, *, name: str = "") -> tuple:
    """EVBMF rank estimate (per unfolding for Tucker-2; the largest over the groups of a grouped conv)."""
    if effective_scheme(module, scheme) == "tucker2":
        return largest_ranks(tucker2_ranks_vbmf(w, name=name) for w in group_weights(module))
    return largest_ranks((evbmf_rank(w.reshape(w.shape[0], -1), name=name),) for w in group_weights(module))
