"""Remote execution through nnsight: `model.remote: ndif` (NDIF's servers) and `model.remote: local` (the same code
path run here through nnsight's local simulation: the trace is serialized and deserialized as for the server, with
non-installed modules hidden, then run on local weights).

What runs remotely: the cache stage's reads (residuals pooled at the cached positions on the server: only
[rows, positions, d_model] float32 per site comes back, never whole sequences), teacher-forced log-odds (only one
number per row comes back) and steered greedy generation (only the token ids). Many prompts go in one job: a job is
one `model.session(...)` holding one trace per batch; `model.remote_job_prompts` prompts per job. Probes, statistics
and everything else run locally on what comes back.

Not remote: the shared-prefix KV reuse and split-prefix attention (NDIF runs a stock model; every prompt is computed
in full, so `cache.prefix_reuse` / `steering.prefix_reuse` are ignored here), and the steering scorer's KV-copy trick
(log-odds and generation are two traces of one job instead).

Every serialized trace is checked before it runs or is sent (`check_trace`): it may refer only to modules the server
allows (ALLOWED_MODULES) plus the serializer's own plumbing; afprobe code inside traces lives in
`activations/remote_ops.py`, shipped by value. Failures (no API key, a model NDIF does not serve, a server or network
error) are BadInput (exit 2, one line); the store keeps its finished shards and steering its finished conditions, so
re-running resumes.
"""
from __future__ import annotations

import hashlib
import json
import pickletools
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from afprobe.activations.backends.base import Backend, ModelInputs, ResidualEdit, SiteKey, generation_config, \
    truncate_at_eos
from afprobe.errors import BadInput
from afprobe.log import log

# What traced code may use on the server (the list; NDIF's environment also has numpy, transformers,
# accelerate, peft, but afprobe's traces do not need them).
ALLOWED_MODULES = frozenset({"torch", "math", "einops", "collections", "typing", "operator"})
# What nnsight's serializer itself writes into every payload: the tracer and envoys (resolved by id on the server),
# cloudpickle's rebuild helpers, pickle's builtins, and the generation config passed to `generate`.
PLUMBING_MODULES = frozenset({"nnsight", "cloudpickle", "builtins", "copyreg", "_codecs", "transformers"})
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_SUBIMPORT = {"subimport", "dynamic_subimport"}
_NO_STACK_OPS = {"FRAME", "PROTO", "STOP"}  # leave the stack alone; a FRAME may fall between a global's two names


def trace_modules(blob: bytes) -> set[str]:
    """Every module a pickled payload refers to: globals it imports (GLOBAL / STACK_GLOBAL) and modules cloudpickle
    re-imports by name (`subimport`). Read from the opcodes without unpickling."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []
    modules: set[str] = set()
    want_module_name = False  # just saw cloudpickle's subimport: the next string names a module
    for op, arg, _ in pickletools.genops(blob):
        name = op.name
        value: Any = None
        if name in _NO_STACK_OPS:
            continue
        if name in _STRING_OPS:
            value = arg
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
            continue
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
            continue
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            value = ("global", module, attr)
        elif name == "STACK_GLOBAL":
            module, attr = pushed[-2:] if len(pushed) >= 2 else (None, None)
            value = ("global", module if isinstance(module, str) else "<unreadable>", str(attr))
        if isinstance(value, tuple):
            modules.add(value[1])
            want_module_name = value[2] in _SUBIMPORT
        elif want_module_name and isinstance(value, str):
            modules.add(value)
            want_module_name = False
        pushed.append(value)
    return modules


def disallowed_modules(blob: bytes) -> list[str]:
    allowed = ALLOWED_MODULES | PLUMBING_MODULES
    return sorted(m for m in trace_modules(blob) if m.split(".")[0] not in allowed)


def check_trace(blob: bytes) -> None:
    """BadInput unless the serialized trace uses only what the server allows."""
    bad = disallowed_modules(blob)
    if bad:
        raise BadInput(f"a remote trace uses module(s) the server does not allow: {', '.join(bad)} (allowed: "
                       f"{', '.join(sorted(ALLOWED_MODULES))}); fit probes locally on what comes back, and keep code "
                       "inside traces in activations/remote_ops.py")


def serialize(tracer: Any) -> bytes:
    """The payload nnsight would send for `tracer` (uncompressed), local modules registered by value first."""
    from nnsight.ndif import pull_env
    from nnsight.schema.request import RequestModel

    pull_env()
    return RequestModel.serialize(tracer, compress=False)


def _checked(tracer: Any, seen: Optional[set]) -> None:
    blob = serialize(tracer)
    if seen is not None:
        seen.clear()
        seen.update(trace_modules(blob))
    check_trace(blob)


def _backend_classes() -> tuple[type, type]:
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.backends.remote import RemoteBackend

    class CheckedLocal(LocalSimulationBackend):
        """nnsight's local simulation, after the allowed-modules check. `seen` receives the payload's modules."""

        def __init__(self, model: Any, seen: Optional[set] = None) -> None:
            super().__init__(model)
            self.seen = seen

        def __call__(self, tracer: Any) -> None:
            _checked(tracer, self.seen)
            return super().__call__(tracer)

    class CheckedRemote(RemoteBackend):
        """nnsight's NDIF backend, after the allowed-modules check (nothing is sent when it fails)."""

        seen: Optional[set] = None

        def _serialize(self, tracer: Any) -> bytes:
            _checked(tracer, self.seen)
            return super()._serialize(tracer)

    return CheckedLocal, CheckedRemote


