"""Build pygen and its compiled extension ``pygen._C``.

* The C++ CPU kernels (csrc/cpu, csrc/bindings.cpp) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are added when torch was built with CUDA
  and nvcc is found (CUDA_HOME), unless PYGEN_NO_CUDA=1.
* Build switches:
    TORCH_CUDA_ARCH_LIST  architectures for nvcc (default "8.0;9.0")
    MAX_JOBS              parallel compile jobs (default: min(cores, memory/3 GiB))
    PYGEN_NO_CUDA=1       skip the CUDA kernels
    PYGEN_NO_EXTENSION=1  pure-Python install (Triton + torch reference only)
    PYGEN_DEBUG=1         -O0 -g
* Triton kernels in kernels/ ship inside the package as ``pygen.kernels``.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # nvcc with torch headers peaks near 3 GiB per job.
    return str(max(1, min(cores, int(mem_gib // 3))))


def _extensions():
    if os.environ.get("PYGEN_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    debug = os.environ.get("PYGEN_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/bindings.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = opt + ["-std=c++20", "-fopenmp", "-fno-math-errno"]
    define_macros = [("PYGEN_TORCH_EXTENSION", None)]
    ext_cls = ce.CppExtension
    extra = {"cxx": cxx}
    libraries = []

    want_cuda = (
        os.environ.get("PYGEN_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and ce.CUDA_HOME is not None
    )
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext_cls = ce.CUDAExtension
        define_macros.append(("PYGEN_WITH_CUDA", None))
        extra["nvcc"] = opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    ext = ext_cls(
        name="pygen._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        libraries=libraries,
        py_limited_api=False,
    )
    cmdclass = {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=["pygen", "pygen.ops", "pygen.kernels"],
    package_dir={"pygen": "pygen", "pygen.ops": "pygen/ops", "pygen.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
