"""Build bsn_cuda and its compiled ops, bsn_cuda._C.

CUDA sources are compiled whenever torch is a CUDA build and a CUDA toolkit is
found; no GPU is needed at build time. Environment:

  BSN_CUDA_BUILD=0|1     0: CPU ops only; 1: fail unless the CUDA ops are built
                         (default: build them when possible)
  CUDA_HOME              the toolkit (default: /usr/local/cuda, then nvcc's folder)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default when unset and no GPU is
                         visible: "8.0;8.6;8.9;9.0+PTX")
  MAX_JOBS               parallel compile jobs (ninja)

Install with `pip install --no-build-isolation .` so the build uses the torch
that is already installed (no network needed).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _find_cuda_home():
    """A toolkit folder with bin/nvcc, or None.

    Checked before torch.utils.cpp_extension is imported, since it reads
    CUDA_HOME once at import. `which nvcc` can be a wrapper script in
    /usr/local/bin, which would make torch guess CUDA_HOME=/usr/local.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _cuda_wanted():
    import torch

    flag = os.environ.get("BSN_CUDA_BUILD", "").strip()
    if flag == "0":
        return False, None
    cuda_home = _find_cuda_home() if torch.version.cuda else None
    if flag == "1" and cuda_home is None:
        sys.exit(
            "BSN_CUDA_BUILD=1 but the CUDA ops cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit found: {cuda_home!r}. "
            "Install a CUDA build of torch and point CUDA_HOME at the toolkit."
        )
    return cuda_home is not None, cuda_home


def _extra_cuda_include_dirs():
    """Folders with the CUDA library headers that pip's nvidia-* wheels ship.

    ATen/cuda/CUDAContext.h includes cusparse.h and cublas headers, which a
    bare toolkit may lack while torch's wheels carry them.
    """
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return dirs
    for base in getattr(nvidia, "__path__", []):
        for header in glob.glob(os.path.join(base, "**", "include", "cusparse.h"), recursive=True):
            dirs.append(os.path.dirname(header))
    return sorted(set(dirs))


def _extensions():
    build_cuda, cuda_home = _cuda_wanted()
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = []
    # No -std flag: torch adds the one its headers need (C++17 up to 2.9, C++20 after).
    # -ffp-contract=fast lets the AVX2/AVX-512 clones in csrc/cpu/vec.cpp use FMA.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=fast"]}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("BSN_WITH_CUDA", None))
        # No --use_fast_math: the power iteration's norms and divisions must be IEEE.
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        include_dirs += _extra_cuda_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(f"bsn_cuda: building {'CPU + CUDA' if build_cuda else 'CPU-only'} ops "
          f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    ext = ext_cls(
        name="bsn_cuda._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

setup(
    name="bsn_cuda",
    version="0.1.0",
    description="Fused spectral normalization (SN, BSN, BSSN) for PyTorch: C++ and CUDA ops",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bsn_cuda", "bsn_cuda.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
    },
    zip_safe=False,
)
