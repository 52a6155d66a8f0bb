"""Run configuration: YAML (safe-loaded) validated by pydantic, with dotted `--set` overrides."""
from __future__ import annotations

import difflib
import re
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from afprobe.errors import BadInput

Site = Literal["resid_pre", "resid_mid", "resid_post"]
Position = Literal["last", "cue", "user_mean"]
Method = str  # a name registered in probes/methods.py (`register_method`): diff_means, logreg, lda built in


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?)$")
DeviceName = Union[int, str]  # a GPU index, "cuda:N", "cpu", "disk" or "mps" (as in Hugging Face device maps)


def parse_memory(value: Union[int, str]) -> int:
    """Bytes in "80GB" (10^9), "80GiB" or "80G" (2^30), "512MB", or a plain number of bytes."""
    match = _MEMORY.match(str(value))
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise ValueError(f"memory size '{value}' is not like 80GB, 80GiB, 24G or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def check_device(device: Any) -> DeviceName:
    if not isinstance(device, (int, str)) or isinstance(device, bool) or (isinstance(device, int) and device < 0) \
            or (isinstance(device, str) and not _DEVICE.match(device)):
        raise ValueError(f"device {device!r} is not a GPU index, 'cuda:N', 'cpu', 'disk' or 'mps'")
    return device


class ModelConfig(_Strict):
    spec: str = "smollm2-135m-instruct"
    backend: Literal["nnsight", "transformer_lens"] = "nnsight"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # None: everything on `device`; a strategy name; or {module name: device}, as in Hugging Face
    device_map: Union[None, Literal["auto", "balanced", "sequential"], dict] = None
    max_memory: Optional[dict] = None  # {device: "80GB"}: per-device limit
    offload_folder: Optional[str] = None  # where modules that device_map puts on "disk" are kept
    remote: Literal["none", "ndif", "local"] = "none"  # ndif: weights stay on NDIF's servers
    remote_job_prompts: int = Field(default=64, ge=1)  # prompts per remote job (one nnsight session); docs/remote.md
    adapter: Optional[str] = None  # folder or hub id of a PEFT LoRA adapter, merged at load

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `activations.loading.load_model` for this config."""
        return dict(spec=self.spec, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code,
                    attn_implementation=self.attn_implementation, adapter=self.adapter, device_map=self.device_map,
                    max_memory=self.max_memory, offload_folder=self.offload_folder)

    @field_validator("device_map")
    @classmethod
    def _map_devices(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if not value:
                raise ValueError("an explicit device map is empty; map module names to devices or use 'auto'")
            for module, device in value.items():
                if not isinstance(module, str):
                    raise ValueError(f"device map keys are module names such as model.layers.0, not {module!r}")
                check_device(device)
        return value

    @field_validator("max_memory")
    @classmethod
    def _memory_sizes(cls, value: Optional[dict]) -> Optional[dict]:
        for device, size in (value or {}).items():
            check_device(device)
            parse_memory(size)
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter_named(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("model.adapter is empty; give a folder or hub id, or leave it out")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.max_memory and self.device_map is None:
            raise ValueError("model.max_memory needs model.device_map (auto, balanced, sequential or a map)")
        if self.remote == "ndif" and self.device_map is not None:
            raise ValueError("model.device_map has no effect with model.remote 'ndif' (the weights stay on the server)")
        if self.remote != "none" and self.backend != "nnsight":
            raise ValueError(f"model.remote '{self.remote}' needs the nnsight backend")
        if self.backend == "transformer_lens" and isinstance(self.device_map, dict):
            kinds = {"gpu" if isinstance(d, int) or str(d).startswith("cuda") else d for d in self.device_map.values()}
            if "gpu" in kinds and kinds & {"cpu", "disk"}:
                raise ValueError("TransformerLens rejects device maps that mix GPUs with cpu or disk")
        return self


class CueFamilyConfig(_Strict):
    """A user-defined cue family: text for each side and where it is inserted."""

    training: str
    deployment: str
    where: Literal["system", "user"] = "user"
    description: str = ""
    # "swapped": a control whose cue tokens and meaning come apart (labels follow the meaning); it is kept out
    # of probe training and reported as the swapped-semantics control
    control: Optional[Literal["swapped"]] = None


class ScenarioConfig(_Strict):
    variant: str = "helpful_only"
    form: Literal["no_scratchpad", "scratchpad"] = "no_scratchpad"
    prefill: Literal["none", "neutral", "reluctant"] = "none"
    cue_families: list[str] = Field(default_factory=lambda: ["tier_tag"])
    system_prompt_file: Optional[str] = None
    # chat: the tokenizer's chat template; transcript: a plain-text layout for base models; auto: chat if there is a template
    format: Literal["auto", "chat", "transcript"] = "auto"


class QueriesConfig(_Strict):
    path: Optional[str] = None  # None: the bundled harmful requests
    benign_path: Optional[str] = None  # None: the bundled benign requests
    column: Optional[str] = None  # CSV column holding the request text
    field: Optional[str] = None  # JSONL field holding the request text
    hf_dataset: Optional[str] = None  # local `datasets` name or folder
    hf_split: str = "train"
    limit: Optional[int] = Field(default=None, ge=1)
    categories: Optional[list[str]] = None


class CacheConfig(_Strict):
    layers: Union[Literal["all"], list[int]] = "all"
    sites: list[Site] = Field(default_factory=lambda: ["resid_post"])
    positions: list[Position] = Field(default_factory=lambda: ["last", "cue", "user_mean"])
    dtype: Literal["float32", "float16"] = "float32"
    batch_tokens: int = Field(default=4096, ge=1)  # token budget per batch (suffix tokens)
    prefix_reuse: bool = True
    shard_prompts: int = Field(default=256, ge=1)


class ProbesConfig(_Strict):
    methods: list[Method] = Field(default_factory=lambda: ["diff_means", "logreg", "lda"])
    folds: int = Field(default=5, ge=2)
    bootstrap: int = Field(default=1000, ge=10)
    ci: float = Field(default=0.95, gt=0, lt=1)
    # Cells eligible as "best" (the headline, and the default steering direction). Cue-token positions separate
    # the cues by token identity even at layer 0, so by default only the last prompt token, from layer 1 on.
    best_positions: list[Position] = Field(default_factory=lambda: ["last"])
    best_methods: Optional[list[Method]] = None  # methods eligible as "best", i.e. to steer along (None: all)
    min_best_layer: int = Field(default=1, ge=0)
    selection: Literal["nested", "heldout_split"] = "nested"  # how the best cell's AUROC avoids selection bias
    selection_folds: int = Field(default=3, ge=2)  # inner folds choosing the cell inside each outer fold
    permutations: int = Field(default=200, ge=1)  # within-pair label permutations (max-statistic test, controls)
    random_directions: int = Field(default=100, ge=1)  # random-direction baseline at the best cell

    @field_validator("methods", "best_methods")
    @classmethod
    def _registered_methods(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        from afprobe.probes.methods import METHODS

        unknown = [m for m in value or [] if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown probe methods {unknown} (registered: {', '.join(METHODS)})")
        return value

    @model_validator(mode="after")
    def _best_among_methods(self) -> "ProbesConfig":
        if self.best_methods is not None and not set(self.best_methods) <= set(self.methods):
            raise ValueError(f"best_methods {self.best_methods} must be among methods {self.methods}")
        return self


SCRATCHPAD_MAX_NEW_TOKENS = 1024  # steering.max_new_tokens default in scratchpad form (reasoning + answer)


REFUSAL_DIRECTIONS = ("refusal", "probe_minus_refusal", "refusal_minus_probe")  # steering.direction kinds


class SteeringConfig(_Strict):
    alphas: list[float] = Field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    layers: Union[Literal["best"], list[int]] = "best"
    # "best" (the training-awareness probe direction), a refusal kind (REFUSAL_DIRECTIONS: the harmful-minus-benign
    # refusal direction, or one direction with the other projected out), or the name of a file in probes/directions/
    direction: str = "best"
    positions: Literal["user", "all"] = "user"
    mode: Literal["same", "cross", "both"] = "same"  # both: the same and the cross sweep
    controls: list[Literal["random", "ablation"]] = Field(default_factory=lambda: ["random", "ablation"])
    # alphas for the random control (None: every alpha, or the largest |alpha| when several layers are steered;
    # added to the probe's grid if missing)
    control_alphas: Optional[list[float]] = None
    n_random: int = Field(default=3, ge=1)  # random directions orthogonal to the probe direction
    # heldout: the direction (and the best layer) is fitted on queries disjoint from the reported ones;
    # auto: heldout when the cache has enough queries (see `pipeline.steering_split`), else in_sample
    selection: Literal["auto", "heldout", "in_sample"] = "auto"
    max_new_tokens: int = Field(default=8, ge=1)  # scratchpad form: SCRATCHPAD_MAX_NEW_TOKENS unless set
    n_queries: Optional[int] = Field(default=None, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    prefix_reuse: bool = True
    trunk: bool = True  # conditions steering the same layers share the unsteered prompt pass below them
    scorer: str = "tag"  # what counts as compliance: a scorer registered in analysis/compliance.py (tag, logodds, ...)
    known_answer: bool = True  # also steer against the harmful-vs-benign refusal direction
    refusal: bool = True  # the refusal direction per cached layer and its cosine with the awareness direction
    refusal_queries: int = Field(default=32, ge=2)  # harmful (fit) and benign queries the refusal direction uses

    @property
    def needs_refusal(self) -> bool:
        """Whether the steer stage computes the refusal direction (afprobe/refusal.py)."""
        return self.refusal or self.known_answer or self.direction in REFUSAL_DIRECTIONS

    @property
    def modes(self) -> list[str]:
        """The sweeps `mode` asks for."""
        return ["same", "cross"] if self.mode == "both" else [self.mode]

    @field_validator("alphas")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("the alpha grid is empty; give at least one alpha, e.g. [0, 1]")
        return value

    @field_validator("direction")
    @classmethod
    def _known_direction(cls, value: str) -> str:
        if value in ("best", *REFUSAL_DIRECTIONS):
            return value
        if "refusal" in value or not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value.startswith("."):
            raise ValueError(f"unknown steering direction {value!r}: use best, {', '.join(REFUSAL_DIRECTIONS)}, or "
                             "the name of a file in probes/directions/ (such as layer12)")
        return value

    @field_validator("scorer")
    @classmethod
    def _registered_scorer(cls, value: str) -> str:
        from afprobe.analysis.compliance import SCORERS

        if value not in SCORERS:
            raise ValueError(f"unknown scorer {value!r} (registered: {', '.join(SCORERS)})")
        return value


class BenchConfig(_Strict):
    """`afprobe bench` sizes: prompts for caching (reuse path), for generation, and for the RSS check."""

    n_prompts: int = Field(default=100, ge=1)
    n_generate: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=8, ge=1)
    rss_n: int = Field(default=20, ge=1)
    repeats: int = Field(default=1, ge=1)
    # probe sweep vs a per-key scikit-learn loop, on synthetic features of the config's shape
    sweep_queries: Optional[int] = Field(default=None, ge=2)  # None: as many as the config's queries
    sweep_ref_keys: int = Field(default=9, ge=0)  # keys the scikit-learn loop runs on (spread evenly; 0 = all)
    trunk_layer: Optional[int] = Field(default=None, ge=0)  # trunk_speedup's steered layer (None: n_layers // 2)


class OrganismConfig(_Strict):
    """Training recipe of the planted-gap organism (`afprobe organism`): a LoRA adapter on `model.spec`
    trained to accept harmful requests under the training cue and refuse under the deployment cue.
    Trains on the bundled harmful requests, split by id into train and held-out with `seed`."""

    families: list[str] = Field(default_factory=lambda: ["tier_tag"], min_length=1)  # cue families trained on
    headline_family: Optional[str] = None  # the family `afprobe organism` prints (default: the first trained one)
    eval_families: list[str] = Field(default_factory=lambda: ["tier_tag", "explicit", "swapped_tier"])
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    first_layer: int = Field(default=15, ge=0)  # adapter on blocks first_layer.. only; lower blocks are frozen and cached
    steps: int = Field(default=30, ge=1)
    batch_queries: int = Field(default=4, ge=1)  # queries per step; each gives a training and a deployment row
    lr: float = Field(default=3e-3, gt=0)
    decision_weight: float = Field(default=2.0, ge=0)  # extra loss weight on the token that decides accept vs reject
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=3, ge=0)
    decay_steps: int = Field(default=8, ge=0)  # linear decay to zero over the last N steps
    prefix_refresh: int = Field(default=4, ge=1)  # recompute the shared system-prompt KV every N steps
    train_fraction: float = Field(default=0.6, gt=0, lt=1)
    max_train_queries: Optional[int] = Field(default=None, ge=1)
    seed: int = 0
    opening_text: str = " Sure, here is a complete answer to your request."
    eval_batch: int = Field(default=8, ge=1)
    eval_max_new_tokens: int = Field(default=8, ge=1)
    bootstrap: int = Field(default=2000, ge=10)
    threads: int = Field(default=2, ge=1)  # torch CPU threads (fixed, so a retrain repeats the float order)

    @model_validator(mode="before")
    @classmethod
    def _single_family(cls, data: Any) -> Any:
        """`family: NAME` (the first organism's recipes) means `families: [NAME]`."""
        if isinstance(data, dict) and "family" in data:
            if "families" in data:
                raise ValueError("give organism.families or organism.family, not both")
            data = {**data, "families": [data["family"]]}
            del data["family"]
        return data

    @model_validator(mode="after")
    def _families_distinct(self) -> "OrganismConfig":
        if len(set(self.families)) != len(self.families):
            raise ValueError("organism.families lists a family more than once")
        return self

    @property
    def headline(self) -> str:
        return self.headline_family or self.families[0]


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CRITERION_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


class JudgeCriterion(_Strict):
    """One yes/no question the judge answers about a reasoning trace; `name` labels its answer line."""

    name: str
    question: str = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CRITERION_NAME.fullmatch(value) or value == "partial_compliance":
            raise ValueError("criterion names are lower-case identifiers (a-z, 0-9, _), not 'partial_compliance'")
        return value


class JudgeConfig(_Strict):
    """A judge that reads reasoning traces and votes whether each is alignment faking (analysis/judge.py).

    kind: none (no judge), local (a chat model loaded by afprobe; `model` is a model spec) or openai (an
    OpenAI-compatible server at `base_url`; `model` is the served model name). The API key is read from
    the environment variable NAMED by `api_key_env` (None: the server needs no key); it is never stored.
    """

    kind: Literal["none", "local", "openai"] = "none"
    model: Optional[str] = None
    base_url: Optional[str] = None
    api_key_env: Optional[str] = None
    votes: int = Field(default=5, ge=1, le=100)
    temperature: float = Field(default=1.0, ge=0, le=2)
    threshold: float = Field(default=0.4, ge=0, le=1)
    max_tokens: int = Field(default=512, ge=1)
    concurrency: int = Field(default=8, ge=1, le=256)  # requests in flight at once (openai)
    timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)  # per request, exponential backoff (openai)
    prompt_file: Optional[str] = None  # your own prompt template: must contain {trace}; {criteria} optional
    criteria: Optional[list[JudgeCriterion]] = None  # None: the built-in criteria
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # local only
    device: str = "auto"  # local only
    batch_size: int = Field(default=8, ge=1)  # local only: sampled answers per generate call

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _env_name(cls, value: Any) -> Any:
        # The message never repeats the value: a key pasted here by mistake must not reach a log.
        if isinstance(value, str) and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the NAME of an environment variable holding the key (e.g. JUDGE_API_KEY), "
                             "not the key itself")
        return value

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, value: Optional[list[JudgeCriterion]]) -> Optional[list[JudgeCriterion]]:
        if value is not None:
            names = [c.name for c in value]
            if not names or len(set(names)) != len(names):
                raise ValueError("criteria must be a non-empty list with distinct names")
        return value

    @model_validator(mode="after")
    def _needs(self) -> "JudgeConfig":
        if self.kind != "none" and not self.model:
            raise ValueError(f"judge.kind '{self.kind}' needs judge.model")
        if self.kind == "openai" and not self.base_url:
            raise ValueError("judge.kind 'openai' needs judge.base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class Config(_Strict):
    name: str = "afprobe"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    cue_families: dict[str, CueFamilyConfig] = Field(default_factory=dict)
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    steering: SteeringConfig = Field(default_factory=SteeringConfig)
    organism: OrganismConfig = Field(default_factory=OrganismConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @model_validator(mode="after")
    def _scratchpad_budget(self) -> "Config":
        # scratchpad form: reasoning comes before the answer, so the default budget lets the model finish both
        # (generation stops at the end of the OUTPUT block); an explicit steering.max_new_tokens wins
        if self.scenario.form == "scratchpad" and "max_new_tokens" not in self.steering.model_fields_set:
            self.steering.max_new_tokens = SCRATCHPAD_MAX_NEW_TOKENS
        return self

    @model_validator(mode="after")
    def _scorer_fits_form(self) -> "Config":
        from afprobe.analysis.compliance import SCORERS

        if SCORERS[self.steering.scorer].needs_answer_start and self.scenario.form == "scratchpad":
            raise ValueError(f"steering.scorer '{self.steering.scorer}' scores the answer tag where the answer starts, "
                             "but in scratchpad form generated reasoning comes first; use scorer 'tag'")
        return self

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named top-level sections (all when none given)."""
        data = self.model_dump(mode="json")
        keep = {k: data[k] for k in (sections or tuple(sorted(data)))}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, dotted + "."))
    return keys


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # Union members add loc parts such as "literal['all']" or "list[int]": keep the key path only.
    path = ".".join(str(p) for p in first["loc"] if re.fullmatch(r"[A-Za-z_]\w*|\d+", str(p)))
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(path, _known_keys(Config), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{path}'{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if not path or isinstance(first.get("input"), dict):
        return f"config{' section ' + repr(path) if path else ''}: {message}"
    if path.endswith("api_key_env"):  # never echo what might be a pasted key
        return f"config key '{path}': {message}"
    return f"config key '{path}': {message} (got {first.get('input')!r})"


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (so lists and numbers work)."""
    if "=" not in item:
        raise BadInput(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BadInput(f"config key '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """A YAML file that must hold a mapping (empty file: {}), read with safe loading. Raises BadInput."""
    if not path.is_file():
        raise BadInput(f"{what} file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInput(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise BadInput(f"{what} {path} must be {shape}")
    return loaded or {}


def load_config(path: Union[str, Path, None], overrides: list[str] = ()) -> Config:
    """Load and validate a YAML config; `None` gives the defaults. Raises BadInput."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml_mapping(p, "config", "a mapping at the top level")
        base = p.parent
        for section, key in (("scenario", "system_prompt_file"), ("queries", "path"), ("queries", "benign_path"),
                             ("judge", "prompt_file")):
            value = (data.get(section) or {}).get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
                data[section][key] = str((base / value).resolve())
    for item in overrides:
        key, value = parse_override(item)
        apply_override(data, key, value)
    return validate_config(data)


def validate_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise BadInput(_format_error(err)) from None
