"""Functional pieces shared by the pygen.nn modules and pygen.diffusers.AttnProcessor.

No math of their own (DESIGN.md, "Integrations"): each function reshapes views so that the
fused pygen ops can be called without copies, then calls them.

* ``attention_bshd(q, k, v, scale=None, causal=False)``: ``pygen.attention`` on (B, S, H, D)
  views, the layout that linear projections produce, so no transposes are needed.
* ``group_norm_tokens(x, num_groups, weight, bias, eps, silu=False)``: GroupNorm over the channel
  (last) dim of a token tensor (B, S, C), i.e. ``F.group_norm(x.transpose(1, 2))`` transposed back,
  computed with ``pygen.group_norm`` on the channels-last view (no copy).
* ``spatial_to_tokens(x)`` / ``tokens_to_spatial(t, like)``: (B, C, H, W) <-> (B, H*W, C) without
  copies where the memory format allows (channels-last: none at all).
"""
import torch

import pygen


def attention_bshd(q, k, v, scale=None, causal=False):
    """softmax(q k^T * scale) v over (B, S, H, D) tensors; returns (B, S_q, H, D)."""
    return pygen.attention(q, k, v, scale=scale, causal=causal, layout="bshd")


def group_norm_tokens(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """GroupNorm of a (B, S, C) token tensor over groups of its C channels (and all S tokens).

    Equals ``F.group_norm(x.transpose(1, 2), num_groups, weight, bias, eps).transpose(1, 2)``
    (optionally followed by SiLU). The (B, C, S) view of a contiguous (B, S, C) tensor is
    channels-last, which ``pygen.group_norm`` takes as it is (no copy); the result comes back as
    (B, S, C).
    """
    return pygen.group_norm(x.transpose(1, 2), num_groups, weight, bias, eps, silu=silu).transpose(1, 2)


def is_channels_last(x):
    """True for a 4-D tensor stored channels-last (and not also plainly contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def spatial_to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C) tokens. A view for channels-last (then contiguous) and for
    contiguous NCHW inputs (then a transposed view, which a linear layer reads as it is)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def tokens_to_spatial(t, height, width):
    """(B, H*W, C) tokens -> a (B, C, H, W) view (channels-last strides when ``t`` is contiguous)."""
    b, n, c = t.shape
    return t.transpose(1, 2).reshape(b, c, height, width)
