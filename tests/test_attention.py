"""Tests of pygen.attention (torch.ops.pygen.attention_fwd / attention_bwd and their _triton
variants) on the torch, cpu and triton (TRITON_INTERPRET=1) backends against the torch reference
pygen.attention_reference, the dispatcher (pygen.ops.attention), bad input and NaN propagation.
GPU tests (all head dims, fp16/bf16, long sequences, both kernels vs SDPA math) are marked cuda."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import pygen
from pygen.ops import attention as A

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_ON_CPU = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
HAS_CPU_KERNEL = A._kernel_available("cpu", torch.device("cpu"), torch.float32)
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pygen._C has no CPU attention kernel")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton and TRITON_INTERPRET=1")),
]
HALF = (torch.float16, torch.bfloat16)

# (B, H, Sq, Sk, D): cross and self attention, odd lengths, a single query, every head dim.
SHAPES = [
    (1, 2, 7, 13, 32),
    (2, 1, 1, 5, 64),
    (1, 2, 33, 17, 80),
    (1, 1, 17, 33, 64),
    (1, 2, 16, 16, 32),
    (1, 1, 9, 9, 96),
    (1, 1, 5, 11, 128),
    (1, 1, 4, 6, 256),
]
GRAD_SHAPES = [(1, 2, 7, 13, 32), (1, 2, 33, 17, 80), (2, 1, 1, 5, 64), (1, 1, 17, 33, 64)]
# The remaining supported head dims (96 and 128 share the padded 128 lanes; 256 the largest tile), for the
# pygen kernels only (fp32 and fp16): odd lengths, cross attention both ways, Sq and Sk past one 16-block.
GRAD_SHAPES_LARGE_D = [(1, 2, 17, 23, 96), (1, 1, 33, 17, 128), (1, 1, 19, 25, 256)]
KERNEL_BACKENDS = BACKENDS[1:]  # cpu, triton (the interpreter)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make_qkv(shape, dtype, layout="bhsd", seed=0, requires_grad=False):
    """Fresh normal q, k, v (drawn in fp64 from a fixed generator, rounded to ``dtype``)."""
    B, H, sq, sk, d = shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in (sq, sk, sk):
        size = (B, H, s, d) if layout == "bhsd" else (B, s, H, d)
        out.append(torch.randn(size, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad))
    return out


def bhsd(t, layout):
    return t if layout == "bhsd" else t.transpose(1, 2)


def reference64(q, k, v, causal, layout="bhsd", scale=None, grad_out=None):
    """Output (and grads with ``grad_out``) of the reference in fp64, in ``layout``."""
    q64, k64, v64 = (t.detach().double().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = A.attention_reference(bhsd(q64, layout), bhsd(k64, layout), bhsd(v64, layout), scale, causal)
    out = bhsd(out, layout)
    if grad_out is None:
        return out
    out.backward(grad_out.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


# Error bounds relative to the magnitude of each output row (attention outputs are averages, so
# cancellation makes element-relative error meaningless): fp16/bf16 two ulps of the row's largest
# element (P is rounded to the storage type before the PV product, as in every flash kernel), fp32
# rtol 1e-5, fp64 1e-12 (1e-6 for gradients: the ops carry lse in fp32).
FWD_RTOL = {torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7, torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7, torch.float32: 1e-5, torch.float64: 1e-6}


def assert_rows_close(actual, expected, rtol, what="out"):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    row_max = e.nan_to_num(0.0).abs().amax(-1, keepdim=True).clamp_min(1e-30)
    err = ((a - e).abs() / row_max).nan_to_num(0.0)
    assert err.max().item() <= rtol, f"{what}: max error {err.max().item():.3g} x row max > {rtol:.3g}"


def assert_grad_close(actual, expected, rtol, what):
    assert actual is not None, f"{what} missing"
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what} has non-finite values"
    # Gradients of these N(0, 1) inputs are O(1); an exactly-zero one (a query with a single visible key)
    # is compared against an absolute floor of 0.1 instead of its own (zero) scale.
    scale = e.abs().max().clamp_min(0.1)
    err = ((a - e).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max error {err:.3g} x max|grad| > {rtol:.3g}"


def assert_fwd_bwd_match(out, q, k, v, causal, dtype, scale=None):
    """``out`` (of q, k, v) and its q/k/v gradients for a random upstream gradient match the fp64
    reference at ``dtype``'s tolerances."""
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, *ref_grads = reference64(q, k, v, causal, scale=scale, grad_out=g)
    assert_rows_close(out, ref_out, FWD_RTOL[dtype])
    for got, want, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_grad_close(got, want, GRAD_RTOL[dtype], what)


