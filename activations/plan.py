"""`afprobe plan`: whether a config fits the hardware, and what it will cost, before any weights load.

Reads the model's config (a folder holding only config.json is enough; a GGUF header) and, when it is
available locally, its tokenizer. Never loads weights. What is counted, and what is assumed:

- Parameters from the architecture shape (Llama, Mistral, Qwen2/3, Gemma 1/2, Phi-3, GPT-2): embeddings,
  per layer attention (query heads, grouped K/V heads, biases where the family has them, Qwen3's q/k norms),
  the MLP (gate + up + down when gated, two matrices otherwise), norms, and the LM head unless it is tied.
  Exact for these families (tests compare with `sum(p.numel())`). Weights = parameters x bytes of `model.dtype`.
- A LoRA adapter (`model.adapter`, or a bundled `+name` in the spec): r x (in + out) per targeted linear, read
  from its adapter_config.json. Merged at load it costs nothing at run time; its size is reported (float32).
- KV cache: the shared system-prompt prefix, computed once and reused (2 x layers x kv_heads x head_dim x
  prefix tokens x bytes; the known-answer check holds a second copy), and the largest steering batch's own
  tokens: its prompt pass (rows x longest suffix; twice without a reused prefix, as the scorer copies it), plus
  the larger of the scorer's two copies (the two answer tags teacher-forced: 2 x rows x suffix) and the
  generation buffer (rows x (suffix + max_new_tokens)).
- Activations, an ESTIMATE: the peak of one block's forward for the largest batch of each stage (and for the
  prefix pass): hidden states (4 x d_model per token) plus the larger of attention and MLP. Attention: q, k, v and
  its output, plus the prefix keys/values joined to every row (sdpa, nnsight's default: no score matrix), or,
  with eager attention (forced by `model.backend: transformer_lens`), keys repeated per query head and the scores
  rows x heads x tokens x keys in the model dtype plus a float32 softmax: quadratic in the sequence length. MLP:
  3 x d_ff per token when gated. Steering adds the answer tags' logits (float32 log-softmax). Measured on the
  embedded model (CPU, float32), the peak RSS growth of one batch was within about 10% of the estimate (KV +
  activations): a cache batch 0.13 GB vs 0.14 GB planned; a steering batch with the prefix reused 234-278 MB
  (two runs) vs 254 MB, an ablation batch (no reused prefix) 642-645 MB vs 714 MB. Not measured on GPUs.
- The activation store on disk; per stage the forwards, prompts and generated tokens.
- Placement: every device keeps `SAFETY_MARGIN` of its memory free (CUDA context, allocator fragmentation and
  the error of the estimate). Layers go to devices in order, each with its weights and KV cache; the embedding
  sits on the first device, the final norm and LM head on the last; every device also needs room for one
  forward's activations. GPUs needed = the fewest that fit; the device map spreads the layers evenly over them.
- Token counts are exact when the tokenizer is available locally; otherwise they are estimated as characters / 4
  of the prompt text without the chat template's few tokens, and marked "estimated".
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from afprobe.activations.adapters import ADAPTERS
from afprobe.config import REFUSAL_DIRECTIONS, Config, SteeringConfig, load_config, parse_memory
from afprobe.errors import BadInput

SAFETY_MARGIN = 0.10  # fraction of every device's memory kept free
CHARS_PER_TOKEN = 4  # token estimate without a tokenizer
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_CACHE_MAX_BATCH = 64  # rows per batch in the cache stage (`budget_batches` default)


# ---------------------------------------------------------------- architecture shape

@dataclass(frozen=True)
class Shape:
    """The numbers that size a decoder-only transformer, read from its config."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_size: int = 0  # parameters per norm: d_model (RMSNorm) or 2 x d_model (LayerNorm)
    norms_per_layer: int = 2
    qk_norm: bool = False
    n_positions: int = 0  # learned position embeddings (GPT-2)

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per block: module path -> (in features, out features, has bias)."""
        d, q, kv, ff = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.d_ff
        if self.family == "gpt2":
            return {"attn.c_attn": (d, 3 * d, True), "attn.c_proj": (d, d, True),
                    "mlp.c_fc": (d, ff, True), "mlp.c_proj": (ff, d, True)}
        if self.family == "phi3":
            return {"self_attn.qkv_proj": (d, q + 2 * kv, False), "self_attn.o_proj": (q, d, False),
                    "mlp.gate_up_proj": (d, 2 * ff, False), "mlp.down_proj": (ff, d, False)}
        b, m = self.qkv_bias, self.mlp_bias
        return {"self_attn.q_proj": (d, q, b), "self_attn.k_proj": (d, kv, b), "self_attn.v_proj": (d, kv, b),
                "self_attn.o_proj": (q, d, self.o_bias), "mlp.gate_proj": (d, ff, m), "mlp.up_proj": (d, ff, m),
                "mlp.down_proj": (ff, d, m)}

    @property
    def layer_params(self) -> int:
        linear = sum(i * o + (o if bias else 0) for i, o, bias in self.linears().values())
        return linear + self.norms_per_layer * self.norm_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def mlp_width(self) -> int:
        """d_ff-wide tensors alive at the MLP's peak: gate, up, their product (Phi-3's fused gate_up: 4)."""
        return {"gpt2": 2, "phi3": 4}.get(self.family, 3)

    def modules(self) -> list[tuple[str, int]]:
        """(module name, parameters) in forward order, as Hugging Face device maps name them."""
        d, gpt2 = self.d_model, self.family == "gpt2"
        layers = ADAPTERS[self.family].layers
        head = [("lm_head", 0 if self.tied else self.vocab * d)]
        if gpt2:
            return [("transformer.wte", self.vocab * d), ("transformer.wpe", self.n_positions * d),
                    *[(f"{layers}.{i}", self.layer_params) for i in range(self.n_layers)],
                    ("transformer.ln_f", self.norm_size), *head]
        return [("model.embed_tokens", self.vocab * d), ("model.rotary_emb", 0),
                *[(f"{layers}.{i}", self.layer_params) for i in range(self.n_layers)],
                ("model.norm", self.norm_size), *head]

    @property
    def params(self) -> int:
        return sum(n for _, n in self.modules())

    def kv_bytes(self, tokens: int, nbytes: int) -> int:
        """Keys and values of `tokens` tokens over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * tokens * nbytes


