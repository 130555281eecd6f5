"""Loads the compiled C++ engine, with an error that says how to build it."""
from __future__ import annotations

import importlib

BUILD_HINT = (
    "chopgrad's C++ engine (chopgrad._C) is not built. Build it against the installed torch from the "
    "repository root with:\n"
    "    pip install --no-build-isolation -e .\n"
    "(or `make install`; see README.md, 'Building from source')."
)


class ExtensionNotBuiltError(ImportError):
    """Raised when chopgrad._C is missing or was built against another torch."""


def load_extension():
    """Returns the `chopgrad._C` module or raises ExtensionNotBuiltError with build instructions."""
    try:
        return importlib.import_module("chopgrad._C")
    except ImportError as exc:  # missing .so, or an ABI mismatch after a torch upgrade
        raise ExtensionNotBuiltError(f"{BUILD_HINT}\nUnderlying error: {exc}") from exc


def extension_status() -> tuple[bool, str]:
    """(built, detail) for `chopgrad info`."""
    try:
        module = load_extension()
    except ExtensionNotBuiltError as exc:
        return False, str(exc)
    return True, getattr(module, "__file__", "chopgrad._C")
