"""Tests of the compiled attention kernels: torch.ops.pygen.attention_fwd / attention_bwd.

C++ CPU (csrc/cpu/attention.cpp) and CUDA (csrc/cuda/attention.cu) kernels against a plain
fp64 PyTorch reference written here (softmax(scale·q·kᵀ + causal mask)·v, lse = logsumexp,
gradients by fp64 autograd), on fresh random inputs: odd lengths, Sq != Sk, every supported
head dim, causal (top-left aligned) and not, (B, H, S, D) and (B, S, H, D)-as-transposed
layouts, every storage dtype. fp16/bf16 are compared with the reference computed from the same
rounded inputs. Also: NaN propagation, determinism across thread counts, argument checks and
torch.library.opcheck. CUDA tests are marked and skip without a GPU and the CUDA kernels.
(The public pygen.attention API, its Triton kernels and dispatcher: tests/test_attention.py.)
"""
import math

import pytest
import torch

import pygen

HAS_CPU_EXT = pygen.backends()["cpu"] == "available"
HAS_CUDA_EXT = pygen.backends()["cuda"] == "available"
needs_cpu = pytest.mark.skipif(not HAS_CPU_EXT, reason="pygen._C not built")

HEAD_DIMS = [32, 64, 80, 96, 128, 256]
LENGTHS = [(7, 13), (1, 9), (33, 17), (65, 65)]  # (Sq, Sk)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rtol, atol) of out and of the gradients against the fp64 reference on the same (rounded) inputs.
FWD_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}
# The backward recomputes P from the fp32 lse (so fp64 is good to ~1e-7 relative) and
# uses delta = rowsum(dO·O) of the rounded O.
BWD_TOL = {
    torch.float64: (1e-5, 1e-5),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
LSE_TOL = dict(rtol=1e-5, atol=1e-5)


def make_qkv(B, H, Sq, Sk, D, dtype, layout="bhsd", device="cpu", seed=0):
    """Random q (B, H, Sq, D), k and v (B, H, Sk, D) in ``layout`` memory order."""
    g = torch.Generator().manual_seed(seed)

    def one(S):
        if layout == "bhsd":
            t = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
        else:  # (B, S, H, D) memory, viewed as (B, H, S, D)
            t = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        return t.to(dtype=dtype, device=device)

    return one(Sq), one(Sk), one(Sk)


def causal_mask(Sq, Sk, device):
    """True where key j is visible to query i (top-left aligned: j <= i)."""
    return torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril()


def reference(q, k, v, scale, causal, ref_dtype=torch.float64):
    """(out, lse) in ref_dtype: softmax(scale·q·kᵀ + mask)·v and logsumexp."""
    q, k, v = (t.to(ref_dtype) for t in (q, k, v))
    s = scale * (q @ k.transpose(-1, -2))
    if causal:
        s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def reference_grads(q, k, v, grad_out, scale, causal):
    """(dq, dk, dv) in fp64 by autograd through the reference."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    out, _ = reference(*leaves, scale, causal)
    out.backward(grad_out.to(torch.float64))
    return [t.grad for t in leaves]


def check_fwd(q, k, v, scale, causal, ref_dtype=torch.float64):
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, scale, causal)
    ref_out, ref_lse = reference(q, k, v, scale, causal, ref_dtype)
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride() == torch.empty_like(q).stride()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    rtol, atol = FWD_TOL[q.dtype]
    torch.testing.assert_close(out.to(ref_dtype), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.to(ref_dtype), ref_lse, **LSE_TOL)
    return out, lse


def check_bwd(q, k, v, scale, causal, seed=1):
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, scale, causal)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype=q.dtype, device=q.device)
    dq, dk, dv = torch.ops.pygen.attention_bwd(grad_out, q, k, v, out, lse, scale, causal)
    for got, like in ((dq, q), (dk, k), (dv, v)):
        assert got.dtype == like.dtype and got.shape == like.shape and got.stride() == torch.empty_like(like).stride()
    rtol, atol = BWD_TOL[q.dtype]
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), reference_grads(q, k, v, grad_out, scale, causal)):
        torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return dq, dk, dv


# ---------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq, Sk", LENGTHS)
def test_cpu_forward_lengths(Sq, Sk, causal, layout, dtype):
    q, k, v = make_qkv(2, 3, Sq, Sk, 64, dtype, layout, seed=Sq * 100 + Sk)
    check_fwd(q, k, v, 64**-0.5, causal)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_cpu_forward_head_dims(D, causal, dtype):
    q, k, v = make_qkv(1, 2, 33, 70, D, dtype, "bshd", seed=D)
    check_fwd(q, k, v, D**-0.5, causal)


@needs_cpu
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_forward_many_blocks_and_scale(causal):
    # Several query and key blocks (64 each), Sq > Sk and Sq < Sk, a scale other than D**-0.5.
    for Sq, Sk in ((130, 200), (200, 130)):
        q, k, v = make_qkv(1, 2, Sq, Sk, 32, torch.float32, seed=Sq)
        check_fwd(q, k, v, 0.3, causal)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq, Sk", LENGTHS)
def test_cpu_backward_lengths(Sq, Sk, causal, layout, dtype):
    q, k, v = make_qkv(2, 2, Sq, Sk, 32, dtype, layout, seed=Sq * 100 + Sk + 7)
    check_bwd(q, k, v, 32**-0.5, causal)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_cpu_backward_head_dims(D, causal, dtype):
    q, k, v = make_qkv(1, 2, 70, 33, D, dtype, "bshd", seed=D + 1)
    check_bwd(q, k, v, D**-0.5, causal)


@needs_cpu
def test_cpu_backward_many_blocks():
    # Causal key blocks that no query sees (Sk > Sq) must get zero dK, dV.
    q, k, v = make_qkv(1, 2, 70, 200, 32, torch.float32, seed=3)
    dq, dk, dv = check_bwd(q, k, v, 0.2, True)
    assert torch.all(dk[:, :, 70:] == 0) and torch.all(dv[:, :, 70:] == 0)
    q, k, v = make_qkv(1, 1, 200, 130, 32, torch.float32, seed=4)
    check_bwd(q, k, v, 0.2, False)


@needs_cpu
def test_cpu_causal_matches_sdpa():
    # Top-left alignment as torch's scaled_dot_product_attention(is_causal=True), Sq != Sk.
    for Sq, Sk in ((7, 13), (13, 7)):
        q, k, v = make_qkv(1, 2, Sq, Sk, 32, torch.float64, seed=Sq)
        out, _ = torch.ops.pygen.attention_fwd(q, k, v, 32**-0.5, True)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@needs_cpu
def test_cpu_non_dense_strides():
    # Slices of bigger tensors (padding between heads/rows): read through the strides.
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 3, 40, 80, generator=g)
    q = big[:, :, 1:20, 8:72]
    k = big[:, :, 3:40:2, :64]
    v = big[:, :, 2:39:2, 16:]
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_fwd(q, k, v, 0.125, True)
    check_bwd(q, k, v, 0.125, False)


@needs_cpu
def test_cpu_nan_propagates():
    q, k, v = make_qkv(1, 3, 9, 11, 32, torch.float32, seed=6)
    q[0, 0, 4, 5] = float("nan")  # one query row
    k[0, 1, 0, 7] = float("nan")  # key 0: visible to every query, causal or not
    v[0, 2, 0, 3] = float("nan")  # one value column of key 0
    for causal in (False, True):
        out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.2, causal)
        assert out[0, 0, 4].isnan().all() and lse[0, 0, 4].isnan()
        assert not out[0, 0, :4].isnan().any() and not out[0, 0, 5:].isnan().any()
        assert out[0, 1].isnan().all() and lse[0, 1].isnan().all()
        assert out[0, 2, :, 3].isnan().all() and not out[0, 2, :, :3].isnan().any()
        grad_out = torch.ones_like(out)
        dq, dk, dv = torch.ops.pygen.attention_bwd(grad_out, q, k, v, out, lse, 0.2, causal)
        assert dq[0, 0, 4].isnan().all() and dk[0, 0, 0].isnan().any() and dv[0, 0, 0].isnan().any()
        assert not dq[0, 0, :4].isnan().any()
        assert dq[0, 1].isnan().any(dim=-1).all()
    # A NaN in grad_out reaches dq of that row and dv of the keys it sees. (Within the
    # 64-key tile of the diagonal, a masked 0 times NaN may spread it further, as in the
    # eager masked-softmax path; key tiles the row never visits stay clean.)
    q, k, v = make_qkv(1, 1, 70, 70, 32, torch.float32, seed=7)
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.2, True)
    grad_out = torch.ones_like(out)
    grad_out[0, 0, 2, 0] = float("nan")
    dq, dk, dv = torch.ops.pygen.attention_bwd(grad_out, q, k, v, out, lse, 0.2, True)
    assert dq[0, 0, 2].isnan().all() and not dq[0, 0, 3:].isnan().any()
    assert dv[0, 0, :3, 0].isnan().all() and not dv[0, 0, 64:].isnan().any() and not dk[0, 0, 64:].isnan().any()


@needs_cpu
def test_cpu_infinite_scores_match_reference():
    # -inf scores (from inf inputs) get probability 0 as in the reference, not NaN.
    q, k, v = make_qkv(1, 1, 5, 70, 32, torch.float64, seed=8)
    q[0, 0, :, 0] = 1.0
    k[0, 0, 3, 0] = float("-inf")  # score -inf for every query against key 3 (and key 3 in tile 0)
    k[0, 0, :64, 0] = float("-inf")  # a whole first key tile at -inf for the non-causal rows
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.5, False)
    ref_out, ref_lse = reference(q, k, v, 0.5, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


@needs_cpu
def test_cpu_deterministic_across_thread_counts():
    q, k, v = make_qkv(2, 2, 150, 140, 64, torch.float32, seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.125, True)
            grads = torch.ops.pygen.attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.125, True)
            results.append((out, lse, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_cpu
def test_cpu_bad_arguments():
    q, k, v = make_qkv(1, 2, 5, 6, 32, torch.float32)
    fwd = torch.ops.pygen.attention_fwd
    with pytest.raises(RuntimeError, match="head dims"):
        fwd(q, k[..., :16], v, 1.0, False)
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(q, k.double(), v, 1.0, False)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        fwd(q.int(), k.int(), v.int(), 1.0, False)
    with pytest.raises(RuntimeError, match="batch"):
        fwd(q, torch.cat([k, k]), torch.cat([v, v]), 1.0, False)
    with pytest.raises(RuntimeError, match="head counts"):
        fwd(q, k[:, :1], v[:, :1], 1.0, False)
    with pytest.raises(RuntimeError, match="same length"):
        fwd(q, k, v[:, :, :3], 1.0, False)
    with pytest.raises(RuntimeError, match="at least one key"):
        fwd(q, k[:, :, :0], v[:, :, :0], 1.0, False)
    with pytest.raises(RuntimeError, match="unit stride"):
        fwd(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, 1.0, False)
    with pytest.raises(RuntimeError, match="4-D"):
        fwd(q[0], k[0], v[0], 1.0, False)
    out, lse = fwd(q, k, v, 1.0, False)
    bwd = torch.ops.pygen.attention_bwd
    with pytest.raises(RuntimeError, match="lse"):
        bwd(out, q, k, v, out, lse.double(), 1.0, False)
    with pytest.raises(RuntimeError, match="lse"):
        bwd(out, q, k, v, out, lse[:, :, :2], 1.0, False)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(out[:, :, :2], q, k, v, out, lse, 1.0, False)


@needs_cpu
def test_cpu_empty_queries():
    q, k, v = make_qkv(2, 2, 0, 5, 32, torch.float32)
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 1.0, False)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    dq, dk, dv = torch.ops.pygen.attention_bwd(out, q, k, v, out, lse, 1.0, False)
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


def _has_fake(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pygen::{name}", "Meta")


def _opcheck_utils(name):
    # Without a fake (registered by pygen/ops/attention.py) only the eager checks apply.
    if _has_fake(name):
        return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return ("test_schema", "test_autograd_registration")


@needs_cpu
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention_fwd(causal):
    q, k, v = make_qkv(1, 2, 7, 13, 32, torch.float32, "bshd")
    torch.library.opcheck(torch.ops.pygen.attention_fwd.default, (q, k, v, 0.25, causal),
                          test_utils=_opcheck_utils("attention_fwd"))


@needs_cpu
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention_bwd(causal):
    q, k, v = make_qkv(1, 2, 7, 13, 32, torch.float32)
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.25, causal)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pygen.attention_bwd.default, (grad_out, q, k, v, out, lse, 0.25, causal),
                          test_utils=_opcheck_utils("attention_bwd"))


@needs_cpu
@pytest.mark.skipif(not (_has_fake("attention_fwd") and _has_fake("attention_bwd")),
                    reason="fake kernels not registered (pygen/ops/attention.py)")
def test_fakes_match_cpu_outputs():
    q, k, v = make_qkv(2, 2, 7, 13, 32, torch.bfloat16, "bshd")
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.25, True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        f_out, f_lse = torch.ops.pygen.attention_fwd(fq, fk, fv, 0.25, True)
        f_grads = torch.ops.pygen.attention_bwd(mode.from_tensor(out), fq, fk, fv, mode.from_tensor(out),
                                                mode.from_tensor(lse), 0.25, True)
    grads = torch.ops.pygen.attention_bwd(out, q, k, v, out, lse, 0.25, True)
    for real, fake in zip((out, lse, *grads), (f_out, f_lse, *f_grads)):
        assert real.shape == fake.shape and real.dtype == fake.dtype and real.stride() == fake.stride()


# ---------------------------------------------------------------------------
# CUDA (run on a GPU session; compared with an fp32 reference from the same rounded inputs)
# ---------------------------------------------------------------------------
CUDA_FWD_TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float32: (1e-5, 1e-5),
                torch.float64: (1e-10, 1e-10)}
CUDA_LENGTHS = [(1, 1), (1, 77), (7, 13), (33, 17), (127, 257), (1024, 1024), (300, 1000), (1000, 300)]


def _cuda_check_fwd(q, k, v, scale, causal):
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, scale, causal)
    ref_out, ref_lse = reference(q, k, v, scale, causal, torch.float32)
    assert out.is_cuda and out.dtype == q.dtype and out.shape == q.shape
    assert out.stride() == torch.empty_like(q).stride()
    rtol, atol = CUDA_FWD_TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    return out, lse


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Sq, Sk", CUDA_LENGTHS)
def test_cuda_forward(Sq, Sk, D, causal, dtype):
    B, H = (2, 3) if Sq * Sk <= 300 * 1000 else (1, 2)
    q, k, v = make_qkv(B, H, Sq, Sk, D, dtype, "bshd" if D % 64 else "bhsd", device="cuda", seed=Sq + Sk + D)
    _cuda_check_fwd(q, k, v, D**-0.5, causal)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_layouts_and_fp32(layout, causal, dtype):
    q, k, v = make_qkv(2, 4, 200, 333, 64, dtype, layout, device="cuda", seed=11)
    _cuda_check_fwd(q, k, v, 0.11, causal)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_fallback_paths(causal, dtype):
    # Head dims without a tensor-core instantiation, and rows that are not 16-byte aligned,
    # take the simple kernel; fp64 too.
    for D in (16, 48, 200):
        q, k, v = make_qkv(1, 2, 70, 90, D, dtype, device="cuda", seed=D)
        _cuda_check_fwd(q, k, v, D**-0.5, causal)
    g = torch.Generator().manual_seed(15)
    big = torch.randn(2, 3, 100, 72, generator=g).to(dtype=dtype, device="cuda")
    q, k, v = big[:, :, 1:70, 1:65], big[:, :, 2:99, 3:67], big[:, :, 1:98, 8:72]  # odd element offsets
    _cuda_check_fwd(q, k, v, 0.125, causal)
    q, k, v = make_qkv(1, 2, 70, 90, 64, torch.float64, device="cuda", seed=16)
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.125, causal)
    ref_out, ref_lse = reference(q, k, v, 0.125, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Sq, Sk", [(7, 13), (33, 17), (130, 257)])
def test_cuda_backward(Sq, Sk, D, causal, dtype):
    q, k, v = make_qkv(1, 2, Sq, Sk, D, dtype, "bshd", device="cuda", seed=Sq * Sk + D)
    check_bwd(q, k, v, D**-0.5, causal)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
def test_cuda_backward_deterministic_and_matches_cpu():
    q, k, v = make_qkv(2, 2, 150, 140, 64, torch.float32, device="cuda", seed=12)
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.125, True)
    g1 = torch.ops.pygen.attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.125, True)
    g2 = torch.ops.pygen.attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.125, True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    if HAS_CPU_EXT:
        cpu = torch.ops.pygen.attention_bwd(torch.ones_like(out).cpu(), q.cpu(), k.cpu(), v.cpu(), out.cpu(),
                                            lse.cpu(), 0.125, True)
        for a, b in zip(g1, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
def test_cuda_nan_propagates():
    q, k, v = make_qkv(1, 2, 70, 90, 64, torch.float16, device="cuda", seed=13)
    q[0, 0, 4, 5] = float("nan")
    v[0, 1, 0, 3] = float("nan")
    for causal in (False, True):
        out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.125, causal)
        assert out[0, 0, 4].isnan().all() and lse[0, 0, 4].isnan()
        assert not out[0, 0, 5:].isnan().any()
        assert out[0, 1, :, 3].isnan().all() and not out[0, 1, :, 4:].isnan().any()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EXT, reason="no CUDA device or CUDA kernels")
def test_cuda_opcheck():
    q, k, v = make_qkv(1, 2, 7, 13, 64, torch.float16, "bshd", device="cuda")
    torch.library.opcheck(torch.ops.pygen.attention_fwd.default, (q, k, v, 0.125, True),
                          test_utils=_opcheck_utils("attention_fwd"))
    out, lse = torch.ops.pygen.attention_fwd(q, k, v, 0.125, True)
    args = (torch.randn_like(out), q, k, v, out, lse, 0.125, True)
    torch.library.opcheck(torch.ops.pygen.attention_bwd.default, args,
                          test_utils=_opcheck_utils("attention_bwd"))


def test_reference_matches_sdpa():
    # The reference itself: SDPA's math (fp64), causal top-left, Sq != Sk.
    q, k, v = make_qkv(1, 2, 9, 5, 16, torch.float64, seed=14)
    for causal in (False, True):
        out, lse = reference(q, k, v, 0.3, causal)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        torch.testing.assert_close(out, want)
        s = 0.3 * q @ k.transpose(-1, -2)
        if causal:
            s = s.masked_fill(~causal_mask(9, 5, "cpu"), -math.inf)
        torch.testing.assert_close(lse, torch.logsumexp(s, -1))
