"""Stand-ins for torchvision's Swin attention (swin_t/s/b, swin_v2_t/s/b, and the video swin3d_t/s/b) whose
projections are called as layers.

torchvision's ShiftedWindowAttention(V2) hands `self.qkv.weight` and `self.proj.weight` to
`shifted_window_attention`, which applies them with F.linear between its windowing steps, so no factor chain
could take their place: the two projections (about a third of a Swin's parameters) were skipped. Compile gives
its copy of the model these subclasses instead (the class of each module is swapped; its state, hooks and
submodules stay as they are): the same computation, split at the projections, which are called as modules.
The steps between them are each one graph node (their Python branches on the input's size).

Imported only where a model holds torchvision's Swin attention (torch_modules.use_stand_ins_).
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import swin_transformer as tv_swin
from torchvision.models.video import swin_transformer as tv_swin3d


@fx.wrap
def swin_windows(x: Tensor, window_size: List[int], shift_size: List[int]) -> Tuple[Tensor, List[int]]:
    """shifted_window_attention up to its qkv projection: pad to whole windows, shift, split into windows.
    Returns the windows [B * windows, Wh * Ww, C] and [B, H, W, padded H, padded W, shift h, shift w]."""
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    pad_H, pad_W = x.shape[1], x.shape[2]
    shift = [shift_size[0], shift_size[1]]
    if window_size[0] >= pad_H:          # a window as large as the map: no shift
        shift[0] = 0
    if window_size[1] >= pad_W:
        shift[1] = 0
    if shift[0] + shift[1] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    return x, [B, H, W, pad_H, pad_W, shift[0], shift[1]]


@fx.wrap
def swin_attend(qkv: Tensor, windows: Tensor, relative_position_bias: Tensor, geometry: List[int],
                window_size: List[int], num_heads: int, logit_scale: Optional[Tensor], attention_dropout: float,
                training: bool) -> Tensor:
    """shifted_window_attention from the projected windows (`qkv`, [B * windows, N, 3C]) to the attention's
    output before its output projection ([B * windows, N, C]); `windows` (the unprojected ones) gives the
    shifted windows' mask its dtype, as there."""
    pad_H, pad_W, shift_h, shift_w = geometry[3], geometry[4], geometry[5], geometry[6]
    n_win, n_tok, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    qkv = qkv.reshape(n_win, n_tok, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:          # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if shift_h + shift_w > 0:
        num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
        mask = windows.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_h), (-shift_h, None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_w), (-shift_w, None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(n_win // num_windows, num_windows, num_heads, n_tok, n_tok)
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n_tok, n_tok)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(n_win, n_tok, C)


@fx.wrap
def swin_merge(x: Tensor, geometry: List[int], window_size: List[int]) -> Tensor:
    """shifted_window_attention after its output projection: windows back to the map, shift back, crop."""
    B, H, W, pad_H, pad_W, shift_h, shift_w = geometry
    C = x.shape[-1]
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if shift_h + shift_w > 0:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


@fx.wrap
def without_key_bias(qkv: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Swin V2 adds no bias to the keys (torchvision zeroes that third of qkv's bias on every call): the
    projection's output less that third of its bias (no gradient reaches it, as there)."""
    if bias is None:
        return qkv
    n = bias.shape[0] // 3
    kb = torch.cat([torch.zeros_like(bias[:n]), bias[n:2 * n], torch.zeros_like(bias[2 * n:])])
    return qkv - kb.to(qkv.dtype)


class _CallsProjections:
    """The forward of both stand-ins: shifted_window_attention with `qkv` and `proj` called as layers (V2:
    cosine attention with its logit scale, and no bias on the keys)."""

    def forward(self, x: Tensor) -> Tensor:
        relative_position_bias = self.get_relative_position_bias()
        windows, geometry = swin_windows(x, self.window_size, self.shift_size)
        qkv = self.qkv(windows)
        logit_scale = getattr(self, "logit_scale", None)     # V2's
        if logit_scale is not None:
            qkv = without_key_bias(qkv, self.qkv.bias)
        out = swin_attend(qkv, windows, relative_position_bias, geometry, self.window_size, self.num_heads,
                          logit_scale, self.attention_dropout, self.training)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        return swin_merge(out, geometry, self.window_size)


class ShiftedWindowAttention(_CallsProjections, tv_swin.ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttention with `qkv` and `proj` called as layers."""


class ShiftedWindowAttentionV2(_CallsProjections, tv_swin.ShiftedWindowAttentionV2):
    """torchvision's ShiftedWindowAttentionV2 with `qkv` and `proj` called as layers."""


@fx.wrap
def swin3d_windows(x: Tensor, window_size: List[int], shift_size: List[int]) -> Tuple[Tensor, List[int]]:
    """shifted_window_attention_3d up to its qkv projection (window and shift sizes already fitted to the
    input, as the module's forward does): pad, shift, split into windows. Returns the windows
    [B * windows, Wd * Wh * Ww, C] and [B, T, H, W, padded T, padded H, padded W]."""
    from torchvision.models.video.swin_transformer import _compute_pad_size_3d
    b, t, h, w, c = x.shape
    pad = _compute_pad_size_3d((t, h, w), (window_size[0], window_size[1], window_size[2]))
    x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    tp, hp, wp = x.shape[1], x.shape[2], x.shape[3]
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
    n = (tp // window_size[0]) * (hp // window_size[1]) * (wp // window_size[2])
    x = x.view(b, tp // window_size[0], window_size[0], hp // window_size[1], window_size[1],
               wp // window_size[2], window_size[2], c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * n, window_size[0] * window_size[1] * window_size[2], c)
    return x, [b, t, h, w, tp, hp, wp]


@fx.wrap
def swin3d_attend(qkv: Tensor, windows: Tensor, relative_position_bias: Tensor, geometry: List[int],
                  window_size: List[int], shift_size: List[int], num_heads: int, attention_dropout: float,
                  training: bool) -> Tensor:
    """shifted_window_attention_3d from the projected windows to the attention's output before `proj`."""
    from torchvision.models.video.swin_transformer import _compute_attention_mask_3d
    tp, hp, wp = geometry[4], geometry[5], geometry[6]
    n_win, n_tok, c = windows.shape
    qkv = qkv.reshape(n_win, n_tok, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1)) + relative_position_bias
    if sum(shift_size) > 0:
        num_windows = (tp // window_size[0]) * (hp // window_size[1]) * (wp // window_size[2])
        mask = _compute_attention_mask_3d(windows, (tp, hp, wp), (window_size[0], window_size[1], window_size[2]),
                                          (shift_size[0], shift_size[1], shift_size[2]))
        attn = attn.view(n_win // num_windows, num_windows, num_heads, n_tok, n_tok)
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, n_tok, n_tok)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(n_win, n_tok, c)


@fx.wrap
def swin3d_merge(x: Tensor, geometry: List[int], window_size: List[int], shift_size: List[int]) -> Tensor:
    """shifted_window_attention_3d after `proj`: windows back to the clip, shift back, crop."""
    b, t, h, w, tp, hp, wp = geometry
    c = x.shape[-1]
    x = x.view(b, tp // window_size[0], hp // window_size[1], wp // window_size[2], window_size[0], window_size[1],
               window_size[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


@fx.wrap
def swin3d_sizes(x: Tensor, window_size: List[int], shift_size: List[int]) -> Tuple[List[int], List[int]]:
    """The module's window and shift sizes fitted to the input (torchvision's _get_window_and_shift_size)."""
    from torchvision.models.video.swin_transformer import _get_window_and_shift_size
    return _get_window_and_shift_size(list(shift_size), [x.shape[1], x.shape[2], x.shape[3]], list(window_size))


class ShiftedWindowAttention3d(tv_swin3d.ShiftedWindowAttention3d):
    """torchvision's ShiftedWindowAttention3d (video Swin: swin3d_t/s/b) with `qkv` and `proj` called as layers."""

    def forward(self, x: Tensor) -> Tensor:
        sizes = swin3d_sizes(x, self.window_size, self.shift_size)     # one node: index it, not unpack
        window_size, shift_size = sizes[0], sizes[1]
        relative_position_bias = self.get_relative_position_bias(window_size)
        windows, geometry = swin3d_windows(x, window_size, shift_size)
        out = swin3d_attend(self.qkv(windows), windows, relative_position_bias, geometry, window_size, shift_size,
                            self.num_heads, self.attention_dropout, self.training)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        return swin3d_merge(out, geometry, window_size, shift_size)


CLASSES = {tv_swin.ShiftedWindowAttention: ShiftedWindowAttention,
           tv_swin.ShiftedWindowAttentionV2: ShiftedWindowAttentionV2,
           tv_swin3d.ShiftedWindowAttention3d: ShiftedWindowAttention3d}
