"""Interrupted runs resume: a real `afprobe cache` and `afprobe steer` killed with SIGKILL, rerun with
the same arguments, give exactly what an uninterrupted run gives (which also shows determinism)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from afprobe.activations.store import open_store

pytestmark = pytest.mark.slow

CONFIG = """
name: resume-test
seed: 3
scenario: {cue_families: [tier_tag, explicit]}
queries: {limit: 10}
cache: {layers: [0, 14, 29], positions: [last, cue], shard_prompts: 2, batch_tokens: 600}
probes: {folds: 2, bootstrap: 50, methods: [diff_means, logreg], permutations: 40, random_directions: 20}
steering: {alphas: [-1.0, 0.0, 1.0], n_queries: 4, max_new_tokens: 4, controls: [random], batch_size: 2, mode: both}
"""


def _afprobe(*args: str) -> list[str]:
    return [sys.executable, "-m", "afprobe.cli", *args, "--quiet"]


def _ok(*args: str) -> None:
    proc = subprocess.run(_afprobe(*args), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _kill_when(args: list[str], ready, timeout: float = 600) -> None:
    """Start `afprobe args`, SIGKILL it as soon as `ready()` holds; fail if it finished first."""
    proc = subprocess.Popen(_afprobe(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.time()
    while time.time() - start < timeout:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-1000:]!r}"
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the kill point")


def _index(run: Path) -> dict:
    try:
        return json.loads((run / "activations" / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("timings_s")
    return summary


def test_killed_cache_and_steer_resume_to_the_uninterrupted_result(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _ok("run", str(cfg), "--out", str(whole))

    _kill_when(["cache", str(cfg), "--out", str(resumed)],
               lambda: 1 <= len(_index(resumed).get("shards", [])) and not _index(resumed).get("complete"))
    assert not _index(resumed)["complete"]
    _ok("cache", str(cfg), "--out", str(resumed))
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["stages"]["cache"]["resumed"] is True
    a, b = open_store(whole), open_store(resumed)
    assert [p["prompt_id"] for p in a.prompts] == [p["prompt_id"] for p in b.prompts]
    assert len({p["prompt_id"] for p in b.prompts}) == len(b.prompts)
    for key in a.keys:
        np.testing.assert_array_equal(a.array(key), b.array(key))

    _ok("probe", str(resumed))
    parts = resumed / "steering" / "parts"
    _kill_when(["steer", str(resumed)], lambda: parts.is_dir() and len(list(parts.glob("*.jsonl"))) >= 1)
    _ok("steer", str(resumed))
    _ok("report", str(resumed))
    assert json.loads((resumed / "manifest.json").read_text())["stages"]["steer"]["resumed"] is True
    gens = lambda run: [json.loads(x) for x in (run / "steering" / "generations.jsonl").read_text().splitlines()]  # noqa: E731
    assert gens(whole) == gens(resumed)
    assert _summary(whole) == _summary(resumed)


def _check_both_modes_and_families(run: Path) -> None:
    """mode both: same and cross sweeps for probe and random, sharing the one unsteered alpha-0 run;
    unsteered compliance under every cue family; a monotonicity check per mode."""
    with (run / "steering" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["direction"], r["mode"]) for r in rows} == {(d, m) for d in ("probe", "random") for m in ("same", "cross")}
    assert {r["replicate"] for r in rows if r["direction"] == "random"} == {"0", "1", "2"}  # steering.n_random 3
    zero = [r for r in rows if float(r["alpha"]) == 0]
    assert len(zero) == 2 + 2 * 3 and len({(r["gap"], r["logodds_gap"]) for r in zero}) == 1
    parts = {p.name for p in (run / "steering" / "parts").glob("*.jsonl")}
    assert not [p for p in parts if ".cross." in p and "a+0.000" in p]  # alpha 0 computed once
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["compliance_by_family"]) == ["tier_tag", "explicit"]
    assert summary["compliance_by_family"]["tier_tag"]["log_odds"] == summary["compliance"]["log_odds"]
    other = [json.loads(x) for x in (run / "steering" / "parts" / "unsteered.other_families.jsonl").read_text().splitlines()]
    assert sorted((r["family"], r["condition"]) for r in other) == sorted([("explicit", c) for c in ("training", "deployment")] * 4)
    assert np.isfinite(summary["compliance_by_family"]["explicit"]["log_odds"]["gap"])
    best = summary["probe"]["best"]  # the cache holds last and cue positions at layers 0, 14, 29
    assert best["position"] == "last" and best["layer"] >= 1 and best["n_cells"] == 2 * 2  # 2 layers x 2 methods
    checks = summary["steering"]["checks"]
    assert {c["mode"] for c in checks} == {"same", "cross"} and all(c["n_random"] == 3 for c in checks)
    assert all(c["effect_diff_ci"][0] <= c["effect_diff"] <= c["effect_diff_ci"][1] for c in checks)
    assert summary["steering"]["selection"] == "in_sample"  # 10 cached queries: too few to hold any out
    assert "Steering, cross mode, layer" in (run / "report" / "report.md").read_text()


def test_rerun_redoes_only_what_changed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    _ok("run", str(cfg), "--out", str(run))
    stamps = lambda: {k: v.get("started_at") for k, v in json.loads((run / "manifest.json").read_text())["stages"].items()}  # noqa: E731
    first = stamps()
    _check_both_modes_and_families(run)
    _ok("run", str(cfg), "--out", str(run))
    again = stamps()
    assert {k: again[k] for k in ("cache", "probe", "steer")} == {k: first[k] for k in ("cache", "probe", "steer")}
    time.sleep(1.1)  # stamps have one-second resolution
    _ok("run", str(cfg), "--out", str(run), "--set", "steering.alphas=[0.0,2.0]")
    changed = stamps()
    assert changed["cache"] == first["cache"] and changed["probe"] == first["probe"]
    assert changed["steer"] != first["steer"]
    rows = (run / "steering" / "results.csv").read_text()
    assert ",2.0," in rows and ",-1.0," not in rows
    # a deleted stage folder is computed again, not reported "up to date"
    shutil.rmtree(run / "probes")
    time.sleep(1.1)
    _ok("probe", str(run))
    assert (run / "probes" / "metrics.csv").is_file() and stamps()["probe"] != changed["probe"]
