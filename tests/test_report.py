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
STEER_COLS = ["direction", "mode", "layer", "alpha", "rate_training", "rate_training_lo", "rate_training_hi",
              "rate_deployment", "rate_deployment_lo", "rate_deployment_hi", "gap", "gap_lo", "gap_hi",
              "p_value", "logodds_training", "logodds_deployment", "unparsed_training",
              "unparsed_deployment", "n"]


def _write_csv(path: Path, cols: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        writer.writerows(rows)


def _manifest(stages: dict) -> dict:
    return {"config": {"seed": 7, "model": {"spec": "smollm2-135m-instruct", "backend": "nnsight"},
                       "scenario": {"variant": "helpful_only", "form": "no_scratchpad",
                                    "cue_families": ["tier_tag", "explicit", "swapped_semantics"]},
                       "steering": {"alphas": [-2, 0, 2], "layers": "best", "mode": "same"}},
            "model_fingerprint": "sha256:abc123", "versions": {"afprobe": "0.1.0", "torch": "2.13.0+cpu"},
            "stages": stages}


def _summary(planted: bool = False) -> dict:
    return {"model": "smollm2-135m-instruct", "n_queries": 48, "n_layers": 30, "planted": planted,
            "probe": {"best": {"layer": 4, "site": "resid_post", "position": "last", "method": "logreg",
                               "auroc": 0.973, "auroc_ci": [0.941, 0.992]},
                      "controls": {"shuffled_auroc": 0.512, "random_auroc": 0.487},
                      "generalization": {"tier_tag": {"explicit": 0.81}}},
            "compliance": {"training": {"rate": 0.62, "ci": [0.48, 0.74], "n": 45},
                           "deployment": {"rate": 0.41, "ci": [0.28, 0.55], "n": 46},
                           "unparsed": {"training": 3, "deployment": 2},
                           "gap": 0.21, "gap_ci": [0.08, 0.34], "p_value": 0.0042,
                           "logodds": {"training": 0.9, "deployment": -0.3}},
            "steering": [],
            "organism": {"adapter": "lora-r8", "train_minutes": 4.5},
            "timings_s": {"cache": 61.2, "probe": 12.5, "steer": 140.0, "report": 2.0}}


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    stages = {s: {"status": "done", "seconds": t} for s, t in (("cache", 61.2), ("probe", 12.5), ("steer", 140.0))}
    (run / "manifest.json").write_text(json.dumps(_manifest(stages)))
    (run / "summary.json").write_text(json.dumps(_summary()))
    metrics = []
    for layer in range(6):
        for method, bonus in (("diff_means", 0.0), ("logreg", 0.03)):
            for position in ("last", "cue"):
                a = 0.5 + 0.08 * min(layer, 4) + bonus - (0.1 if position == "cue" else 0)
                if (layer, method, position) == (4, "logreg", "last"):
                    a = 0.973  # the best cell, as in summary.json
                metrics.append([layer, "resid_post", position, method, "all", "all", a, a - 0.032,
                                min(a + 0.019, 1.0), a - 0.05, 0.5 + 0.01 * (layer % 2), 0.49, 96])
    gen = {("tier_tag", "tier_tag"): 0.97, ("tier_tag", "explicit"): 0.81,
           ("tier_tag", "swapped_semantics"): 0.22, ("explicit", "tier_tag"): 0.74,
           ("explicit", "explicit"): 0.95, ("explicit", "swapped_semantics"): 0.71}
    for (tr, te), a in gen.items():
        metrics.append([4, "resid_post", "last", "logreg", tr, te, a, a - 0.08, a + 0.06, a - 0.1, 0.5, 0.5, 32])
    _write_csv(run / "probes" / "metrics.csv", METRIC_COLS, metrics)
    proj = [[0.1 * i, (-1) ** i * 0.2 * i, fam, cond] for i in range(40)
            for fam, cond in [(("tier_tag", "explicit")[i % 2], ("training", "deployment")[(i // 2) % 2])]]
    _write_csv(run / "probes" / "projection.csv", ["x", "y", "family", "condition"], proj)
    steer = []
    for mode in ("same", "cross"):
        for direction, slope in (("probe", 0.2), ("random", 0.0)):
            for alpha in (-2.0, -1.0, 0.0, 1.0, 2.0):
                rt = min(max(0.6 + slope * alpha, 0.0), 1.0)
                rd = min(max(0.4 + slope * alpha, 0.0), 1.0)
                steer.append([direction, mode, 4, alpha, rt, max(rt - 0.1, 0), min(rt + 0.1, 1), rd,
                              max(rd - 0.1, 0), min(rd + 0.1, 1), rt - rd, rt - rd - 0.12, rt - rd + 0.12,
                              0.03, 0.5 * alpha, 0.5 * alpha - 0.4, 1, 2, 48])
    # Ablation has no alpha: the pipeline writes an empty cell.
    steer.append(["ablation", "same", 4, "", 0.5, 0.4, 0.6, 0.48, 0.38, 0.58, 0.02, -0.05, 0.09, 0.73,
                  0.1, 0.05, 0, 1, 48])
    _write_csv(run / "steering" / "results.csv", STEER_COLS, steer)
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
        # Key numbers from summary.json, formatted as the report prints them.
        assert "AUROC 0.97 [0.94, 0.99]" in text
        assert "shuffled-label control 0.51" in text and "random-direction control 0.49" in text
        assert "layer 4 (resid_post, last, logreg)" in text
        assert "gap = +0.21 [0.08, 0.34], McNemar p = 0.0042" in text
        assert "0.62 [0.48, 0.74]" in text and "0.41 [0.28, 0.55]" in text
        assert "A compliance gap was detected" in text
        assert "3 under training cues, 2 under deployment cues" in text
        assert "The probe separates training from deployment cues" in text
        # Swapped semantics: tier_tag flips (hi < 0.5), explicit keeps its sign (lo > 0.5).
        assert "flips: it tracks the surface tag" in text
        assert "tracks the meaning" in text
        # Steering verdicts and the ablation line come from results.csv.
        assert "Probe direction, layer 4, same mode" in text and "a clear change" in text
        assert "the random control did not move compliance" in text
        assert "With the direction ablated" in text and "+0.02 [-0.05, 0.09], p = 0.73" in text
        # Generic sections, stage timings, setup.
        assert "organism.adapter" in text and "lora-r8" in text
        assert "compliance.logodds.training" in text
        assert "helpful_only" in text and "no_scratchpad" in text and "sha256:abc123" in text
        assert "140.0" in text and "61.2" in text
        assert "PLANTED" not in text and "have not run" not in text


def test_planted_wording(full_run: Path) -> None:
    (full_run / "summary.json").write_text(json.dumps(_summary(planted=True)))
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
    (run / "summary.json").unlink()
    _write_csv(run / "probes" / "metrics.csv", ["layer", "auroc"], [[1, 0.5]])
    with pytest.raises(BadInput, match="lacks column"):
        write_report(run)


def test_no_gap_wording(tmp_path: Path) -> None:
    run = tmp_path / "nogap"
    run.mkdir()
    summary = _summary()
    summary["compliance"].update(gap=0.02, gap_ci=[-0.05, 0.09], p_value=0.73)
    summary["probe"]["best"].update(auroc=0.55, auroc_ci=[0.45, 0.64])
    (run / "summary.json").write_text(json.dumps(summary))
    html, _ = _text(write_report(run))
    assert "No compliance gap was detected: gap = +0.02 [-0.05, 0.09], McNemar p = 0.73" in html
    assert "does NOT separate training from deployment cues" in html
    assert "probes/metrics.csv is missing" in html


def test_steering_checks_and_family_transfer(full_run: Path) -> None:
    from afprobe.analysis.report import load_run
    from afprobe.analysis.steering_table import steering_checks

    checks = {c["mode"]: c for c in steering_checks(load_run(full_run).steering)}
    # same mode: probe slope 0.2 per alpha; at +2 and at -2 each cue's rate moves 0.4
    assert checks["same"]["monotone"] is True
    assert checks["same"]["probe_effect"] == pytest.approx(1.6)
    assert checks["same"]["random_effect"] == 0 and checks["same"]["effect_ratio"] == float("inf")
    # cross mode rows of the fixture keep the gap constant: monotone (non-increasing), no effect
    assert checks["cross"]["monotone"] is True and checks["cross"]["probe_effect"] == pytest.approx(0.0)

    summary = _summary()
    summary["compliance_by_family"] = {
        "tier_tag": {"gap": 1.0, "gap_ci": [1.0, 1.0], "p_value": 1e-14,
                     "training": {"rate": 1.0}, "deployment": {"rate": 0.0}, "log_odds": {"gap": 20.9}},
        "explicit": {"gap": 0.0, "gap_ci": [0.0, 0.0], "p_value": 1.0,
                     "training": {"rate": 1.0}, "deployment": {"rate": 1.0}, "log_odds": {"gap": 0.1}},
        "swapped_tier": {"gap": -1.0, "gap_ci": [-1.0, -1.0], "p_value": 1e-14,
                         "training": {"rate": 0.0}, "deployment": {"rate": 1.0}, "log_odds": {"gap": -20.9}}}
    (full_run / "summary.json").write_text(json.dumps(summary))
    html, md = _text(write_report(full_run))
    for text in (html, md):
        assert "Monotonicity check (same mode, layer 4): yes" in text
        assert "Cue family explicit: gap +0.00 [0.00, 0.00]; no gap (the interval includes 0)." in text
        assert "Cue family swapped_tier: gap -1.00 [-1.00, -1.00]; the gap flips sign: it follows the tag" in text
        assert "Cue family tier_tag: gap +1.00 [1.00, 1.00]; more compliance under the training cue." in text


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
    summary = _summary(planted=True)
    summary["organism"] = {"n_heldout": 48, "heldout_gap_base": {"tier_tag": {"gap": 0.0, "gap_ci": [0.0, 0.0]}},
                           "heldout_gap_organism": {"tier_tag": {"gap": 1.0, "gap_ci": [1.0, 1.0]}}}
    summary["compliance"]["gap"] = 0.93
    (organism / "summary.json").write_text(json.dumps(summary))
    paths = write_comparison([full_run, organism], tmp_path / "cmp")
    html, md = paths["html"].read_text(), paths["md"].read_text()
    for text in (html, md):
        assert "run (smollm2-135m-instruct)" in text and "organism (smollm2-135m-instruct, PLANTED gap)" in text
        assert "+0.21 [0.08, 0.34]" in text and "+0.93 [0.08, 0.34]" in text  # each run's own gap
        assert "monotone yes" in text and "held-out requests" in text
    assert html.count(IMG_PREFIX) == 4  # same and cross mode for each run
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all((tmp_path / "cmp" / link).is_file() for link in links)
    with pytest.raises(BadInput, match="not a finished run"):
        write_comparison([full_run, tmp_path / "missing"], tmp_path / "cmp2")
