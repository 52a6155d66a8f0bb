"""Cross-validation splits grouped by query.

Both cue conditions of a query (and every cue family of it) share a query id, so assigning whole groups
to folds keeps them on the same side; otherwise a probe can score well by recognising the query.
"""
from __future__ import annotations

import numpy as np

from afprobe.errors import BadInput


def derive_seed(seed: int, *tags: int) -> int:
    """A child seed of `seed` for the stream named by integer `tags` (stable across runs)."""
    return int(np.random.SeedSequence([int(seed), *map(int, tags)]).generate_state(1)[0])


def inner_fold_seed(seed: int, outer_fold: int) -> int:
    """Seed of the inner-CV folds nested in outer fold `outer_fold` (shared by sweep and bench)."""
    return derive_seed(seed, 1, outer_fold)


def fold_ids(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number in [0, k) for each row; rows of one group share a fold.

    groups: [n] hashable ids. Groups are shuffled with `seed`, then each goes (largest first) to the
    fold with the fewest rows so far, so folds are balanced even for unequal group sizes.
    Returns [n] int64.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise BadInput("groups must be a non-empty 1-d array")
    uniq, inv = np.unique(groups, return_inverse=True)
    if not 2 <= int(k) <= len(uniq):
        raise BadInput(f"need 2 <= folds <= number of queries ({len(uniq)}), got folds={k}")
    sizes = np.bincount(inv)
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, random among equals
    load = np.zeros(k, dtype=np.int64)
    group_fold = np.empty(len(uniq), dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        group_fold[g] = f
        load[f] += sizes[g]
    return group_fold[inv]
