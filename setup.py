"""Builds torch_ep._C: CUDA kernels when a CUDA toolkit and a CUDA build of torch exist, else CPU-only.

Object files live in build/ under the source tree and are compiled by ninja, so a second
`pip install --no-build-isolation -e .` recompiles only what changed. TORCH_EP_CPU_ONLY=1 skips CUDA.
GPU architectures: TORCH_CUDA_ARCH_LIST if set, else the visible GPUs', else DEFAULT_CUDA_ARCHS.
"""
import glob
import os
import re
import sys
import sysconfig

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_TEMP = os.path.join(ROOT, "build", "temp")  # kept between installs: ninja rebuilds only what changed
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0+PTX"  # A100, H100/H200, B200; the PTX JIT-compiles for newer GPUs


def find_cuda_home():
    """CUDA_HOME from the environment, else /usr/local/cuda, else None."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def pip_cuda_include_dirs():
    """Headers that pip-installed CUDA wheels ship (cusparse.h etc.), which torch's headers include."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")) +
                  glob.glob(os.path.join(site, "nvidia", "*", "include")))


def build_with_cuda(cuda_home):
    import torch
    if os.environ.get("TORCH_EP_CPU_ONLY") == "1":
        return False
    return cuda_home is not None and torch.version.cuda is not None


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST as given, else the visible GPUs' capabilities, else the documented default."""
    import torch
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(d) for d in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_CUDA_ARCHS


def arch_macros(arch_list: str):
    """TORCH_EP_CUDA_ARCHS (capabilities as major*10+minor, comma separated) and TORCH_EP_CUDA_PTX_ARCH
    (the newest one with +PTX, or 0), which `_C` reports so Buffer can refuse a GPU the build lacks."""
    archs, ptx = [], 0
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", entry)
        if not match:
            sys.exit(f"torch_ep setup.py: TORCH_CUDA_ARCH_LIST entry {entry!r} is not like '9.0' or '10.0+PTX'")
        cap = int(match[1]) * 10 + int(match[2])
        archs.append(cap)
        if match[3]:
            ptx = max(ptx, cap)
    return [("TORCH_EP_CUDA_ARCHS", ",".join(map(str, sorted(set(archs))))), ("TORCH_EP_CUDA_PTX_ARCH", str(ptx))]


def make_extension():
    cuda_home = find_cuda_home()
    common = ["-O3"]  # torch picks the C++ standard its headers need
    if not build_with_cuda(cuda_home):
        print("torch_ep: building the CPU-only extension (1-2 minutes on 2 cores; later installs recompile only changed files)", file=sys.stderr)
        return cpp_extension.CppExtension(
            "torch_ep._C",
            sources=["csrc/registration.cpp", "csrc/python_module.cpp"],
            extra_compile_args={"cxx": common},
        )
    # torch reads CUDA_HOME when this module is imported; make sure it sees ours.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    arch_list = cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # torch turns it into -gencode flags
    print(f"torch_ep: building CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list!r} "
          "(a first build takes 5-15 minutes on 2 cores; later installs recompile only changed files)",
          file=sys.stderr)
    sources = (["csrc/registration.cpp", "csrc/python_module.cpp", "csrc/ops_cuda.cpp",
                "csrc/ops_low_latency.cpp"]
               + sorted(glob.glob("csrc/runtime/*.cpp")) + sorted(glob.glob("csrc/kernels/*.cu")))
    return cpp_extension.CUDAExtension(
        "torch_ep._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + pip_cuda_include_dirs(),
        define_macros=[("TORCH_EP_CUDA", "1")],
        # only python_module.cpp reads the arch macros; nvcc would split their commas into several -D
        extra_compile_args={"cxx": common + [f"-D{name}={value}" for name, value in arch_macros(arch_list)],
                            "nvcc": common + ["-lineinfo"]},
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's ninja build, with its objects kept in BUILD_TEMP (pip would use a fresh temp dir)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = BUILD_TEMP


setup(  # name, version and dependencies: pyproject.toml
    packages=["torch_ep"],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
)
