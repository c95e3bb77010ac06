"""torch.library registration of every ``pygen::`` op.

* Schemas come from C++ (csrc/bindings.cpp). If the extension is missing —
  or is an older build that lacks some ops — those schemas are defined here
  from pygen/ops/_schemas.py and the torch reference is registered as their
  implementation, so ``torch.ops.pygen.<op>`` always works.
* Fake (meta) implementations are registered here for every op, so ops work
  under torch.compile, FakeTensor tracing and opcheck.
* The Triton launchers are registered as custom ops ``pygen::<op>_triton``
  (for torch.compile/opcheck; the eager hot path launches the kernels directly).

Each op family module registers its fake/reference/Triton impls through the
``register_*`` functions below; this module only owns the library object.
"""
import importlib.util
import warnings

import torch

from pygen import _extension
from pygen.ops._schemas import SCHEMAS

COMPILED = _extension.C is not None

if not COMPILED:
    _lib = torch.library.Library("pygen", "DEF")  # noqa: TOR901
    MISSING = frozenset(SCHEMAS)
else:
    _lib = torch.library.Library("pygen", "FRAGMENT")  # noqa: TOR901
    MISSING = frozenset(name for name in SCHEMAS if not hasattr(torch.ops.pygen, name))
    if MISSING:
        warnings.warn(
            f"pygen._C is older than this pygen (no {sorted(MISSING)}); those ops run on the torch "
            "reference until the extension is rebuilt (pip install . / setup.py build_ext)",
            RuntimeWarning,
            stacklevel=2,
        )
for _name in sorted(MISSING):
    _lib.define(SCHEMAS[_name])


TRITON_OPS = {}


def register_reference(name, fn):
    """Use the torch reference as ``pygen::name`` when the extension lacks it."""
    if name in MISSING:
        _lib.impl(name, fn, "CompositeExplicitAutograd")


def register_fake(name, fn):
    """Fake (meta) implementation of ``pygen::name`` and of its Triton variant."""
    torch.library.register_fake(f"pygen::{name}", fn, lib=_lib)
    if name in TRITON_OPS:
        torch.library.register_fake(TRITON_OPS[name], fn, lib=_lib)


def register_triton(name, fn, *, mutates_args=()):
    """Register ``fn`` (which launches Triton kernels) as ``pygen::<name>_triton``.

    ``torch.library.triton_op`` requires kernels launched through
    ``wrap_triton``; the launchers in kernels/ launch directly (that is the
    eager hot path), so the op is registered as a plain custom op here and
    the registration only serves torch.compile/opcheck.
    """
    if importlib.util.find_spec("triton") is None:
        return
    qualname = f"pygen::{name.rstrip('_')}_triton" + ("_" if name.endswith("_") else "")
    schema = SCHEMAS[name].split("(", 1)[1]
    _lib.define(f"{qualname.split('::')[1]}({schema}")
    _lib.impl(qualname.split("::")[1], fn, "CompositeExplicitAutograd")
    TRITON_OPS[name] = qualname


def _import_families():
    # Imported for their registration side effects.
    from pygen.ops import attention, forward, langevin, loss, mcmc, norm, random, schedule, step  # noqa: F401


_import_families()
