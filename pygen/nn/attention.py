"""pygen.nn.Attention and pygen.nn.UNetAttentionBlock: attention layers on pygen's fused ops.

Both compute in the (B, S, H, D) layout that the projections produce, so ``pygen.attention``
(layout="bshd") runs on views of the projection outputs: no head transposes before or after
attention (eager PyTorch code transposes to (B, H, S, D) and back, one copy each way).

State-dict names (so weights map over directly):

``Attention`` (self-attention) uses timm's / DiT's names:
    qkv.weight (3*inner, dim), qkv.bias, proj.weight (dim, inner), proj.bias
  = DiT's ``blocks.i.attn.*`` as they are. From diffusers' ``Attention`` (to_q/to_k/to_v/to_out.0):
    qkv.weight = cat([to_q.weight, to_k.weight, to_v.weight]), qkv.bias likewise,
    proj = to_out.0  (``Attention.from_diffusers(attn)`` does this).
``Attention`` with ``cross_dim`` (cross-attention):
    q.weight (inner, dim), q.bias, kv.weight (2*inner, cross_dim) = cat([to_k.weight, to_v.weight]),
    kv.bias, proj.weight, proj.bias.
``UNetAttentionBlock`` uses diffusers' ``Attention`` names (the mid-block / AttnDownBlock2D
attention built with ``norm_num_groups`` and ``residual_connection=True``), so a diffusers
state dict loads as it is:
    group_norm.weight, group_norm.bias, to_q.weight/bias, to_k.weight/bias, to_v.weight/bias,
    to_out.0.weight/bias.
"""
import torch
from torch import nn

from pygen.nn.functional import attention_bshd, spatial_to_tokens, tokens_to_spatial
from pygen.nn.norm import GroupNorm

__all__ = ["Attention", "UNetAttentionBlock"]


def _head_dim(dim, num_heads, head_dim, name="dim"):
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"{name} ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is not given")
        return dim // num_heads
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return head_dim


class Attention(nn.Module):
    """Multi-head self- or cross-attention: projections, ``pygen.attention`` in (B, S, H, D), output
    projection.

    Args:
        dim: channels of the input tokens ``x`` (B, N, dim) and of the output.
        num_heads: attention heads.
        head_dim: channels per head (default ``dim // num_heads``); inner width = num_heads * head_dim.
        cross_dim: channels of the context tokens for cross-attention (None: self-attention).
        qkv_bias: bias in the q/k/v projections. out_bias: bias in the output projection.
        causal: causal mask, top-left aligned as ``pygen.attention`` and SDPA's ``is_causal``
            (query i attends to keys j <= i).

    ``forward(x, context=None)``: ``context`` (B, M, cross_dim) is required for cross-attention and
    not accepted for self-attention. The scale is 1/sqrt(head_dim).
    """

    def __init__(self, dim, num_heads, head_dim=None, cross_dim=None, qkv_bias=True, out_bias=True, causal=False):
        super().__init__()
        self.dim = int(dim)
        self.num_heads = num_heads
        self.head_dim = _head_dim(self.dim, num_heads, head_dim)
        self.inner_dim = num_heads * self.head_dim
        self.cross_dim = cross_dim
        self.causal = bool(causal)
        if cross_dim is None:
            self.qkv = nn.Linear(self.dim, 3 * self.inner_dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(self.dim, self.inner_dim, bias=qkv_bias)
            self.kv = nn.Linear(int(cross_dim), 2 * self.inner_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.inner_dim, self.dim, bias=out_bias)

    def extra_repr(self):
        cross = "" if self.cross_dim is None else f", cross_dim={self.cross_dim}"
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}{cross}, causal={self.causal}"

    def forward(self, x, context=None):
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        if self.cross_dim is None:
            if context is not None:
                raise ValueError("context is only accepted by cross-attention (construct with cross_dim=...)")
            # (B, N, 3, H, D): q, k, v are strided (B, N, H, D) views of the one projection
            q, k, v = self.qkv(x).view(b, n, 3, h, d).unbind(2)
        else:
            if context is None:
                raise ValueError("context (B, M, cross_dim) is required for cross-attention")
            q = self.q(x).view(b, n, h, d)
            k, v = self.kv(context).view(b, context.shape[1], 2, h, d).unbind(2)
        out = attention_bshd(q, k, v, causal=self.causal)
        return self.proj(out.reshape(b, n, self.inner_dim))

    @classmethod
    def from_diffusers(cls, attn, causal=False):
        """A pygen ``Attention`` with the weights of a diffusers ``Attention`` (to_q/to_k/to_v/to_out.0;
        no group/spatial/q-k norms, no residual, rescale 1: those belong to other modules)."""
        heads = attn.heads
        inner = attn.to_q.out_features
        cross_dim = attn.cross_attention_dim if attn.is_cross_attention else None
        qkv_bias = attn.to_q.bias is not None
        out_linear = attn.to_out[0]
        mod = cls(attn.query_dim, heads, inner // heads, cross_dim=cross_dim, qkv_bias=qkv_bias,
                  out_bias=out_linear.bias is not None, causal=causal)
        mod = mod.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        with torch.no_grad():
            if cross_dim is None:
                mod.qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
                if qkv_bias:
                    mod.qkv.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
            else:
                mod.q.weight.copy_(attn.to_q.weight)
                mod.kv.weight.copy_(torch.cat([attn.to_k.weight, attn.to_v.weight]))
                if qkv_bias:
                    mod.q.bias.copy_(attn.to_q.bias)
                    mod.kv.bias.copy_(torch.cat([attn.to_k.bias, attn.to_v.bias]))
            mod.proj.weight.copy_(out_linear.weight)
            if out_linear.bias is not None:
                mod.proj.bias.copy_(out_linear.bias)
        return mod


