"""Build chopgrad and its C++ engine (`chopgrad._C`).

Build against the torch that is already installed (CPU or CUDA build):

    pip install --no-build-isolation -e .
"""
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    packages=sorted(set(find_packages(include=["chopgrad", "chopgrad.*"])) | {"chopgrad.kernels"}),
    # The fused kernels live in the top-level kernels/ folder and ship as chopgrad.kernels.
    package_dir={"chopgrad": "chopgrad", "chopgrad.kernels": "kernels"},
    package_data={"chopgrad.models": ["*.safetensors", "*.json"]},
    ext_modules=[
        CppExtension(
            name="chopgrad._C",
            sources=["csrc/engine.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            extra_compile_args=["-O2", "-std=c++17"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
