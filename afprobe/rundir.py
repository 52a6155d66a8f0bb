"""Run directory bookkeeping: the manifest (config, versions, fingerprint, stage status) and summary.json."""
from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

from afprobe.analysis.schema import SCHEMA_VERSION
from afprobe.config import Config, validate_config
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_json, atomic_write_text

STAGE_SECTIONS = {
    "cache": ("seed", "model", "scenario", "cue_families", "queries", "cache"),
    "probe": ("seed", "model", "scenario", "cue_families", "queries", "cache", "probes"),
    "steer": ("seed", "model", "scenario", "cue_families", "queries", "cache", "probes", "steering"),
}
STAGE_FOLDERS = {"cache": "activations", "probe": "probes", "steer": "steering", "report": "report", "judge": "judge"}
_PACKAGES = ("afprobe", "torch", "transformers", "transformer-lens", "nnsight", "scikit-learn", "numpy", "safetensors", "peft")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _plain(value: Any) -> Any:
    """Pydantic models nested in lists or dicts, as plain data."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def stage_hash(cfg: Config, stage: str) -> str:
    """The config sections a stage depends on; the probe and steer stages also depend on the summary.json
    schema they write, so a new schema redoes them (the cache is kept)."""
    base = cfg.section_hash(*STAGE_SECTIONS[stage])
    return base if stage == "cache" else f"{base}.s{SCHEMA_VERSION}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BadInput(f"{path} is corrupted (not valid JSON)") from None


@dataclass
class RunDir:
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return _read_json(self.manifest_path) if self.manifest_path.is_file() else {}

    def config(self) -> Config:
        manifest = self.manifest()
        if "config" not in manifest:
            raise BadInput(f"{self.path} is not an afprobe run directory (no manifest.json); run `afprobe cache` first")
        return validate_config(manifest["config"])

    def stage_done(self, stage: str, cfg: Config) -> bool:
        """Done with this config, and its output folder still there (a deleted folder means: compute it again)."""
        info = self.manifest().get("stages", {}).get(stage, {})
        folder = STAGE_FOLDERS.get(stage)
        return (info.get("status") == "done" and info.get("config_hash") == stage_hash(cfg, stage)
                and (folder is None or (self.path / folder).is_dir()))

    def claim(self, cfg: Config, force: bool) -> None:
        """Start or continue a run here; refuse a directory holding a different run unless forced."""
        manifest = self.manifest()
        if manifest and manifest.get("config_hash") != stage_hash(cfg, "cache") and not force:
            raise BadInput(
                f"output directory {self.path} holds a different run (its model/scenario/queries/cache config "
                "differs); choose another --out or pass --force"
            )
        if not manifest and self.path.is_dir() and any(p.name != LOCK_NAME for p in self.path.iterdir()) and not force:
            raise BadInput(f"output directory {self.path} is not empty and holds no afprobe run; choose another --out")
        if manifest and manifest.get("config_hash") != stage_hash(cfg, "cache"):
            manifest = {}  # forced: the old stages no longer describe this run
            for sub in ("activations", "probes", "steering", "report"):
                target = self.path / sub
                if target.is_dir():
                    for f in sorted(target.rglob("*"), reverse=True):
                        f.unlink() if f.is_file() else f.rmdir()
            for name in ("summary.json", "prompts.jsonl"):
                (self.path / name).unlink(missing_ok=True)
        manifest.setdefault("stages", {})
        manifest["config"] = cfg.model_dump(mode="json")
        manifest["config_hash"] = stage_hash(cfg, "cache")
        manifest["versions"] = package_versions()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.manifest_path, manifest)

    def update(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)

    def check_fingerprint(self, fingerprint: str, force: bool) -> None:
        known = self.manifest().get("model_fingerprint")
        if known and known != fingerprint and not force:
            raise BadInput(
                f"model fingerprint {fingerprint} differs from the one that made {self.path} ({known}); "
                "the weights changed; use a new run directory or --force"
            )
        self.update(model_fingerprint=fingerprint)

    @contextmanager
    def stage(self, name: str, cfg: Config, **info: Any) -> Iterator[dict[str, Any]]:
        """Mark a stage running, then done with its timing; `extra` fields go to the manifest."""
        manifest = self.manifest()
        previous = manifest.get("stages", {}).get(name, {})
        resumed = previous.get("status") == "running"
        record = {"status": "running", "config_hash": stage_hash(cfg, name) if name in STAGE_SECTIONS else None,
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": resumed,
                  "resume_count": previous.get("resume_count", 0) + int(resumed), **info}
        manifest.setdefault("stages", {})[name] = record
        atomic_write_json(self.manifest_path, manifest)
        extra: dict[str, Any] = {}
        start = time.perf_counter()
        yield extra
        manifest = self.manifest()
        record.update(status="done", seconds=round(time.perf_counter() - start, 3), **extra)
        manifest.setdefault("stages", {})[name] = record
        atomic_write_json(self.manifest_path, manifest)

    def summary(self) -> "Summary":
        """summary.json through its schema (an empty summary when there is none yet)."""
        from afprobe.analysis.schema import Summary, read_summary

        return read_summary(self.path / "summary.json") or Summary()

    def update_summary(self, **sections: Any) -> None:
        """Replace the given top-level sections (models or plain data) and rewrite summary.json strictly."""
        from afprobe.analysis.schema import Summary, summary_json, validated

        data = self.summary().model_dump(mode="json")
        data.update({k: v.model_dump(mode="json") if hasattr(v, "model_dump") else _plain(v)
                     for k, v in sections.items()})
        timings = {name: info.get("seconds") for name, info in self.manifest().get("stages", {}).items()}
        data["timings_s"] = {k: timings.get(k) for k in ("cache", "probe", "steer", "report")}
        atomic_write_text(self.path / "summary.json", summary_json(validated(Summary, data, "summary.json")))

    def require(self, stage: str, cfg: Optional[Config] = None) -> None:
        info = self.manifest().get("stages", {}).get(stage, {})
        if info.get("status") != "done":
            raise BadInput(f"stage '{stage}' has not finished in {self.path}; run `afprobe {stage}` first")


# --- one writer per run directory ------------------------------------------------------------------------------

LOCK_NAME = ".afprobe.lock"
_held: dict[str, list] = {}  # resolved run dir -> [open lock file, depth]: the lock is re-entrant in one process
_wait_default = False  # `afprobe ... --wait` and the sweep set this: a second writer waits instead of exit 2


def set_lock_wait(wait: bool) -> None:
    """What a second writer does by default in this process: wait for the holder (True) or exit 2 (False)."""
    global _wait_default
    _wait_default = bool(wait)


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(path: Path) -> Optional[dict[str, Any]]:
    """Who holds the writer lock of run directory `path` right now: {pid, hostname, started_at, command},
    or None when nobody does (no lock file, or one left by a process that is gone)."""
    import fcntl

    lock = Path(path) / LOCK_NAME
    if str(Path(path).resolve()) in _held:
        return _lock_info(lock)
    try:
        fh = open(lock, "r")
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_info(lock) or {"pid": None, "hostname": None, "started_at": None}
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def _lock_info(lock: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(lock.read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _describe(info: Optional[dict[str, Any]]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('hostname')} (since {info.get('started_at')}: {info.get('command', '')})"


@contextmanager
def writer_lock(path: Path, wait: Optional[bool] = None, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the writer lock of run directory `path` (the file `path/.afprobe.lock`, an OS advisory lock plus the
    holder's pid, hostname, start time and command). Re-entrant within one process.

    A second writer waits for the holder when `wait` (default: `set_lock_wait`), else raises BadInput naming the
    holder (exit 2). The OS releases the lock when its process dies, however it dies (SIGKILL included), so a
    lock left by a killed writer is taken over at once and resume works; the takeover is logged."""
    import fcntl
    import os
    import socket
    import sys

    from afprobe.log import log

    path = Path(path)
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    wait = _wait_default if wait is None else wait
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    announced = False
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            holder = _lock_info(lock)
            if not wait:
                raise BadInput(f"run directory {path} is being written by {_describe(holder)}; wait for it to finish "
                               "(or pass --wait to queue behind it)") from None
            if not announced:
                log.info(f"{path}: waiting for the writer {_describe(holder)}")
                announced = True
            time.sleep(poll_s)
            continue
        try:  # the file we locked must still be the one at `lock` (a releasing holder unlinks it)
            same = os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    previous = _lock_info(lock)
    if previous and previous.get("pid") not in (None, os.getpid()):
        here = previous.get("hostname") == socket.gethostname()
        state = "no longer running" if here and not _pid_alive(int(previous["pid"])) else "its lock was released"
        log.info(f"{path}: taking over the writer lock left by {_describe(previous)}: {state}")
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(),
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "command": " ".join(sys.argv[:4])[:200]}))
    fh.flush()
    _held[key] = [fh, 1]
    try:
        yield
    finally:
        del _held[key]
        try:
            lock.unlink()  # while still locked: a waiter that opened the old file sees the inode change and retries
        except FileNotFoundError:
            pass
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def writes_run(locate: Any, creates: bool = False) -> Any:
    """Decorator: the wrapped pipeline stage holds the writer lock of the run directory `locate(args, kwargs)`
    names (see `writer_lock`) while it runs. A stage that does not create its directory (`creates` False) runs
    unlocked when the directory does not exist, so it fails with its own message and leaves nothing behind."""
    import functools

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            where = Path(locate(args, kwargs))
            existed = where.is_dir()
            if not creates and not existed:
                return fn(*args, **kwargs)
            try:
                with writer_lock(where):
                    return fn(*args, **kwargs)
            except BaseException:
                if not existed:  # a stage refused before writing anything leaves no empty folder behind
                    try:
                        where.rmdir()
                    except OSError:
                        pass  # not empty: keep what was written
                raise
        return inner
    return wrap
