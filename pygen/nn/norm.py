"""pygen.nn.GroupNorm: ``torch.nn.GroupNorm`` (same arguments and parameter names) on
``pygen.group_norm``, with the U-Net's SiLU optionally fused (``silu=True``).

Input (B, C, *) contiguous, or (B, C, H, W) channels-last; the output has the input's layout.
A ``torch.nn.GroupNorm`` state dict loads as it is (weight, bias).
"""
import torch
from torch import nn

import pygen

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    """GroupNorm over ``num_groups`` groups of ``num_channels`` channels; ``silu=True`` applies
    SiLU to the result in the same kernel (diffusers' ResnetBlock2D norm + nonlinearity)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, silu=False, device=None, dtype=None):
        super().__init__()
        if not isinstance(num_groups, int) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups!r})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = float(eps)
        self.affine = affine
        self.silu = bool(silu)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, silu={self.silu}"

    def forward(self, x):
        return pygen.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)
