"""FactorChain: the factor layers that replace a Conv/Linear; exact from the moment it is installed.

A chain may be *pending*: built with the right shapes, its factorization still owed. It computes its
source layer all the same: the first forward of any of its factor layers factorizes the source at the
chain's ranks and copies the factors into the chain's own parameters, in place; `materialize_(model)`
does this for every pending chain of a model in one parallel call. Inside `paused(model)` a pending
chain is not factorized when it runs: it returns its source layer's output instead (the calibrate pass
runs the model so while it fits the chains itself). No torch.fx here: passes rewire the graph.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import FactorizationError

# Roles of the factor layers; the freezing schedules group layers by these names.
ROLE_FIRST = "first"   # input projection (SVD: in -> r; Tucker-2: 1x1 in -> r_in)
ROLE_CORE = "core"     # Tucker-2 only: kxk r_in -> r_out
ROLE_LAST = "last"     # output projection (r -> out), carries the original bias

# Source classes whose weight is stored [in, out] (transformers' Conv1D: y = x @ W + b).
_IN_OUT_LAYOUT = {"Conv1D"}


def _product(layers) -> torch.Tensor:
    """The weight of applying `layers` (Linear or ConvNd, all with the same groups, at most one non-1x1
    kernel) in order, as one [out, in / groups, *kernel] tensor."""
    layers = list(layers)
    g = int(getattr(layers[0], "groups", 1))
    if g > 1:       # block-diagonal factors: each group's product, stacked as a grouped conv's weight is
        return torch.cat([_weights_product([layer.weight.chunk(g)[i] for layer in layers]) for i in range(g)])
    return _weights_product([layer.weight for layer in layers])


def _weights_product(weights) -> torch.Tensor:
    w = None
    for lw in weights:
        if w is None:
            w = lw
            continue
        c2, c1 = lw.shape[:2]
        if all(k == 1 for k in lw.shape[2:]):      # pointwise after anything: a matmul over channels
            w = (lw.reshape(c2, c1) @ w.reshape(c1, -1)).reshape(c2, *w.shape[1:])
        else:                                      # a kxk core after a pointwise factor
            w = torch.einsum("ock,ci->oik", lw.reshape(c2, c1, -1), w.reshape(c1, -1))
            w = w.reshape(c2, w.shape[1], *lw.shape[2:])
    return w


@dataclass(eq=False)
class Pending:
    """The factorization a chain still owes: `source` (the original layer) at `ranks` (data-flow order)
    with `scheme`; `name` is the layer's qualified name, for messages."""
    source: nn.Module
    ranks: tuple
    scheme: str
    name: str = ""


@contextlib.contextmanager
def _math_context(device: torch.device):
    """Factorize in full precision with autograd off, whatever the caller's forward runs under
    (autocast, inference_mode): the factors are copied into ordinary parameters."""
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


def _spatial_attr(name: str) -> property:
    """A conv attribute of the replaced layer, read from the factor that carries the kernel (convs only)."""
    return property(lambda self: self._conv_attr(name), doc=f"the replaced conv's {name}")


