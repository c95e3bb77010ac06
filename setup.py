"""Build pygen and its compiled extension ``pygen._C``.

* The C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp) and the C++ autograd
  (csrc/autograd/*.cpp) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are added when torch was built with CUDA
  and nvcc is found (CUDA_HOME, else nvcc on PATH), unless PYGEN_NO_CUDA=1.
* The extension is compiled against the torch that is importable at build
  time; tools/build_backend makes that the target environment's torch under
  pip's build isolation too (see its docstring). On a GPU machine prefer
  ``pip install --no-build-isolation .``.
* Build switches (environment):
    TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0")
    MAX_JOBS              parallel compile jobs (default: min(cores, memory / 3 GiB))
    PYGEN_NO_CUDA=1       skip the CUDA kernels
    PYGEN_NO_EXTENSION=1  pure-Python install (Triton + torch reference only)
    PYGEN_DEBUG=1         -O0 -g
* Triton kernels in kernels/ ship inside the package as ``pygen.kernels``.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# Commands that compile pygen._C (the others, e.g. egg_info or sdist, need no torch).
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop", "bdist_egg"}


def _log(msg):
    print(f"pygen setup: {msg}", file=sys.stderr)


def _default_max_jobs():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # nvcc with the torch headers peaks near 3 GiB per job.
    return str(max(1, min(cores, int(mem_gib // 3))))


def _rel_sources(*patterns):
    # setuptools wants paths relative to setup.py; sorted for reproducible builds.
    out = []
    for pattern in patterns:
        out += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    return out


def _extensions():
    if os.environ.get("PYGEN_NO_EXTENSION") == "1":
        _log("PYGEN_NO_EXTENSION=1: pure-Python install, no pygen._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as exc:
        if not _BUILD_COMMANDS.intersection(sys.argv[1:]):
            return [], {}  # metadata or sdist only: no torch needed
        raise RuntimeError(
            "pygen's compiled extension is built against torch, which is not importable "
            f"({exc}). Install torch first (e.g. `pip install torch==2.13.0`), or set "
            "PYGEN_NO_EXTENSION=1 for a pure-Python install."
        ) from exc

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    debug = os.environ.get("PYGEN_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = _rel_sources("csrc/bindings.cpp", "csrc/cpu/*.cpp", "csrc/autograd/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    define_macros = [("PYGEN_TORCH_EXTENSION", None)]
    # -fopenmp: at::parallel_for is inlined from the ATen headers and only runs
    # in parallel when the including file is compiled with OpenMP.
    # -g0 drops the -g that Python's CFLAGS add (4 MB of debug info otherwise).
    # -fno-math-errno lets logf/sqrtf/sinf/cosf vectorise (no errno side effect);
    # -Wno-psabi silences a note on vector-typed helpers in target_clones code.
    extra = {"cxx": opt + ([] if debug else ["-g0"]) + ["-std=c++20", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]}
    ext_cls = ce.CppExtension

    cuda_sources = _rel_sources("csrc/cuda/*.cu")
    if os.environ.get("PYGEN_NO_CUDA") == "1":
        _log("PYGEN_NO_CUDA=1: CPU kernels only")
    elif torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA: CPU kernels only")
    elif ce.CUDA_HOME is None:
        _log("torch has CUDA but nvcc was not found (set CUDA_HOME): CPU kernels only")
    elif not cuda_sources:
        _log("no csrc/cuda/*.cu: CPU kernels only")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(
            f"CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
            f"(torch CUDA {torch.version.cuda}, CUDA_HOME={ce.CUDA_HOME})"
        )
        sources += cuda_sources
        ext_cls = ce.CUDAExtension
        define_macros.append(("PYGEN_WITH_CUDA", None))
        extra["nvcc"] = opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    _log(f"building pygen._C from {len(sources)} sources with MAX_JOBS={os.environ['MAX_JOBS']}")
    ext = ext_cls(
        name="pygen._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    cmdclass = {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

# pygen/ and its subpackages, plus kernels/ shipped as pygen.kernels.
packages = find_packages(where=ROOT, include=["pygen", "pygen.*"])
package_dir = {"pygen.kernels": "kernels"}
packages.append("pygen.kernels")
packages += ["pygen.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))]

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
