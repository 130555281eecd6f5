"""The layering of the package: the library core imports nothing from the tools wing (chopgrad.tools), and
the fused kernels import no diffusers model."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "chopgrad"
KERNELS = PACKAGE / "kernels"
TOOLS = "chopgrad.tools"
#: `python -m chopgrad` runs the command line, so it belongs to the tools wing.
ENTRY_POINT = PACKAGE / "__main__.py"
#: The package face reaches the probe lazily, from this function only (see chopgrad/__init__.py).
LAZY_TOOLS_ACCESS = (PACKAGE / "__init__.py", "__getattr__")


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported_modules(path: Path, module: str, *, skip_function: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative imports resolved against `module`.

    `from a import b` yields both `a` and `a.b`, since `b` may be a submodule.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    skipped = set()
    if skip_function is not None:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == skip_function:
                skipped.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
    return found


def core_files() -> list[Path]:
    tools = PACKAGE / "tools"
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if tools not in p.parents and p != ENTRY_POINT and "kernels" not in p.relative_to(PACKAGE).parts)


def _is_tools(name: str) -> bool:
    return name == TOOLS or name.startswith(TOOLS + ".")


def test_the_core_has_no_import_of_the_tools():
    files = core_files()
    assert PACKAGE / "api.py" in files and PACKAGE / "adapters" / "__init__.py" in files
    offending = []
    for path in files + sorted(KERNELS.glob("*.py")):
        root, package = (KERNELS, "chopgrad.kernels") if path.parent == KERNELS else (PACKAGE, "chopgrad")
        skip = LAZY_TOOLS_ACCESS[1] if path == LAZY_TOOLS_ACCESS[0] else None
        for line, name in imported_modules(path, _module_name(path, root, package), skip_function=skip):
            if _is_tools(name):
                offending.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not offending, "\n".join(offending)


def test_importing_the_library_loads_no_tool():
    code = ("import sys\n"
            "import chopgrad, chopgrad.api, chopgrad.adapters, chopgrad.kernels\n"
            "loaded = sorted(m for m in sys.modules if m == 'chopgrad.tools' or m.startswith('chopgrad.tools.'))\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_the_probe_stays_reachable_from_the_package():
    code = ("import chopgrad\n"
            "from chopgrad.tools.probe import ProbeResult, probe_locality\n"
            "assert chopgrad.probe_locality is probe_locality and chopgrad.ProbeResult is ProbeResult\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import chopgrad

    with pytest.raises(AttributeError, match="no_such_name"):
        chopgrad.no_such_name  # noqa: B018


def test_the_tools_use_the_library_modules_not_the_package_face():
    submodules = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    offending = []
    for path in sorted((PACKAGE / "tools").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name == "chopgrad"]
            elif isinstance(node, ast.ImportFrom) and node.module == "chopgrad" and not node.level:
                names = [f"chopgrad.{alias.name}" for alias in node.names if alias.name not in submodules]
            else:
                continue
            offending += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names]
    assert not offending, "import from chopgrad.api, chopgrad.adapters, ... instead: " + ", ".join(offending)


def test_the_kernels_import_no_diffusers():
    offending = []
    for path in sorted(KERNELS.glob("*.py")):
        for line, name in imported_modules(path, _module_name(path, KERNELS, "chopgrad.kernels")):
            if name == "diffusers" or name.startswith("diffusers."):
                offending.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not offending, "\n".join(offending)
