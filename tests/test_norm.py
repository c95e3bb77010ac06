"""Tests of the norm family (pygen/ops/norm.py): pygen.adaln_modulate, pygen.gated_residual,
pygen.group_norm and pygen.timestep_embedding (ops pygen::adaln_modulate, gated_residual,
group_norm, timestep_embedding and their _backward ops) on the torch, cpu and triton (and, on a
GPU, cuda) backends.

Expected values come from plain PyTorch composites computed in float64 (F.layer_norm + modulation,
F.group_norm + F.silu, x + gate·y) and from diffusers' get_timestep_embedding — independently of
pygen/ops/norm.py; gradients from torch autograd through those composites. Triton runs under
TRITON_INTERPRET=1 at tiny sizes.
"""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

import pygen
from conftest import ALL_BACKENDS, MANTISSA_BITS, device_for, make, to_device

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OK = HAS_TRITON and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
HAS_CPU = pygen.backends()["cpu"] == "available"
LOW = (torch.float16, torch.bfloat16)


def _param(backend):
    """The ALL_BACKENDS entry (with its skip marks) for ``backend``."""
    for p in ALL_BACKENDS:
        if (p if isinstance(p, str) else p.values[0]) == backend:
            return p
    raise KeyError(backend)


def cases(full, triton_subset):
    """pytest params: every backend but triton over ``full``, triton over ``triton_subset`` (tiny)."""
    out = []
    for b in ("torch", "cpu", "cuda"):
        p = _param(b)
        marks = () if isinstance(p, str) else p.marks
        out += [pytest.param(b, *c, marks=marks, id=f"{b}-{'-'.join(map(str, c))}") for c in full]
    p = _param("triton")
    out += [pytest.param("triton", *c, marks=p.marks, id=f"triton-{'-'.join(map(str, c))}") for c in triton_subset]
    return out


def require(backend):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("needs triton with TRITON_INTERPRET=1 or CUDA")
    status = pygen.backends()[backend]
    if status != "available":
        pytest.skip(f"backend {backend} unavailable: {status}")


def assert_storage_close(out, exp, dtype, *, atol=2e-6, rtol=1e-5):
    """fp32: rtol 1e-5 (+ atol); fp64: 1e-12; fp16/bf16: one ulp of the storage type (+ atol)."""
    assert out.dtype == dtype, (out.dtype, dtype)
    assert out.shape == exp.shape
    out = out.detach().double().cpu()
    exp = exp.detach().double().cpu()
    finite = torch.isfinite(exp)
    assert torch.equal(torch.isfinite(out), finite), "non-finite pattern differs (unwritten or NaN elements)"
    out, exp = out[finite], exp[finite]
    if dtype in MANTISSA_BITS:
        exp_r = exp.to(dtype).double()
        ulp = torch.ldexp(torch.ones_like(exp_r), torch.frexp(exp_r)[1] - 1 - MANTISSA_BITS[dtype])
        err = (out - exp_r).abs()
        assert bool((err <= ulp + atol).all()), f"max err over 1 ulp: {(err - ulp).max().item()}"
    elif dtype == torch.float64:
        torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(out, exp, rtol=rtol, atol=atol)


def assert_grad_close(got, exp, dtype, name):
    """Gradients: relative to the largest entry (reductions and LayerNorm's cancellation)."""
    assert got is not None, f"{name}: no gradient"
    assert got.dtype == exp.dtype and got.shape == exp.shape, name
    got, exp = got.double().cpu(), exp.double().cpu()
    scale = exp.abs().max().item() + 1e-12
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-11}.get(dtype, 2e-5)
    err = (got - exp).abs().max().item() / scale
    assert err <= tol, f"{name}: max relative error {err:.3g} > {tol}"


def fresh(shape, dtype, device, seed, requires_grad=False, scale=1.0, shift=0.0):
    t = (make(shape, torch.float64, seed=seed, scale=scale) + shift).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------
