"""The notebook API: afprobe.load_direction / afprobe.steer / afprobe.open_store (tiny model; the docs
example on the embedded model)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import afprobe
from afprobe.activations.backends import ModelInputs, ResidualEdit, make_backend
from afprobe.errors import BadInput
from afprobe.probes.directions import save_direction

ROOT = Path(__file__).resolve().parents[1]
LAYER = 2


def _inputs(tokenizer, texts=("Say hello to the sea.", "What is two plus two, please?")) -> ModelInputs:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as the pipeline does
        ids[i, t - len(r):], mask[i, t - len(r):] = torch.tensor(r), 1
    return ModelInputs(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), full_ids=ids)


def _direction(model, site: str, seed: int = 0) -> "afprobe.Direction":
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.config.hidden_size, generator=g)
    return afprobe.Direction(unit=v / v.norm(), separation=2.5, layer=LAYER, site=site, method="diff_means")


def _forward(model, inputs: ModelInputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs.forward_kwargs()).logits


def _no_hooks(module: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def _hook_counts(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in module.named_modules()}


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
def test_steer_equals_the_residual_edit_path(tiny_model, smol_tokenizer, site):
    """Plain HF model inside `steer` == the nnsight backend's ResidualEdit at the same site, within 1e-5."""
    direction, alpha = _direction(tiny_model, site), 3.0
    inputs = _inputs(smol_tokenizer)
    edit = ResidualEdit(layers=(LAYER,), add=(alpha * direction.separation * direction.unit)[None].expand(2, -1),
                        site=site)
    reference, _ = make_backend("nnsight", tiny_model, smol_tokenizer).logits(inputs, edit)
    plain = _forward(tiny_model, inputs)
    with afprobe.steer(tiny_model, direction, alpha):
        steered = _forward(tiny_model, inputs)
    assert (reference - plain).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(steered, reference, atol=1e-5, rtol=0)
    assert _no_hooks(tiny_model)
    torch.testing.assert_close(_forward(tiny_model, inputs), plain, atol=0, rtol=0)


def test_generate_inside_the_block_is_steered(tiny_model, smol_tokenizer):
    """model.generate inside `steer` equals the backend's steered generation (every step steered)."""
    direction, alpha = _direction(tiny_model, "resid_post", seed=1), 40.0
    inputs = _inputs(smol_tokenizer)
    edit = ResidualEdit(layers=(LAYER,), add=(alpha * direction.separation * direction.unit)[None].expand(2, -1))
    backend = make_backend("nnsight", tiny_model, smol_tokenizer)
    reference = backend.generate(inputs, edit, max_new_tokens=6, do_sample=False)
    unsteered = backend.generate(inputs, None, max_new_tokens=6, do_sample=False)
    with afprobe.steer(tiny_model, direction, alpha), torch.inference_mode():
        out = tiny_model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=6,
                                  do_sample=False, eos_token_id=None, pad_token_id=smol_tokenizer.pad_token_id)
    assert not torch.equal(reference, unsteered)
    assert torch.equal(out[:, inputs.input_ids.shape[1]:], reference)


@pytest.mark.parametrize("wrapper", ["nnsight", "transformer_lens"])
def test_steer_on_wrappers_matches_plain_hf(smol_tokenizer, wrapper):
    """The nnsight TransformersModel and the TransformerLens bridge are steered like the plain model."""
    from afprobe.activations.loading import tiny_llama

    direction, alpha = _direction(tiny_llama(seed=0), "resid_mid"), 3.0
    inputs = _inputs(smol_tokenizer)
    hf = tiny_llama(seed=0)
    with afprobe.steer(hf, direction, alpha):
        reference = _forward(hf, inputs)
    backend = make_backend(wrapper, tiny_llama(seed=0), smol_tokenizer)
    wrapped = backend.lm if wrapper == "nnsight" else backend.bridge
    _forward(backend.model, inputs)  # the bridge adds hooks of its own on a first forward
    before = _hook_counts(backend.model)
    with afprobe.steer(wrapped, direction, alpha) as m:
        assert m is wrapped
        if wrapper == "nnsight":
            with torch.inference_mode(), wrapped.trace(**inputs.forward_kwargs()):
                got = wrapped.output.save()
            got = got.logits
        else:
            got = _forward(backend.model, inputs)
    real = inputs.attention_mask.bool()  # the bridge runs eager attention: padding positions differ from sdpa
    torch.testing.assert_close(got[real], reference[real], atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="inside"):
        with afprobe.steer(wrapped, direction, alpha):
            raise RuntimeError("inside")
    assert _hook_counts(backend.model) == before


