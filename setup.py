"""Builds deeplab_fast._C, the custom-op library, with torch.utils.cpp_extension.

Environment:
  FORCE_CUDA=1   build the CUDA kernels even when torch or this machine has no CUDA (needs nvcc).
  DEBUG=1        build with -O0 -g and assertions.
  CUTLASS_PATH   a CUTLASS checkout (its include/ is used); default: the headers of the nvidia-cutlass wheel
                 (`pip install nvidia-cutlass`, found through its cutlass_library package).
CUDA sources (csrc/**/cuda/*.cu) are compiled only when torch is a CUDA build and nvcc is found, or with
FORCE_CUDA=1; otherwise the build is CPU-only and says so. The CUDA build needs the CUTLASS headers.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def cutlass_include_dir():
    """CUTLASS's include/ folder: $CUTLASS_PATH/include, else the nvidia-cutlass wheel's copy, else None."""
    path = os.environ.get("CUTLASS_PATH")
    if path:
        inc = os.path.join(path, "include")
        return inc if os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")) else None
    try:
        import cutlass_library
    except ImportError:
        return None
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return inc if os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")) else None


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cpu_sources = [s for s in _sources("csrc/**/*.cpp") if os.sep + "cuda" + os.sep not in s]
    cuda_sources = _sources("csrc/**/cuda/*.cu") + _sources("csrc/**/cuda/*.cpp")
    with_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    cutlass = cutlass_include_dir() if with_cuda else None
    if with_cuda and cutlass is None:
        raise RuntimeError("deeplab_fast: the CUDA build needs the CUTLASS headers: pip install nvidia-cutlass, "
                           "or set CUTLASS_PATH to a CUTLASS checkout")

    cxx = ["-std=c++17", "-fopenmp", "-ffp-contract=off", "-fdiagnostics-color=always"]
    cxx += ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # SASS for A100 (sm_80) and H100/H200 (sm_90), plus compute_90 PTX that newer GPUs JIT-compile.
    # torch adds -D__CUDA_NO_HALF_OPERATORS__ and friends; CUTLASS's half / bfloat16 types need them undone.
    nvcc = ["-std=c++17", "--fmad=false", "--expt-relaxed-constexpr", "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"] + (
        ["-O0", "-g", "-G"] if debug else ["-O3"])
    kwargs = dict(
        name="deeplab_fast._C",
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
        + ([cutlass] if cutlass else []),
        extra_compile_args={"cxx": cxx + (["-DWITH_CUDA"] if with_cuda else []), "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )
    kind = "CUDA + CPU" if with_cuda else "CPU-only"
    why = ("FORCE_CUDA=1" if force_cuda else "torch has CUDA and nvcc was found") if with_cuda else (
        "torch has no CUDA" if torch.version.cuda is None else "nvcc (CUDA_HOME) not found")
    print(f"deeplab_fast: building {kind} extension ({why}); {'debug' if debug else 'release'} build; "
          f"{'CUTLASS ' + cutlass + '; ' if cutlass else ''}{len(kwargs['sources'])} sources: "
          f"{', '.join(kwargs['sources'])}")
    return (CUDAExtension if with_cuda else CppExtension)(**kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
