"""Atomic file writes (temporary file in the same folder, fsync, rename) and safe names."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Union

from afprobe.errors import BadInput

PathLike = Union[str, Path]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, strict: bool = False) -> None:
    """`strict`: refuse NaN and Infinity (ValueError) instead of writing them (they are not JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default, allow_nan=not strict) + "\n")


def atomic_write_jsonl(path: PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=json_default) + "\n" for r in rows))


def json_default(obj: Any) -> Any:
    """`default=` for json.dumps: numpy and torch scalars and arrays as plain numbers and lists."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def safe_name(name: str, what: str = "name") -> str:
    """Refuse names that could escape a folder when used as a file name."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise BadInput(f"{what} '{name}' is not a safe file name (letters, digits, . _ + = - only)")
    return name


def inside(root: PathLike, *parts: str) -> Path:
    """`root/parts`, refusing any result outside root."""
    root = Path(root).resolve()
    target = root.joinpath(*parts).resolve()
    if root != target and root not in target.parents:
        raise BadInput(f"path {'/'.join(parts)} escapes {root}")
    return target


def atomic_write_csv(path: PathLike, rows: Iterable[dict], columns: Iterable[str]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