# plain-PyTorch expectations (float64)
# ---------------------------------------------------------------------------
def adaln_expected(x, shift, scale, weight, bias, eps):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.layer_norm(x.double(), (x.shape[-1],), d(weight), d(bias), eps)
    if scale is not None:
        y = y * (1 + scale.double()[:, None, :])
    if shift is not None:
        y = y + shift.double()[:, None, :]
    return y


def group_norm_expected(x, groups, weight, bias, eps, silu):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.group_norm(x.double(), groups, d(weight), d(bias), eps)
    return F.silu(y) if silu else y


def _grads_of(fn, inputs, grad_out):
    """Gradients of <fn(*inputs), grad_out> w.r.t. the inputs that require grad (None for the others)."""
    out = fn(*inputs)
    wants = [t for t in inputs if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, wants, grad_out.to(out.dtype))
    it = iter(gs)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def _leaf64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


# ---------------------------------------------------------------------------
# adaln_modulate
# ---------------------------------------------------------------------------
ADALN_FULL = [(s, dt, opt) for s in [(2, 5, 7), (1, 3, 33), (3, 1, 4), (2, 70, 5)]
              for dt in [torch.float32, torch.float16, torch.bfloat16, torch.float64]
              for opt in ["all", "dit", "affine"]]
ADALN_TRITON = [((2, 5, 7), torch.float32, "all"), ((2, 70, 5), torch.float16, "dit"),
                ((1, 3, 33), torch.bfloat16, "affine"), ((2, 3, 7), torch.float64, "all")]


def _adaln_inputs(shape, dtype, device, opt, requires_grad=False):
    b, n, c = shape
    x = fresh(shape, dtype, device, 1, requires_grad, scale=2.0, shift=0.5)
    shift = fresh((b, c), dtype, device, 2, requires_grad) if opt in ("all", "dit") else None
    scale = fresh((b, c), dtype, device, 3, requires_grad, scale=0.5) if opt in ("all", "dit") else None
    weight = fresh((c,), dtype, device, 4, requires_grad, shift=1.0) if opt in ("all", "affine") else None
    bias = fresh((c,), dtype, device, 5, requires_grad) if opt in ("all", "affine") else None
    return x, shift, scale, weight, bias


@pytest.mark.parametrize("backend,shape,dtype,opt", cases(ADALN_FULL, ADALN_TRITON))
def test_adaln_modulate_matches_layer_norm(backend, shape, dtype, opt):
    dev = device_for(backend)
    x, shift, scale, weight, bias = _adaln_inputs(shape, dtype, dev, opt)
    with pygen.use_backend(backend):
        y = pygen.adaln_modulate(x, shift, scale, weight, bias, eps=1e-6)
    assert_storage_close(y, adaln_expected(x, shift, scale, weight, bias, 1e-6), dtype)


@pytest.mark.parametrize("backend,shape,dtype,opt", cases(ADALN_FULL[::3], ADALN_TRITON))
def test_adaln_modulate_gradients(backend, shape, dtype, opt):
    dev = device_for(backend)
    inputs = _adaln_inputs(shape, dtype, dev, opt, requires_grad=True)
    g = fresh(shape, dtype, dev, 9)
    with pygen.use_backend(backend):
        got = _grads_of(lambda *a: pygen.adaln_modulate(*a, eps=1e-6), inputs, g)
    ref = _grads_of(lambda *a: adaln_expected(*a, 1e-6), [_leaf64(t) for t in inputs], g.double())
    for name, gg, rr, t in zip(("x", "shift", "scale", "weight", "bias"), got, ref, inputs):
        if t is None:
            continue
        assert_grad_close(gg, rr.to(dtype), dtype, name)


def test_adaln_rows_use_their_own_shift_and_scale():
    x, shift, scale, weight, bias = _adaln_inputs((3, 4, 6), torch.float32, "cpu", "dit")
    y = pygen.adaln_modulate(x, shift, scale)
    for b in range(3):
        yb = pygen.adaln_modulate(x[b:b + 1], shift[b:b + 1], scale[b:b + 1])
        torch.testing.assert_close(y[b:b + 1], yb, rtol=0, atol=0)
    assert not torch.allclose(y[0], pygen.adaln_modulate(x[0:1], shift[1:2], scale[1:2])[0])


