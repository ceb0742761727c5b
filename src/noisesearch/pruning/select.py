"""Survivor selection: strict ranks (ties to the lower index), top-k, rank sums and z-score sums.

Also the ranking behind the ``ranksum(...)`` reward, so that live pruning, the simulator and
multi-reward scoring break ties the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from noisesearch.errors import NoiseSearchError

#: How several rewards are combined at a check: the authors' rank sum, or the sum of z-scores.
AGGREGATES = ("rank", "zsum")

# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def order_keys(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Strict ranks ``0 .. m-1`` along ``axis`` (higher = better); ties go to the lower index.

    Two candidates never share a key, so selecting by keys is deterministic.
    """
    scores = np.asarray(scores)
    moved = np.moveaxis(scores, axis, -1)
    m = moved.shape[-1]
    # Sort ascending by score; among equal scores put higher indices first (they rank lower).
    # A stable sort of the reversed array does exactly that.
    order = np.argsort(moved[..., ::-1], axis=-1, kind="stable")
    order = m - 1 - order  # positions in the original (non-reversed) array
    keys = np.empty_like(order)
    np.put_along_axis(keys, order, np.arange(m).reshape((1,) * (order.ndim - 1) + (m,)), axis=-1)
    return np.moveaxis(keys, -1, axis)


def select_top(scores: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Indices of the ``k`` best scores along ``axis``, best first; ties go to the lower index."""
    keys = np.moveaxis(order_keys(scores, axis), axis, -1)
    if not 1 <= k <= keys.shape[-1]:
        raise ValueError(f"cannot keep {k} of {keys.shape[-1]} candidates")
    best_first = np.argsort(-keys, axis=-1)[..., :k]
    return np.moveaxis(best_first, -1, axis)


def rank_sum(scores: Sequence[np.ndarray], axis: int = -1) -> np.ndarray:
    """Sum over rewards of each candidate's strict rank among the candidates (higher = better)."""
    total = None
    for s in scores:
        r = order_keys(np.asarray(s), axis).astype(np.int64)
        total = r if total is None else total + r
    if total is None:
        raise ValueError("rank_sum needs at least one score array")
    return total


def select_rank_sum(scores: Sequence[np.ndarray], k: int, axis: int = -1) -> np.ndarray:
    """Indices of the ``k`` candidates with the highest summed rank (ties to the lower index)."""
    return select_top(rank_sum(scores, axis), k, axis)


def zscore_sum(scores: Sequence[np.ndarray], axis: int = -1) -> np.ndarray:
    """Sum over rewards of each candidate's z-score among the candidates along ``axis``.

    Unlike ranks, z-scores keep how far apart candidates are; like ranks they are invariant to
    each reward's scale and offset. A reward with no spread contributes zero. The sum is rounded
    to 9 decimals so that sums equal up to floating-point noise tie exactly (and the tie then goes
    to the lower index, whatever the array layout).
    """
    total = None
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        sd = s.std(axis=axis, keepdims=True)
        z = (s - s.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1.0)
        total = z if total is None else total + z
    if total is None:
        raise ValueError("zscore_sum needs at least one score array")
    return np.round(total, 9)


def combine(scores: Sequence[np.ndarray], aggregate: str = "rank", axis: int = -1) -> np.ndarray:
    """One merit per candidate from one or more rewards' scores (higher = better).

    One reward: its scores. Several: ``rank`` (sum of ranks, the authors' rule) or ``zsum``."""
    scores = list(scores)
    if len(scores) == 1:
        return np.asarray(scores[0])
    if aggregate == "rank":
        return rank_sum(scores, axis)
    if aggregate == "zsum":
        return zscore_sum(scores, axis)
    raise NoiseSearchError(f"unknown aggregate {aggregate!r}; valid: {', '.join(AGGREGATES)}")


def select_survivors(scores: Sequence[np.ndarray], k: int, aggregate: str = "rank", axis: int = -1) -> np.ndarray:
    """Indices of the ``k`` survivors given each reward's scores of the alive candidates.

    The one entry point for live pruning: single reward -> top-k; several -> :func:`combine` then
    top-k; ties to the lower index."""
    return select_top(combine(scores, aggregate, axis), k, axis)


