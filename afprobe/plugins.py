"""Extensions for the command line: modules that register scorers, probe methods, cue families or adapters.

`AFPROBE_PLUGINS` lists them, separated by commas: importable module names (`mylab.afprobe_ext`) or paths to
.py files. The CLI imports them before it reads a config, so `afprobe run` / `probe` / `bench` see what they
register. In Python, import your module yourself before calling afprobe.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from afprobe.errors import BadInput

ENV = "AFPROBE_PLUGINS"


def load_plugins(spec: str | None = None) -> list[str]:
    """Import every plugin named in `spec` (default: $AFPROBE_PLUGINS); returns their module names."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    loaded = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            if item.endswith(".py"):
                path = Path(item).expanduser()
                if not path.is_file():
                    raise BadInput(f"{ENV}: plugin file {path} does not exist")
                name = f"afprobe_plugin_{path.stem}"
                if name not in sys.modules:
                    module_spec = importlib.util.spec_from_file_location(name, path)
                    module = importlib.util.module_from_spec(module_spec)
                    sys.modules[name] = module
                    module_spec.loader.exec_module(module)
            else:
                name = importlib.import_module(item).__name__
        except ImportError as exc:
            raise BadInput(f"{ENV}: cannot import plugin {item!r}: {exc}") from None
        loaded.append(name)
    return loaded
