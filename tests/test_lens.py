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


def test_run_report_lens_table_matches_lens(tiny_model, smol_tokenizer, tmp_path):
    """The steer stage's lens rows (pipeline._lens: the steering direction, then each per-layer probe file)
    reach summary.json and the report table with the scores activations/lens.py gives for the same direction."""
    import numpy as np

    from afprobe.analysis.report import write_report
    from afprobe.analysis.schema import read_summary
    from afprobe.config import Config
    from afprobe.pipeline import _lens
    from afprobe.probes.directions import save_direction
    from afprobe.rundir import RunDir
    from afprobe.steering_plan import PlannedDirection

    _plant_norm(tiny_model)
    run = RunDir(tmp_path / "run")
    run.claim(Config(), force=False)
    rng = np.random.default_rng(0)
    unit = rng.standard_normal(tiny_model.config.hidden_size).astype(np.float32)
    unit /= np.linalg.norm(unit)
    folder = run.path / "probes" / "directions"
    for layer in (3, 1):  # saved unnormalised: the lens reads the unit direction
        save_direction(folder / f"layer{layer}.safetensors", 5.0 * rng.standard_normal(unit.size),
                       {"layer": layer, "site": "resid_post"})
    steered = PlannedDirection(unit, 2, "resid_mid", "last", "diff_means", 1.0, None, "fit", 20)
    run.update_summary(lens=_lens(Config(), tiny_model, smol_tokenizer, [steered], run.path))
    rows = read_summary(run.path / "summary.json").lens
    assert [(r.source, r.layer, r.site) for r in rows] == [
        ("steering", 2, "resid_mid"), ("probes/directions/layer1.safetensors", 1, "resid_post"),
        ("probes/directions/layer3.safetensors", 3, "resid_post")]
    want = logit_lens(tiny_model, smol_tokenizer, torch.tensor(unit), k=10)
    assert [(t.token, t.score) for t in rows[0].promoted] == [(t, pytest.approx(s, abs=1e-6)) for t, s in want.promoted]
    assert [(t.token, t.score) for t in rows[0].suppressed] == [(t, pytest.approx(s, abs=1e-6))
                                                                for t, s in want.suppressed]
    from afprobe.notebook import load_direction

    d1 = load_direction(folder / "layer1.safetensors").unit
    assert rows[1].promoted[0].score == pytest.approx(float(lens_scores(tiny_model, d1).max()), abs=1e-6)
    md = write_report(run.path)["markdown"].read_text()
    assert "Logit lens of the directions" in md
    line = next(x for x in md.splitlines() if x.startswith("| steering | 2 | resid_mid |"))
    assert f"{want.promoted[0][0]!r} {want.promoted[0][1]:+.2f}" in line
    assert f"{want.suppressed[0][0]!r} {want.suppressed[0][1]:+.2f}" in line
