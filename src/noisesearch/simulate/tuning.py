"""Search pruning strategies on training prompts; report them on held-out prompts.

Search space (stated relative to the pool, so it transfers to other models, reward scales and step
counts; nothing in it refers to the FLUX pools):

* a :class:`~noisesearch.pruning.PrunePlan`: 0 to 3 checks (0 = best-of-N, so tuning is
  never forced into pruning that hurts; at most ``num_steps - 1``), check steps anywhere in
  ``[0, num_steps - 2]`` (positions in [0, 1) of the trajectory), keep fractions in (0.03, 1];
  scoring by noise-aware rewards (TTSnap, when the pool has them for every chosen reward; NaN
  entries fall back to base) or base rewards (TTSp); with several rewards, rank-sum or z-sum
  aggregation at the checks;
* the adaptive :class:`~noisesearch.pruning.BudgetAwarePolicy` strategy (a plan per budget)
  built from the finalists.

Procedure (all on the training prompts; each stage uses one fixed set of random subsets for every
plan, so plans are compared on the same draws):

1. *explore*: random plans (uniform number of checks, uniform steps, log-uniform keep fractions)
   plus structured seeds (best-of-N, the paper's schedule mapped to the step count, single checks),
   ``iters_explore`` Monte Carlo iterations each;
2. *refine*: hill climbing from the best few (move a check by one 20-step-sampler step, scale a keep
   fraction by 0.85 / 1.15, drop or add a check, switch scoring or aggregation);
3. *confirm*: the finalists are re-evaluated on fresh subsets with ``iters_confirm`` iterations and
   the best is chosen on that independent estimate (no winner's curse from the search noise). The
   budget-aware table takes, per budget, the finalist with the best confirmed reward (averaged over
   neighbouring budgets); both are then scored on a third set of subsets and the better one is
   ``chosen``.

Objective (:meth:`Evaluator.objective`): the AUC gain over best-of-N, averaged over rewards, with a
penalty (2 x the shortfall) when any reward's gain does not beat that of the anchor plan (the
paper's default schedule, mapped to the pool) by at least one standard error over prompts. With one reward the anchor term
only matters for plans no better than the default; with several it keeps the search from trading
one reward away for the mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.integrate import simpson

from noisesearch.errors import NoiseSearchError
from noisesearch.progress import Progress
from noisesearch.pruning import (
    NO_PRUNING,
    BestOfNPolicy,
    BudgetAwarePolicy,
    CostSpec,
    FixedPolicy,
    Policy,
    PrunePlan,
    PruneSchedule,
    published_schedule,
)
from noisesearch.simulate.engine import Replay, Simulation, draw_subsets, simulate
from noisesearch.simulate.metrics import shifted_area


@dataclass
class TuneConfig:
    explore: int = 150  # random plans
    refine_rounds: int = 5
    refine_width: int = 4  # plans expanded per round
    finalists: int = 8
    iters_explore: int = 20
    iters_confirm: int = 96
    iters_test: int = 200
    seed: int = 0
    max_checks: int = 3
    anchor_penalty: float = 2.0  # see Evaluator.score


@dataclass
class Evaluator:
    """Scores strategies on one prompt set with fixed random subsets (plans cached)."""

    replay: Replay
    cost: CostSpec
    budgets: np.ndarray
    iters: int
    seed: int
    anchor: PrunePlan | None = None
    anchor_penalty: float = 2.0
    cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self.perms = draw_subsets(self.replay.num_candidates, self.iters, self.seed)
        base = simulate(self.replay, [BestOfNPolicy()], self.budgets, self.cost, self.iters, self.seed, perms=self.perms)
        self.baseline = base.methods["best-of-n"]
        # area of best-of-N's shifted curve per reward: the denominator of the AUC gain
        self.baseline_area = np.array([
            shifted_area(self.budgets, self.baseline.curve[:, j], self.baseline.curve[0, j])
            for j in range(len(self.replay.rewards))
        ])
        self.anchor_gains = self.anchor_prompts = None
        if self.anchor is not None:
            res = self._run(FixedPolicy(self.anchor, "anchor"))
            self.anchor_gains = res.gain("anchor")[0]
            self.anchor_prompts = self._prompt_areas(res.methods["anchor"])

    def _run(self, strategy: Policy) -> Simulation:
        res = simulate(self.replay, [strategy], self.budgets, self.cost, self.iters, self.seed,
                       perms=self.perms, add_baseline=False)
        return Simulation(self.budgets, res.rewards, self.cost, self.iters, self.seed,
                          {"best-of-n": self.baseline, strategy.name: res.methods[strategy.name]})

    def _prompt_areas(self, m) -> np.ndarray:
        """Per-prompt shifted areas [P, R], in percent of best-of-N's area (they average to the gain + 100)."""
        shift = self.baseline.curve[0]  # [R]
        return np.stack([
            100.0 * simpson(m.per_prompt[:, :, j] - shift[j], x=self.budgets, axis=-1) / self.baseline_area[j]
            for j in range(len(self.replay.rewards))
        ], axis=-1)

    def vs_anchor_se(self, m) -> np.ndarray | None:
        """Standard error over prompts of the per-reward gain difference to the anchor plan."""
        if self.anchor_prompts is None:
            return None
        d = self._prompt_areas(m) - self.anchor_prompts
        return d.std(0, ddof=1) / np.sqrt(max(d.shape[0], 1)) if d.shape[0] > 1 else np.zeros(d.shape[1])

    def gains(self, strategy: Policy) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(per-reward AUC gains, their Monte Carlo standard errors, the [B, R] curve, objective)."""
        sim = self._run(strategy)
        m = sim.methods[strategy.name]
        g, se = sim.gain(strategy.name)
        return g, se, m.curve, self.objective(g, self.vs_anchor_se(m))

    def objective(self, g: np.ndarray, se_vs_anchor: np.ndarray | None = None) -> float:
        """Mean AUC gain over rewards, minus ``anchor_penalty`` x the worst per-reward shortfall of
        a lower confidence bound against the anchor plan (the paper's default schedule):
        ``mean_r g_r + penalty * min(0, min_r(g_r - anchor_r - se_r))`` where ``se_r`` is the
        standard error over prompts of the difference. With one reward and a plan clearly better
        than the anchor this is the gain; with several it stops the search from buying a higher
        mean by giving up one reward relative to the default, or from relying on a difference the
        training prompts cannot resolve."""
        g = np.asarray(g, float)
        if not np.isfinite(g).all():
            return -np.inf
        score = float(g.mean())
        if self.anchor_gains is not None and np.isfinite(self.anchor_gains).all():
            margin = 0.0 if se_vs_anchor is None else np.asarray(se_vs_anchor, float)
            score += self.anchor_penalty * min(0.0, float((g - self.anchor_gains - margin).min()))
        return score

    def score(self, plan: PrunePlan) -> float:
        """The :meth:`objective` of a plan (cached)."""
        if plan not in self.cache:
            g, se, curve, obj = self.gains(FixedPolicy(plan, "candidate"))
            self.cache[plan] = (obj, g, se, curve)
        return self.cache[plan][0]


def _space(train: Replay, config: TuneConfig) -> dict:
    num_steps = train.num_steps
    return {
        "num_steps": num_steps,
        "max_checks": max(0, min(config.max_checks, num_steps - 1)),
        "noise_aware": [True, False] if all(
            any(train.uses_noise_aware(r, s) for s in range(num_steps - 1)) for r in train.rewards) else [False],
        "aggregate": ["rank", "zsum"] if len(train.rewards) > 1 else ["rank"],
    }


def _random_plan(rng, sp: dict) -> PrunePlan:
    k = int(rng.integers(1, sp["max_checks"] + 1))
    steps = tuple(sorted(rng.choice(sp["num_steps"] - 1, size=k, replace=False).tolist()))
    keep = tuple(float(np.round(np.exp(rng.uniform(np.log(0.1), np.log(0.9))), 2)) for _ in range(k))
    na = sp["noise_aware"][0] if rng.random() < 0.75 else sp["noise_aware"][-1]
    agg = sp["aggregate"][int(rng.integers(len(sp["aggregate"])))]
    return PrunePlan(PruneSchedule(steps, keep), na, agg)


def _seeds(sp: dict, num_rewards: int) -> list[PrunePlan]:
    """Structured starting points: best-of-N, the published schedule (mapped) and single checks."""
    out = [PrunePlan(NO_PRUNING)]
    if sp["max_checks"] < 1:
        return out
    num_steps = sp["num_steps"]
    pub = published_schedule(num_rewards, num_steps)
    if pub.num_checks <= sp["max_checks"]:  # inside the search space
        out += [PrunePlan(pub, na, agg) for na in sp["noise_aware"] for agg in sp["aggregate"]]
    for pos in (0.1, 0.2, 0.3, 0.45):
        for keep in (0.2, 0.35, 0.5):
            out.append(PrunePlan(PruneSchedule.from_fractions([pos], [keep], num_steps), sp["noise_aware"][0]))
    return out


def _neighbours(plan: PrunePlan, sp: dict, rng) -> list[PrunePlan]:
    """Plans one move away: a check moved, a keep fraction scaled, a check dropped or added, the
    scoring or the aggregate switched."""
    num_steps = sp["num_steps"]
    s, a = list(plan.schedule.steps), list(plan.schedule.keep)
    out = []

    def add(steps, keep, na=plan.noise_aware, agg=plan.aggregate):
        try:
            sch = PruneSchedule(tuple(steps), tuple(min(max(round(x, 3), 0.03), 1.0) for x in keep)).validate(num_steps)
        except NoiseSearchError:
            return
        out.append(PrunePlan(sch, na, agg))

    jump = max(1, round(num_steps / 20))  # one step of a 20-step sampler, in this pool's steps
    for i in range(len(s)):
        for d in (-jump, jump):
            add(s[:i] + [s[i] + d] + s[i + 1:], a)
        for f in (0.85, 1.15):
            add(s, a[:i] + [a[i] * f] + a[i + 1:])
        add(s[:i] + s[i + 1:], a[:i] + a[i + 1:])  # drop a check
    if len(s) < sp["max_checks"]:
        free = [x for x in range(num_steps - 1) if x not in s]
        for x in rng.choice(free, size=min(2, len(free)), replace=False):
            steps = sorted(s + [int(x)])
            keep = [a[s.index(y)] if y in s else 0.6 for y in steps]
            add(steps, keep)
    if s:
        for na in sp["noise_aware"]:
            for agg in sp["aggregate"]:
                if (na, agg) != (plan.noise_aware, plan.aggregate):
                    add(s, a, na, agg)
    return out


def budget_aware_from(curves: dict, budgets, baseline_area, window: int = 1) -> BudgetAwarePolicy:
    """Per budget, the plan with the highest (neighbour-averaged) reward.

    ``curves`` maps PrunePlan -> [B, R] curve. Each reward is divided by best-of-N's shifted area, so the
    per-budget choice maximises (up to the quadrature weights) the mean AUC gain over rewards.
    """
    plans = list(curves)
    C = np.stack([curves[p] for p in plans])  # [K, B, R]
    merit = (C / np.maximum(np.asarray(baseline_area, float), 1e-300)).mean(-1)  # [K, B]
    B = merit.shape[1]
    smooth = np.stack([merit[:, max(0, b - window):b + window + 1].mean(1) for b in range(B)], axis=1)
    best = smooth.argmax(0)
    return BudgetAwarePolicy(tuple(float(b) for b in budgets), tuple(plans[i] for i in best))


def tune(train: Replay, test: Replay | None, cost: CostSpec, budgets, config: TuneConfig = TuneConfig(),
         progress: bool = False) -> dict:
    """Search plans on ``train``; report the chosen strategy (and the published schedule) on ``test``.

    Returns a JSON-ready dict; gains are lists with one entry per reward (see ``cli/tune.py`` for
    the user-facing layout).
    """
    sp = _space(train, config)
    rng = np.random.default_rng(config.seed)
    budgets = np.asarray(budgets, float)
    total = config.explore + config.refine_rounds * config.refine_width * 14 + config.finalists + 6
    bar = Progress(total, desc="tune", unit="plan", enabled=progress)  # an estimate: close() completes it
    # the paper's schedule mapped to this pool: the anchor of the objective and the reference of the report
    published = PrunePlan(published_schedule(len(train.rewards), sp["num_steps"]), sp["noise_aware"][0]) \
        if sp["num_steps"] >= 2 else None

    def evaluator(iters, k):
        return Evaluator(train, cost, budgets, iters, config.seed * 7919 + k, published, config.anchor_penalty)

    explore = evaluator(config.iters_explore, 1)
    _explore(explore, sp, rng, config, len(train.rewards), bar.update)
    _refine(explore, sp, rng, config, bar.update)
    finalists = sorted(explore.cache, key=lambda p: -explore.cache[p][0])[: config.finalists]
    confirm = evaluator(config.iters_confirm, 2)
    choice = _confirm(confirm, evaluator(config.iters_confirm, 3), finalists, budgets, bar.update)
    result = {
        "search": _search_report(sp, config, explore, confirm, finalists, published),
        "strategies": {
            "tuned": {**choice.best.as_dict(), "train_auc_gain": _round(choice.fixed_gain)},
            "budget-aware": {**choice.budget_aware.describe(), "train_auc_gain": _round(choice.budget_aware_gain)},
        },
        "chosen": "budget-aware" if choice.adaptive else "tuned",
    }
    if published is not None:
        result["strategies"]["published"] = {**published.as_dict(), "train_auc_gain": _round(choice.anchor_gains)}
    bar.update(1)
    if test is not None:
        _held_out(result, Evaluator(test, cost, budgets, config.iters_test, config.seed * 7919 + 4), choice, published,
                  bar.update)
    bar.close()
    return result


def _explore(explore: Evaluator, sp: dict, rng, config: TuneConfig, num_rewards: int, tick) -> None:
    """Stage 1: the structured seeds plus ``config.explore`` distinct random plans, each scored."""
    todo = list(dict.fromkeys(_seeds(sp, num_rewards)))
    if sp["max_checks"] > 0:
        seen, tries, target = set(todo), 0, len(todo) + config.explore
        while len(todo) < target and tries < 20 * config.explore:
            tries += 1
            p = _random_plan(rng, sp)
            if p not in seen:
                seen.add(p)
                todo.append(p)
    for p in todo:
        explore.score(p)
        tick(1)


def _refine(explore: Evaluator, sp: dict, rng, config: TuneConfig, tick) -> None:
    """Stage 2: hill climbing; each round scores the neighbours of the best plans not yet expanded."""
    expanded = set()
    for _ in range(config.refine_rounds if sp["max_checks"] > 0 else 0):
        ranked = sorted(explore.cache, key=lambda p: -explore.cache[p][0])
        for p in [p for p in ranked if p not in expanded][: config.refine_width]:
            expanded.add(p)
            for nb in _neighbours(p, sp, rng):
                if nb not in explore.cache:
                    explore.score(nb)
                    tick(1)


@dataclass
class _Choice:
    best: PrunePlan  # the finalist with the best confirmed objective
    budget_aware: BudgetAwarePolicy
    fixed_gain: np.ndarray  # per-reward AUC gains on the check draws
    budget_aware_gain: np.ndarray
    adaptive: bool  # the budget-aware strategy beat the fixed plan on the check draws
    anchor_gains: np.ndarray | None

    @property
    def fixed(self) -> FixedPolicy:
        return FixedPolicy(self.best, "tuned")


def _confirm(confirm: Evaluator, check: Evaluator, finalists: list[PrunePlan], budgets, tick) -> _Choice:
    """Stage 3: the finalists on fresh draws; the budget-aware table from them; both candidates
    scored on a third set of draws, the better one chosen."""
    for p in finalists:
        confirm.score(p)
        tick(1)
    best = max(finalists, key=lambda p: confirm.cache[p][0])
    budget_aware = budget_aware_from({p: confirm.cache[p][3] for p in finalists}, budgets, confirm.baseline_area)
    fixed_g, _, _, fixed_obj = check.gains(FixedPolicy(best, "tuned"))
    ba_g, _, _, ba_obj = check.gains(budget_aware)
    tick(2)
    return _Choice(best, budget_aware, fixed_g, ba_g, ba_obj > fixed_obj, check.anchor_gains)


def _search_report(sp: dict, config: TuneConfig, explore: Evaluator, confirm: Evaluator, finalists, published) -> dict:
    return {
        "space": {
            "checks": [0, sp["max_checks"]],
            "steps": [0, sp["num_steps"] - 2],
            "keep": [0.03, 1.0],
            "scoring": ["ttsnap" if na else "ttsp" for na in sp["noise_aware"]],
            "aggregate": sp["aggregate"],
        },
        "evaluated": len(explore.cache),
        "iters_explore": config.iters_explore,
        "iters_confirm": config.iters_confirm,
        "iters_test": config.iters_test,
        "anchor": published.as_dict() if published is not None else None,
        "anchor_penalty": config.anchor_penalty,
        "seed": config.seed,
        "finalists": [
            {**p.as_dict(), "train_auc_gain_explore": _round(explore.cache[p][1]),
             "train_auc_gain_confirm": _round(confirm.cache[p][1])}
            for p in sorted(finalists, key=lambda p: -confirm.cache[p][0])
        ],
    }


def _held_out(result: dict, ev: Evaluator, choice: _Choice, published: PrunePlan | None, tick) -> None:
    """The tuned, budget-aware and published strategies on the held-out prompts, into ``result``."""
    runs = [("tuned", choice.fixed), ("budget-aware", choice.budget_aware)]
    if published is not None:
        runs.append(("published", FixedPolicy(published, "published")))
    for key, strat in runs:
        g, se, curve, _ = ev.gains(strat)
        result["strategies"][key].update(test_auc_gain=_round(g), test_auc_gain_se=_round(se),
                                         test_curve=np.round(curve, 6).T.tolist())
        tick(1)
    result["best_of_n_test_curve"] = np.round(ev.baseline.curve, 6).T.tolist()


def _round(a):
    a = np.atleast_1d(np.asarray(a, float))
    return [round(float(x), 3) if math.isfinite(x) else None for x in a]
