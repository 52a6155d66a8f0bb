"""afprobe's messages: one `logging` logger ("afprobe"); the CLI decides how much of it to show.

Results (the headline, a plan, a table) are printed by the commands themselves; progress and notes go
through this logger (INFO by default, WARNING with --quiet, DEBUG with --verbose). Progress bars are
separate (tqdm, off with --quiet). Used as a library, afprobe shows only warnings.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("afprobe")


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (so redirection and capture after setup still work)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Send afprobe's messages to stdout, at the level the command-line flags ask for."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if not any(getattr(h, "_afprobe", False) for h in log.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._afprobe = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
