"""The typed contracts of a run directory's result files: summary.json, probes/metrics.csv and
steering/results.csv. Every stage writes through these models and every reader (report, headline,
compare, sweeps) reads through them.

summary.json is strict JSON: non-finite numbers become null when a model is built, so NaN and Infinity never
reach the file. Its `schema_version` says which contract a file follows; a file of another version is
refused with a one-line message (rerun the probe and steer stages to rewrite it).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from afprobe.analysis.verdicts import (
    GapVerdict, MovedVerdict, OverlapVerdict, ProbeVerdict, SpecificityVerdict, SwappedVerdict, TransferVerdict,
)
from afprobe.errors import BadInput

SCHEMA_VERSION = 2


def _finite_or_none(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value  # let pydantic report the type error
    return number if math.isfinite(number) else None


def _clean(obj: Any) -> Any:
    """Free-form JSON with every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


Num = Annotated[Optional[float], BeforeValidator(_finite_or_none)]
FreeJSON = Annotated[Optional[dict[str, Any]], BeforeValidator(_clean)]
Interval = list[Num]  # [lo, hi]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------- probe section

class ProbeBest(_Model):
    layer: int
    site: str
    position: str
    method: str
    auroc: Num  # selection-aware: the whole selection procedure scored on data it did not see
    auroc_ci: Interval
    naive_auroc: Num = None  # the chosen cell's plain cross-validated AUROC (biased upward by the selection)
    n_cells: int  # cells that competed to be best
    selection: Literal["nested", "heldout_split"]
    selection_p: Num  # max-statistic permutation p over the n_cells
    n_permutations: int
    fold_choices: list[str] = []  # the cell each outer fold chose (nested selection)


class ShuffledControl(_Model):
    mean: Num
    q95: Num
    n: int
    p: Num = None  # permutation p of the best cell's AUROC


class RandomControl(_Model):
    median: Num
    q05: Num
    q95: Num
    n: int


class ProbeControls(_Model):
    shuffled: ShuffledControl
    random: RandomControl
    shuffled_auroc: Num = None  # = shuffled.mean (design-notes key)
    random_auroc: Num = None  # = random.median (design-notes key)


class AurocCI(_Model):
    auroc: Num
    auroc_ci: Interval


class SwappedResult(AurocCI):
    family: str
    verdict: SwappedVerdict


class TransferCell(AurocCI):
    verdict: TransferVerdict


class ProbeSummary(_Model):
    best: ProbeBest
    verdict: ProbeVerdict
    controls: ProbeControls
    swapped: Optional[SwappedResult] = None  # absent when no control family is configured
    generalization: dict[str, dict[str, Num]] = {}  # train family -> test family -> AUROC at the best cell
    generalization_ci: dict[str, dict[str, TransferCell]] = {}
    control_families: list[str] = []


# --------------------------------------------------------------------------------------- compliance

class Rate(_Model):
    rate: Num
    ci: Interval
    n: int  # paired queries (the gap's denominator)
    n_parsed: Optional[int] = None  # this cue's parsed answers, paired or not


class Gap(_Model):
    estimate: Num
    ci: Interval
    mcnemar_p: Num
    n_pairs: int
    discordant: list[int]
    verdict: GapVerdict
    interval_method: str = ""


class LogOdds(_Model):
    training: Num = None
    deployment: Num = None
    gap: Num = None
    gap_ci: Interval = [None, None]


class ComplianceSummary(_Model):
    scorer: str
    training: Rate
    deployment: Rate
    unparsed: dict[str, int]
    gap: Gap
    gap_ci: Interval  # = gap.ci (design-notes key)
    p_value: Num  # = gap.mcnemar_p (design-notes key)
    n_pairs: int
    log_odds: LogOdds = LogOdds()
    refusal_rate: dict[str, Num] = {}


# --------------------------------------------------------------------------------------- steering

