"""Scaled dot-product attention: ``pygen.attention``.

Ops: ``torch.ops.pygen.attention_fwd(q, k, v, scale, causal) -> (out, lse)`` and
``torch.ops.pygen.attention_bwd(grad_out, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)``
(and their ``_triton`` variants). Backends: torch reference (this file; the spec), Triton
(kernels/attention.py), C++ CPU (csrc/cpu/attention.cpp), CUDA (csrc/cuda/attention.cu).

Op convention: q (B, H, Sq, D), k and v (B, H, Sk, D), any strides with a unit stride on the
last dim (a (B, S, H, D) tensor passed as ``.transpose(1, 2)`` needs no copy). ``out`` is like
``torch.empty_like(q)``; ``lse`` (B, H, Sq) fp32 is the natural-log logsumexp of the scaled scores
of each query row. ``causal`` is top-left aligned: key j is visible to query i iff j <= i (SDPA's
``is_causal``, also for Sq != Sk). Arithmetic in fp32 (fp64 for fp64 storage).

``pygen.attention`` picks an implementation per call (see ``attention_choice``):

* an override: ``with pygen.use_backend("triton"|"cuda"|"cpu"|"torch")``, else the environment
  variable ``PYGEN_ATTENTION`` (auto, triton, cuda, cpu, torch, sdpa_flash, sdpa_cudnn,
  sdpa_efficient, sdpa_math), else ``PYGEN_BACKEND``;
* otherwise (auto): fp32/fp64 on CUDA, empty inputs, and head dims outside {32, 64, 80, 96, 128, 256}
  (with a one-time warning per head dim) take the ``torch`` path, except that on CUDA a head dim in
  [16, 256] stays a candidate for the Triton kernel (padded to a power of two; DiT-XL's 72), with
  no warning. Everything else is *measured once*
  per (device, dtype, layout, B, H, Sq, Sk, D, causal, grad): on CUDA fp16/bf16 the candidates are
  pygen ``cuda`` and ``triton`` and SDPA's flash, cuDNN and efficient backends (fwd, or fwd+bwd when
  a gradient is needed, timed with CUDA events); on the CPU pygen ``cpu`` (when built) and
  ``torch``, one warm-up and two timed calls. The fastest is cached in memory and in
  ``$PYGEN_CACHE_DIR/attention.json`` (default ``~/.cache/pygen``; never fatal when unwritable).
  Under CUDA-graph capture or torch.compile tracing nothing is measured: the cached choice is used,
  else the static default ``torch``.

The ``torch`` path is ``F.scaled_dot_product_attention`` (SDPA's own backend pick) on CUDA and
the reference on the CPU: SDPA's CPU flash kernel returns zeros for a query row holding a NaN,
which would hide the NaN (pygen propagates NaN), so it is not a CPU candidate either.
"""
import json
import math
import os
import statistics
import threading
import time
import warnings

import torch
import torch.nn.functional as F

from pygen import _backend, _extension
from pygen.ops._common import check_real, check_tensor

__all__ = ["attention", "attention_reference", "attention_choice"]

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)  # every pygen kernel (CUDA tensor cores, CPU)
TRITON_HEAD_DIMS = (16, 256)  # the Triton kernel: any head dim in this range (padded to a power of two)


def _triton_head_dim(d):
    return TRITON_HEAD_DIMS[0] <= d <= TRITON_HEAD_DIMS[1]