@pytest.mark.parametrize("backend", ["torch", _param("cpu"), _param("triton")])
def test_adaln_long_rows_loop(backend):
    """C above the Triton row block (4096): the looped path."""
    require(backend)
    x, shift, scale, weight, bias = _adaln_inputs((1, 2, 4100), torch.float32, device_for(backend), "all")
    with pygen.use_backend(backend):
        y = pygen.adaln_modulate(x, shift, scale, weight, bias)
    assert_storage_close(y, adaln_expected(x, shift, scale, weight, bias, 1e-6), torch.float32)


@pytest.mark.parametrize("backend", ["torch", _param("cpu"), _param("cuda"), _param("triton")])
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5)])
def test_adaln_backward_without_elements_gives_zero_parameter_gradients(backend, shape):
    """B == 0 or N == 0: dweight / dbias (C,) and dshift / dscale are sums of nothing -> exact zeros."""
    require(backend)
    dev = device_for(backend)
    B, N, C = shape
    x = torch.empty(shape, device=dev, requires_grad=True)
    shift, scale = (torch.zeros(B, C, device=dev, requires_grad=True) for _ in range(2))
    for _ in range(3):  # uninitialised memory often holds a just-freed NaN buffer of the same size
        junk = torch.full((C,), float("nan"), device=dev)
        del junk
        weight = torch.ones(C, device=dev, requires_grad=True)
        bias = torch.zeros(C, device=dev, requires_grad=True)
        with pygen.use_backend(backend):
            y = pygen.adaln_modulate(x, shift, scale, weight, bias)
        y.sum().backward()
        for name, t in (("weight", weight), ("bias", bias), ("shift", shift), ("scale", scale)):
            assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), (name, t.grad)
        shift.grad = scale.grad = None


# ---------------------------------------------------------------------------
# gated_residual
# ---------------------------------------------------------------------------
GATED_FULL = [(s, dt) for s in [(2, 5, 7), (1, 3, 33), (2, 70, 5)]
              for dt in [torch.float32, torch.float16, torch.bfloat16, torch.float64]]
GATED_TRITON = [((2, 70, 5), torch.float32), ((1, 3, 33), torch.bfloat16)]


@pytest.mark.parametrize("backend,shape,dtype", cases(GATED_FULL, GATED_TRITON))
def test_gated_residual(backend, shape, dtype):
    dev = device_for(backend)
    b, n, c = shape
    x = fresh(shape, dtype, dev, 1, True)
    gate = fresh((b, c), dtype, dev, 2, True)
    y = fresh(shape, dtype, dev, 3, True)
    g = fresh(shape, dtype, dev, 4)
    with pygen.use_backend(backend):
        out = pygen.gated_residual(x, gate, y)
        got = _grads_of(pygen.gated_residual, [x, gate, y], g)
    exp_fn = lambda x, gate, y: x.double() + gate.double()[:, None, :] * y.double()  # noqa: E731
    assert_storage_close(out, exp_fn(x, gate, y), dtype)
    ref = _grads_of(exp_fn, [_leaf64(t) for t in (x, gate, y)], g.double())
    for name, gg, rr in zip(("x", "gate", "y"), got, ref):
        assert_grad_close(gg, rr.to(dtype), dtype, name)


# ---------------------------------------------------------------------------
# group_norm
# ---------------------------------------------------------------------------
GN_SHAPES = [((2, 4, 3, 5), 2), ((2, 33), 3), ((1, 6, 5), 6), ((1, 4, 2, 2, 3), 1), ((1, 4, 9, 9), 4),
             ((2, 7, 5), 7)]
GN_FULL = [(s, g, dt, layout, silu, affine) for (s, g) in GN_SHAPES
           for dt in [torch.float32, torch.float16, torch.bfloat16, torch.float64]
           for layout in ["nchw", "cl"] for silu in [False, True] for affine in [True, False]
           if not (layout == "cl" and len(s) == 2)]