def require_dtype(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 storage is supported on the torch and cpu backends")


def run(backend, q, k, v, **kwargs):
    with pygen.use_backend(backend):
        out = pygen.attention(q, k, v, **kwargs)
    assert A.last_choice()[0] == backend
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty dispatcher cache in a temporary directory."""
    monkeypatch.setenv("PYGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PYGEN_ATTENTION", raising=False)
    monkeypatch.delenv("PYGEN_BACKEND", raising=False)
    A.clear_cache()
    yield tmp_path
    A.clear_cache()


# ---------------------------------------------------------------------------
# forward / backward against the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(backend, shape, causal, dtype):
    require_dtype(backend, dtype)
    q, k, v = make_qkv(shape, dtype, seed=hash((shape, causal)) % 1000)
    out = run(backend, q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_rows_close(out, reference64(q, k, v, causal), FWD_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(backend, shape, causal, dtype):
    check_backward(backend, shape, causal, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GRAD_SHAPES_LARGE_D, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_large_head_dims(backend, shape, causal, dtype):
    """Head dims 96, 128, 256 forward and backward on the pygen kernels against the fp64 reference."""
    check_backward(backend, shape, causal, dtype)


def check_backward(backend, shape, causal, dtype):
    """out and dq/dk/dv of ``backend`` (forced) for a random upstream gradient vs the fp64 reference."""
    q, k, v = make_qkv(shape, dtype, seed=7, requires_grad=True)
    g = torch.Generator().manual_seed(8)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    out = run(backend, q, k, v, causal=causal)
    out.backward(grad_out)
    ref, dq, dk, dv = reference64(q, k, v, causal, grad_out=grad_out)
    assert_rows_close(out, ref, FWD_RTOL[dtype])
    for name, t, expected in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert_grad_close(t.grad, expected, GRAD_RTOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bshd_layout(backend, causal, dtype):
    """(B, S, H, D) in, (B, S, H, D) out; equal to the bhsd result; gradients in bshd."""
    shape = (2, 2, 9, 6, 32)
    q, k, v = make_qkv(shape, dtype, layout="bshd", seed=3, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    out = run(backend, q, k, v, causal=causal, layout="bshd")
    assert out.shape == q.shape
    out.backward(grad_out)
    ref, dq, dk, dv = reference64(q, k, v, causal, layout="bshd", grad_out=grad_out)
    assert_rows_close(out, ref, FWD_RTOL[dtype])
    for name, t, expected in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        assert_grad_close(t.grad, expected, GRAD_RTOL[dtype], name)
    with torch.no_grad():
        out_bhsd = run(backend, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    torch.testing.assert_close(out, out_bhsd.transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q, k, v sliced out of a packed (B, S, 3, H, D) projection, and a q with a non-unit last stride."""
    B, S, H, D = 2, 11, 2, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = run(backend, q, k, v, layout="bshd", scale=0.3)
    assert_rows_close(out, reference64(q, k, v, False, layout="bshd", scale=0.3), FWD_RTOL[torch.float32])
    qt = torch.randn(B, H, D, S, generator=g).transpose(-1, -2)  # last stride S
    kb, vb = k.transpose(1, 2), v.transpose(1, 2)
    out = run(backend, qt, kb, vb, causal=True)
    assert_rows_close(out, reference64(qt, kb, vb, True), FWD_RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_batch_rows(backend):
    """An explicit scale; batch rows and heads of different magnitudes stay independent."""
    q, k, v = make_qkv((3, 2, 5, 7, 64), torch.float32, seed=11)
    q = q * torch.tensor([0.1, 1.0, 4.0]).view(3, 1, 1, 1)
    out = run(backend, q, k, v, scale=0.05)
    assert_rows_close(out, reference64(q, k, v, False, scale=0.05), FWD_RTOL[torch.float32])
    single = run(backend, q[2:], k[2:], v[2:], scale=0.05)
    assert_rows_close(single, out[2:], FWD_RTOL[torch.float32])


def test_reference_matches_sdpa():
    """The spec agrees with torch's SDPA (math) including top-left causal masking for Sq != Sk."""
    import torch.nn.functional as F

    for shape in ((1, 2, 7, 13, 32), (1, 2, 13, 7, 32)):
        q, k, v = make_qkv(shape, torch.float64, seed=2)
        for causal in (False, True):
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.testing.assert_close(A.attention_reference(q, k, v, causal=causal), expected)


# ---------------------------------------------------------------------------
# the ops: torch.ops.pygen.attention_fwd / attention_bwd and the _triton variants
# ---------------------------------------------------------------------------
def _ops(kind):
    if kind == "triton":
        if not TRITON_ON_CPU:
            pytest.skip("needs triton and TRITON_INTERPRET=1")
        return torch.ops.pygen.attention_fwd_triton, torch.ops.pygen.attention_bwd_triton
    return torch.ops.pygen.attention_fwd, torch.ops.pygen.attention_bwd


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["op", "triton"])
def test_ops_fwd_bwd_lse(kind, causal):
    fwd, bwd = _ops(kind)
    q, k, v = make_qkv((1, 2, 19, 10, 80), torch.float32, seed=21)
    scale = 0.2
    out, lse = fwd(q, k, v, scale, causal)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    s = A._scores(q64, k64, scale, causal, torch.float64)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 19)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)
    assert_rows_close(out, reference64(q, k, v, causal, scale=scale), FWD_RTOL[torch.float32])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(22))
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, scale, causal)
    _, rq, rk, rv = reference64(q, k, v, causal, scale=scale, grad_out=grad_out)
    for name, a, e in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_grad_close(a, e, GRAD_RTOL[torch.float32], name)


