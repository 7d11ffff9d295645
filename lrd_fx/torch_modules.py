"""Stand-ins for torch.nn's attention and transformer modules whose projections are plain nn.Linear layers.

nn.MultiheadAttention reads its projection weights directly (F.multi_head_attention_forward), and in eval
mode nn.TransformerEncoderLayer and nn.TransformerEncoder take a fused fast path that reads every layer's
weights; neither can call a factor chain. Before tracing, compile gives its copy of the model these
stand-ins (when Linear layers are factorized): the same computation as torch's own non-fused path, with
the input and output projections as nn.Linear children that the passes factorize like any other.
"""
import math
from typing import Iterable, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len


@fx.wrap
def canonical_masks(src: Tensor, src_mask: Optional[Tensor],
                    src_key_padding_mask: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """nn.TransformerEncoderLayer's mask checks (bool masks to float, -inf where masked). One graph node, so
    an encoder layer called with masks still traces."""
    src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                             other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                             target_type=src.dtype)
    src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
    return src_mask, src_key_padding_mask


@fx.wrap
def attend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, batch_first: bool,
           key_padding_mask: Optional[Tensor], need_weights: bool, attn_mask: Optional[Tensor],
           average_attn_weights: bool, is_causal: bool, dropout_p: float, training: bool,
           bias_k: Optional[Tensor], bias_v: Optional[Tensor], add_zero_attn: bool):
    """F.multi_head_attention_forward from the projected query, key and value to the attention output before
    the output projection, in the caller's layout (batch first or not, batched or not): (output, weights).
    One graph node, so the module traces whatever the masks and shapes."""
    is_batched = F._mha_shape_check(q, k, v, key_padding_mask, attn_mask, num_heads)
    if batch_first and is_batched:
        q, k, v = q.transpose(1, 0), k.transpose(1, 0), v.transpose(1, 0)
    if not is_batched:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = q.shape
    src_len = k.shape[0]
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=q.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros.to(v.dtype)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    weights: Optional[Tensor] = None
    if need_weights:
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal without attn_mask is not implemented for need_weights=True")
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        scores = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            scores = F.dropout(scores, p=dropout_p)
        out = torch.bmm(scores, v).transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
        weights = scores.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    if not is_batched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(1, 0)
    return out, weights


