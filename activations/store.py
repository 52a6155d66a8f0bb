"""The activation store: `index.json` plus safetensors shards, written atomically and checksummed.

Layout of `<run>/activations/`:

    index.json            {"format": "afprobe-activations/1", "d_model", "dtype", "keys": [...],
                           "n_prompts", "shard_prompts", "shards": [{"file", "start", "stop", "sha256"}],
                           "fingerprint", "complete"}
    shard-00000.safetensors  one tensor per key "L{layer}.{site}.{position}", shape [stop - start, d_model]

Row i of every tensor is prompt i of `<run>/prompts.jsonl`. A shard is listed in the index only
after it is fully on disk, so an interrupted cache never leaves a half-written shard referenced.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_bytes, atomic_write_json

FORMAT = "afprobe-activations/1"
FeatureKey = tuple[int, str, str]  # (layer, site, position)


def key_name(key: FeatureKey) -> str:
    layer, site, position = key
    return f"L{layer}.{site}.{position}"


def parse_key(name: str) -> FeatureKey:
    layer, site, position = name.split(".")
    return int(layer[1:]), site, position


@dataclass
class StoreWriter:
    """Appends shards in prompt order; `resume_from` says where an interrupted run stopped."""

    folder: Path
    keys: list[FeatureKey]
    d_model: int
    dtype: str
    n_prompts: int
    shard_prompts: int
    fingerprint: str
    index: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "index.json"
        fresh = {
            "format": FORMAT, "d_model": self.d_model, "dtype": self.dtype, "keys": [key_name(k) for k in self.keys],
            "n_prompts": self.n_prompts, "shard_prompts": self.shard_prompts, "fingerprint": self.fingerprint,
            "shards": [], "complete": False,
        }
        if path.is_file():
            old = json.loads(path.read_text())
            same = {k: old.get(k) for k in fresh if k not in ("shards", "complete")} == {
                k: v for k, v in fresh.items() if k not in ("shards", "complete")
            }
            if not same:
                raise BadInput(f"{path} holds a store made with different settings; use a new --out or --force")
            self.index = old
        else:
            self.index = fresh
            atomic_write_json(path, self.index)

    @property
    def resume_from(self) -> int:
        return self.index["shards"][-1]["stop"] if self.index["shards"] else 0

    def write_shard(self, start: int, arrays: dict[FeatureKey, torch.Tensor]) -> None:
        """arrays: {key: [n, d_model]} for prompts start .. start + n."""
        torch_dtype = torch.float16 if self.dtype == "float16" else torch.float32
        tensors = {key_name(k): v.detach().to("cpu", torch_dtype).contiguous() for k, v in arrays.items()}
        n = next(iter(tensors.values())).shape[0]
        data = save_safetensors_bytes(tensors, metadata={"start": str(start), "stop": str(start + n)})
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        atomic_write_bytes(self.folder / name, data)
        self.index["shards"].append(
            {"file": name, "start": start, "stop": start + n, "sha256": hashlib.sha256(data).hexdigest()}
        )
        self.index["complete"] = start + n >= self.n_prompts
        atomic_write_json(self.folder / "index.json", self.index)


@dataclass
class Store:
    """Read access to a finished store. `array(key)` -> np.ndarray [n_prompts, d_model] (float32)."""

    folder: Path
    index: dict[str, Any]
    prompts: list[dict[str, Any]]

    @property
    def keys(self) -> list[FeatureKey]:
        return [parse_key(k) for k in self.index["keys"]]

    @property
    def layers(self) -> list[int]:
        return sorted({k[0] for k in self.keys})

    def _shard(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        path = self.folder / entry["file"]
        if not path.is_file():
            raise BadInput(f"activation shard {path} is missing; rerun `afprobe cache` on this run directory")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BadInput(
                f"activation shard {path} is corrupted (checksum mismatch); delete it and its entry in "
                "index.json, or rerun `afprobe cache` with a fresh --out"
            )
        try:
            return load_safetensors_bytes(data)
        except Exception:
            raise BadInput(f"activation shard {path} is not a readable safetensors file; rerun `afprobe cache`") from None

    def arrays(self, keys: Optional[Iterable[FeatureKey]] = None) -> dict[FeatureKey, np.ndarray]:
        wanted = list(keys) if keys is not None else self.keys
        parts: dict[FeatureKey, list[np.ndarray]] = {k: [] for k in wanted}
        for entry in self.index["shards"]:
            shard = self._shard(entry)
            for k in wanted:
                parts[k].append(shard[key_name(k)])
        return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}

    def array(self, key: FeatureKey) -> np.ndarray:
        return self.arrays([key])[key]

    def column(self, name: str) -> np.ndarray:
        """A prompt metadata column (e.g. "label", "family", "query_id") as an array."""
        return np.array([p[name] for p in self.prompts])


def open_store(run_dir: Path | str) -> Store:
    """Open `<run_dir>/activations` with its prompt metadata; BadInput when missing or incomplete."""
    run_dir = Path(run_dir)
    folder = run_dir / "activations"
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise BadInput(f"{run_dir} has no activation store; run `afprobe cache CONFIG --out {run_dir}` first")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError:
        raise BadInput(f"{index_path} is corrupted; rerun `afprobe cache`") from None
    if index.get("format") != FORMAT:
        raise BadInput(f"{index_path} is not an afprobe activation store ({index.get('format')!r})")
    if not index.get("complete"):
        raise BadInput(f"the activation store in {run_dir} is incomplete; rerun `afprobe cache` to finish it")
    prompts_path = run_dir / "prompts.jsonl"
    if not prompts_path.is_file():
        raise BadInput(f"{prompts_path} is missing")
    prompts = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    if len(prompts) != index["n_prompts"]:
        raise BadInput(f"{prompts_path} has {len(prompts)} prompts but the store has {index['n_prompts']}")
    return Store(folder, index, prompts)