_BIG_STRIDE_SCRIPT = """
import torch
from pygen.kernels import attention as K
from pygen.ops import attention as A
S, D, st = 3, 32, 2**30  # row 2 starts 2**31 elements in: an int32 row offset wraps
try:
    buf = torch.empty((S - 1) * st + D, dtype=torch.float16)  # 4 GiB virtual, a few pages touched
except RuntimeError:
    raise SystemExit(77)
q = buf.as_strided((1, 1, S, D), (0, 0, st, 1))
g = torch.Generator().manual_seed(0)
rows = torch.randn(S, D, generator=g).half()
for i in range(S):
    buf[i * st:i * st + D] = rows[i]
k, v, go = (torch.randn(1, 1, n, D, generator=g).half() for n in (5, 5, S))
q0 = rows.view(1, 1, S, D)
o, lse = K.attention_fwd(q, k, v, 0.2, False)
ro, rl = A.attention_fwd_reference(q0, k, v, 0.2, False)
dq = K.attention_bwd(go, q, k, v, o, lse, 0.2, False)[0]
rdq = A.attention_bwd_reference(go, q0, k, v, ro, rl, 0.2, False)[0]
assert (o.float() - ro.float()).abs().max() < 2e-3, "out"
assert (lse - rl).abs().max() < 1e-5, "lse"
assert (dq.float() - rdq.float()).abs().max() < 2e-3, "dq"
"""


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton and TRITON_INTERPRET=1")
def test_triton_row_offsets_past_int32():
    # A (B, S, H, D) tensor's row stride H·D times S passes 2**31 for long sequences; row offsets
    # computed in int32 wrap (a wild read: run in a subprocess, which a segfault would kill).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _BIG_STRIDE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 77:
        pytest.skip("cannot reserve 4 GiB of virtual memory")
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"


def test_triton_forward_without_lse():
    """The inference launch (no lse allocated or written) gives the same output."""
    if not TRITON_ON_CPU:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    from pygen.kernels import attention as tk

    q, k, v = make_qkv((1, 2, 19, 10, 80), torch.float16, seed=23)
    out, lse = tk.attention_fwd(q, k, v, 0.2, True)
    out2, none = tk.attention_fwd(q, k, v, 0.2, True, need_lse=False)
    assert none is None and torch.equal(out, out2)


def test_ops_output_strides_follow_q():
    """out is like torch.empty_like(q): a bshd-strided q gives a bshd-strided out; lse is contiguous."""
    q, k, v = make_qkv((1, 3, 5, 4, 32), torch.float32, layout="bshd", seed=1)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = torch.ops.pygen.attention_fwd(qb, kb, vb, 0.5, False)
    assert out.stride() == qb.stride() and lse.is_contiguous()
    if TRITON_ON_CPU:
        out_t, _ = torch.ops.pygen.attention_fwd_triton(qb, kb, vb, 0.5, False)
        assert out_t.stride() == qb.stride()
        torch.testing.assert_close(out_t, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["op", "triton"])
