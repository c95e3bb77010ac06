"""pygen.nn.DiTBlock (adaLN-Zero transformer block, Peebles & Xie, "Scalable Diffusion Models with
Transformers") and pygen.nn.TimestepEmbedder, on pygen's fused ops.

DiTBlock.forward(x (B, N, C), c (B, cond_dim)):

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaLN_modulation(c).chunk(6, dim=1)
    (computed as one batched matmul into (6, B, C), so each piece is contiguous; same weights)
    x = gated_residual(x, gate_msa, attn(adaln_modulate(x, shift_msa, scale_msa)))
    x = gated_residual(x, gate_mlp, mlp(adaln_modulate(x, shift_mlp, scale_mlp)))

with ``adaln_modulate`` = LayerNorm (no affine, eps 1e-6) then * (1 + scale) + shift (one fused op),
``gated_residual(x, g, y) = x + g[:, None, :] * y`` (one fused op), the attention in
(B, N, H, D) (``pygen.nn.Attention``) and the MLP Linear -> GELU(tanh) -> Linear.

State dict: the names of the DiT reference code (facebookresearch/DiT ``models.py``), so a DiT
checkpoint's ``blocks.i.*`` load as they are:
    attn.qkv.weight/bias, attn.proj.weight/bias, mlp.fc1.weight/bias, mlp.fc2.weight/bias,
    adaLN_modulation.1.weight (6C, cond_dim), adaLN_modulation.1.bias
(norm1 / norm2 have no parameters). ``TimestepEmbedder``: mlp.0.weight/bias, mlp.2.weight/bias as
DiT's ``t_embedder``; diffusers' ``TimestepEmbedding`` names them linear_1 / linear_2.
"""
import torch
import torch.nn.functional as F
from torch import nn

import pygen
from pygen import _backend
from pygen.nn.attention import Attention
from pygen.ops import norm as _norm_ops

__all__ = ["DiTBlock", "Mlp", "TimestepEmbedder"]


_GEMM_GELU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> Linear; timm's names fc1 / fc2.

    On CUDA without autograd (sampling), fc1 and the GELU are one cuBLASLt GEMM with a GELU-bias
    epilogue (``torch._addmm_activation(..., use_gelu=True)``, the tanh approximation there): one
    launch and one write of the 4C-wide hidden activations fewer. It has no derivative and on the
    CPU applies the exact (erf) GELU, so training and the CPU take fc1 then ``F.gelu(tanh)``.
    """

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        fc1 = self.fc1
        if (x.is_cuda and x.dtype in _GEMM_GELU_DTYPES and fc1.bias is not None and x.dtype == fc1.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad
                                                      or fc1.bias.requires_grad))):
            h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block.

    Args:
        hidden_size: C (tokens are (B, N, C)).
        num_heads: attention heads (C must be divisible by it).
        mlp_ratio: MLP hidden width = int(C * mlp_ratio).
        cond_dim: width of the conditioning vector c (default C, as DiT).

    Initialisation as DiT: xavier-uniform linear weights with zero biases in the attention and
    MLP, and the adaLN modulation linear zeroed, so a fresh block is the identity (adaLN-Zero).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cond_dim=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.cond_dim = self.hidden_size if cond_dim is None else int(cond_dim)
        self.eps = 1e-6
        self.attn = Attention(self.hidden_size, num_heads, qkv_bias=True)
        self.mlp = Mlp(self.hidden_size, int(self.hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(self.cond_dim, 6 * self.hidden_size))
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, cond_dim={self.cond_dim}, eps={self.eps}"

    def modulation(self, c):
        """adaLN_modulation(c) = Linear(SiLU(c)) as (6, B, C): shift_msa, scale_msa, gate_msa, shift_mlp,
        scale_mlp, gate_mlp, each a contiguous (B, C) (one batched matmul; ``.chunk(6, dim=1)`` of the
        (B, 6C) output would give strided slices, which the fused ops copy first)."""
        lin = self.adaLN_modulation[1]
        hidden = self.hidden_size
        weight = lin.weight.view(6, hidden, self.cond_dim).transpose(1, 2)  # (6, cond, C)
        h = F.silu(c).unsqueeze(0).expand(6, -1, -1)  # (6, B, cond)
        if lin.bias is None:
            return torch.bmm(h, weight)
        return torch.baddbmm(lin.bias.view(6, 1, hidden), h, weight)

    def forward(self, x, c):
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be (B, N, {self.hidden_size}), got shape {tuple(x.shape)}")
        if c.dim() != 2 or c.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"c must be (B, cond_dim) = ({x.shape[0]}, {self.cond_dim}), got shape {tuple(c.shape)}")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).unbind(0)
        if (x.dtype == shift_msa.dtype and x.device == shift_msa.device
                and _backend.resolve(x.device) in ("cpu", "cuda")):
            # the compiled ops (C++ autograd) called directly: the arguments are the block's own, already of
            # the checked shapes, dtype and device, so the public functions' Python checks (about a third of
            # the block's host time at small sizes) would only repeat what holds here
            adaln, gated = _norm_ops.compiled("adaln_modulate"), _norm_ops.compiled("gated_residual")
            x = x.contiguous()
            h = adaln(x, None, None, shift_msa, scale_msa, self.eps)[0]
            x = gated(x, gate_msa, self.attn(h).contiguous())
            h = adaln(x, None, None, shift_mlp, scale_mlp, self.eps)[0]
            return gated(x, gate_mlp, self.mlp(h).contiguous())
        h = pygen.adaln_modulate(x, shift=shift_msa, scale=scale_msa, eps=self.eps)
        x = pygen.gated_residual(x, gate_msa, self.attn(h))
        h = pygen.adaln_modulate(x, shift=shift_mlp, scale=scale_mlp, eps=self.eps)
        return pygen.gated_residual(x, gate_mlp, self.mlp(h))


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (``pygen.timestep_embedding``) -> Linear -> SiLU -> Linear.

    Defaults as DiT's ``TimestepEmbedder``: 256 frequencies, cos first (flip_sin_to_cos=True),
    frequencies exp(-ln(max_period) * i / half) (downscale_freq_shift=0). diffusers'
    ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`` + ``TimestepEmbedding`` is the same
    map (linear_1 -> mlp.0, linear_2 -> mlp.2).
    """

    def __init__(self, hidden_size, frequency_embedding_size=256, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                 max_period=10000):
        super().__init__()
        self.frequency_embedding_size = int(frequency_embedding_size)
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.downscale_freq_shift = float(downscale_freq_shift)
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(self.frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        """t: (B,) timesteps (float or int) -> (B, hidden_size), in the MLP's dtype."""
        if not t.is_floating_point():
            t = t.float()
        freq = pygen.timestep_embedding(t, self.frequency_embedding_size, flip_sin_to_cos=self.flip_sin_to_cos,
                                        downscale_freq_shift=self.downscale_freq_shift, max_period=self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))
