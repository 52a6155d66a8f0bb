"""`afprobe sweep SWEEP.yaml --out DIR`: a grid of ordinary run directories under DIR/cells/, one comparison.

The sweep file (YAML, safe-loaded):

    base: ../default.yaml            # a config path, relative to the sweep file
    set: {queries.limit: 8}          # dotted overrides common to every cell
    grid:                            # dotted keys to lists: the cartesian product
      scenario.variant: [helpful_only, never_used]
    cells:                           # and/or a list of override maps (crossed with the grid)
      - {model.spec: smollm2-135m-instruct}
    executor: local                  # or {kind: submitit, cluster: slurm, slurm: {partition: gpu, ...}}

Reuse: cells whose cache stage hash (`rundir.stage_hash`) is equal share one computed cache (hard links of the
first finished cell's store), and the same for the probe stage; the local executor loads each model once.
State: DIR/sweep.json (the cells), DIR/state/<cell>.json (status, one-line failure reason, what was reused);
a cell is `done` when its run directory's stages are done for its config, `running` while a process holds its
writer lock, `failed` with its reason, else `pending`.
"""
from __future__ import annotations

import gc
import itertools
import json
import os
import re
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from afprobe.config import Config, apply_override, load_config, read_yaml_mapping, validate_config
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_json
from afprobe.log import log
from afprobe.rundir import RunDir, lock_holder, stage_hash, writer_lock

SWEEP_KEYS = ("base", "set", "grid", "cells", "executor")
STAGES = ("cache", "probe", "steer")
_PATH_KEYS = ("queries.path", "queries.benign_path", "scenario.system_prompt_file", "judge.prompt_file",
              "model.adapter", "model.spec", "model.offload_folder")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlurmParams(_Strict):
    """Cluster resources of one cell (one job); `array_parallelism` caps the jobs running at once."""

    partition: Optional[str] = None
    gpus_per_cell: int = Field(default=1, ge=0)
    cpus_per_cell: int = Field(default=8, ge=1)
    mem_gb: Optional[float] = Field(default=None, gt=0)
    time_min: int = Field(default=240, ge=1)
    array_parallelism: int = Field(default=16, ge=1)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = []  # shell lines run before the cell (module load ..., source venv/bin/activate)
    additional: dict[str, Union[str, int]] = {}  # any other sbatch option, e.g. {mail-type: END}


class ExecutorConfig(_Strict):
    kind: Literal["local", "submitit"] = "local"
    # slurm: sbatch arrays; local: submitit's local executor (real subprocesses, for tests and single machines)
    cluster: Literal["slurm", "local"] = "slurm"
    slurm: SlurmParams = SlurmParams()
    poll_s: float = Field(default=5.0, gt=0)  # how often the driver checks its jobs

    def sbatch_parameters(self, n_cells: int) -> dict[str, Any]:
        """Keyword arguments of submitit's sbatch-script maker for an array of `n_cells` cells."""
        s = self.slurm
        params: dict[str, Any] = {"job_name": "afprobe-sweep", "partition": s.partition, "time": s.time_min,
                                  "gpus_per_node": s.gpus_per_cell or None, "cpus_per_task": s.cpus_per_cell,
                                  "array_parallelism": s.array_parallelism, "account": s.account, "qos": s.qos,
                                  "constraint": s.constraint, "setup": list(s.setup) or None,
                                  "additional_parameters": dict(s.additional) or None}
        if s.mem_gb:
            params["mem"] = f"{int(s.mem_gb)}GB" if s.mem_gb == int(s.mem_gb) else f"{int(s.mem_gb * 1024)}MB"
        return {k: v for k, v in params.items() if v is not None}

    def executor_parameters(self) -> dict[str, Any]:
        """The same, as submitit AutoExecutor.update_parameters keywords."""
        s = self.slurm
        generic = {"name": "afprobe-sweep", "timeout_min": s.time_min, "cpus_per_task": s.cpus_per_cell,
                   "gpus_per_node": s.gpus_per_cell or None, "mem_gb": s.mem_gb}
        specific = {"partition": s.partition, "array_parallelism": s.array_parallelism, "account": s.account,
                    "qos": s.qos, "constraint": s.constraint, "setup": list(s.setup) or None,
                    "additional_parameters": dict(s.additional) or None}
        return {**{k: v for k, v in generic.items() if v is not None},
                **{f"slurm_{k}": v for k, v in specific.items() if v is not None}}


