"""pygen.nn modules (Attention, DiTBlock, UNetAttentionBlock, GroupNorm, TimestepEmbedder) vs eager
PyTorch implementations from plain ops (pygen.nn.reference: F.linear, F.layer_norm, F.group_norm,
F.scaled_dot_product_attention) with the same weights: forward, backward (input and parameter
grads), odd sizes, fp32 under the default backend, ``pygen.use_backend("torch")`` and (when built)
``pygen.use_backend("cpu")``, fp16/bf16
on the torch path at loose tolerances. State-dict names are checked by loading pygen's state dicts
strictly into the eager modules (which use the DiT / diffusers names). The fused ops' own tests
(tests/test_attention.py, tests/test_norm.py) cover the Triton and compiled kernels in depth.
"""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pygen
import pygen.nn as pnn
from pygen.nn.reference import EagerAttention, EagerDiTBlock, EagerUNetAttention

# default dispatch, the torch reference, and the compiled CPU kernels forced (when built)
BACKENDS = ["default", "torch"] + (["cpu"] if pygen.backends()["cpu"] == "available" else [])


def backend_ctx(name):
    return contextlib.nullcontext() if name == "default" else pygen.use_backend(name)


def randomize_(module, gen, std=0.2):
    """Fresh random values for every parameter (never zeros: adaLN-Zero starts at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype)


TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5)}


LOW_PRECISION_DEVICES = [
    pytest.param("cpu", id="cpu-torch"),  # the torch path (the CPU kernels are fp32/fp64 only)
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),  # the dispatcher's kernels
]


def low_precision_ctx(device):
    return pygen.use_backend("torch") if device == "cpu" else contextlib.nullcontext()


def check_low_precision(mod, ref, args, dtype, device, seed=0):
    """pygen ``mod`` in ``dtype`` vs ``ref`` (eager, same weights) computed in fp32 on the same rounded
    weights and inputs, forward output and every input / parameter gradient: pygen's max error may be
    at most twice eager PyTorch's own error in ``dtype``, with a floor of 1e-3 (output) / 3e-3 (grads)
    of the largest magnitude."""
    mod = mod.to(device, dtype)
    ref_low = ref.to(device, dtype)
    ref32 = copy.deepcopy(ref_low).float()
    args_low = [a.to(device, dtype).requires_grad_() for a in args]
    args32 = [a.detach().float().requires_grad_() for a in args_low]
    exact = ref32(*args32)
    gout = torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    names = [f"input{i}" for i in range(len(args))] + [n for n, _ in ref32.named_parameters()]

    def run(module, inputs, ctx):
        with ctx:
            out = module(*inputs)
            params = dict(module.named_parameters())
            g = torch.autograd.grad(out, inputs + [params[n] for n in names[len(args):]], gout.to(out.dtype))
        return [out] + list(g)

    results = {"pygen": run(mod, args_low, low_precision_ctx(device)),
               "eager": run(ref_low, args_low, contextlib.nullcontext()),
               "exact": run(ref32, args32, contextlib.nullcontext())}
    assert results["pygen"][0].dtype == dtype and results["pygen"][0].shape == exact.shape
    for i, name in enumerate(["output"] + names):
        want = results["exact"][i].float()
        err = (results["pygen"][i].float() - want).abs().max().item()
        eager_err = (results["eager"][i].float() - want).abs().max().item()
        floor = (1e-3 if i == 0 else 3e-3) * want.abs().max().item()
        # A gradient that is exactly zero in exact arithmetic (the key bias: softmax is shift-invariant)
        # is pure cancellation noise, larger than its own exact value: same order as eager's noise.
        factor = 4 if want.abs().max().item() <= eager_err else 2
        assert err <= max(factor * eager_err, floor), f"{name}: pygen error {err:.3g}, eager error {eager_err:.3g}"


def twin(pg_module, eager_module):
    """Load the pygen module's state dict into the eager one strictly (the names must map 1:1)."""
    eager_module.load_state_dict(pg_module.state_dict(), strict=True)
    return eager_module.to(next(pg_module.parameters()).dtype)


def grads(module, inputs, out, gout):
    params = [p for p in module.parameters()]
    g = torch.autograd.grad(out, list(inputs) + params, gout, allow_unused=True)
    return dict(zip([f"input{i}" for i in range(len(inputs))] + [n for n, _ in module.named_parameters()], g))


