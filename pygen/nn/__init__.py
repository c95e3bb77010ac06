"""pygen.nn: drop-in torch.nn modules for diffusion-model networks, built on pygen's fused ops.

* ``Attention(dim, num_heads, head_dim=None, cross_dim=None, qkv_bias=True, out_bias=True, causal=False)``:
  self/cross attention; projections, ``pygen.attention`` in the (B, S, H, D) layout, output projection.
* ``DiTBlock(hidden_size, num_heads, mlp_ratio=4.0, cond_dim=None)``: the adaLN-Zero DiT block, with
  the fused ``pygen.adaln_modulate`` (LayerNorm + shift/scale) and ``pygen.gated_residual``.
* ``UNetAttentionBlock(channels, num_heads=None, head_dim=None, num_groups=32, eps=1e-5, ...)``: the U-Net
  spatial self-attention block (GroupNorm -> attention -> out projection -> residual), NCHW or
  channels-last, with diffusers' ``Attention`` parameter names.
* ``GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, silu=False)``: ``torch.nn.GroupNorm`` on
  ``pygen.group_norm``, optionally with SiLU fused.
* ``TimestepEmbedder(hidden_size, frequency_embedding_size=256, ...)``: DiT's timestep embedder on
  ``pygen.timestep_embedding``.

Each module's docstring gives its state-dict names and how they map to DiT's / diffusers' modules.
All are differentiable (the fused ops have backward kernels) and follow ``pygen.use_backend``.
"""
from pygen.nn.attention import Attention, UNetAttentionBlock
from pygen.nn.dit import DiTBlock, Mlp, TimestepEmbedder
from pygen.nn.norm import GroupNorm

__all__ = ["Attention", "DiTBlock", "GroupNorm", "Mlp", "TimestepEmbedder", "UNetAttentionBlock"]