def shape_from_config(config: Any) -> Shape:
    """The `Shape` of a Hugging Face config; BadInput for a family or layout afprobe cannot size."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = getattr(text, "model_type", None)
    if family not in ADAPTERS:
        raise BadInput(f"cannot size model family '{family}' from its config (known: {', '.join(sorted(ADAPTERS))})")
    experts = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(text, k, None)]
    if experts:
        raise BadInput(f"cannot size a mixture-of-experts config ({experts[0]} = {getattr(text, experts[0])})")

    def number(name: str, default: Optional[int] = None) -> int:
        value = getattr(text, name, None)
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BadInput(f"the {family} config has no usable '{name}' (got {value!r})")
        return value

    d, heads = number("hidden_size"), number("num_attention_heads")
    kv_heads = heads if family == "gpt2" else number("num_key_value_heads", heads)
    if heads % kv_heads:
        raise BadInput(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    common = dict(n_layers=number("num_hidden_layers"), d_model=d, n_heads=heads, n_kv_heads=kv_heads,
                  vocab=number("vocab_size"), tied=bool(getattr(text, "tie_word_embeddings", False)))
    if family == "gpt2":
        return Shape("gpt2", head_dim=d // heads, d_ff=number("n_inner", 4 * d), norm_size=2 * d,
                     n_positions=number("n_positions"), **common)
    head_dim = number("head_dim", d // heads)
    bias = bool(getattr(text, "attention_bias", False))
    return Shape(family, head_dim=head_dim, d_ff=number("intermediate_size"), norm_size=d,
                 qkv_bias=family == "qwen2" or bias, o_bias=family != "qwen2" and bias,
                 mlp_bias=bool(getattr(text, "mlp_bias", False)), norms_per_layer=4 if family == "gemma2" else 2,
                 qk_norm=family == "qwen3", **common)


# ---------------------------------------------------------------- LoRA adapters

def _adapter_config(ref: str) -> Optional[dict[str, Any]]:
    """adapter_config.json of a folder or a hub id in the local cache; None when not readable here."""
    folder = Path(ref).expanduser()
    path: Optional[Path] = folder / "adapter_config.json" if folder.is_dir() else None
    if path is None and ref.count("/") == 1 and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(ref, "adapter_config.json", local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache (any reason): reported as unreadable
            path = None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BadInput(f"{path} is not valid JSON") from None


def lora_size(shape: Shape, adapter: dict[str, Any]) -> dict[str, Any]:
    """Parameters of a LoRA adapter from its config: r x (in + out) for every targeted linear."""
    if str(adapter.get("peft_type", "LORA")).upper() != "LORA":
        raise BadInput(f"adapter is {adapter.get('peft_type')}, not LoRA: afprobe cannot size it")
    rank, targets = int(adapter["r"]), adapter.get("target_modules") or []
    layers = adapter.get("layers_to_transform")
    layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
    patterns = adapter.get("rank_pattern") or {}
    prefix = ADAPTERS[shape.family].layers
    params = modules = 0
    for i in range(shape.n_layers):
        for path, (fan_in, fan_out, _) in shape.linears().items():
            name = f"{prefix}.{i}.{path}"
            if targets == "all-linear":
                hit = True
            elif isinstance(targets, str):
                hit = re.fullmatch(targets, name) is not None
            else:
                hit = any(name == t or name.endswith("." + t) for t in targets)
            if not hit or (layers is not None and i not in layers):
                continue
            r = next((int(v) for k, v in patterns.items() if re.fullmatch(rf"(.*\.)?{k}", name)), rank)
            params += r * (fan_in + fan_out) + (fan_out if adapter.get("use_dora") else 0)
            modules += 1
    return {"rank": rank, "modules": modules, "params": params, "bytes_float32": 4 * params,
            "modules_to_save": adapter.get("modules_to_save")}


# ---------------------------------------------------------------- prompts as the batcher sees them

@dataclass(frozen=True)
class _Seq:
    key: str  # prompts with equal keys share their system prompt
    length: int
    user_start: int
    cue_start: int
    family: str
    condition: str
    query_id: str
    ids: Optional[tuple[int, ...]] = None  # token ids when a tokenizer was available


def _exact_seqs(cfg: Config, tokenizer: Any, queries: list[Any]) -> list[_Seq]:
    from afprobe.activations.scenarios import build_prompts

    return [_Seq(p.system_key, len(p.input_ids), p.user_span[0], p.cue_span[0], p.family, p.condition,
                 p.query_id, tuple(p.input_ids))
            for p in build_prompts(tokenizer, cfg.scenario, cfg.cue_families, queries)]


def _estimated_seqs(cfg: Config, queries: list[Any]) -> list[_Seq]:
    """The same prompts as `build_prompts`, tokens estimated as characters / CHARS_PER_TOKEN (no chat template)."""
    from afprobe.activations import scenario_text as st
    from afprobe.activations.scenarios import _CUE_SENTINEL, CONDITIONS, check_scenario, resolve_family, system_text

    check_scenario(cfg.scenario, cfg.cue_families)
    after = st.assistant_prefill(cfg.scenario.form, cfg.scenario.prefill)
    seqs = []
    for name in cfg.scenario.cue_families:
        family = resolve_family(name, cfg.scenario.variant, cfg.cue_families)
        system = system_text(cfg.scenario, family)
        for query in queries:
            for condition in CONDITIONS:
                cue = family.cue(condition)
                if family.where == "system":
                    head, user, cue_char = system.replace(_CUE_SENTINEL, cue), st.user_turn(query.text), system.index(_CUE_SENTINEL)
                else:
                    head, user = system, st.user_turn(query.text, cue)
                    cue_char = len(head) + user.index(cue)
                key = hashlib.sha256(head.encode()).hexdigest()[:12]
                seqs.append(_Seq(key, math.ceil(len(head + user + after) / CHARS_PER_TOKEN),
                                 math.ceil(len(head) / CHARS_PER_TOKEN), cue_char // CHARS_PER_TOKEN,
                                 name, condition, query.id))
    return seqs


def _position_start(seq: _Seq, position: str) -> int:
    return {"last": seq.length - 1, "cue": seq.cue_start, "user_mean": seq.user_start}[position]


@dataclass(frozen=True)
class _Batches:
    """How prompts are batched: (rows, longest own tokens, prefix tokens, system prompt key) per batch."""

    batches: list[tuple[int, int, int, str]]
    own_tokens: int  # tokens after the prefixes, without padding

    @property
    def largest(self) -> tuple[int, int, int, str]:
        return max(self.batches, key=lambda b: (b[0] * b[1], b[2]))


def _batches(seqs: Sequence[_Seq], earliest: Sequence[int], reuse: bool, budget: int, max_batch: int) -> _Batches:
    """The batches `activations.batching.run_batches` forms for these prompts."""
    from afprobe.activations.batching import budget_batches, plan_prefix

    prefixes: dict[str, int] = {}
    if reuse:
        for key in dict.fromkeys(s.key for s in seqs):
            members = [i for i, s in enumerate(seqs) if s.key == key]
            group = [seqs[i] for i in members]
            if group[0].ids is not None:
                prefixes[key] = plan_prefix([s.ids for s in group], [earliest[i] for i in members])
            else:  # estimated: everything before the user turn (or the first token needed) is shared
                prefixes[key] = max(0, min(min(s.user_start for s in group), min(earliest[i] for i in members),
                                           min(s.length for s in group) - 1))
    own = [s.length - prefixes.get(s.key, 0) for s in seqs]
    keys = [s.key for s in seqs]
    return _Batches([(len(r), max(own[i] for i in r), prefixes.get(keys[r[0]], 0), keys[r[0]])
                     for r in budget_batches(own, keys, budget, max_batch)], sum(own))


# ---------------------------------------------------------------- memory and work

def forward_peak(shape: Shape, rows: int, tokens: int, keys: int, nbytes: int, eager: bool) -> int:
    """Bytes alive at the peak of one block's forward over rows x tokens attending to `keys` keys (estimate)."""
    n, hd = rows * tokens, shape.head_dim
    hidden = 4 * n * shape.d_model * nbytes  # residual, normed input, sublayer output, their sum
    attn = n * (2 * shape.n_heads + 2 * shape.n_kv_heads) * hd * nbytes  # q, k, v, attention output
    if eager:
        attn += 2 * rows * shape.n_heads * keys * hd * nbytes  # keys and values repeated per query head
        attn += rows * shape.n_heads * tokens * keys * (2 * nbytes + 4)  # scores, float32 softmax, cast back
    else:
        attn += 2 * rows * shape.n_kv_heads * keys * hd * nbytes  # the prefix joined to each row's keys
    return hidden + max(attn, shape.mlp_width * n * shape.d_ff * nbytes)


