"""One writer per run directory: real concurrent `afprobe cache` processes on the embedded model, and a
SIGKILLed writer whose lock does not block the resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afprobe.errors import BadInput
from afprobe.rundir import LOCK_NAME, lock_holder, writer_lock

CONFIG = """
name: lock-test
scenario: {cue_families: [tier_tag, explicit]}
queries: {limit: 8}
cache: {layers: [0, 29], positions: [last], shard_prompts: 2, batch_tokens: 400}
"""


def _cmd(out: Path, cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "afprobe.cli", "cache", str(cfg), "--out", str(out), *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 600) -> None:
    start = time.time()
    while not pred():
        assert proc.poll() is None, f"writer ended early: {proc.communicate()[1][-1500:]!r}"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def test_dead_pid_lock_file_is_taken_over(tmp_path):
    """A lock file naming a process that no longer exists (nobody holds the OS lock) does not block."""
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "hostname": os.uname().nodename,
                                             "started_at": "then", "command": "afprobe cache"}))
    assert lock_holder(run) is None
    with writer_lock(run, wait=False):
        assert _json(run / LOCK_NAME)["pid"] == os.getpid()
        with writer_lock(run, wait=False):  # re-entrant in one process
            assert lock_holder(run)["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists() and lock_holder(run) is None


def test_second_writer_in_another_process_is_refused(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
from afprobe.rundir import writer_lock
with writer_lock(Path({str(run)!r}), wait=False):
    print("locked", flush=True)
    sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    try:
        assert lock_holder(run)["pid"] == holder.pid
        with pytest.raises(BadInput, match=f"pid {holder.pid}"):
            with writer_lock(run, wait=False):
                pass
    finally:
        holder.communicate("\n")
    with writer_lock(run, wait=False):  # released: free again
        pass


@pytest.mark.slow
def test_concurrent_caches_one_writer_and_sigkill_resume(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(out, cfg, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env())
    _wait_for(lambda: _json(out / LOCK_NAME).get("pid") == first.pid
              and _json(out / "manifest.json").get("stages", {}).get("cache", {}).get("status") == "running", first)
    refused = subprocess.Popen(_cmd(out, cfg, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    waiter = subprocess.Popen(_cmd(out, cfg, "--wait"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env())
    r_out, r_err = refused.communicate(timeout=600)
    f_out, f_err = first.communicate(timeout=600)
    w_out, w_err = waiter.communicate(timeout=600)
    assert first.returncode == 0, f_err[-1500:]
    assert refused.returncode == 2 and f"pid {first.pid}" in r_err and "Traceback" not in r_err, r_err
    assert waiter.returncode == 0, w_err[-1500:]
    assert "waiting for the writer" in w_out and f"pid {first.pid}" in w_out and "up to date" in w_out, w_out
    cache = _json(out / "manifest.json")["stages"]["cache"]
    assert cache["status"] == "done" and cache["resume_count"] == 0  # nobody wrote after the first writer
    assert not (out / LOCK_NAME).exists()

    # a writer killed with SIGKILL mid-cache leaves its lock file; the rerun takes it over and resumes
    out2 = tmp_path / "run2"
    killed = subprocess.Popen(_cmd(out2, cfg, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env())
    _wait_for(lambda: len(_json(out2 / "activations" / "index.json").get("shards", [])) >= 1, killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert _json(out2 / LOCK_NAME)["pid"] == killed.pid and lock_holder(out2) is None
    rerun = subprocess.run(_cmd(out2, cfg), capture_output=True, text=True, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    assert f"taking over the writer lock left by pid {killed.pid}" in rerun.stdout and "no longer running" in rerun.stdout
    cache2 = _json(out2 / "manifest.json")["stages"]["cache"]
    assert cache2["status"] == "done" and cache2["resume_count"] == 1
    assert _json(out2 / "activations" / "index.json")["n_prompts"] == _json(out / "activations" / "index.json")["n_prompts"]
