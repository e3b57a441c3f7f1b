"""Builds torch_ep._C: CUDA kernels when a CUDA toolkit and a CUDA build of torch exist, else CPU-only."""
import glob
import os
import sysconfig

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def make_extension():
    cuda_home = find_cuda_home()
    common = ["-O3"]  # torch picks the C++ standard its headers need
    if not build_with_cuda(cuda_home):
        return cpp_extension.CppExtension(
            "torch_ep._C",
            sources=["csrc/registration.cpp", "csrc/python_module.cpp"],
            extra_compile_args={"cxx": common},
        )
    # torch reads CUDA_HOME when this module is imported; make sure it sees ours.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    # On a machine without a GPU torch would otherwise target every architecture it knows.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    sources = (["csrc/registration.cpp", "csrc/python_module.cpp", "csrc/ops_cuda.cpp",
                "csrc/ops_low_latency.cpp"]
               + sorted(glob.glob("csrc/runtime/*.cpp")) + sorted(glob.glob("csrc/kernels/*.cu")))
    return cpp_extension.CUDAExtension(
        "torch_ep._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + pip_cuda_include_dirs(),
        define_macros=[("TORCH_EP_CUDA", "1")],
        extra_compile_args={"cxx": common, "nvcc": common + ["-lineinfo"]},
    )


setup(
    name="torch_ep",
    version="0.1.0",
    description="Expert-parallel dispatch/combine operators for PyTorch MoE models",
    packages=["torch_ep"],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
)