def test_opcheck(kind, causal):
    fwd, bwd = _ops(kind)
    q, k, v = make_qkv((1, 2, 7, 5, 32), torch.float32, seed=31, requires_grad=True)
    torch.library.opcheck(fwd, (q, k, v, 0.25, causal))
    with torch.no_grad():
        out, lse = fwd(q, k, v, 0.25, causal)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(32))
    torch.library.opcheck(bwd, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, 0.25, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_op(causal):
    """Autograd registered on torch.ops.pygen.attention_fwd (fp64, CPU: compiled or reference)."""
    q, k, v = make_qkv((1, 1, 3, 4, 32), torch.float64, seed=41, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v: torch.ops.pygen.attention_fwd(q, k, v, 0.3, causal)[0], (q, k, v),
                             atol=1e-6, rtol=1e-4)


def test_triton_op_autograd():
    """Autograd registered on torch.ops.pygen.attention_fwd_triton agrees with the reference's."""
    fwd, _ = _ops("triton")
    q, k, v = make_qkv((1, 2, 6, 9, 64), torch.float32, seed=42, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(43))
    fwd(q, k, v, 0.125, True)[0].backward(grad_out)
    _, rq, rk, rv = reference64(q, k, v, True, scale=0.125, grad_out=grad_out)
    for name, t, e in (("dq", q, rq), ("dk", k, rk), ("dv", v, rv)):
        assert_grad_close(t.grad, e, GRAD_RTOL[torch.float32], name)


# ---------------------------------------------------------------------------
# NaN propagation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, causal):
    q, k, v = make_qkv((1, 2, 9, 12, 32), torch.float32, seed=51, requires_grad=True)
    with torch.no_grad():
        q[0, 1, 4, 3] = float("nan")
    out = run(backend, q, k, v, causal=causal)
    nan_rows = torch.isnan(out).any(-1)
    expected = torch.zeros_like(nan_rows)
    expected[0, 1, 4] = True
    assert torch.equal(nan_rows, expected)
    assert torch.isnan(out[0, 1, 4]).all()
    out.backward(torch.ones_like(out))
    assert torch.isnan(q.grad[0, 1, 4]).all()
    assert torch.isfinite(q.grad[0, 0]).all()
    # A NaN key is seen by every query of a non-causal attention.
    k2 = k.detach().clone()
    k2[0, 0, 2, 0] = float("nan")
    out = run(backend, q.detach(), k2, v.detach())
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1, :4]).all()


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def _bad_cases():
    f32 = torch.float32
    q = torch.randn(1, 2, 5, 32)
    k = torch.randn(1, 2, 7, 32)
    return [
        ("head-dim mismatch", ValueError, (q, torch.randn(1, 2, 7, 64), k), {}),
        ("head-dim mismatch", ValueError, (q, k, torch.randn(1, 2, 7, 16)), {}),
        ("batch mismatch", ValueError, (q, torch.randn(2, 2, 7, 32), torch.randn(2, 2, 7, 32)), {}),
        ("head-count mismatch", ValueError, (q, torch.randn(1, 3, 7, 32), torch.randn(1, 3, 7, 32)), {}),
        ("head-count mismatch", ValueError,
         (torch.randn(1, 5, 2, 32), torch.randn(1, 7, 3, 32), torch.randn(1, 7, 3, 32)), {"layout": "bshd"}),
        ("q must have dtype", TypeError, (q.to(torch.int32), k.to(torch.int32), k.to(torch.int32)), {}),
        ("q must have dtype", TypeError, (q.to(torch.complex64), k.to(torch.complex64), k.to(torch.complex64)), {}),
        ("k must have q's dtype", TypeError, (q.half(), k, k.half()), {}),
        ("v must have q's dtype", TypeError, (q, k, k.double()), {}),
        ("q must be a 4-D tensor", ValueError, (q[0], k[0], k[0]), {}),
        ("k must be a 4-D tensor", ValueError, (q, k[0], k), {}),
        ("q must be a torch.Tensor", TypeError, (q.tolist(), k, k), {}),
        ("k must be on q's device", ValueError, (q, k.to("meta"), k), {}),
        ("same sequence length", ValueError, (q, k, torch.randn(1, 2, 6, 32)), {}),
        ("at least one key", ValueError, (q, k[:, :, :0], k[:, :, :0]), {}),
        ("scale must be > 0", ValueError, (q, k, k), {"scale": 0.0}),
        ("scale must be > 0", ValueError, (q, k, k), {"scale": -1.0}),
        ("scale must be finite", ValueError, (q, k, k), {"scale": float("nan")}),
        ("scale must be finite", ValueError, (q, k, k), {"scale": float("inf")}),
        ("scale must be a real number", TypeError, (q, k, k), {"scale": True}),
        ("scale must be a real number", TypeError, (q, k, k), {"scale": torch.tensor(0.5)}),
        ("causal must be a bool", TypeError, (q, k, k), {"causal": 1}),
        ("layout must be one of", ValueError, (q, k, k), {"layout": "bsd"}),
        ("layout must be one of", ValueError, (q.to(f32), k, k), {"layout": None}),
    ]


