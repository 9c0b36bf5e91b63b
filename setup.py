"""Build bsn_cuda and its compiled ops, bsn_cuda._C.

CUDA sources are compiled whenever torch is a CUDA build and a CUDA toolkit is
found; no GPU is needed at build time. Environment:

  BSN_CUDA_BUILD=0|1     0: CPU ops only; 1: fail unless the CUDA ops are built
                         (default: build them when possible)
  CUDA_HOME              the toolkit (default: /usr/local/cuda, then nvcc's folder)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default when unset and no GPU is
                         visible: "8.0;8.6;8.9;9.0+PTX")
  MAX_JOBS               parallel compile jobs (ninja)
  CXX                    the C++ compiler (default: c++); OpenMP flags are
                         probed on it, see _openmp_flags
  BSN_OPENMP=0           no OpenMP runtime even where GCC's is usable (the
                         CPU kernels then run on the calling thread only)
  BSN_PRINT_CXX_FLAGS=1  print the C++ flags a build with $CXX would use, and
                         exit (for tools/portability/*.sh)

Install with `pip install --no-build-isolation .` so the build uses the torch
that is already installed (no network needed); a plain `pip install .` stops
with a one-line message saying so. Package metadata and the version's single
source: pyproject.toml (the version lives in bsn_cuda/_version.py).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

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


ISOLATED_BUILD_MESSAGE = (
    "bsn_cuda builds against the torch already installed (torch>=2.4): "
    "type `pip install --no-build-isolation .` (pip's default isolated build cannot see torch)"
)


def _require_installed_torch():
    """Stop with one line when torch cannot be imported.

    That is what pip's default isolated build looks like from here: its
    temporary environment holds only pyproject.toml's build requirements,
    which leave torch out on purpose (building against a freshly fetched torch
    would break the ABI of the one installed). It is also the message for an
    environment with no torch at all.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(ISOLATED_BUILD_MESSAGE)


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


# Probe sources for _openmp_flags.
_PARALLEL_PROBE = r"""
#include <omp.h>
int bsn_probe(int n) {
  int total = 0;
#pragma omp parallel for reduction(+ : total)
  for (int i = 0; i < n; ++i) total += omp_get_num_threads();
  return total;
}
"""
_SIMD_PROBE = r"""
void bsn_probe(float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) x[i] *= 2.0f;
}
"""
_GCC_PROBE = r"""
#if !defined(__GNUC__) || defined(__clang__) || defined(__INTEL_LLVM_COMPILER)
#error "not GCC"
#endif
"""


def _compiles(cxx, flags, source, link=False):
    """Whether `cxx flags` compiles `source` (and links it into a shared object) without a warning."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, "probe.so" if link else "probe.o")
        mode = ["-shared", "-fPIC"] if link else ["-c"]
        cmd = shlex.split(cxx) + ["-Werror"] + flags + mode + [src, "-o", out]
        try:
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0 and os.path.exists(out)


def _openmp_flags(cxx):
    """(compile flags, link flags, note) for OpenMP, probed on the compiler itself.

    The CPU sources use OpenMP for `#pragma omp simd` only; their threads come
    from at::parallel_for, which torch's headers implement inline with
    `#pragma omp parallel` when _OPENMP is defined and as a serial loop
    otherwise. So:
    * GCC with a working -fopenmp: -fopenmp. It links libgomp, the runtime
      torch's Linux builds use, and at::parallel_for runs on torch's threads.
    * any other compiler (clang, Apple clang): -fopenmp-simd if accepted, no
      runtime. Apple clang rejects -fopenmp; clang's -fopenmp would link
      libomp, a second runtime in the process beside torch's, whose omp_*
      calls can bind to the other runtime's and break the per-thread split.
      The kernels then run on the calling thread; results are the same bit for
      bit (the chunking does not depend on the thread count).
    """
    if os.environ.get("BSN_OPENMP", "").strip() != "0":
        if _compiles(cxx, [], _GCC_PROBE) and _compiles(cxx, ["-fopenmp"], _PARALLEL_PROBE, link=True):
            return ["-fopenmp"], ["-fopenmp"], "OpenMP (GCC, libgomp)"
    if _compiles(cxx, ["-fopenmp-simd"], _SIMD_PROBE):
        return ["-fopenmp-simd"], [], "omp simd only, no OpenMP runtime (single-threaded kernels)"
    return [], [], "no OpenMP (single-threaded kernels, loops vectorized at the compiler's discretion)"


def _cxx():
    """The C++ compiler torch's BuildExtension compiles and links with."""
    return os.environ.get("CXX") or "c++"


def _cxx_flags(cxx):
    """(compile flags, link flags, note) for the C++ sources."""
    omp_compile, omp_link, omp_note = _openmp_flags(cxx)
    flags = ["-O3"] + omp_compile
    # -ffp-contract=fast lets the AVX2/AVX-512 clones in csrc/cpu/vec.cpp use FMA.
    if _compiles(cxx, ["-ffp-contract=fast"], _SIMD_PROBE):
        flags.append("-ffp-contract=fast")
    return flags, omp_link, omp_note


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


def _nvcc_threads_flag(arch_list):
    """``--threads N``: nvcc compiles a file's N targets (one per arch, one more
    for +PTX) in parallel instead of one after another, so that with several
    archs a file's wall time stays near one arch's. Capped by the cores."""
    if not arch_list:
        return []
    targets = sum(1 + ("+PTX" in a.upper()) for a in arch_list.replace(";", " ").split())
    threads = min(targets, os.cpu_count() or 1)
    return ["--threads", str(threads)] if threads > 1 else []


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
    cxx = _cxx()
    cxx_flags, omp_link, omp_note = _cxx_flags(cxx)
    extra_compile_args = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("BSN_WITH_CUDA", None))
        # No --use_fast_math: the power iteration's norms and divisions must be IEEE.
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"] + _nvcc_threads_flag(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        include_dirs += _extra_cuda_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(f"bsn_cuda: building {'CPU + CUDA' if build_cuda else 'CPU-only'} ops "
          f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}; "
          f"CXX={cxx}: {omp_note}; flags {' '.join(cxx_flags)})")
    ext = ext_cls(
        name="bsn_cuda._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=omp_link,
    )
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


if os.environ.get("BSN_PRINT_CXX_FLAGS") == "1":
    # For tools/portability/*.sh: the C++ flags a build with $CXX would use.
    print(" ".join(_cxx_flags(_cxx())[0]))
    sys.exit(0)

_require_installed_torch()
ext_modules, build_ext = _extensions()

# Name, version, dependencies and packages: pyproject.toml.
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
