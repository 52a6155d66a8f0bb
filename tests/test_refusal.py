"""The refusal direction: cosine math and its random baseline (synthetic arrays), the steering.direction
values (config), and steering along the refusal direction through the steer stage (tiny random Llama)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from afprobe.cli import main
from afprobe.config import Config
from afprobe.probes import refusal as pr

DEFAULT = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def test_cosine_of_itself_opposite_and_a_planted_orthogonal_pair():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(256)
    assert pr.cosine(a, 3 * a) == pytest.approx(1.0)
    assert pr.cosine(a, -a) == pytest.approx(-1.0)
    b = rng.standard_normal(256)
    b_orth = pr.project_out(b, a)  # b with a removed: orthogonal to a, unit norm
    assert pr.cosine(a, b_orth) == pytest.approx(0.0, abs=1e-12)
    assert np.linalg.norm(b_orth) == pytest.approx(1.0)
    assert pr.cosine(b, b_orth) > 0.9  # most of a random b is already orthogonal to a in 256 dimensions


def test_refusal_vector_is_the_difference_of_means_and_recovers_a_planted_direction():
    rng = np.random.default_rng(1)
    d = 64
    planted = np.zeros(d)
    planted[3] = 1.0
    benign = rng.standard_normal((200, d))
    harmful = rng.standard_normal((200, d)) + 2.0 * planted
    diff = pr.mean_difference(harmful, benign)
    assert np.allclose(diff, harmful.mean(0) - benign.mean(0))
    assert pr.cosine(diff, planted) > 0.9
    groups = np.repeat(np.arange(100), 2)
    cell = pr.alignment(planted, harmful, benign, groups, groups, n_random=500, n_boot=200, ci=0.95, seed=0)
    assert cell["cosine"] > 0.9 and 0.9 < cell["cosine_ci"][0] < cell["cosine_ci"][1] <= 1.0
    assert cell["p_random"] == pytest.approx(1 / 501)  # no random direction comes close
    orth = np.zeros(d)
    orth[7] = 1.0  # orthogonal to the planted refusal direction
    cell = pr.alignment(orth, harmful, benign, groups, groups, n_random=500, n_boot=200, ci=0.95, seed=0)
    assert abs(cell["cosine"]) < cell["random_abs_q95"] * 2  # chance-level overlap
    assert cell["cosine_ci"][0] < 0.05 and cell["cosine_ci"][1] > -0.05


def test_random_baseline_is_the_abs_cosine_of_random_unit_vectors():
    d = 400
    direction = np.random.default_rng(2).standard_normal(d)
    absc = pr.random_abs_cosines(direction, 20000, seed=3)
    # |cos| of random unit vectors in d dims: about |N(0, 1/d)|, 95th percentile near 1.96 / sqrt(d)
    assert np.quantile(absc, 0.95) == pytest.approx(1.96 / np.sqrt(d), rel=0.05)
    assert np.median(absc) == pytest.approx(0.6745 / np.sqrt(d), rel=0.05)
    # rotation symmetry: the baseline does not depend on which direction it is computed for
    other = pr.random_abs_cosines(np.eye(d)[0], 20000, seed=4)
    assert np.quantile(other, 0.95) == pytest.approx(np.quantile(absc, 0.95), rel=0.05)


@pytest.mark.parametrize("value", ["refusal-minus-probe", "../x", "refusal_plus_probe"])
def test_bad_steering_direction_is_exit_2_with_the_dotted_path(capsys, tmp_path, value):
    code = main(["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", f"steering.direction={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "steering.direction" in err and "probe_minus_refusal" in err, err


def test_steering_direction_values_accepted():
    for value in ("best", "refusal", "probe_minus_refusal", "refusal_minus_probe", "layer3"):
        assert Config.model_validate({"steering": {"direction": value}}).steering.direction == value


CONFIG = {
    "name": "refusal", "seed": 1,
    "scenario": {"cue_families": ["tier_tag"]},
    "queries": {"limit": 6},
    "cache": {"layers": [1, 2, 3], "positions": ["last"], "batch_tokens": 4000},
    "probes": {"folds": 2, "bootstrap": 20, "methods": ["diff_means"], "permutations": 10,
               "random_directions": 5, "selection_folds": 2, "min_best_layer": 1},
    "steering": {"alphas": [-1.0, 0.0, 1.0], "layers": [2], "max_new_tokens": 2, "controls": ["random"],
                 "n_random": 1, "known_answer": True, "batch_size": 4, "selection": "in_sample",
                 "direction": "refusal", "refusal_queries": 6, "scorer": "logodds"},
}


def test_refusal_steering_through_the_steer_stage(tmp_path, smol_tokenizer):
    from afprobe.activations.backends import make_backend
    from afprobe.activations.loading import model_fingerprint, tiny_llama
    from afprobe.pipeline import run_cache, run_probe, run_report, run_steer
    from afprobe.probes.directions import load_direction

    cfg = Config.model_validate(CONFIG)
    model = tiny_llama(seed=0)
    loaded = (model, smol_tokenizer, make_backend("nnsight", model, smol_tokenizer), model_fingerprint(model))
    out = tmp_path / "run"
    run_cache(cfg, out, quiet=True, loaded=loaded)
    run_probe(out, quiet=True)
    run_steer(out, quiet=True, loaded=loaded)
    summary = json.loads((out / "summary.json").read_text())
    direction = summary["steering"]["directions"][0]
    assert direction["kind"] == "refusal" and direction["layer"] == 2
    saved, meta = load_direction(out / "steering" / "refusal" / "layer2.safetensors")
    assert direction["separation_used"] == pytest.approx(meta["separation"], rel=1e-5)  # alpha's unit: |harmful - benign|
    rows = list(csv.DictReader((out / "steering" / "results.csv").open()))
    steered = [r for r in rows if r["direction"] == "probe" and r["alpha"] not in ("", "0.0")]
    assert {float(r["alpha"]) for r in steered} == {-1.0, 1.0}
    for r in steered:  # both cues measured, each with its paired test against alpha 0 (Holm-adjusted)
        assert int(r["n"]) == 6 and r["rate_training"] != "" and r["rate_deployment"] != ""
        for p in ("p_training_vs0", "p_deployment_vs0", "p_training_holm", "p_deployment_holm"):
            assert 0.0 <= float(r[p]) <= 1.0
    assert any(r["direction"] == "random" for r in rows)  # the random control runs along
    refusal = summary["refusal"]
    assert [c["layer"] for c in refusal["layers"]] == [1, 2, 3]
    for c in refusal["layers"]:
        assert -1.0 <= c["cosine"] <= 1.0 and 0.0 < c["p_random"] <= 1.0 and c["verdict"] in ("overlaps", "chance_level")
    awareness = load_direction(out / "probes" / "directions" / "layer2.safetensors")[0]
    assert refusal["layers"][1]["cosine"] == pytest.approx(pr.cosine(awareness, saved), abs=1e-5)
    assert summary["known_answer"]["layer"] == 2
    run_report(out, quiet=True)
    report = (out / "report" / "report.md").read_text()
    assert "Refusal direction" in report and "random 95th pct" in report
