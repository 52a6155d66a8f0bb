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
        info = self.manifest().get("stages", {}).get(stage, {})
        return info.get("status") == "done" and info.get("config_hash") == stage_hash(cfg, stage)

    def claim(self, cfg: Config, force: bool) -> None:
        """Start or continue a run here; refuse a directory holding a different run unless forced."""
        manifest = self.manifest()
        if manifest and manifest.get("config_hash") != stage_hash(cfg, "cache") and not force:
            raise BadInput(
                f"output directory {self.path} holds a different run (its model/scenario/queries/cache config "
                "differs); choose another --out or pass --force"
            )
        if not manifest and self.path.is_dir() and any(self.path.iterdir()) and not force:
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