class FactorChain(nn.Sequential):
    """A factorized layer: children named first/[core]/last, applied in that order.

    The compiled graph calls the children directly (so every factor is a node);
    the container itself stays callable so the cost model can time it alone.

    It keeps the face of the layer it replaced, so code that reads the layer's attributes keeps working:
    in_features/out_features (Linear), in_channels/out_channels/kernel_size/stride/padding/dilation/groups/
    padding_mode (Conv), nx/nf (transformers' Conv1D), `.bias` (the last factor's) and `.weight`.
    `.weight` is the product of the factors, computed on every read (one matmul of the factor sizes, with
    autograd), in the replaced layer's layout, dtype and device: fine for `.weight.dtype` checks, but code
    that reads it per forward pays that matmul each time.

    A pending chain (`pending_chain`, `.pending` set) factorizes its source on the first forward of
    any factor (or read of `.weight`), or when `materialize_` is called; it is never observable with
    weights that do not compute the source.
    """

    # The replaced layer's face is for Python code: torch.jit.script leaves these properties out (it
    # would compile each one, and the spatial ones are lambdas it cannot compile).
    __jit_unused_properties__ = ["pending", "in_features", "out_features", "nx", "nf", "in_channels",
                                 "out_channels", "kernel_size", "stride", "padding", "dilation",
                                 "padding_mode", "output_padding", "groups", "transposed", "bias", "weight"]

    # Pending state lives in instance attributes set by defer_ and removed once filled; a filled chain
    # carries none of them (these class defaults answer for it).
    _pending: Optional[Pending] = None
    _paused: int = 0          # > 0 inside paused(): run the source instead of factorizing
    _stash = None             # (args, kwargs) of the current call of `first`, while paused
    _handles: tuple = ()      # the forward hooks that make a pending chain exact

    def __init__(self, layers: "OrderedDict[str, nn.Module]", *, scheme: str, source: str):
        super().__init__(layers)
        self.scheme = scheme    # "svd" | "tucker2" | "conv_svd"
        self.source = source    # class name of the layer it replaces, e.g. "Conv2d"

    def roles(self) -> list[str]:
        return list(self._modules.keys())

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, source={self.source}" + (", pending" if self._pending else "")

    # --- pending factorization ----------------------------------------------------------------

    @property
    def pending(self) -> Optional[Pending]:
        """The factorization this chain still owes, or None once its weights are the factors."""
        return self._pending

    def defer_(self, source: nn.Module, ranks, scheme: str, *, name: str = "") -> "FactorChain":
        """Make this chain owe the factorization of `source` at `ranks`: the first forward of any
        factor (or `materialize_`) computes it and fills the parameters in place."""
        self._release()
        ranks = tuple(int(r) for r in ranks) if isinstance(ranks, (list, tuple)) else (int(ranks),)
        self._pending = Pending(source, ranks, scheme, name)
        handles = [child.register_forward_pre_hook(self._before_factor, with_kwargs=True)
                   for child in self._modules.values()]
        handles.append(self._last().register_forward_hook(self._after_last, with_kwargs=True))
        self._handles = tuple(handles)
        return self

    def materialize_(self) -> "FactorChain":
        """Run the owed factorization now and copy it into this chain's parameters (no-op if filled)."""
        p = self._pending
        if p is None:
            return self
        from . import modules   # modules imports this file
        with _math_context(p.source.weight.device):
            self.fill_(modules.factorize(p.source, p.ranks, p.scheme, name=p.name))
        return self

    def fill_(self, chain: "FactorChain") -> "FactorChain":
        """Copy the parameters of `chain` (a factorization at this chain's ranks) into this chain's, in
        place (their requires_grad flags too); the chain owes nothing afterwards."""
        mine, theirs = dict(self.named_parameters()), dict(chain.named_parameters())
        if {k: p.shape for k, p in mine.items()} != {k: p.shape for k, p in theirs.items()}:
            who = f"layer '{self._pending.name}'" if self._pending and self._pending.name else "factor chain"
            raise FactorizationError(
                f"{who}: cannot fill factors {[(k, list(p.shape)) for k, p in mine.items()]} from "
                f"{[(k, list(p.shape)) for k, p in theirs.items()]}; this is a bug, please report it")
        with torch.no_grad():
            for k, p in mine.items():
                q = theirs[k]
                p.copy_(q.detach().to(dtype=p.dtype, device=p.device))
                p.requires_grad_(q.requires_grad)
        self._release()
        return self

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        for attr in ("_pending", "_paused", "_stash", "_handles"):
            self.__dict__.pop(attr, None)

    def _before_factor(self, module, args, kwargs):
        """Pre-hook on every factor while pending: factorize before the first factor runs."""
        if self._pending is None:
            return None
        if self._paused:
            if module is self._first():
                self._stash = (args, kwargs)
            return None
        self.materialize_()
        return None

    def _after_last(self, module, args, kwargs, output):
        """Hook on the last factor while pending and paused: the chain's output is its source's."""
        if self._pending is None or not self._paused or self._stash is None:
            return None
        a, kw = self._stash
        self._stash = None
        return self._pending.source(*a, **kw)

    # --- the replaced layer's face -------------------------------------------------------------

    def _first(self) -> nn.Module:
        return self._modules[ROLE_FIRST]

    def _last(self) -> nn.Module:
        return self._modules[ROLE_LAST]

    def _spatial(self) -> nn.Module:
        """The factor that carries kernel/stride/padding (Tucker-2: the core; otherwise the first)."""
        return self._modules.get(ROLE_CORE) or self._first()

    def _conv_attr(self, name: str):
        sp = self._spatial()
        if isinstance(sp, nn.Linear):
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute '{name}'")
        return getattr(sp, name)

    def _linear_attr(self, name: str, value):
        if not isinstance(self._first(), nn.Linear):
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute '{name}'")
        return value

    @property
    def in_features(self) -> int:
        return self._linear_attr("in_features", self._first().in_features)

    @property
    def out_features(self) -> int:
        return self._linear_attr("out_features", self._last().out_features)

    @property
    def nx(self) -> int:   # transformers' Conv1D names
        if self.source not in _IN_OUT_LAYOUT:
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute 'nx'")
        return self._first().in_features

    @property
    def nf(self) -> int:
        if self.source not in _IN_OUT_LAYOUT:
            raise AttributeError(f"FactorChain replacing {self.source} has no attribute 'nf'")
        return self._last().out_features

    @property
    def in_channels(self) -> int:
        self._conv_attr("in_channels")
        return self._first().in_channels

    @property
    def out_channels(self) -> int:
        self._conv_attr("out_channels")
        return self._last().out_channels

    kernel_size = _spatial_attr("kernel_size")
    stride = _spatial_attr("stride")
    padding = _spatial_attr("padding")
    dilation = _spatial_attr("dilation")
    padding_mode = _spatial_attr("padding_mode")
    output_padding = _spatial_attr("output_padding")

    @property
    def groups(self) -> int:
        self._conv_attr("groups")
        return self._first().groups     # a grouped conv's factors are all grouped as it was

    @property
    def transposed(self) -> bool:
        self._conv_attr("transposed")
        return False

    @property
    def bias(self):
        return self._last().bias

    @property
    def weight(self) -> torch.Tensor:
        p = self._pending
        if p is not None:
            if self._paused:
                return p.source.weight     # the replaced layer's own weight, already in its layout
            self.materialize_()
        w = _product(self._modules.values())
        if self.source in _IN_OUT_LAYOUT:
            return w.t()
        return w