@dataclass
class Cell:
    index: int
    name: str
    overrides: dict[str, Any]
    cfg: Config

    @property
    def model_key(self) -> str:
        return self.cfg.section_hash("model")

    def hash(self, stage: str) -> str:
        return stage_hash(self.cfg, stage)


@dataclass
class Sweep:
    path: Path
    base: Path
    cells: list[Cell]
    executor: ExecutorConfig
    varying: list[str] = field(default_factory=list)

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise BadInput(f"sweep {self.path} has no cell '{name}'")


# ----------------------------------------------------------------------------------------------- loading

def _known_key(key: str) -> Optional[str]:
    """None when `key` is a config key (a dotted path through the config's sections; free-form maps such as
    cue_families or model.device_map accept anything below them), else the longest known prefix."""
    model: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return None  # below a free-form field
        if part not in fields:
            return ".".join(parts[:i])
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None if i == len(parts) - 1 or _free_form(fields[part].annotation) else ".".join(parts[: i + 1])
    return None


def _free_form(annotation: Any) -> bool:
    text = str(annotation)
    return "dict" in text or "Any" in text


def _check_keys(where: str, mapping: Any, sweep: Path) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise BadInput(f"sweep file {sweep}: '{where}' must be a mapping of dotted config keys to values")
    import difflib

    from afprobe.config import _known_keys

    for key in mapping:
        if not isinstance(key, str) or not key:
            raise BadInput(f"sweep file {sweep}: {where} key {key!r} is not a dotted config key")
        if _known_key(key) is not None:
            close = difflib.get_close_matches(key, _known_keys(Config), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise BadInput(f"sweep file {sweep}: {where} key '{key}' is not a config key{hint}")
    return mapping


def _resolve_paths(overrides: dict[str, Any], folder: Path) -> dict[str, Any]:
    out = dict(overrides)
    for key in _PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
            out[key] = str((folder / value).resolve())
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_short(v) for v in value) or "none"
    if isinstance(value, dict):
        return "-".join(f"{k}{_short(v)}" for k, v in value.items()) or "none"
    text = Path(value).name if isinstance(value, str) and "/" in value else str(value)
    return _UNSAFE.sub("-", text).strip("-.") or "x"


def _cell_names(choices: list[dict[str, Any]], varying: list[str]) -> list[str]:
    """Readable, safe and unique folder names from the overrides that vary between cells."""
    import hashlib

    leaf = [k.rsplit(".", 1)[-1] for k in varying]
    labels = [k.rsplit(".", 1)[-1] if leaf.count(k.rsplit(".", 1)[-1]) == 1 else k for k in varying]
    names = []
    for choice in choices:
        parts = [f"{label}={_short(choice[k])}" for k, label in zip(varying, labels) if k in choice]
        name = "__".join(parts) or "base"
        if len(name) > 100:
            digest = hashlib.sha256(json.dumps(choice, sort_keys=True, default=str).encode()).hexdigest()[:8]
            name = f"{name[:90].rstrip('_-.')}-{digest}"
        names.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            seen[name] += 1
            names[i] = f"{name}-{seen[name]}"
        else:
            seen[name] = 1
    return names