GN_TRITON = [((2, 4, 3, 5), 2, torch.float32, "cl", True, True), ((2, 7, 5), 7, torch.float16, "nchw", False, True),
             ((1, 4, 2, 2, 3), 1, torch.bfloat16, "cl", True, False), ((2, 33), 3, torch.float64, "nchw", True, True),
             ((1, 2, 64, 80), 2, torch.float32, "nchw", True, True)]


def _to_layout(x, layout):
    if layout == "cl":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def _gn_inputs(shape, dtype, device, layout, affine, requires_grad=False):
    x = _to_layout(fresh(shape, dtype, device, 1, scale=3.0, shift=1.0), layout).requires_grad_(requires_grad)
    c = shape[1]
    w = fresh((c,), dtype, device, 2, requires_grad, shift=1.0) if affine else None
    b = fresh((c,), dtype, device, 3, requires_grad) if affine else None
    return x, w, b


def _same_layout(a, b):
    return a.stride() == b.stride() or a.movedim(1, -1).is_contiguous() == b.movedim(1, -1).is_contiguous()


@pytest.mark.parametrize("backend,shape,groups,dtype,layout,silu,affine", cases(GN_FULL, GN_TRITON[:4]))
def test_group_norm_matches_torch(backend, shape, groups, dtype, layout, silu, affine):
    dev = device_for(backend)
    x, w, b = _gn_inputs(shape, dtype, dev, layout, affine)
    with pygen.use_backend(backend):
        y = pygen.group_norm(x, groups, w, b, eps=1e-5, silu=silu)
    assert y.stride() == x.stride(), "output keeps the input's memory format"
    assert_storage_close(y, group_norm_expected(x, groups, w, b, 1e-5, silu), dtype)


@pytest.mark.parametrize("backend,shape,groups,dtype,layout,silu,affine", cases(GN_FULL[::5], GN_TRITON))
def test_group_norm_gradients(backend, shape, groups, dtype, layout, silu, affine):
    dev = device_for(backend)
    x, w, b = _gn_inputs(shape, dtype, dev, layout, affine, requires_grad=True)
    g = fresh(shape, dtype, dev, 7)  # NCHW-contiguous: the backward converts it to x's layout
    with pygen.use_backend(backend):
        fn = lambda x, w, b: pygen.group_norm(x, groups, w, b, silu=silu)  # noqa: E731
        got = _grads_of(fn, [x, w, b], g)
    ref = _grads_of(lambda x, w, b: group_norm_expected(x, groups, w, b, 1e-5, silu),
                    [_leaf64(t) for t in (x, w, b)], g.double())
    assert got[0].stride() == x.stride(), "dx keeps x's memory format"
    for name, gg, rr, t in zip(("x", "weight", "bias"), got, ref, (x, w, b)):
        if t is not None:
            assert_grad_close(gg, rr.to(dtype), dtype, name)


@pytest.mark.parametrize("backend", ["torch", _param("cpu"), _param("triton")])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.channels_last_3d])
def test_group_norm_torch_memory_formats(backend, memory_format):
    require(backend)
    shape = (2, 6, 3, 4) if memory_format == torch.channels_last else (1, 6, 2, 3, 2)
    x = make(shape, torch.float32, device_for(backend), seed=4).to(memory_format=memory_format)
    with pygen.use_backend(backend):
        y = pygen.group_norm(x, 3, silu=True)
    assert y.is_contiguous(memory_format=memory_format)
    assert_storage_close(y, group_norm_expected(x, 3, None, None, 1e-5, True), torch.float32)


def test_group_norm_other_strides_are_copied():
    x = make((2, 4, 5, 3), torch.float32, seed=5).transpose(2, 3)  # neither NCHW nor channels-last
    y = pygen.group_norm(x, 2)
    assert y.is_contiguous()
    assert_storage_close(y, group_norm_expected(x, 2, None, None, 1e-5, False), torch.float32)