def steering_conditions(st: SteeringConfig) -> dict[str, int]:
    """Conditions of the steering sweep, by kind, as `afprobe.steering_plan.plan_specs` builds them."""
    from afprobe.steering_plan import condition_grid

    named = st.direction not in ("best", *REFUSAL_DIRECTIONS)  # a file: one direction
    directions = 1 if named or st.layers == "best" else len(st.layers)
    grid = condition_grid(st)
    count = {kind: directions * sum(c[0] == kind for c in grid) for kind in ("probe", "random", "ablation")}
    count["probe"] += 1  # the unsteered (alpha 0) pass, shared by every direction and mode
    return count


def _load_tokenizer(cfg: Config) -> tuple[Any, str]:
    """(tokenizer or None, why not)."""
    from afprobe.activations.loading import load_tokenizer

    try:
        return load_tokenizer(cfg.model.spec, cfg.model.trust_remote_code), ""
    except Exception as exc:  # noqa: BLE001 - any failure means "count tokens without it"; the reason is printed
        reason = " ".join(str(exc).split())
        reason = f"{reason[:100]}{'...' * (len(reason) > 100)}"
        return None, reason if isinstance(exc, BadInput) else f"{type(exc).__name__}: {reason}"


# ---------------------------------------------------------------- devices and placement

@dataclass
class Device:
    name: str  # "cuda:0", "cpu", "disk"
    memory: Optional[int]  # bytes; None = unlimited (disk)

    def usable(self, margin: float) -> float:
        return math.inf if self.memory is None else self.memory * (1 - margin)


def _pack(sizes: Sequence[int], overhead: int, room: Sequence[float]) -> Optional[list[int]]:
    """Modules in order onto devices in order, each filled up to its room (plus `overhead` once per device
    used): the device index of each module, or None if they do not fit."""
    out, dev, load = [], 0, overhead
    for size in sizes:
        while load + size > room[dev]:
            dev, load = dev + 1, overhead
            if dev == len(room):
                return None
        out.append(dev)
        load += size
    return out


def _balanced(sizes: Sequence[int], overhead: int, room: Sequence[float]) -> Optional[list[int]]:
    """Like `_pack` on the same devices, with the largest load as small as possible (bisection)."""
    if _pack(sizes, overhead, room) is None:
        return None
    lo, hi = 0.0, 1.0
    scaled = lambda f: [overhead + f * (r - overhead) if r < math.inf else r for r in room]  # noqa: E731
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _pack(sizes, overhead, scaled(mid)) is not None else (mid, hi)
    return _pack(sizes, overhead, scaled(hi))


def _detected_devices() -> tuple[list[Device], str]:
    import psutil
    import torch

    if torch.cuda.is_available():
        gpus = [Device(f"cuda:{i}", torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())]
        return gpus, "the visible CUDA GPUs"
    return [Device("cpu", _ram())], f"this machine's RAM, no CUDA here; {_gb(psutil.virtual_memory().available)} free now"