def _linear(weight: Tensor, bias: Optional[Tensor], like: nn.Module, requires_grad: bool) -> nn.Linear:
    """An nn.Linear holding copies of weight and bias (no random initialisation run for it)."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    out.train(like.training)
    return out


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention with its packed input projection as an nn.Linear child, `in_proj` (embed_dim ->
    3 x embed_dim; out_proj as before): the same forward (arguments, masks, batch_first, need_weights,
    dropout, bias_k/bias_v, add_zero_attn), computed as torch's non-fused path computes it. Self-attention
    (query, key and value one tensor) projects once and splits, as torch does; otherwise each distinct input
    goes through the projection once and keeps its part (query and key one tensor: two projections). `in_proj_weight` / `in_proj_bias` are computed from the child
    on each read, for code that reads them, and a state dict of the original module loads into it.
    MultiheadAttentionKV is the kdim/vdim variant."""

    __jit_unused_properties__ = ["in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                                 "v_proj_weight"]

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.num_heads, self.dropout, self.batch_first = mha.num_heads, mha.dropout, mha.batch_first
        self.head_dim, self.add_zero_attn = mha.head_dim, mha.add_zero_attn
        self._projections(mha)
        self.out_proj = mha.out_proj
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        self.training = mha.training

    def _projections(self, mha: nn.MultiheadAttention) -> None:
        w = mha.in_proj_weight
        self.in_proj = _linear(w, mha.in_proj_bias, mha, w.requires_grad)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if query is key and key is value:
            qkv = self.in_proj(query).chunk(3, dim=-1)
            return qkv[0], qkv[1], qkv[2]
        if query is key:                 # DETR: positions added to the queries and keys, not to the values
            qk = self.in_proj(query)
            return qk[..., :e], qk[..., e:2 * e], self.in_proj(value)[..., 2 * e:]
        q = self.in_proj(query)[..., :e]
        if key is value:
            kv = self.in_proj(key)[..., e:].chunk(2, dim=-1)
            return q, kv[0], kv[1]
        return q, self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        q, k, v = self._project(query, key, value)
        res = attend(q, k, v, self.num_heads, self.batch_first, key_padding_mask, need_weights, attn_mask,
                     average_attn_weights, is_causal, self.dropout, self.training, self.bias_k, self.bias_v,
                     self.add_zero_attn)
        return self.out_proj(res[0]), res[1]

    @property
    def in_proj_weight(self) -> Optional[Tensor]:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        return self.in_proj.bias

    @property
    def q_proj_weight(self) -> Optional[Tensor]:
        return None

    @property
    def k_proj_weight(self) -> Optional[Tensor]:
        return None

    @property
    def v_proj_weight(self) -> Optional[Tensor]:
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # nn.MultiheadAttention's keys (a state dict of the original model) go to the projections
        for kind in ("weight", "bias"):
            key = f"{prefix}in_proj_{kind}"
            if key in state_dict and f"{prefix}in_proj.{kind}" not in state_dict:
                state_dict[f"{prefix}in_proj.{kind}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class MultiheadAttentionKV(MultiheadAttention):
    """The stand-in for an nn.MultiheadAttention whose key/value dimensions differ from embed_dim (kdim,
    vdim): three projections, q_proj, k_proj and v_proj, as torch keeps them."""

    def _projections(self, mha: nn.MultiheadAttention) -> None:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        grad = mha.q_proj_weight.requires_grad
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b, mha, grad) for w, b in zip(weights, biases))

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    @property
    def in_proj_weight(self) -> Optional[Tensor]:
        return None

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    @property
    def q_proj_weight(self) -> Optional[Tensor]:
        return self.q_proj.weight

    @property
    def k_proj_weight(self) -> Optional[Tensor]:
        return self.k_proj.weight

    @property
    def v_proj_weight(self) -> Optional[Tensor]:
        return self.v_proj.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ("q_proj", "k_proj", "v_proj")
        packed = state_dict.get(f"{prefix}in_proj_bias")
        if packed is not None and f"{prefix}q_proj.bias" not in state_dict:
            for name, part in zip(names, packed.chunk(3)):
                state_dict[f"{prefix}{name}.bias"] = part
            del state_dict[f"{prefix}in_proj_bias"]
        for name in names:
            key = f"{prefix}{name}_weight"
            if key in state_dict and f"{prefix}{name}.weight" not in state_dict:
                state_dict[f"{prefix}{name}.weight"] = state_dict.pop(key)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer without the eval-mode fast path (a fused kernel that reads linear1.weight
    and the attention's weights): torch's other path, which calls every layer as a module."""

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        src_mask, src_key_padding_mask = canonical_masks(src, src_mask, src_key_padding_mask)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder whose layers run torch's non-fused path. Where torch's forward would run a call on
    a nested tensor (eval, no grad, a padding mask), this one runs it padded, the padded keys masked, and
    then gives the padded positions the zeros torch's nested path gives them."""

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        mask, src_key_padding_mask = canonical_masks(src, mask, src_key_padding_mask)
        nest = self._would_nest(src, mask, src_key_padding_mask)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.layers[0].self_attn.batch_first))
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if nest and src_key_padding_mask is not None:
            output = torch._nested_tensor_from_mask(output, src_key_padding_mask.logical_not(),
                                                    mask_check=False).to_padded_tensor(0.0, src.size())
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _would_nest(self, src: Tensor, mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor]) -> bool:
        """Whether nn.TransformerEncoder.forward would run this call on a nested tensor (eval, no grad, a
        padding mask, …), which gives zeros at the padded positions: torch's conditions, in its order."""
        if not torch.backends.mha.get_fastpath_enabled() or not hasattr(self, "use_nested_tensor"):
            return False
        if not self.use_nested_tensor or not self._first_layer_eval() or src.dim() != 3:
            return False
        if src_key_padding_mask is None:
            return False
        do_mask_check = getattr(self, "mask_check", True)
        if do_mask_check and torch.compiler.is_compiling():
            return False
        if do_mask_check and not torch._nested_tensor_from_mask_left_aligned(src,
                                                                             src_key_padding_mask.logical_not()):
            return False
        if src.is_nested or mask is not None or torch.is_autocast_enabled():
            return False
        if torch.overrides.has_torch_function((src,)) or src.device.type not in ["cpu", "cuda", "xpu"]:
            return False
        return not (torch.is_grad_enabled() and (src.requires_grad or self._first_layer_requires_grad()))

    def _first_layer_eval(self) -> bool:
        for layer in self.layers:
            return not layer.training
        return False

    def _first_layer_requires_grad(self) -> bool:
        if torch.jit.is_scripting():
            # TorchScript cannot iterate parameters: taken as trainable, so a scripted model called with grad
            # enabled and frozen weights leaves the padded positions computed where torch would give zeros
            return True
        return self._parameters_require_grad()

    @torch.jit.unused
    def _parameters_require_grad(self) -> bool:
        return any(p.requires_grad for p in next(iter(self.layers.children())).parameters())


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """nn.TransformerDecoderLayer, opened up to tracing (torch.nn's own modules are leaves)."""


