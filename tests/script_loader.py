"""Import a file of scripts/ or benchmarks/ as a module (neither folder is a package)."""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str, folder: str = "scripts"):
    """Return <folder>/<name>.py, freshly executed, as a module called ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
