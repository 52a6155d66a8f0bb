"""afprobe: mechanistic probing of alignment faking in open language models.

The notebook API is exported lazily (importing afprobe loads neither torch nor transformers):

    direction = afprobe.load_direction("runs/demo/base/probes/directions/best.safetensors")
    with afprobe.steer(model, direction, alpha=4.0):
        model.generate(...)
    store = afprobe.open_store("runs/demo/base")

See docs/notebook.md.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

_SUBPACKAGES = ("activations", "analysis", "probes")  # live next to afprobe/ in the source tree (pyproject package-dir)


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Resolves afprobe.activations / .analysis / .probes to the folders next to *this* afprobe/ when they are not
    inside it (a source checkout on PYTHONPATH), so a checkout shadows an editable install of another checkout
    as a whole, not just its afprobe/ folder. A wheel install has them inside afprobe/ and never gets here."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        parent, _, child = fullname.partition(".")
        if parent != __name__ or child not in _SUBPACKAGES:
            return None
        folder = self.root / child
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [str(self.root)])


_here = Path(__file__).resolve().parent
if not (_here / "activations").is_dir() and (_here.parent / "activations" / "__init__.py").is_file():
    if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder(_here.parent))

# name -> module that defines it (imported on first access)
_LAZY = {
    "Direction": "afprobe.notebook",
    "load_direction": "afprobe.notebook",
    "steer": "afprobe.notebook",
    "open_store": "afprobe.activations.store",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'afprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
