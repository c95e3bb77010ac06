"""Plain-PyTorch reference modules for pygen.nn, with the parameter names of the models they mirror.

Written from plain ops (nn.Linear, F.layer_norm, F.group_norm, F.scaled_dot_product_attention): what
pygen.nn's fused modules are tested against (tests/test_nn.py) and timed against
(benchmarks/bench_blocks.py). Loading a pygen.nn module's state dict into its twin here with
``strict=True`` checks that the names match.

* ``EagerAttention``: timm/DiT-style attention (fused qkv, or q + kv for cross-attention), proj.
* ``EagerMlp``: DiT's MLP (GELU, tanh approximation).
* ``EagerDiTBlock``: the DiT block with adaLN-Zero (facebookresearch/DiT models.py).
* ``EagerUNetAttention``: diffusers' ``Attention(norm_num_groups=..., residual_connection=True)``
  with ``AttnProcessor2_0``.
"""
import torch.nn.functional as F
from torch import nn

__all__ = ["EagerAttention", "EagerMlp", "EagerDiTBlock", "EagerUNetAttention"]


class EagerAttention(nn.Module):
    """timm/DiT-style attention: qkv (fused) or q + kv, proj; heads transposed to (B, H, S, D) for SDPA."""

    def __init__(self, dim, heads, head_dim, cross_dim=None, qkv_bias=True, out_bias=True, causal=False):
        super().__init__()
        self.h, self.d, self.causal, self.cross = heads, head_dim, causal, cross_dim is not None
        inner = heads * head_dim
        if cross_dim is None:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.kv = nn.Linear(cross_dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=out_bias)

    def forward(self, x, context=None):
        b, n, _ = x.shape
        if not self.cross:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x).reshape(b, n, self.h, self.d).transpose(1, 2)
            k, v = self.kv(context).reshape(b, context.shape[1], 2, self.h, self.d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(o.transpose(1, 2).reshape(b, n, self.h * self.d))


class EagerMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EagerDiTBlock(nn.Module):
    """The DiT reference block (facebookresearch/DiT models.py), written with plain ops."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, cond_dim=None):
        super().__init__()
        self.hidden = hidden
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = EagerAttention(hidden, heads, hidden // heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = EagerMlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or hidden, 6 * hidden))

    def forward(self, x, c):
        def modulate(h, shift, scale):
            return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class EagerUNetAttention(nn.Module):
    """diffusers' Attention(norm_num_groups=..., residual_connection=True) + AttnProcessor2_0, plain ops."""

    def __init__(self, channels, heads, head_dim, groups, eps, rescale=1.0):
        super().__init__()
        inner = heads * head_dim
        self.h, self.d, self.rescale = heads, head_dim, rescale
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])

    def forward(self, x):
        b, c, hh, ww = x.shape
        t = self.group_norm(x).reshape(b, c, hh * ww).transpose(1, 2)
        q, k, v = (lin(t).reshape(b, -1, self.h, self.d).transpose(1, 2) for lin in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, self.h * self.d)
        o = self.to_out[0](o).transpose(1, 2).reshape(b, c, hh, ww)
        return (o + x) / self.rescale
