"""Shared test fixtures: backends to compare, tolerances, deterministic inputs."""
import importlib.util
import os

import pytest
import torch

import pygen

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_ON_CPU = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends():
    """Backends that can run CPU tensors here: the reference, compiled CPU, Triton (interpreter)."""
    names = ["torch"]
    if pygen.backends()["cpu"] == "available":
        names.append("cpu")
    if TRITON_ON_CPU:
        names.append("triton")
    return names


def require_backend(name):
    status = pygen.backends()[name]
    if name == "triton" and not TRITON_ON_CPU:
        pytest.skip("Triton runs on the CPU only with TRITON_INTERPRET=1")
    if status != "available":
        pytest.skip(f"backend {name} unavailable: {status}")


def tolerances(dtype):
    """(rtol, atol) against the reference: fp32 1e-5; fp16/bf16 one ulp of the storage type."""
    if dtype == torch.float16:
        return 2.0**-10, 1e-6
    if dtype == torch.bfloat16:
        return 2.0**-7, 1e-6
    if dtype == torch.float64:
        return 1e-12, 1e-12
    return 1e-5, 1e-6


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def _marked(name, available, reason, extra=()):
    return pytest.param(name, marks=[*extra, pytest.mark.skipif(not available, reason=reason)])


# Every backend as a pytest parameter, skipped with its reason where unavailable.
ALL_BACKENDS = [
    "torch",
    _marked("cpu", pygen.backends()["cpu"] == "available", "pygen._C not built"),
    _marked("triton", HAS_TRITON and (TRITON_ON_CPU or torch.cuda.is_available()),
            "needs triton and TRITON_INTERPRET=1 or CUDA"),
    _marked("cuda", pygen.backends()["cuda"] == "available", "no CUDA device or CUDA kernels",
            extra=(pytest.mark.cuda,)),
]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def device_for(backend):
    """The device whose tensors ``backend`` runs in this process."""
    if backend == "cuda" or (backend == "triton" and not TRITON_ON_CPU):
        return "cuda"
    return "cpu"


def to_device(args, device):
    """``args`` with every tensor moved to ``device`` (strides and requires_grad kept)."""
    def move(a):
        if not isinstance(a, torch.Tensor):
            return a
        b = a.detach().to(device)
        return b.requires_grad_(a.requires_grad) if a.is_leaf else b
    return tuple(move(a) for a in args)


def make(shape, dtype, device="cpu", seed=0, scale=1.0):
    """Deterministic normal test data, drawn in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)

HALF_ULP = 2.0 ** -10  # one float16 ulp at 1


def rel_err(ref, got):
    """max |ref - got| relative to max(|ref|, 1), in float64."""
    return (ref.double() - got.double()).abs().max().item() / max(ref.double().abs().max().item(), 1.0)


def assert_half_close(ref16, got16, ref64, ulps=3):
    """A fused float16 run vs stock diffusers run in float16 on the same inputs. Stock computes some
    terms in float16, the fused step in float32, so the two differ by stock's own rounding: both are
    compared to a float64 run of stock, and the fused error may be at most 1.5x stock's plus ``ulps``
    float16 ulps (relative to max(|ref|, 1))."""
    assert got16.dtype == ref16.dtype == torch.float16 and got16.shape == ref16.shape
    assert torch.isfinite(ref16).all() and torch.isfinite(got16).all()
    e_stock, e_fused = rel_err(ref64, ref16), rel_err(ref64, got16)
    assert e_fused <= 1.5 * e_stock + ulps * HALF_ULP, (e_fused, e_stock)


def load_kdiffusion_sampling():
    """k-diffusion's ``sampling`` module, loaded without its package ``__init__``.

    ``k_diffusion/__init__.py`` imports heavy packages (and ``utils`` imports PIL,
    safetensors, ...); the samplers need only ``utils.append_dims``, given here.
    Skips the test when k-diffusion or its sampling dependencies are missing.
    """
    import sys
    import types

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install k-diffusion --no-deps)")
    for dep in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(dep)
    name = "_pygen_test_kd_sampling"
    if name + ".sampling" not in sys.modules:
        pkg_dir = spec.submodule_search_locations[0]
        pkg = types.ModuleType(name)
        pkg.__path__ = [pkg_dir]
        sys.modules[name] = pkg
        utils = types.ModuleType(name + ".utils")

        def append_dims(x, target_dims):
            return x[(...,) + (None,) * (target_dims - x.ndim)]

        utils.append_dims = append_dims
        sys.modules[name + ".utils"] = utils
        pkg.utils = utils
        sub_spec = importlib.util.spec_from_file_location(name + ".sampling", f"{pkg_dir}/sampling.py")
        module = importlib.util.module_from_spec(sub_spec)
        sys.modules[name + ".sampling"] = module
        sub_spec.loader.exec_module(module)
        pkg.sampling = module
    return sys.modules[name + ".sampling"]