# ---------------------------------------------------------------------------
# timestep_embedding
# ---------------------------------------------------------------------------
def _diffusers_embedding():
    mod = pytest.importorskip("diffusers.models.embeddings")
    return mod.get_timestep_embedding


TEMB_CONFIGS = [(8, False, 1.0, 1.0, 10000), (9, True, 0.0, 2.0, 10000), (33, True, 1.0, 1.0, 10000),
                (1, False, 1.0, 1.0, 10000), (16, False, 0.5, 0.25, 100)]
TEMB_FULL = [(cfg, tdt) for cfg in TEMB_CONFIGS for tdt in [torch.float32, torch.int64, torch.float64, torch.float16]]
TEMB_TRITON = [(TEMB_CONFIGS[1], torch.float32), (TEMB_CONFIGS[2], torch.int64), (TEMB_CONFIGS[4], torch.float64)]
_T_VALUES = [0.0, 1.0, 3.5, 999.0, 0.25, 500.0]


def _timesteps(tdt, device):
    vals = [round(v) for v in _T_VALUES] if not tdt.is_floating_point else _T_VALUES
    return torch.tensor(vals, dtype=torch.float64).to(tdt).to(device)


@pytest.mark.parametrize("backend,cfg,tdt", cases(TEMB_FULL, TEMB_TRITON))
def test_timestep_embedding_matches_diffusers(backend, cfg, tdt):
    get_timestep_embedding = _diffusers_embedding()
    dim, flip, shift, scale, max_period = cfg
    t = _timesteps(tdt, device_for(backend))
    with pygen.use_backend(backend):
        emb = pygen.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                                       max_period=max_period)
    out_dtype = torch.float64 if tdt == torch.float64 else torch.float32
    assert emb.dtype == out_dtype and emb.shape == (t.shape[0], dim)
    if tdt == torch.float64:  # diffusers computes in fp32; compare with the formula in fp64
        half = dim // 2
        k = torch.arange(half, dtype=torch.float64)
        arg = scale * (t.double().cpu()[:, None] * torch.exp(-math.log(max_period) * k / (half - shift)))
        parts = [arg.cos(), arg.sin()] if flip else [arg.sin(), arg.cos()]
        exp = torch.cat(parts + [torch.zeros(t.shape[0], dim % 2, dtype=torch.float64)], -1)
        torch.testing.assert_close(emb.cpu(), exp, rtol=1e-12, atol=1e-12)
        return
    exp = get_timestep_embedding(t.cpu(), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                                 max_period=max_period)
    if backend == "torch":
        assert torch.equal(emb.cpu(), exp), "the torch reference is diffusers' computation, bit for bit"
    else:
        # the kernels' exp/sin/cos may differ from torch's by an ulp: the argument a = scale·t·f
        # then differs by ~|a|·2^-23, so allow that much (absolute) on top of fp32 rounding
        amax = abs(scale) * float(t.double().abs().max())
        torch.testing.assert_close(emb.cpu(), exp, rtol=1e-5, atol=2e-6 + 4 * amax * 2.0**-24)


@pytest.mark.parametrize("backend,cfg,tdt", cases([(c, torch.float32) for c in TEMB_CONFIGS]
                                                  + [(c, torch.float64) for c in TEMB_CONFIGS[:2]],
                                                  TEMB_TRITON[:1]))
def test_timestep_embedding_gradient(backend, cfg, tdt):
    dim, flip, shift, scale, max_period = cfg
    dev = device_for(backend)
    t = (torch.tensor([0.3, 2.5, 9.0, 0.01], dtype=torch.float64) * 10).to(tdt).to(dev).requires_grad_()
    g = fresh((4, dim), torch.float64 if tdt == torch.float64 else torch.float32, dev, 3)
    with pygen.use_backend(backend):
        emb = pygen.timestep_embedding(t, dim, flip, shift, scale, max_period)
        (dt,) = torch.autograd.grad(emb, t, g)
    t64 = t.detach().double().cpu().requires_grad_()
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    arg = scale * (t64[:, None] * torch.exp(-math.log(max_period) * k / (half - shift)))
    parts = [arg.cos(), arg.sin()] if flip else [arg.sin(), arg.cos()]
    ref = torch.cat(parts + [torch.zeros(4, dim % 2, dtype=torch.float64)], -1)
    (exp,) = torch.autograd.grad(ref, t64, g.double().cpu())
    assert_grad_close(dt, exp.to(tdt), tdt, "t")


