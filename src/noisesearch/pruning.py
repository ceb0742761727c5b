"""Pruning schedules (TTSnap / TTSp): which candidates survive each check, and what they cost.

One set of rules, shared by the offline simulator (``noisesearch.simulate``) and live generation:

* A :class:`PruneSchedule` lists check steps ``s_1 < ... < s_k`` (indices into the denoising steps,
  ``0 <= s_i <= num_steps - 2``; step ``num_steps - 1`` is the finished image) and keep fractions
  ``a_1 .. a_k`` in (0, 1]. At check ``i`` every alive candidate's Tweedie (x0) estimate at step
  ``s_i`` is scored and the top :func:`keep_count` ``(alive, a_i)`` survive. After the last check the
  survivors are denoised to the end and the best finished image is returned.
* :func:`keep_count` is ``max(1, round(a * alive))`` with Python's ``round`` (halves to even), the
  authors' rounding: it reproduces their published numbers where ``floor`` does not (see
  docs/simulator.md).
* Ties are broken deterministically: **the lower candidate index wins** (in live generation the
  index is the position in the batch; in the simulator it is the candidate's index in the pool).
  :func:`order_keys` turns scores into strict ranks that encode this rule; :func:`select_top` and
  :func:`select_rank_sum` build on it.
* Multi-reward: candidates are ranked per reward among the alive ones, the ranks summed, and the
  top by summed rank kept (ties again to the lower index); the authors' rule. ``aggregate="zsum"``
  sums per-reward z-scores among the alive candidates instead (see :func:`zscore_sum`). The final
  pick among the survivors always uses the rank sum of the final rewards, as best-of-N does.

Compute accounting (FLOPs per prompt), two models:

``reference`` (the authors' notebook; reproduces their figures)
    best-of-N costs ``S * c + r`` per image. A pruned run costs per *starting* candidate
    ``sum_i f_{i-1} * ((s_i - s_{i-1}) * c + r) + f_k * ((S - 1 - s_k) * c + r)`` with ``s_0 = 0``,
    ``f_0 = 1`` and ``f_i = a_1 * ... * a_i`` (fractional alive share). A never-pruned trajectory is
    thereby charged ``S - 1`` steps instead of ``S`` (the estimate at step index ``s`` needs ``s + 1``
    steps), and one reward evaluation is charged per check however many reward models are used.
    The number of starts a budget ``B`` buys is ``int(B / cost_per_start)``.
``exact`` (default)
    integer survivor counts ``n_0 = n``, ``n_i = keep_count(n_{i-1}, a_i)``; a candidate pruned at
    check ``i`` has paid ``s_i + 1`` denoising steps, survivors pay all ``S``; every reward call is
    paid, each reward model at its own cost ``r = sum_j r_j``:
    ``cost(n) = S_1 * c * n + sum_{i=1..k} [n_i < n_{i-1}] * n_{i-1} * r + sum_{i=1..k} n_i * (s_{i+1} - s_i) * c
    + n_k * r`` with ``S_1 = s_1 + 1`` and ``s_{k+1} = S - 1``. A check that would keep every alive
    candidate (``n_i = n_{i-1}``, e.g. one candidate left) prunes nothing, so it is skipped and
    costs no reward call; live generation must skip it too. Without skipped checks this is
    ``n * ((s_1 + 1) * c + r) + sum_i n_i * ((s_{i+1} - s_i) * c + r)``, and one candidate costs
    exactly one best-of-N candidate. The number of starts is the largest ``n`` with
    ``cost(n) <= B``, so the realised total never exceeds the budget (``cost`` is non-decreasing in
    ``n`` because every ``n_i`` is and checks only switch from skipped to active as ``n`` grows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from noisesearch.errors import NoiseSearchError

COST_MODELS = ("exact", "reference")
#: How several rewards are combined at a check: the authors' rank sum, or the sum of z-scores.
AGGREGATES = ("rank", "zsum")


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneSchedule:
    """Check steps (strictly increasing, >= 0) and the fraction of alive candidates kept at each.

    An empty schedule means no pruning (best-of-N).
    """

    steps: tuple[int, ...]
    keep: tuple[float, ...]

    def __post_init__(self):
        steps = tuple(int(s) for s in self.steps)
        keep = tuple(float(a) for a in self.keep)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "keep", keep)
        if len(steps) != len(keep):
            raise NoiseSearchError(
                f"a pruning schedule needs one keep fraction per check step: got {len(steps)} steps "
                f"and {len(keep)} keep fractions"
            )
        if any(s < 0 for s in steps):
            raise NoiseSearchError(f"check steps must be >= 0, got {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise NoiseSearchError(f"check steps must be strictly increasing, got {list(steps)}")
        if any(not (0.0 < a <= 1.0) for a in keep):
            raise NoiseSearchError(f"keep fractions must be in (0, 1], got {list(keep)}")

    def validate(self, num_steps: int) -> "PruneSchedule":
        """Check the steps fit a sampler of ``num_steps`` steps (the last check <= num_steps - 2)."""
        if self.steps and self.steps[-1] > num_steps - 2:
            raise NoiseSearchError(
                f"check step {self.steps[-1]} is out of range for {num_steps} denoising steps: "
                f"checks must lie in [0, {num_steps - 2}] (step {num_steps - 1} is the final image)"
            )
        return self

    @property
    def num_checks(self) -> int:
        return len(self.steps)

    @classmethod
    def parse(cls, steps: str, keep: str) -> "PruneSchedule":
        """From CLI strings such as ``"2,6,11"`` and ``"0.4,0.4,0.5"``."""
        try:
            s = tuple(int(x) for x in steps.split(",") if x.strip()) if steps else ()
            k = tuple(float(x) for x in keep.split(",") if x.strip()) if keep else ()
        except ValueError:
            raise NoiseSearchError(f"cannot parse schedule steps {steps!r} / keep {keep!r}: use e.g. 2,6,11 and 0.4,0.4,0.5")
        return cls(s, k)

    @classmethod
    def from_fractions(cls, positions: Sequence[float], keep: Sequence[float], num_steps: int) -> "PruneSchedule":
        """Build a schedule from check positions given as fractions of the trajectory.

        ``position`` p in [0, 1) maps to step ``round(p * (num_steps - 1))``, clipped to
        ``[0, num_steps - 2]``; duplicates after rounding are merged (keeping the product of their
        keep fractions), so the result is always valid for ``num_steps``.
        """
        last = max(num_steps - 2, 0)
        merged: dict[int, float] = {}
        for p, a in sorted(zip(positions, keep)):
            s = int(min(max(round(float(p) * (num_steps - 1)), 0), last))
            merged[s] = merged.get(s, 1.0) * float(a)
        steps = tuple(sorted(merged))
        return cls(steps, tuple(merged[s] for s in steps)).validate(num_steps)

    def survivors(self, n: int) -> list[int]:
        """Integer alive counts ``[n_0 = n, n_1, ..., n_k]`` after each check."""
        counts = [int(n)]
        for a in self.keep:
            counts.append(keep_count(counts[-1], a))
        return counts

    def active_checks(self, n: int) -> list[bool]:
        """Per check, whether it prunes anyone when ``n`` candidates start. A check that would keep
        every alive candidate is skipped (no reward call) under the exact cost model."""
        counts = self.survivors(n)
        return [b < a for a, b in zip(counts, counts[1:])]

    def as_dict(self) -> dict:
        return {"steps": list(self.steps), "keep": [round(a, 6) for a in self.keep]}

    def __str__(self) -> str:
        if not self.steps:
            return "no pruning"
        return "steps " + ",".join(map(str, self.steps)) + "; keep " + ",".join(f"{a:g}" for a in self.keep)


def keep_count(alive: int, frac: float) -> int:
    """Number of candidates kept out of ``alive``: ``max(1, round(frac * alive))`` (Python round)."""
    if alive <= 0:
        return 0
    return max(1, int(round(frac * alive)))


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


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------
def _reward_cost(flops_per_reward, model: str) -> float:
    """FLOPs charged for one "reward evaluation" of one image under a cost model.

    ``exact``: every reward model is paid (sum). ``reference``: the authors charge one evaluation
    whatever the number of reward models; we use the mean of their costs (1.2 TFLOPs for FLUX).
    """
    costs = np.atleast_1d(np.asarray(flops_per_reward, dtype=float))
    if costs.size == 0 or np.any(costs < 0):
        raise NoiseSearchError("reward costs must be given and non-negative")
    return float(costs.sum() if model == "exact" else costs.mean())


def _check_model(model: str) -> None:
    if model not in COST_MODELS:
        raise NoiseSearchError(f"unknown cost model {model!r}; valid cost models: {', '.join(COST_MODELS)}")


def best_of_n_cost(num_steps: int, flops_per_step: float, flops_per_reward, model: str = "exact") -> float:
    """FLOPs of one best-of-N candidate: all steps plus one reward call (same in both models)."""
    _check_model(model)
    return num_steps * float(flops_per_step) + _reward_cost(flops_per_reward, model)


def cost_per_start(schedule: PruneSchedule, num_steps: int, flops_per_step: float, flops_per_reward,
                   model: str = "exact") -> float:
    """Expected FLOPs per starting candidate with fractional alive shares ``f_i = a_1 ... a_i``.

    ``reference`` is the authors' formula (first stage ``s_1`` steps); ``exact`` charges ``s_1 + 1``
    (so a survivor pays all ``num_steps``) and every reward model. With no checks this is the
    best-of-N cost under both models.
    """
    _check_model(model)
    schedule.validate(num_steps)
    c, r = float(flops_per_step), _reward_cost(flops_per_reward, model)
    if not schedule.steps:
        return best_of_n_cost(num_steps, c, flops_per_reward, model)
    first = 1 if model == "exact" else 0
    cost, alive, last = 0.0, 1.0, 0
    for i, (s, a) in enumerate(zip(schedule.steps, schedule.keep)):
        cost += alive * ((s - last + (first if i == 0 else 0)) * c + r)
        alive *= a
        last = s
    cost += alive * ((num_steps - 1 - last) * c + r)
    return cost


def realised_cost(schedule: PruneSchedule, n: int, num_steps: int, flops_per_step: float, flops_per_reward,
                  model: str = "exact") -> float:
    """FLOPs actually spent on one prompt when ``n`` candidates start.

    ``exact``: integer survivor counts (what live generation pays). ``reference``: the authors'
    accounting, ``n * cost_per_start`` (what their budget axis assumes).
    """
    _check_model(model)
    if model == "reference":
        return n * cost_per_start(schedule, num_steps, flops_per_step, flops_per_reward, model)
    schedule.validate(num_steps)
    c, r = float(flops_per_step), _reward_cost(flops_per_reward, model)
    if not schedule.steps:
        return n * (num_steps * c + r)
    counts = schedule.survivors(n)
    bounds = list(schedule.steps) + [num_steps - 1]
    total = n * (schedule.steps[0] + 1) * c
    for i in range(len(schedule.steps)):
        if counts[i + 1] < counts[i]:  # a check that would keep everyone is skipped: no reward call
            # (see PruneSchedule.active_checks)
            total += counts[i] * r
        total += counts[i + 1] * (bounds[i + 1] - bounds[i]) * c
    return total + counts[-1] * r  # the final reward of every survivor


def starts_for_budget(budget: float, schedule: PruneSchedule, num_steps: int, flops_per_step: float,
                      flops_per_reward, model: str = "exact", max_starts: int | None = None) -> int:
    """How many candidates a per-prompt ``budget`` (FLOPs) lets a run start.

    ``reference``: ``int(budget / cost_per_start)`` as the authors do (the realised cost can then
    exceed the budget slightly because survivor counts are rounded). ``exact``: the largest ``n``
    whose :func:`realised_cost` is within the budget, so it never overshoots. ``max_starts`` caps
    the result (e.g. at the pool size). May return 0 when the budget buys nothing.
    """
    _check_model(model)
    per = cost_per_start(schedule, num_steps, flops_per_step, flops_per_reward, model)
    if per <= 0:
        raise NoiseSearchError("cost per candidate is zero: give positive FLOPs per step / per reward")
    guess = int(budget / per)  # the authors' rule, kept exactly for the reference model
    if model == "exact":
        def fits(m):
            return realised_cost(schedule, m, num_steps, flops_per_step, flops_per_reward, model) <= budget * (1 + 1e-12)
        n = max(guess, 0)
        while n > 0 and not fits(n):
            n -= 1
        while fits(n + 1) and (max_starts is None or n < max_starts):
            n += 1
        guess = n
    if max_starts is not None:
        guess = min(guess, int(max_starts))
    return max(guess, 0)