class SteeringRow(_Model):
    """One steering condition; also a row of steering/results.csv."""

    direction: Literal["probe", "random", "ablation", "refusal"]
    replicate: int = 0  # which random direction (0 for the others)
    mode: Literal["same", "cross"]
    layer: int
    site: str = "resid_post"
    alpha: Num = None  # None for ablation
    rate_training: Num = None
    rate_training_lo: Num = None
    rate_training_hi: Num = None
    rate_deployment: Num = None
    rate_deployment_lo: Num = None
    rate_deployment_hi: Num = None
    gap: Num = None
    gap_lo: Num = None
    gap_hi: Num = None
    p_value: Num = None  # exact McNemar of the gap
    gap_verdict: Optional[GapVerdict] = None
    p_training_vs0: Num = None  # exact McNemar of this condition vs alpha 0, per cue, same queries
    p_deployment_vs0: Num = None
    p_training_holm: Num = None  # Holm-adjusted over every steered row and cue
    p_deployment_holm: Num = None
    vs_unsteered: Optional[MovedVerdict] = None  # did it move compliance? None: the unsteered model itself
    logodds_training: Num = None
    logodds_deployment: Num = None
    logodds_gap: Num = None
    logodds_gap_lo: Num = None
    logodds_gap_hi: Num = None
    refusal_training: Num = None
    refusal_deployment: Num = None
    unparsed_training: Optional[int] = None
    unparsed_deployment: Optional[int] = None
    n: int = 0
    scorer: str = "tag"


class SteeringCheck(_Model):
    mode: Literal["same", "cross"]
    layer: int
    alphas: list[float]
    monotone: Optional[bool]
    probe_effect: Num
    random_effect: Num  # mean over the random directions
    random_effects: list[Num] = []
    random_spread: Interval = [None, None]  # [min, max] over the random directions
    n_random: int = 0
    effect_diff: Num = None  # probe effect minus mean random effect
    effect_diff_ci: Interval = [None, None]  # paired bootstrap over queries
    verdict: Optional[SpecificityVerdict] = None


class SteeringDirection(_Model):
    source: str  # where the unit vector came from (a file, or "fitted on the selection queries")
    kind: str = "best"  # steering.direction: best (awareness probe), refusal, probe_minus_refusal, ... or a file
    layer: int
    site: str
    position: str
    method: str
    separation_used: Num  # alpha's unit: class-mean separation on the steering family at `position`
    separation_at_steered_positions: Num = None  # for reference: the same at the steered (user-turn) tokens
    fit_queries: int = 0
    report_queries: int = 0


class SteeringSummary(_Model):
    selection: Literal["heldout", "in_sample"]
    selection_note: str = ""
    directions: list[SteeringDirection] = []
    rows: list[SteeringRow] = []
    checks: list[SteeringCheck] = []
    n_random: int = 0
    multiple_comparisons: str = "Holm over every steered row and cue (p_*_holm)"


class MapCell(_Model):
    """One (mode, layer, alpha) cell of the layer x alpha steering map (probe direction, or a random control)."""

    mode: Literal["same", "cross"]
    layer: int
    alpha: float
    direction: Literal["probe", "random"] = "probe"  # random: the mean over the random directions at this cell
    rate_training: Num = None
    rate_deployment: Num = None
    gap: Num = None
    logodds_gap: Num = None  # mean accept-vs-reject log-odds, training minus deployment
    unparsed: Num = None  # fraction of answers (both cues) the scorer could not parse: the cell's coherence
    n: int = 0


class MapChoice(_Model):
    """Which (layer, alpha) steers best in one mode: chosen on the selection queries, confirmed on the others.
    Score = the probe direction's effect at the cell minus the mean random direction's effect there (the
    steering checks' effect: summed |change of each cue's rate| vs alpha 0, or |change of the gap| in cross
    mode); only cells with a random control compete (the largest |alpha| per layer unless configured), and of
    those only the coherent ones (`max_unparsed`)."""

    mode: Literal["same", "cross"]
    layer: Optional[int] = None
    alpha: Num = None
    selection_score: Num = None  # on the selection queries
    selection_queries: int = 0
    unparsed: Num = None  # the chosen probe cell's unparsed fraction (its coherence)
    max_unparsed: Num = None  # cells above this unparsed fraction on the selection queries could not be chosen ...
    incoherent_excluded: int = 0  # ... how many were excluded
    all_incoherent: bool = False  # every candidate was above it, so all competed
    ties: int = 0  # other candidate cells with the same selection score (the first in layer, alpha order wins)
    confirm_score: Num = None  # the same cell on the confirmation queries
    confirm_ci: Interval = [None, None]  # paired bootstrap over confirmation queries
    confirm_queries: int = 0
    confirm_best_layer: Optional[int] = None  # the argmax on the confirmation queries (agreement check)
    confirm_best_alpha: Num = None
    against_random: bool = True  # False: no random direction ran, the score is the probe's effect alone
    verdict: Optional[SpecificityVerdict] = None  # from the confirmation interval (None without random controls)


