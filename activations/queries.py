"""Request sets: the bundled harmful and benign requests, or a user's CSV / JSONL / TXT / `datasets` file.

Every loader yields rows `{"text", "id"?, "category"?}`; `load_queries` then assigns ids, checks them,
filters by category and takes a seeded sample.
"""
from __future__ import annotations

import csv
import json
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from afprobe.config import QueriesConfig
from afprobe.errors import BadInput

BUNDLED_DIR = Path(__file__).parent / "data" / "queries"
BUNDLED_HARMFUL = BUNDLED_DIR / "harmful.jsonl"
BUNDLED_BENIGN = BUNDLED_DIR / "benign.jsonl"
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")  # ids end up in file names and prompt ids
UNCATEGORISED = "uncategorised"
_TEXT_DEFAULTS = ("goal", "text")  # AdvBench-style `goal,target`, else a `text` column

Row = dict[str, str]


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    category: str
    harmful: bool


def _pick_column(columns: list[str], wanted: Optional[str], source: str, kind: str) -> str:
    """The text column/field: `wanted` if given (must exist), else goal, text, or the first one."""
    if wanted is not None:
        if wanted not in columns:
            raise BadInput(f"{source}: no {kind} '{wanted}' (available: {', '.join(columns) or 'none'})")
        return wanted
    for name in _TEXT_DEFAULTS:
        if name in columns:
            return name
    if not columns:
        raise BadInput(f"{source}: has no {kind}s")
    return columns[0]


def _rows(records: Iterable[dict], text_key: str) -> list[Row]:
    """Keep text, id and category (as strings) of each record; records with blank text are skipped."""
    rows = []
    for rec in records:
        text = rec.get(text_key)
        if text is None or not str(text).strip():
            continue
        row = {"text": str(text).strip()}
        for key in ("id", "category"):
            if rec.get(key) not in (None, ""):
                row[key] = str(rec[key]).strip()
        rows.append(row)
    return rows


def _read_csv(path: Path, column: Optional[str]) -> list[Row]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        try:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            records = list(reader)
        except csv.Error as exc:
            raise BadInput(f"{path}: not a valid CSV file ({exc})") from None
    return _rows(records, _pick_column(columns, column, str(path), "column"))


def _read_jsonl(path: Path, field: Optional[str]) -> list[Row]:
    key = field or "text"
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise BadInput(f"{path}: line {n} is not valid JSON") from None
            if not isinstance(rec, dict):
                raise BadInput(f"{path}: line {n} is not a JSON object")
            if key not in rec:
                raise BadInput(f"{path}: line {n} has no field '{key}' (fields: {', '.join(rec) or 'none'})")
            records.append(rec)
    return _rows(records, key)


def _read_txt(path: Path) -> list[Row]:
    return [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode for `datasets` and the hub client, even when they were imported earlier (they read
    the environment at import time); restored afterwards."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _read_hf(cfg: QueriesConfig) -> list[Row]:
    """A local `save_to_disk` folder, or a dataset name already in the local `datasets` cache."""
    try:
        import datasets
    except ImportError:
        raise BadInput("queries.hf_dataset needs the `datasets` package, which is not installed") from None
    name = cfg.hf_dataset
    try:
        if Path(name).expanduser().is_dir():
            data = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(data, datasets.DatasetDict):
                if cfg.hf_split not in data:
                    raise BadInput(f"dataset {name} has no split '{cfg.hf_split}' (splits: {', '.join(data)})")
                data = data[cfg.hf_split]
        else:
            with _hub_offline():
                data = datasets.load_dataset(name, split=cfg.hf_split)
    except BadInput:
        raise
    except Exception as exc:  # datasets raises many types for a missing or uncached dataset
        raise BadInput(f"cannot load dataset '{name}' offline: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    key = _pick_column(list(data.column_names), cfg.column or cfg.field, f"dataset {name}", "column")
    return _rows(iter(data), key)


_READERS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}


def _read_file(path: Path, cfg: QueriesConfig) -> list[Row]:
    if not path.is_file():
        raise BadInput(f"query file not found: {path}")
    kind = _READERS.get(path.suffix.lower())
    if kind == "csv":
        return _read_csv(path, cfg.column)
    if kind == "jsonl":
        return _read_jsonl(path, cfg.field)
    if kind == "txt":
        return _read_txt(path)
    raise BadInput(f"query file {path}: unsupported extension '{path.suffix}' (use {', '.join(_READERS)})")


def _to_queries(rows: list[Row], source: str, harmful: bool) -> list[Query]:
    """Assign ids (given ones, else q0001...) and categories; ids must be unique and file-name safe."""
    has_ids = any("id" in r for r in rows)
    queries, seen = [], set()
    for i, row in enumerate(rows, start=1):
        qid = row.get("id", "") if has_ids else f"q{i:04d}"
        if not SAFE_ID.match(qid):
            raise BadInput(f"{source}: query id {qid!r} (row {i}) must be non-empty and use only letters, digits, '.', '_' or '-'")
        if qid in seen:
            raise BadInput(f"{source}: duplicate query id '{qid}'")
        seen.add(qid)
        queries.append(Query(qid, row["text"], row.get("category", UNCATEGORISED), harmful))
    return queries


def _sample(queries: list[Query], limit: Optional[int], seed: int) -> list[Query]:
    """A seeded random subset of size `limit`, kept in the original order."""
    if limit is None or limit >= len(queries):
        return queries
    keep = sorted(random.Random(seed).sample(range(len(queries)), limit))
    return [queries[i] for i in keep]


def load_queries(cfg: QueriesConfig, seed: int, harmful: bool = True) -> list[Query]:
    """The harmful (or benign) request set named by `cfg`. `cfg.categories` filters the harmful set only;
    `cfg.limit` samples either set deterministically for `seed`. Raises BadInput."""
    if harmful and cfg.hf_dataset:
        source = f"dataset {cfg.hf_dataset}"
        rows = _read_hf(cfg)
    else:
        given = cfg.path if harmful else cfg.benign_path
        path = Path(given).expanduser() if given else (BUNDLED_HARMFUL if harmful else BUNDLED_BENIGN)
        # the user's column/field names apply to the user's own files, never to the bundled JSONL
        source, rows = str(path), _read_file(path, cfg if given else QueriesConfig())
    queries = _to_queries(rows, source, harmful)
    if harmful and cfg.categories:
        available = sorted({q.category for q in queries})
        unknown = [c for c in cfg.categories if c not in available]
        if unknown:
            raise BadInput(f"unknown query categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {source} (available: {', '.join(available)})")
        queries = [q for q in queries if q.category in cfg.categories]
    queries = _sample(queries, cfg.limit, seed)
    if not queries:
        raise BadInput(f"empty query set: {source} has no {'harmful' if harmful else 'benign'} requests")
    return queries
