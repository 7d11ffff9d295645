"""A stand-in for Hugging Face mixture-of-experts blocks, whose experts keep their weights as 3-D tensors.

transformers 5 stores a MoE block's experts as one module holding `gate_up_proj` (or `up_proj`) and
`down_proj` as [experts, out, in] tensors ([experts, in, out] where `is_transposed`), and dispatches its
forward to an experts implementation (`use_experts_implementation`: eager loop, batched or grouped matmul).
No Conv/Linear layer holds those weights, so nothing there could be factorized, though they are most of
the model's parameters (Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS). compile's copy gives such a module
the stand-in below: the same computation, with each expert's projections as `nn.Linear` layers in
`nn.ModuleList`s under the same names, which the decompose pass factorizes like any other layer, one
expert at a time. lrd_fx never imports transformers: the module is recognised by what the decorator
gives it.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .torch_modules import _linear

# the attributes transformers' use_experts_implementation gives every experts module it decorates
_LAYOUT = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
_MODULE_STATE = frozenset(vars(nn.Module()))


def _decorated(m: nn.Module) -> bool:
    # the decorator's forward (functools.wraps gives it the class forward's name; its code keeps its own)
    code = getattr(getattr(type(m), "forward", None), "__code__", None)
    return "use_experts_implementation" in getattr(code, "co_qualname", "")


def experts_names(m: nn.Module) -> Optional[tuple]:
    """(up projection, down projection) parameter names of a transformers experts module the stand-in can
    take (`use_experts_implementation`'s forward and layout flags, 3-D weights of one experts count, no
    other parameters of its own, not split across devices for expert parallelism), else None."""
    if not _decorated(m) or not all(hasattr(m, a) for a in _LAYOUT) or getattr(m, "_is_expert_parallel", False):
        return None
    if len(_call_names(m)) != 3:
        return None                   # not (hidden states, expert indices, expert weights)
    up = "gate_up_proj" if m.has_gate else "up_proj"
    names = [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if m.has_bias else [])
    own = dict(m.named_parameters(recurse=False))
    if set(own) != set(names):
        return None
    weights = [own[up], own["down_proj"]]
    if any(w.dim() != 3 or not w.is_floating_point() for w in weights) or weights[0].shape[0] != weights[1].shape[0]:
        return None
    if m.has_bias and any(own[n].dim() != 2 or own[n].shape[0] != weights[0].shape[0] for n in names[2:]):
        return None
    return up, "down_proj"


def _call_names(m: nn.Module) -> list:
    """The names of the experts class's own forward parameters (after self)."""
    forward = inspect.unwrap(type(m).forward)
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return []
    return [p.name for p in params]


_OWN = frozenset(("experts_class", "_orig_class", "_gate_fn", "_up_name", "_call_names"))


def restore_unfactorized_(root: nn.Module, ctx) -> list:
    """Put the original module back (Experts.original) wherever none of a stand-in's layers ended up
    factorized (skipped, reverted by the search or the whole-model guard): the stand-in would only run
    transformers' experts as a Python loop. Their layers' records go (the report lists the module's 3-D
    weights outside the layers again), and ctx.stand_ins no longer names them (save writes the module's own
    3-D weights). Returns the paths put back."""
    from .factorize.chain import FactorChain
    back, done = [], {}
    for path in list(ctx.stand_ins or ()):
        m = root.get_submodule(path)
        if not isinstance(m, Experts) or any(isinstance(x, FactorChain) for x in m.modules()):
            continue
        if id(m) not in done:
            done[id(m)] = m.original()
        parent, _, attr = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, done[id(m)])
        back.append(path)
    if back:
        ctx.stand_ins = [p for p in ctx.stand_ins if p not in back]
        for name in [n for n in ctx.records if any(n.startswith(p + ".") for p in back)]:
            del ctx.records[name]
        ctx.notes.append(f"{len(back)} mixture-of-experts module(s) ('{back[0]}', ...) had no expert factorized: "
                         f"put back as the original module, which runs transformers' own experts implementation")
    return back