def _device_name(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else "cuda:0" if device == "cuda" else str(device)


def _hardware(cfg: Config, gpus: Optional[int], gpu_memory: Optional[int]) -> tuple[list[Device], str, bool]:
    """(devices in placement order, where they come from, whether the GPU count is open)."""
    if gpus is not None and gpus < 1:
        raise BadInput(f"--gpus must be at least 1 (got {gpus})")
    detected, source = _detected_devices()
    if gpu_memory is not None:
        count = gpus or 1
        return [Device(f"cuda:{i}", gpu_memory) for i in range(count)], "--gpus/--gpu-memory", gpus is None
    if gpus is not None:
        if not detected[0].name.startswith("cuda"):
            raise BadInput("--gpus needs --gpu-memory here (no GPU is visible to read its memory from)")
        if gpus > len(detected):
            raise BadInput(f"--gpus {gpus}: only {len(detected)} GPUs are visible; give --gpu-memory to plan for others")
        return detected[:gpus], "the visible CUDA GPUs (--gpus)", False
    limits = cfg.model.max_memory
    if not limits:
        return detected, source, False
    # model.max_memory names the devices to use and caps them (GPUs not visible here are taken as given)
    physical = {d.name: d.memory for d in detected}
    physical.setdefault("cpu", _ram())
    devices = []
    for key, size in sorted(limits.items(), key=lambda kv: {"cpu": 1, "disk": 2}.get(str(kv[0]), 0)):
        name = _device_name(key)
        cap = None if name == "disk" else parse_memory(size)
        if cap is not None and name in physical:
            cap = min(cap, physical[name])
        devices.append(Device(name, cap))
    return devices, "model.max_memory", False


def _layer_ranges(modules: Sequence[str], devices: Sequence[str], prefix: str) -> str:
    """'layers 0-39 -> cuda:0, 40-79 -> cuda:1' from a per-module device list."""
    runs: list[list[Any]] = []
    for name, device in zip(modules, devices):
        if not name.startswith(prefix + "."):
            continue
        i = int(name[len(prefix) + 1:])
        if runs and runs[-1][2] == device and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i, device])
    parts = [(f"{a}-{b}" if a != b else f"{a}") + f" -> {d}" for a, b, d in runs]
    if len(parts) > 6:  # the whole map is in the JSON
        parts = [*parts[:3], f"... ({len(parts) - 5} more)", *parts[-2:]]
    return "layers " + ", ".join(parts)


def _explicit_map(device_map: dict[str, Any], modules: Sequence[tuple[str, int]]) -> list[str]:
    """The device of each module under an explicit {module name: device} map (longest matching prefix);
    a module without parameters that the map leaves out (e.g. rotary embeddings) follows the one before it."""
    out: list[Optional[str]] = []
    for name, params in modules:
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if not keys and params:
            raise BadInput(f"model.device_map does not place module '{name}'")
        out.append(_device_name(device_map[max(keys, key=len)]) if keys else None)
    first = next(d for d in out if d is not None)
    return [d or next((p for p in reversed(out[:i]) if p), first) for i, d in enumerate(out)]


# ---------------------------------------------------------------- the plan

def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _n(count: int, word: str) -> str:
    plural = word[:-1] + "ies" if word.endswith("y") else word + "es" if word.endswith(("s", "h")) else word + "s"
    return f"{count} {word if count == 1 else plural}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,.0f}"


@dataclass
class Plan:
    """Everything `afprobe plan` reports; `to_json()` gives all numbers, `text()` the human-readable form."""

    model: dict[str, Any]
    memory: dict[str, Any]
    prompts: dict[str, Any]
    stages: dict[str, Any]
    placement: dict[str, Any]
    fits: bool
    verdict: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        m, mem, pr, st = self.model, self.memory, self.prompts, self.stages
        est = "" if pr["exact"] else " (estimated: characters / 4, no tokenizer here)"
        kinds = ", ".join(f"{v} {k}" for k, v in st["steer"]["by_kind"].items() if v)
        lines = [
            f"plan for {m['spec']} ({m['family']}; config only, no weights loaded)",
            f"  parameters   {_count(m['params'])} (embeddings {_count(m['embedding_params'])}, {m['n_layers']} layers x "
            f"{_count(m['layer_params'])}, LM head {'tied' if m['tied'] else _count(m['head_params'])})",
            f"  weights      {_gb(mem['weights'])} at {m['dtype']}",
        ]
        for ad in m["adapters"]:
            size = (f"r={ad['rank']} on {ad['modules']} modules, {_count(ad['params'])} parameters "
                    f"({_gb(ad['bytes_float32'])} float32)" if ad.get("params") is not None else "size unknown (no adapter_config.json here)")
            lines.append(f"  adapter      {ad['ref']}: {size}; {ad['runtime']}")
        sc, ss = st["cache"], st["steer"]
        extra = ""
        if ss["other_family_passes"]:
            extra += f"; + {ss['other_family_passes']} unsteered passes on the other cue families"
        if ss["known_answer_forwards"]:
            extra += f"; + {ss['known_answer_forwards']} known-answer forwards"
        if ss.get("refusal_forwards"):
            extra += f"; + {ss['refusal_forwards']} benign reads for the refusal direction"
        lines += [
            f"  prompts      {_n(pr['cache_prompts'], 'prompt')} to cache ({_n(pr['n_queries'], 'query')} x "
            f"{_n(pr['n_families'], 'cue family')} x 2), {pr['steer_prompts']} to steer; shared system prompt up to "
            f"{pr['prefix_tokens']} tokens, the rest of a prompt up to {pr['suffix_tokens']}{est}",
            f"  KV cache     shared prefix {_gb(mem['prefix_kv'])} ({mem['prefix_copies']} x {pr['prefix_tokens']} tokens x "
            f"{_gb(mem['kv_per_token'])} per token), largest steering batch {_gb(mem['batch_kv'])}",
            f"  activations  {_gb(mem['activation_peak'])} peak for one forward ({mem['activation_peak_at']}; "
            f"{mem['attention']}) [estimate]",
            f"  store        {_gb(mem['store'])} on disk ({_n(pr['cache_prompts'], 'prompt')} x {_n(sc['layers'], 'layer')} x "
            f"{_n(sc['sites'], 'site')} x {_n(sc['positions'], 'position')} x {m['d_model']} x {sc['dtype']})",
            f"  cache        {sc['forwards']} forwards in {_n(sc['batches'], 'batch')} + {_n(sc['prefix_passes'], 'prefix pass')}"
            f"; {sc['tokens_computed']:,} of {sc['tokens_total']:,} prompt tokens computed; nothing generated",
            f"  probe        no model: {sc['layers'] * sc['sites'] * sc['positions']} layer/site/position keys x "
            f"{_n(st['probe']['methods'], 'method')}",
            f"  steer        {_n(ss['conditions'], 'condition')} ({kinds}) x {_n(ss['prompts'], 'prompt')} = "
            f"{ss['prompt_passes']} prompt passes, each scoring the 2 answer tags (log-odds) and generating "
            f"{ss['max_new_tokens']} tokens{extra}",
            f"  generated    {st['generated_tokens']:,} tokens in all",
            f"  hardware     {self.placement['hardware']}",
        ]
        for dev in self.placement.get("devices", []):
            lines.append(f"    {dev['name']:<7} {dev['holds']}: {_gb(dev['weights'])} weights + {_gb(dev['kv'])} KV + "
                         f"{_gb(dev['activations'])} activations = {_gb(dev['total'])} of "
                         f"{'unlimited' if dev['usable'] is None else _gb(dev['usable'])} usable")
        lines += [f"  note         {n}" for n in self.notes]
        lines.append(f"{'fits' if self.fits else 'does not fit'}: {self.verdict}")
        return "\n".join(lines)

    def short_text(self) -> str:
        """Two lines for `afprobe run`."""
        m, mem = self.model, self.memory
        return (f"plan: {_count(m['params'])} parameters, {_gb(mem['weights'])} weights {m['dtype']} + "
                f"{_gb(mem['kv_and_activations'])} KV/activations; store "
                f"{_gb(mem['store'])}; {self.stages['generated_tokens']:,} tokens to generate\n"
                f"plan: {'fits' if self.fits else 'MAY NOT FIT'}: {self.verdict}")