def assert_grads_close(g_pg, g_ref, rel=3e-5):
    """Each gradient within ``rel`` of its largest magnitude (fp32 sums in a different order: the fused
    backward kernels vs autograd through the eager ops)."""
    assert g_pg.keys() == g_ref.keys()
    for name in g_ref:
        a, b = g_pg[name], g_ref[name]
        if b is None:
            assert a is None or not a.abs().max() > 0, name
            continue
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=rel * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------
ATTN_CASES = [  # (dim, heads, head_dim, cross_dim, B, N, M, causal, qkv_bias, out_bias)
    (64, 2, None, None, 3, 7, None, False, True, True),
    (48, 3, 32, None, 2, 13, None, True, False, True),  # inner width 96 != dim
    (64, 2, 32, 40, 2, 5, 11, False, True, False),  # cross-attention, odd lengths
    (64, 1, 64, 24, 1, 1, 3, False, True, True),  # one query token
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTN_CASES,
                         ids=lambda c: f"d{c[0]}h{c[1]}x{c[2]}c{c[3]}n{c[5]}m{c[6]}{'causal' if c[7] else ''}")
def test_attention_matches_eager(backend, case):
    dim, heads, head_dim, cross_dim, b, n, m, causal, qkv_bias, out_bias = case
    gen = torch.Generator().manual_seed(0)
    mod = randomize_(pnn.Attention(dim, heads, head_dim, cross_dim, qkv_bias, out_bias, causal), gen)
    ref = twin(mod, EagerAttention(dim, heads, mod.head_dim, cross_dim, qkv_bias, out_bias, causal))
    x = randn(gen, b, n, dim).requires_grad_()
    inputs = [x]
    ctx = None
    if cross_dim is not None:
        ctx = randn(gen, b, m, cross_dim).requires_grad_()
        inputs.append(ctx)
    gout = randn(gen, b, n, dim)
    with backend_ctx(backend):
        out = mod(x, ctx) if ctx is not None else mod(x)
        g_pg = grads(mod, inputs, out, gout)
    expected = ref(x, ctx)
    g_ref = grads(ref, inputs, expected, gout)
    assert out.shape == (b, n, dim)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert_grads_close(g_pg, g_ref)


