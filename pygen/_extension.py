"""Loading of the compiled extension ``pygen._C`` (C++ CPU and CUDA kernels).

A missing or broken extension is never an import error: pygen then runs on
Triton and the torch reference, and ``pygen.backends()`` reports the reason.
Set ``PYGEN_DISABLE_EXTENSION=1`` to skip loading it (used by tests).
"""
import os

import torch

C = None
LOAD_ERROR = None

if os.environ.get("PYGEN_DISABLE_EXTENSION") == "1":
    LOAD_ERROR = "disabled by PYGEN_DISABLE_EXTENSION=1"
else:
    try:
        from pygen import _C as C  # noqa: N811  (registers torch.ops.pygen.*)
    except ImportError as exc:  # not built, or built against another torch
        LOAD_ERROR = f"compiled extension pygen._C not loaded ({exc})"


def has_kernel(op_name, dispatch_key):
    """Whether the extension registered ``pygen::op_name`` for ``dispatch_key``."""
    if C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pygen::{op_name}", dispatch_key)