def test_timestep_embedding_int_t_has_no_gradient_and_rows_differ():
    t = torch.tensor([1, 500, 999])
    emb = pygen.timestep_embedding(t, 32)
    assert not emb.requires_grad
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[1], emb[2])


# ---------------------------------------------------------------------------
# gradcheck (float64) on the torch and cpu backends
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", _param("cpu")])
def test_gradcheck_float64(backend):
    require(backend)
    with pygen.use_backend(backend):
        x, shift, scale, w, b = _adaln_inputs((2, 5, 7), torch.float64, "cpu", "all", requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: pygen.adaln_modulate(*a, eps=1e-5), (x, shift, scale, w, b))
        assert torch.autograd.gradcheck(lambda x: pygen.adaln_modulate(x, eps=1e-5), (x,))
        gate = fresh((2, 7), torch.float64, "cpu", 6, True)
        y = fresh((2, 5, 7), torch.float64, "cpu", 7, True)
        assert torch.autograd.gradcheck(pygen.gated_residual, (x, gate, y))
        for layout in ("nchw", "cl"):
            xg, wg, bg = _gn_inputs((2, 4, 3, 3), torch.float64, "cpu", layout, True, requires_grad=True)
            assert torch.autograd.gradcheck(lambda x, w, b: pygen.group_norm(x, 2, w, b, silu=True), (xg, wg, bg))
        xg, _, _ = _gn_inputs((2, 6, 5), torch.float64, "cpu", "nchw", False, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: pygen.group_norm(x, 3), (xg,))
        t = torch.tensor([0.3, 2.5, 9.0], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: pygen.timestep_embedding(t, 9, True, 0.0, 2.0), (t,))


# ---------------------------------------------------------------------------
# the ops themselves: outputs (incl. saved statistics), opcheck, fakes, determinism
# ---------------------------------------------------------------------------
def _op_samples():
    """(name, args) for every op, on small CPU tensors."""
    from pygen.ops import norm as R

    x, shift, scale, w, b = _adaln_inputs((2, 3, 5), torch.float32, "cpu", "all")
    _, mean, rstd = R.adaln_modulate_reference(x, w, b, shift, scale, 1e-6)
    g3 = fresh((2, 3, 5), torch.float32, "cpu", 8)
    xg, wg, bg = _gn_inputs((2, 4, 3, 2), torch.float32, "cpu", "cl", True)
    _, gm, gr = R.group_norm_reference(xg, wg, bg, 2, 1e-5, True)
    gg = _to_layout(fresh((2, 4, 3, 2), torch.float32, "cpu", 9), "cl")
    t = torch.tensor([0.5, 10.0, 999.0])
    return [
        ("adaln_modulate", (x, w, b, shift, scale, 1e-6)),
        ("adaln_modulate", (x, None, None, shift, None, 1e-6)),
        ("adaln_modulate_backward", (g3, x, w, b, scale, mean, rstd)),
        ("adaln_modulate_backward", (g3, x, None, None, None, mean, rstd)),
        ("gated_residual", (x, shift, g3)),
        ("gated_residual_backward", (g3, shift, x)),
        ("group_norm", (xg, wg, bg, 2, 1e-5, True)),
        ("group_norm", (xg.contiguous(), None, None, 4, 1e-5, False)),
        ("group_norm_backward", (gg, xg, wg, bg, gm, gr, 2, True)),
        ("timestep_embedding", (t, 9, 10000.0, 1.0, 1.0, True)),
        ("timestep_embedding_backward", (fresh((3, 9), torch.float32, "cpu", 3), t, 9, 10000.0, 1.0, 1.0, True)),
    ]


