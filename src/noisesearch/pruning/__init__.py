"""TTSnap / TTSp pruning in one home: schedules, survivor rules and cost models, serving both live
pruning (``noisesearch.search.prune``) and the offline simulator (``noisesearch.simulate``).

* :mod:`.schedule` - ``PruneSchedule``, ``keep_count``, ``published_schedule``;
* :mod:`.select` - strict ranks, top-k, rank / z-score sums;
* :mod:`.costs` - the ``exact`` / ``reference`` compute models, ``pruned_run_counts``, ``CostSpec``;
* :mod:`.policies` - the plans the simulator replays (``PrunePlan``, ``BestOfNPolicy``,
  ``FixedPolicy``, ``BudgetAwarePolicy``).

The rules:

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

from noisesearch.pruning.costs import (
    COST_MODELS,
    CostSpec,
    best_of_n_cost,
    cost_per_start,
    pruned_run_counts,
    realised_cost,
    starts_for_budget,
)
from noisesearch.pruning.policies import NO_PRUNING, BestOfNPolicy, BudgetAwarePolicy, FixedPolicy, Policy, PrunePlan
from noisesearch.pruning.schedule import PruneSchedule, keep_count, published_schedule
from noisesearch.pruning.select import (
    AGGREGATES,
    combine,
    order_keys,
    rank_sum,
    select_rank_sum,
    select_survivors,
    select_top,
    zscore_sum,
)

__all__ = [
    "PruneSchedule", "keep_count", "published_schedule", "AGGREGATES", "combine", "order_keys", "rank_sum",
    "select_rank_sum", "select_survivors", "select_top", "zscore_sum", "COST_MODELS", "CostSpec", "best_of_n_cost",
    "cost_per_start", "pruned_run_counts", "realised_cost", "starts_for_budget", "NO_PRUNING", "BestOfNPolicy",
    "BudgetAwarePolicy", "FixedPolicy", "Policy", "PrunePlan",
]
