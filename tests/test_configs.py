"""Every shipped config validates; real-model configs resolve their spec without weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from afprobe.activations.loading import resolve_spec
from afprobe.activations.scenarios import check_scenario
from afprobe.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "llama-3.1-8b.yaml", "llama-3.3-70b.yaml", "llama-3.3-70b-ndif.yaml", "llama-3.1-405b-base-ndif.yaml", "af-organism-70b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    check_scenario(cfg.scenario, cfg.cue_families)
    source = resolve_spec(cfg.model.spec)
    assert source.spec == cfg.model.spec
    assert cfg.model.trust_remote_code is False


def test_default_runs_on_the_embedded_model():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("default.yaml")])
    assert cfg.model.spec == "smollm2-135m-instruct"
    assert len(cfg.steering.alphas) >= 5 and 0 in cfg.steering.alphas


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_headline_and_steering_direction_never_come_from_cue_tokens_or_layer_0(path):
    """Cue-token positions separate the cues by token identity (AUROC 1 even at layer 0): no shipped config
    lets them, or layer 0, become the best cell that is reported and steered along."""
    cfg = load_config(path)
    assert cfg.probes.best_positions == ["last"] and cfg.probes.min_best_layer >= 1
    if cfg.scenario.form == "scratchpad":
        assert cfg.steering.scorer == "tag"  # log-odds at the answer start cannot score a reasoned answer
