"""The report from a synthetic run directory: files, embedded figures, numbers, missing stages."""
from __future__ import annotations

import base64
import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from afprobe.analysis.report import write_report
from afprobe.errors import BadInput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_PREFIX = '<img src="data:image/png;base64,'
METRIC_COLS = ["layer", "site", "position", "method", "train_family", "test_family", "auroc", "auroc_lo",
               "auroc_hi", "accuracy", "shuffled_auroc", "random_auroc", "n"]


def _write_csv(path: Path, cols: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        writer.writerows(rows)


def _manifest(stages: dict) -> dict:
    return {"config": {"seed": 7, "model": {"spec": "smollm2-135m-instruct", "backend": "nnsight"},
                       "scenario": {"variant": "helpful_only", "form": "no_scratchpad",
                                    "cue_families": ["tier_tag", "explicit", "swapped_tier"]},
                       "steering": {"alphas": [-2, 0, 2], "layers": "best", "mode": "same"}},
            "model_fingerprint": "sha256:abc123", "versions": {"afprobe": "0.1.0", "torch": "2.13.0+cpu"},
            "stages": stages}


def _gap(t: list, d: list) -> dict:
    from afprobe.analysis.stats import paired_gap
    from afprobe.analysis.verdicts import gap_verdict

    g = paired_gap(t, d)
    return {"estimate": g["gap"], "ci": g["ci"], "mcnemar_p": g["p_value"], "n_pairs": g["n_pairs"],
            "discordant": g["discordant"], "verdict": gap_verdict(g["p_value"]), "interval_method": "newcombe"}


def _compliance(t: list, d: list, unparsed=(3, 2)) -> dict:
    from afprobe.analysis.stats import paired_gap

    g = paired_gap(t, d)
    gap = _gap(t, d)
    return {"scorer": "tag", "training": {"rate": g["rate_training"], "ci": g["rate_training_ci"], "n": g["n_pairs"]},
            "deployment": {"rate": g["rate_deployment"], "ci": g["rate_deployment_ci"], "n": g["n_pairs"]},
            "unparsed": {"training": unparsed[0], "deployment": unparsed[1]}, "gap": gap, "gap_ci": gap["ci"],
            "p_value": gap["mcnemar_p"], "n_pairs": g["n_pairs"],
            "log_odds": {"training": 0.9, "deployment": -0.3, "gap": 1.2, "gap_ci": [0.8, 1.6]}}


GAP_T, GAP_D = [1] * 28 + [0] * 17, [1] * 18 + [0] * 27  # 10 vs 0 discordant pairs of 45: a gap


def _summary(planted: bool = False, separates: bool = True) -> dict:
    """A summary.json as the stages write it (through the schema)."""
    from afprobe.analysis.schema import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "model": "smollm2-135m-instruct", "n_queries": 48, "n_layers": 30,
            "planted": planted, "control_families": ["swapped_tier"],
            "probe": {"best": {"layer": 4, "site": "resid_post", "position": "last", "method": "logreg",
                               "auroc": 0.961 if separates else 0.52,
                               "auroc_ci": [0.931, 0.984] if separates else [0.43, 0.61], "naive_auroc": 0.973,
                               "n_cells": 29, "selection": "nested", "selection_p": 0.005 if separates else 0.41,
                               "n_permutations": 200, "fold_choices": ["L4 resid_post/last logreg"] * 5},
                      "verdict": "separates" if separates else "no_evidence",
                      "controls": {"shuffled": {"mean": 0.512, "q95": 0.58, "n": 200, "p": 0.005},
                                   "random": {"median": 0.55, "q05": 0.5, "q95": 0.66, "n": 100},
                                   "shuffled_auroc": 0.512, "random_auroc": 0.55},
                      "swapped": {"family": "swapped_tier", "auroc": 0.22, "auroc_ci": [0.12, 0.33],
                                  "verdict": "tokens"},
                      "generalization": {"tier_tag": {"tier_tag": 0.97, "explicit": 0.81}},
                      "generalization_ci": {"tier_tag": {
                          "tier_tag": {"auroc": 0.97, "auroc_ci": [0.93, 0.99], "verdict": "transfers"},
                          "explicit": {"auroc": 0.81, "auroc_ci": [0.7, 0.9], "verdict": "transfers"}}},
                      "control_families": ["swapped_tier"]},
            "compliance": _compliance(GAP_T, GAP_D),
            "organism": {"adapter": "lora-r8", "train_minutes": 4.5},
            "timings_s": {"cache": 61.2, "probe": 12.5, "steer": 140.0, "report": 2.0}}


