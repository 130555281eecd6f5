"""Packaging and build conventions, checked statically and without network or builds.

The C++ standard comes from the torch being built against (no -std flag of ours), the declared torch
range covers the torch the suite runs on, a build without torch stops at once with the
`--no-build-isolation` instructions, LICENSE ships, and the built engine carries no debug info.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def torch_requirement() -> str:
    """The torch line of pyproject.toml's [project] dependencies, as written, e.g. 'torch>=2.13,<2.15'."""
    for line in PYPROJECT["project"]["dependencies"]:
        if Requirement(line).name == "torch":
            return line
    raise AssertionError("pyproject.toml's [project] dependencies do not name torch")


def torch_spec() -> SpecifierSet:
    return Requirement(torch_requirement()).specifier


def extension_args() -> dict[str, list[str]]:
    """The string arguments of every keyword of the CppExtension call in setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "CppExtension"]
    assert len(calls) == 1, "setup.py should declare one CppExtension"
    args = {}
    for keyword in calls[0].keywords:
        args[keyword.arg] = [n.value for n in ast.walk(keyword.value)
                             if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return args


def test_no_hard_coded_cxx_standard():
    # torch's cpp_extension adds the -std it needs (C++20 for 2.13 and 2.14) when none is given.
    args = extension_args()
    flags = args.get("extra_compile_args", []) + args.get("extra_link_args", [])
    assert not [f for f in flags if f.startswith(("-std", "/std"))], flags
    assert "-std=" not in (ROOT / "setup.py").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert not re.search(r"CMAKE_CXX_STANDARD\s+\d", cmake)
    assert not re.search(r"cxx_std_\d", cmake), "CMakeLists.txt should take the standard from the Torch package"


def test_release_build_flags_drop_debug_info():
    args = extension_args()
    assert "-g0" in args["extra_compile_args"]
    assert any("--strip-debug" in flag or flag == "-s" for flag in args["extra_link_args"])


def test_declared_torch_range_covers_the_installed_torch():
    spec = torch_spec()
    assert spec.contains(torch.__version__, prereleases=True), (torch.__version__, str(spec))
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"torch{spec} has no upper bound"


def test_makefile_torch_pin_is_in_the_declared_range():
    match = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile should pin TORCH ?= torch==X.Y.Z"
    assert torch_spec().contains(match.group(1)), (match.group(1), str(torch_spec()))


def test_torch_is_not_a_build_requirement():
    # A build with isolation must fail at once in setup.py, not after downloading a torch.
    requires = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert "torch" not in {r.name for r in requires}
    setuptools = next(r for r in requires if r.name == "setuptools")
    assert not setuptools.specifier.contains("76.9"), "license = \"Apache-2.0\" needs setuptools>=77"


def test_license_ships_and_is_declared():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_sdist_manifest_carries_the_engine_header():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert "csrc/*.h" in manifest, "the extension does not build from an sdist without csrc/engine.h"


def test_readme_states_the_build_rules():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Building from source", 1)[1].split("\n## ", 1)[0]
    assert "--no-build-isolation" in section
    assert torch_requirement() in section, f"README's 'Building from source' should state {torch_requirement()}"
    first_screen = "\n".join(readme.splitlines()[:20])
    assert "make bench" in first_screen and "make test" in first_screen
    # the Makefile's torch (2.13) builds with C++20; the oldest of the range (2.6) with C++17
    assert "C++20" in first_screen and "C++17" not in first_screen
    assert "C++17 for 2.6" in section and "C++20 for 2.13 and 2.14" in section


def _stub_torch(root: Path, version: str | None) -> Path:
    """A `torch` package that shadows the real one: raises ImportError, or claims `version`."""
    package = root / "torch"
    (package / "utils").mkdir(parents=True)
    if version is None:
        (package / "__init__.py").write_text("raise ImportError('torch is hidden for this test')\n")
    else:
        (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
        (package / "utils" / "__init__.py").write_text("")
        (package / "utils" / "cpp_extension.py").write_text(
            "from setuptools import Extension\n"
            "from setuptools.command.build_ext import build_ext\n"
            "class BuildExtension(build_ext):\n"
            "    @classmethod\n"
            "    def with_options(cls, **options):\n"
            "        return cls\n"
            "def CppExtension(name, sources, **kwargs):\n"
            "    return Extension(name, sources, language='c++', **kwargs)\n")
    return root


def _setup_version(pythonpath: Path | None, **env) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CHOPGRAD_ALLOW_UNTESTED_TORCH")}
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
    environ.update(env)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=environ, capture_output=True,
                         text=True, timeout=120)
    return run, time.monotonic() - start


def test_setup_without_torch_fails_at_once_with_the_build_instructions(tmp_path):
    run, seconds = _setup_version(_stub_torch(tmp_path, None))
    assert run.returncode != 0
    assert "--no-build-isolation" in run.stderr and "install torch first" in run.stderr, run.stderr
    assert "torch is hidden for this test" in run.stderr
    assert seconds < 30


def test_setup_refuses_a_torch_outside_the_range_unless_allowed(tmp_path):
    stub = _stub_torch(tmp_path, "2.99.0")
    run, _ = _setup_version(stub)
    assert run.returncode != 0
    assert "the installed torch is 2.99.0" in run.stderr and "--no-build-isolation" in run.stderr, run.stderr
    assert "CHOPGRAD_ALLOW_UNTESTED_TORCH=1" in run.stderr
    run, _ = _setup_version(stub, CHOPGRAD_ALLOW_UNTESTED_TORCH="1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == PYPROJECT["project"]["version"]


def test_setup_accepts_the_installed_torch():
    run, _ = _setup_version(None)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == PYPROJECT["project"]["version"]


def elf_section_names(path: Path) -> list[str] | None:
    """Section names of an ELF file from its section headers; None if `path` is not ELF."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        return None
    is64, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
    else:
        shoff, = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)

    def header(index):  # (sh_name, sh_offset, sh_size)
        base = shoff + index * shentsize
        name, = struct.unpack_from(order + "I", data, base)
        offset, size = struct.unpack_from(order + ("QQ" if is64 else "II"), data, base + (0x18 if is64 else 0x10))
        return name, offset, size

    _, strtab, strsize = header(shstrndx)
    strings = data[strtab:strtab + strsize]
    return [strings[name:strings.index(b"\0", name)].decode() for name, _, _ in map(header, range(shnum))]


