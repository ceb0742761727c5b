"""Vectorised Monte Carlo replay of strategies on a reward pool.

Protocol (the TTSnap authors', see ../shared/data/ttsnap-flux/README.md and docs/simulator.md): for
each budget a strategy starts ``n`` candidates (as many as the budget affords under the cost model);
in each iteration a uniformly random ``n``-subset of the pool's candidates is drawn, the **same
subset for every prompt**; the strategy is applied to every prompt; the chosen candidate's final
reward is averaged over prompts, and that over iterations.

Implementation: iteration ``i`` draws one random permutation of the candidates and every budget and
every strategy uses its first ``n`` entries (a uniform ``n``-subset, so each curve point has the
protocol's distribution; sharing the draws between budgets and strategies, "common random
numbers", only makes the comparisons less noisy). All iterations and prompts of a budget are
processed at once as ``[prompt, iteration, candidate]`` arrays. Per (reward, step) the scores are
replaced once by strict integer ranks over the whole pool (:func:`noisesearch.pruning.order_keys`,
ties to the lower candidate index); a top-k packs each rank with its candidate id into one small
unsigned integer and sorts those (see :meth:`Replay._select`), so every tie is broken exactly as
:func:`noisesearch.pruning.select_top` breaks it in live generation. ``noisesearch bench simulate``
checks the result against a straightforward per-prompt loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.progress import Progress
from noisesearch.pruning import BestOfNPolicy, CostSpec, keep_count, order_keys, zscore_sum
from noisesearch.simulate.metrics import auc_gain_with_se


def argsort_unique(merit: np.ndarray) -> np.ndarray:
    """``argsort`` along the last axis of non-negative integers that are distinct within each row.

    Each value is packed with its position into one unsigned integer (value << bits | position)
    and the packed array is sorted in place, which numpy does several times faster than an
    ``argsort`` (SIMD sorts); with distinct values the order is fully determined.
    """
    m = merit.shape[-1]
    shift = max(1, (m - 1).bit_length())
    top = int(merit.max()) if merit.size else 0
    need = top.bit_length() + shift
    dtype = np.uint16 if need <= 16 else np.uint32 if need <= 32 else np.uint64
    if need > 64:
        return np.argsort(merit, axis=-1, kind="stable")
    packed = merit.astype(dtype) << dtype(shift)
    packed |= np.arange(m, dtype=dtype)
    packed.sort(axis=-1)
    packed &= dtype((1 << shift) - 1)
    return packed.astype(np.intp)


class Replay:
    """Integer rank keys of a pool's scores, built lazily per (reward, step, noise-aware)."""

    def __init__(self, pool, rewards: Sequence[str]):
        self.pool = pool
        self.rewards = [pool.check_reward(r) for r in rewards]
        if not self.rewards:
            raise NoiseSearchError("choose at least one reward")
        P, N, S = pool.shape
        self.num_prompts, self.num_candidates, self.num_steps = P, N, S
        self._keys: dict = {}
        self.final_values = [pool.final(r).astype(np.float64) for r in self.rewards]  # [R][P, N]
        self.final_keys = [self.keys(r, S - 1, False) for r in self.rewards]

    def uses_noise_aware(self, reward: str, step: int) -> bool:
        """Whether the pool has any noise-aware score for ``reward`` at ``step``."""
        k = ("has-na", reward, int(step))
        if k not in self._keys:
            na = self.pool.noise_aware.get(reward)
            self._keys[k] = na is not None and not np.isnan(na[:, :, step]).all()
        return self._keys[k]

    def values(self, reward: str, step: int, noise_aware: bool) -> np.ndarray:
        """Scores [P, N] at ``step``: noise-aware where available, else base (as ``Pool.scores``:
        a prompt with any candidate missing a noise-aware value at this step uses base for all)."""
        na = bool(noise_aware) and self.uses_noise_aware(reward, step)
        k = ("values", reward, int(step), na)
        if k not in self._keys:
            base = self.pool.rewards[reward][:, :, step]
            if na:
                v = self.pool.noise_aware[reward][:, :, step]
                base = np.where(np.isnan(v).any(axis=1, keepdims=True), base, v)
            self._keys[k] = np.ascontiguousarray(base, dtype=np.float32)
        return self._keys[k]

    def keys(self, reward: str, step: int, noise_aware: bool) -> np.ndarray:
        """Strict ranks [P, N] (higher = better, ties to the lower candidate index) of the scores."""
        na = bool(noise_aware) and self.uses_noise_aware(reward, step)
        k = (reward, int(step), na)
        if k not in self._keys:
            dtype = np.int16 if self.num_candidates < 2**15 else np.int32
            self._keys[k] = order_keys(self.values(reward, step, na), axis=1).astype(dtype)
        return self._keys[k]

    # ---- selection on [P, I, m] arrays of candidate ids ------------------------------------------
    def _gather(self, table: np.ndarray, sel: np.ndarray) -> np.ndarray:
        """``table[p, sel[p, i, j]]`` for a [P, N] table and ids ``sel`` [P|1, I, m]."""
        if sel.shape[0] == 1:  # the same ids for every prompt: plain fancy indexing
            return table[:, sel[0]]
        offsets = (np.arange(self.num_prompts) * self.num_candidates).reshape(-1, 1, 1)
        return np.take(table, sel + offsets)  # flat take: faster than take_along_axis

    def _select(self, merit: np.ndarray, sel: np.ndarray, k: int | None, bound: int | None = None) -> np.ndarray:
        """Ids of the ``k`` best of ``sel`` [P|1, I, m] by an integer ``merit`` [P, I, m] (>= 0);
        ties go to the lower candidate id. ``k=None``: the single best, [P, I].

        Each merit is packed with ``N - 1 - id`` into one unsigned integer and the packed array is
        sorted (or maximised): numpy sorts plain integers several times faster than it argsorts,
        the ids come out directly, and the packing breaks ties exactly as ``pruning.select_top``.
        ``bound`` is an upper bound of the merit when known (saves a pass over it).
        """
        N = self.num_candidates
        shift = max(1, (N - 1).bit_length())
        need = int(merit.max() if bound is None else bound).bit_length() + shift
        if need > 64:  # never with rank keys; kept for safety
            raise ValueError("merit too large to pack")
        dtype = np.uint16 if need <= 16 else np.uint32 if need <= 32 else np.uint64
        packed = merit.astype(dtype) << dtype(shift)
        packed |= (N - 1 - sel).astype(dtype)
        mask = dtype((1 << shift) - 1)
        if k is None:
            return (N - 1) - (packed.max(axis=-1) & mask).astype(np.intp)
        packed.sort(axis=-1)
        return (N - 1) - (packed[..., packed.shape[-1] - k:] & mask).astype(np.intp)

    def _merit(self, key_arrays: list[np.ndarray], sel: np.ndarray) -> np.ndarray:
        """Integer merit of each selected candidate (higher = better): one reward, its rank key
        (distinct); several, the sum of the candidates' ranks among ``sel`` per reward (ties are
        broken by :meth:`_select`)."""
        if len(key_arrays) == 1:
            return self._gather(key_arrays[0], sel)
        total = None
        for keys in key_arrays:
            v = self._gather(keys, sel)
            # rank of each candidate among ``sel``: one argsort + scatter
            order = argsort_unique(v)
            r = np.empty(v.shape, dtype=np.int32)
            np.put_along_axis(r, order, np.arange(v.shape[-1], dtype=np.int32).reshape((1,) * (v.ndim - 1) + (-1,)), axis=-1)
            total = r if total is None else total + r
        return total

    def _zsum_keys(self, step: int, noise_aware: bool, sel: np.ndarray) -> np.ndarray:
        """Strict ranks among ``sel`` of the z-score sum (pruning.zscore_sum), ties to the lower
        candidate index."""
        merit = zscore_sum([self._gather(self.values(r, step, noise_aware), sel) for r in self.rewards], axis=-1)
        sel_b = np.broadcast_to(sel, merit.shape)  # float merit: lexsort breaks its ties by index
        order = np.lexsort((-sel_b, merit), axis=-1)  # ascending merit; on ties the higher index first
        keys = np.empty(merit.shape, dtype=np.int32)
        np.put_along_axis(keys, order, np.arange(merit.shape[-1], dtype=np.int32).reshape((1,) * (merit.ndim - 1) + (-1,)), axis=-1)
        return keys

    def prune(self, sel: np.ndarray, step: int, k: int, noise_aware: bool, aggregate: str = "rank") -> np.ndarray:
        """Keep the top ``k`` of ``sel`` [P|1, I, m] by the scores at ``step``; returns [P, I, k]."""
        m = sel.shape[-1]
        if k >= m:
            return np.broadcast_to(sel, (self.num_prompts,) + sel.shape[1:])
        if aggregate == "zsum" and len(self.rewards) > 1:
            merit = self._zsum_keys(step, noise_aware, sel)
        else:
            merit = self._merit([self.keys(r, step, noise_aware) for r in self.rewards], sel)
        return self._select(merit, sel, k, self._bound(m))

    def choose(self, sel: np.ndarray) -> np.ndarray:
        """The final pick among ``sel`` [P|1, I, m] by final reward (rank-sum when several): [P, I]."""
        return self._select(self._merit(self.final_keys, sel), sel, None, self._bound(sel.shape[-1]))

    def _bound(self, m: int) -> int:
        """Largest merit :meth:`_merit` can return for ``m`` candidates (keys < N; rank sums)."""
        return self.num_candidates - 1 if len(self.rewards) == 1 else len(self.rewards) * (m - 1)

    def outcome(self, chosen: np.ndarray) -> np.ndarray:
        """Final reward of the chosen candidates [P, I] per prompt: [P, I, R]."""
        offsets = (np.arange(self.num_prompts) * self.num_candidates).reshape(-1, 1)
        flat = chosen + offsets
        return np.stack([np.take(f, flat) for f in self.final_values], axis=-1)

    def run(self, plan, ids: np.ndarray) -> np.ndarray:
        """Apply a :class:`~noisesearch.pruning.PrunePlan` to the candidate subsets ``ids``
        [I, n] (the same subset for every prompt); returns the chosen final rewards [P, I, R]."""
        sel = ids[None]
        alive = ids.shape[-1]
        for step, frac in zip(plan.schedule.steps, plan.schedule.keep):
            alive = keep_count(alive, frac)
            sel = self.prune(sel, step, alive, plan.noise_aware, plan.aggregate)
        return self.outcome(self.choose(sel))