@pytest.mark.parametrize("device", LOW_PRECISION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_low_precision(dtype, device):
    gen = torch.Generator().manual_seed(1)
    mod = randomize_(pnn.Attention(64, 2, cross_dim=32), gen)
    ref = twin(mod, EagerAttention(64, 2, 32, cross_dim=32))
    check_low_precision(mod, ref, (randn(gen, 2, 9, 64), randn(gen, 2, 5, 32)), dtype, device)
    mod = randomize_(pnn.Attention(128, 2, causal=True), gen)
    ref = twin(mod, EagerAttention(128, 2, 64, causal=True))
    check_low_precision(mod, ref, (randn(gen, 3, 33, 128),), dtype, device)


def test_attention_from_diffusers():
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    gen = torch.Generator().manual_seed(2)
    for cross in (None, 24):
        attn = randomize_(attention_processor.Attention(64, cross_attention_dim=cross, heads=2, dim_head=32,
                                                        bias=True), gen)
        attn.set_processor(attention_processor.AttnProcessor2_0())
        mod = pnn.Attention.from_diffusers(attn)
        x = randn(gen, 2, 7, 64)
        ctx = None if cross is None else randn(gen, 2, 3, cross)
        expected = attn(x, ctx)
        torch.testing.assert_close(mod(x, ctx) if ctx is not None else mod(x), expected, **TOL[torch.float32])


def test_attention_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        pnn.Attention(64, 3)
    with pytest.raises(ValueError, match="num_heads"):
        pnn.Attention(64, 0)
    with pytest.raises(ValueError, match="head_dim"):
        pnn.Attention(64, 2, head_dim=-1)
    mod = pnn.Attention(64, 2)
    with pytest.raises(ValueError, match="context"):
        mod(torch.randn(1, 3, 64), torch.randn(1, 3, 64))
    with pytest.raises(ValueError, match="context"):
        pnn.Attention(64, 2, cross_dim=8)(torch.randn(1, 3, 64))


# ---------------------------------------------------------------------------
# DiTBlock
# ---------------------------------------------------------------------------
DIT_CASES = [  # (hidden, heads, mlp_ratio, cond_dim, B, N)
    (64, 2, 4.0, None, 3, 7),
    (64, 1, 1.5, 40, 2, 13),
    (96, 3, 2.0, 24, 1, 5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DIT_CASES, ids=lambda c: f"C{c[0]}h{c[1]}r{c[2]}c{c[3]}B{c[4]}N{c[5]}")
def test_dit_block_matches_eager(backend, case):
    hidden, heads, ratio, cond_dim, b, n = case
    gen = torch.Generator().manual_seed(3)
    block = randomize_(pnn.DiTBlock(hidden, heads, ratio, cond_dim), gen)
    ref = twin(block, EagerDiTBlock(hidden, heads, ratio, cond_dim))
    x = randn(gen, b, n, hidden).requires_grad_()
    c = randn(gen, b, cond_dim or hidden).requires_grad_()
    gout = randn(gen, b, n, hidden)
    with backend_ctx(backend):
        out = block(x, c)
        g_pg = grads(block, [x, c], out, gout)
    expected = ref(x, c)
    g_ref = grads(ref, [x, c], expected, gout)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert_grads_close(g_pg, g_ref)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")]), "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_mlp_fused_gelu_matches_linear_then_gelu(dtype, device):
    """pygen.nn.Mlp without autograd on CUDA: fc1 + GELU(tanh) as one GEMM with a GELU epilogue; it must
    match fc1 then F.gelu(approximate="tanh") to the dtype's GEMM tolerance (on the CPU, and with
    autograd, that is the path itself: equal)."""
    from pygen.nn.dit import Mlp

    gen = torch.Generator().manual_seed(6)
    mlp = randomize_(Mlp(64, 256), gen).to(device=device, dtype=dtype)
    x = randn(gen, 3, 17, 64).to(device=device, dtype=dtype)
    with torch.no_grad():
        got = mlp(x)
        want = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype] if device == "cuda" else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    y = mlp(x.requires_grad_())  # with autograd: the unfused path, differentiable
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dit_block_strided_input_and_dtype_mismatch(backend):
    """A non-contiguous x (a transposed view) gives the contiguous x's result and gradient (the compiled
    ops are called directly on the cpu/cuda backends, after making x contiguous); an x whose dtype differs
    from the block's parameters raises the public ops' TypeError, as before."""
    gen = torch.Generator().manual_seed(5)
    block = randomize_(pnn.DiTBlock(64, 2, 2.0), gen)
    xt = randn(gen, 9, 2, 64).requires_grad_()
    x = xt.transpose(0, 1)
    assert not x.is_contiguous()
    c = randn(gen, 2, 64)
    gout = randn(gen, 2, 9, 64)
    with backend_ctx(backend):
        out = block(x, c)
        (g,) = torch.autograd.grad(out, xt, gout)
        xc = x.detach().contiguous().requires_grad_()
        ref = block(xc, c)
        (g_ref,) = torch.autograd.grad(ref, xc, gout)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(g.transpose(0, 1), g_ref, rtol=0, atol=0)
        with pytest.raises(TypeError, match="dtype"):
            block(x.detach().double(), c)


@pytest.mark.parametrize("device", LOW_PRECISION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dit_block_low_precision(dtype, device):
    gen = torch.Generator().manual_seed(4)
    block = randomize_(pnn.DiTBlock(128, 2, 2.0, cond_dim=48), gen)
    ref = twin(block, EagerDiTBlock(128, 2, 2.0, cond_dim=48))
    check_low_precision(block, ref, (randn(gen, 2, 37, 128), randn(gen, 2, 48)), dtype, device)


def test_dit_block_init_is_identity_and_trains():
    """adaLN-Zero: a fresh block is the identity; the zeroed modulation still gets a gradient."""
    torch.manual_seed(0)
    block = pnn.DiTBlock(64, 2)
    assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    assert block.attn.qkv.weight.abs().max() > 0 and not block.attn.qkv.bias.any()
    x, c = torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 64)
    out = block(x, c)
    assert torch.equal(out, x)
    out.square().sum().backward()
    assert block.adaLN_modulation[1].bias.grad.abs().max() > 0  # the gates' gradient is not zero
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_dit_block_state_dict_names():
    """pygen's names are DiT's (the eager block uses the reference code's names)."""
    block = pnn.DiTBlock(64, 2, cond_dim=32)
    assert sorted(block.state_dict()) == sorted(EagerDiTBlock(64, 2, cond_dim=32).state_dict())
    assert set(block.state_dict()) == {
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_dit_block_nan_propagates(backend):
    gen = torch.Generator().manual_seed(5)
    block = randomize_(pnn.DiTBlock(64, 2), gen)
    x, c = randn(gen, 3, 5, 64), randn(gen, 3, 64)
    x[1, 2, 7] = float("nan")
    with backend_ctx(backend), torch.no_grad():
        out = block(x, c)
    assert out[1].isnan().all()  # the NaN token's row and, through attention, its whole sample
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_dit_block_bad_input():
    block = pnn.DiTBlock(64, 2, cond_dim=32)
    with pytest.raises(ValueError, match="x must be"):
        block(torch.randn(2, 5, 32), torch.randn(2, 32))
    with pytest.raises(ValueError, match="c must be"):
        block(torch.randn(2, 5, 64), torch.randn(2, 64))
    with pytest.raises(ValueError, match="c must be"):
        block(torch.randn(2, 5, 64), torch.randn(3, 32))
    with pytest.raises(ValueError, match="num_heads"):
        pnn.DiTBlock(64, 5)


# ---------------------------------------------------------------------------
# UNetAttentionBlock
# ---------------------------------------------------------------------------
UNET_CASES = [  # (channels, heads, head_dim, groups, eps, B, H, W, rescale)
    (64, 2, None, 8, 1e-5, 2, 3, 5, 1.0),
    (64, None, 32, 32, 1e-6, 1, 4, 4, 1.0),
    (96, 3, 32, 8, 1e-5, 2, 1, 7, 2.0),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UNET_CASES, ids=lambda c: f"C{c[0]}h{c[1]}d{c[2]}g{c[3]}B{c[5]}{c[6]}x{c[7]}r{c[8]}")
def test_unet_attention_block_matches_eager(backend, case, channels_last):
    channels, heads, head_dim, groups, eps, b, hh, ww, rescale = case
    gen = torch.Generator().manual_seed(6)
    block = randomize_(pnn.UNetAttentionBlock(channels, heads, head_dim, groups, eps, rescale_output_factor=rescale),
                       gen)
    ref = twin(block, EagerUNetAttention(channels, block.num_heads, block.head_dim, groups, eps, rescale))
    x = randn(gen, b, channels, hh, ww)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gout = randn(gen, b, channels, hh, ww)
    with backend_ctx(backend):
        out = block(x)
        g_pg = grads(block, [x], out, gout)
    expected = ref(x)
    g_ref = grads(ref, [x], expected, gout)
    assert out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert_grads_close(g_pg, g_ref)


@pytest.mark.parametrize("device", LOW_PRECISION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_unet_attention_block_low_precision(dtype, device):
    gen = torch.Generator().manual_seed(7)
    block = randomize_(pnn.UNetAttentionBlock(128, head_dim=64, num_groups=32), gen)
    ref = twin(block, EagerUNetAttention(128, 2, 64, 32, 1e-5))
    check_low_precision(block, ref, (randn(gen, 2, 128, 5, 7),), dtype, device)
    x = randn(gen, 1, 128, 4, 6).contiguous(memory_format=torch.channels_last)
    check_low_precision(block, ref, (x,), dtype, device)


def test_unet_attention_block_from_diffusers():
    """Same numbers as diffusers' Attention (group norm + residual) with its stock processor, and the
    state dict loads as it is."""
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    gen = torch.Generator().manual_seed(8)
    attn = randomize_(attention_processor.Attention(64, heads=2, dim_head=32, norm_num_groups=8, bias=True,
                                                    residual_connection=True, eps=1e-6,
                                                    rescale_output_factor=1.5), gen)
    attn.set_processor(attention_processor.AttnProcessor2_0())
    block = pnn.UNetAttentionBlock.from_diffusers(attn)
    assert block.num_heads == 2 and block.group_norm.eps == 1e-6 and block.rescale_output_factor == 1.5
    fresh = pnn.UNetAttentionBlock(64, 2, num_groups=8)
    fresh.load_state_dict(attn.state_dict(), strict=True)  # diffusers' names, 1:1
    x = randn(gen, 2, 64, 3, 5)
    torch.testing.assert_close(block(x), attn(x), **TOL[torch.float32])
    with pytest.raises(ValueError, match="residual_connection"):
        pnn.UNetAttentionBlock.from_diffusers(attention_processor.Attention(64, heads=2, dim_head=32))


def test_unet_attention_block_bad_input():
    with pytest.raises(ValueError, match="head_dim"):
        pnn.UNetAttentionBlock(64, head_dim=24)
    with pytest.raises(ValueError, match="num_groups"):
        pnn.UNetAttentionBlock(64, 2, num_groups=7)
    with pytest.raises(ValueError, match="x must be"):
        pnn.UNetAttentionBlock(64, 2, num_groups=8)(torch.randn(1, 32, 4, 4))


# ---------------------------------------------------------------------------
# GroupNorm, TimestepEmbedder
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "3d"])
def test_group_norm_module(backend, silu, layout):
    gen = torch.Generator().manual_seed(9)
    mod = randomize_(pnn.GroupNorm(4, 12, eps=1e-6, silu=silu), gen)
    ref = nn.GroupNorm(4, 12, eps=1e-6)
    ref.load_state_dict(mod.state_dict(), strict=True)
    x = randn(gen, 3, 12, 5) if layout == "3d" else randn(gen, 3, 12, 5, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gout = randn(gen, *x.shape)
    with backend_ctx(backend):
        out = mod(x)
        g_pg = grads(mod, [x], out, gout)
    expected = F.silu(ref(x)) if silu else ref(x)
    g_ref = grads(ref, [x], expected, gout)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert_grads_close(g_pg, g_ref)


def test_group_norm_module_bad_input():
    with pytest.raises(ValueError, match="num_groups"):
        pnn.GroupNorm(5, 12)


def dit_timestep_features(t, dim, max_period=10000):
    """DiT's TimestepEmbedder.timestep_embedding: [cos, sin] of t * exp(-ln(max_period) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("freq_dim", [256, 33])
def test_timestep_embedder(backend, freq_dim):
    gen = torch.Generator().manual_seed(10)
    mod = randomize_(pnn.TimestepEmbedder(48, frequency_embedding_size=freq_dim), gen)
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    with backend_ctx(backend):
        out = mod(t)
        out_int = mod(t.long())
    feats = dit_timestep_features(t, freq_dim)
    w1, b1, w2, b2 = mod.mlp[0].weight, mod.mlp[0].bias, mod.mlp[2].weight, mod.mlp[2].bias
    expected = F.linear(F.silu(F.linear(feats, w1, b1)), w2, b2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # sin/cos of t up to 1e3: fp32 arguments
    torch.testing.assert_close(out_int, out, rtol=1e-5, atol=1e-5)  # integer timesteps accepted
    assert set(mod.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}


# ---------------------------------------------------------------------------
# one tiny Triton case per block (interpreter on CPU; the ops' own tests cover Triton in depth)
# ---------------------------------------------------------------------------
def _triton_ok():
    import os

    return pygen.backends()["triton"] == "available" and (torch.cuda.is_available() or
                                                          os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_ok(), reason="triton unavailable (on CPU it needs TRITON_INTERPRET=1)")
def test_blocks_on_triton_tiny():
    from conftest import device_for

    dev = device_for("triton")
    gen = torch.Generator().manual_seed(11)
    block = randomize_(pnn.DiTBlock(64, 2, mlp_ratio=1.0), gen).to(dev)
    ref = twin(block, EagerDiTBlock(64, 2, mlp_ratio=1.0)).to(dev)
    x, c = randn(gen, 1, 5, 64).to(dev).requires_grad_(), randn(gen, 1, 64).to(dev)
    gout = randn(gen, 1, 5, 64).to(dev)
    with pygen.use_backend("triton"):
        out = block(x, c)
        g_pg = grads(block, [x], out, gout)
    expected = ref(x, c)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert_grads_close(g_pg, grads(ref, [x], expected, gout))

    unet = randomize_(pnn.UNetAttentionBlock(64, head_dim=32, num_groups=8), gen).to(dev)
    uref = twin(unet, EagerUNetAttention(64, 2, 32, 8, 1e-5)).to(dev)
    x = randn(gen, 1, 64, 2, 3).to(dev).contiguous(memory_format=torch.channels_last)
    with pygen.use_backend("triton"), torch.no_grad():
        out = unet(x)
    torch.testing.assert_close(out, uref(x), **TOL[torch.float32])
