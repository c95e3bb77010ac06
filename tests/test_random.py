"""Tests of pygen.randn (op pygen::randn_fill_) and of Philox4x32-10 on every backend.

* Random123 known-answer vectors through the torch reference (pygen.ops.random.philox4x32_10)
  and the Triton device function (kernels.philox.philox4x32_10, via a test kernel).
* Element -> (counter, key) mapping and Box–Muller checked against an independent numpy
  computation; backends (torch, cpu, triton) agree for int and per-row seeds, odd sizes,
  every dtype, 64-bit seeds and streams.
* Statistics on ~1e6 cpu-backend samples: moments, KS test, independence across seeds,
  streams and neighbouring elements. No global RNG state is touched.
Triton runs under TRITON_INTERPRET=1 on the CPU (small sizes).
"""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

import pygen
from pygen.ops._common import to_signed64
from pygen.ops.random import philox4x32_10, randn_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OK = HAS_TRITON and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton and TRITON_INTERPRET=1 or CUDA")
needs_cpu = pytest.mark.skipif(pygen.backends()["cpu"] != "available", reason="pygen._C not built")

needs_cuda = pytest.mark.skipif(pygen.backends()["cuda"] != "available", reason="no CUDA device or CUDA kernels")
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=needs_cpu),
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda]),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def device_for(backend):
    return {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")


# Random123 known-answer vectors for Philox4x32-10: (c0, c1, c2, c3), (k0, k1) -> words
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


# ---------------------------------------------------------------------------
# Philox4x32-10 words
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("counter, key, words", KAT)
def test_philox_reference_known_answers(counter, key, words):
    args = [torch.tensor([v], dtype=torch.int64) for v in counter + key]
    out = philox4x32_10(*args)
    assert [int(w) for w in out] == list(words)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from pygen.kernels.philox import philox4x32_10 as triton_philox4x32_10

    @triton.jit
    def _philox_words_kernel(ctr_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[i, j] = word j of Philox4x32-10(ctr[i, :], key[i, :]) (int64 holding uint32)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        c0 = tl.load(ctr_ptr + 4 * i, mask=m, other=0).to(tl.uint32)
        c1 = tl.load(ctr_ptr + 4 * i + 1, mask=m, other=0).to(tl.uint32)
        c2 = tl.load(ctr_ptr + 4 * i + 2, mask=m, other=0).to(tl.uint32)
        c3 = tl.load(ctr_ptr + 4 * i + 3, mask=m, other=0).to(tl.uint32)
        k0 = tl.load(key_ptr + 2 * i, mask=m, other=0).to(tl.uint32)
        k1 = tl.load(key_ptr + 2 * i + 1, mask=m, other=0).to(tl.uint32)
        w0, w1, w2, w3 = triton_philox4x32_10(c0, c1, c2, c3, k0, k1)
        tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=m)


def triton_words(ctr, key):
    """ctr (n, 4), key (n, 2) int64 holding uint32 -> (n, 4) words from the Triton device function."""
    n = ctr.shape[0]
    ctr, key = ctr.to(TRITON_DEVICE).contiguous(), key.to(TRITON_DEVICE).contiguous()
    out = torch.full((n, 4), -1, dtype=torch.int64, device=TRITON_DEVICE)
    block = 64
    _philox_words_kernel[(triton.cdiv(n, block),)](ctr, key, out, n, BLOCK=block)
    return out.cpu()


@needs_triton
@pytest.mark.parametrize("counter, key, words", KAT)
def test_philox_triton_known_answers(counter, key, words):
    out = triton_words(torch.tensor([counter]), torch.tensor([key]))
    assert out[0].tolist() == list(words)


def _random_u32(n, gen):
    return torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)


