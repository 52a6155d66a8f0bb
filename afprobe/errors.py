"""Errors that map to CLI exit codes."""
from __future__ import annotations


class BadInput(ValueError):
    """Invalid user input (config, CLI, data, incompatible files): exit code 2, one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
