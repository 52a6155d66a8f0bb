"""`model.adapter`: a PEFT LoRA merged at load. The bundled organism is one case of it: `spec: X+planted-gap`
means `spec: X` + `adapter: <bundled planted-gap folder>` (same logits, same fingerprint, unlike the base)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from afprobe.activations.loading import ADAPTERS_DIR, load_model, model_fingerprint, resolve_spec
from afprobe.cli import main
from afprobe.errors import BadInput
from tests.test_backends import _prompts

PLANTED = str(ADAPTERS_DIR / "planted-gap")
DEFAULT = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def test_adapter_key_equals_the_planted_spec(smol, smol_tokenizer):
    by_spec, _ = load_model("smollm2-135m-instruct+planted-gap", device="cpu")
    by_key, _ = load_model("smollm2-135m-instruct", device="cpu", adapter=PLANTED)
    ids = torch.tensor([_prompts(smol_tokenizer, 1)[0]])
    with torch.inference_mode():
        a, b, base = by_spec(ids).logits, by_key(ids).logits, smol[0](ids).logits
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-2
    assert model_fingerprint(by_spec) == model_fingerprint(by_key) != model_fingerprint(smol[0])


def test_adapter_errors(tmp_path, capsys):
    with pytest.raises(BadInput, match="folder not found"):
        resolve_spec("smollm2-135m-instruct", str(tmp_path / "missing"))
    with pytest.raises(BadInput, match="already names an adapter"):
        resolve_spec("smollm2-135m-instruct+planted-gap", PLANTED)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text("{}")
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(BadInput, match="safetensors only"):
        resolve_spec("smollm2-135m-instruct", str(tmp_path / "bin"))
    with pytest.raises(BadInput, match="local Hugging Face cache"):
        resolve_spec("smollm2-135m-instruct", "nobody/no-such-adapter")
    # through the CLI: exit 2, one line, before any weights load
    assert main(["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", f"model.adapter={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.adapter" in err and "Traceback" not in err
