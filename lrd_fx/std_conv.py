"""Weight-standardized convolutions (timm's StdConv2d, ScaledStdConv2d and their 'SAME'-padded forms: BiT
ResNet-V2, NFNets, NF-RegNets, NF-ResNets, the hybrid ViTs' stems).

Their forward standardizes the weight on every call (each output channel's filter to zero mean and unit
variance, ScaledStdConv2d then scales it by `gain * scale`) and convolves with the result, so factors of
the stored weight would not reproduce them. In compile's copy each one becomes a plain convolution holding
the standardized weight (nn.Conv2d, or timm's Conv2dSame where the layer pads 'SAME' on every call): the
same outputs, and a layer every pass handles like any other. A layer that ends up factorized is factorized
from the standardized weight; its factors train as any factors do, without re-standardizing. Every layer
that does not end up factorized (skipped, reverted by the search or the whole-model guard) is put back as
the original module, so it keeps standardizing its weight in training.

Recognised by class name and module (lrd_fx never needs timm imported for this), and only where a probe
on the layer's device finds the plain convolution equal to the layer's own forward.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_CLASSES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def is_standardized_conv(m: nn.Module) -> bool:
    """timm's StdConv2d, StdConv2dSame, ScaledStdConv2d or ScaledStdConv2dSame (exactly those classes)."""
    cls = type(m)
    return cls.__name__ in _CLASSES and cls.__module__.startswith("timm.layers") and isinstance(m, nn.Conv2d)


def standardized_weight(m: nn.Module) -> torch.Tensor:
    """The weight the layer's forward convolves with (detached), computed as timm does."""
    w = m.weight.detach()
    scale = None
    if type(m).__name__.startswith("Scaled"):
        scale = (m.gain.detach() * m.scale).view(-1)
    with torch.no_grad():
        return F.batch_norm(w.reshape(1, m.out_channels, -1), None, None, weight=scale, training=True,
                            momentum=0.0, eps=m.eps).reshape_as(w)


def _plain(m: nn.Module) -> Optional[nn.Module]:
    """The plain convolution equal to `m` (weight: the standardized one, bias: m's own Parameter), or None
    when that cannot be built or checked."""
    kw = dict(stride=m.stride, dilation=m.dilation, groups=m.groups, bias=m.bias is not None, device="meta")
    if getattr(m, "same_pad", False):
        # pads from each input's size, as the layer does; Conv2dSame takes no padding or padding_mode
        cls = getattr(sys.modules.get("timm.layers.conv2d_same"), "Conv2dSame", None)
        if cls is None or m.padding_mode != "zeros":
            return None
    else:
        cls = nn.Conv2d
        kw.update(padding=m.padding, padding_mode=m.padding_mode)
    new = cls(m.in_channels, m.out_channels, m.kernel_size, **kw)
    w = m.weight
    from .factorize.modules import weight_memory_format
    fmt = weight_memory_format(w) or torch.contiguous_format     # a model moved to channels_last stays so
    new.weight = nn.Parameter(standardized_weight(m).contiguous(memory_format=fmt).clone(memory_format=fmt),
                              requires_grad=w.requires_grad)
    if m.bias is not None:
        new.bias = m.bias
    new.train(m.training)
    return new if _same_outputs(m, new) else None


def _same_outputs(m: nn.Module, new: nn.Module) -> bool:
    """The plain convolution and the layer's own forward agree on a random input (within a few units of
    the dtype's rounding); True without a check where the weight holds no data (meta, fake tensors)."""
    w = m.weight
    from torch._subclasses.fake_tensor import is_fake
    if w.device.type == "meta" or is_fake(w):
        return True
    k = [(k - 1) * d + 1 for k, d in zip(m.kernel_size, m.dilation)]
    size = [max(2 * kk, kk + 2 * s) for kk, s in zip(k, m.stride)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, m.in_channels, *size, generator=gen).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            want, got = type(m).forward(m, x), new(x)
    except Exception:  # noqa: BLE001 - a layer that fails on a plain input is not what this file knows
        return False
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 16 * torch.finfo(w.dtype).eps
    return torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max().clamp_min(1.0)))


