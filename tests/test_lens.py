"""Logit lens of a direction (activations/lens.py) and the `afprobe lens` CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from afprobe.activations.lens import lens_scores, logit_lens


def _plant_norm(model) -> torch.Tensor:
    """A non-uniform final-norm weight, so a lens that ignored the norm would rank differently."""
    g = torch.exp(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)))
    model.model.norm.weight.data.copy_(g)
    return g


def _row_direction(model, g: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The largest-norm unembedding row t, as a direction d with g ⊙ d = W_U[t]."""
    w_u = model.get_output_embeddings().weight
    t = int(w_u.norm(dim=1).argmax())
    return t, w_u[t] / g


def test_lens_of_unembedding_row_ranks_that_token_first_tied(tiny_model, smol_tokenizer):
    g = _plant_norm(tiny_model)
    t, d = _row_direction(tiny_model, g)
    assert int(lens_scores(tiny_model, d).argmax()) == t
    lens = logit_lens(tiny_model, smol_tokenizer, d, k=3)
    assert lens.promoted[0][0] == smol_tokenizer.decode([t])
    assert lens.promoted[0][1] > lens.promoted[1][1] and lens.suppressed[0][1] < lens.promoted[-1][1]


def test_lens_untied_reads_lm_head_not_embedding(tiny_model):
    g = _plant_norm(tiny_model)
    emb = tiny_model.get_input_embeddings().weight
    tiny_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(emb), requires_grad=False)
    assert tiny_model.get_output_embeddings().weight is not emb
    t, d = _row_direction(tiny_model, g)
    assert int(lens_scores(tiny_model, d).argmax()) == t
    # the input embedding row of t through the lens is not what ranks t first
    assert int(lens_scores(tiny_model, emb[t] / g).argmax()) != t or t == int(emb.norm(dim=1).argmax())


AFPROBE = [sys.executable, "-m", "afprobe.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AFPROBE, "lens", *args], capture_output=True, text=True, timeout=300)


def test_lens_cli_bad_file_exits_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    for path in (bad, tmp_path / "missing.safetensors"):
        out = _run(str(path))
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_lens_cli_no_model_info_exits_2(tmp_path):
    from afprobe.probes.directions import save_direction

    path = save_direction(tmp_path / "d.safetensors", torch.ones(8).numpy(), {"layer": 3, "site": "resid_post"})
    out = _run(str(path))
    assert out.returncode == 2 and "--model" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_lens_cli_embedded_model_row_ranks_token_first(smol, tmp_path, capsys):
    """The largest-norm unembedding row (so ranking first is guaranteed by Cauchy-Schwarz once the norm
    weight is undone) through the CLI, in-process: `main` loads the model from the file's metadata."""
    from afprobe.activations.lens import final_norm_weight
    from afprobe.cli import main
    from afprobe.probes.directions import save_direction

    model, tokenizer = smol
    w_u = model.get_output_embeddings().weight
    t = int(w_u.norm(dim=1).argmax())
    d = w_u[t] / final_norm_weight(model)
    path = save_direction(tmp_path / "best.safetensors", d.detach().numpy(),
                          {"model": "smollm2-135m-instruct", "layer": 5, "site": "resid_post"})
    assert main(["lens", str(path), "--k", "3", "--json", str(tmp_path / "lens.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("layer | site | promoted | suppressed")
    assert lines[1].startswith(f"5 | resid_post | {tokenizer.decode([t])!r}"), lines[1]
    assert json.loads((tmp_path / "lens.json").read_text())["promoted"][0][0] == tokenizer.decode([t])
