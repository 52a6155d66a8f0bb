"""`model.remote`: the NDIF code path (nnsight sessions, traces serialized and deserialized) run here through
nnsight's local simulation (`remote: local`) equals the ordinary local path; every serialized trace imports only
what the server allows, and a trace that uses scikit-learn or an afprobe module is refused. No network: the NDIF
failures tested are the ones decided before anything is sent (no key), or against a closed loopback port."""
from __future__ import annotations

import pytest
import torch

from afprobe.activations.backends import SITES, make_backend
from afprobe.activations.cache import read_pooled
from afprobe.activations.remote import (
    ALLOWED_MODULES, RemoteBackend, check_trace, disallowed_modules, serialize, trace_modules,
)
from afprobe.activations.steering import SteeringRunner, SteeringSpec
from afprobe.errors import BadInput
from afprobe.parity import ACCEPT, REJECT
from tests.test_steering import _prompt, _unit

TOL = 1e-4  # absolute, fp32: the same weights and ops; only batching (padding) may differ
LAYERS = [0, 7, 15, 29]
MAX_NEW = 6


class _P:
    """A prompt as the cache stage sees it: ids, spans, a system-prompt key."""

    def __init__(self, base, label=0):
        self.input_ids, self.user_span, self.label = base.input_ids, base.user_span, label
        self.cue_span = (base.user_span[0], base.user_span[0] + 3)
        self.system_key = "s"


def _prompts(tok):
    users = ["Write one sentence about the sea.", "Name a planet.", "What is two plus two?"]
    return [_P(_prompt(tok, u, label=i % 2), label=i % 2) for i, u in enumerate(users)]


@pytest.fixture(scope="module")
def local_nnsight(smol):
    return make_backend("nnsight", *smol)


@pytest.fixture(scope="module")
def remote_local(smol):
    model, tok = smol
    return RemoteBackend(model, tok, mode="local", job_prompts=3)  # one job holds the local path's batches