def test_built_engine_has_no_debug_info():
    spec = importlib.util.find_spec("chopgrad._C")
    if spec is None or not spec.origin:
        pytest.skip("chopgrad._C is not built")
    names = elf_section_names(Path(spec.origin))
    if names is None:
        pytest.skip(f"{spec.origin} is not an ELF file")
    assert ".text" in names and ".dynsym" in names  # the parser read real section headers
    assert not [n for n in names if n.startswith(".debug")], (spec.origin, names)


def _kernels_file(env_path: str | None, cwd: str) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    out = subprocess.run([sys.executable, "-c", "import chopgrad.kernels as k; print(k.__file__)"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_kernels_are_chopgrad_kernels_in_a_source_checkout_and_an_editable_install(tmp_path):
    # A checkout on sys.path and the editable install both resolve chopgrad.kernels to chopgrad/kernels/.
    expected = (ROOT / "chopgrad" / "kernels" / "__init__.py").resolve()
    assert Path(_kernels_file(str(ROOT), cwd=str(tmp_path))).resolve() == expected
    assert Path(_kernels_file(None, cwd=str(tmp_path))).resolve() == expected


def test_the_checkout_root_shadows_no_installed_package():
    # `python -m ...` from the checkout puts its root first on sys.path: a top-level package there would shadow
    # an installed one of the same name (a top-level kernels/ would hide the PyPI package `kernels`, which transformers imports).
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py")
    assert packages == ["chopgrad", "setup.py"], packages