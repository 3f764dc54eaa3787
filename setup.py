"""Build script. Package metadata lives in pyproject.toml; this file only adds the compiled extension.

The C++/CUDA sources in csrc/ are compiled against the torch that is already installed, so install with
``pip install --no-build-isolation -e .``. A plain ``pip install .`` builds in an isolated environment without
torch: it installs no extension, and the package says so on its first import (a warning naming this command);
the ``triton`` (GPU) and ``reference`` backends still work.

What gets built into ``egma_kernels._C``:
- always (when torch is importable): ``csrc/*.cpp`` (the op schemas) and ``csrc/cpu/*.cpp`` (the fused
  C++/OpenMP CPU kernels);
- in addition everything under ``csrc/cuda/`` (``*.cu`` kernels and ``*.cpp`` host wrappers), the fused CUDA
  kernels, when torch is a CUDA build (``torch.version.cuda``) and a CUDA toolkit is found (``$CUDA_HOME``/
  ``$CUDA_PATH``, ``/usr/local/cuda``, or the ``nvcc`` on PATH). No GPU is needed to build.

Environment switches:
- ``EGMA_KERNELS_SKIP_EXTENSION=1``: build nothing (pure Python install).
- ``EGMA_KERNELS_SKIP_CUDA=1``: build the CPU kernels only.
- ``EGMA_KERNELS_FORCE_CUDA=1``: fail the build when the CUDA kernels cannot be built.
- ``EGMA_KERNELS_CUDA_ARCH_LIST``: architectures, in ``TORCH_CUDA_ARCH_LIST`` syntax (default ``8.0;9.0``,
  i.e. sm_80 and sm_90; ``TORCH_CUDA_ARCH_LIST`` is used when set and this is not).
- ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs, at most 4).
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit root: a folder whose bin/ holds the real nvcc (not a wrapper script on PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "include")):
            return os.path.realpath(root)
    return None


def _version():
    about = {}
    with open(os.path.join(HERE, "egma_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, about)
    return about.get("__version__", "0")


def extension_modules():
    # The schemas and the CPU kernels always; everything under csrc/cuda/ only in a CUDA build.
    def sources(folder, *patterns):
        return sorted(path for pattern in patterns for path in glob.glob(os.path.join("csrc", *folder, pattern)))

    cpp_sources = sources((), "*.cpp") + sources(("cpu",), "*.cpp")
    cu_sources = sources(("cuda",), "*.cu", "*.cpp")
    if not cpp_sources or _flag("EGMA_KERNELS_SKIP_EXTENSION"):
        return [], {}
    force_cuda = _flag("EGMA_KERNELS_FORCE_CUDA")
    try:
        import torch
    except ImportError:
        if force_cuda:
            raise RuntimeError("EGMA_KERNELS_FORCE_CUDA=1 but torch is not importable in the build environment")
        # pip shows this only with -v; the package says it again on its first import (egma_kernels.compiled).
        print("egma-kernels: WARNING: torch is not importable in the build environment (pip's default isolated "
              "build); installing WITHOUT the compiled 'cpu'/'cuda' backends. To build them: "
              'pip install "setuptools>=77" wheel ninja pybind11 && pip install --no-build-isolation .')
        return [], {}

    # Decide on CUDA from the torch build and the toolkit, never from torch.cuda.is_available().
    build_cuda, why_not = False, ""
    cuda_home = None
    if _flag("EGMA_KERNELS_SKIP_CUDA"):
        why_not = "EGMA_KERNELS_SKIP_CUDA=1"
    elif not cu_sources:
        why_not = "no sources in csrc/cuda/"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            why_not = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            build_cuda = True
    if force_cuda and not build_cuda:
        raise RuntimeError(f"EGMA_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")

    archs = os.environ.get("EGMA_KERNELS_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    if build_cuda:
        # Both must be set before torch.utils.cpp_extension is imported (it reads them at import time, and
        # torch 2.14 fails on a GPU-less machine without an architecture list).
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(max(1, min(4, os.cpu_count() or 1)))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    version_macro = f'-DEGMA_KERNELS_VERSION="{_version()}"'
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", version_macro]
    if build_cuda:
        cxx_flags += ["-DEGMA_WITH_CUDA", f'-DEGMA_CUDA_ARCHS="{archs}"']
        ext = CUDAExtension(
            name="egma_kernels._C",
            sources=cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
        print(f"egma-kernels: building the CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})")
    else:
        ext = CppExtension(
            name="egma_kernels._C",
            sources=cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
        print(f"egma-kernels: building the CPU kernels only ({why_not})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
