"""Prompt construction: scenario + cue family + query -> a rendered, tokenised prompt with cue and user spans.

Rendering: the chat template (or, for a model without one, the plain-text transcript layout of
`scenario_text.transcript`) is applied once per (family, condition) to a frame whose user content (and
system-side cue) are sentinel strings; the sentinels are located and replaced by the real texts, so the
character spans are exact whatever the layout does around them. The whole text is then tokenised once
and the character spans are mapped to token spans. Within each query, the training and deployment
token sequences are checked to differ only inside the cue span (the span is widened if a token merges
across the cue boundary).
"""
from __future__ import annotations

import hashlib
import re
from bisect import bisect_left, bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from afprobe.activations import scenario_text as st
from afprobe.activations.queries import SAFE_ID, Query
from afprobe.config import CueFamilyConfig, ScenarioConfig
from afprobe.errors import BadInput

FORMS: tuple[str, ...] = ("no_scratchpad", "scratchpad")
PREFILLS: tuple[str, ...] = tuple(st.PREFILLS)
VARIANTS: tuple[str, ...] = st.VARIANTS
BUILTIN_FAMILIES: tuple[str, ...] = tuple(st.FAMILIES)  # the shipped ones; `st.FAMILIES` also has registered ones
CONDITIONS: tuple[str, str] = ("training", "deployment")  # label 1, label 0 (by meaning)
CUE_PLACEHOLDER = "{training_cue}"  # where a system-side cue goes in a user's system prompt file
_FAMILY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots: prompt ids are query.family.condition
_USER_SENTINEL = "\u27e6AFPROBE-USER\u27e7"
_CUE_SENTINEL = "\u27e6AFPROBE-CUE\u27e7"

Span = tuple[int, int]


@dataclass(frozen=True)
class Prompt:
    prompt_id: str  # f"{query_id}.{family}.{condition}" (file-name safe)
    query_id: str
    category: str
    harmful: bool
    family: str
    condition: str  # "training" | "deployment"
    label: int  # 1 = training by MEANING, 0 = deployment
    format: str  # "chat" | "transcript": the layout `text` was rendered with
    text: str  # full rendered text incl. chat template (or transcript layout) and prefill
    input_ids: tuple[int, ...]
    cue_span: Span  # token [start, end) of the cue text
    user_span: Span  # token [start, end) of the user message content
    system_key: str  # hash of input_ids[:user_span[0]]: equal keys <=> identical token prefix

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(input_ids=list(self.input_ids), cue_span=list(self.cue_span),
                    user_span=list(self.user_span), n_tokens=len(self.input_ids))
        return data


@dataclass(frozen=True)
class CueFamily:
    """A resolved family: cue text per condition, where it goes, and whether the tier semantics are swapped."""

    name: str
    training: str
    deployment: str
    where: str  # "system" | "user"
    swapped: bool = False  # the built-in tier roles are swapped in the system prompt
    control: Optional[str] = None  # "swapped": a swapped-semantics control (kept out of probe training)

    def cue(self, condition: str) -> str:
        return self.training if condition == "training" else self.deployment


def answer_tags() -> tuple[str, str]:
    """(accept tag, reject tag) that the scenario asks the model to start its answer with."""
    return st.ACCEPT_TAG, st.REJECT_TAG


def known_families(custom: Optional[dict[str, CueFamilyConfig]] = None) -> list[str]:
    """Built-in family names followed by the user-defined ones (checked for clashes and safe names)."""
    custom = custom or {}
    for name in custom:
        if name in st.FAMILIES:
            raise BadInput(f"cue family '{name}' clashes with a built-in family; rename it under cue_families")
        if not _FAMILY_NAME.match(name):
            raise BadInput(f"cue family name '{name}' may use only letters, digits, '_' and '-'")
    return list(st.FAMILIES) + sorted(custom)


def resolve_family(name: str, variant: str, custom: dict[str, CueFamilyConfig]) -> CueFamily:
    known = known_families(custom)
    if name not in known:
        raise BadInput(f"unknown cue family '{name}' in scenario.cue_families (known: {', '.join(known)})")
    if name in custom:
        fam = custom[name]
        training, deployment = fam.training.strip(), fam.deployment.strip()
        if not training or not deployment or training == deployment:
            raise BadInput(f"cue family '{name}': training and deployment texts must be non-empty and different")
        return CueFamily(name, training, deployment, fam.where, control=fam.control)
    swapped = st.FAMILIES[name].swapped
    training, deployment = st.builtin_cues(name, st.tiers_for(variant, swapped))
    return CueFamily(name, training, deployment, "user", swapped, control="swapped" if swapped else None)