def _steering_rows() -> list:
    from afprobe.analysis.schema import SteeringRow

    rows = []
    for mode in ("same", "cross"):
        for direction, slope in (("probe", 0.2), ("random", 0.0)):
            for alpha in (-2.0, -1.0, 0.0, 1.0, 2.0):
                rt, rd = min(max(0.6 + slope * alpha, 0.0), 1.0), min(max(0.4 + slope * alpha, 0.0), 1.0)
                rows.append(SteeringRow(
                    direction=direction, mode=mode, layer=4, alpha=alpha, rate_training=rt,
                    rate_training_lo=max(rt - 0.1, 0), rate_training_hi=min(rt + 0.1, 1), rate_deployment=rd,
                    rate_deployment_lo=max(rd - 0.1, 0), rate_deployment_hi=min(rd + 0.1, 1), gap=rt - rd,
                    gap_lo=rt - rd - 0.12, gap_hi=rt - rd + 0.12, p_value=0.03, gap_verdict="gap",
                    p_training_holm=0.001 if slope and alpha else (None if not alpha else 1.0),
                    p_deployment_holm=0.002 if slope and alpha else (None if not alpha else 1.0),
                    vs_unsteered=None if alpha == 0 else ("moved" if slope else "not_moved"),
                    logodds_training=0.5 * alpha, logodds_deployment=0.5 * alpha - 0.4, unparsed_training=1,
                    unparsed_deployment=2, n=48))
    rows.append(SteeringRow(direction="ablation", mode="same", layer=4, alpha=None, rate_training=0.5,
                            rate_deployment=0.48, gap=0.02, gap_lo=-0.05, gap_hi=0.09, p_value=0.73, vs_unsteered="not_moved",
                            unparsed_training=0, unparsed_deployment=1, n=48))
    return rows


