"""README "Extending afprobe": its examples, run as an AFPROBE_PLUGINS file, register what they say, and the
command line then accepts a config naming them; the adapter example steers a tiny OLMo-2 model correctly."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import afprobe
from afprobe import cli
from afprobe.activations import adapters, scenario_text
from afprobe.analysis import compliance
from afprobe.probes import methods

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
scenario: {cue_families: [tier_tag, audit_log]}
probes: {methods: [diff_means, sign_diff]}
steering: {scorer: refusal_phrase}
"""


def _examples() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Extending afprobe"):text.index("\n## ", text.index("## Extending afprobe") + 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4
    return "\n\n".join(blocks)


@pytest.fixture
def clean_registries():
    saved = [(d, dict(d)) for d in (compliance.SCORERS, methods.METHODS, methods.REFERENCES, scenario_text.FAMILIES,
                                    adapters.ADAPTERS)]
    try:
        yield
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)


def test_readme_examples_as_a_plugin(tmp_path, monkeypatch, capsys, clean_registries):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    assert cli.main(["plan", str(cfg)]) == 2  # not registered yet
    assert "unknown probe methods" in capsys.readouterr().err
    plugin = tmp_path / "my_extensions.py"
    plugin.write_text(_examples())
    monkeypatch.setenv("AFPROBE_PLUGINS", str(plugin))
    assert cli.main(["plan", str(cfg), "--quiet"]) == 0, capsys.readouterr().err
    assert "refusal_phrase" in compliance.SCORERS and "sign_diff" in methods.REFERENCES
    family = scenario_text.FAMILIES["audit_log"]
    tiers = scenario_text.tiers_for("helpful_only", False)
    assert family.cues(tiers)[0] == "[audit: copied to the RLHF training log]"
    assert "paid-tier chats never are" in scenario_text.family_note("audit_log", tiers)
    monkeypatch.setenv("AFPROBE_PLUGINS", str(tmp_path / "missing.py"))
    assert cli.main(["plan", str(cfg)]) == 2


def test_readme_adapter_example_steers_olmo2_at_the_right_place(clean_registries):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    exec(compile(_examples(), "README.md", "exec"), {})
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 128, (2, 7))
    v = torch.randn(32)
    # reference: add v to what post_attention_layernorm hands the residual stream, i.e. after attention
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: out + v)
    with torch.no_grad():
        reference = model(ids).logits
    handle.remove()
    direction = afprobe.Direction(unit=v / v.norm(), separation=float(v.norm()), layer=1, site="resid_mid")
    with afprobe.steer(model, direction, 1.0), torch.no_grad():
        steered = model(ids).logits
    torch.testing.assert_close(steered, reference, atol=1e-5, rtol=0)