def _op_cases():
    out = []
    for i, (name, _) in enumerate(_op_samples()):
        out.append(pytest.param("cpu", i, id=f"cpu-{name}-{i}"))
        out.append(pytest.param("triton", i, id=f"triton-{name}-{i}"))
    return out


def _op(backend, name):
    if backend == "triton":
        require("triton")
        return getattr(torch.ops.pygen, f"{name}_triton")
    return getattr(torch.ops.pygen, name)


def _sample(backend, index):
    """Sample ``index`` of _op_samples with its tensors on ``backend``'s device (strides kept)."""
    name, args = _op_samples()[index]
    return name, to_device(args, device_for(backend))


@pytest.mark.parametrize("backend,index", _op_cases())
def test_op_outputs_match_reference(backend, index):
    """Every output of every op (the saved mean/rstd and empty absent gradients too) vs the reference."""
    from pygen.ops import norm as R

    name, args = _sample(backend, index)
    got = _op(backend, name)(*args)
    exp = getattr(R, f"{name}_reference")(*args)
    got, exp = (got, exp) if isinstance(got, tuple) else ((got,), (exp,))
    assert len(got) == len(exp)
    for a, e in zip(got, exp):
        assert a.shape == e.shape and a.dtype == e.dtype
        if a.dim() >= 3:
            assert a.stride() == e.stride()
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend,index", _op_cases())
def test_opcheck(backend, index):
    name, args = _sample(backend, index)
    if backend == "triton" and index % 2:
        pytest.skip("the interpreter is slow: every other sample on the Triton variants")
    forward = not name.endswith("_backward")
    if forward:  # exercise the registered autograd too
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args)
    torch.library.opcheck(_op(backend, name), args)


@pytest.mark.skipif(not HAS_CPU, reason="pygen._C not built")
def test_cpu_reductions_do_not_depend_on_thread_count():
    x, shift, scale, w, b = _adaln_inputs((2, 70, 33), torch.float32, "cpu", "all", requires_grad=True)
    xg, wg, bg = _gn_inputs((2, 8, 20, 9), torch.float32, "cpu", "cl", True, requires_grad=True)

    def run():
        with pygen.use_backend("cpu"):
            ga = torch.autograd.grad(pygen.adaln_modulate(x, shift, scale, w, b).square().sum(), (x, shift, scale, w, b))
            gg = torch.autograd.grad(pygen.group_norm(xg, 4, wg, bg, silu=True).square().sum(), (xg, wg, bg))
        return ga + gg

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(one, many):
        assert torch.equal(a, b_)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 5)
        y, m, r = torch.ops.pygen.adaln_modulate(x, None, None, torch.empty(2, 5), None, 1e-6)
        assert y.shape == (2, 3, 5) and m.shape == (2, 3) and m.dtype == torch.float32
        xg = torch.empty(2, 4, 3, 3).to(memory_format=torch.channels_last)
        y, m, r = torch.ops.pygen.group_norm(xg, None, None, 2, 1e-5, True)
        assert y.is_contiguous(memory_format=torch.channels_last) and m.shape == (2, 2)
        e = torch.ops.pygen.timestep_embedding(torch.empty(4, dtype=torch.float64), 7, 1e4, 1.0, 1.0, False)
        assert e.shape == (4, 7) and e.dtype == torch.float64


