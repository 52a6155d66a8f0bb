"""`afprobe sweep`: validation before any weights load, reuse of shared stages (asserted from the run
manifests), failure recording, kill + rerun equal to an uninterrupted sweep, --status, the submitit executor
with real subprocesses, the offline SLURM job script, and sweep.csv / sweep.html."""
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

import pytest

from afprobe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"

BASE = """
name: tiny-sweep
model: {{spec: {spec}}}
scenario: {{cue_families: [tier_tag, swapped_tier]}}
queries: {{limit: 6}}
cache: {{layers: all, positions: [last], batch_tokens: 2000}}
probes: {{folds: 2, bootstrap: 20, methods: [diff_means], permutations: 10, random_directions: 5, selection_folds: 2}}
steering: {{alphas: [-1.0, 0.0, 1.0], n_queries: 3, max_new_tokens: 2, controls: [random], n_random: 1,
           known_answer: false, selection: in_sample, scorer: logodds}}
"""

# A and B differ only in steering settings (they share cache and probes); C is another scenario variant (its own
# cache); D fails in its steer stage (no such direction file) after reusing A's cache and probes.
SWEEP = """
base: base.yaml
set: {seed: 1}
cells:
  - {scenario.variant: helpful_only, steering.mode: same}
  - {scenario.variant: helpful_only, steering.mode: cross}
  - {scenario.variant: never_used, steering.mode: same}
  - {scenario.variant: helpful_only, steering.mode: same, steering.direction: nosuch}
"""
A, B, C, D = ("variant=helpful_only__mode=same", "variant=helpful_only__mode=cross", "variant=never_used__mode=same",
              "variant=helpful_only__mode=same__direction=nosuch")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, smol_tokenizer):
    """A folder with the tiny model, base.yaml and sweep.yaml."""
    from afprobe.activations.loading import tiny_llama

    folder = tmp_path_factory.mktemp("sweep")
    tiny_llama(seed=0).save_pretrained(folder / "tiny")
    smol_tokenizer.save_pretrained(folder / "tiny")
    (folder / "base.yaml").write_text(BASE.format(spec=folder / "tiny"))
    (folder / "sweep.yaml").write_text(SWEEP)
    return folder


@pytest.fixture(scope="module")
def finished(sweep_dir):
    """The sweep run once, uninterrupted, in this process: (exit code, out dir)."""
    out = sweep_dir / "out"
    code = main(["sweep", str(sweep_dir / "sweep.yaml"), "--out", str(out), "--quiet"])
    return code, out


# ------------------------------------------------------------------------------------------ validation

