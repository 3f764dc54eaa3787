"""Build script. Package metadata lives in pyproject.toml; this file only adds the compiled extension.

The C++/CUDA sources in csrc/ are compiled against the torch that is already installed, so install with
``pip install --no-build-isolation -e .``. Until csrc/ holds sources, or when torch is not importable,
the package installs as pure Python and the compiled backends report themselves unavailable.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or os.environ.get("EGMA_KERNELS_SKIP_EXTENSION", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("egma-kernels: torch is not importable in the build environment; installing without the "
              "compiled backends (use pip install --no-build-isolation)")
        return [], {}
    ext = CppExtension(
        name="egma_kernels._C",
        sources=cpp_sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