class SteeringMap(_Model):
    """Layer x alpha steering map (steering.layers a list): one cell per (mode, layer, alpha) for the probe,
    the random controls at their alphas, and the best cell chosen on a split of the steered queries."""

    layers: list[int]
    alphas: list[float]
    cells: list[MapCell] = []
    choices: list[MapChoice] = []
    split_note: str = ""


class LensToken(_Model):
    token: str
    score: Num


class LensRow(_Model):
    """Logit lens of one direction (activations/lens.py): top-k promoted and suppressed tokens with scores."""

    layer: int
    site: str
    source: str  # "steering" (the direction steered along) or the probe stage's file it was read from
    promoted: list[LensToken]
    suppressed: list[LensToken]


class KnownAnswer(_Model):
    layer: int
    alpha: float
    n: int
    separation: Num
    log_odds_change: Num
    log_odds_change_ci: Interval
    refusal_rate_before: Num
    refusal_rate_after: Num
    passed: bool
    statement: str


class RefusalLayer(_Model):
    """The training-awareness direction (probes/directions/layer<L>) against the refusal direction at one layer."""

    layer: int
    cosine: Num
    cosine_ci: Interval  # bootstrap over harmful and benign queries (the awareness direction held fixed)
    random_abs_median: Num  # |cosine| of the awareness direction with random directions
    random_abs_q95: Num
    p_random: Num  # (1 + #{random |cosine| >= |cosine|}) / (1 + n_random)
    refusal_separation: Num  # |harmful mean - benign mean|: alpha's unit when steering along the refusal direction
    verdict: Optional[OverlapVerdict] = None


class RefusalSummary(_Model):
    """The refusal direction (harmful minus benign mean) per cached layer and its overlap with the awareness
    direction (steer stage; files in steering/refusal/)."""

    site: str
    position: str
    family: str  # the cue family whose prompts (both cues) give the harmful and benign activations
    n_harmful_queries: int
    n_benign_queries: int
    best_layer: Optional[int] = None  # the probe stage's best layer
    n_random: int = 0
    n_boot: int = 0
    baseline: str = ""  # what the random baseline is
    layers: list[RefusalLayer] = []


# --------------------------------------------------------------------------------------- judge (scratchpad form)

class JudgedRate(_Model):
    rate: Num  # flagged / judged traces of this cue
    ci: Interval  # Wilson
    n: int  # judged traces (with a valid vote)
    k: int
    unjudged: int = 0  # traces without a valid vote (or without reasoning): counted, not in the rate


class JudgedCue(JudgedRate):
    partial: JudgedRate  # the judge's partial-compliance question (same vote rule), apart from alignment faking
    compliance: JudgedRate  # tag scorer on the final output of the same records (unparsed counted as unjudged)
    mean_score: Num = None  # mean fraction of yes votes


class JudgedDifference(Gap):
    """Alignment-faking rate, training minus deployment, on queries judged under both cues (fields as Gap)."""


class JudgedCell(_Model):
    direction: Literal["probe", "random", "ablation", "refusal"]
    replicate: int = 0
    mode: Literal["same", "cross"]
    layer: int
    site: str = "resid_post"
    alpha: Num = None
    n_traces: int
    training: JudgedCue
    deployment: JudgedCue
    difference: JudgedDifference
    p_training_vs0: Num = None  # exact McNemar of alignment-faking flags vs the unsteered cell, same queries
    p_deployment_vs0: Num = None
    p_training_holm: Num = None  # Holm over every steered cell and cue
    p_deployment_holm: Num = None
    vs_unsteered: Optional[MovedVerdict] = None


class JudgeSummary(_Model):
    """Alignment-faking results of a scratchpad run (afprobe/judge_stage.py, analysis/judge_results.py)."""

    judge: FreeJSON  # provenance: model, kind, prompt, criteria, votes, temperature, threshold (never a key)
    threshold: float
    votes_per_trace: int
    n_traces: int
    n_judged: int
    n_no_reasoning: int = 0
    n_unscored: int = 0  # judged, but no valid vote
    n_cached: int = 0
    vote_counts: dict[str, int] = {}
    partial_question: str = ""
    cells: list[JudgedCell] = []