LAYOUTS = ("bhsd", "bshd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Names accepted by PYGEN_ATTENTION (besides "auto") and returned by attention_choice.
CHOICES = ("cuda", "triton", "cpu", "torch", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                  "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
_PYGEN_KERNELS = ("cuda", "triton", "cpu")

# Measurement: warm-up calls (the first compiles/autotunes Triton) then timed calls, median.
WARMUP = 2
REPS = 5
CPU_WARMUP = 1
CPU_REPS = 2


# ---------------------------------------------------------------------------
# torch reference (the spec)
# ---------------------------------------------------------------------------
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _default_scale(d):
    return 1.0 / math.sqrt(d)


def _scores(q, k, scale, causal, acc):
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    return s


def attention_reference(q, k, v, scale=None, causal=False):
    """softmax(scale * q k^T [+ causal mask]) v in plain PyTorch, (B, H, S, D) layout.

    Computed in fp32 (fp64 for fp64 inputs) and returned in the input dtype. Causal is top-left
    aligned (key j visible to query i iff j <= i). This is the spec the kernels are tested against.
    """
    if scale is None:
        scale = _default_scale(q.shape[-1])
    acc = _acc_dtype(q.dtype)
    p = torch.softmax(_scores(q, k, scale, causal, acc), dim=-1)
    return torch.matmul(p, v.to(acc)).to(q.dtype)


def attention_fwd_reference(q, k, v, scale, causal):
    """(out, lse) of ``pygen::attention_fwd`` in plain PyTorch."""
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, scale, causal, acc)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(acc))
    out = torch.empty_like(q)
    out.copy_(o)
    return out, lse.to(torch.float32)


