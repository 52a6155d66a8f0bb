"""The fenced transformers internals: the version check, the switch, and the plain path giving the fast
path's results (tiny model)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afprobe.activations import hf_internals
from afprobe.activations.backends import make_backend
from afprobe.activations.batching import PrefixCache, run_batches
from afprobe.activations.steering import SteeringRunner, SteeringSpec
from tests.test_steering import _prompt

ROOT = Path(__file__).resolve().parents[1]
ACCEPT, REJECT = "<request_fully_accepted/>", "<rejected/>"


def test_decide_the_tested_range_and_the_switch():
    low, high = hf_internals.TESTED
    assert hf_internals.decide(low, None) == (True, None)
    assert hf_internals.decide("5.23.0", "1") == (True, None)
    assert hf_internals.decide("5.23.0.dev0", None)[0]
    for outside in (high, "5.24.1", "4.57.3", "6.0.0"):
        ok, why = hf_internals.decide(outside, None)
        assert not ok and "outside the tested range" in why
    assert hf_internals.decide("5.23.0", "0") == (False, f"{hf_internals.ENV}=0")
    assert not hf_internals.decide("not-a-version", None)[0]


def test_tested_range_matches_the_pin():
    text = (ROOT / "pyproject.toml").read_text()
    low, high = hf_internals.TESTED
    assert f'"transformers>={low},<{high}"' in text


def _run(model, tokenizer):
    """Steered and unsteered scores (texts, log-odds) and pooled activations, all with a reused prefix."""
    backend = make_backend("nnsight", model, tokenizer)
    prompts = [_prompt(tokenizer, u, label=i % 2) for i, u in enumerate(("Say hello.", "What is two plus two?",
                                                                       "Name a planet."))]
    runner = SteeringRunner(backend, prefix_reuse=True)
    unit = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)), dim=0)
    out = []
    for spec in (None, SteeringSpec("probe", unit, 4.0, (1,), alpha=2.0, mode="cross")):
        out.append(runner.score(prompts, spec, ACCEPT, REJECT, max_new_tokens=5))
    reads = {}
    seqs = [list(p.input_ids) for p in prompts]

    def fn(batch):
        w = torch.zeros(len(batch.rows), 1, batch.inputs.input_ids.shape[1])
        w[:, 0, -1] = 1.0
        for key, value in backend.read(batch.inputs, [(2, "resid_post"), (3, "resid_mid")], w).items():
            for r, row in enumerate(batch.rows):
                reads[(row, key)] = value[r, 0]

    run_batches(seqs, ["s"] * len(seqs), [p.user_span[0] for p in prompts], 4096, tokenizer.pad_token_id, model,
                PrefixCache(model, keep_new=False), fn)
    return out, reads


def test_plain_path_equals_the_fast_path(tiny_model, smol_tokenizer):
    assert hf_internals.internals_enabled()
    fast, fast_reads = _run(tiny_model, smol_tokenizer)
    with hf_internals.plain_path():
        assert not hf_internals.internals_enabled()
        with hf_internals.split_prefix(tiny_model) as active:
            assert not active and tiny_model.config._attn_implementation == "sdpa"
        plain, plain_reads = _run(tiny_model, smol_tokenizer)
    assert hf_internals.internals_enabled()
    for (texts_f, odds_f), (texts_p, odds_p) in zip(fast, plain):
        assert texts_f == texts_p
        assert max(abs(a - b) for a, b in zip(odds_f, odds_p)) < 1e-5
    assert fast_reads.keys() == plain_reads.keys()
    for key in fast_reads:
        torch.testing.assert_close(fast_reads[key], plain_reads[key], atol=1e-5, rtol=0)


def test_outside_the_range_one_warning_and_the_plain_path():
    """A transformers version outside the tested range (faked before import): one warning, plain caches."""
    code = """
import transformers
transformers.__version__ = "5.99.0"
import torch
from afprobe.activations import hf_internals as h
from afprobe.activations.kv import PrefixLayer, cache_from_layers
assert not h.internals_enabled() and not h.internals_enabled()
layer = PrefixLayer(None, (torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)), (torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4)))
cache = cache_from_layers([layer])
assert not isinstance(cache.layers[0], PrefixLayer) and cache.get_seq_length() == 4
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(hf_internals.ENV, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    warnings = [line for line in out.stderr.splitlines() if "not using transformers internals" in line]
    assert len(warnings) == 1 and "5.99.0 is outside the tested range" in warnings[0]


def test_one_module_owns_the_internals():
    """No module but hf_internals imports from transformers' private modules or uses the private aten op."""
    private = ("transformers.cache_utils", "transformers.integrations", "transformers.masking_utils",
               "transformers.modeling_gguf_pytorch_utils")
    offenders = []
    for folder in ("activations", "probes", "analysis", "afprobe"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "hf_internals.py":
                continue
            text = path.read_text()
            if "torch.ops.aten._" in text or "AttentionInterface" in text or "DynamicLayer" in text:
                offenders.append(str(path))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if node.module.startswith(private) or (node.module == "transformers" and
                                                           {a.name for a in node.names} & {"AttentionInterface"}):
                        offenders.append(f"{path}: from {node.module}")
    assert offenders == []