class Experts(nn.Module):
    """A transformers experts module with each expert's projections as nn.Linear layers: `gate_up_proj[e]`
    (or `up_proj[e]`) and `down_proj[e]`, in `nn.ModuleList`s. Its forward is the experts' eager loop: each
    expert that the router picked runs its tokens through its up projection, the gate (the module's own
    `_apply_gate`: SwiGLU, GPT-OSS's clamped gate) or activation, its down projection and any post-expert
    norm, weighted by the router and added up. The module's other attributes (act_fn, config, a gate's
    constants) are kept as they are."""

    _lrd_eager = True      # routing is data-dependent: trace keeps it eager and swaps its layers in place

    def __init__(self, experts: nn.Module):
        super().__init__()
        up, _ = experts_names(experts)
        # e.g. GPT-OSS's call names: router_indices, routing_weights
        self._adopt(experts, up, type(experts)._apply_gate if experts.has_gate else None, _call_names(experts))

    def _adopt(self, experts: nn.Module, up: str, gate_fn, call_names: list) -> None:
        """Take `experts`' attributes, buffers and submodules, and its 3-D `up` and `down_proj` weights as one
        nn.Linear per expert (read with the layout flags: this module's, or the class's for BatchedExperts)."""
        for k, v in vars(experts).items():
            if k not in _MODULE_STATE:
                self.__dict__[k] = v
        for k, v in experts._buffers.items():
            self.register_buffer(k, v, persistent=k not in experts._non_persistent_buffers_set)
        for k, v in experts._modules.items():
            self.add_module(k, v)
        self.training = experts.training
        self.experts_class = f"{type(experts).__module__}.{type(experts).__qualname__}"
        self._orig_class = type(experts)
        self._gate_fn = gate_fn
        self._up_name = up
        self._call_names = call_names
        for name in (up, "down_proj"):
            w = getattr(experts, name)
            b = getattr(experts, f"{name}_bias") if self.has_bias else None
            layers = [_linear(w[e].T if self.is_transposed else w[e], None if b is None else b[e], experts,
                              w.requires_grad) for e in range(w.shape[0])]
            setattr(self, name, nn.ModuleList(layers))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        # called as the original: positionally, or by its forward's parameter names
        names = self._call_names
        if len(args) > 3 or set(kwargs) != set(names[len(args):]):
            raise TypeError(f"{self.experts_class}.forward takes ({', '.join(names)}), got {len(args)} positional "
                            f"argument(s) and {sorted(kwargs)}")
        hidden_states, top_k_index, top_k_weights = list(args) + [kwargs[n] for n in names[len(args):]]
        up, down = getattr(self, self._up_name), self.down_proj
        n = len(down)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [experts (+1: index n is expert parallelism's "not here"), top_k, tokens]
            mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            if e == n:
                continue
            pos, tokens = torch.where(mask[e])
            h = up[e](hidden_states[tokens])
            h = self._gate_fn(self, h) if self._gate_fn is not None else self.act_fn(h)
            h = down[e](h)
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            h = h * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the original module's 3-D keys (a state dict of the caller's model) go to the experts' layers
        for name in (self._up_name, "down_proj"):
            for kind, key in (("weight", f"{prefix}{name}"), ("bias", f"{prefix}{name}_bias")):
                packed = state_dict.get(key)
                if not isinstance(packed, torch.Tensor) or f"{prefix}{name}.0.{kind}" in state_dict:
                    continue
                del state_dict[key]
                for e in range(packed.shape[0]):
                    part = packed[e].T if kind == "weight" and self.is_transposed else packed[e]
                    state_dict[f"{prefix}{name}.{e}.{kind}"] = part
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def original(self) -> nn.Module:
        """The module as transformers has it (its class, its 3-D weights stacked from the layers), for a
        stand-in none of whose layers was factorized: transformers' own experts implementation (grouped or
        batched matmul) is then as fast as the loop or faster."""
        cls = self._orig_class
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k, v in vars(self).items():
            if k not in _MODULE_STATE and k not in _OWN:
                m.__dict__[k] = v
        for k, v in self._buffers.items():
            m.register_buffer(k, v, persistent=k not in self._non_persistent_buffers_set)
        for k, v in self._modules.items():
            if k not in (self._up_name, "down_proj"):
                m.add_module(k, v)
        for name in (self._up_name, "down_proj"):
            layers = getattr(self, name)
            grad = layers[0].weight.requires_grad
            w = torch.stack([x.weight.detach().T if self.is_transposed else x.weight.detach() for x in layers])
            m.register_parameter(name, nn.Parameter(w.contiguous(), requires_grad=grad))
            if self.has_bias:
                b = torch.stack([x.bias.detach() for x in layers])
                m.register_parameter(f"{name}_bias", nn.Parameter(b, requires_grad=grad))
        m.training = self.training
        return m

    def extra_repr(self) -> str:
        return f"{self.experts_class}, experts={len(self.down_proj)}"


def batched_experts(m: nn.Module) -> bool:
    """Llama-4's experts (transformers' Llama4TextExperts, exactly that class, not decorated by
    use_experts_implementation): every expert takes an equal slice of the tokens (the router has scaled each
    copy), through 3-D `gate_up_proj` [experts, hidden, 2 x width] and `down_proj` [experts, width, hidden]
    with torch.bmm, and nothing else of its own."""
    cls = type(m)
    if cls.__name__ != "Llama4TextExperts" or not cls.__module__.startswith("transformers.models.llama4"):
        return False
    own = dict(m.named_parameters(recurse=False))
    if set(own) != {"gate_up_proj", "down_proj"} or m._buffers or not hasattr(m, "act_fn"):
        return False
    up, down = own["gate_up_proj"], own["down_proj"]
    return (up.dim() == 3 and down.dim() == 3 and up.is_floating_point() and up.shape[0] == down.shape[0]
            and up.shape[2] == 2 * down.shape[1] and up.shape[1] == down.shape[2])


class BatchedExperts(Experts):
    """The stand-in for Llama-4's experts (batched_experts): each expert's projections as nn.Linear layers,
    `gate_up_proj[e]` (hidden -> 2 x width: gate, then up) and `down_proj[e]`; its forward splits the tokens
    into one equal slice per expert, as transformers' does, and runs each expert's slice through its layers
    (`down(up * act(gate))`). Every expert runs on every call."""

    # the layout flags Experts._adopt, original and _load_from_state_dict read: weights [experts, in, out]
    has_gate, has_bias, is_transposed, has_post_expert_norm = True, False, True, False

    def __init__(self, experts: nn.Module):
        nn.Module.__init__(self)
        self._adopt(experts, "gate_up_proj", None, ["hidden_states"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        up, down = self.gate_up_proj, self.down_proj
        hidden = down[0].out_features
        h = hidden_states.view(len(down), -1, hidden)
        outs = []
        for e in range(len(down)):
            gate, x = up[e](h[e]).chunk(2, dim=-1)
            outs.append(down[e](x * self.act_fn(gate)))
        return torch.stack(outs).view(-1, hidden)


def is_expert_layer(root: nn.Module, name: str) -> bool:
    """True for an expert's projection in an Experts stand-in (`<experts>.<projection>.<expert>`): its forward
    calls every layer the router picks, so one the example inputs routed no token to is still called as a
    layer (decompose factorizes it; the rank search times it at a sibling's input shape)."""
    owner = name.rpartition(".")[0].rpartition(".")[0]
    try:
        return isinstance(root.get_submodule(owner), Experts)
    except AttributeError:
        return False
