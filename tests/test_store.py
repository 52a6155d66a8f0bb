"""The activation store: round trip, resume point, checksums, corrupted and truncated shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from afprobe.activations.store import StoreWriter, open_store
from afprobe.cli import main
from afprobe.config import Config
from afprobe.errors import BadInput
from afprobe.rundir import stage_hash

KEYS = [(0, "resid_post", "last"), (3, "resid_pre", "cue")]


def _store(run: Path, n: int = 6, shard: int = 4) -> dict:
    rows = [{"prompt_id": f"q{i}.f.{c}", "query_id": f"q{i}", "family": "f", "condition": c, "label": int(c == "training")}
            for i in range(n // 2) for c in ("training", "deployment")]
    (run / "prompts.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (run / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {k: torch.randn(n, 8) for k in KEYS}
    writer = StoreWriter(run / "activations", KEYS, 8, "float32", n, shard, "fp0")
    for start in range(0, n, shard):
        writer.write_shard(start, {k: v[start:start + shard] for k, v in data.items()})
    return data


def test_round_trip_and_metadata(tmp_path):
    data = _store(tmp_path)
    store = open_store(tmp_path)
    assert store.keys == KEYS and store.layers == [0, 3]
    for k in KEYS:
        np.testing.assert_array_equal(store.array(k), data[k].numpy())
    assert store.column("label").tolist() == [1, 0, 1, 0, 1, 0]


def test_incomplete_store_is_refused_and_resumes_after_last_shard(tmp_path):
    writer = StoreWriter(tmp_path / "activations", KEYS, 8, "float32", 6, 4, "fp0")
    writer.write_shard(0, {k: torch.zeros(4, 8) for k in KEYS})
    (tmp_path / "prompts.jsonl").write_text("{}\n" * 6)
    with pytest.raises(BadInput, match="incomplete"):
        open_store(tmp_path)
    again = StoreWriter(tmp_path / "activations", KEYS, 8, "float32", 6, 4, "fp0")
    assert again.resume_from == 4
    with pytest.raises(BadInput, match="different settings"):
        StoreWriter(tmp_path / "activations", KEYS, 16, "float32", 6, 4, "fp0")


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_shard_names_the_file(tmp_path, damage):
    _store(tmp_path)
    shard = tmp_path / "activations" / "shard-00001.safetensors"
    if damage == "corrupt":
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    with pytest.raises(BadInput, match="shard-00001.safetensors"):
        open_store(tmp_path).arrays()


def test_probe_on_a_corrupted_store_exits_2(tmp_path, capsys):
    _store(tmp_path)
    cfg = Config()
    manifest = {"config": cfg.model_dump(mode="json"), "config_hash": stage_hash(cfg, "cache"),
                "model_fingerprint": "fp0", "stages": {"cache": {"status": "done", "config_hash": stage_hash(cfg, "cache")}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shard = tmp_path / "activations" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["probe", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "shard-00000.safetensors" in err and len(err.strip().splitlines()) == 1


def test_store_from_another_model_is_refused(tmp_path, capsys):
    _store(tmp_path)
    cfg = Config()
    manifest = {"config": cfg.model_dump(mode="json"), "config_hash": stage_hash(cfg, "cache"),
                "model_fingerprint": "another", "stages": {"cache": {"status": "done"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["probe", str(tmp_path)]) == 2
    assert "another model" in capsys.readouterr().err
