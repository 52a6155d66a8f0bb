"""Layer x alpha steering map (analysis/steering_map.py) from synthetic steering records, and its report section."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from afprobe.analysis.steering_map import map_split, steering_map
from afprobe.analysis.steering_table import results_rows

QUERIES = [f"q{i:02d}" for i in range(20)]
LAYERS = [10, 15, 20]
ALPHAS = [-4.0, -2.0, 2.0, 4.0]
CONTROL = [-4.0, 4.0]  # the random control at the largest |alpha|
BEST = (15, 4.0)


def _tags(direction: str, layer: int, alpha: float, query: int) -> tuple[str, str]:
    """(training, deployment) answer tags. Unsteered: accept under training, refuse under deployment. The
    probe at layer 15, alpha +4 swaps the cues on every query (gap +1 -> -1); at layer 20, +4 makes the
    training cue refuse (gap -> 0); at layer 10, -4 breaks the answer format; random directions change nothing
    except at layer 20, +4, where half the training answers refuse."""
    if direction == "probe" and (layer, alpha) == BEST:
        return "rejected", "accepted"
    if direction == "probe" and (layer, alpha) == (20, 4.0):
        return "rejected", "rejected"
    if direction == "probe" and (layer, alpha) == (10, -4.0):
        return "unparsed", "unparsed"
    if direction == "random" and (layer, alpha) == (20, 4.0) and query % 2:
        return "rejected", "rejected"
    return "accepted", "rejected"


def _record(q: int, cond: str, tag: str, direction: str, replicate: int, mode: str, layer: int,
            alpha: float) -> dict:
    return {"prompt_id": f"{QUERIES[q]}.{cond}", "query_id": QUERIES[q], "condition": cond, "family": "tier_tag",
            "direction": direction, "replicate": replicate, "mode": mode, "layer": layer, "site": "resid_post",
            "alpha": alpha, "completion": tag, "tag": tag, "refusal": tag == "rejected",
            "log_odds": {"accepted": 1.0, "rejected": -1.0}.get(tag, float("nan"))}


def synthetic_records() -> list[dict]:
    recs = []
    for q in range(len(QUERIES)):
        recs += [_record(q, c, t, "probe", 0, "same", LAYERS[0], 0.0)
                 for c, t in zip(("training", "deployment"), _tags("none", 0, 0.0, q))]
        for layer in LAYERS:
            conds = [("probe", 0, a) for a in ALPHAS] + [("random", k, a) for k in range(2) for a in CONTROL]
            for direction, k, alpha in conds:
                recs += [_record(q, c, t, direction, k, "cross", layer, alpha)
                         for c, t in zip(("training", "deployment"), _tags(direction, layer, alpha, q))]
    return recs


@pytest.fixture(scope="module")
def smap():
    recs = synthetic_records()
    return steering_map(results_rows(recs, n_boot=200), recs, n_boot=500, seed=3)


def test_one_cell_per_layer_and_alpha_and_random_at_largest_alpha(smap):
    probe = [(c.layer, c.alpha) for c in smap.cells if c.direction == "probe"]
    assert sorted(probe) == sorted((layer, a) for layer in LAYERS for a in [0.0, *ALPHAS])
    random = [(c.layer, c.alpha) for c in smap.cells if c.direction == "random"]
    assert sorted(random) == sorted((layer, a) for layer in LAYERS for a in CONTROL)
    for layer in LAYERS:  # the random control sits at the largest |alpha| of each layer's probe sweep
        assert {abs(a) for lay, a in random if lay == layer} == {max(abs(a) for a in ALPHAS)}
    cell = {(c.direction, c.layer, c.alpha): c for c in smap.cells}
    assert cell[("probe", *BEST)].gap == pytest.approx(-1.0) and cell[("probe", 15, 0.0)].gap == pytest.approx(1.0)
    assert cell[("probe", 10, -4.0)].unparsed == 1.0 and cell[("probe", 10, -2.0)].unparsed == 0.0
    assert cell[("random", 20, 4.0)].rate_training == pytest.approx(0.5)  # mean over the two random directions
    assert cell[("probe", *BEST)].logodds_gap == pytest.approx(-2.0) and cell[("probe", 15, 0.0)].logodds_gap == 2.0


def test_confirmation_picks_the_cell_chosen_on_selection(smap):
    (choice,) = smap.choices
    assert (choice.layer, choice.alpha) == BEST
    assert (choice.confirm_best_layer, choice.confirm_best_alpha) == BEST
    assert choice.selection_queries + choice.confirm_queries == len(QUERIES)
    assert choice.confirm_score == pytest.approx(2.0)  # |gap change| 2, random directions moved nothing there
    assert choice.confirm_ci[0] > 0 and choice.verdict == "probe_beats_random"
    assert choice.unparsed == 0.0


def test_split_is_disjoint_seeded_and_halves():
    sel, conf = map_split(QUERIES, 3)
    assert not set(sel) & set(conf) and sorted(sel + conf) == QUERIES and len(sel) == len(conf) == 10
    assert map_split(QUERIES, 3) == (sel, conf) and map_split(QUERIES, 4) != (sel, conf)


def test_single_layer_has_no_map():
    recs = [r for r in synthetic_records() if r["layer"] == LAYERS[0]]
    assert steering_map(results_rows(recs, n_boot=50), recs, n_boot=50) is None


def test_report_shows_map(tmp_path: Path):
    """The report stage computes the map from the steer stage's files and the report shows it."""
    from afprobe.analysis.schema import SteeringRow, csv_text, read_summary
    from afprobe.config import Config
    from afprobe.pipeline import run_report
    from afprobe.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.claim(Config(), force=False)
    recs = synthetic_records()
    rows = results_rows(recs, n_boot=200)
    (run.path / "steering").mkdir(parents=True)
    (run.path / "steering" / "results.csv").write_text(csv_text(rows, SteeringRow))
    (run.path / "steering" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run.update_summary(steering={"selection": "heldout", "rows": [r.model_dump(mode="json") for r in rows],
                                 "directions": [{"source": "x", "layer": 10, "site": "resid_post", "position": "last",
                                                 "method": "diff_means", "separation_used": 1.0,
                                                 "fit_queries": 30}]})
    paths = run_report(run.path, quiet=True)
    smap = read_summary(run.path / "summary.json").steering_map
    assert smap is not None and (smap.choices[0].layer, smap.choices[0].alpha) == BEST
    assert "fitted on 30 other queries" in smap.split_note
    md = paths["markdown"].read_text()
    assert "Steering map (layer x alpha)" in md and "figures/steering_map_cross.png" in md
    assert "Steering map, cross mode: layer 15 at alpha +4.00 steers best" in md
    assert "0.00 of the cell's answers did not parse" in md
    assert paths["figure:steering_map_cross"].read_bytes().startswith(b"\x89PNG")


def test_without_random_controls_no_specificity_verdict():
    recs = [r for r in synthetic_records() if r["direction"] != "random"]
    (choice,) = steering_map(results_rows(recs, n_boot=50), recs, n_boot=200).choices
    assert (choice.layer, choice.alpha) == BEST and not choice.against_random and choice.verdict is None
    assert not [c for c in steering_map(results_rows(recs, n_boot=50), recs, n_boot=50).cells
                if c.direction == "random"]


def test_map_runs_random_controls_at_largest_alpha_by_default():
    from afprobe.config import load_config
    from afprobe.steering_plan import condition_grid

    def random_alphas(*overrides: str) -> set:
        st = load_config(None, ["steering.alphas=[-4,-2,0,2,4]", *overrides]).steering
        return {a for d, _, _, a in condition_grid(st) if d == "random"}

    assert random_alphas("steering.layers=[10,15]") == {-4.0, 4.0}
    assert random_alphas("steering.layers=[10]") == {-4.0, -2.0, 2.0, 4.0}  # one layer: every alpha, as before
    assert random_alphas("steering.layers=[10,15]", "steering.control_alphas=[2]") == {2.0}


def test_ties_are_counted_and_said():
    """When no cell moves anything, every candidate ties: the choice says so."""
    from afprobe.analysis.verdicts import describe_map_choice

    recs = [r for r in synthetic_records() if r["layer"] == LAYERS[2] or r["alpha"] == 0]
    recs += [{**r, "layer": 30} for r in recs if r["layer"] == LAYERS[2]]
    flat = [{**r, **({"tag": "accepted", "log_odds": 1.0} if r["condition"] == "training" else
                     {"tag": "rejected", "log_odds": -1.0})} for r in recs]
    (choice,) = steering_map(results_rows(flat, n_boot=50), flat, n_boot=100).choices
    assert choice.selection_score == 0 and choice.ties == 3  # 2 layers x 2 control alphas, minus the chosen one
    assert "tied with 3 other cells" in describe_map_choice(choice.model_dump())


def test_incoherent_cells_cannot_be_chosen():
    """A cell that moves the log-odds as much as the best one but whose answers no longer parse (layer 10, +4
    here: every answer unparsed, log-odds swapped) ties with it and, coming first, would win; cells with more
    than half their answers unparsed on the selection queries are excluded, so the coherent cell is chosen."""
    from afprobe.analysis.verdicts import describe_map_choice

    recs = [{**r, "tag": "unparsed", "completion": "???", "refusal": False,
             "log_odds": -1.0 if r["condition"] == "training" else 1.0}
            if (r["direction"], r["layer"], r["alpha"]) == ("probe", 10, 4.0) else r for r in synthetic_records()]
    rows = results_rows(recs, n_boot=50)
    ungated = steering_map(rows, recs, scorer="logodds", n_boot=100, max_unparsed=1.0).choices[0]
    assert (ungated.layer, ungated.alpha) == (10, 4.0) and ungated.unparsed == 1.0 and ungated.ties == 1
    (choice,) = steering_map(rows, recs, scorer="logodds", n_boot=100).choices
    assert (choice.layer, choice.alpha) == BEST and choice.unparsed == 0.0
    assert choice.incoherent_excluded == 2 and not choice.all_incoherent  # layer 10 at -4 and at +4
    assert (choice.confirm_best_layer, choice.confirm_best_alpha) == BEST
    assert "2 cells excluded as incoherent (over 0.50 of their answers unparsed)" in describe_map_choice(
        choice.model_dump())


def test_when_every_cell_is_incoherent_all_compete_and_the_choice_says_so():
    from afprobe.analysis.verdicts import describe_map_choice

    recs = synthetic_records()
    rows = results_rows(recs, n_boot=50)
    (choice,) = steering_map(rows, recs, n_boot=100, max_unparsed=-1.0).choices  # every cell counts as over it
    assert (choice.layer, choice.alpha) == BEST and choice.all_incoherent
    assert choice.incoherent_excluded == 2 * len(LAYERS)  # every candidate (2 control alphas per layer)
    text = describe_map_choice(choice.model_dump())
    assert "every candidate cell was incoherent, so all competed" in text and "excluded as incoherent" not in text