def pending_chain(source: nn.Module, ranks, scheme: str, *, name: str = "") -> FactorChain:
    """A FactorChain of `source` at `ranks` whose factorization is deferred (see FactorChain.pending):
    the factor shapes are set and the bias copied now; the factors come on first use or from
    `materialize_`. Same device/dtype as `source`."""
    from . import modules   # modules imports this file
    chain = modules.chain_like(source, ranks, scheme)
    if source.bias is not None:
        with torch.no_grad():
            chain._last().bias.copy_(source.bias.detach())
    return chain.defer_(source, ranks, modules.effective_scheme(source, scheme), name=name)


def pending_chains(root: nn.Module) -> list[tuple[str, FactorChain]]:
    """(qualified name, chain) of every pending FactorChain in `root`, each chain once."""
    return [(n, m) for n, m in root.named_modules() if isinstance(m, FactorChain) and m.pending is not None]


def materialize_(root: nn.Module, *, progress: bool = False) -> int:
    """Fill every pending chain in `root` (one factorize_many call: layers in parallel, a progress
    bar from factorize.modules.PROGRESS_MIN_LAYERS layers on); returns how many were filled."""
    chains = pending_chains(root)
    if not chains:
        return 0
    from . import modules   # modules imports this file
    jobs = [(n, c.pending.source, c.pending.ranks, c.pending.scheme) for n, c in chains]
    with _math_context(jobs[0][1].weight.device):
        made = modules.factorize_many(jobs, progress=progress)
    for n, c in chains:
        c.fill_(made[n])
    return len(chains)


@contextlib.contextmanager
def paused(root: nn.Module):
    """Inside this block the pending chains of `root` stay pending when they run: each returns its
    source layer's output (exact; its factor weights are not used and not computed)."""
    chains = [c for _, c in pending_chains(root)]
    for c in chains:
        c._paused = c._paused + 1
    try:
        yield
    finally:
        for c in chains:
            if c.pending is not None:
                c._paused = max(0, c._paused - 1)
                c._stash = None