BAD = [
    ("grid: {scenario.variantt: [a, b]}", "grid key 'scenario.variantt' is not a config key; did you mean 'scenario.variant'"),
    ("grid: {}", "'grid' is empty"),
    ("grid: {queries.limit: []}", "grid key 'queries.limit' is an empty list"),
    ("grid: {queries.limit: 4}", "grid key 'queries.limit' must be a list"),
    ("grid: {queries.limit: [4, many]}", "config key 'queries.limit'"),
    ("set: {probes.foldz: 3}", "set key 'probes.foldz' is not a config key"),
    ("cells: [{steering.alphas: 3}]", "config key 'steering.alphas'"),
    ("cells: [{model.spec: x}, {model.spec: x}]", "have the same config"),
    ("grids: {seed: [1, 2]}", "unknown key 'grids'"),
    ("executor: {kind: submitit, slurm: {gpus_per_cell: -1}}", "executor key 'slurm.gpus_per_cell'"),
    ("executor: ssh", "executor key 'kind'"),
    ("grid: {scenario.variant: [helpful_only, no_such_variant]}", "no_such_variant"),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_sweep_file_is_exit_2_before_any_model_loads(tmp_path, capsys, body, message):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(f"base: {DEFAULT}\n{body}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "cells").exists()  # nothing ran


def test_missing_base_and_status_without_sweep(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: nowhere.yaml\ngrid: {seed: [1, 2]}\n")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "o")]) == 2
    assert "base config not found" in capsys.readouterr().err
    assert main(["sweep", "--status", str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err


def test_cell_names_are_readable_safe_and_unique():
    from afprobe.fsio import safe_name
    from afprobe.sweep import _cell_names

    choices = [{"model.spec": "org/Model-7B", "scenario.variant": "never_used", "cache.layers": [1, 2]},
               {"model.spec": "/abs/path/to/folder", "scenario.variant": "never_used", "cache.layers": "all"},
               {"model.spec": "org/Model-7B", "scenario.variant": "a" * 200, "cache.layers": "all"}]
    names = _cell_names(choices, ["model.spec", "scenario.variant", "cache.layers"])
    assert names[0] == "spec=Model-7B__variant=never_used__layers=1-2"
    assert names[1] == "spec=folder__variant=never_used__layers=all"
    assert len(set(names)) == 3 and all(safe_name(n) == n and len(n) <= 100 for n in names)


def test_slurm_job_script_checked_offline(tmp_path, capsys):
    """The SLURM job script submitit would submit, made and checked without a cluster (--dry-run)."""
    pytest.importorskip("submitit")
    sweep = tmp_path / "gpu.yaml"
    sweep.write_text(f"""base: {DEFAULT}
grid: {{scenario.variant: [helpful_only, never_used, throughput_testing], steering.mode: [same, cross]}}
executor:
  kind: submitit
  slurm: {{partition: gpu-h100, gpus_per_cell: 2, time_min: 90, array_parallelism: 3, mem_gb: 64, cpus_per_cell: 16,
          account: proj1, setup: ["source .venv/bin/activate"], additional: {{mail-type: END}}}}
""")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "6 cells, 3 caches, 3 probe sweeps, 1 model(s)" in printed
    assert "cache from variant=helpful_only__mode=same" in printed
    script = (out / "slurm" / "job.sbatch").read_text()
    for line in ("#SBATCH --partition=gpu-h100", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --array=0-5%3", "#SBATCH --mem=64GB", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --account=proj1", "#SBATCH --mail-type=END", "source .venv/bin/activate",
                 "-m submitit.core._submit"):
        assert line in script, (line, script)
    assert script.startswith("#!/bin/bash") and not (out / "cells").exists()
    bad = tmp_path / "bad.yaml"  # an sbatch option submitit refuses is exit 2 at --dry-run
    bad.write_text(sweep.read_text().replace("mem_gb: 64", "mem_gb: -3"))
    assert main(["sweep", str(bad), "--out", str(out), "--dry-run"]) == 2


# ------------------------------------------------------------------------------------------ running

@pytest.mark.slow
def test_sweep_reuses_cache_and_model_and_records_failure(finished, capsys):
    code, out = finished
    assert code == 1  # cell D failed
    m = {name: _json(out / "cells" / name / "manifest.json") for name in (A, B, C, D)}
    # A and B differ only in steering: one model load, one cache, one probe sweep
    assert m[A]["sweep"]["model_load"] == "loaded" and m[B]["sweep"]["model_load"] == "shared"
    assert "reused_from" not in m[A]["stages"]["cache"] and m[B]["stages"]["cache"]["reused_from"] == A
    assert m[B]["stages"]["probe"]["reused_from"] == A and m[B]["stages"]["steer"]["status"] == "done"
    assert m[B]["stages"]["cache"]["seconds"] == m[A]["stages"]["cache"]["seconds"]  # the record of the one computation
    shard = next((out / "cells" / A / "activations").glob("shard-*.safetensors"))
    assert (out / "cells" / B / "activations" / shard.name).stat().st_ino == shard.stat().st_ino  # same file
    assert "reused_from" not in m[C]["stages"]["cache"] and m[C]["sweep"]["model_load"] == "shared"
    loads = [i for i in _json(out / "sweep.json")["invocations"] if i["cells_run"]][0]["model_loads"]
    assert list(loads.values()) == [1]
    # D: reused A's stages, failed in steer with a one-line reason; recorded, and the sweep went on
    state = _json(out / "state" / f"{D}.json")
    assert state["status"] == "failed" and "nosuch" in state["reason"] and "\n" not in state["reason"]
    rows = {r["cell"]: r for r in _csv(out / "sweep.csv")}
    assert [rows[n]["status"] for n in (A, B, C, D)] == ["done", "done", "done", "failed"]
    from afprobe.analysis.schema import read_summary

    for name in (A, B, C):
        s = read_summary(out / "cells" / name / "summary.json")
        r = rows[name]
        assert r["gap_verdict"] == s.compliance.gap.verdict and float(r["gap"]) == pytest.approx(s.compliance.gap.estimate)
        assert int(r["best_layer"]) == s.probe.best.layer and r["probe_verdict"] == s.probe.verdict
        assert float(r["best_layer_frac"]) == pytest.approx(s.probe.best.layer / (s.n_layers - 1), abs=1e-4)
        assert r["variant"] and r["model"] and json.loads(r["overrides"])["seed"] == 1
    assert rows[B]["steer_mode"] == "cross" and rows[A]["steer_mode"] == "same"
    assert rows[D]["reason"] == state["reason"]
    html = (out / "sweep.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 3 and "compliance gap" in html.lower()
    assert (out / "sweep.md").read_text().count("](sweep-figures/") == 3
    # --status: every cell with its state and reason
    assert main(["sweep", "--status", str(out)]) == 0
    status = capsys.readouterr().out
    assert f"failed   {D}" in status and "nosuch" in status and f"done     {B}" in status
    assert "3 done, 0 running, 1 failed, 0 pending" in status


def _run_sweep_proc(sweep: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "afprobe.cli", "sweep", str(sweep), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_midway_and_rerun_equals_uninterrupted(finished, sweep_dir, tmp_path):
    _, reference = finished
    out = tmp_path / "out"
    proc = _run_sweep_proc(sweep_dir / "sweep.yaml", out)
    start = time.time()
    while not (_json(out / "state" / f"{A}.json").get("status") == "done"
               and _json(out / "state" / f"{B}.json").get("status") == "running"):
        assert proc.poll() is None, proc.communicate()[1][-1500:]
        assert time.time() - start < 900
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first_a = _json(out / "state" / f"{A}.json")
    from afprobe.sweep import cell_status, load_sweep

    sweep = load_sweep(sweep_dir / "sweep.yaml", check_inputs=False)
    assert cell_status(out, sweep.cell(B)) == ("pending", "interrupted; a rerun resumes it")
    rerun = _run_sweep_proc(sweep_dir / "sweep.yaml", out)
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 1, err[-1500:]  # D fails again; A, B, C done
    assert _json(out / "state" / f"{A}.json")["finished_at"] == first_a["finished_at"]  # A was not redone
    ran = [i for i in _json(out / "sweep.json")["invocations"] if i["cells_run"]]
    assert ran[-1]["cells_run"] == [B, C, D]
    got, want = _csv(out / "sweep.csv"), _csv(reference / "sweep.csv")
    skip = {"reuse", "reason"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in got] == \
           [{k: v for k, v in r.items() if k not in skip} for r in want]


@pytest.mark.slow
def test_submitit_local_executor_runs_cells_as_subprocesses(sweep_dir, tmp_path):
    pytest.importorskip("submitit")
    sweep = sweep_dir / "submitit.yaml"
    sweep.write_text("base: base.yaml\nset: {seed: 1}\ngrid: {steering.mode: [same, cross]}\n"
                     "executor: {kind: submitit, cluster: local, poll_s: 0.5}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    same, cross = "mode=same", "mode=cross"
    states = {n: _json(out / "state" / f"{n}.json") for n in (same, cross)}
    assert all(s["status"] == "done" and s["pid"] != os.getpid() for s in states.values())
    assert states[same]["pid"] != states[cross]["pid"]  # one job (process) per cell
    assert states[cross]["reuse"]["cache"] == f"reused from {same}"  # wave 2 reused wave 1's cache
    jobs = _json(out / "slurm" / "jobs.json")
    assert jobs  # the last wave's job ids
    assert all(r["status"] == "done" for r in _csv(out / "sweep.csv"))


def test_shipped_sweep_files_validate(tmp_path):
    """configs/sweeps/*.yaml validate (without weights: the GPU models are not on this machine), and the GPU
    sweep's SLURM job script is made offline."""
    pytest.importorskip("submitit")
    from afprobe.sweep import load_sweep, slurm_script

    variants = load_sweep(ROOT / "configs" / "sweeps" / "variants.yaml", check_inputs=False)
    assert len(variants.cells) == 6 and variants.varying == ["model.spec", "scenario.variant"]
    assert len({c.model_key for c in variants.cells}) == 2
    gpu = load_sweep(ROOT / "configs" / "sweeps" / "models-gpu.yaml", check_inputs=False)
    assert len(gpu.cells) == 12 and gpu.executor.kind == "submitit"
    assert len({c.hash("cache") for c in gpu.cells}) == 6  # the two steering modes share a cache
    script = slurm_script(gpu, tmp_path)
    assert "#SBATCH --array=0-11%6" in script and "#SBATCH --partition=gpu" in script


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_sweep_html_renders_in_headless_chromium(finished, tmp_path):
    from tests.test_report_browser import FLAGS, PROBE_JS

    _, out = finished
    html = (out / "sweep.html").read_text()
    n_images = html.count('<img src="data:image/png;base64,')
    assert n_images == 3 and "http://" not in html and "https://" not in html  # self-contained
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", PROBE_JS + "</body>"))
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"IMAGES {n_images} OK {n_images}" in proc.stdout, proc.stdout[:2000]
    sizes = [line.split()[1] for line in proc.stdout.split('<pre id="probe">')[1].split("</pre>")[0].splitlines()]
    assert all(int(s.split("x")[0]) > 100 and int(s.split("x")[1]) > 100 for s in sizes), sizes