def load_sweep(path: Union[str, Path], check_inputs: bool = True) -> Sweep:
    """Read and validate a whole sweep file (every cell's config, and with `check_inputs` its model spec,
    layers, scenario and queries) before any weights load. Raises BadInput naming the dotted key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", f"a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise BadInput(f"sweep file {path}: unknown key '{unknown[0]}' (known: {', '.join(SWEEP_KEYS)})")
    if not isinstance(raw.get("base"), str) or not raw["base"]:
        raise BadInput(f"sweep file {path}: 'base' must be the path of a config (relative to the sweep file)")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise BadInput(f"sweep file {path}: base config not found: {base}")
    common = _check_keys("set", raw.get("set") or {}, path)
    grid = raw.get("grid")
    if "grid" in raw:
        _check_keys("grid", grid if grid is not None else [], path)
        if not grid:
            raise BadInput(f"sweep file {path}: 'grid' is empty; give dotted keys with lists of values, or leave it out")
        for key, values in grid.items():
            if not isinstance(values, list):
                raise BadInput(f"sweep file {path}: grid key '{key}' must be a list of values, got {values!r}")
            if not values:
                raise BadInput(f"sweep file {path}: grid key '{key}' is an empty list")
    cells_raw = raw.get("cells")
    if "cells" in raw:
        if not isinstance(cells_raw, list) or not cells_raw:
            raise BadInput(f"sweep file {path}: 'cells' must be a non-empty list of override maps")
        for i, c in enumerate(cells_raw):
            _check_keys(f"cells[{i}]", c if c is not None else {}, path)
    executor = raw.get("executor", "local")
    try:
        executor = ExecutorConfig(kind=executor) if isinstance(executor, str) else ExecutorConfig.model_validate(executor)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadInput(f"sweep file {path}: executor key '{'.'.join(str(p) for p in first['loc'])}': "
                       f"{first['msg']}") from None
    grid_items = list((grid or {}).items())
    combos = [dict(zip([k for k, _ in grid_items], values)) for values in itertools.product(*[v for _, v in grid_items])]
    choices = [{**g, **(c or {})} for c in (cells_raw or [{}]) for g in combos]
    varying = [k for k in dict.fromkeys(k for ch in choices for k in ch)
               if len({json.dumps(ch.get(k), sort_keys=True, default=str) for ch in choices}) > 1]
    names = _cell_names(choices, varying)
    base_data = load_config(base).model_dump(mode="json")
    cells, seen = [], {}
    for i, (name, choice) in enumerate(zip(names, choices)):
        overrides = _resolve_paths({**common, **choice}, path.parent)
        data = json.loads(json.dumps(base_data))
        for key, value in overrides.items():
            apply_override(data, key, value)
        try:
            cfg = validate_config(data)
        except BadInput as err:
            raise BadInput(f"sweep file {path}: cell '{name}': {err}") from None
        digest = cfg.section_hash()
        if digest in seen:
            raise BadInput(f"sweep file {path}: cells '{seen[digest]}' and '{name}' have the same config")
        seen[digest] = name
        cells.append(Cell(i, name, overrides, cfg))
    if check_inputs:
        from afprobe.pipeline import validate_inputs

        checked: set[str] = set()
        for cell in cells:
            key = cell.cfg.section_hash()
            if key not in checked:
                try:
                    validate_inputs(cell.cfg)
                except BadInput as err:
                    raise BadInput(f"sweep file {path}: cell '{cell.name}': {err}") from None
                checked.add(key)
    return Sweep(path.resolve(), base, cells, executor, varying)


# ----------------------------------------------------------------------------------------------- state

def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / cell.name


def _state_path(out: Path, name: str) -> Path:
    return Path(out) / "state" / f"{name}.json"


def read_state(out: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads(_state_path(out, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(out: Path, name: str, **fields: Any) -> dict[str, Any]:
    state = {**read_state(out, name), **fields}
    atomic_write_json(_state_path(out, name), state)
    return state


def _stages_done(run: RunDir, cfg: Config) -> bool:
    return all(run.stage_done(s, cfg) for s in STAGES) and (run.path / "summary.json").is_file() \
        and run.manifest().get("stages", {}).get("report", {}).get("status") == "done"


def cell_status(out: Path, cell: Cell) -> tuple[str, str]:
    """(done | running | failed | pending, one-line reason or detail)."""
    run = RunDir(cell_dir(out, cell))
    state = read_state(out, cell.name)
    holder = lock_holder(run.path) if run.path.is_dir() else None
    if holder is not None:
        return "running", f"pid {holder.get('pid')} on {holder.get('hostname')} since {holder.get('started_at')}"
    if state.get("status") == "done" and _stages_done(run, cell.cfg):
        return "done", state.get("reuse_note", "")
    if state.get("status") == "failed":
        return "failed", state.get("reason", "")
    if state.get("status") == "running":
        return "pending", "interrupted; a rerun resumes it"
    return "pending", ""


# ----------------------------------------------------------------------------------------------- one cell

class ModelPool:
    """One loaded model at a time, loaded once per distinct `model` section; counts the loads."""

    def __init__(self) -> None:
        self.key: Optional[str] = None
        self.loaded: Optional[tuple] = None
        self.loads: dict[str, int] = {}

    def get(self, cfg: Config) -> tuple[tuple, bool]:
        """(model, tokenizer, backend, fingerprint), and whether this call loaded it."""
        from afprobe.pipeline import load_model_and_backend

        key = cfg.section_hash("model")
        if key == self.key and self.loaded is not None:
            return self.loaded, False
        self.loaded = None
        gc.collect()
        log.info(f"loading {cfg.model.spec} ({cfg.model.backend} backend)")
        self.loaded, self.key = load_model_and_backend(cfg), key
        self.loads[cfg.model.spec] = self.loads.get(cfg.model.spec, 0) + 1
        return self.loaded, True


def _link_tree(src: Path, dst: Path) -> int:
    """Hard-link (copy where linking fails) every file of `src` into `dst`; returns the number of files."""
    n = 0
    for f in sorted(src.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
            n += 1
    return n


def _done_source(out: Path, sweep: Sweep, cell: Cell, stage: str) -> Optional[Cell]:
    """Another cell of this sweep whose `stage` is done with the same stage hash (waiting while its writer runs)."""
    same = [c for c in sweep.cells if c.name != cell.name and c.hash(stage) == cell.hash(stage)]
    for other in same:
        run = RunDir(cell_dir(out, other))
        if not run.manifest_path.is_file():
            continue
        if not run.stage_done(stage, other.cfg) and lock_holder(run.path) is not None and other.index < cell.index:
            log.info(f"{cell.name}: waiting for {other.name}, which is computing the same {stage}")
            while lock_holder(run.path) is not None and not run.stage_done(stage, other.cfg):
                time.sleep(1.0)
        if run.stage_done(stage, other.cfg):
            return other
    return None


def _reuse_cache(run: RunDir, cell: Cell, src: RunDir) -> None:
    _link_tree(src.path / "activations", run.path / "activations")
    shutil.copy2(src.path / "prompts.jsonl", run.path / "prompts.jsonl")
    info = src.manifest()
    record = {**info["stages"]["cache"], "reused_from": src.path.name}
    stages = run.manifest().get("stages", {})
    stages["cache"] = record
    run.update(stages=stages, model_fingerprint=info.get("model_fingerprint"))


def _reuse_probe(run: RunDir, cell: Cell, src: RunDir) -> None:
    _link_tree(src.path / "probes", run.path / "probes")
    summary = src.summary()
    run.update_summary(model=summary.model, n_queries=summary.n_queries, n_layers=summary.n_layers,
                       control_families=summary.control_families, probe=summary.probe)
    stages = run.manifest().get("stages", {})
    stages["probe"] = {**src.manifest()["stages"]["probe"], "reused_from": src.path.name}
    run.update(stages=stages)


def run_cell(out: Path, sweep: Sweep, cell: Cell, pool: ModelPool, quiet: bool = True) -> dict[str, Any]:
    """Run (or resume) one cell, reusing stages other cells computed. Records and returns its state."""
    from afprobe.pipeline import run_cache, run_probe, run_report, run_steer

    run = RunDir(cell_dir(out, cell))
    with writer_lock(run.path, wait=True):
        started = time.time()
        previous = read_state(out, cell.name)
        if previous.get("status") == "done" and _stages_done(run, cell.cfg):  # finished by a writer we waited for
            return previous
        reuse = dict(previous.get("reuse", {})) if previous.get("status") != "failed" else {}
        _write_state(out, cell.name, status="running", reason="", started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     host=socket.gethostname(), pid=os.getpid(), overrides=cell.overrides)
        run.claim(cell.cfg, force=False)
        model_use = "not needed"

        def model() -> tuple:
            nonlocal model_use
            loaded, fresh = pool.get(cell.cfg)
            if model_use != "loaded":
                model_use = "loaded" if fresh else "shared"
            return loaded

        for stage in ("cache", "probe"):
            if run.stage_done(stage, cell.cfg):
                reuse.setdefault(stage, "done earlier")
                continue
            src = _done_source(out, sweep, cell, stage)
            if src is not None:
                (_reuse_cache if stage == "cache" else _reuse_probe)(run, cell, RunDir(cell_dir(out, src)))
                reuse[stage] = f"reused from {src.name}"
            elif stage == "cache":
                run_cache(cell.cfg, run.path, quiet=quiet, loaded=model())
                reuse[stage] = "computed"
            else:
                run_probe(run.path, quiet=quiet)
                reuse[stage] = "computed"
        if not run.stage_done("steer", cell.cfg):
            run_steer(run.path, quiet=quiet, loaded=model())
            reuse["steer"] = "computed"
        run_report(run.path, quiet=True)
        run.update(sweep={"cell": cell.name, "overrides": cell.overrides, "model_load": model_use, "reuse": reuse})
        note = ", ".join(f"{k} {v}" for k, v in reuse.items())
        return _write_state(out, cell.name, status="done", reason="", reuse=reuse, model_load=model_use,
                            reuse_note=note, seconds=round(time.time() - started, 1),
                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    prefix = "" if isinstance(err, BadInput) else f"{type(err).__name__}: "
    return (prefix + text)[:300] or type(err).__name__


def run_cell_safely(out: Path, sweep: Sweep, cell: Cell, pool: ModelPool, quiet: bool = True) -> dict[str, Any]:
    """`run_cell`, recording a failure with its one-line reason (and the traceback in the state file)."""
    try:
        return run_cell(out, sweep, cell, pool, quiet)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
        reason = _one_line(err)
        log.warning(f"cell {cell.name} failed: {reason}")
        return _write_state(out, cell.name, status="failed", reason=reason, traceback=traceback.format_exc(),
                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))


def run_cell_job(sweep_file: str, out: str, name: str) -> dict[str, Any]:
    """Entry point of one cluster job (submitit pickles this function): run one cell, idempotently."""
    from afprobe.log import configure
    from afprobe.rundir import set_lock_wait

    configure(quiet=False)
    set_lock_wait(True)
    sweep = load_sweep(sweep_file, check_inputs=False)
    cell = sweep.cell(name)
    status, _ = cell_status(Path(out), cell)
    if status == "done":
        return read_state(Path(out), name)
    return run_cell_safely(Path(out), sweep, cell, ModelPool(), quiet=True)


# ----------------------------------------------------------------------------------------------- executors

def _write_sweep_json(out: Path, sweep: Sweep, **extra: Any) -> None:
    try:
        history = json.loads((out / "sweep.json").read_text()).get("invocations", [])
    except (FileNotFoundError, json.JSONDecodeError):
        history = []
    if "invocation" in extra:
        history.append(extra.pop("invocation"))
    atomic_write_json(out / "sweep.json", {
        "sweep_file": str(sweep.path), "base": str(sweep.base), "varying": sweep.varying,
        "executor": sweep.executor.model_dump(mode="json"),
        "cells": [{"name": c.name, "overrides": c.overrides, "model": c.cfg.model.spec,
                   "hashes": {s: c.hash(s) for s in STAGES}} for c in sweep.cells], "invocations": history, **extra})


def _local(out: Path, sweep: Sweep, todo: list[Cell], quiet: bool) -> dict[str, int]:
    from tqdm.auto import tqdm

    pool = ModelPool()
    first = {}
    for c in sweep.cells:
        first.setdefault(c.model_key, c.index)
    order = sorted(todo, key=lambda c: (first[c.model_key], c.index))  # one model load per model
    bar = tqdm(order, desc="sweep", unit="cell", disable=quiet)
    for cell in bar:
        bar.set_postfix_str(cell.name[:60])
        state = run_cell_safely(out, sweep, cell, pool, quiet=quiet)
        if state.get("status") == "done":
            log.info(f"cell {cell.name}: done ({state.get('reuse_note', '')})")
    bar.close()
    return pool.loads


def slurm_script(sweep: Sweep, out: Path, n_cells: Optional[int] = None) -> str:
    """The sbatch script submitit would submit for this sweep's array (made offline, no SLURM needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(out).resolve() / "slurm" / "%j"
    command = f"{shlex_quote(sys.executable)} -u -m submitit.core._submit {shlex_quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=n_cells or len(sweep.cells),
                               **sweep.executor.sbatch_parameters(n_cells or len(sweep.cells)))


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _submitit(out: Path, sweep: Sweep, todo: list[Cell], quiet: bool) -> dict[str, int]:
    """One job per cell through submitit. Wave 1 runs one cell per distinct cache (and probe) stage, wave 2 the
    cells that reuse them, so shared stages are computed once even with parallel jobs."""
    try:
        import submitit
    except ImportError:
        raise BadInput("executor 'submitit' needs the submitit package: pip install 'afprobe[cluster]'") from None
    from tqdm.auto import tqdm

    ex_cfg = sweep.executor
    folder = out.resolve() / "slurm" / "%j"
    if ex_cfg.cluster == "local":
        executor: Any = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=ex_cfg.slurm.time_min)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**ex_cfg.executor_parameters())
        from afprobe.fsio import atomic_write_text

        atomic_write_text(out / "slurm" / "job.sbatch.preview", slurm_script(sweep, out, len(todo)))
    owners: dict[str, str] = {}
    for c in sweep.cells:
        owners.setdefault(c.hash("cache"), c.name)
        owners.setdefault(c.hash("probe"), c.name)
    first_wave = [c for c in todo if owners[c.hash("cache")] == c.name or owners[c.hash("probe")] == c.name]
    waves = [first_wave, [c for c in todo if c not in first_wave]]
    bar = tqdm(total=len(todo), desc="sweep", unit="cell", disable=quiet)
    for wave in waves:
        if not wave:
            continue
        names = [c.name for c in wave]
        jobs = executor.map_array(run_cell_job, [str(sweep.path)] * len(wave), [str(out.resolve())] * len(wave), names)
        atomic_write_json(out / "slurm" / "jobs.json", {n: j.job_id for n, j in zip(names, jobs)})
        log.info(f"submitted {len(jobs)} cell job(s) ({', '.join(j.job_id for j in jobs[:3])}"
                 f"{', ...' if len(jobs) > 3 else ''}); logs in {out / 'slurm'}")
        pending = dict(zip(names, jobs))
        while pending:
            for name, job in list(pending.items()):
                if job.done():
                    try:
                        job.result()
                    except Exception as err:  # noqa: BLE001 - the job itself died (timeout, preemption, OOM)
                        if read_state(out, name).get("status") != "done":
                            _write_state(out, name, status="failed", reason=f"job {job.job_id}: {_one_line(err)}")
                    bar.update(1)
                    del pending[name]
            if pending:
                time.sleep(ex_cfg.poll_s)
    bar.close()
    return {}