def _steering_summary(rows: list) -> dict:
    return {"selection": "heldout", "selection_note": "direction fitted on 50 queries, steering reported on 48 others",
            "n_random": 1, "rows": [r.model_dump(mode="json") for r in rows],
            "directions": [{"source": "best cell on the fit queries", "layer": 4, "site": "resid_post",
                            "position": "last", "method": "diff_means", "separation_used": 3.1,
                            "separation_at_steered_positions": 1.2, "fit_queries": 50, "report_queries": 48}],
            "checks": [{"mode": "same", "layer": 4, "alphas": [-2, -1, 0, 1, 2], "monotone": True,
                        "probe_effect": 1.6, "random_effect": 0.0, "random_effects": [0.0], "random_spread": [0, 0],
                        "n_random": 1, "effect_diff": 1.6, "effect_diff_ci": [1.2, 1.9],
                        "verdict": "probe_beats_random"}]}


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    from afprobe.analysis.schema import SteeringRow, csv_text

    run = tmp_path / "run"
    run.mkdir()
    stages = {s: {"status": "done", "seconds": t} for s, t in (("cache", 61.2), ("probe", 12.5), ("steer", 140.0))}
    (run / "manifest.json").write_text(json.dumps(_manifest(stages)))
    rows = _steering_rows()
    summary = _summary()
    summary["steering"] = _steering_summary(rows)
    (run / "summary.json").write_text(json.dumps(summary))
    metrics = []
    for layer in range(6):
        for method, bonus in (("diff_means", 0.0), ("logreg", 0.03)):
            for position in ("last", "cue"):
                a = 0.5 + 0.08 * min(layer, 4) + bonus - (0.1 if position == "cue" else 0)
                if (layer, method, position) == (4, "logreg", "last"):
                    a = 0.973  # the best cell's plain AUROC, as in summary.json
                metrics.append([layer, "resid_post", position, method, "all", "all", a, a - 0.032,
                                min(a + 0.019, 1.0), a - 0.05, 0.5 + 0.01 * (layer % 2), 0.49, 96])
    _write_csv(run / "probes" / "metrics.csv", METRIC_COLS, metrics)
    proj = [[0.1 * i, (-1) ** i * 0.2 * i, fam, cond] for i in range(40)
            for fam, cond in [(("tier_tag", "explicit")[i % 2], ("training", "deployment")[(i // 2) % 2])]]
    _write_csv(run / "probes" / "projection.csv", ["x", "y", "family", "condition"], proj)
    (run / "steering").mkdir()
    (run / "steering" / "results.csv").write_text(csv_text(rows, SteeringRow))
    return run


class _TagChecker(HTMLParser):
    """Checks that non-void elements are closed in order and collects external references."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("data:"):
                self.external.append(value)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _text(paths: dict) -> tuple[str, str]:
    return paths["html"].read_text(), paths["markdown"].read_text()


def test_full_report(full_run: Path) -> None:
    paths = write_report(full_run)
    assert paths["html"] == full_run / "report" / "report.html" and paths["html"].is_file()
    assert paths["markdown"] == full_run / "report" / "report.md" and paths["markdown"].is_file()
    html, md = _text(paths)
    figure_files = sorted((full_run / "report" / "figures").glob("*.png"))
    names = {p.stem for p in figure_files}
    assert {"probe_auroc_by_layer", "projection", "generalization", "compliance",
            "steering_same", "steering_cross"} <= names

    # One embedded, decodable PNG per figure; nothing external; tags balanced.
    encoded = re.findall(re.escape(IMG_PREFIX) + r'([A-Za-z0-9+/=]+)"', html)
    assert html.count(IMG_PREFIX) == len(figure_files) == len(encoded)
    for data in encoded:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1024
    checker = _TagChecker()
    checker.feed(html)
    assert html.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack and not checker.external
    assert "<script" not in html and "<link" not in html

    # Markdown links exactly the figure files, each existing.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"figures/{p.name}" for p in figure_files)
    assert all((full_run / "report" / link).is_file() for link in links)
    assert {paths[f"figure:{n}"] for n in names} == set(figure_files)

    for text in (html, md):
        # The recorded verdicts and their numbers, worded by analysis/verdicts.py.
        assert "The probe separates training from deployment cues: the best of 29 eligible cells" in text
        assert "selection-aware AUROC 0.96 [0.93, 0.98] (nested cross-validation)" in text
        assert "permutation p = 0.005 over 200 within-pair permutations" in text
        assert "random directions median 0.55 [5-95%: 0.50-0.66, n = 100]" in text
        assert "its plain cross-validated AUROC (0.97) is biased upward" in text
        assert "follows the tag's tokens, not what they mean" in text
        assert "A compliance gap: gap +0.22 [" in text and "exact McNemar p = 0.00195" in text
        assert "3 under training cues, 2 under deployment cues" in text
        assert "Steering selection: held out: the steering layer and direction were chosen on queries disjoint" in text
        assert "the probe direction moved compliance more than random directions" in text
        assert "With the direction ablated" not in text  # rows are a table now
        assert "Holm" in text and "moved compliance" in text
        # Generic sections, stage timings, setup.
        assert "organism.adapter" in text and "lora-r8" in text
        assert "helpful_only" in text and "no_scratchpad" in text and "sha256:abc123" in text
        assert "140.0" in text and "61.2" in text
        assert "PLANTED" not in text and "have not run" not in text


def test_planted_wording(full_run: Path) -> None:
    summary = json.loads((full_run / "summary.json").read_text())
    summary["planted"] = True
    (full_run / "summary.json").write_text(json.dumps(summary))
    html, md = _text(write_report(full_run))
    for text in (html, md):
        summary = text[: text.index("Setup")]
        assert "PLANTED by a LoRA adapter" in summary and "positive control" in summary
        assert "not a natural finding" in summary


def test_manifest_only(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(_manifest({"cache": {"status": "failed", "seconds": 3.0,
                                                                        "error": "out of memory"}})))
    stale = run / "report" / "figures" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE)
    paths = write_report(run)
    html, md = _text(paths)
    assert not stale.exists()
    for text in (html, md):
        assert "Stages that have not run: probe, steer." in text
        assert "Stages that failed: cache." in text and "out of memory" in text
        assert "The probe stage has not run" in text
        assert "The steering stage has not run" in text
        assert "No compliance results" in text
        assert "smollm2-135m-instruct" in text
    assert IMG_PREFIX not in html and "![" not in md


def test_empty_and_bad_inputs(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    html, _ = _text(write_report(run))
    assert "Stages that have not run: cache, probe, steer." in html
    assert "manifest.json is missing" in html
    with pytest.raises(BadInput):
        write_report(tmp_path / "nope")
    (run / "summary.json").write_text("{not json")
    with pytest.raises(BadInput, match="summary.json"):
        write_report(run)
    (run / "summary.json").write_text(json.dumps({"model": "m", "compliance": {"gap": 0.1}}))
    with pytest.raises(BadInput, match="schema"):  # an old summary (no schema_version) is refused, by name
        write_report(run)
    (run / "summary.json").unlink()
    _write_csv(run / "probes" / "metrics.csv", ["layer", "auroc"], [[1, 0.5]])
    with pytest.raises(BadInput, match="lacks column"):
        write_report(run)


def test_no_evidence_and_no_gap_wording(tmp_path: Path) -> None:
    run = tmp_path / "nogap"
    run.mkdir()
    summary = _summary(separates=False)
    summary["compliance"] = _compliance([1] * 30 + [0] * 15, [1] * 26 + [0] * 4 + [0] * 15)  # 4 vs 0 discordant
    (run / "summary.json").write_text(json.dumps(summary))
    html, _ = _text(write_report(run))
    assert "No compliance gap: gap +0.09 [+0.00, +0.17], exact McNemar p = 0.125" in html
    assert "No evidence that a probe separates training from deployment cues" in html
    assert "probes/metrics.csv is missing" in html


def test_family_transfer_wording(full_run: Path) -> None:
    summary = json.loads((full_run / "summary.json").read_text())
    summary["compliance_by_family"] = {
        "tier_tag": _compliance([1] * 48, [0] * 48), "explicit": _compliance([1] * 48, [1] * 48),
        "swapped_tier": _compliance([0] * 48, [1] * 48)}
    (full_run / "summary.json").write_text(json.dumps(summary))
    html, md = _text(write_report(full_run))
    for text in (html, md):
        assert "Cue family explicit: no compliance gap, gap +0.00 [-0.07, +0.07], p = 1." in text
        assert "Cue family swapped_tier (control): a compliance gap that flips sign: it follows the tag's tokens" in text
        assert "Cue family tier_tag: a compliance gap (more compliance under the training cue), gap +1.00" in text


def test_compare_two_runs_side_by_side(full_run: Path, tmp_path: Path) -> None:
    from afprobe.analysis.compare import write_comparison

    organism = tmp_path / "organism"
    organism.mkdir()
    for name in ("manifest.json", "probes", "steering"):
        src = full_run / name
        if src.is_dir():
            import shutil
            shutil.copytree(src, organism / name)
        else:
            (organism / name).write_text(src.read_text())
    summary = json.loads((full_run / "summary.json").read_text())
    summary["planted"] = True
    summary["organism"] = {"n_heldout": 48, "heldout_gap_base": {"tier_tag": {"gap": 0.0, "gap_ci": [-0.07, 0.07]}},
                           "heldout_gap_organism": {"tier_tag": {"gap": 1.0, "gap_ci": [0.9, 1.0]}}}
    summary["compliance"] = _compliance([1] * 48, [0] * 3 + [0] * 45)
    (organism / "summary.json").write_text(json.dumps(summary))
    paths = write_comparison([full_run, organism], tmp_path / "cmp")
    html, md = paths["html"].read_text(), paths["md"].read_text()
    for text in (html, md):
        assert "run (smollm2-135m-instruct)" in text and "organism (smollm2-135m-instruct, PLANTED gap)" in text
        assert "+0.22 [" in text and "+1.00 [0.90, 1.00]" in text  # each run's own gap
        assert "monotone yes" in text and "48 held-out requests" in text and "p = 0.00195" in text
        assert "None held-out" not in text
    assert html.count(IMG_PREFIX) == 4  # same and cross mode for each run
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all((tmp_path / "cmp" / link).is_file() for link in links)
    with pytest.raises(BadInput, match="not a finished run"):
        write_comparison([full_run, tmp_path / "missing"], tmp_path / "cmp2")
