"""``make demo``: strategies at equal NFEs on digits-uncond, in about 10 seconds of CPU time.

digits-uncond: the built-in digits model sampled *without* its class (guidance 0), reward
``digit`` = log p(target | image) from the shipped classifier, targets 0-9, 18 Euler-ancestral
steps (18 NFEs per sample). Every strategy gets the same budget of NFEs per sample; best-of-N is
the baseline (``--strategies naive,best-of-n,...`` adds plain sampling, one trajectory). The independent judge (another architecture, another data split, never optimised)
tells real progress from reward hacking.

    python -m noisesearch.demo --out runs/demo [--budget-nfe 144] [--samples 4] [--seed 0] [--quick]

Writes ``comparison.png`` (a row per strategy: what it spent and its judge accuracy; a column per
target digit), ``summary.json`` and one run folder per strategy, the same as ``noisesearch generate``
writes (``noisesearch.api.save_run``: report.json, config.yaml, samples.png, search.png).
The long benchmark (every strategy at six budgets, 80 searches per cell) is ``noisesearch bench search``.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from noisesearch import api
from noisesearch.bench import BENCHMARKS
from noisesearch.errors import NoiseSearchError
from noisesearch.figures import save_labelled_grid
from noisesearch.io import atomic_write_json
from noisesearch.models.digits import parse_digits
from noisesearch.rewards.digit import load_classifier
from noisesearch.search import STRATEGIES
from noisesearch.validate import int_in, output_dir

DEFAULT_STRATEGIES = ["best-of-n", "beam", "eps-greedy", "smc"]  # naive (18 NFEs): --strategies naive,...
TARGETS = [str(d) for d in range(10)]
QUICK = {"budget_nfe": 36, "samples": 1, "strategies": "best-of-n,eps-greedy"}


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    budget_nfe: int = 144  # NFEs per sample: 8 trajectories of 18 steps
    samples: int = 4  # searches per target digit
    seed: int = 0
    strategies: tuple[str, ...] = tuple(DEFAULT_STRATEGIES)
    threads: int = 1  # torch threads: one keeps the tiny model fast and well-behaved on a busy machine


def parse_args(argv=None) -> DemoConfig:
    p = argparse.ArgumentParser(prog="python -m noisesearch.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DemoConfig.out)
    p.add_argument("--budget-nfe", type=int_in(18, 100_000), default=None,
                   help=f"NFEs per sample, at least one trajectory (18) (default {DemoConfig.budget_nfe})")
    p.add_argument("--samples", type=int_in(1, 1000), default=None,
                   help=f"searches per target digit (default {DemoConfig.samples})")
    p.add_argument("--seed", type=int_in(0, 2**62), default=0)
    p.add_argument("--strategies", default=None,
                   help=f"comma separated (default {','.join(DEFAULT_STRATEGIES)}; those not available are skipped)")
    p.add_argument("--threads", type=int_in(1, 4096), default=DemoConfig.threads,
                   help="torch threads (default 1: the tiny model gains nothing from more, and they spin on a busy machine)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['strategies']}, {QUICK['budget_nfe']} NFEs, 1 search per target")
    a = p.parse_args(argv)
    base = QUICK if a.quick else {}
    names = (a.strategies or base.get("strategies") or ",".join(DEFAULT_STRATEGIES)).split(",")
    return DemoConfig(
        out=a.out,
        budget_nfe=a.budget_nfe or base.get("budget_nfe", DemoConfig.budget_nfe),
        samples=a.samples or base.get("samples", DemoConfig.samples),
        seed=a.seed,
        strategies=tuple(s.strip() for s in names if s.strip() in STRATEGIES),
        threads=a.threads,
    )


def classifier_accuracy(run: api.Run) -> float:
    """Accuracy by the optimised classifier (the reward's own model): compare with the judge's."""
    classes, _ = load_classifier("cpu").predict(run.images)
    targets = parse_digits([s["prompt"] for s in run.report["samples"]])
    return float((classes == targets).float().mean())


def run_strategy(cfg: DemoConfig, name: str) -> tuple[dict, torch.Tensor]:
    """One strategy on the 10 targets x ``samples`` searches; its run folder written by ``api.save_run``.
    Returns its summary row and the first search's image per target."""
    t0, c0 = time.perf_counter(), time.process_time()
    run = api.generate(model="digits", prompts=TARGETS, guidance=0.0, reward="digit", strategy=name,
                       budget_nfe=cfg.budget_nfe, num_samples=cfg.samples, seed=cfg.seed, trace=True)
    api.save_run(run, cfg.out / name, ncol=cfg.samples)
    r = run.report
    row = {
        "strategy": name,
        "nfe_max": r["nfe_max"],
        "flops_max": r.get("flops"),
        "reward_mean": r["reward_mean"],
        "reward_se": _mean_se([s["reward"] for s in r["samples"]]),
        "classifier_accuracy": classifier_accuracy(run),
        "judge_accuracy": r.get("judge_accuracy"),
        "judge_accuracy_se": _binomial_se(r.get("judge_accuracy"), len(r["samples"])),
        "params": r.get("params"),
        "search_seconds": r.get("wall_seconds"),
        "seconds_total": time.perf_counter() - t0,
        "cpu_seconds_total": time.process_time() - c0,
    }
    return row, run.images.view(len(TARGETS), cfg.samples, *run.images.shape[1:])[:, 0]


def _mean_se(values: list[float]) -> float | None:
    """Standard error of the mean of independent ``values``."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _binomial_se(p: float | None, n: int) -> float | None:
    """Standard error of an accuracy ``p`` measured on ``n`` independent searches."""
    return None if p is None or n < 2 else math.sqrt(p * (1 - p) / n)


def write_comparison(cfg: DemoConfig, rows: list[dict], firsts: list[torch.Tensor]) -> Path:
    """``comparison.png``: a row per strategy (NFEs spent per sample, mean reward, judge accuracy), a column per target."""
    labels = [f"{r['strategy']}\n{r['nfe_max']} NFEs/sample\n"
              + f"reward {r['reward_mean']:.2f} ± {r['reward_se'] or 0:.2f}\n"
              + (f"judge acc {r['judge_accuracy']:.2f} ± {r['judge_accuracy_se'] or 0:.2f}"
                 if r["judge_accuracy"] is not None else "judge n/a")
              for r in rows]
    title = (f"digits-uncond at equal compute: {cfg.budget_nfe} NFEs per sample; judge accuracy ± s.e. over "
             f"{len(TARGETS) * cfg.samples} searches; shown: the first search per target")
    return save_labelled_grid(cfg.out / "comparison.png", torch.cat(firsts), len(rows), labels,
                              [f"target {d}" for d in TARGETS], title=title)


def print_table(rows: list[dict]) -> None:
    head = (f"{'strategy':<12} {'NFE/sample':>10} {'reward ± se':>16} {'classifier acc':>15} {'judge acc ± se':>15} "
            f"{'wall s':>7} {'CPU s':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        judge = (f"{r['judge_accuracy']:>9.3f} ± {r['judge_accuracy_se'] or 0:.2f}" if r["judge_accuracy"] is not None
                 else f"{'n/a':>15}")
        print(f"{r['strategy']:<12} {r['nfe_max']:>10} {r['reward_mean']:>8.3f} ± {r['reward_se'] or 0:5.3f} "
              f"{r['classifier_accuracy']:>15.3f} "
              f"{judge} {r['seconds_total']:>7.2f} {r['cpu_seconds_total']:>6.2f}")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (buffers up to 32 MiB from the heap, trimmed back to
    the kernel only above 1 GiB free) rather than returning each large tensor buffer to the kernel and faulting
    it in again at the next batch: on the demo that is ~250k page faults, about 1 s of system time of ~10, at the
    same peak memory. A no-op (False) where malloc is not glibc's (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    if not cfg.strategies:
        print("demo: error: none of --strategies is available; choose among " + ", ".join(STRATEGIES), file=sys.stderr)
        return 2
    print(f"digits-uncond: unconditional digits model, reward = log p(target | image), targets 0-9, "
          f"{cfg.samples} searches per target, {cfg.budget_nfe} NFEs per sample, seed {cfg.seed}, "
          f"{cfg.threads} torch thread(s)")
    rows, firsts = [], []
    try:
        output_dir(cfg.out, "demo", ["summary.json", "comparison.png"])  # new, empty or an earlier demo's
        for name in cfg.strategies:
            row, first = run_strategy(cfg, name)
            rows.append(row)
            firsts.append(first)
            print(f"  {name:<12} reward {row['reward_mean']:7.3f}  judge {row['judge_accuracy'] or float('nan'):.3f}  "
                  f"({row['seconds_total']:.1f} s)", flush=True)
    except NoiseSearchError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    write_comparison(cfg, rows, firsts)
    atomic_write_json(cfg.out / "summary.json", {"budget_nfe": cfg.budget_nfe, "samples_per_target": cfg.samples,
                                                 "seed": cfg.seed, "threads": cfg.threads, "rows": rows})
    print_table(rows)
    print(f"\nwrote {cfg.out}/comparison.png (rows: {', '.join(cfg.strategies)}; columns: targets 0-9), "
          f"{cfg.out}/summary.json and one run folder per strategy (report.json, config.yaml, samples.png, search.png)")
    print(f"the longer benchmark: noisesearch bench search - {BENCHMARKS['search']}; "
          "results and how to read them in docs/search.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