def run_sweep(sweep_file: str, out: Union[str, Path], quiet: bool = False) -> int:
    """`afprobe sweep`: run every unfinished cell, then write DIR/sweep.csv, sweep.md and sweep.html.
    Returns the exit code: 1 when a cell failed, else 0."""
    from afprobe.rundir import set_lock_wait

    sweep = load_sweep(sweep_file)  # the whole file is validated before any weights load
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    set_lock_wait(True)  # cells sharing a stage wait for each other; a cell locked elsewhere is waited for
    try:
        return _run_sweep(sweep, out, quiet)
    finally:
        set_lock_wait(False)


def _run_sweep(sweep: Sweep, out: Path, quiet: bool) -> int:
    statuses = {c.name: cell_status(out, c)[0] for c in sweep.cells}
    todo = [c for c in sweep.cells if statuses[c.name] != "done"]
    log.info(f"sweep: {len(sweep.cells)} cells, {len(sweep.cells) - len(todo)} already done, "
             f"executor {sweep.executor.kind}")
    _write_sweep_json(out, sweep)
    start = time.time()
    runner: Callable = _local if sweep.executor.kind == "local" else _submitit
    loads = runner(out, sweep, todo, quiet) if todo else {}
    _write_sweep_json(out, sweep, invocation={"started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
                                              "cells_run": [c.name for c in todo], "model_loads": loads,
                                              "executor": sweep.executor.kind,
                                              "seconds": round(time.time() - start, 1)})
    from afprobe.analysis.sweep_report import write_sweep_report

    paths = write_sweep_report(out)
    rows = status_rows(out, sweep)
    failed = [r for r in rows if r[1] == "failed"]
    if not quiet:
        print(reuse_line(out, sweep, loads))
        for name, status, reason in failed:
            print(f"  failed: {name}: {reason}")
        print(f"sweep: {sum(r[1] == 'done' for r in rows)}/{len(rows)} cells done, {len(failed)} failed; "
              f"{paths['csv']}, {paths['html']}")
    return 1 if failed else 0