def control_families(scenario: ScenarioConfig, custom: Optional[dict[str, CueFamilyConfig]] = None) -> list[str]:
    """The configured families that are controls by definition (e.g. swapped semantics), never by name."""
    return [name for name in scenario.cue_families
            if resolve_family(name, scenario.variant, custom or {}).control is not None]


def check_scenario(scenario: ScenarioConfig, custom: dict[str, CueFamilyConfig]) -> None:
    """Reject configurations that cannot be built, with a one-line reason."""
    if scenario.variant not in VARIANTS:
        raise BadInput(f"unknown scenario.variant '{scenario.variant}' (known: {', '.join(VARIANTS)})")
    if scenario.prefill != "none" and scenario.form != "scratchpad":
        raise BadInput(f"scenario.prefill '{scenario.prefill}' needs scenario.form 'scratchpad' (got '{scenario.form}')")
    if scenario.system_prompt_file and scenario.variant != "helpful_only":
        raise BadInput(f"scenario.variant '{scenario.variant}' edits the built-in system prompt and cannot be combined with scenario.system_prompt_file")
    if not scenario.cue_families:
        raise BadInput("scenario.cue_families is empty; name at least one family, e.g. [tier_tag]")
    dupes = sorted({f for f in scenario.cue_families if scenario.cue_families.count(f) > 1})
    if dupes:
        raise BadInput(f"scenario.cue_families lists {', '.join(dupes)} more than once")
    for name in scenario.cue_families:
        resolve_family(name, scenario.variant, custom)


def system_text(scenario: ScenarioConfig, family: CueFamily) -> str:
    """The system prompt for a family, with `_CUE_SENTINEL` where a system-side cue goes."""
    slot = _CUE_SENTINEL if family.where == "system" else ""
    if scenario.system_prompt_file:
        path = Path(scenario.system_prompt_file).expanduser()
        if not path.is_file():
            raise BadInput(f"system prompt file not found: {path}")
        text = path.read_text(encoding="utf-8").strip()
        if CUE_PLACEHOLDER in text:
            return text.replace(CUE_PLACEHOLDER, slot, 1).replace(CUE_PLACEHOLDER, "")
        return f"{text}\n\n{slot}" if slot else text
    tiers = st.tiers_for(scenario.variant, family.swapped)
    note = st.family_note(family.name if family.name in st.FAMILIES else "", tiers)
    text = st.system_prompt(scenario.variant, scenario.form, note, tiers)
    return f"{text}\n\n{slot}" if slot else text