def _register_ops() -> None:
    import nnsight

    from afprobe.activations import remote_ops

    nnsight.register(remote_ops)  # shipped by value: the server has no afprobe


def api_key() -> Optional[str]:
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or None


def require_api_key() -> None:
    if not api_key():
        raise BadInput("model.remote 'ndif' needs an NDIF API key: set NDIF_API_KEY, or save one with "
                       "`python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('KEY')\"` (get one at "
                       "https://login.ndif.us); or use model.remote 'local' to check the config on this machine")


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Job:
    """What one remote job runs: reads, log-prob forwards and generations, each a list of traces."""

    reads: list[tuple[dict, list[SiteKey], torch.Tensor]] = field(default_factory=list)  # (forward kwargs, sites, weights)
    logps: list[tuple[dict, Optional[dict], torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    gens: list[tuple[dict, Optional[dict], int]] = field(default_factory=list)  # (generate kwargs, edit, steps)


def edit_dict(edit: Optional[ResidualEdit]) -> Optional[dict]:
    """A ResidualEdit as the plain dict `remote_ops.apply_edit` reads (no afprobe class crosses to the server)."""
    if edit is None:
        return None
    return {"layers": tuple(edit.layers), "add": edit.add, "mask": edit.add_mask, "ablate": edit.ablate,
            "site": edit.site}


@dataclass
class RemoteBackend(Backend):
    """nnsight traces run as remote jobs (`mode` "ndif") or through nnsight's local simulation (`mode` "local").

    `model` is the HF model: real weights for "local", an empty (meta) model built from the config for "ndif".
    The Backend methods (`read`, `logits`, `generate`) work one batch per job; the cache and steering stages batch
    many prompts per job through `run_job`.
    """

    mode: str = "local"
    repo_id: Optional[str] = None  # the hub id NDIF knows the model by ("ndif")
    peft: Optional[str] = None  # a hub id of a PEFT adapter NDIF applies per request ("ndif")
    job_prompts: int = 64
    lm: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        from nnsight import TransformersModel

        _register_ops()
        side = self.tokenizer.padding_side
        kwargs = {"peft": self.peft} if self.peft else {}
        self.lm = TransformersModel(self.model, tokenizer=self.tokenizer, **kwargs)
        self.tokenizer.padding_side = side
        if self.repo_id:
            from nnsight.modeling import huggingface

            self.lm.repo_id = self.repo_id
            huggingface._ID_CACHE.setdefault(self.repo_id, self.repo_id)  # no Hub lookup to canonicalize the id
        self.name = f"nnsight-remote-{self.mode}"
        self._names = {"attn": self.adapter.attn, "attn_out": self.adapter.attn_out_module, "mlp": self.adapter.mlp,
                       "mid": self.adapter.mid_module}
        self._blocks = self.lm
        for part in self.adapter.layers.split("."):
            self._blocks = getattr(self._blocks, part)
        self.jobs_run = 0
        self.last_modules: set[str] = set()  # modules the last job's payload refers to

    @property
    def remote(self) -> str:
        return self.mode

    def _session_backend(self) -> Any:
        local, ndif = _backend_classes()
        if self.mode == "local":
            return local(self.lm, self.last_modules)
        require_api_key()
        backend = ndif(self.lm.to_model_key(), env=self.lm._remoteable_get_env())
        backend.seen = self.last_modules
        return backend

    def run_job(self, job: Job) -> dict[str, list]:
        """One remote job: every trace of `job` in one session. Returns {"read": [{site: [b, k, d]}],
        "logp": [[b]], "gen": [[b, prompt + new]]} in the job's order."""
        import nnsight
        from afprobe.activations import remote_ops

        lm, blocks, names = self.lm, self._blocks, self._names
        reads, logps, gens = job.reads, job.logps, job.gens
        pool, site_value, apply_edit, tag_logps = (remote_ops.pool, remote_ops.site_value, remote_ops.apply_edit,
                                                   remote_ops.tag_logps)
        try:
            with torch.inference_mode():
                with lm.session(backend=self._session_backend()):
                    results = nnsight.save({"read": [], "logp": [], "gen": []})
                    for kwargs, wanted, weights in reads:
                        with lm.trace(**kwargs):
                            got = {}
                            for layer, site in wanted:
                                got[(layer, site)] = pool(weights, site_value(blocks[layer], site, names)).cpu()
                            results["read"].append(got)
                    for kwargs, edit, cols, tokens, valid in logps:
                        with lm.trace(**kwargs):
                            if edit is not None:
                                apply_edit(blocks, names, edit)
                            results["logp"].append(tag_logps(lm.output.logits, cols, tokens, valid).cpu())
                    for kwargs, edit, steps in gens:
                        with lm.generate(**kwargs) as tracer:
                            if edit is not None:
                                for _ in tracer.iter[:steps]:
                                    apply_edit(blocks, names, edit)
                            results["gen"].append(tracer.result.cpu())
        except BadInput:
            raise
        except Exception as error:  # noqa: BLE001  (server, network, deserialization: one line, exit 2)
            where = "NDIF" if self.mode == "ndif" else "the local simulation of NDIF"
            raise BadInput(f"remote job failed on {where} ({type(error).__name__}): {_one_line(error)}; finished "
                           "shards and steering conditions are kept, re-run to resume") from None
        self.jobs_run += 1
        return dict(results)

    # ---- the Backend interface, one batch per job

    def read(self, inputs: ModelInputs, sites: list[SiteKey], weights: torch.Tensor) -> dict[SiteKey, torch.Tensor]:
        return self.run_job(Job(reads=[(forward_kwargs(inputs), list(sites), weights)]))["read"][0]

    def logits(self, inputs: ModelInputs, edit: Optional[ResidualEdit] = None) -> tuple[torch.Tensor, Any]:
        raise BadInput("whole-sequence logits are not fetched from a remote model (only the tag log-probs are)")

    def generate(self, inputs: ModelInputs, edit: Optional[ResidualEdit], **generate_kwargs: Any) -> torch.Tensor:
        kwargs, steps = generate_kwargs_for(self, inputs, generate_kwargs)
        ids = self.run_job(Job(gens=[(kwargs, edit_dict(edit), steps)]))["gen"][0]
        return truncate_at_eos(ids[:, inputs.full_ids.shape[1]:], self.model, self.tokenizer)


def forward_kwargs(inputs: ModelInputs) -> dict:
    """Forward arguments of a batch without a reused prefix (remote runs compute every token)."""
    if inputs.past is not None:
        raise BadInput("remote models run stock forwards: a reused prefix KV cache cannot be sent")
    return dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                use_cache=False)


def generate_kwargs_for(backend: Backend, inputs: ModelInputs, settings: dict) -> tuple[dict, int]:
    steps = int(settings["max_new_tokens"])
    config = generation_config(backend.model, backend.tokenizer, stop_at_eos=False, **settings)
    return dict(input_ids=inputs.full_ids, attention_mask=inputs.attention_mask, generation_config=config), steps


def is_remote(backend: Any) -> bool:
    return isinstance(backend, RemoteBackend)


def jobs(n: int, size: int) -> Iterable[range]:
    """Consecutive index ranges of at most `size` prompts."""
    for start in range(0, n, max(1, size)):
        yield range(start, min(n, start + max(1, size)))


# ---------------------------------------------------------------- loading

def ndif_fingerprint(repo_id: str, config: Any, peft: Optional[str]) -> str:
    """Without weights: the repo id, its config and the adapter id."""
    h = hashlib.sha256(f"ndif:{repo_id}:{peft or ''}".encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def empty_model(config: Any) -> Any:
    """The model's module tree on the meta device (no memory, no weights): nnsight's envoys need the structure."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.eval()
    model.requires_grad_(False)
    return model


def load_remote(mc: Any) -> tuple[Any, Any, RemoteBackend, str]:
    """(model, tokenizer, backend, fingerprint) for `model.remote` local or ndif."""
    from afprobe.activations.loading import load_config_only, load_model, load_tokenizer, model_fingerprint

    if mc.remote == "local":
        model, tokenizer = load_model(**mc.load_kwargs())
        backend = RemoteBackend(model, tokenizer, mode="local", job_prompts=mc.remote_job_prompts)
        return model, tokenizer, backend, model_fingerprint(model)
    repo_id = mc.spec
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")) or "+" in repo_id:
        raise BadInput(f"model.remote 'ndif' needs model.spec to be the hub id NDIF serves (org/name), got '{repo_id}'")
    if mc.adapter and (mc.adapter.count("/") != 1 or mc.adapter.startswith((".", "/", "~"))):
        raise BadInput("model.adapter with model.remote 'ndif' must be a hub id NDIF can fetch (org/name); a local "
                       f"adapter folder ('{mc.adapter}') cannot be sent, merge it where the weights are")
    require_api_key()
    config = load_config_only(repo_id, mc.trust_remote_code)  # tokenizer and config only: no weights here
    tokenizer = load_tokenizer(repo_id, mc.trust_remote_code)
    model = empty_model(config)
    check_deployed(repo_id)
    backend = RemoteBackend(model, tokenizer, mode="ndif", repo_id=repo_id, peft=mc.adapter,
                            job_prompts=mc.remote_job_prompts)
    return model, tokenizer, backend, ndif_fingerprint(repo_id, config, mc.adapter)


def check_deployed(repo_id: str) -> None:
    """BadInput unless NDIF's status lists the model as running (or when the service cannot be reached)."""
    from nnsight import CONFIG
    from nnsight.ndif import _get

    try:
        status = _get("/status")
    except Exception as error:  # noqa: BLE001  (httpx / connection errors)
        raise BadInput(f"cannot reach NDIF at {CONFIG.API.HOST} ({type(error).__name__}): {_one_line(error)}") from None
    running = {d.get("repo_id") for d in status.get("deployments", {}).values()
               if d.get("application_state") == "RUNNING"}
    if repo_id not in running:
        raise BadInput(f"NDIF does not serve '{repo_id}' right now (running: {', '.join(sorted(map(str, running))) or 'none'}); "
                       "pick a deployed model or try later")
    log.info(f"NDIF serves {repo_id}")


# ---------------------------------------------------------------- the stages' remote paths

def _batches(rows: Sequence[int], seqs: Sequence[Sequence[int]], keys: Sequence[Any], budget: int, max_batch: int,
             pad_id: int) -> list[Any]:
    """Batches (no reused prefix) of the global rows `rows`, grouped by system prompt, within the token budget."""
    from afprobe.activations.batching import budget_batches, make_batch

    groups = budget_batches([len(seqs[i]) for i in rows], [keys[i] for i in rows], budget, max_batch)
    cpu = torch.device("cpu")
    return [make_batch([rows[i] for i in g], [seqs[rows[i]] for i in g], pad_id, 0, None, cpu) for g in groups]


def read_pooled_remote(backend: RemoteBackend, prompts: Sequence[Any], sites: list[SiteKey], positions: Sequence[str],
                       batch_tokens: int, progress: Any = None, max_batch: int = 64) -> tuple[dict, dict[str, int]]:
    """`cache.read_pooled` for a remote model: {(layer, site, position): [n, d_model] float32}, token counts.
    One job per `backend.job_prompts` prompts; the server pools, so only the cached positions come back."""
    from afprobe.activations.cache import pool_weights

    out = {(layer, site, pos): torch.empty((len(prompts), backend.d_model)) for layer, site in sites for pos in positions}
    seqs = [list(p.input_ids) for p in prompts]
    keys = [p.system_key for p in prompts]
    for span in jobs(len(prompts), backend.job_prompts):
        batches = _batches(list(span), seqs, keys, batch_tokens, max_batch, backend.tokenizer.pad_token_id)
        job = Job(reads=[(forward_kwargs(b.inputs), list(sites), pool_weights(b, prompts, positions)) for b in batches])
        for batch, pooled in zip(batches, backend.run_job(job)["read"]):
            for (layer, site), values in pooled.items():
                for k, pos in enumerate(positions):
                    out[(layer, site, pos)][batch.rows] = values[:, k].float().cpu()
        if progress is not None:
            progress(len(span))
    total = sum(len(s) for s in seqs)
    return out, {"total_tokens": total, "computed_tokens": total}


def steer_remote(backend: RemoteBackend, prompts: Sequence[Any], spec: Any, *, tags: Optional[list[list[int]]],
                 gen: Optional[dict], batch_tokens: int, max_batch: int, progress: Any = None,
                 counts: Optional[dict] = None) -> tuple[Optional[list[list[int]]], Optional[list[float]]]:
    """Steered generation (`gen`: generate settings) and/or teacher-forced log-odds (`tags`: accept, reject token
    ids) for `prompts` under `spec` (a SteeringSpec or None), many prompts per job. Returns (new token ids per
    prompt or None, log P(accept) - log P(reject) per prompt or None)."""
    pad = backend.tokenizer.pad_token_id
    seqs = [list(p.input_ids) for p in prompts]
    keys = [p.system_key for p in prompts]
    new_ids: list[list[int]] = [[] for _ in prompts]
    logps: list[float] = [0.0] * (2 * len(prompts))
    for span in jobs(len(prompts), backend.job_prompts):
        rows = list(span)
        job = Job()
        gen_batches, logp_batches = [], []
        if gen is not None:
            gen_batches = _batches(rows, seqs, keys, batch_tokens, max_batch, pad)
            for batch in gen_batches:
                kwargs, steps = generate_kwargs_for(backend, batch.inputs, gen)
                job.gens.append((kwargs, edit_dict(spec.edit(batch, prompts) if spec else None), steps))
        if tags is not None:
            doubled_rows = [2 * i + j for i in rows for j in range(len(tags))]
            full = {2 * i + j: seqs[i] + tags[j] for i in rows for j in range(len(tags))}
            dseqs = [full.get(k, []) for k in range(2 * len(prompts))]
            doubled = [p for p in prompts for _ in tags]
            logp_batches = _batches(doubled_rows, dseqs, [keys[k // 2] for k in range(2 * len(prompts))], batch_tokens,
                                    max_batch, pad)
            width = max(len(t) for t in tags)
            for batch in logp_batches:
                b = len(batch.rows)
                cols = torch.zeros((b, width), dtype=torch.long)
                toks = torch.zeros((b, width), dtype=torch.long)
                valid = torch.zeros((b, width))
                for r, row in enumerate(batch.rows):
                    tag, n = tags[row % 2], len(dseqs[row])
                    cols[r, : len(tag)] = torch.tensor([batch.column(r, i) for i in range(n - len(tag) - 1, n - 1)])
                    toks[r, : len(tag)] = torch.tensor(tag)
                    valid[r, : len(tag)] = 1.0
                edit = edit_dict(spec.edit(batch, doubled) if spec else None)
                job.logps.append((forward_kwargs(batch.inputs), edit, cols, toks, valid))
        result = backend.run_job(job)
        for batch, ids in zip(gen_batches, result["gen"]):
            new = truncate_at_eos(ids[:, batch.inputs.full_ids.shape[1]:], backend.model, backend.tokenizer)
            for r, row in enumerate(batch.rows):
                new_ids[row] = new[r].tolist()
        for batch, values in zip(logp_batches, result["logp"]):
            for r, row in enumerate(batch.rows):
                logps[row] = float(values[r])
        if counts is not None:
            total = sum(len(seqs[i]) for i in rows)
            counts["total_tokens"] += total
            counts["computed_tokens"] += total
        if progress is not None:
            progress(len(rows))
    odds = [logps[2 * i] - logps[2 * i + 1] for i in range(len(prompts))] if tags is not None else None
    return (new_ids if gen is not None else None), odds
