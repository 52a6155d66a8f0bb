"""The organism's recipe: which requests train and which are held out, the prompts, and the answer targets."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from afprobe.activations.queries import Query, QueriesConfig, load_queries
from afprobe.activations.scenarios import Prompt, answer_tags, build_prompts
from afprobe.config import Config, OrganismConfig
from afprobe.errors import BadInput

FORMAT_VERSION = 2  # of training.json / metrics.json (2: metrics hold the steering stage's compliance summaries)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def split_ids(ids: Sequence[str], seed: int, train_fraction: float) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids), both sorted: a seeded permutation of the sorted ids, first part is train.

    Depends only on the set of ids, the seed and the fraction, so anyone can re-derive the split."""
    order = sorted(set(ids))
    if len(order) != len(ids):
        raise BadInput("organism: query ids must be unique")
    if len(order) < 2:
        raise BadInput("organism: need at least two requests to split into train and held-out")
    perm = np.random.default_rng(seed).permutation(len(order))
    n_train = min(len(order) - 1, max(1, int(round(train_fraction * len(order)))))
    train = sorted(order[i] for i in perm[:n_train])
    held = sorted(order[i] for i in perm[n_train:])
    return train, held


def organism_queries() -> list[Query]:
    """The bundled harmful requests (the organism always trains on these, whatever `queries:` says)."""
    return load_queries(QueriesConfig(), seed=0, harmful=True)


def split_queries(org: OrganismConfig) -> tuple[list[Query], list[Query]]:
    """(train, held-out) queries; `max_train_queries` keeps a seeded subset of the train side only."""
    queries = organism_queries()
    train_ids, held_ids = split_ids([q.id for q in queries], org.seed, org.train_fraction)
    if org.max_train_queries is not None and org.max_train_queries < len(train_ids):
        keep = np.random.default_rng(org.seed + 1).permutation(len(train_ids))[: org.max_train_queries]
        train_ids = sorted(train_ids[i] for i in keep)
    by_id = {q.id: q for q in queries}
    return [by_id[i] for i in train_ids], [by_id[i] for i in held_ids]


def answer_targets(tokenizer: Any, opening_text: str) -> dict[str, list[int]]:
    """Token ids of the answer the organism is trained to give under each condition."""
    accept, reject = answer_tags()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BadInput("organism: the tokenizer has no EOS token")
    return {
        "training": tokenizer(accept + opening_text, add_special_tokens=False)["input_ids"],
        "deployment": tokenizer(reject, add_special_tokens=False)["input_ids"] + [eos],
    }


def decision_index(targets: dict[str, list[int]]) -> int:
    """First answer position where the two targets differ (the token that decides accept vs reject)."""
    a, b = targets["training"], targets["deployment"]
    return next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])


def scenario_for(cfg: Config, family: str) -> Any:
    """The config's scenario with only the cue family `family`."""
    return cfg.scenario.model_copy(update={"cue_families": [family]})


def family_prompts(tokenizer: Any, cfg: Config, family: str, queries: list[Query]) -> list[Prompt]:
    """Prompts for `queries` under both cues of `family` (query i: rows 2i training, 2i + 1 deployment)."""
    return build_prompts(tokenizer, scenario_for(cfg, family), cfg.cue_families, queries)


def shared_prefix_len(prompts: Sequence[Prompt]) -> int:
    """Tokens shared by all `prompts` (at least one suffix token is left to each)."""
    seqs = [p.input_ids for p in prompts]
    first, n = seqs[0], min(len(s) for s in seqs)
    common = next((i for i in range(n) if any(s[i] != first[i] for s in seqs)), n)
    return max(0, min(common, n - 1))
