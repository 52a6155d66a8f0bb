"""Activation patching (activations/patching.py, probes/patching.py, afprobe/patching.py) on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from afprobe.activations.adapters import adapter_for
from afprobe.activations.patching import PatchJob, Patcher, align, stream_index
from afprobe.activations.queries import Query
from afprobe.activations.scenarios import answer_tags, build_prompts
from afprobe.config import ScenarioConfig
from afprobe.probes.patching import recovered_fraction

TEXTS = ("Say hello.", "Name a planet please.", "What is two plus two?")


@pytest.fixture
def setup(tiny_model, smol_tokenizer):
    queries = [Query(f"q{i}", t, "test", True) for i, t in enumerate(TEXTS)]
    prompts = build_prompts(smol_tokenizer, ScenarioConfig(cue_families=["tier_tag"]), {}, queries)
    accept, reject = answer_tags()
    patcher = Patcher(tiny_model, smol_tokenizer, adapter_for(tiny_model), accept, reject, max_batch=4)
    return prompts, patcher


# fp32 on the tiny model, whose log-odds are about -31 (float32 spacing there is 3.8e-6): the shared-trunk path
# scores the tags from the prompt's cache rather than in one forward with the prompt, so a few ulps may differ
TOL = 2e-5


@pytest.mark.parametrize("trunk", [True, False])
def test_self_patch_changes_nothing(setup, trunk) -> None:
    """Writing a prompt's own clean residual back at every stream index (every position set) changes nothing,
    with the shared trunk and without."""
    prompts, patcher = setup
    patcher.trunk = trunk
    clean = patcher.clean(prompts)
    jobs = []
    for i, p in enumerate(prompts):
        for pos in ("cue", "last", "user", "all"):
            src, tgt = align(p, p, pos)
            jobs.append(PatchJob(i, i, tuple(src), tuple(tgt)))
    for s in range(patcher.n_streams):
        got = patcher.patched(prompts, clean, jobs, s)
        diff = max(abs(g - clean.log_odds[j.target]) for g, j in zip(got, jobs))
        assert diff < TOL, (s, diff)


def _cross_jobs(prompts) -> list[PatchJob]:
    """Each query's training prompt patched into its deployment prompt and the reverse, and every prompt patched
    from the next query's prompt of the same cue (different queries: the last token only), at every position set
    the pair can be aligned on: targets with different numbers of jobs."""
    jobs = []
    for q in range(len(prompts) // 2):
        a, b = 2 * q, 2 * q + 1
        for src, tgt in ((a, b), (b, a)):
            for pos in ("cue", "last", "user", "all"):
                got = align(prompts[src], prompts[tgt], pos)
                if got is not None:
                    jobs.append(PatchJob(tgt, src, *map(tuple, got)))
        other = (a + 2) % len(prompts)
        jobs.append(PatchJob(a, other, *map(tuple, align(prompts[other], prompts[a], "last"))))
    return jobs


def test_shared_trunk_equals_full_forward(setup) -> None:
    """Patched log-odds from the target's shared trunk equal the full forward per job at every block input."""
    prompts, patcher = setup
    clean = patcher.clean(prompts)
    jobs = _cross_jobs(prompts)
    moved = 0.0
    for s in range(patcher.n_streams - 1):
        shared = patcher._patched_trunk(prompts, clean, jobs, s, None)
        full = patcher._patched_full(prompts, clean, jobs, s, None)
        assert max(abs(a - b) for a, b in zip(shared, full)) < TOL, s
        moved = max(moved, max(abs(a - clean.log_odds[j.target]) for a, j in zip(full, jobs)))
    assert moved > 10 * TOL  # the patches changed something, so agreeing is not trivial


@pytest.mark.slow
def test_shared_trunk_equals_full_forward_on_the_embedded_model(smol) -> None:
    """The same on SmolLM2-135M (fp32, log-odds of order 1-10) at an early, a middle and the last block input."""
    model, tokenizer = smol
    queries = [Query(f"q{i}", t, "test", True) for i, t in enumerate(TEXTS[:2])]
    prompts = build_prompts(tokenizer, ScenarioConfig(cue_families=["tier_tag"]), {}, queries)
    accept, reject = answer_tags()
    patcher = Patcher(model, tokenizer, adapter_for(model), accept, reject, max_batch=4)
    clean = patcher.clean(prompts)
    jobs = _cross_jobs(prompts)
    for s in (1, 15, patcher.n_streams - 2):
        shared = patcher._patched_trunk(prompts, clean, jobs, s, None)
        full = patcher._patched_full(prompts, clean, jobs, s, None)
        assert max(abs(a - b) for a, b in zip(shared, full)) < 1e-4, s