@dataclass(frozen=True)
class _StagePrompts:
    """The prompts each stage runs, as the batcher sees them."""

    cache: list[_Seq]  # every cue family x query x condition
    steer: list[_Seq]  # the first family, steering.n_queries queries
    other: list[_Seq]  # the other families on the steering queries (scored unsteered)
    n_queries: int
    n_benign: int  # benign prompts (both cues) read for the refusal direction
    exact: bool
    tag_tokens: int  # the longer answer tag


def _stage_prompts(cfg: Config, notes: list[str]) -> _StagePrompts:
    """Exact token counts with the tokenizer, estimated without (and a note saying so)."""
    from afprobe.activations.queries import load_queries
    from afprobe.activations.scenarios import answer_tags

    queries = load_queries(cfg.queries, cfg.seed, harmful=True)
    tokenizer, why = _load_tokenizer(cfg)
    if tokenizer is None:
        notes.append(f"token counts estimated: no tokenizer here ({why})")
        seqs = _estimated_seqs(cfg, queries)
        tag_tokens = max(math.ceil(len(t) / CHARS_PER_TOKEN) for t in answer_tags())
    else:
        seqs = _exact_seqs(cfg, tokenizer, queries)
        tag_tokens = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in answer_tags())
    first = cfg.scenario.cue_families[0]
    keep = set(list(dict.fromkeys(s.query_id for s in seqs if s.family == first))[: cfg.steering.n_queries])
    steer = [s for s in seqs if s.family == first and s.query_id in keep]
    n_benign = 0
    st = cfg.steering
    if st.needs_refusal:
        n_benign = 2 * min(st.refusal_queries, len(load_queries(cfg.queries, cfg.seed, harmful=False)))
    return _StagePrompts(seqs, steer, [s for s in seqs if s.family != first and s.query_id in keep], len(queries),
                         n_benign, tokenizer is not None, tag_tokens)


def _adapters(cfg: Config, shape: Shape) -> list[dict[str, Any]]:
    """The bundled adapter of a `+name` spec and `model.adapter`, with their sizes when readable."""
    from afprobe.activations.loading import resolve_spec

    out = []
    for ref, runtime in ((resolve_spec(cfg.model.spec).adapter, "merged at load: no extra memory at run time"),
                         (cfg.model.adapter, "assumed merged at load like the bundled ones: no extra memory at run time")):
        if ref:
            adapter = _adapter_config(ref)
            out.append({"ref": ref, "runtime": runtime, **(lora_size(shape, adapter) if adapter else {"params": None})})
    return out


