"""Probe directions on disk: one safetensors file per direction.

File: tensor "direction" (float32 [d], unit norm in the residual basis of the cached activations) and
string metadata, every value JSON-encoded (model fingerprint, layer, site, position, method,
separation, config hash, ... as the caller provides).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from afprobe.errors import BadInput
from afprobe.fsio import PathLike, atomic_write_bytes, json_default, safe_name

SUFFIX = ".safetensors"


def save_direction(path: PathLike, direction: np.ndarray, metadata: Mapping[str, Any]) -> Path:
    """Atomically write direction [d] (stored float32) with JSON-encoded string metadata."""
    from safetensors.numpy import save

    path = Path(path)
    safe_name(path.name, "direction file name")
    vec = np.asarray(direction, dtype=np.float32)
    if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
        raise BadInput(f"direction for {path.name} must be a finite non-empty 1-d array, got shape {vec.shape}")
    try:
        meta = {str(k): json.dumps(v, default=json_default) for k, v in metadata.items()}
    except TypeError as exc:
        raise BadInput(f"metadata for {path.name} is not JSON serialisable: {exc}") from None
    atomic_write_bytes(path, save({"direction": np.ascontiguousarray(vec)}, metadata=meta))
    return path


def load_direction(path: PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """(direction [d] float32, metadata with values JSON-decoded); BadInput naming the file if it is
    missing, unreadable or not a direction file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"direction file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            raw = fh.metadata() or {}
            vec = fh.get_tensor("direction") if "direction" in fh.keys() else None
    except OSError as exc:
        raise BadInput(f"cannot read direction file {path}: {exc.strerror}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers and data
        raise BadInput(f"direction file {path} is corrupt or not safetensors ({type(exc).__name__})") from None
    if vec is None or vec.ndim != 1:
        raise BadInput(f"direction file {path} has no 1-d 'direction' tensor")
    return vec, {k: _decode(v) for k, v in raw.items()}


def _decode(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v  # written by another tool without JSON encoding