@needs_triton
def test_philox_triton_matches_reference_random():
    gen = torch.Generator().manual_seed(123)
    n = 300
    ctr = torch.stack([_random_u32(n, gen) for _ in range(4)], 1)
    key = torch.stack([_random_u32(n, gen) for _ in range(2)], 1)
    # include the extremes
    ctr[0], key[0] = 0, 0
    ctr[1], key[1] = 2**32 - 1, 2**32 - 1
    ref = torch.stack(philox4x32_10(*ctr.unbind(1), *key.unbind(1)), 1)
    assert ((ref >= 0) & (ref < 2**32)).all()
    assert torch.equal(triton_words(ctr, key), ref)


# ---------------------------------------------------------------------------
# element -> normal mapping, checked independently of randn_reference
# ---------------------------------------------------------------------------
def numpy_normals(seed, stream, groups):
    """Normals of Philox groups ``groups`` (uint64 array) per philox.h, using only the KAT-checked
    Philox of the reference and numpy float32 Box–Muller."""
    seed, stream = seed % 2**64, stream % 2**64
    g = torch.tensor(groups.astype(np.int64), dtype=torch.int64)  # bits of the uint64 group index
    n = g.shape[0]
    lo, hi = g & 0xFFFFFFFF, (g >> 32) & 0xFFFFFFFF
    full = lambda v: torch.full((n,), v, dtype=torch.int64)  # noqa: E731
    words = philox4x32_10(lo, hi, full(stream & 0xFFFFFFFF), full(stream >> 32), full(seed & 0xFFFFFFFF),
                          full(seed >> 32))
    w = [x.numpy().astype(np.uint32) for x in words]
    u = [((x >> 9).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23) for x in w]
    two_pi = np.float32(2 * math.pi)
    r0 = np.sqrt(np.float32(-2.0) * np.log(u[0]))
    r1 = np.sqrt(np.float32(-2.0) * np.log(u[2]))
    z = np.stack([r0 * np.cos(two_pi * u[1]), r0 * np.sin(two_pi * u[1]),
                  r1 * np.cos(two_pi * u[3]), r1 * np.sin(two_pi * u[3])], axis=1)
    return torch.from_numpy(z.astype(np.float32).reshape(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_group_of_seed0_stream0_is_the_first_kat(backend):
    """randn((4,), 0, 0) is Box–Muller of the words 6627e8d5 e169c58d bc57ac4c 9b00dbd8."""
    w = np.array(KAT[0][2], dtype=np.uint32)
    u = ((w >> 9).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    r0, r1 = np.sqrt(-2.0 * np.log(u[0].astype(np.float64))), np.sqrt(-2.0 * np.log(u[2].astype(np.float64)))
    t0, t1 = 2 * math.pi * float(u[1]), 2 * math.pi * float(u[3])
    exp = torch.tensor([r0 * math.cos(t0), r0 * math.sin(t0), r1 * math.cos(t1), r1 * math.sin(t1)], dtype=torch.float32)
    with pygen.use_backend(backend):
        z = pygen.randn((4,), 0, 0, device=device_for(backend))
    torch.testing.assert_close(z.cpu(), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed, stream", [(0, 0), (2**64 - 1, 2**64 - 1), (2**63 + 12345, 2**63), (-7, 5),
                                          (0x299F31D0A4093822, 0x0370734413198A2E)])
def test_counter_and_key_mapping(backend, seed, stream):
    """Element e (int seed) uses counter (e//4 lo, hi, stream lo, hi), key (seed lo, hi), word e%4."""
    n = 1003
    with pygen.use_backend(backend):
        z = pygen.randn((n,), seed, stream, device=device_for(backend))
    exp = numpy_normals(seed, stream, np.arange((n + 3) // 4, dtype=np.uint64))[:n]
    torch.testing.assert_close(z.cpu(), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_mapping(backend):
    """Per-row seeds: row b is the flat noise of its own seed, numbered from 0 within the row."""
    seeds = torch.tensor([2**63 - 1, -(2**63), 0, 99], dtype=torch.int64)
    shape = (4, 3, 7)
    with pygen.use_backend(backend):
        z = pygen.randn(shape, seeds.to(device_for(backend)), 2**40 + 3)
    for b in range(4):
        exp = numpy_normals(int(seeds[b]), 2**40 + 3, np.arange(6, dtype=np.uint64))[:21].reshape(3, 7)
        torch.testing.assert_close(z[b].cpu(), exp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# backends agree
# ---------------------------------------------------------------------------
def assert_normals_match(out, ref32, dtype):
    """``ref32``: fp32 reference normals. fp32/fp64 within fp32 rounding of log/sin/cos;
    fp16/bf16 within one ulp of the rounded reference."""
    assert out.dtype == dtype and out.shape == ref32.shape
    out = out.cpu().double()
    if dtype in MANTISSA_BITS:
        r = ref32.to(dtype).double()
        ulp = torch.ldexp(torch.ones_like(r), torch.frexp(r)[1] - 1 - MANTISSA_BITS[dtype])
        assert bool(((out - r).abs() <= ulp).all())
    else:
        torch.testing.assert_close(out, ref32.double(), rtol=1e-5, atol=1e-6)


SHAPES = [(3, 5, 7), (2, 1001), (1, 4), (7,), (5, 1, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed_kind", ["int", "large_int", "rows"])
def test_backends_agree(backend, shape, dtype, seed_kind):
    dev = device_for(backend)
    stream = {"int": 3, "large_int": 2**64 - 2, "rows": 2**63 + 1}[seed_kind]
    if seed_kind == "rows":
        gen = torch.Generator().manual_seed(shape[0])
        seed = torch.randint(-(2**63), 2**63 - 1, (shape[0],), generator=gen, dtype=torch.int64)
        ref = randn_reference(shape, 0, to_signed64(stream), seed)
        seed = seed.to(dev)
    else:
        seed = 20240601 if seed_kind == "int" else 2**63 + 2**40 + 17
        ref = randn_reference(shape, to_signed64(seed), to_signed64(stream))
    with pygen.use_backend(backend):
        out = pygen.randn(shape, seed, stream, device=dev, dtype=dtype)
    assert out.device.type == torch.device(dev).type
    assert torch.isfinite(out).all()
    assert_normals_match(out, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_is_rounded_fp32(backend):
    """Other dtypes are the fp32 normals rounded (fp64: widened exactly)."""
    dev = device_for(backend)
    with pygen.use_backend(backend):
        z32 = pygen.randn((3, 333), 5, 6, device=dev)
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            z = pygen.randn((3, 333), 5, 6, device=dev, dtype=dtype)
            if dtype == torch.bfloat16 and backend == "triton" and dev == "cpu":
                # the Triton interpreter truncates fp32 -> bf16 (GPU rounds to nearest): 1 ulp
                assert_normals_match(z, z32.cpu(), dtype)
            else:
                assert torch.equal(z, z32.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_bits_equivalence_and_sensitivity(backend):
    """A seed/stream is its 64 bits: 2^63 + k and k - 2^63 are the same key; one bit changes all."""
    dev = device_for(backend)
    with pygen.use_backend(backend):
        a = pygen.randn((2, 50), 2**63 + 9, 2**64 - 1, device=dev)
        b = pygen.randn((2, 50), 9 - 2**63, -1, device=dev)
        c = pygen.randn((2, 50), 2**63 + 8, 2**64 - 1, device=dev)
        d = pygen.randn((2, 50), 2**63 + 9, 2**64 - 2, device=dev)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99
    assert (a != d).float().mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_properties(backend):
    """Int seed: numbering over the flattened tensor, so the shape and length do not matter."""
    dev = device_for(backend)
    with pygen.use_backend(backend):
        flat = pygen.randn((2 * 3 * 37,), 11, 2, device=dev)
        shaped = pygen.randn((2, 3, 37), 11, 2, device=dev)
        longer = pygen.randn((2 * 3 * 37 + 9,), 11, 2, device=dev)
    assert torch.equal(shaped.flatten(), flat)
    assert torch.equal(longer[: flat.numel()], flat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_seeds_batch_split(backend):
    """A row's noise does not depend on the batch: split one batch in two, and compare each row
    with the int-seed noise of one row."""
    dev = device_for(backend)
    seeds = torch.tensor([17, 2**63 - 5, -3, 17, 0, 42, 7], dtype=torch.int64, device=dev)
    shape = (7, 5, 9)
    with pygen.use_backend(backend):
        full = pygen.randn(shape, seeds, 77, device=dev)
        head = pygen.randn((3, 5, 9), seeds[:3], 77, device=dev)
        tail = pygen.randn((4, 5, 9), seeds[3:], 77, device=dev)
        row2 = pygen.randn((5, 9), int(seeds[2]), 77, device=dev)
    assert torch.equal(torch.cat([head, tail]), full)
    assert torch.equal(full[2], row2)
    assert torch.equal(full[0], full[3])  # same seed, same noise
    assert not torch.equal(full[0], full[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_global_rng_state_touched(backend):
    dev = device_for(backend)
    state = torch.get_rng_state()
    with pygen.use_backend(backend):
        a = pygen.randn((3, 40), 1, 0, device=dev)
        torch.rand(5)  # advancing the global generator changes nothing
        b = pygen.randn((3, 40), 1, 0, device=dev)
    assert torch.equal(a, b)
    torch.set_rng_state(state)
    with pygen.use_backend(backend):
        pygen.randn((3, 40), 1, 0, device=dev)
        pygen.randn((3, 40), torch.tensor([1, 2, 3], device=dev), 0, device=dev)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_scalar_shapes(backend):
    dev = device_for(backend)
    with pygen.use_backend(backend):
        assert pygen.randn((0, 3), 1, device=dev).shape == (0, 3)
        assert pygen.randn((3, 0), torch.tensor([1, 2, 3], device=dev), device=dev).shape == (3, 0)
        s = pygen.randn((), 0, 0, device=dev)
        n = pygen.randn(5, 0, 0, device=dev)  # an int shape
    assert s.shape == () and n.shape == (5,)
    assert torch.equal(s.reshape(1), n[:1])


# ---------------------------------------------------------------------------
# statistics (cpu backend, ~1e6 samples; deterministic seeds, bounds from standard errors)
# ---------------------------------------------------------------------------
N_STAT = 1 << 20


def _stat_backend():
    return "cpu" if pygen.backends()["cpu"] == "available" else "torch"


@pytest.fixture(scope="module")
def big_sample():
    with pygen.use_backend(_stat_backend()):
        return pygen.randn((N_STAT,), 0xC0FFEE, 1).double()


def test_moments(big_sample):
    z = big_sample
    n = z.numel()
    mean = z.mean().item()
    c = z - mean
    var = c.pow(2).mean().item()
    skew = c.pow(3).mean().item() / var**1.5
    kurt = c.pow(4).mean().item() / var**2 - 3.0
    # standard errors of the sample moments of N(0, 1)
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1.0) < 5 * math.sqrt(2.0 / n)
    assert abs(skew) < 5 * math.sqrt(6.0 / n)
    assert abs(kurt) < 5 * math.sqrt(24.0 / n)
    # tails: P(|z| > 3) = 0.0026998
    p = 0.0026998
    frac = (z.abs() > 3).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_ks_normal(big_sample):
    from scipy import stats

    res = stats.kstest(big_sample.numpy(), "norm")
    assert res.pvalue > 1e-3, res


def test_ks_per_row_and_fp16():
    """Per-row seeds (small rows, many seeds) are normal too; fp16 storage keeps the shape."""
    from scipy import stats

    with pygen.use_backend(_stat_backend()):
        z = pygen.randn((1 << 14, 16), torch.arange(1 << 14, dtype=torch.int64), 0).flatten().double()
        h = pygen.randn((1 << 18,), 3, 3, dtype=torch.float16).double()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # fp16 rounding is a tiny perturbation (<= 2^-11 relative): the KS distance stays small
    assert stats.kstest(h.numpy(), "norm").statistic < 5 / math.sqrt(h.numel())


def _corr(a, b):
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


def test_independence_across_seeds_streams_and_elements(big_sample):
    n = 1 << 18
    bound = 5 / math.sqrt(n)  # corr of independent samples has standard error 1/sqrt(n)
    with pygen.use_backend(_stat_backend()):
        base = pygen.randn((n,), 1000, 5)
        pairs = {
            "seed+1": pygen.randn((n,), 1001, 5),
            "seed bit 32": pygen.randn((n,), 1000 + 2**32, 5),
            "seed bit 63": pygen.randn((n,), 1000 + 2**63, 5),
            "stream+1": pygen.randn((n,), 1000, 6),
            "stream bit 32": pygen.randn((n,), 1000, 5 + 2**32),
        }
        rows = pygen.randn((2, n), torch.tensor([1000, 1001]), 5)
    for name, other in pairs.items():
        assert abs(_corr(base, other)) < bound, name
        assert abs(_corr(base.pow(2), other.pow(2))) < bound, name
    assert abs(_corr(rows[0], rows[1])) < bound
    z = big_sample
    m = z.numel()
    for lag in (1, 2, 3, 4, 5, 8):
        a, b = z[:-lag], z[lag:]
        assert abs(_corr(a, b)) < 5 / math.sqrt(m), lag
        assert abs(_corr(a.pow(2), b.pow(2))) < 5 / math.sqrt(m), lag
    # the two normals of one Box–Muller pair (elements 4g, 4g+1) and the two pairs of one call
    g = z.reshape(-1, 4)
    for i, j in ((0, 1), (2, 3), (0, 2), (1, 3)):
        assert abs(_corr(g[:, i], g[:, j])) < 5 / math.sqrt(g.shape[0]), (i, j)
        assert abs(_corr(g[:, i].pow(2), g[:, j].pow(2))) < 5 / math.sqrt(g.shape[0]), (i, j)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(shape=(2, 3), seed=1.5), TypeError, "seed"),
        (dict(shape=(2, 3), seed="1"), TypeError, "seed"),
        (dict(shape=(2, 3), seed=True), TypeError, "seed"),
        (dict(shape=(2, 3), seed=None), TypeError, "seed"),
        (dict(shape=(2, 3), seed=2**64), ValueError, "seed"),
        (dict(shape=(2, 3), seed=-(2**63) - 1), ValueError, "seed"),
        (dict(shape=(2, 3), seed=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seed"),
        (dict(shape=(2, 3), seed=torch.tensor([1.0, 2.0])), TypeError, "seed"),
        (dict(shape=(2, 3), seed=torch.tensor([1, 2, 3])), ValueError, "seed"),
        (dict(shape=(2, 3), seed=torch.tensor([[1, 2]])), ValueError, "seed"),
        (dict(shape=(2, 3), seed=torch.tensor(1)), ValueError, "seed"),
        (dict(shape=(), seed=torch.tensor([1])), ValueError, "shape"),
        (dict(shape=(2, 3), seed=torch.tensor([1, 2], device="meta"), device="cpu"), ValueError, "seed"),
        (dict(shape=(2, -3), seed=1), ValueError, "shape"),
        (dict(shape=None, seed=1), TypeError, "shape"),
        (dict(shape=(2, 3), seed=1, dtype=torch.int32), TypeError, "dtype"),
        (dict(shape=(2, 3), seed=1, dtype=torch.complex64), TypeError, "dtype"),
        (dict(shape=(2, 3), seed=1, stream=1.0), TypeError, "stream"),
        (dict(shape=(2, 3), seed=1, stream=None), TypeError, "stream"),
        (dict(shape=(2, 3), seed=1, stream=2**64), ValueError, "stream"),
    ],
)
def test_bad_input(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        pygen.randn(**kwargs)


@pytest.mark.parametrize("shape", [(2, "a"), (2, 3.5)])
def test_bad_shape_entries(shape):
    with pytest.raises(TypeError, match="shape"):
        pygen.randn(shape, 1)


# ---------------------------------------------------------------------------
# device stream offset (randn_fill_'s stream_offset: a loop's step counter, for CUDA graphs)
# ---------------------------------------------------------------------------
def _fill_with_offset(backend, out, seed, stream, rows, offset):
    """The randn_fill_ of ``backend`` (its reference, launcher or compiled op) with a device stream offset."""
    if backend == "torch":
        from pygen.ops.random import randn_fill_reference

        randn_fill_reference(out, seed, stream, rows, offset)
    elif backend == "triton":
        from pygen.kernels import random as tk

        tk.randn_fill(out, seed, stream, rows, offset)
    else:
        torch.ops.pygen.randn_fill_(out, seed, stream, rows, offset)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_stream_offset_adds_to_the_stream(backend, dtype, per_row):
    """With stream_offset = [k] (read on the device) the noise is exactly pygen.randn(shape, seed, stream + k),
    wrapping mod 2^64; the offset is not modified."""
    dev = device_for(backend)
    shape = (3, 37)
    seed = torch.tensor([4, -9, 2**62], device=dev) if per_row else 77
    rows = seed if per_row else None
    seed_i = 0 if per_row else 77
    for stream, k in [(5, 0), (5, 3), (2**63 - 2, 7), (-3, 2**40)]:
        offset = torch.tensor([k], device=dev)
        with pygen.use_backend(backend):
            want = pygen.randn(shape, seed, to_signed64(stream + k), device=dev, dtype=dtype)
        got = _fill_with_offset(backend, torch.empty(shape, device=dev, dtype=dtype), seed_i, to_signed64(stream),
                                rows, offset)
        assert torch.equal(got, want), (stream, k)
        assert int(offset[0]) == k


def test_stream_offset_bad_input():
    out = torch.empty(2, 3)
    for offset, exc in [(torch.zeros(2, dtype=torch.int64), (RuntimeError, ValueError)),
                        (torch.zeros(1, dtype=torch.int32), (RuntimeError, TypeError)),
                        (torch.zeros((), dtype=torch.int64), (RuntimeError, ValueError))]:
        with pytest.raises(exc, match="stream_offset"):
            torch.ops.pygen.randn_fill_(out, 1, 0, None, offset)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _randn_fill_cases():
    cases = []
    for dtype in (torch.float32, torch.float16, torch.float64):
        cases.append((torch.empty(3, 5, 7, dtype=dtype), 5, 0, None))
        cases.append((torch.empty(4, 9, dtype=dtype), -(2**63), 2**63 - 1, torch.tensor([1, -2, 3, 2**62])))
        cases.append((torch.empty(4, 9, dtype=dtype), 3, 2**63 - 1, None, torch.tensor([5])))
    cases.append((torch.empty(0, 4), 1, 1, None))
    return cases


def test_opcheck_randn_fill():
    for args in _randn_fill_cases():
        torch.library.opcheck(torch.ops.pygen.randn_fill_.default, args)


@needs_triton
def test_opcheck_randn_fill_triton():
    for out, seed, stream, rows, *offset in _randn_fill_cases():
        if out.dtype == torch.float64:
            continue
        args = (out.to(TRITON_DEVICE), seed, stream, None if rows is None else rows.to(TRITON_DEVICE),
                *(o.to(TRITON_DEVICE) for o in offset))
        torch.library.opcheck(torch.ops.pygen.randn_fill_triton_.default, args)


def test_randn_fill_op_writes_every_element():
    out = torch.full((5, 13), float("nan"))
    torch.ops.pygen.randn_fill_(out, 3, 4, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, randn_reference((5, 13), 3, 4), rtol=1e-5, atol=1e-6)