def make_plan(cfg: Config, gpus: Optional[int] = None, gpu_memory: Optional[str] = None,
              margin: float = SAFETY_MARGIN, hf_config: Any = None) -> Plan:
    """The plan for `cfg` on `gpus` GPUs of `gpu_memory` each ("80GB"), or on the hardware found here.
    `hf_config`: the model's config if already read (else read from `model.spec`)."""
    from afprobe.activations.cache import resolve_layers
    from afprobe.activations.loading import load_config_only

    memory_per_gpu = None
    decimal_unit = gpu_memory is not None and re.search(r"\d\s*[KMGT]B$", gpu_memory.strip(), re.IGNORECASE)
    if gpu_memory is not None:
        try:  # a card's size as vendors quote it: an "80 GB" A100/H100 holds 80 GiB
            memory_per_gpu = parse_memory(gpu_memory.strip()[:-1] + "iB" if decimal_unit else gpu_memory)
        except ValueError as exc:
            raise BadInput(f"--gpu-memory: {exc}") from None
    if not 0 <= margin < 1:
        raise BadInput(f"the safety margin must be in [0, 1) (got {margin})")
    if cfg.model.remote != "none" and (cfg.cache.prefix_reuse or cfg.steering.prefix_reuse):
        # NDIF runs a stock model: no shared-prefix KV reuse, every prompt token is computed (remote.py)
        cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"prefix_reuse": False}),
                                     "steering": cfg.steering.model_copy(update={"prefix_reuse": False})})
    mc, st, cc = cfg.model, cfg.steering, cfg.cache
    shape = shape_from_config(hf_config or load_config_only(mc.spec, mc.trust_remote_code))
    nbytes = DTYPE_BYTES[mc.dtype]
    notes: list[str] = []
    if decimal_unit:
        notes.append(f"--gpu-memory {gpu_memory} is read as a card size the way GPU makers quote it, in binary units "
                     f"({memory_per_gpu / 1e9:.1f}e9 bytes: an '80 GB' A100/H100 holds 80 GiB); give a byte count for "
                     "anything else")
    adapters = _adapters(cfg, shape)
    pr = _stage_prompts(cfg, notes)
    n_deploy = len(pr.steer) // 2 if st.known_answer else 0  # the known-answer check's harmful requests

    # batches as the stages form them: the cache stage per shard, steering over all its prompts
    shards = [pr.cache[i: i + cc.shard_prompts] for i in range(0, len(pr.cache), cc.shard_prompts)]
    cache_runs = [_batches(chunk, [min(_position_start(s, p) for p in cc.positions) for s in chunk],
                           cc.prefix_reuse, cc.batch_tokens, _CACHE_MAX_BATCH) for chunk in shards]
    cache_batches = [b for run in cache_runs for b in run.batches]
    kinds = steering_conditions(st)
    n_conditions = sum(kinds.values())
    touching = kinds["ablation"] + (kinds["probe"] + kinds["random"] if st.positions == "all" else 0)
    reuse_modes = ([True] if st.prefix_reuse and n_conditions > touching else []) + \
        ([False] if not st.prefix_reuse or touching else [])  # ablation and positions "all" recompute the prefix
    scored = pr.steer + pr.other
    steer_runs = [_batches(scored, [s.user_start for s in scored], reuse, cc.batch_tokens, st.batch_size)
                  for reuse in reuse_modes]

    # memory
    eager = mc.backend == "transformer_lens" or mc.attn_implementation == "eager"
    prefix_tokens = max(p for _, _, p, _ in cache_batches + [b for run in steer_runs for b in run.batches])
    prefix_copies = 2 if n_deploy and prefix_tokens else 1  # the known-answer check holds a copy of its own
    # a steering batch keeps its prompt pass (copied once more into the scorer's layout when no prefix is reused),
    # then copies it for the two answer tags or for generation
    batch_own = max(r * ((1 + (p == 0)) * t + max(2 * t, t + st.max_new_tokens))
                    for run in steer_runs for r, t, p, _ in run.batches)
    peaks = []  # (bytes, where)
    for label, runs, tags in (("cache", cache_runs, 0), ("steer", steer_runs, 2 * pr.tag_tokens)):
        for run in runs:
            rows, t, p, _ = run.largest
            logits = rows * tags * shape.vocab * (nbytes + 4)  # the teacher-forced tags' logits, float32 log-softmax
            peaks.append((forward_peak(shape, rows, t, p + t, nbytes, eager) + logits,
                          f"{label} batch of {rows} rows x {t} tokens attending to {p + t}"))
    if prefix_tokens:
        peaks.append((forward_peak(shape, 1, prefix_tokens, prefix_tokens, nbytes, eager),
                      f"prefix pass of {prefix_tokens} tokens"))
    act_peak, peak_at = max(peaks)
    cached_layers = len(resolve_layers(cc.layers, shape.n_layers))
    prefix_kv, batch_kv = prefix_copies * shape.kv_bytes(prefix_tokens, nbytes), shape.kv_bytes(batch_own, nbytes)
    mem = {"weights": shape.params * nbytes, "kv_per_token": shape.kv_bytes(1, nbytes), "prefix_kv": prefix_kv,
           "prefix_copies": prefix_copies, "batch_kv": batch_kv, "activation_peak": act_peak,
           "activation_peak_at": peak_at, "kv_and_activations": prefix_kv + batch_kv + act_peak,
           "store": len(pr.cache) * cached_layers * len(cc.sites) * len(cc.positions) * shape.d_model
           * DTYPE_BYTES[cc.dtype],
           "attention": "eager: scores grow with the square of the sequence" if eager else "sdpa: no score matrix"}

    # work per stage; a prefix is computed whenever a batch's system prompt differs from the one before
    new_prefix = [i == 0 or b[3] != cache_batches[i - 1][3] for i, b in enumerate(cache_batches)]
    steer_passes = n_conditions * len(pr.steer)
    stages = {
        "cache": {"prompts": len(pr.cache), "forwards": len(pr.cache), "batches": len(cache_batches),
                  "shards": len(shards), "prefix_passes": sum(new_prefix) if cc.prefix_reuse else 0,
                  "tokens_total": sum(s.length for s in pr.cache),
                  "tokens_computed": sum(run.own_tokens for run in cache_runs)
                  + sum(p for (_, _, p, _), new in zip(cache_batches, new_prefix) if new),
                  "layers": cached_layers, "sites": len(cc.sites), "positions": len(cc.positions), "dtype": cc.dtype},
        "probe": {"methods": len(cfg.probes.methods)},
        "steer": {"conditions": n_conditions, "by_kind": kinds, "prompts": len(pr.steer),
                  "prompt_passes": steer_passes, "max_new_tokens": st.max_new_tokens,
                  "other_family_passes": len(pr.other),
                  "known_answer_forwards": n_deploy,  # steered scoring of the deployment-cue requests
                  "refusal_forwards": pr.n_benign},  # benign prompts read for the refusal direction
        "generated_tokens": (steer_passes + len(pr.other) + n_deploy) * st.max_new_tokens,
    }
    prompts = {"exact": pr.exact, "n_queries": pr.n_queries, "n_families": len(cfg.scenario.cue_families),
               "cache_prompts": len(pr.cache), "steer_prompts": len(pr.steer), "prefix_tokens": prefix_tokens,
               "suffix_tokens": max(t for _, t, _, _ in cache_batches),
               "mean_tokens": sum(s.length for s in pr.cache) / len(pr.cache)}
    if mc.remote != "none":
        stages["remote"] = remote_jobs(cfg, len(pr.cache), len(pr.steer), len(pr.other), n_deploy, cached_layers,
                                       shape.d_model)
        notes.append(f"model.remote '{mc.remote}': the shared-prefix tricks (prefix KV reuse, split-prefix attention) do "
                     "not apply remotely (NDIF runs a stock model), so every prompt token is computed; "
                     f"{stages['remote']['jobs']} jobs of up to {mc.remote_job_prompts} prompts "
                     f"(model.remote_job_prompts), largest result {_gb(stages['remote']['largest_result_bytes'])}")
    model = {"spec": mc.spec, "family": shape.family, "dtype": mc.dtype, "params": shape.params,
             "embedding_params": (shape.vocab + shape.n_positions) * shape.d_model, "layer_params": shape.layer_params,
             "head_params": 0 if shape.tied else shape.vocab * shape.d_model, "n_layers": shape.n_layers,
             "d_model": shape.d_model, "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads,
             "head_dim": shape.head_dim, "d_ff": shape.d_ff, "vocab": shape.vocab, "tied": shape.tied,
             "backend": mc.backend, "remote": mc.remote, "adapters": adapters}
    return _place(cfg, shape, model, mem, prompts, stages, notes, gpus, memory_per_gpu, margin)


