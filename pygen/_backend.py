"""Backend selection: which implementation of an op runs for a tensor.

Backends (shared/DESIGN.md):
    cuda    compiled CUDA C++ (``torch.ops.pygen.*`` on CUDA tensors)
    triton  Triton kernels (GPU; on the CPU only under TRITON_INTERPRET=1)
    cpu     compiled C++ CPU kernels (``torch.ops.pygen.*`` on CPU tensors)
    torch   the plain-PyTorch reference (any device)

Selection, in order: ``with pygen.use_backend(name):``, then the environment
variable ``PYGEN_BACKEND``, then the fastest available for the tensor's
device (CUDA: cuda > triton > torch; CPU: cpu > torch).
Samplers resolve the backend once at set-up; functional ops per call.
"""
import contextlib
import contextvars
import importlib.util
import os

import torch

from pygen import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
AVAILABLE = "available"

_override = contextvars.ContextVar("pygen_backend", default=None)

# PYGEN_BACKEND (and PYGEN_ATTENTION) are read on every op call: they may change at run time.
# os.environ.get encodes the key and decodes the value each time (about 1 us); on POSIX the
# mapping keeps its encoded entries in ``_data``, updated by every os.environ write, so a lookup
# there sees the same value.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = {}  # name -> encoded key


def env_value(name):
    """``os.environ.get(name) or None``, cheaply (called per op call)."""
    if _ENV_DATA is None:
        return os.environ.get(name) or None
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    raw = _ENV_DATA.get(key)
    return os.environ.decodevalue(raw) if raw else None


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return AVAILABLE
    if torch.cuda.is_available():
        return AVAILABLE
    return "no CUDA device; set TRITON_INTERPRET=1 to run Triton kernels on the CPU"


def _compiled_status(dispatch_key):
    if _extension.C is None:
        return _extension.LOAD_ERROR
    if not _extension.has_kernel("randn_fill_", dispatch_key):
        if dispatch_key == "CUDA":
            return "pygen._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)"
        return f"pygen._C has no {dispatch_key} kernels"
    if dispatch_key == "CUDA" and not torch.cuda.is_available():
        return "pygen._C has CUDA kernels but no CUDA device is available"
    return AVAILABLE


_status = None  # computed once: Triton fixes interpreter mode when a kernel is decorated
_default = {}  # device type -> default backend name


def _status_table():
    global _status
    if _status is None:
        _status = _compute_status()
    return _status


def backends():
    """Map each backend name to ``"available"`` or the reason it is not."""
    return dict(_status_table())


def _compute_status():
    return {
        "cuda": _compiled_status("CUDA"),
        "triton": _triton_status(),
        "cpu": _compiled_status("CPU"),
        "torch": AVAILABLE,
    }


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


@contextlib.contextmanager
def use_backend(name):
    """Run the ops in this block (this thread/task only) on backend ``name``."""
    _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def forced_in_context():
    """The backend forced by an enclosing ``with pygen.use_backend(name):`` (not the env), or None."""
    return _override.get()


def requested():
    """The explicitly requested backend (context manager, then env), or None."""
    name = _override.get()
    if name is None:
        name = env_value("PYGEN_BACKEND")
        if name is not None:
            _check_name(name)
    return name


_SERVES = {"cuda": ("cuda",), "cpu": ("cpu",), "triton": ("cuda", "cpu"), "torch": None}


def resolve(device):
    """The backend that runs tensors on ``device`` now (cheap: called per op call)."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name = _override.get()
    if name is None:
        name = env_value("PYGEN_BACKEND")
        if name is None:
            default = _default.get(dev_type)
            if default is None:
                default = _default[dev_type] = default_backend(dev_type)
            return default
        _check_name(name)
    if name is not None:
        serves = _SERVES[name]
        if serves is not None and dev_type not in serves:
            raise ValueError(f"backend {name!r} cannot run tensors on device type {dev_type!r}")
        if name == "triton" and dev_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        status = _status_table()[name]
        if status != AVAILABLE:
            raise RuntimeError(f"backend {name!r} is not available: {status}")
        return name
    return default_backend(dev_type)


def default_backend(dev_type):
    table = _status_table()
    order = ("cuda", "triton", "torch") if dev_type == "cuda" else ("cpu", "torch")
    for name in order:
        if table[name] == AVAILABLE:
            return name
    return "torch"
