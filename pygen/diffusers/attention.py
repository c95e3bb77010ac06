"""pygen.diffusers.AttnProcessor: diffusers' ``AttnProcessor2_0`` on pygen's fused ops.

``model.set_attn_processor(pygen.diffusers.AttnProcessor())`` (or ``pygen.diffusers.patch(pipe)``) on
any diffusers model whose ``Attention`` layers use ``AttnProcessor2_0`` (UNet2DConditionModel,
UNet2DModel, DiTTransformer2DModel, PixArtTransformer2DModel, the VAE, ...). Same call signature and
the same result as ``AttnProcessor2_0`` of diffusers 0.42.1, step by step:

    spatial_norm(x, temb) -> 4-D (B, C, H, W) to tokens (B, HW, C) -> group_norm -> to_q ->
    norm_cross(context) -> to_k, to_v -> norm_q / norm_k -> attention (scale 1/sqrt(head_dim), no
    dropout, not causal) -> to_out[0] (linear) -> to_out[1] (dropout) -> back to 4-D ->
    + residual (residual_connection) -> / rescale_output_factor

What differs is how, not what:

* attention is ``pygen.attention`` in the (B, S, H, D) layout: q/k/v are views of the projection
  outputs and the result is already (B, S, H*D) for ``to_out``; no head transposes (stock transposes
  to (B, H, S, D) for SDPA and copies back).
* ``attn.group_norm`` (a ``torch.nn.GroupNorm``) runs as ``pygen.group_norm`` on the 4-D input (NCHW or
  channels-last), or on the channels-last view of 3-D tokens; no transposes.
* 4-D outputs: the out projection's (B, HW, C) result is viewed as (B, C, H, W) (channels-last strides,
  as stock's ``transpose(-1, -2).reshape``, which is a view too) and ``+ residual`` writes the result in
  that layout, as stock; the division by ``rescale_output_factor`` is skipped when it is 1.0 (exact).
  So outputs have stock's strides, and the layers after attention (convolutions) see the same layout.
* ``norm_q`` / ``norm_k`` are applied to (B, S, H, D) instead of (B, H, S, D); both act on the last dim
  (LayerNorm / RMSNorm / L2 over head_dim), so the result is the same.

**Attention masks:** ``pygen.attention`` takes no mask. When ``attention_mask`` is given, that call
prepares the mask exactly as ``AttnProcessor2_0`` (``attn.prepare_attention_mask``, viewed as
(B, heads, S_q or 1, S_k)) and runs ``torch.nn.functional.scaled_dot_product_attention`` on
(B, H, S, D) transposed views instead; everything around it is unchanged.

Like ``AttnProcessor2_0`` it ignores ``attn.scale`` / ``scale_qk`` (SDPA's default scale), ``attn.is_causal``
and the added-KV projections (other diffusers processors handle those; ``patch`` leaves them alone).
After diffusers' ``fuse_qkv_projections()`` it uses the fused ``to_qkv`` / ``to_kv`` layers as
``FusedAttnProcessor2_0`` does (one projection GEMM instead of three, or two).
"""
import torch.nn.functional as F
from torch import nn

from pygen.nn.functional import attention_bshd, group_norm_tokens, spatial_to_tokens, tokens_to_spatial

__all__ = ["AttnProcessor"]

_SCALE_DEPRECATION = (
    "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error in "
    "the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via "
    "`cross_attention_kwargs`."
)


def _apply_group_norm(gn, x):
    """attn.group_norm on 4-D (B, C, H, W) or on 3-D tokens (B, S, C) (channels in the last dim)."""
    if type(gn) is nn.GroupNorm:
        import pygen

        if x.dim() == 4:
            return pygen.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        return group_norm_tokens(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    if x.dim() == 4:  # a custom norm module: the stock call, on (B, C, HW)
        b, c, h, w = x.shape
        return gn(x.reshape(b, c, h * w)).reshape(b, c, h, w)
    return gn(x.transpose(1, 2)).transpose(1, 2)


def _heads(proj, batch_size, heads, parts):
    """The ``parts`` (B, S, H, D) views of a projection output (B, S, parts·H·D) (q, k, v of a fused one)."""
    return proj.view(batch_size, -1, parts, heads, proj.shape[-1] // (parts * heads)).unbind(2)


class AttnProcessor:
    """diffusers ``AttnProcessor2_0`` semantics on ``pygen.attention`` (bshd) and ``pygen.group_norm``.

    Stateless; one instance can serve every ``Attention`` layer of a model. See the module
    docstring for what it computes and the attention-mask fallback to SDPA.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            from diffusers.utils import deprecate

            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if attn.group_norm is not None:  # on (B, C, H, W): GroupNorm does not care about H, W vs HW
                hidden_states = _apply_group_norm(attn.group_norm, hidden_states)
            hidden_states = spatial_to_tokens(hidden_states)  # (B, HW, C) view
        elif attn.group_norm is not None:
            hidden_states = _apply_group_norm(attn.group_norm, hidden_states)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        # (B, S, H, D) views of the projections: the layout pygen.attention takes as it is. After
        # diffusers' ``fuse_qkv_projections()`` (``attn.fused_projections``), one GEMM into to_qkv
        # (self-attention) or to_kv (cross-attention), as FusedAttnProcessor2_0: fewer launches
        fused = getattr(attn, "fused_projections", False)
        if fused and encoder_hidden_states is None and getattr(attn, "to_qkv", None) is not None:
            query, key, value = _heads(attn.to_qkv(hidden_states), batch_size, attn.heads, 3)
        else:
            (query,) = _heads(attn.to_q(hidden_states), batch_size, attn.heads, 1)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if fused and encoder_hidden_states is not hidden_states and getattr(attn, "to_kv", None) is not None:
                key, value = _heads(attn.to_kv(encoder_hidden_states), batch_size, attn.heads, 2)
            else:
                (key,) = _heads(attn.to_k(encoder_hidden_states), batch_size, attn.heads, 1)
                (value,) = _heads(attn.to_v(encoder_hidden_states), batch_size, attn.heads, 1)
        head_dim = key.shape[-1]
        if attn.norm_q is not None:  # norms over the last dim (head_dim): layout-independent
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = attention_bshd(query, key, value)
        else:  # pygen.attention has no mask: SDPA for this call, the mask prepared as AttnProcessor2_0
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask,
                dropout_p=0.0, is_causal=False).transpose(1, 2)

        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = tokens_to_spatial(hidden_states, height, width)  # a view, as stock's reshape
        if attn.residual_connection:  # this order: the sum takes the layout of the first operand, as stock
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