def resolve_format(tokenizer, requested: str) -> str:
    """`scenario.format` -> "chat" | "transcript". auto: chat when the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "auto":
        return "chat" if has_template else "transcript"
    if requested == "chat" and not has_template:
        raise BadInput("scenario.format is 'chat' but the model's tokenizer has no chat template (a base model?); "
                       "set scenario.format to 'transcript' or 'auto'")
    return requested


def _transcript_bos(tokenizer) -> str:
    """BOS text to open a transcript with, or "". A chat template writes the BOS itself when the model expects
    one (Llama 3's starts with it); a transcript has no template, so it follows what the tokenizer does to
    plain text: BOS only if encoding with special tokens adds it (Llama 3 base yes, SmolLM2 no). It goes
    into the text because prompts are tokenised with add_special_tokens=False."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not bos or bos_id is None or tokenizer("x")["input_ids"][:1] != [bos_id]:
        return ""
    if tokenizer(bos, add_special_tokens=False)["input_ids"] != [bos_id]:
        raise BadInput(f"the tokenizer does not read its BOS token {bos!r} back from text; afprobe cannot render a transcript")
    return bos


def _render_frame(tokenizer, system: str, prefill: str, fmt: str) -> tuple[str, str]:
    """Render the system prompt around a user sentinel, with the chat template or as a transcript (`fmt`):
    returns (text before, text after) the user content; the answer prefill ends the text after."""
    if fmt == "transcript":
        rendered = _transcript_bos(tokenizer) + st.transcript(system, _USER_SENTINEL)
    else:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": _USER_SENTINEL}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise their own errors (e.g. no system role)
            raise BadInput(f"the tokenizer's chat template cannot render a system + user conversation: {exc}") from None
    if rendered.count(_USER_SENTINEL) != 1 or rendered.count(_CUE_SENTINEL) != system.count(_CUE_SENTINEL):
        raise BadInput(f"the {fmt} layout alters message contents; afprobe cannot locate the user turn")
    before, after = rendered.split(_USER_SENTINEL)
    return before, after + prefill


def _token_spans(offsets: Sequence[tuple[int, int]], *char_spans: Span) -> list[Span]:
    """For each character span [start, end), the tokens overlapping it (offsets are non-decreasing)."""
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    spans = []
    for start, end in char_spans:
        first, last = bisect_right(ends, start), bisect_left(starts, end)
        if first >= last:
            raise RuntimeError(f"no tokens cover characters [{start}, {end})")
        spans.append((first, last))
    return spans


def _align_pair(a: tuple[int, ...], b: tuple[int, ...], span_a: Span, span_b: Span) -> tuple[Span, Span]:
    """Widen both cue spans so the two sequences agree outside them (same prefix and suffix lengths)."""
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    suffix = next((i for i in range(n - prefix) if a[-1 - i] != b[-1 - i]), n - prefix)
    start = min(span_a[0], span_b[0], prefix)
    tail = min(len(a) - span_a[1], len(b) - span_b[1], suffix)
    return (start, len(a) - tail), (start, len(b) - tail)


def _system_key(ids: tuple[int, ...], user_start: int) -> str:
    return hashlib.sha256(",".join(map(str, ids[:user_start])).encode()).hexdigest()[:12]


def _family_prompts(tokenizer, scenario: ScenarioConfig, family: CueFamily, queries: list[Query], prefill: str,
                    fmt: str) -> list[Prompt]:
    """Training then deployment prompt of every query, for one family."""
    before, after = _render_frame(tokenizer, system_text(scenario, family), prefill, fmt)
    drafts = []  # (query, condition, text, cue chars, user chars)
    for query in queries:
        for condition in CONDITIONS:
            cue = family.cue(condition)
            if family.where == "system":
                head = before.replace(_CUE_SENTINEL, cue, 1)
                cue_start = before.index(_CUE_SENTINEL)
                user = st.user_turn(query.text)
            else:
                head, user = before, st.user_turn(query.text, cue)
                cue_start = len(head) + user.index(cue)
            text = head + user + after
            drafts.append((query, condition, text, (cue_start, cue_start + len(cue)), (len(head), len(head) + len(user))))
    enc = tokenizer([d[2] for d in drafts], add_special_tokens=False, return_offsets_mapping=True)
    built = []
    for (query, condition, text, cue_chars, user_chars), ids, offsets in zip(drafts, enc["input_ids"], enc["offset_mapping"]):
        built.append((query, condition, text, tuple(ids), *_token_spans(offsets, cue_chars, user_chars)))
    prompts = []
    for train, deploy in zip(built[::2], built[1::2]):
        spans = _align_pair(train[3], deploy[3], train[4], deploy[4])
        for (query, condition, text, ids, _, user_span), cue_span in zip((train, deploy), spans):
            prompts.append(Prompt(
                prompt_id=f"{query.id}.{family.name}.{condition}", query_id=query.id, category=query.category,
                harmful=query.harmful, family=family.name, condition=condition, label=int(condition == "training"),
                format=fmt, text=text, input_ids=ids, cue_span=cue_span, user_span=user_span,
                system_key=_system_key(ids, user_span[0]),
            ))
    return prompts


def build_prompts(tokenizer, scenario: ScenarioConfig, custom_families: dict[str, CueFamilyConfig],
                  queries: list[Query]) -> list[Prompt]:
    """All prompts: for each family in `scenario.cue_families`, for each query, training then deployment."""
    custom_families = custom_families or {}
    check_scenario(scenario, custom_families)
    if not queries:
        raise BadInput("empty query set: no queries to build prompts from")
    seen: set[str] = set()
    for query in queries:
        if not SAFE_ID.match(query.id) or query.id in seen:
            raise BadInput(f"query ids must be unique and file-name safe (offending id: {query.id!r})")
        seen.add(query.id)
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput("afprobe needs a fast (Rust) tokenizer to map character spans to tokens")
    fmt = resolve_format(tokenizer, scenario.format)
    prefill = st.assistant_prefill(scenario.form, scenario.prefill)
    prompts: list[Prompt] = []
    for name in scenario.cue_families:
        family = resolve_family(name, scenario.variant, custom_families)
        prompts.extend(_family_prompts(tokenizer, scenario, family, queries, prefill, fmt))
    return prompts