def remote_jobs(cfg: Config, n_cache: int, n_steer: int, n_other: int, n_deploy: int, layers: int,
                d_model: int) -> dict[str, Any]:
    """Remote jobs per stage (one nnsight session per `model.remote_job_prompts` prompts) and what comes back:
    the cache stage returns pooled float32 rows only, steering returns token ids and one log-odds per prompt."""
    per = cfg.model.remote_job_prompts
    cache_jobs = math.ceil(n_cache / per)
    steer_jobs = sum(kinds for kinds in steering_conditions(cfg.steering).values()) * math.ceil(n_steer / per) \
        + math.ceil(n_other / per) + (2 * math.ceil(n_deploy / per) + math.ceil(n_deploy / per) if n_deploy else 0)
    cache_result = min(per, n_cache) * layers * len(cfg.cache.sites) * len(cfg.cache.positions) * d_model * 4
    steer_result = min(per, max(n_steer, 1)) * (cfg.steering.max_new_tokens * 8 + 8)
    return {"job_prompts": per, "cache_jobs": cache_jobs, "steer_jobs": steer_jobs, "jobs": cache_jobs + steer_jobs,
            "largest_result_bytes": max(cache_result, steer_result), "prefix_reuse": False}


def _gpus_needed(sizes: Sequence[int], overhead: int, usable: float) -> Optional[int]:
    """The fewest identical GPUs of `usable` bytes that hold the modules in order (None: not even one module fits)."""
    packed = _pack(sizes, overhead, [usable] * len(sizes))
    return None if packed is None else max(packed) + 1


def _place(cfg: Config, shape: Shape, model: dict, mem: dict, prompts: dict, stages: dict, notes: list[str],
           gpus: Optional[int], gpu_memory: Optional[int], margin: float) -> Plan:
    """Where the modules go, and the verdict."""
    mc, nbytes = cfg.model, DTYPE_BYTES[cfg.model.dtype]
    load = f"{_gb(mem['weights'])} weights {mc.dtype} + {_gb(mem['kv_and_activations'])} KV/activations"

    def plan(fits: bool, verdict: str, placement: dict[str, Any]) -> Plan:
        return Plan(model, mem, prompts, stages, placement, fits, verdict, notes)

    if mc.remote == "ndif":
        return plan(True, f"remote (NDIF): the weights live on the server ({load} there); locally only the "
                          "tokenizer and config", {"hardware": "NDIF's servers (model.remote: ndif); no weights load here"})
    if mc.remote == "local":
        notes.append("model.remote 'local' runs the remote code path on this machine, so the weights load here")

    modules = shape.modules()
    layer_prefix = ADAPTERS[shape.family].layers
    per_layer_kv = (mem["prefix_kv"] + mem["batch_kv"]) // shape.n_layers
    sizes = [n * nbytes + (per_layer_kv if name.startswith(layer_prefix + ".") else 0) for name, n in modules]
    overhead = mem["activation_peak"]  # every device that runs layers needs room for one forward
    devices, source, open_count = _hardware(cfg, gpus, gpu_memory)
    gpu_list = [d for d in devices if d.name.startswith("cuda")]
    needed = _gpus_needed(sizes, overhead, gpu_list[0].usable(margin)) if gpu_list else None

    if mc.device_map is None:  # everything on model.device
        name = _device_name(mc.device)
        if mc.device == "auto":
            name = gpu_list[0].name if gpu_list else "cpu"
        target = next((d for d in devices if d.name == name), None)
        if target is None and name in ("cpu", "mps"):
            target = Device(name, _ram())
        if target is None:
            raise BadInput(f"model.device is '{mc.device}' but there is no {name} to plan for; "
                           "pass --gpus N --gpu-memory SIZE to plan for GPUs")
        chosen, assignment = [target], [target.name] * len(modules)
    elif isinstance(mc.device_map, dict):
        assignment = _explicit_map(mc.device_map, modules)
        known = {d.name: d for d in devices}
        if open_count:  # the GPUs the map names, each of --gpu-memory
            known.update({n: Device(n, gpu_memory) for n in assignment if n.startswith("cuda")})
        known.setdefault("cpu", Device("cpu", _ram()))
        known.setdefault("disk", Device("disk", None))
        missing = sorted(set(assignment) - set(known))
        if missing:
            raise BadInput(f"model.device_map places modules on {', '.join(missing)}, which are not among the devices "
                           f"planned for ({', '.join(known)}); pass --gpus N --gpu-memory SIZE")
        chosen = [known[n] for n in dict.fromkeys(assignment)]
    else:  # auto / balanced / sequential: GPUs first, then any cpu or disk named in model.max_memory
        order = gpu_list + [d for d in devices if d not in gpu_list]
        if open_count:
            order = [Device(f"cuda:{i}", gpu_memory) for i in range(len(modules))]
        room = [d.usable(margin) for d in order]
        packed = _pack(sizes, overhead, room)
        if packed is None:
            if needed is None:
                why = (f"the largest module plus one forward's activations ({_gb(max(sizes) + overhead)}) exceed a "
                       f"device's usable {_gb(room[0])}")
            else:
                why = f"{_n(len(order), 'device')} cannot hold {load}; needs {needed} GPUs of {_gb(gpu_list[0].memory)}"
            return plan(False, f"{why} ({margin:.0%} of each kept free)",
                        {"hardware": _hardware_text(order, source, margin, open_count), "margin": margin,
                         "devices": [], "device_map": {}, "gpus_needed": needed})
        used = max(packed) + 1
        if mc.device_map != "sequential":
            packed = _balanced(sizes, overhead, room[:used])
        chosen, assignment = order[:used], [order[i].name for i in packed]

    placement = {**_placement(chosen, assignment, modules, sizes, overhead, nbytes, margin, source, layer_prefix),
                 "gpus_needed": needed}
    over = [d for d in placement["devices"] if d["usable"] is not None and d["total"] > d["usable"]]
    if over:
        d = over[0]
        if mc.device_map is None and needed and needed > 1:
            hint = f"; set model.device_map: auto to shard it over {needed} GPUs"
        elif d["activations"] > d["total"] / 4:
            hint = "; lower cache.batch_tokens or steering.batch_size"
        else:
            hint = ""
        return plan(False, f"{d['name']} would hold {_gb(d['total'])} but {_gb(d['usable'])} of its "
                           f"{_gb(d['memory'])} is usable ({margin:.0%} kept free; {load}){hint}", placement)
    n_gpus = sum(d.name.startswith("cuda") for d in chosen)
    if n_gpus == len(chosen):
        where = f"{n_gpus} x {_gb(chosen[0].memory)} GPU{'s' * (n_gpus > 1)} needed"
    else:
        where = ", ".join(f"{d.name} ({_gb(d.memory) if d.memory else 'unlimited'})" for d in chosen)
    layout = _layer_ranges([n for n, _ in modules], assignment, layer_prefix)
    return plan(True, f"{where}: {load}, {margin:.0%} of each device kept free; device map {layout}", placement)