class UNetAttentionBlock(nn.Module):
    """The U-Net spatial self-attention block: GroupNorm -> q/k/v -> attention -> out proj -> + x.

    As diffusers' ``Attention(channels, heads=..., dim_head=..., norm_num_groups=num_groups,
    residual_connection=True, bias=True, eps=eps)`` with its default processor (the attention in
    ``UNetMidBlock2D`` / ``AttnDownBlock2D`` / the VAE), same parameter names.

    Args:
        channels: C of the input (B, C, H, W).
        num_heads / head_dim: give one (the other follows from ``channels``); both: inner width
            num_heads * head_dim. Neither: one head of ``channels``.
        num_groups, eps: the GroupNorm (diffusers' UNet2DModel uses eps 1e-5 here, the VAE 1e-6).
        bias: bias in the q/k/v projections (the output projection always has one, as diffusers).
        rescale_output_factor: the sum (attention + x) is divided by it (diffusers' option).

    ``forward(x)``: x (B, C, H, W), contiguous or channels-last; the output has x's memory format.
    Scale 1/sqrt(head_dim).
    """

    def __init__(self, channels, num_heads=None, head_dim=None, num_groups=32, eps=1e-5, bias=True,
                 rescale_output_factor=1.0):
        super().__init__()
        self.channels = int(channels)
        if num_heads is None and head_dim is None:
            num_heads = 1
        if num_heads is None:
            if not isinstance(head_dim, int) or head_dim < 1 or self.channels % head_dim:
                raise ValueError(f"channels ({channels}) must be divisible by head_dim ({head_dim!r})")
            num_heads = self.channels // head_dim
        self.num_heads = num_heads
        self.head_dim = _head_dim(self.channels, num_heads, head_dim, name="channels")
        self.inner_dim = self.num_heads * self.head_dim
        self.rescale_output_factor = float(rescale_output_factor)
        self.group_norm = GroupNorm(num_groups, self.channels, eps=eps)
        self.to_q = nn.Linear(self.channels, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(self.channels, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(self.channels, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.channels)])

    def extra_repr(self):
        return f"channels={self.channels}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W), got shape {tuple(x.shape)}")
        b, c, height, width = x.shape
        tokens = spatial_to_tokens(self.group_norm(x))  # (B, HW, C): a view (contiguous if channels-last)
        n = tokens.shape[1]
        q = self.to_q(tokens).view(b, n, self.num_heads, self.head_dim)
        k = self.to_k(tokens).view(b, n, self.num_heads, self.head_dim)
        v = self.to_v(tokens).view(b, n, self.num_heads, self.head_dim)
        out = attention_bshd(q, k, v).reshape(b, n, self.inner_dim)
        out = tokens_to_spatial(self.to_out[0](out), height, width)  # channels-last view, no copy
        out = x + out  # the residual add writes in x's memory format
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    @classmethod
    def from_diffusers(cls, attn):
        """A ``UNetAttentionBlock`` with the weights of a diffusers ``Attention`` that has a group norm
        and a residual connection (e.g. ``UNet2DModel(...).mid_block.attentions[0]``)."""
        if attn.group_norm is None or not attn.residual_connection or attn.is_cross_attention:
            raise ValueError("attn must be a diffusers self-Attention with norm_num_groups and "
                             "residual_connection=True")
        inner = attn.to_q.out_features
        mod = cls(attn.query_dim, num_heads=attn.heads, head_dim=inner // attn.heads,
                  num_groups=attn.group_norm.num_groups, eps=attn.group_norm.eps, bias=attn.to_q.bias is not None,
                  rescale_output_factor=attn.rescale_output_factor)
        mod = mod.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        own = mod.state_dict()
        mod.load_state_dict({k: v for k, v in attn.state_dict().items() if k in own})
        return mod