# -------------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """One strategy's Monte Carlo result over a budget grid."""

    name: str
    label: str
    per_iter: np.ndarray  # [I, B, R] prompt-mean final reward per iteration
    per_prompt: np.ndarray  # [P, B, R] iteration-mean final reward per prompt
    starts: list[int]  # candidates started at each budget
    cost: list[float]  # FLOPs per prompt actually charged at each budget (under the cost model)
    plans: list  # the PrunePlan used at each budget
    capped: list[bool]  # whether the pool's candidate count limited the starts
    info: dict = field(default_factory=dict)

    @property
    def curve(self) -> np.ndarray:
        """[B, R] mean over iterations."""
        return self.per_iter.mean(0)

    @property
    def stderr(self) -> np.ndarray:
        I = self.per_iter.shape[0]
        if I < 2:
            return np.full(self.per_iter.shape[1:], np.nan)
        return self.per_iter.std(0, ddof=1) / np.sqrt(I)


@dataclass
class Simulation:
    budgets: np.ndarray  # FLOPs per prompt
    rewards: list[str]
    cost: CostSpec
    iters: int
    seed: int
    methods: dict[str, MethodResult]
    baseline: str = "best-of-n"

    def gain(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """AUC gain (percent over best-of-N) per reward and its Monte Carlo standard error."""
        m, b = self.methods[name], self.methods[self.baseline]
        out = [auc_gain_with_se(self.budgets, m.per_iter[:, :, j], b.per_iter[:, :, j]) for j in range(len(self.rewards))]
        return np.array([g for g, _ in out]), np.array([s for _, s in out])


def draw_subsets(num_candidates: int, iters: int, seed: int) -> np.ndarray:
    """One random permutation of the candidates per iteration: [I, N] (prefixes are the subsets)."""
    rng = np.random.default_rng(seed)
    return rng.permuted(np.tile(np.arange(num_candidates), (iters, 1)), axis=1)


def check_budgets(budgets, cost: CostSpec) -> np.ndarray:
    b = np.asarray(budgets, dtype=float)
    if b.ndim != 1 or b.size < 2:
        raise NoiseSearchError("give at least two budgets (a curve needs two points)")
    if not np.all(np.isfinite(b)) or np.any(np.diff(b) <= 0):
        raise NoiseSearchError("budgets must be finite and strictly increasing")
    one = cost.best_of_n
    if b[0] < one * (1 - 1e-12):
        raise NoiseSearchError(
            f"budget {b[0] / 1e12:g} TFLOPs is below the cost of one candidate ({one / 1e12:g} TFLOPs: "
            f"{cost.num_steps} steps x {cost.flops_per_step / 1e12:g} + reward): raise the smallest budget"
        )
    return b


def simulate(replay: Replay, strategies, budgets, cost: CostSpec, iters: int = 50, seed: int = 0,
             progress: bool = False, baseline: str = "best-of-n", perms: np.ndarray | None = None,
             add_baseline: bool = True) -> Simulation:
    """Replay ``strategies`` (see :mod:`noisesearch.pruning`) over ``budgets`` (FLOPs per
    prompt). Best-of-N is added as the baseline when absent (unless ``add_baseline`` is False).
    ``perms`` ([I, N] permutations, see :func:`draw_subsets`) fixes the random subsets."""
    if iters < 1:
        raise NoiseSearchError("iterations must be >= 1")
    budgets = check_budgets(budgets, cost)
    strategies = list(strategies)
    if add_baseline and not any(s.name == baseline for s in strategies):
        strategies.insert(0, BestOfNPolicy())
    N = replay.num_candidates
    if perms is None:
        perms = draw_subsets(N, iters, seed)
    elif perms.shape != (iters, N):
        raise ValueError(f"perms must be [iters, candidates] = {(iters, N)}, got {perms.shape}")
    P = replay.num_prompts
    chunk = max(1, int(4_000_000 // max(P * N, 1)))  # iterations per batch, bounds the memory
    results = {}

    bar = Progress(len(strategies) * len(budgets), desc="simulate", unit="budget", enabled=progress)
    for strat in strategies:
        per_iter = np.empty((iters, len(budgets), len(replay.rewards)))
        per_prompt = np.zeros((P, len(budgets), len(replay.rewards)))
        starts, costs, plans, capped = [], [], [], []
        for bi, B in enumerate(budgets):
            plan = strat.plan_for(B)
            schedule = plan.schedule.validate(cost.num_steps)
            n_uncapped = cost.starts(B, schedule)
            n = min(n_uncapped, N)
            if n < 1:
                raise NoiseSearchError(f"budget {B / 1e12:g} TFLOPs affords no candidate for {strat.name}")
            for i0 in range(0, iters, chunk):
                ids = perms[i0:i0 + chunk, :n]
                out = replay.run(plan, ids)  # [P, chunk, R]
                per_iter[i0:i0 + chunk, bi] = out.mean(0)
                per_prompt[:, bi] += out.sum(1) / iters
            starts.append(n)
            costs.append(cost.realised(schedule, n))
            plans.append(plan)
            capped.append(n_uncapped > N)
            bar.update(1)
        results[strat.name] = MethodResult(strat.name, strat.label, per_iter, per_prompt, starts, costs, plans, capped,
                                           info=strat.describe())
    bar.close()
    return Simulation(budgets, list(replay.rewards), cost, iters, seed, results, baseline)