def _ram() -> int:
    import psutil

    return psutil.virtual_memory().total


def _placement(devices: Sequence[Device], assignment: Sequence[str], modules: Sequence[tuple[str, int]],
               sizes: Sequence[int], overhead: int, nbytes: int, margin: float, source: str,
               layer_prefix: str) -> dict[str, Any]:
    """Per device: what it holds and its load; plus the Hugging Face device map."""
    rows = []
    for dev in devices:
        idx = [i for i, a in enumerate(assignment) if a == dev.name]
        weights = sum(modules[i][1] * nbytes for i in idx)
        names = [modules[i][0] for i in idx]
        layers = [int(n.rsplit(".", 1)[1]) for n in names if n.startswith(layer_prefix + ".")]
        parts = [f"{len(layers)} layers ({layers[0]}-{layers[-1]})"] if layers else []
        parts += [n for n in names if not n.startswith(layer_prefix + ".") and n != "model.rotary_emb"]
        act = overhead if idx and dev.name != "disk" else 0
        kv = sum(sizes[i] for i in idx) - weights
        rows.append({"name": dev.name, "memory": dev.memory, "usable": None if dev.memory is None else dev.usable(margin),
                     "holds": " + ".join(parts) or "nothing", "weights": weights, "kv": kv, "activations": act,
                     "total": weights + kv + act})
    hf_map = {name: int(a[5:]) if a.startswith("cuda:") else a for (name, _), a in zip(modules, assignment)}
    return {"hardware": _hardware_text(devices, source, margin), "margin": margin, "devices": rows, "device_map": hf_map}


def _hardware_text(devices: Sequence[Device], source: str, margin: float, open_count: bool = False) -> str:
    if open_count:
        listed = f"GPUs of {_gb(devices[0].memory)}, as many as needed"
    elif len({d.memory for d in devices}) == 1 and all(d.name.startswith("cuda") for d in devices):
        listed = f"{_n(len(devices), 'GPU')} of {_gb(devices[0].memory)}"
    else:
        listed = ", ".join(f"{d.name} {_gb(d.memory) if d.memory else '(unlimited)'}" for d in devices)
    return f"{listed} ({source}); {margin:.0%} of each kept free"


# ---------------------------------------------------------------- entry points

def plan_cli(config: str, overrides: Sequence[str], gpus: Optional[int], gpu_memory: Optional[str],
             margin: Optional[float], json_path: Optional[str], quiet: bool = False) -> Plan:
    """`afprobe plan`: print the plan, optionally write its JSON; BadInput (exit 2) when it does not fit."""
    from afprobe.fsio import atomic_write_json

    result = make_plan(load_config(config, overrides), gpus, gpu_memory, SAFETY_MARGIN if margin is None else margin)
    if not quiet:
        print(result.text())
    if json_path:
        atomic_write_json(Path(json_path), result.to_json())
    if not result.fits:
        raise BadInput(f"does not fit: {result.verdict}")
    return result


def short_plan(cfg: Config, hf_config: Any = None) -> str:
    """The two-line plan `afprobe run` prints before loading weights (never fails the run)."""
    try:
        return make_plan(cfg, hf_config=hf_config).short_text()
    except Exception as err:  # noqa: BLE001 - the plan only advises; the run goes on and meets real errors itself
        return f"plan: unavailable ({type(err).__name__}: {err})"