def attention_bwd_reference(grad_out, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv) of ``pygen::attention_bwd`` in plain PyTorch (P recomputed from lse)."""
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, scale, causal, acc)
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    do = grad_out.to(acc)
    dv_ = torch.matmul(p.transpose(-2, -1), do)
    dp = torch.matmul(do, v.to(acc).transpose(-2, -1))
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq_ = torch.matmul(ds, k.to(acc)) * scale
    dk_ = torch.matmul(ds.transpose(-2, -1), q.to(acc)) * scale
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq.copy_(dq_)
    dk.copy_(dk_)
    dv.copy_(dv_)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# kernels behind one name
# ---------------------------------------------------------------------------
def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_op(backend):
    """The (out, lse) forward of a pygen kernel backend."""
    if backend == "triton":
        from pygen.kernels import attention as tk

        return tk.attention_fwd
    return _compiled_fwd


def _bwd_op(backend, dtype):
    if backend == "triton":
        from pygen.kernels import attention as tk

        return tk.attention_bwd
    if backend == "cuda" and dtype in _TRITON_DTYPES and (
            _triton_on_cuda() or not _extension.has_kernel("attention_bwd", "CUDA")):
        # The compiled CUDA backward is a simple exact kernel without tensor cores; the Triton one
        # (same lse convention) is the fast path when Triton is there. fp64 (a forced "cuda") has
        # no Triton kernel: it stays on the compiled backward.
        from pygen.kernels import attention as tk

        return tk.attention_bwd
    return _compiled_bwd


def _triton_on_cuda():
    return _backend.backends()["triton"] == _backend.AVAILABLE and torch.cuda.is_available()


def _compiled_fwd(q, k, v, scale, causal):
    return torch.ops.pygen.attention_fwd.default(_unit_last(q), _unit_last(k), _unit_last(v), scale, causal)


def _compiled_bwd(grad_out, q, k, v, out, lse, scale, causal):
    return torch.ops.pygen.attention_bwd.default(_unit_last(grad_out), _unit_last(q), _unit_last(k),
                                                 _unit_last(v), _unit_last(out), lse, scale, causal)


class _AttentionFunction(torch.autograd.Function):
    """Autograd around a pygen kernel: forward saves (q, k, v, out, lse), backward runs the bwd kernel."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, backend):
        out, lse = _fwd_op(backend)(q, k, v, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.backend = scale, causal, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(ctx.backend, q.dtype)(_unit_last(grad_out), q, k, v, out, lse, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None


def _sdpa(q, k, v, scale, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _torch_path(q, k, v, scale, causal):
    """The "torch" implementation: SDPA (its own backend pick) on CUDA; the reference on the CPU,
    where SDPA's flash kernel turns a query row with a NaN into zeros instead of NaN."""
    if q.device.type == "cuda":
        return _sdpa(q, k, v, scale, causal)
    return attention_reference(q, k, v, scale, causal)


def _run(name, q, k, v, scale, causal, grad):
    """Attention (B, H, S, D) on implementation ``name``; differentiable when ``grad``."""
    if name == "torch":
        return _torch_path(q, k, v, scale, causal)
    if name in _SDPA_BACKENDS:
        if torch.compiler.is_compiling():
            return _sdpa(q, k, v, scale, causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[name])):
            return _sdpa(q, k, v, scale, causal)
    if torch.compiler.is_compiling():  # traceable custom ops (autograd registered on them)
        if name == "triton":
            return torch.ops.pygen.attention_fwd_triton(q, k, v, scale, causal)[0]
        return torch.ops.pygen.attention_fwd(_unit_last(q), _unit_last(k), _unit_last(v), scale, causal)[0]
    if grad and (name == "triton" or _bwd_op(name, q.dtype) is not _compiled_bwd):
        return _AttentionFunction.apply(q, k, v, scale, causal, name)  # Triton backward
    if name == "triton":  # the hot path: a direct launch, no lse
        from pygen.kernels import attention as tk

        return tk.attention_fwd(q, k, v, scale, causal, False)[0]
    # the compiled op; with grad its C++ autograd (csrc/autograd/attention.cpp) pairs it with its backward
    return _compiled_fwd(q, k, v, scale, causal)[0]


# ---------------------------------------------------------------------------
# the decision: overrides, static rules, measured choice (cached)
# ---------------------------------------------------------------------------
_cache = {}  # (device, dtype, layout, B, H, Sq, Sk, D, causal, grad) -> name
_disk = None  # {key string: name} loaded from the JSON file, or {} when unreadable
_lock = threading.Lock()
_warned_head_dims = set()
_last = [None, None]  # [name, key] of the latest pygen.attention call
_device_names = {}


def cache_path():
    """The JSON file of measured choices: ``$PYGEN_CACHE_DIR/attention.json`` (default ``~/.cache/pygen``)."""
    root = os.environ.get("PYGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pygen")
    return os.path.join(root, "attention.json")


def clear_cache(persistent=False):
    """Forget the measured choices (in memory; with ``persistent=True`` also delete the JSON file)."""
    global _disk
    with _lock:
        _cache.clear()
        _disk = None
        _last[0] = _last[1] = None
        if persistent:
            try:
                os.remove(cache_path())
            except OSError:
                pass


def last_choice():
    """``(name, key)`` of the implementation the latest ``pygen.attention`` call used (None before any)."""
    return _last[0], _last[1]


def cached_choices():
    """A copy of the in-memory cache: {key: name}."""
    return dict(_cache)


def _device_name(device):
    name = _device_names.get(device)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            from pygen.bench import cpu_model  # the benchmarks' CPU name; imported on first use only

            name = f"cpu:{cpu_model()}"
        _device_names[device] = name
    return name


def _versions():
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    # Which compiled kernels this build has: a choice measured before the extension was (re)built
    # with (or without) them must not survive the rebuild.
    built = [f"{name}:{key}" for name in ("attention_fwd", "attention_bwd") for key in ("CPU", "CUDA")
             if _extension.has_kernel(name, key)]
    # "candidates": bumped when the candidate list changes (2: plain SDPA, any Triton head dim).
    return {"torch": torch.__version__, "triton": tv, "compiled": built, "candidates": 2}


def _key_str(key):
    device, dtype, layout, *dims, causal, grad = key
    return "|".join([_device_name(device), str(dtype).replace("torch.", ""), layout, *map(str, dims),
                     str(int(causal)), str(int(grad))])


def _load_disk():
    global _disk
    if _disk is None:
        _disk = {}
        try:
            with open(cache_path()) as f:
                data = json.load(f)
            if data.get("versions") == _versions() and isinstance(data.get("choices"), dict):
                _disk = {k: v for k, v in data["choices"].items() if v in CHOICES}
        except (OSError, ValueError, AttributeError):
            pass
    return _disk


def _save_disk():
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"versions": _versions(), "choices": _disk}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _kernel_available(name, device, dtype):
    """Whether pygen kernel ``name`` can run (device, dtype) here."""
    if name == "triton":
        return dtype in _TRITON_DTYPES and _backend.backends()["triton"] == _backend.AVAILABLE and (
            device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    key = {"cuda": "CUDA", "cpu": "CPU"}[name]
    if device.type != name or not _extension.has_kernel("attention_fwd", key):
        return False
    return _backend.backends()[name] == _backend.AVAILABLE


def _candidates(device, dtype, sq, sk, causal, d):
    if device.type == "cuda":
        names = [n for n in ("cuda", "triton") if _kernel_available(n, device, dtype)
                 and (_triton_head_dim(d) if n == "triton" else d in SUPPORTED_HEAD_DIMS)]
        # "torch" is SDPA's own pick with no sdpa_kernel context around it: on small shapes that
        # context manager's host time decides the race (H100, 2026-11-23: 26 us default vs 52 us
        # forced flash for a 2x8x1024x64 forward). SDPA's own pick also honours top-left causal
        # alignment for Sq != Sk, where the forced backends are not candidates.
        names.append("torch")
        if not (causal and sq != sk):
            names += ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"]
        return names
    return [n for n in ("cpu",) if _kernel_available(n, device, dtype)] + ["torch"]


def _measurable():
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _time_candidate(name, q, k, v, scale, causal, grad):
    """Median seconds of one call (fwd, or fwd+bwd when ``grad``) of ``name``; None if it fails."""
    cuda = q.device.type == "cuda"
    if grad:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        # A private generator: measuring must not advance the caller's RNG stream (a run would
        # draw different numbers depending on whether the choice was cached).
        gen = torch.Generator(device=q.device).manual_seed(0)
        g = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype, generator=gen)

        def call():
            with torch.enable_grad():
                out = _run(name, qg, kg, vg, scale, causal, True)
                torch.autograd.grad(out, (qg, kg, vg), g)
    else:
        def call():
            with torch.no_grad():
                _run(name, q, k, v, scale, causal, False)
    warmup, reps = (WARMUP, REPS) if cuda else (CPU_WARMUP, CPU_REPS)
    try:
        for _ in range(warmup):
            call()
        times = []
        if cuda:
            torch.cuda.synchronize(q.device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                start.record()
                call()
                end.record()
            torch.cuda.synchronize(q.device)
            times = [s.elapsed_time(e) * 1e-3 for s, e in events]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
    except Exception:  # a backend that does not take this shape/dtype (SDPA raises) is skipped  # noqa: BLE001
        return None
    return statistics.median(times)


# Set by the measurement for inspection: {name: seconds or None} of the latest measured key.
last_timings = {}


def _measure(key, q, k, v, scale, causal, grad):
    global last_timings
    names = _candidates(q.device, q.dtype, q.shape[2], k.shape[2], causal, q.shape[3])
    if len(names) == 1:
        last_timings = {names[0]: None}
        return names[0]
    timings = {n: _time_candidate(n, q, k, v, scale, causal, grad) for n in names}
    last_timings = timings
    ok = {n: t for n, t in timings.items() if t is not None}
    return min(ok, key=ok.get) if ok else "torch"


def _auto(key, q, k, v, scale, causal, grad):
    """The measured (or cached, or static default) choice for ``key``."""
    with _lock:
        name = _cache.get(key)
        if name is not None:
            return name
        disk = _load_disk()
        skey = _key_str(key)
        name = disk.get(skey)
        if name is not None and (name not in _PYGEN_KERNELS or _kernel_available(name, q.device, q.dtype)):
            _cache[key] = name
            return name
    if not _measurable():
        return "torch"  # static default; nothing cached, so a later eager call measures
    name = _measure(key, q, k, v, scale, causal, grad)
    with _lock:
        _cache[key] = name
        _load_disk()[skey] = name
        _save_disk()
    return name


def _forced(name, device, dtype, d, source):
    """Validate an explicitly requested implementation."""
    if name == "torch" or name in _SDPA_BACKENDS:
        return name
    if not (_triton_head_dim(d) if name == "triton" else d in SUPPORTED_HEAD_DIMS):
        raise ValueError(f"head dim {d} is not supported by the pygen {name!r} attention kernel "
                         f"(requested by {source}); supported: {SUPPORTED_HEAD_DIMS}")
    if name == "triton" and dtype not in _TRITON_DTYPES:
        raise TypeError(f"the pygen 'triton' attention kernel takes float16, bfloat16 or float32, got {dtype} "
                        f"(requested by {source})")
    if _kernel_available(name, device, dtype):
        return name
    status = _backend.backends()[name]
    if status != _backend.AVAILABLE:
        raise RuntimeError(f"backend {name!r} is not available: {status} (requested by {source})")
    if name == "triton" and device.type == "cpu":
        raise ValueError(f"backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (requested by {source})")
    if name in ("cuda", "cpu") and device.type != name:
        raise ValueError(f"backend {name!r} cannot run tensors on device type {device.type!r} (requested by {source})")
    raise RuntimeError(f"pygen._C has no {name} attention kernel (rebuild the extension; requested by {source})")


def _select(q, k, v, scale, causal, layout, grad):
    """(name, key) of the implementation for these (B, H, S, D) tensors."""
    forced = _backend.forced_in_context()  # pygen.use_backend(...)
    if forced is not None:
        return _forced(forced, q.device, q.dtype, q.shape[3], f"pygen.use_backend({forced!r})"), None
    env = _backend.env_value("PYGEN_ATTENTION")
    if env and env != "auto":
        if env not in CHOICES:
            raise ValueError(f"PYGEN_ATTENTION must be one of auto, {', '.join(CHOICES)}; got {env!r}")
        return _forced(env, q.device, q.dtype, q.shape[3], f"PYGEN_ATTENTION={env}"), None
    env = _backend.env_value("PYGEN_BACKEND")
    if env:
        _backend._check_name(env)
        return _forced(env, q.device, q.dtype, q.shape[3], f"PYGEN_BACKEND={env}"), None
    B, H, sq, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS and not (_triton_head_dim(d) and q.device.type == "cuda"
                                             and _kernel_available("triton", q.device, q.dtype)):
        if d not in _warned_head_dims:
            _warned_head_dims.add(d)
            path = ("F.scaled_dot_product_attention" if q.device.type == "cuda"
                    else "the plain-PyTorch reference, pygen.ops.attention.attention_reference")
            warnings.warn(f"pygen.attention: head dim {d} is not one of {SUPPORTED_HEAD_DIMS}; using the torch "
                          f"path ({path})", RuntimeWarning, stacklevel=3)
        return "torch", None
    if q.numel() == 0 or (q.device.type == "cuda" and q.dtype not in _HALF):
        return "torch", None
    key = (q.device, q.dtype, layout, B, H, sq, k.shape[2], d, causal, grad)
    name = _cache.get(key)
    if name is None:
        name = _auto(key, q, k, v, scale, causal, grad)
    return name, key


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
_DTYPE_SET = frozenset(DTYPES)
_TENSOR = torch.Tensor


def _validate(q, k, v, scale, causal, layout):
    """The scale to use; raises ValueError/TypeError naming the bad argument."""
    # Fast path (the common, valid call): a handful of comparisons, then the scale.
    if (isinstance(q, _TENSOR) and isinstance(k, _TENSOR) and isinstance(v, _TENSOR) and causal.__class__ is bool
            and q.dtype in _DTYPE_SET and k.dtype is q.dtype and v.dtype is q.dtype):
        qs, ks = q.shape, k.shape
        if len(qs) == 4 and ks == v.shape and len(ks) == 4 and ks[0] == qs[0] and ks[3] == qs[3]:
            h, s = (1, 2) if layout == "bhsd" else (2, 1) if layout == "bshd" else (0, 0)
            if h and ks[h] == qs[h] and ks[s] > 0 and k.device == q.device and v.device == q.device:
                if scale is None:
                    return 1.0 / math.sqrt(qs[3])
                if scale.__class__ is float and 0.0 < scale < math.inf:
                    return scale
    return _validate_slow(q, k, v, scale, causal, layout)


def _validate_slow(q, k, v, scale, causal, layout):
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dims = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=None)
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor {dims} (layout={layout!r}), got shape {tuple(t.shape)}")
    check_tensor("q", q, dtypes=DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    s_ax, h_ax = (2, 1) if layout == "bhsd" else (1, 2)
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"batch mismatch: {name} has batch {t.shape[0]}, q has {q.shape[0]}")
        if t.shape[h_ax] != q.shape[h_ax]:
            raise ValueError(f"head-count mismatch: {name} has {t.shape[h_ax]} heads, q has {q.shape[h_ax]}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"head-dim mismatch: {name} has head dim {t.shape[3]}, q has {q.shape[3]}")
    if k.shape[s_ax] != v.shape[s_ax]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[s_ax]} and {v.shape[s_ax]}")
    if k.shape[s_ax] == 0:
        raise ValueError("k and v must have at least one key (sequence length >= 1)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        return _default_scale(q.shape[3])
    return check_real("scale", scale, gt=0.0)


def attention(q, k, v, scale=None, causal=False, layout="bhsd"):
    """softmax(scale · q kᵀ [causal mask]) v, differentiable, on the fastest implementation.

    Args:
        q: queries (B, H, Sq, D) for ``layout="bhsd"`` (SDPA's) or (B, Sq, H, D) for ``"bshd"``
            (flash-attn's).
        k, v: keys and values, (B, H, Sk, D) / (B, Sk, H, D); Sk may differ from Sq (cross-attention).
        scale: score scale, default 1/sqrt(D).
        causal: top-left aligned causal mask (key j visible to query i iff j <= i), as SDPA's
            ``is_causal``.
        layout: ``"bhsd"`` or ``"bshd"``; the output has the same layout.

    dtypes float16/bfloat16 (pygen kernels, or SDPA's when faster), float32/float64 (torch path on
    CUDA; on the CPU the faster of pygen ``cpu`` and the reference). Head dims 32, 64, 80, 96, 128, 256 on
    every pygen kernel, any head dim in [16, 256] on the Triton kernel (CUDA); others fall back to the
    torch path with a one-time warning. See the module
    docstring for the dispatcher and its overrides (``pygen.use_backend``, ``PYGEN_ATTENTION``).
    """
    scale = _validate(q, k, v, scale, causal, layout)
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name, key = _select(q, k, v, scale, causal, layout, grad)
    _last[0] = name
    _last[1] = key
    out = _run(name, q, k, v, scale, causal, grad)
    return out.transpose(1, 2) if layout == "bshd" else out


def attention_choice(q, k, v, scale=None, causal=False, layout="bhsd", *, requires_grad=None):
    """The implementation ``pygen.attention`` would use for these inputs now (measuring if needed).

    ``requires_grad`` (default: whether any input requires grad and grad mode is on) selects the
    fwd or fwd+bwd measurement. Returns one of ``CHOICES``.
    """
    scale = _validate(q, k, v, scale, causal, layout)
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _select(q, k, v, scale, causal, layout, bool(requires_grad))[0]


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _fwd_fake(q, k, v, scale, causal):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        # grad_out may be expanded (e.g. from .sum()); the ops take a unit last stride.
        dq, dk, dv = bwd()(_unit_last(grad_out), q, k, v, out, lse, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None

    return backward


def _register():
    from pygen.ops import _registry

    _registry.register_reference("attention_fwd", attention_fwd_reference)
    _registry.register_reference("attention_bwd", attention_bwd_reference)

    def attention_fwd_triton(q, k, v, scale, causal):
        from pygen.kernels import attention as tk

        return tk.attention_fwd(q, k, v, scale, causal)

    def attention_bwd_triton(grad_out, q, k, v, out, lse, scale, causal):
        from pygen.kernels import attention as tk

        return tk.attention_bwd(grad_out, q, k, v, out, lse, scale, causal)

    _registry.register_triton("attention_fwd", attention_fwd_triton)
    _registry.register_triton("attention_bwd", attention_bwd_triton)
    _registry.register_fake("attention_fwd", _fwd_fake)
    _registry.register_fake("attention_bwd", _bwd_fake)

    if "attention_fwd" in _registry.MISSING:  # else the C++ autograd of csrc/autograd/attention.cpp
        torch.library.register_autograd("pygen::attention_fwd",
                                        _make_backward(lambda: torch.ops.pygen.attention_bwd),
                                        setup_context=_setup_context, lib=_registry._lib)
    if "attention_fwd" in _registry.TRITON_OPS:
        torch.library.register_autograd(_registry.TRITON_OPS["attention_fwd"],
                                        _make_backward(lambda: torch.ops.pygen.attention_bwd_triton),
                                        setup_context=_setup_context, lib=_registry._lib)


_register()
