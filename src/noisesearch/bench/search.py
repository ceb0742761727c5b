"""Noise-trajectory search at equal compute on ``digits-uncond``.

For every budget (NFEs per output sample) and every strategy, one problem holds
``10 targets x --seeds`` independent searches (all batched), sampled with 18 Euler-ancestral steps
from the unconditional digits model and rewarded by ``log p(target | image)`` (reward ``digit``).
Reported per cell: mean reward, accuracy by the optimised classifier and by the independent judge,
diversity (mean pairwise L2 distance between the images of the same target, pixels in [0, 1]),
wall seconds of the search, and the overhead ratio: CPU time of the search divided by "NFEs x the
time of one denoiser call at the batch size the strategy uses", measured three ways:

* **paired** (the headline): right after every denoiser call of the run, the same call is made once
  more on its own and timed; the denominator is the sum of those times, and the paired calls are
  taken out of the numerator. Numerator and denominator come from the same moments, so the ratio
  does not drift with the speed of a shared machine (``--no-paired-timing`` skips it);
* **in-run**: the time of the denoiser calls inside the run itself;
* **timed after**: ``t(b)``, the median time of a call on ``b`` rows measured after each cell,
  summed over the calls; on a shared VM this drifts by up to 2x within a minute
  (``noisesearch bench call_timing``), so it is reported but not read.

Everything else (reward calls, candidate bookkeeping, Python) counts as overhead.

    noisesearch bench search                                    # the full run (outputs in runs/bench-search)
    noisesearch bench search --budgets 72,360 --seeds 2 --strategies eps-greedy,best-of-n --out /tmp/b
    .venv/bin/noisesearch bench search --out docs                       # the same, writing the tables in docs/

Outputs in ``--out``: ``search_results.json`` (every cell), ``search_results.md`` (tables),
``search_reward_vs_nfe.png`` (plus ``search_other_rewards.png`` for brightness / compressibility),
``search_samples.png`` (the first search per target of every configuration at the largest budget,
each row labelled with what it spent and its judge accuracy) and ``search_config.yaml``;
with ``--budget-kind flops`` (budgets in FLOPs, network and reward together, given in
NFE-equivalents) the prefix is ``search_flops``. Overheads are measured in CPU time (see ``CLOCK``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from noisesearch.build import as_denoiser, as_reward, build_problem
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.figures import save_labelled_grid
from noisesearch.io import atomic_save_figure, atomic_write_text
from noisesearch.models.digits import parse_digits
from noisesearch.progress import Progress
from noisesearch.rewards.digit import load_classifier, load_judge
from noisesearch.search import make_strategy
from noisesearch.validate import check_memory, int_in, int_list, output_dir, positive_int

TRAJ = 18  # NFEs of one 18-step Euler-ancestral trajectory on digits
# Overheads are measured in CPU time of this process (one torch thread): on a CPU shared with other
# jobs, wall time also counts the time other processes took; on an idle machine the two agree.
CLOCK = time.process_time


# ---- strategy configurations: name -> (strategy, options(budget)) -----------------------------------
def _n(budget: int, cap: int = 4) -> int:
    """Candidates per decision: the paper's 4, fewer when the budget cannot afford 4 per step."""
    return max(1, min(cap, budget // TRAJ))


CONFIGS = {
    "naive": ("naive", lambda b: {}),
    "best-of-n": ("best-of-n", lambda b: {}),
    # candidates per decision and scored decisions chosen by the sizer (4 and every one when affordable)
    "eps-greedy": ("eps-greedy", lambda b: {}),
    "eps-greedy-elitist": ("eps-greedy", lambda b: {"elitist": True}),
    "eps-greedy-window": ("eps-greedy", lambda b: {"sigma_window": (0.01, 1.0)}),
    "zero-order": ("zero-order", lambda b: {}),
    "beam": ("beam", lambda b: {}),
    "greedy": ("beam", lambda b: {"beams": 1, "n_candidates": max(1, b // TRAJ)}),
    "mcts": ("mcts", lambda b: {"n_candidates": 4}),
    # lambda must match the reward's spread: 10 for log-probabilities, 300 for rewards in [0, 1]
    "smc": ("smc", lambda b, reward="digit": {} if reward in ("digit", "judge") else {"potential_scale": 300.0}),
}
# extra configurations, not in the default sweep (--strategies eps-greedy,eps-greedy-init)
EXTRA_CONFIGS = {
    "eps-greedy-init": ("eps-greedy", lambda b: {"search_init": True}),
    # the newest methods and auto (issue 19), every knob left to the sizer
    "evo": ("evo", lambda b: {}),
    "evo-first2": ("evo", lambda b: {"first_population": 2.0}),  # a generation 0 twice as large
    "evo-first4": ("evo", lambda b: {"first_population": 4.0}),
    "rbf": ("rbf", lambda b: {}),
    "dts": ("dts", lambda b: {}),
    "auto": ("auto", lambda b: {}),
    # MCTS as published (raw rewards in UCT, the last move's terminal node returned), and each change alone
    "mcts-paper": ("mcts", lambda b: {"n_candidates": 4, "normalize": False, "return_best": False}),
    "mcts-normalized": ("mcts", lambda b: {"n_candidates": 4, "normalize": True, "return_best": False}),
    "mcts-best": ("mcts", lambda b: {"n_candidates": 4, "normalize": False, "return_best": True}),
}
DEFAULT_STRATEGIES = list(CONFIGS)
CONFIGS.update(EXTRA_CONFIGS)
OTHER_REWARD_STRATEGIES = ["naive", "best-of-n", "eps-greedy", "eps-greedy-elitist", "beam", "greedy", "smc"]


def fitted(strategy: str, info: dict, params: dict) -> str:
    """Short description of the size a strategy chose (the hyperparameters fitted to the budget)."""
    if strategy == "best-of-n":
        return f"n={info['candidates']}"
    if strategy in ("eps-greedy", "zero-order"):
        ks = info["iterations_per_step"]
        kk = sorted(set(ks))
        k = f"K={kk[0]}" if len(kk) == 1 else f"K={'/'.join(map(str, kk))} (sum {sum(ks)})"
        extra = " elitist" if params.get("elitist") else ""
        extra += " window" if params.get("sigma_window") else ""
        return f"N={info['n_candidates']} {k} eps={params['eps']:g} lam={params['radius']:g}{extra}"
    if strategy == "beam":
        extra = info.get("extra_candidates", 0)
        return f"B={info['beams']} N={info['n_candidates']}" + (f" +{extra}" if extra else "")
    if strategy == "mcts":
        ss = info["simulations_per_step"]
        return f"N={info['n_candidates']} S={min(ss)}..{max(ss)} (sum {sum(ss)}) c={params['c_uct']:g}"
    if strategy == "smc":
        return f"K={info['particles']} {params['potential']} lam={params['potential_scale']:g}"
    if strategy == "evo":
        return f"G={info['generations']} n={'/'.join(map(str, info['population_schedule']))}"
    return "-"


# ---- timing ------------------------------------------------------------------------------------------
class CallTimer:
    """t(b): time of one denoiser call on b rows, measured right after each cell (the CPU may be
    shared: measuring next to the run keeps numerator and denominator under the same load). Returns
    the median of every measurement of that size so far (``reps`` per cell), so that one disturbed
    measurement does not swing a cell's ratio."""

    def __init__(self, denoiser, reps: int = 5, max_sizes: int = 12):
        self.den, self.reps, self.max_sizes = denoiser, reps, max_sizes
        self.log: dict[int, list[float]] = {}  # every measurement, for the report

    def time(self, b: int) -> float:
        x = torch.randn(b, *self.den.sample_shape)
        sigma = torch.rand(b) * 5 + 0.01
        with torch.no_grad():
            self.den(x, sigma, None)  # warm-up
            times = []
            for _ in range(self.reps):
                t0 = CLOCK()
                self.den(x, sigma, None)
                times.append(CLOCK() - t0)
        self.log.setdefault(b, []).extend(times)
        SEEN_BATCHES.add(b)
        return statistics.median(self.log[b])

    def expected(self, calls: list[int], max_batch: int) -> float:
        """Sum over calls of t(rows), chunked like ``Sampler.denoise``."""
        counts: dict[int, int] = {}
        for rows in calls:
            full, rest = divmod(rows, max_batch)
            if full:
                counts[max_batch] = counts.get(max_batch, 0) + full
            if rest:
                counts[rest] = counts.get(rest, 0) + 1
        sizes = sorted(counts)
        if len(sizes) <= self.max_sizes:
            measured = {b: self.time(b) for b in sizes}
            return sum(n * measured[b] for b, n in counts.items())
        # many distinct sizes (MCTS): measure a grid, interpolate linearly in b
        idx = sorted({round(i * (len(sizes) - 1) / (self.max_sizes - 1)) for i in range(self.max_sizes)})
        grid = [sizes[i] for i in idx]
        tg = [self.time(b) for b in grid]

        def interp(b: int) -> float:
            for (b0, t0), (b1, t1) in zip(zip(grid, tg), zip(grid[1:], tg[1:])):
                if b0 <= b <= b1:
                    return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
            return tg[-1]

        return sum(n * interp(b) for b, n in counts.items())


class PairedTimer:
    """Times the calls of ``fn`` (``seconds``). ``paired=True``: right after every call, the same
    call is made once more on its own and timed (``paired_seconds``); its output is discarded and
    its time (with the bookkeeping around it, ``shadow_seconds``) is taken out of the run's CPU time."""

    def __init__(self, fn, paired: bool = False):
        self._fn, self.paired = fn, paired
        self.seconds = self.paired_seconds = self.shadow_seconds = 0.0
        self.last = (0.0, 0.0)  # the last call's (in-run, paired) seconds

    def __call__(self, *args):
        t0 = CLOCK()
        out = self._fn(*args)
        t1 = CLOCK()
        self.seconds += t1 - t0
        self.last = (t1 - t0, 0.0)
        if self.paired:
            self._fn(*args)
            t2 = CLOCK()
            self.paired_seconds += t2 - t1
            self.shadow_seconds += CLOCK() - t1
            self.last = (t1 - t0, t2 - t1)
        return out


SEEN_BATCHES: set[int] = set()  # the batch sizes this process has called the denoiser with


class TimedDenoiser(PairedTimer):
    """The denoiser with its calls timed (``seconds``: the in-run denoiser time).

    ``paired=True``: each call (same rows, sigma and condition) is made twice (:class:`PairedTimer`).
    The sum of the paired times is "NFEs x the time of one denoiser call at the batch size the
    strategy uses", measured at the same moment as the work it is compared with, so it does not
    drift with the machine's speed the way a timing taken before or after the run does. (The
    paired call finds the network's weights in cache, and at a batch size new to the process the
    kernels oneDNN built for it: if anything it is faster than the call inside the run, which makes
    the ratio conservative; ``first_shape_seconds`` measures the second part.)"""

    def __init__(self, fn, paired: bool = False):
        super().__init__(fn, paired)
        self.new_shapes, self.first_shape_seconds = 0, 0.0

    def __call__(self, x, *args):
        """Also counts the calls at a batch size new to the process (``new_shapes``): torch's CPU
        convolutions build their kernels for it, which the paired call then finds ready
        (``tools/shape_cost.py``). ``first_shape_seconds``: what those calls took beyond their paired call."""
        new = x.shape[0] not in SEEN_BATCHES
        out = super().__call__(x, *args)
        SEEN_BATCHES.add(x.shape[0])
        if new:
            self.new_shapes += 1
            if self.paired:
                self.first_shape_seconds += self.last[0] - self.last[1]
        return out

    def __getattr__(self, name):
        return getattr(self._fn, name)


class TimedReward(PairedTimer):
    """The reward with its calls timed (``seconds``), paired like the denoiser's (:class:`PairedTimer`)."""

    def __init__(self, reward, paired: bool = False):
        super().__init__(reward, paired)
        self.reward, self.name, self.flops_per_image = reward, reward.name, reward.flops_per_image


# ---- one cell ----------------------------------------------------------------------------------------
def run_cell(den, reward, classifier, judge, timer, label: str, budget: int, seeds: int, seed: int, max_batch: int, kind: str = "nfe",
             paired: bool = True, samples: dict | None = None) -> dict:
    """One strategy at one budget. ``kind="flops"``: the budget is ``budget`` NFE-equivalents of
    FLOPs (``budget * flops_per_call``), network and reward FLOPs together. ``samples``: a dict that
    receives the first search's image per target under ``(label, budget)``."""
    strategy_name, options = CONFIGS[label]
    opts = _options(options, den, reward, budget, kind)
    tden, timed = TimedDenoiser(den, paired=paired), TimedReward(reward, paired=paired)
    limits = {"budget_flops": budget * den.flops_per_call} if kind == "flops" else {"budget_nfe": budget}
    problem = build_problem(tden, timed, [str(d) for d in range(10)], num_samples=seeds, steps=TRAJ,
                            sampler="euler-ancestral", seed=seed, max_batch=max_batch, **limits)
    calls: list[int] = []
    problem.sampler.on_call = calls.append
    strat = make_strategy(strategy_name, **opts)
    cell = {"label": label, "strategy": strategy_name, "budget": budget, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}
    t0, c0 = time.perf_counter(), CLOCK()
    try:
        with torch.no_grad():
            result = strat.search(problem)
    except BudgetError as e:
        cell.update(status="n/a", reason=str(e))
        return cell
    wall, cpu = time.perf_counter() - t0, CLOCK() - c0
    shadow = tden.shadow_seconds + timed.shadow_seconds  # the paired calls are not the strategy's
    wall, cpu = wall - shadow, cpu - shadow
    images = den.decode(result.x0).float().cpu()
    if samples is not None:
        samples[(label, budget)] = images.view(10, seeds, *images.shape[1:])[:, 0]
    info = {k: v for k, v in result.info.items() if k != "all_rewards"}
    cell.update(status="ok", fitted=fitted(strategy_name, info, strat.params()),
                reward_mean=float(result.rewards.mean()),
                reward_sem=float(result.rewards.std() / math.sqrt(len(problem.prompts))),
                **_quality(images, problem.prompts, classifier, judge),
                **_overheads(wall, cpu, timed, tden, timer.expected(calls, max_batch), paired),
                **_spend(problem.budget, den.flops_per_call, calls, len(problem.prompts)),
                info=info, params=strat.params())
    return cell


def _options(options, den, reward, budget: int, kind: str) -> dict:
    """The strategy's options at this budget (sized by the NFEs it buys when every NFE is scored, for FLOP budgets)."""
    size_budget = budget
    if kind == "flops":
        size_budget = int(budget * den.flops_per_call / (den.flops_per_call + reward.flops_per_image))
    try:
        return options(size_budget, reward=reward.name)
    except TypeError:
        return options(size_budget)


def _quality(images: torch.Tensor, prompts, classifier, judge) -> dict:
    """Accuracy by the optimised classifier and the independent judge; diversity within a target."""
    targets = parse_digits(prompts)
    with torch.no_grad():
        cls, _ = classifier.predict(images)
        jcls, _ = judge.predict(images)
    div = []
    for d in range(10):
        flat = images[targets == d].flatten(1)
        if flat.shape[0] > 1:
            div.append(float(torch.pdist(flat).mean()))
    return {"classifier_accuracy": float((cls == targets).float().mean()),
            "judge_accuracy": float((jcls == targets).float().mean()),
            "diversity": sum(div) / len(div) if div else float("nan")}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _overheads(wall: float, cpu: float, timed: TimedReward, tden: TimedDenoiser, expected: float, paired: bool) -> dict:
    """CPU and wall time of the search against its denoiser time, measured the three ways; with
    paired timing also against its denoiser and reward time together (``..._paired_compute``: the
    search's own bookkeeping, reward calls counted as compute, as a FLOP budget counts them). A ratio
    over a time that was not measured (0: no paired timing) is NaN (``_ratio``)."""
    reward_seconds = timed.seconds
    compute = tden.paired_seconds + timed.paired_seconds
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "reward_cpu_seconds": reward_seconds,
        "denoiser_cpu_seconds_expected": expected,
        "overhead_ratio": _ratio(cpu, expected),
        "overhead_ratio_wall": _ratio(wall, expected),
        "denoiser_cpu_seconds_in_run": tden.seconds,
        "overhead_ratio_in_run": _ratio(cpu, tden.seconds),
        "overhead_ratio_without_reward": _ratio(cpu - reward_seconds, tden.seconds),
        "denoiser_cpu_seconds_paired": tden.paired_seconds if paired else None,
        "overhead_ratio_paired": _ratio(cpu, tden.paired_seconds),
        "reward_cpu_seconds_paired": timed.paired_seconds if paired else None,
        "overhead_ratio_paired_compute": _ratio(cpu, compute),
        # the calls at batch sizes new to the process, and the paired ratio without what they took
        # beyond their paired call (oneDNN building its kernels for the size: a one-time cost per process)
        "new_batch_shapes": tden.new_shapes,
        "first_shape_seconds": tden.first_shape_seconds if paired else None,
        "overhead_ratio_paired_warm": _ratio(cpu - tden.first_shape_seconds, tden.paired_seconds),
    }


def _spend(b, flops_per_call: float, calls: list[int], num_prompts: int) -> dict:
    """What the search spent (from its budget's meters) and how it batched its calls."""
    nfe = int(b.nfe.sum())
    return {
        "nfe_max": int(b.nfe.max()),
        "flops_max": float(b.flops.max()),
        "flops_mean_in_nfe": float(b.flops.mean()) / flops_per_call,
        "nfe_mean": nfe / num_prompts,
        "reward_calls_mean": float(b.reward_calls.double().mean()),
        "calls": len(calls),
        "rows_per_call": nfe / max(1, len(calls)),
    }


# ---- outputs -----------------------------------------------------------------------------------------
def table(cells: list[dict], reward: str) -> str:
    rows = [
        f"| strategy | budget/sample | fitted hyperparameters | mean {reward} | classifier acc | judge acc | diversity | wall s | overhead: paired (in-run, timed after, wall) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if c["status"] != "ok":
            rows.append(f"| {c['label']} | {c['budget']} | n/a: below the minimum | | | | | | |")
            continue
        rows.append(
            f"| {c['label']} | {c['budget']} | {c['fitted']} | {c['reward_mean']:.3f} ± {c['reward_sem']:.3f} | "
            f"{c['classifier_accuracy']:.3f} | {c['judge_accuracy']:.3f} | {c['diversity']:.3f} | {c['wall_seconds']:.1f} | {c.get('overhead_ratio_paired', float('nan')):.2f} ({c['overhead_ratio_in_run']:.2f}, {c['overhead_ratio']:.2f}, {c['overhead_ratio_wall']:.2f}) |"
        )
    return "\n".join(rows)


def pivot(cells: list[dict], key: str, fmt: str, budgets: list[int], labels: list[str]) -> str:
    head = "| strategy | " + " | ".join(str(b) for b in budgets) + " |"
    rows = [head, "|---|" + "---:|" * len(budgets)]
    by = {(c["label"], c["budget"]): c for c in cells}
    for label in labels:
        vals = []
        for b in budgets:
            c = by.get((label, b))
            vals.append(format(c.get(key, float("nan")), fmt) if c and c["status"] == "ok" else "n/a")
        rows.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def plot(groups: dict[str, list[dict]], path: Path, keys: list[tuple[str, str]], ncols: int = 3) -> None:
    import matplotlib  # deferred: heavy, plots only (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy, plots only (matplotlib)

    panels = [(reward, key, title) for reward in groups for key, title in keys]
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (reward, key, title) in zip(axes.flat, panels):
        cells = groups[reward]
        # a log-probability reward saturates at 0: plot -reward on a log axis to keep differences visible
        neg = key == "reward_mean" and reward in ("digit", "judge")
        drawn = False
        for label in dict.fromkeys(c["label"] for c in cells):
            pts = sorted((c["budget"], max(-c[key], 1e-9) if neg else c.get(key, float("nan")))
                         for c in cells if c["label"] == label and c["status"] == "ok")
            pts = [p for p in pts if p[1] is not None and math.isfinite(p[1])]  # e.g. not measured (--no-paired-timing)
            if pts:
                drawn = True
                style = "--" if label in ("naive", "best-of-n") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
        if not drawn:
            ax.set_title(f"{title}: not measured", fontsize=10)
            ax.axis("off")
            continue
        if key.startswith("overhead"):
            ax.axhline(1.3, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("NFEs per sample")
        if neg:
            ax.set_yscale("log")
            title = f"-{title} (log scale, lower is better)"
        ax.set_title(f"{title} ({reward})" if key == "reward_mean" else title, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=100)
    plt.close(fig)


def write_outputs(data: dict, out: Path, prefix: str = "search", samples: dict | None = None) -> None:
    """search_results.json / .md and the plots from the collected cells; with ``samples`` (reward ->
    {(label, budget): first image per target}) also the labelled image grid PREFIX_samples.png."""
    meta, main_cells, other = data["meta"], data["cells"], data["other_rewards"]
    atomic_write_text(out / f"{prefix}_results.json", json.dumps(data, indent=1))
    budgets = sorted({c["budget"] for c in main_cells})
    labels = list(dict.fromkeys(c["label"] for c in main_cells))
    reward = main_cells[0]["reward"]
    unit = "NFE-equivalents of FLOPs (network + reward)" if meta.get("budget_kind") == "flops" else "NFEs"
    md = [f"# Search benchmark results\n\nCommand: `{meta['command']}`  \nBudgets in {unit} per sample. {meta['model']}; {meta['searches_per_cell']} searches per cell "
          f"(10 targets x {meta['searches_per_cell'] // 10}); {meta['threads']} torch thread(s); total {meta['total_seconds']:.0f} s.\n"]
    md.append(f"## Reward `{reward}`: mean reward\n\n" + pivot(main_cells, "reward_mean", ".3f", budgets, labels))
    md.append("## Judge accuracy\n\n" + pivot(main_cells, "judge_accuracy", ".3f", budgets, labels))
    md.append("## Classifier (optimised) accuracy\n\n" + pivot(main_cells, "classifier_accuracy", ".3f", budgets, labels))
    md.append("## Diversity (mean pairwise L2 distance within a target)\n\n" + pivot(main_cells, "diversity", ".2f", budgets, labels))
    if meta.get("paired_timing", True):
        md.append("## Overhead ratio (paired timing): CPU time / (sum over the run's denoiser calls of the time of the same call made once more, right after it)\n\n"
                  + pivot(main_cells, "overhead_ratio_paired", ".2f", budgets, labels))
        md.append("## Overhead ratio over the charged compute (paired timing of denoiser and reward calls): CPU time / (paired denoiser time + paired reward time)\n\n"
                  + pivot(main_cells, "overhead_ratio_paired_compute", ".2f", budgets, labels))
    md.append("## Overhead ratio: CPU time / CPU time of the denoiser calls inside the run\n\n" + pivot(main_cells, "overhead_ratio_in_run", ".2f", budgets, labels))
    md.append("## Overhead ratio without the reward calls: (CPU time - reward CPU time) / CPU time of the denoiser calls inside the run\n\n" + pivot(main_cells, "overhead_ratio_without_reward", ".3f", budgets, labels))
    md.append("## Overhead ratio: CPU time / (sum over calls of the CPU time of one denoiser call at that size, timed separately after the cell)\n\n" + pivot(main_cells, "overhead_ratio", ".2f", budgets, labels))
    md.append("## Overhead ratio with wall time (shared CPU: includes time taken by other processes)\n\n" + pivot(main_cells, "overhead_ratio_wall", ".2f", budgets, labels))
    md.append("## Every cell\n\n" + table(main_cells, reward))
    for r, cells in other.items():
        ob = sorted({c["budget"] for c in cells})
        ol = list(dict.fromkeys(c["label"] for c in cells))
        n = meta.get("other_searches_per_cell", "?")
        md.append(f"## Reward `{r}` ({n} searches per cell)\n\nMean reward:\n\n" + pivot(cells, "reward_mean", ".4f", ob, ol)
                  + "\n\nDiversity:\n\n" + pivot(cells, "diversity", ".2f", ob, ol)
                  + "\n\nOverhead ratio (paired timing):\n\n" + pivot(cells, "overhead_ratio_paired", ".2f", ob, ol)
                  + "\n\nOverhead ratio (in-run denoiser time):\n\n" + pivot(cells, "overhead_ratio_in_run", ".2f", ob, ol))
    atomic_write_text(out / f"{prefix}_results.md", "\n\n".join(md) + "\n")
    plot({reward: main_cells}, out / f"{prefix}_reward_vs_nfe.png",
         [("reward_mean", "mean reward"), ("judge_accuracy", "judge accuracy"), ("classifier_accuracy", "classifier accuracy"),
          ("diversity", "diversity (pairwise L2, same target)"), ("overhead_ratio_paired", "overhead (CPU, paired timing)"),
          ("overhead_ratio_in_run", "overhead (CPU, in-run denoiser time)"), ("overhead_ratio_without_reward", "overhead without reward calls")],
         ncols=4)
    if other:
        plot(other, out / f"{prefix}_other_rewards.png", [("reward_mean", "mean reward"), ("diversity", "diversity")], ncols=2)
    if samples and samples.get(reward):
        sample_grid(out / f"{prefix}_samples.png", main_cells, samples[reward], meta.get("budget_kind", "nfe"))


def sample_grid(path: Path, cells: list[dict], samples: dict, kind: str = "nfe") -> None:
    """The first search's image per target of every configuration at the largest budget: one row per
    configuration (label, what it spent, judge accuracy), one column per target digit."""
    budget = max(b for _, b in samples)
    rows = [c for c in cells if c["status"] == "ok" and c["budget"] == budget and (c["label"], budget) in samples]
    if not rows:
        return
    spent = (lambda c: f"{c['flops_mean_in_nfe']:.0f} NFE-eq. FLOPs") if kind == "flops" else (lambda c: f"{c['nfe_max']} NFEs")
    labels = [f"{c['label']}\n{spent(c)}\njudge acc {c['judge_accuracy']:.2f}" for c in rows]
    unit = "NFE-equivalents of FLOPs" if kind == "flops" else "NFEs"
    save_labelled_grid(path, torch.cat([samples[(c["label"], budget)] for c in rows]), len(rows), labels,
                       [f"target {d}" for d in range(10)],
                       title=f"{rows[0]['reward']}, budget {budget} {unit} per sample: the first search of each target")


def build_parser(prog: str = "noisesearch bench search", parser_class=argparse.ArgumentParser,
                 default_out: Path = Path("runs/bench-search")) -> argparse.ArgumentParser:
    """The benchmark's options (``noisesearch bench search`` adds ``--config FILE`` and one-line errors)."""
    p = parser_class(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Every option is optional: with none, the full benchmark runs (about 15 min on one thread). "
                     "A budget below one trajectory (18 NFEs) is refused. Not resumable: a rerun recomputes every cell.")
    p.add_argument("--budgets", default="18,72,144,360,720,1440", help="budgets per output sample, comma separated: NFEs, or "
                   "NFE-equivalents of FLOPs with --budget-kind flops; each at least 18 (one trajectory) (default: %(default)s)")
    p.add_argument("--seeds", type=int_in(1, 10000), default=8, help="independent searches per target digit (default 8: 80 searches per cell)")
    p.add_argument("--seed", type=int_in(0, 2**62), default=0, help="generator seed of every cell (default 0)")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help=f"strategy configurations of the main sweep, comma separated, among {', '.join(CONFIGS)}")
    p.add_argument("--reward", default="digit", help="the main reward (default digit)")
    p.add_argument("--other-rewards", default="brightness,compressibility", help="rewards of the smaller second sweep, comma separated ('' = no second sweep)")
    p.add_argument("--other-budgets", default="72,360,1440", help="budgets of the second sweep (default: %(default)s)")
    p.add_argument("--other-seeds", type=int_in(1, 10000), default=4, help="searches per target digit in the second sweep (default 4)")
    p.add_argument("--other-strategies", default=",".join(OTHER_REWARD_STRATEGIES), help="strategy configurations of the second sweep (default: %(default)s)")
    p.add_argument("--threads", type=int_in(1, 4096), default=1, help="torch threads (default 1: lean, stable timings)")
    p.add_argument("--max-batch", type=positive_int, default=512, help="rows per denoiser call (default 512)")
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder: new, empty or a previous bench search run (default: {default_out})")
    p.add_argument("--weights-dir", type=Path, default=None, help="folder with digits_denoiser / digit_classifier / digit_judge .safetensors (default: the shipped weights)")
    p.add_argument("--budget-kind", choices=("nfe", "flops"), default="nfe", help="budgets in NFEs (default) or in FLOPs (network + reward) expressed in NFE-equivalents")
    p.add_argument("--reward-price", type=float, default=None,
                   help="price of one reward call in NFEs of the denoiser (with --budget-kind flops): the reward is wrapped "
                   "with flops_per_image = PRICE x the denoiser's FLOPs per call (default: the reward's own)")
    p.add_argument("--prefix", default=None, help="output file prefix (default: search, or search_flops with --budget-kind flops)")
    p.add_argument("--no-paired-timing", dest="paired", action="store_false",
                   help="skip the paired timing of every denoiser call (halves the denoiser time of the benchmark)")
    p.add_argument("--replot", action="store_true", help="only rewrite the tables and plots from OUT/PREFIX_results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress display (on a terminal a bar, otherwise a line every few seconds)")
    return p


def main(argv=None, prog: str = "noisesearch bench search", default_out: Path = Path("runs/bench-search")) -> int:
    """``python -m noisesearch.bench.search [OPTIONS]`` (``noisesearch bench search`` also takes ``--config FILE``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog, default_out=default_out).parse_args(argv)
    try:
        return run(args, f"{prog} {shlex.join(argv)}".strip())
    except NoiseSearchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, command: str, save_config: Callable[[Path], object] | None = None) -> int:
    """Run the sweeps of ``args`` (from :func:`build_parser`); ``command`` is recorded in the results and
    ``save_config(path)``, when given, writes the resolved options next to them."""
    prefix = args.prefix or ("search_flops" if args.budget_kind == "flops" else "search")
    if args.replot:
        return _replot(args.out, prefix)
    plan = _plan(args)
    output_dir(args.out, "bench search", [f"{prefix}_results.json"])
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    n_cells = len(plan.budgets) * len(plan.labels) + len(plan.others) * len(plan.other_budgets) * len(plan.other_labels)
    sweep = Sweep(args, Progress(n_cells, desc="bench search", unit="cell", enabled=not args.no_progress))
    main_cells = sweep.run(args.reward, plan.budgets, plan.labels, args.seeds)
    other = {r: sweep.run(r, plan.other_budgets, plan.other_labels, args.other_seeds) for r in plan.others}
    sweep.bar.close()
    meta = _meta(args, command, sweep)
    if save_config is not None:
        save_config(args.out / f"{prefix}_config.yaml")
    write_outputs({"meta": meta, "cells": main_cells, "other_rewards": other}, args.out, prefix, samples=sweep.samples)
    print()
    for key, fmt in (("reward_mean", ".3f"), ("judge_accuracy", ".3f"), ("overhead_ratio_paired", ".2f")):
        print(pivot(main_cells, key, fmt, plan.budgets, plan.labels) + "\n")
    print(f"wrote {args.out}/{prefix}_results.json, {prefix}_results.md, {prefix}_reward_vs_nfe.png, {prefix}_samples.png"
          + (f", {prefix}_other_rewards.png" if other else ""))
    return 0


def _replot(out: Path, prefix: str) -> int:
    src = out / f"{prefix}_results.json"
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        raise NoiseSearchError(f"--replot: cannot read {src} ({getattr(e, 'strerror', None) or e})") from None
    write_outputs(data, out, prefix)
    print(f"rewrote {out}/{prefix}_results.md and the plots")
    return 0


@dataclass
class _Plan:
    budgets: list[int]
    labels: list[str]
    others: list[str]  # rewards of the second sweep
    other_budgets: list[int]
    other_labels: list[str]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _plan(args) -> _Plan:
    """The sweeps, checked before any work (budgets, configurations, rewards, memory)."""
    plan = _Plan(int_list(args.budgets, "--budgets", TRAJ, 10**6), _names(args.strategies), _names(args.other_rewards),
                 int_list(args.other_budgets, "--other-budgets", TRAJ, 10**6), _names(args.other_strategies))
    if not plan.labels:
        raise NoiseSearchError("--strategies: give at least one configuration")
    for label in plan.labels + plan.other_labels:
        if label not in CONFIGS:
            raise NoiseSearchError(f"unknown strategy configuration {label!r}; choose among {', '.join(CONFIGS)}")
    for r in [args.reward, *plan.others]:
        as_reward(r)
    price = getattr(args, "reward_price", None)
    if price is not None and not 0 <= price < float("inf"):
        raise NoiseSearchError(f"--reward-price must be a finite number >= 0 (NFEs per reward call), got {price}")
    if price is not None and args.budget_kind != "flops":
        raise NoiseSearchError("--reward-price prices the reward calls of a FLOP budget: add --budget-kind flops")
    # memory: best-of-N holds every candidate of every search at once (8x8 digits: x, x0, noise and
    # decoded images, float32, with headroom): 10 targets x seeds x budget / 18 rows
    rows = max(10 * args.seeds * max(plan.budgets), 10 * args.other_seeds * max(plan.other_budgets)) / TRAJ
    check_memory(rows * 64 * 4 * 8, f"bench search ({int(rows):,} candidates at the largest budget)", "--budgets or --seeds")
    return plan


class Sweep:
    """The models, the call timer and the progress shared by every cell of a run."""

    def __init__(self, args, bar):
        w = self.weights = args.weights_dir
        self.args, self.bar = args, bar
        self.den = as_denoiser("digits", guidance=0, options={"weights": w / "digits_denoiser.safetensors"} if w else None)
        self.classifier = load_classifier("cpu", w / "digit_classifier.safetensors" if w else None)
        self.judge = load_judge("cpu", w / "digit_judge.safetensors" if w else None)
        self.timer = CallTimer(self.den)
        self.samples: dict[str, dict] = {}  # reward -> {(label, budget): first image per target}
        self.t_start = time.perf_counter()

    def run(self, reward_name: str, budgets: list[int], labels: list[str], seeds: int) -> list[dict]:
        """Every configuration at every budget (naive ignores the budget: run once, repeated)."""
        reward = self.classifier if reward_name == "digit" and self.weights else as_reward(reward_name)
        if getattr(self.args, "reward_price", None) is not None:  # the reward priced in NFEs (issue 19)
            reward = as_reward(reward, flops_per_image=self.args.reward_price * self.den.flops_per_call)
        samples = self.samples.setdefault(reward_name, {})
        cells: list[dict] = []
        for label in labels:
            for b in budgets:
                if label == "naive" and b != budgets[0] and cells and cells[-1]["label"] == "naive":
                    cell = dict(cells[-1], budget=b)
                    if (label, budgets[0]) in samples:
                        samples[(label, b)] = samples[(label, budgets[0])]
                else:
                    a = self.args
                    cell = run_cell(self.den, reward, self.classifier, self.judge, self.timer, label, b, seeds, a.seed,
                                    a.max_batch, a.budget_kind, paired=a.paired, samples=samples)
                    cell["reward"] = reward_name
                    self._print(cell)
                cells.append(cell)
                self.bar.update(1)
        return cells

    def _print(self, cell: dict) -> None:
        head = f"[{time.perf_counter() - self.t_start:7.1f}s] {cell['reward']:15s} {cell['label']:20s} {cell['budget']:5d}"
        if cell["status"] != "ok":
            print(f"{head}  n/a ({cell['reason'][:80]})", flush=True)
            return
        print(f"{head}  reward {cell['reward_mean']:8.4f}  judge {cell['judge_accuracy']:.3f}  div {cell['diversity']:.3f}  "
              f"wall {cell['wall_seconds']:6.1f}s  overhead {cell['overhead_ratio_paired']:.2f} "
              f"(in-run {cell['overhead_ratio_in_run']:.2f})  {cell['fitted']}", flush=True)


def _meta(args, command: str, sweep: Sweep) -> dict:
    return {
        "command": command,
        "model": "digits (guidance 0, unconditional), 18 Euler-ancestral steps",
        "budget_kind": args.budget_kind,
        "reward_price_nfe": getattr(args, "reward_price", None),
        "searches_per_cell": 10 * args.seeds,
        "other_searches_per_cell": 10 * args.other_seeds,
        "seed": args.seed,
        "threads": args.threads,
        "paired_timing": args.paired,
        "max_batch": args.max_batch,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "denoiser_call_seconds": {str(k): statistics.median(v) for k, v in sorted(sweep.timer.log.items())},
        "total_seconds": time.perf_counter() - sweep.t_start,
    }


if __name__ == "__main__":
    sys.exit(main())
