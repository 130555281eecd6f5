"""Build chopgrad and its C++ engine (`chopgrad._C`).

The engine is compiled against the torch that is already installed (CPU or CUDA build), so install
torch first and build without build isolation:

    pip install torch                      # a version in the range that pyproject.toml declares
    pip install --no-build-isolation -e .

The C++ standard is the one torch's cpp_extension chooses for the installed torch (C++17 for torch
2.6 to 2.11, C++20 for 2.13 and 2.14), so no -std flag is set here.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

NO_TORCH_MESSAGE = """\
error: torch cannot be imported ({error}).
chopgrad's C++ engine is compiled against the torch that is already installed, so install torch first and
build with --no-build-isolation (pip's default build isolation builds in a fresh environment without your torch):
    pip install "{requirement}"
    pip install --no-build-isolation .
"""

UNSUPPORTED_TORCH_MESSAGE = """\
error: the installed torch is {installed}, and chopgrad supports {requirement} (pyproject.toml).
Install a supported torch first, then build with --no-build-isolation:
    pip install "{requirement}"
    pip install --no-build-isolation .
To build against this torch anyway, set CHOPGRAD_ALLOW_UNTESTED_TORCH=1.
"""


def torch_requirement() -> str:
    """The torch line of pyproject.toml's [project] dependencies, as written, e.g. 'torch>=2.13,<2.15'."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: setuptools brings tomli
        import tomli as tomllib
    from packaging.requirements import Requirement  # setuptools brings packaging

    with open(HERE / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return next(line for line in dependencies if Requirement(line).name == "torch")


def check_torch(requirement: str):
    """Imports torch; exits at once with build instructions if it is missing or outside `requirement`."""
    from packaging.requirements import Requirement

    try:
        import torch
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as exc:
        sys.exit(NO_TORCH_MESSAGE.format(error=exc, requirement=requirement))
    if (not Requirement(requirement).specifier.contains(torch.__version__, prereleases=True)
            and os.environ.get("CHOPGRAD_ALLOW_UNTESTED_TORCH") != "1"):
        sys.exit(UNSUPPORTED_TORCH_MESSAGE.format(installed=torch.__version__, requirement=requirement))


check_torch(torch_requirement())

from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

setup(
    packages=find_packages(include=["chopgrad", "chopgrad.*"]),
    package_data={"chopgrad.models": ["*.safetensors", "*.json"]},
    ext_modules=[
        CppExtension(
            name="chopgrad._C",
            sources=["csrc/engine.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            # Release binary: no debug info (Python's own CFLAGS carry -g), and none kept at link time.
            extra_compile_args=["-O2", "-g0"],
            extra_link_args=["-Wl,--strip-debug"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