@pytest.mark.parametrize("message,exc,args,kwargs", _bad_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input(message, exc, args, kwargs):
    with pytest.raises(exc, match=message):
        pygen.attention(*args, **kwargs)
    with pytest.raises(exc, match=message):
        A.attention_choice(*args, **kwargs)


def test_unsupported_head_dim_falls_back_with_one_warning(cache_dir):
    q, k, v = make_qkv((1, 2, 5, 6, 48), torch.float32, seed=61)
    A._warned_head_dims.discard(48)
    with pytest.warns(RuntimeWarning, match="head dim 48.*attention_reference"):
        out = pygen.attention(q, k, v)
    assert A.last_choice()[0] == "torch"
    assert_rows_close(out, reference64(q, k, v, False), FWD_RTOL[torch.float32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pygen.attention(q, k, v, causal=True)  # no second warning for head dim 48


@pytest.mark.parametrize("backend,d", [("triton", 8), ("triton", 264), ("cpu", 48)])
def test_forced_kernel_rejects_unsupported_head_dim(backend, d):
    q, k, v = make_qkv((1, 1, 3, 3, d), torch.float32, seed=62)
    with pytest.raises(ValueError, match=f"head dim {d} is not supported"):
        with pygen.use_backend(backend):
            pygen.attention(q, k, v)


def test_forced_triton_rejects_float64():
    q, k, v = make_qkv((1, 1, 3, 3, 32), torch.float64, seed=63)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        with pygen.use_backend("triton"):
            pygen.attention(q, k, v)


def test_cuda_choice_float64_backward_stays_off_triton(monkeypatch):
    # A forced "cuda" forward takes fp64; its backward must not go to the Triton kernel (fp16/bf16/fp32
    # only) even where Triton runs on CUDA. Simulated on the CPU: "cuda"'s ops are the torch.ops.pygen ones.
    monkeypatch.setattr(A, "_triton_on_cuda", lambda: True)
    q, k, v = make_qkv((1, 2, 5, 7, 32), torch.float64, seed=64, requires_grad=True)
    out = A._AttentionFunction.apply(q, k, v, 0.3, True, "cuda")
    assert_fwd_bwd_match(out, q, k, v, True, torch.float64, scale=0.3)


def test_triton_op_rejects_bad_head_dim():
    fwd, _ = _ops("triton")
    for d in (8, 264):
        q = torch.randn(1, 1, 3, d)
        with pytest.raises(ValueError, match="head dim"):
            fwd(q, q, q, 0.1, False)


@pytest.mark.skipif(not (TRITON_ON_CPU or (HAS_TRITON and torch.cuda.is_available())),
                    reason="the Triton kernels need TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("d", [16, 48, 72])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_untuned_head_dims(d, causal):
    """Head dims outside the tuned list (DiT-XL's 72, 48, the minimum 16): padded to a power of two."""
    dev = "cpu" if TRITON_ON_CPU else "cuda"
    q, k, v = (t.detach().to(dev).requires_grad_() for t in make_qkv((2, 3, 19, 13, d), torch.float32, seed=d))
    with pygen.use_backend("triton"):
        out = pygen.attention(q, k, v, causal=causal)
    assert_fwd_bwd_match(out, q, k, v, causal, torch.float32)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton and TRITON_INTERPRET=1")
def test_triton_autotune_key_is_the_real_head_dim(monkeypatch):
    """80, 96 and 128 (all padded to 128 lanes) get one tuned entry each, forward and backward.

    The interpreter has a single config, so the autotuner never builds its key; here each kernel gets two
    configs and a fake benchmark (no timing), so every launch goes through the key lookup and tuning."""
    from pygen.kernels import attention as tk

    kernels = (tk._attn_fwd_kernel, tk._attn_bwd_dkdv_kernel, tk._attn_bwd_dq_kernel)
    configs = [tk._cfg(16, 16, 1, 1), tk._cfg(16, 32, 1, 1)]
    for kernel in kernels:
        assert "D" in kernel.keys and set(kernel.keys) <= set(kernel.arg_names), kernel.keys
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", lambda fn, quantiles: [1.0, 1.0, 1.0])
    dims = (80, 96, 128)
    for d in dims:
        q, k, v = make_qkv((1, 1, 5, 7, d), torch.float32, seed=d)
        out, lse = tk.attention_fwd(q, k, v, 0.2, False)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(d))
        grads = tk.attention_bwd(grad_out, q, k, v, out, lse, 0.2, False)
        ref, *ref_grads = reference64(q, k, v, False, scale=0.2, grad_out=grad_out)
        assert_rows_close(out, ref, FWD_RTOL[torch.float32])
        for got, want, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
            assert_grad_close(got, want, GRAD_RTOL[torch.float32], what)
    for kernel in kernels:
        assert len(kernel.cache) == len(dims), (kernel.base_fn.__name__, list(kernel.cache))
        assert sorted(key[kernel.keys.index("D")] for key in kernel.cache) == list(dims)


# ---------------------------------------------------------------------------
# the dispatcher
# ---------------------------------------------------------------------------
def _fake_timer(times, calls):
    def time_candidate(name, q, k, v, scale, causal, grad):
        calls.append((name, grad))
        return times.get(name)

    return time_candidate


def test_dispatcher_measures_once_and_persists(cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(A, "_candidates", lambda *a: ["cpu", "torch", "sdpa_math"])
    monkeypatch.setattr(A, "_kernel_available", lambda *a: True)
    monkeypatch.setattr(A, "_time_candidate", _fake_timer({"cpu": None, "torch": 2e-3, "sdpa_math": 1e-3}, calls))
    q, k, v = make_qkv((1, 2, 5, 6, 32), torch.float32, seed=71)
    out = pygen.attention(q, k, v)
    name, key = A.last_choice()
    assert name == "sdpa_math" and len(calls) == 3  # "cpu" failed (None), math was fastest
    assert key == (q.device, torch.float32, "bhsd", 1, 2, 5, 6, 32, False, False)
    assert_rows_close(out, reference64(q, k, v, False), FWD_RTOL[torch.float32])
    pygen.attention(q, k, v)
    assert len(calls) == 3  # cache hit: no re-measurement
    assert A.cached_choices()[key] == "sdpa_math"
    # Gradient needed -> another key, measured fwd+bwd.
    pygen.attention(q.requires_grad_(), k, v)
    assert len(calls) == 6 and calls[-1][1] is True
    # Persisted: a fresh process (cleared memory) reads the file and does not measure.
    data = json.loads((cache_dir / "attention.json").read_text())
    assert "sdpa_math" in data["choices"].values() and data["versions"]["torch"] == torch.__version__
    A.clear_cache()
    with torch.no_grad():
        pygen.attention(q, k, v)
    assert len(calls) == 6 and A.last_choice()[0] == "sdpa_math"
    # clear_cache(persistent=True) deletes the file: measured again.
    A.clear_cache(persistent=True)
    assert not (cache_dir / "attention.json").exists()
    with torch.no_grad():
        pygen.attention(q, k, v)
    assert len(calls) == 9


def test_dispatcher_measurement_leaves_global_rng_alone(cache_dir, monkeypatch):
    # Measuring fwd+bwd draws a random grad_out; the caller's RNG stream must not move, or a training
    # run would depend on whether the choice was already cached.
    monkeypatch.setattr(A, "_candidates", lambda *a: ["torch", "sdpa_math"])
    q, k, v = make_qkv((1, 1, 4, 5, 32), torch.float32, seed=75, requires_grad=True)
    state = torch.get_rng_state()
    pygen.attention(q, k, v)
    assert set(A.last_timings) == {"torch", "sdpa_math"}
    assert torch.equal(torch.get_rng_state(), state)


def test_dispatcher_real_measurement(cache_dir, monkeypatch):
    """The measuring code path itself: candidates are timed, a failing one is skipped."""
    names = ["sdpa_cudnn", "torch"] + (["triton"] if TRITON_ON_CPU else [])
    monkeypatch.setattr(A, "_candidates", lambda *a: names)
    q, k, v = make_qkv((1, 1, 4, 5, 32), torch.float32, seed=72)
    choice = A.attention_choice(q, k, v)
    assert A.last_timings["sdpa_cudnn"] is None  # cuDNN does not run CPU tensors
    assert all(A.last_timings[n] > 0 for n in names[1:])
    assert choice in names[1:]
    out = pygen.attention(q, k, v)
    assert A.last_choice()[0] == choice
    assert_rows_close(out, reference64(q, k, v, False), FWD_RTOL[torch.float32])


def test_dispatcher_measures_backward_under_no_grad(cache_dir, monkeypatch):
    """attention_choice(requires_grad=True) inside torch.no_grad still times fwd+bwd."""
    monkeypatch.setattr(A, "_candidates", lambda *a: ["torch", "sdpa_math"])
    q, k, v = make_qkv((1, 1, 4, 5, 32), torch.float32, seed=78)
    with torch.no_grad():
        A.attention_choice(q, k, v, requires_grad=True)
    assert all(t is not None and t > 0 for t in A.last_timings.values())


def test_dispatcher_cpu_default(cache_dir):
    """Auto dispatch on CPU tensors: pygen 'cpu' (when built) or 'torch', measured once."""
    q, k, v = make_qkv((1, 2, 8, 8, 64), torch.float32, seed=73)
    choice = A.attention_choice(q, k, v)
    assert choice in (["cpu", "torch"] if HAS_CPU_KERNEL else ["torch"])
    out = pygen.attention(q, k, v)
    assert A.last_choice()[0] == choice
    assert_rows_close(out, reference64(q, k, v, False), FWD_RTOL[torch.float32])


def test_dispatcher_unwritable_cache_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PYGEN_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.delenv("PYGEN_ATTENTION", raising=False)
    monkeypatch.setattr(A, "_candidates", lambda *a: ["torch", "sdpa_math"])
    A.clear_cache()
    try:
        q, k, v = make_qkv((1, 1, 3, 4, 32), torch.float32, seed=74)
        pygen.attention(q, k, v)  # measures and fails to persist, silently
        assert A.last_choice()[0] in ("torch", "sdpa_math")
    finally:
        A.clear_cache()


def test_dispatcher_corrupt_cache_file(cache_dir, monkeypatch):
    (cache_dir / "attention.json").write_text("{ not json")
    monkeypatch.setattr(A, "_candidates", lambda *a: ["torch", "sdpa_math"])
    q, k, v = make_qkv((1, 1, 3, 4, 32), torch.float32, seed=75)
    pygen.attention(q, k, v)
    assert json.loads((cache_dir / "attention.json").read_text())["choices"]


@pytest.mark.parametrize("where", ["compile", "capture"])
def test_dispatcher_never_measures_while_tracing_or_capturing(cache_dir, monkeypatch, where):
    calls = []
    monkeypatch.setattr(A, "_candidates", lambda *a: ["sdpa_math", "torch"])
    monkeypatch.setattr(A, "_time_candidate", _fake_timer({"sdpa_math": 1e-3, "torch": 2e-3}, calls))
    if where == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    q, k, v = make_qkv((1, 1, 3, 4, 32), torch.float32, seed=76)
    key = (q.device, torch.float32, "bhsd", 1, 1, 3, 4, 32, False, False)
    assert A._select(q, k, v, 0.1, False, "bhsd", False) == ("torch", key)  # static default
    assert calls == [] and key not in A.cached_choices()
    A._cache[key] = "sdpa_math"  # an earlier eager call measured it: used while tracing
    assert A._select(q, k, v, 0.1, False, "bhsd", False) == ("sdpa_math", key)
    assert calls == []


def test_torch_compile(cache_dir):
    q, k, v = make_qkv((1, 2, 5, 7, 32), torch.float32, seed=77)
    fn = torch.compile(lambda q, k, v: pygen.attention(q, k, v, causal=True), backend="eager")
    assert_rows_close(fn(q, k, v), reference64(q, k, v, True), FWD_RTOL[torch.float32])


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pygen._C has no CPU attention kernel")
def test_torch_compile_compiled_op_non_unit_last_stride(cache_dir):
    # Eager copies a q/k/v whose last dim is strided before the compiled op (which takes unit last
    # strides only); the torch.compile branch must too.
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
               for t in make_qkv((1, 2, 5, 7, 32), torch.float32, seed=77))
    assert q.stride(-1) != 1
    f = torch.compile(lambda q, k, v: pygen.attention(q, k, v, causal=True), backend="eager")
    with pygen.use_backend("cpu"):
        out = f(q, k, v)
    assert_fwd_bwd_match(out, q, k, v, True, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_override(monkeypatch, backend):
    monkeypatch.setenv("PYGEN_ATTENTION", backend)
    q, k, v = make_qkv((1, 1, 4, 4, 32), torch.float32, seed=81)
    out = pygen.attention(q, k, v)
    assert A.last_choice() == (backend, None)
    assert_rows_close(out, reference64(q, k, v, False), FWD_RTOL[torch.float32])


def test_env_override_sdpa_and_errors(monkeypatch):
    q, k, v = make_qkv((1, 1, 4, 4, 32), torch.float32, seed=82)
    monkeypatch.setenv("PYGEN_ATTENTION", "sdpa_math")
    out = pygen.attention(q, k, v, causal=True)
    assert A.last_choice()[0] == "sdpa_math"
    assert_rows_close(out, reference64(q, k, v, True), FWD_RTOL[torch.float32])
    monkeypatch.setenv("PYGEN_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="PYGEN_ATTENTION must be one of"):
        pygen.attention(q, k, v)
    monkeypatch.setenv("PYGEN_ATTENTION", "cuda")
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        pygen.attention(q, k, v)
    # use_backend beats the environment.
    monkeypatch.setenv("PYGEN_ATTENTION", "sdpa_math")
    with pygen.use_backend("torch"):
        pygen.attention(q, k, v)
    assert A.last_choice()[0] == "torch"


def test_empty_inputs():
    q, k, v = torch.randn(0, 2, 3, 32), torch.randn(0, 2, 4, 32), torch.randn(0, 2, 4, 32)
    assert pygen.attention(q, k, v).shape == (0, 2, 3, 32)
    q, k = torch.randn(1, 2, 0, 32), torch.randn(1, 2, 4, 32)
    assert pygen.attention(q, k, k).shape == (1, 2, 0, 32)
    if TRITON_ON_CPU:
        with pygen.use_backend("triton"):
            assert pygen.attention(q, k, k).shape == (1, 2, 0, 32)


# ---------------------------------------------------------------------------
# GPU (marked cuda; skipped without a device)
# ---------------------------------------------------------------------------
def _gpu_kernels():
    names = []
    if A._kernel_available("triton", torch.device("cuda"), torch.float16) if torch.cuda.is_available() else False:
        names.append("triton")
    if torch.cuda.is_available() and A._kernel_available("cuda", torch.device("cuda"), torch.float16):
        names.append("cuda")
    return names


def _sdpa_math_fp32(q, k, v, causal, scale=None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, scale=scale)


GPU_CASES = [(2, 4, 1, 77), (1, 2, 129, 257), (2, 4, 1000, 1000), (1, 2, 4096, 4096), (1, 1, 4096, 333)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", A.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_kernels_vs_sdpa_math(case, d, dtype, causal):
    kernels = _gpu_kernels()
    if not kernels:
        pytest.skip("no pygen GPU attention kernel available")
    B, H, sq, sk = case
    g = torch.Generator(device="cuda").manual_seed(sq * 31 + d)
    q = torch.randn(B, H, sq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, H, sk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, H, sk, d, device="cuda", generator=g).to(dtype)
    ref = _sdpa_math_fp32(q, k, v, causal)
    for name in kernels:
        out = run(name, q, k, v, causal=causal)
        assert_rows_close(out, ref, 2 * FWD_RTOL[dtype], what=f"{name} out")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", A.SUPPORTED_HEAD_DIMS)
def test_gpu_backward_vs_sdpa_math(d, dtype, causal):
    kernels = _gpu_kernels()
    if not kernels:
        pytest.skip("no pygen GPU attention kernel available")
    g = torch.Generator(device="cuda").manual_seed(d)
    shape_q, shape_k = (2, 3, 300, d), (2, 3, 257, d)
    q0 = torch.randn(shape_q, device="cuda", generator=g).to(dtype)
    k0 = torch.randn(shape_k, device="cuda", generator=g).to(dtype)
    v0 = torch.randn(shape_k, device="cuda", generator=g).to(dtype)
    go = torch.randn(shape_q, device="cuda", generator=g).to(dtype)
    qr, kr, vr = (t.float().requires_grad_() for t in (q0, k0, v0))
    _sdpa_math_fp32(qr, kr, vr, causal).backward(go.float())
    for name in kernels:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        run(name, q, k, v, causal=causal).backward(go)
        for what, a, e in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            assert_grad_close(a, e, 2 * GRAD_RTOL[dtype], f"{name} {what}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_fp32_and_bshd(name):
    if name not in _gpu_kernels():
        pytest.skip(f"pygen {name} attention kernel not available")
    if name == "cuda" and not A._kernel_available("cuda", torch.device("cuda"), torch.float32):
        pytest.skip("the CUDA kernel takes fp16/bf16")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, s, 4, 64, device="cuda", generator=g) for s in (513, 200, 200))
    for causal in (False, True):
        ref = _sdpa_math_fp32(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)
        try:
            out = run(name, q, k, v, causal=causal, layout="bshd")
        except TypeError:
            pytest.skip(f"{name} does not take fp32")
        assert_rows_close(out, ref, FWD_RTOL[torch.float32], what=f"{name} fp32 bshd")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_dispatcher_never_slower_choice(cache_dir):
    """The measured choice is one of the candidates and its output is right; repeated calls hit the cache."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
    choice = A.attention_choice(q, k, v)
    assert choice in A._candidates(q.device, q.dtype, 1024, 1024, False, q.shape[3])
    timings = {n: t for n, t in A.last_timings.items() if t is not None}
    assert timings[choice] == min(timings.values())
    out = pygen.attention(q, k, v)
    assert A.last_choice()[0] == choice
    assert_rows_close(out, _sdpa_math_fp32(q, k, v, False), 2 * FWD_RTOL[torch.float16])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_nan_propagates(cache_dir):
    """A NaN in a query row gives a NaN output row on the pygen kernels and on the dispatcher's choice."""
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
    q[0, 1, 17, 5] = float("nan")
    for name in _gpu_kernels():
        out = run(name, q, k, v)
        assert torch.isnan(out[0, 1, 17]).all() and torch.isfinite(out[0, 0]).all(), name
    out = pygen.attention(q, k, v)
    assert torch.isnan(out[0, 1, 17]).all(), f"dispatcher choice {A.last_choice()[0]} hides a NaN query row"