# ---------------------------------------------------------------------------
# NaN propagation and bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", _param("cpu"), _param("triton")])
def test_nan_propagates(backend):
    require(backend)
    dev = device_for(backend)
    with pygen.use_backend(backend):
        x, shift, scale, w, b = _adaln_inputs((2, 3, 5), torch.float32, dev, "all")
        x[1, 2, 3] = float("nan")
        y = pygen.adaln_modulate(x, shift, scale, w, b)
        assert torch.isnan(y[1, 2]).all() and torch.isfinite(y[:, :2]).all() and torch.isfinite(y[0]).all()
        gate = shift.clone()
        gate[0, 1] = float("nan")
        out = pygen.gated_residual(x, gate, x.clone().nan_to_num_(0.0))
        assert torch.isnan(out[0, :, 1]).all() and torch.isnan(out[1, 2, 3]) and torch.isfinite(out[0, :, 0]).all()
        xg = make((2, 4, 3, 3), torch.float32, dev, seed=3)
        xg[0, 3, 1, 1] = float("nan")
        yg = pygen.group_norm(xg, 2, silu=True)
        assert torch.isnan(yg[0, 2:]).all() and torch.isfinite(yg[0, :2]).all() and torch.isfinite(yg[1]).all()
        emb = pygen.timestep_embedding(torch.tensor([1.0, float("nan")], device=dev), 8)
        assert torch.isnan(emb[1]).all() and torch.isfinite(emb[0]).all()


def test_bad_input():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="x must be 3-D"):
        pygen.adaln_modulate(torch.randn(2, 5))
    with pytest.raises(ValueError, match="shift must have shape"):
        pygen.adaln_modulate(x, shift=torch.randn(3, 5))
    with pytest.raises(ValueError, match="scale must have shape"):
        pygen.adaln_modulate(x, scale=torch.randn(2, 4))
    with pytest.raises(TypeError, match="weight must have the dtype"):
        pygen.adaln_modulate(x, weight=torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        pygen.adaln_modulate(x, shift=torch.randn(2, 5, device="meta"))
    with pytest.raises(TypeError, match="x must have dtype"):
        pygen.adaln_modulate(torch.ones(2, 3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps"):
        pygen.adaln_modulate(x, eps=-1.0)
    with pytest.raises(ValueError, match="gate must have shape"):
        pygen.gated_residual(x, torch.randn(2, 3), x)
    with pytest.raises(ValueError, match="y must have shape"):
        pygen.gated_residual(x, torch.randn(2, 5), torch.randn(2, 4, 5))
    xg = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="must divide"):
        pygen.group_norm(xg, 4)
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        pygen.group_norm(xg, 0)
    with pytest.raises(ValueError, match="2-D to 5-D"):
        pygen.group_norm(torch.randn(6), 1)
    with pytest.raises(ValueError, match="weight must have shape"):
        pygen.group_norm(xg, 3, weight=torch.randn(3))
    with pytest.raises(TypeError, match="silu must be a bool"):
        pygen.group_norm(xg, 3, silu=1)
    with pytest.raises(ValueError, match="timesteps must be 1-D"):
        pygen.timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="embedding_dim must be >= 1"):
        pygen.timestep_embedding(torch.zeros(2), 0)
    with pytest.raises(ValueError, match="nonzero"):
        pygen.timestep_embedding(torch.zeros(2), 2, downscale_freq_shift=1)
    with pytest.raises(TypeError, match="timesteps must have dtype"):
        pygen.timestep_embedding(torch.zeros(2, dtype=torch.bool), 4)


@pytest.mark.skipif(not HAS_CPU, reason="pygen._C not built")
def test_compiled_ops_reject_bad_input():
    x = torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match="shift must have shape"):
        torch.ops.pygen.adaln_modulate(x, None, None, torch.randn(3, 5), None, 1e-6)
    with pytest.raises(RuntimeError, match="must be 3-D"):
        torch.ops.pygen.gated_residual(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="divide"):
        torch.ops.pygen.group_norm(torch.randn(2, 6, 3), None, None, 4, 1e-5, False)
    with pytest.raises(RuntimeError, match="mean must be"):
        torch.ops.pygen.group_norm_backward(torch.randn(2, 6, 3), torch.randn(2, 6, 3), None, None,
                                            torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3), 3, False)
    with pytest.raises(RuntimeError, match="floating-point t"):
        torch.ops.pygen.timestep_embedding_backward(torch.randn(2, 4), torch.tensor([1, 2]), 4, 1e4, 1.0, 1.0, False)