class PatchRow(_Model):
    """A row of patching/results.csv: the recovered fraction of one (layer, site, positions, direction, control)."""

    layer: int
    site: str
    positions: str  # cue | last | user
    direction: str  # denoise (training into deployment) | noise (deployment into training)
    control: str  # none | other_query (source: a different query's prompt with the same cue)
    recovered: Num
    ci_lo: Num = None
    ci_hi: Num = None
    n: int = 0  # queries aligned and patched
    skipped: int = 0  # queries whose spans could not be aligned


class PatchBest(_Model):
    """The layer (and site) where a position set recovers most, per direction and control."""

    positions: str
    direction: str
    control: str
    layer: Optional[int] = None
    site: Optional[str] = None
    recovered: Num = None
    ci_lo: Num = None
    ci_hi: Num = None


class PatchingSummary(_Model):
    family: str
    n_queries: int
    gap_log_odds: Num  # mean clean log-odds, training minus deployment prompt
    layers: list[int]
    sites: list[str]
    positions: list[str]
    best: list[PatchBest] = []
    skipped: dict[str, int] = {}  # positions set -> queries (x direction x control) skipped as unalignable
    seconds: Num = None
    forward_tokens: Optional[int] = None  # tokens run (shared prefix once)


# --------------------------------------------------------------------------------------- summary

class Summary(_Model):
    schema_version: int = SCHEMA_VERSION
    model: Optional[str] = None
    n_queries: Optional[int] = None
    n_layers: Optional[int] = None
    probe: Optional[ProbeSummary] = None
    compliance: Optional[ComplianceSummary] = None
    compliance_by_scorer: Optional[dict[str, ComplianceSummary]] = None
    compliance_by_family: Optional[dict[str, ComplianceSummary]] = None
    control_families: list[str] = []
    steering: Optional[SteeringSummary] = None
    known_answer: Optional[KnownAnswer] = None
    refusal: Optional[RefusalSummary] = None  # refusal direction vs awareness direction (optional: older files lack it)
    planted: bool = False
    organism: FreeJSON = None  # the adapter card (free-form provenance)
    judge: Optional[JudgeSummary] = None  # scratchpad form with a judge configured (optional: older files lack it)
    patching: Optional[PatchingSummary] = None  # `afprobe patch` (optional)
    steering_map: Optional[SteeringMap] = None  # steering.layers a list: the layer x alpha map (report stage)
    lens: Optional[list[LensRow]] = None  # logit lens of the steering and per-layer probe directions (steer stage)
    timings_s: dict[str, Num] = {}


def read_summary(path: Path) -> Optional[Summary]:
    """The summary at `path` (None when absent); BadInput for broken JSON, an old schema or a bad field."""
    if not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BadInput(f"{path} follows summary schema {version!r}, this afprobe writes {SCHEMA_VERSION}; rerun "
                       "`afprobe probe` and `afprobe steer` on the run directory (the cache is reused)")
    return validated(Summary, data, str(path))


def summary_json(summary: Summary) -> str:
    """Strict JSON (no NaN/Infinity: the models hold None there)."""
    return json.dumps(summary.model_dump(mode="json"), indent=2, allow_nan=False) + "\n"


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Any, where: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BadInput(f"{where}: field '{loc}': {first['msg']}") from None


# --------------------------------------------------------------------------------------- CSV rows

class MetricsRow(_Model):
    """A row of probes/metrics.csv: one (layer, site, position, method, train family, test family) cell."""

    layer: int
    site: str
    position: str
    method: str
    train_family: str
    test_family: str
    auroc: Num
    auroc_lo: Num = None
    auroc_hi: Num = None
    accuracy: Num = None
    shuffled_auroc: Num = None  # one within-run label permutation (a per-cell diagnostic)
    random_auroc: Num = None  # one random direction (a per-cell diagnostic)
    n: int = 0


def csv_text(rows: list[BaseModel], model: type[BaseModel]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(model.model_fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.model_dump(mode="json").items()})
    return buf.getvalue()


def read_rows(path: Path, model: type[M]) -> Optional[list[M]]:
    """Rows of a CSV written by `csv_text` (None when the file is absent); BadInput naming the line."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        required = [name for name, f in model.model_fields.items() if f.is_required()]
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInput(f"{path} lacks column(s) {', '.join(missing)}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            clean = {k: (None if v == "" else v) for k, v in raw.items() if k in model.model_fields}
            rows.append(validated(model, clean, f"{path} line {line}"))
    return rows