def test_exception_inside_the_block_leaves_no_hook(tiny_model, smol_tokenizer):
    inputs = _inputs(smol_tokenizer)
    plain = _forward(tiny_model, inputs)
    for site in ("resid_pre", "resid_mid", "resid_post"):
        with pytest.raises(KeyError):
            with afprobe.steer(tiny_model, _direction(tiny_model, site), 5.0, layers=[0, 1, 3]):
                assert not _no_hooks(tiny_model)
                _forward(tiny_model, inputs)
                raise KeyError("boom")
        assert _no_hooks(tiny_model)
    torch.testing.assert_close(_forward(tiny_model, inputs), plain, atol=0, rtol=0)


def test_raw_vector_alpha_is_in_norm_units(tiny_model, smol_tokenizer):
    inputs = _inputs(smol_tokenizer)
    v = torch.randn(tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 7.0
    unit = afprobe.Direction(unit=v / v.norm(), separation=1.0, layer=1)
    with afprobe.steer(tiny_model, v, 2.0, layers=[1]):
        raw = _forward(tiny_model, inputs)
    with afprobe.steer(tiny_model, unit, 2.0):
        ref = _forward(tiny_model, inputs)
    torch.testing.assert_close(raw, ref, atol=1e-6, rtol=0)
    with pytest.raises(BadInput, match="layers"):
        with afprobe.steer(tiny_model, v, 2.0):
            pass
    with pytest.raises(BadInput, match="dimensions"):
        with afprobe.steer(tiny_model, torch.ones(7), 1.0, layers=[0]):
            pass
    with pytest.raises(BadInput, match="outside"):
        with afprobe.steer(tiny_model, v, 1.0, layers=[9]):
            pass
    assert _no_hooks(tiny_model)


def test_positions_mask_steers_only_masked_prompt_tokens(tiny_model, smol_tokenizer):
    inputs = _inputs(smol_tokenizer)
    direction = _direction(tiny_model, "resid_pre")
    mask = torch.zeros(inputs.input_ids.shape)
    mask[:, -2:] = 1.0
    edit = ResidualEdit(layers=(LAYER,), add=(4.0 * direction.separation * direction.unit)[None].expand(2, -1),
                        add_mask=mask, site="resid_pre")
    reference, _ = make_backend("nnsight", tiny_model, smol_tokenizer).logits(inputs, edit)
    with afprobe.steer(tiny_model, direction, 4.0, positions=mask):
        got = _forward(tiny_model, inputs)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_load_direction_round_trip(tmp_path):
    v = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    v /= np.linalg.norm(v)
    path = save_direction(tmp_path / "best.safetensors", v, {"layer": 3, "site": "resid_mid", "position": "last",
                                                             "method": "logreg", "separation": 1.75,
                                                             "model_fingerprint": "abc"})
    d = afprobe.load_direction(path)
    assert (d.layer, d.site, d.method, d.separation) == (3, "resid_mid", "logreg", 1.75)
    assert d.metadata == {"position": "last", "model_fingerprint": "abc"}
    np.testing.assert_allclose(d.unit.numpy(), v, atol=1e-7)
    with pytest.raises(BadInput):
        afprobe.load_direction(tmp_path / "missing.safetensors")


def test_import_afprobe_is_cheap():
    code = "import sys, afprobe; assert callable(afprobe.steer) is not None; " \
           "import afprobe as a; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    cheap = "import sys, afprobe; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", cheap], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"
    assert "steer" in dir(afprobe) and "open_store" in afprobe.__all__
    del code


@pytest.mark.slow
def test_docs_notebook_example_runs(tmp_path, monkeypatch, capsys):
    """Executes the first python block of docs/notebook.md on the embedded model, with a direction file where
    it looks for one."""
    text = (ROOT / "docs" / "notebook.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    v = np.random.default_rng(1).standard_normal(576).astype(np.float32)
    save_direction(_mkdirs(tmp_path / "runs/demo/base/probes/directions") / "best.safetensors", v / np.linalg.norm(v),
                   {"layer": 10, "site": "resid_post", "position": "last", "method": "diff_means", "separation": 6.0})
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/notebook.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "layer 10 resid_post, diff_means, separation 6.00" in out
    assert not torch.equal(namespace["plain"], namespace["steered"])
    assert _no_hooks(namespace["model"])


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