class TransformerDecoder(nn.TransformerDecoder):
    """nn.TransformerDecoder, opened up to tracing."""


class Transformer(nn.Transformer):
    """nn.Transformer, opened up to tracing."""


_CLASSES = {nn.TransformerEncoderLayer: TransformerEncoderLayer, nn.TransformerEncoder: TransformerEncoder,
            nn.TransformerDecoderLayer: TransformerDecoderLayer, nn.TransformerDecoder: TransformerDecoder,
            nn.Transformer: Transformer}


def _torchvision_swin(m: nn.Module) -> bool:
    """torchvision's Swin attention, ShiftedWindowAttention or ShiftedWindowAttentionV2, or the video Swin's
    ShiftedWindowAttention3d (exactly those)."""
    cls = type(m)
    return ((cls.__module__ == "torchvision.models.swin_transformer"
             and cls.__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"))
            or (cls.__module__ == "torchvision.models.video.swin_transformer"
                and cls.__name__ == "ShiftedWindowAttention3d"))


def use_stand_ins_(model: nn.Module, only: Optional[Iterable[str]] = None, leaf_modules: Iterable = ()) -> list:
    """Give `model` (compile's copy) the stand-ins, in place: every nn.MultiheadAttention without hooks or
    parametrizations (those at the paths `only` names, where given: load's, from the file) becomes a
    MultiheadAttention (MultiheadAttentionKV) above; torch's transformer layers and containers get the
    subclasses above (their state and hooks as they are), torchvision's Swin attention those of
    torchvision_modules; a transformers mixture-of-experts module with 3-D expert weights becomes a
    moe.Experts (Llama-4's: moe.BatchedExperts). Modules the caller keeps as leaves
    (`leaf_modules`: classes, or paths and what is under them) keep torch's classes. Returns the paths of
    the attention and experts modules replaced."""
    wanted = None if only is None else set(only)
    leaf_classes = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_paths = [x for x in leaf_modules if isinstance(x, str)]

    def left_alone(name: str, m: nn.Module) -> bool:
        return isinstance(m, leaf_classes) or any(name == p or name.startswith(p + ".") for p in leaf_paths)

    from torch.nn.utils import parametrize

    from .moe import BatchedExperts, Experts, batched_experts, experts_names
    from .trace import call_reason       # hooks a traced graph would not run
    replaced: dict[int, nn.Module] = {}
    paths = []
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if left_alone(name, m):
            continue
        if type(m) in _CLASSES:
            m.__class__ = _CLASSES[type(m)]
        elif _torchvision_swin(m) and call_reason(m) is None:
            from .torchvision_modules import CLASSES as swin_classes
            m.__class__ = swin_classes[type(m)]
        attention = type(m) is nn.MultiheadAttention
        batched = batched_experts(m)
        if (not name or not (attention or batched or experts_names(m) is not None) or call_reason(m) is not None
                or parametrize.is_parametrized(m) or (wanted is not None and name not in wanted)):
            continue
        if id(m) not in replaced:
            replaced[id(m)] = ((MultiheadAttention if m._qkv_same_embed_dim else MultiheadAttentionKV)(m)
                               if attention else BatchedExperts(m) if batched else Experts(m))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, replaced[id(m)])
        paths.append(name)
    return paths