def test_full_patch_reproduces_source(setup) -> None:
    """Patching every computed position at layer 0 resid_pre with the other cue's prompt (equal lengths) gives that
    prompt's log-odds: recovered = 1; the last token alone at layer 0 moves (almost) nothing here."""
    prompts, patcher = setup
    clean = patcher.clean(prompts)
    pairs = [(2 * q, 2 * q + 1) for q in range(len(TEXTS))]  # (training, deployment)
    assert all(len(prompts[a].input_ids) == len(prompts[b].input_ids) for a, b in pairs)
    jobs = [PatchJob(b, a, *map(tuple, align(prompts[a], prompts[b], "all"))) for a, b in pairs]
    got = patcher.patched(prompts, clean, jobs, stream_index(0, "resid_pre"))
    for g, (a, _) in zip(got, pairs):
        assert abs(g - clean.log_odds[a]) < 1e-5
    t = [clean.log_odds[b] for _, b in pairs]
    s = [clean.log_odds[a] for a, _ in pairs]
    gap = abs(float(np.mean(s)) - float(np.mean(t)))  # small on a random model: the tolerance scales with it
    assert gap > 0 and abs(recovered_fraction(got, t, s)["recovered"] - 1.0) < 2e-5 / gap


def test_alignment_rules(setup, smol_tokenizer) -> None:
    prompts, _ = setup
    a, b = prompts[0], prompts[1]
    src, tgt = align(a, b, "cue")
    assert src == tgt and len(src) == a.cue_span[1] - a.cue_span[0]
    assert align(a, b, "last") == ([len(a.input_ids) - 1], [len(b.input_ids) - 1])
    # different queries: user turns of different lengths cannot be aligned token by token
    assert len(prompts[0].input_ids) != len(prompts[2].input_ids)
    assert align(prompts[0], prompts[2], "user") is None
    # unequal cue spans (the explicit family: "will be used" vs "will never be used") are skipped
    q = [Query("q0", TEXTS[0], "test", True)]
    ex = build_prompts(smol_tokenizer, ScenarioConfig(cue_families=["explicit"]), {}, q)
    assert ex[0].cue_span[1] - ex[0].cue_span[0] != ex[1].cue_span[1] - ex[1].cue_span[0]
    assert align(ex[0], ex[1], "cue") is None
    assert stream_index(3, "resid_post") == stream_index(4, "resid_pre") == 4


def test_recovered_fraction_interval() -> None:
    rng = np.random.default_rng(0)
    t, s = rng.normal(-5, 1, 20), rng.normal(5, 1, 20)
    half = recovered_fraction(t + 0.5 * (s - t), t, s)
    assert abs(half["recovered"] - 0.5) < 1e-9 and half["ci_lo"] <= 0.5 <= half["ci_hi"]
    noisy = recovered_fraction(t + rng.normal(0, 3, 20), t, s)
    assert noisy["ci_lo"] < noisy["recovered"] < noisy["ci_hi"] and noisy["n"] == 20
    assert np.isnan(recovered_fraction([], [], [])["recovered"])


def test_cli_bad_run_dir(tmp_path) -> None:
    from afprobe.cli import main

    assert main(["patch", str(tmp_path / "missing"), "--quiet"]) == 2
    assert main(["patch", str(tmp_path), "--quiet"]) == 2  # a directory with no manifest
    assert main(["patch", str(tmp_path), "--positions", "middle", "--quiet"]) == 2


def test_report_section(tmp_path) -> None:
    """patching/results.csv and the summary section become a report section with a heatmap per site."""
    from afprobe.analysis.report import write_report
    from afprobe.analysis.schema import PatchingSummary, PatchRow, Summary, csv_text, summary_json
    from afprobe.patching import best_rows

    rows = [PatchRow(layer=layer, site=site, positions=pos, direction=d, control=c, recovered=v, ci_lo=v - 0.1,
                     ci_hi=v + 0.1, n=4)
            for layer in (0, 1, 2) for site in ("resid_pre", "resid_post") for pos in ("cue", "last")
            for d in ("denoise", "noise") for c in ("none", "other_query")
            for v in [(1.0 - layer / 3 if pos == "cue" else layer / 3) * (c == "none")]]
    (tmp_path / "patching").mkdir()
    (tmp_path / "patching" / "results.csv").write_text(csv_text(rows, PatchRow))
    best = best_rows(rows)
    top = next(b for b in best if (b.positions, b.direction, b.control) == ("cue", "denoise", "none"))
    assert top.layer == 0 and top.recovered == 1.0
    summary = Summary(patching=PatchingSummary(family="tier_tag", n_queries=4, gap_log_odds=20.0, layers=[0, 1, 2],
                                               sites=["resid_pre", "resid_post"], positions=["cue", "last"],
                                               best=best, skipped={"cue": 0, "last": 0}))
    (tmp_path / "summary.json").write_text(summary_json(summary))
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "## Activation patching" in md and "figure:patching_resid_pre" in paths and "figure:patching_resid_post" in paths