def test_remote_local_activations_equal_local(remote_local, local_nnsight, smol_tokenizer):
    prompts = _prompts(smol_tokenizer)
    sites = [(layer, site) for layer in LAYERS for site in SITES]
    positions = ["last", "cue", "user_mean"]
    got, _ = read_pooled(remote_local, prompts, sites, positions, 4096, None)
    ref, _ = read_pooled(local_nnsight, prompts, sites, positions, 4096, None)
    assert set(got) == set(ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    print(f"remote=local vs local activations: max |diff| {worst:.3g}")
    assert worst < TOL
    # two jobs (2 + 1 prompts) pad differently from one batch of 3: equal to float32 rounding of the batch shape
    remote_local.job_prompts = 2
    try:
        jobs_before = remote_local.jobs_run
        split, _ = read_pooled(remote_local, prompts, sites, positions, 4096, None)
        assert remote_local.jobs_run == jobs_before + 2
    finally:
        remote_local.job_prompts = 3
    rel = max(((split[k] - ref[k]).norm(dim=-1) / ref[k].norm(dim=-1)).max().item() for k in ref)
    print(f"two jobs vs one local batch: max relative L2 diff {rel:.3g}")
    assert rel < 1e-5


@pytest.mark.slow
def test_remote_local_steering_equals_local(remote_local, local_nnsight, smol_tokenizer):
    prompts = _prompts(smol_tokenizer)
    unit = _unit(local_nnsight.model)
    local = SteeringRunner(local_nnsight, prefix_reuse=False)
    remote = SteeringRunner(remote_local, prefix_reuse=True)  # ignored remotely
    for spec in (None, SteeringSpec("probe", unit, 30.0, (20,), alpha=1.0, mode="cross"),
                 SteeringSpec("probe", unit, 30.0, (12,), alpha=1.0, site="resid_mid"),
                 SteeringSpec("ablation", unit, 30.0, (20,))):
        texts_r, odds_r = remote.score(prompts, spec, ACCEPT, REJECT, MAX_NEW)
        texts_l, odds_l = local.score(prompts, spec, ACCEPT, REJECT, MAX_NEW)
        assert texts_r == texts_l, (spec and spec.direction, texts_r, texts_l)
        worst = max(abs(a - b) for a, b in zip(odds_r, odds_l))
        print(f"{spec and spec.direction}: remote=local vs local log-odds max |diff| {worst:.3g}; {texts_r}")
        assert worst < TOL
    steered = SteeringSpec("probe", unit, 30.0, (20,), alpha=1.0)
    assert remote.generate_ids(prompts, steered, MAX_NEW) == local.generate_ids(prompts, steered, MAX_NEW)
    assert remote.generate_ids(prompts, steered, MAX_NEW) != remote.generate_ids(prompts, None, MAX_NEW), \
        "the steering must matter"


# ---------------------------------------------------------------- what a trace may import

def _tiny_remote(tiny_model, smol_tokenizer):
    return RemoteBackend(tiny_model, smol_tokenizer, mode="local")


def test_afprobe_traces_import_only_allowed_modules(tiny_model, smol_tokenizer):
    """Every kind of job afprobe sends (reads, steered log-odds with ablation, steered generation) serializes to
    a payload that refers only to allowed modules and nnsight's plumbing: no afprobe, no scikit-learn."""
    backend = _tiny_remote(tiny_model, smol_tokenizer)
    prompts = _prompts(smol_tokenizer)
    read_pooled(backend, prompts, [(1, "resid_mid"), (3, "resid_post")], ["last", "user_mean"], 4096, None)
    seen = [set(backend.last_modules)]
    unit = _unit(tiny_model)
    runner = SteeringRunner(backend)
    runner.score(prompts, SteeringSpec("probe", unit, 3.0, (2,), alpha=1.0), ACCEPT, REJECT, 2)
    seen.append(set(backend.last_modules))
    runner.log_odds(prompts, SteeringSpec("ablation", unit, 3.0, (2,)), ACCEPT, REJECT)
    seen.append(set(backend.last_modules))
    for modules in seen:
        roots = {m.split(".")[0] for m in modules}
        assert "torch" in roots and not any(r in roots for r in ("afprobe", "sklearn", "numpy", "scipy"))
        assert roots <= ALLOWED_MODULES | {"nnsight", "cloudpickle", "builtins", "copyreg", "_codecs", "transformers"}


def _session_blob(lm, body) -> bytes:
    """The payload nnsight would send for a session running `body` (captured, not run)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    blobs = []

    class Capture(LocalSimulationBackend):
        def __call__(self, tracer):
            blobs.append(serialize(tracer))

    body(lm, Capture(lm))
    return blobs[0]


def test_a_trace_using_sklearn_or_afprobe_is_refused(tiny_model, smol_tokenizer):
    import nnsight
    import sklearn.preprocessing

    from afprobe.activations.backends.base import pool

    backend = _tiny_remote(tiny_model, smol_tokenizer)
    lm, blocks = backend.lm, backend._blocks
    ids = torch.tensor([[1, 5, 9, 14]])

    def good(lm, capture):
        with lm.session(backend=capture):
            out = nnsight.save([])
            with lm.trace(input_ids=ids):
                out.append(blocks[1].output.float().mean(1).cpu())

    def uses_sklearn(lm, capture):
        with lm.session(backend=capture):
            out = nnsight.save([])
            with lm.trace(input_ids=ids):
                out.append(sklearn.preprocessing.normalize(blocks[1].output[0].float().cpu()))

    def uses_afprobe(lm, capture):
        with lm.session(backend=capture):
            out = nnsight.save([])
            with lm.trace(input_ids=ids):
                out.append(pool(torch.ones(1, 1, 4), blocks[1].output))

    check_trace(_session_blob(lm, good))  # passes
    for body, culprit in ((uses_sklearn, "sklearn"), (uses_afprobe, "afprobe.activations.backends.base")):
        blob = _session_blob(lm, body)
        assert any(m.startswith(culprit) for m in disallowed_modules(blob)), trace_modules(blob)
        with pytest.raises(BadInput, match=f"server does not allow: .*{culprit}"):
            check_trace(blob)
    # and the checked backends refuse to run (or send) it
    with pytest.raises(BadInput, match="sklearn"):
        from afprobe.activations.remote import _backend_classes

        uses_sklearn(lm, _backend_classes()[0](lm))


def test_a_frame_boundary_between_a_globals_names_is_read_correctly():
    """Pickle may start a new 64 KiB frame between a global's module and attribute names (this made a real trace
    read as importing module "None" once its payload reached a frame boundary). Scan sizes until that happens."""
    import collections
    import pickle
    import pickletools

    for size in range(65_000, 66_000):
        blob = pickle.dumps(["x" * size, collections.OrderedDict], protocol=5)
        ops = [op.name for op, _, _ in pickletools.genops(blob)]
        at = ops.index("STACK_GLOBAL")
        if "FRAME" in ops[at - 4:at]:
            break
    else:
        pytest.fail("no payload size put a FRAME between the two names")
    assert trace_modules(blob) == {"collections"}
    check_trace(blob)


# ---------------------------------------------------------------- NDIF failures decided here (no network)

def _ndif_config(tmp_path, **model):
    import yaml

    path = tmp_path / "ndif.yaml"
    path.write_text(yaml.safe_dump({"model": {"spec": "meta-llama/Llama-3.3-70B-Instruct", "remote": "ndif",
                                              "dtype": "bfloat16", **model}, "queries": {"limit": 4}}))
    return path


def test_ndif_without_api_key_is_exit_2(tmp_path, monkeypatch, capsys):
    from nnsight import CONFIG

    from afprobe.cli import main

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    code = main(["run", str(_ndif_config(tmp_path)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs an NDIF API key" in err[0]
    assert not (tmp_path / "run" / "activations").exists()


def test_ndif_unreachable_and_bad_specs_are_bad_input(tmp_path, monkeypatch):
    from nnsight import CONFIG

    from afprobe.activations.remote import check_deployed, load_remote
    from afprobe.config import load_config

    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")  # loopback, nothing listens
    with pytest.raises(BadInput, match="cannot reach NDIF at http://127.0.0.1:9"):
        check_deployed("meta-llama/Llama-3.3-70B-Instruct")
    folder = load_config(str(_ndif_config(tmp_path, spec=str(tmp_path)))).model
    with pytest.raises(BadInput, match="hub id NDIF serves"):
        load_remote(folder)
    lora = load_config(str(_ndif_config(tmp_path, adapter=str(tmp_path / "lora")))).model
    with pytest.raises(BadInput, match="local adapter folder"):
        load_remote(lora)