def reuse_line(out: Path, sweep: Sweep, loads: Optional[dict[str, int]] = None) -> str:
    counts: dict[str, dict[str, int]] = {"cache": {}, "probe": {}}
    for c in sweep.cells:
        for stage in counts:
            how = read_state(out, c.name).get("reuse", {}).get(stage, "")
            kind = "reused" if how.startswith("reused") else "computed" if how == "computed" else None
            if kind:
                counts[stage][kind] = counts[stage].get(kind, 0) + 1
    parts = [f"{s}: {v.get('computed', 0)} computed, {v.get('reused', 0)} reused" for s, v in counts.items()]
    if loads:
        parts.append("model loads: " + ", ".join(f"{k} x{v}" for k, v in loads.items()))
    return "reuse: " + "; ".join(parts)


def status_rows(out: Path, sweep: Sweep) -> list[tuple[str, str, str]]:
    return [(c.name, *cell_status(out, c)) for c in sweep.cells]


def sweep_status(out: Union[str, Path]) -> int:
    """`afprobe sweep --status DIR`: every cell as done / running / failed / pending, with the reason."""
    out = Path(out)
    info = out / "sweep.json"
    if not info.is_file():
        raise BadInput(f"{out} holds no sweep (no sweep.json); start one with `afprobe sweep SWEEP.yaml --out {out}`")
    sweep = load_sweep(json.loads(info.read_text())["sweep_file"], check_inputs=False)
    rows = status_rows(out, sweep)
    width = max(len(r[0]) for r in rows)
    for name, status, reason in rows:
        print(f"{status:8s} {name:{width}s}  {reason}".rstrip())
    counts = {s: sum(r[1] == s for r in rows) for s in ("done", "running", "failed", "pending")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def dry_run(sweep_file: str, out: Union[str, Path]) -> int:
    """`afprobe sweep SWEEP.yaml --out DIR --dry-run`: validate the whole file (no weights load), print the cells
    and which of them would compute or reuse each stage; for a SLURM executor also write and check the job script
    (DIR/slurm/job.sbatch) with submitit's own sbatch writer, offline."""
    sweep = load_sweep(sweep_file)
    out = Path(out)
    owners: dict[tuple[str, str], str] = {}
    for c in sweep.cells:
        plan = []
        for stage in ("cache", "probe"):
            owner = owners.setdefault((stage, c.hash(stage)), c.name)
            plan.append(f"{stage} {'computed' if owner == c.name else 'from ' + owner}")
        print(f"{c.name}: {', '.join(plan)}; model {c.cfg.model.spec}")
    models = len({c.model_key for c in sweep.cells})
    print(f"{len(sweep.cells)} cells, {len({k for k in owners if k[0] == 'cache'})} caches, "
          f"{len({k for k in owners if k[0] == 'probe'})} probe sweeps, {models} model(s); executor {sweep.executor.kind}")
    if sweep.executor.kind == "submitit" and sweep.executor.cluster == "slurm":
        try:
            script = slurm_script(sweep, out)
        except ImportError:
            raise BadInput("executor 'submitit' needs the submitit package: pip install 'afprobe[cluster]'") from None
        except ValueError as err:
            raise BadInput(f"sweep file {sweep_file}: executor.slurm: {err}") from None
        from afprobe.fsio import atomic_write_text

        atomic_write_text(out / "slurm" / "job.sbatch", script)
        print(f"SLURM job script (one array task per cell): {out / 'slurm' / 'job.sbatch'}")
    return 0