def use_plain_convs_(model: nn.Module, leaf_modules: Iterable = ()) -> dict:
    """In compile's copy `model`, give every weight-standardized convolution its plain equivalent, in place:
    not those inside modules the caller keeps whole (`leaf_modules`: classes, or paths and what is under
    them), with hooks or parametrizations, or whose weight another module shares. Returns {path: (original,
    plain)} (a layer at several paths gets one plain convolution)."""
    from torch.nn.utils import parametrize

    from .trace import call_reason
    leaf_classes = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_paths = [x for x in leaf_modules if isinstance(x, str)]
    owners: dict[int, set] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    inside_leaf: set = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, leaf_classes) or any(name == p or name.startswith(p + ".") for p in leaf_paths):
            inside_leaf.update(id(x) for x in m.modules())
    made: dict[int, Optional[nn.Module]] = {}
    out: dict = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not name or not is_standardized_conv(m) or id(m) in inside_leaf:
            continue
        if call_reason(m) is not None or parametrize.is_parametrized(m) or len(owners.get(id(m.weight), ())) > 1:
            continue
        if id(m) not in made:
            made[id(m)] = _plain(m)
        if made[id(m)] is None:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, made[id(m)])
        out[name] = (m, made[id(m)])
    return out


def restore_unfactorized_(root: nn.Module, ctx) -> list:
    """Put the original layer back wherever its plain convolution is still there (not factorized: skipped,
    reverted by the search or the whole-model guard); give every such layer's record the original's class
    and parameter count (ScaledStdConv2d's gain). Returns the paths put back."""
    from .passes.decompose import kind_of
    from .plan import DECOMPOSED, SEARCHED
    back = []
    for path, (orig, plain) in (ctx.std_convs or {}).items():
        rec = ctx.records.get(path)
        extra = _extra_params(orig)
        if rec is not None:
            rec.kind = kind_of(orig)
            rec.params_before += extra
        parent, _, attr = path.rpartition(".")
        holder = root.get_submodule(parent) if parent else root
        factorized = rec is not None and rec.decision in (DECOMPOSED, SEARCHED)
        if not factorized and _still_plain(getattr(holder, attr, None), plain):
            setattr(holder, attr, orig)
            back.append(path)
            if rec is not None:
                rec.params_after += extra
    if len(back) < len(ctx.std_convs or {}):
        done = [p for p in ctx.std_convs if p not in back]
        ctx.notes.append(f"{len(done)} weight-standardized convolution(s) ('{done[0]}', "
                         f"{type(ctx.std_convs[done[0]][0]).__name__}) factorized from the weight their forward "
                         f"standardizes: the outputs are the same; in training their factors are not "
                         f"standardized again (those not factorized are put back as they were)")
    return back


def _still_plain(cur: Optional[nn.Module], plain: nn.Module) -> bool:
    """`cur` is the plain convolution, or a copy of it with the same weights (the search and the whole-model
    guard put back copies); not one whose weights a pass changed (fuse_inference folding a BatchNorm)."""
    if cur is plain:
        return True
    if type(cur) is not type(plain) or not torch.equal(cur.weight, plain.weight):
        return False
    return (cur.bias is None) == (plain.bias is None) and (cur.bias is None or torch.equal(cur.bias, plain.bias))


def _extra_params(orig: nn.Module) -> int:
    return sum(p.numel() for n, p in orig.named_parameters(recurse=False) if n not in ("weight", "bias"))


def folded_params(std_convs: Optional[dict]) -> int:
    """Parameters the plain convolutions do not hold (ScaledStdConv2d's gain), each layer once: compile
    counts them in the model's parameters before."""
    seen = {id(orig): orig for orig, _ in (std_convs or {}).values()}
    return sum(_extra_params(orig) for orig in seen.values())
