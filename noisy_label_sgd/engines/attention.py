r"""``nn.MultiheadAttention`` as self-attention written out, for the fast engine's trace.

Run as self-attention (query is key is value) with its packed projection, the module is
:math:`\mathrm{out\_proj}(\mathrm{attention}(\mathrm{in\_proj}(x)))`: two affine maps around an
operation without parameters. :func:`self_attention_forward` computes exactly that, telling
``record`` of both maps, so that the backward reaches the projections' outputs and each has the
closed form of a Linear over positions. Padding masks (``key_padding_mask``), attention masks
(``attn_mask``, 2-D or per sample and head, boolean or additive; ``is_causal`` is only a hint
beside it, as in PyTorch) and returned attention weights are all written out as PyTorch does
them. Anything else (cross-attention, separate projections, ``bias_k``, ``add_zero_attn``,
dropout in training, unbatched inputs) goes to the module's own forward.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

# (label of one affine map, the names of its parameters, its input, its output) -> None
Recorder = Callable[[str, tuple[str, ...], torch.Tensor, torch.Tensor], None]


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as -inf/0, a floating one as it is (added to the
    scores), as nn.MultiheadAttention reads them."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def self_attention_forward(module: nn.MultiheadAttention, record: Recorder):
    """The module's forward (same arguments and outputs); self-attention written out."""
    m = module
    own_forward = type(m).forward.__get__(m)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (query is key is value and query.dim() == 3 and m._qkv_same_embed_dim and m.bias_k is None
                 and not m.add_zero_attn and (m.dropout == 0 or not m.training)
                 and (attn_mask is not None or not is_causal))  # (the module's own error otherwise)
        if not plain:
            return own_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if m.batch_first else query.transpose(0, 1)
        n, length, embed = x.shape
        heads = lambda t: t.reshape(n, length, m.num_heads, -1).transpose(1, 2)  # [n, heads, T, d]
        qkv = nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias)
        q, k, v = (heads(t) for t in qkv.chunk(3, -1))
        mask = additive_mask(attn_mask, x.dtype)
        if mask is not None:  # [T, T] or [n * heads, T, T]
            mask = mask.reshape(-1 if mask.dim() == 3 else 1, m.num_heads if mask.dim() == 3 else 1, length, length)
        padding = additive_mask(key_padding_mask, x.dtype)
        if padding is not None:  # [n, T]: keys not attended, per sample
            padding = padding.reshape(n, 1, 1, length)
            mask = padding if mask is None else mask + padding
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, -1)
            attended = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attended = attended.transpose(1, 2).reshape(n, length, embed)
        out = nn.functional.linear(attended, m.out_proj.weight, m.out_proj.bias)
        record("in_proj", ("in_proj_weight", "in_proj_bias"), x, qkv)
        record("out_proj", ("out_proj.weight", "out_proj.bias"), attended, out)
        return (out if m.batch_first else out.transpose(0, 1)), weights

    return forward
