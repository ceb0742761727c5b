"""The high-level Python API: ``generate(...)`` runs one search end to end and ``save_run`` writes it.

    from noisesearch import api
    run = api.generate(model="digits", prompts=["3"], guidance=0, reward="digit",
                       strategy="best-of-n", budget_nfe=360, num_samples=16, seed=0)
    print(run.report["reward_mean"]); api.save_run(run, "runs/demo")

Everything is built from names (``model``, ``reward``, ``strategy``, ``sampler``) or from objects
(a Denoiser, a Reward, a Strategy), so the same call works for the built-in digits model and for a
diffusers pipeline. Randomness flows from ``seed`` through one noise source with a stream per
search (``noisesearch.noise``): adding a prompt does not change the samples of the others.
"""
from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from noisesearch import __version__
from noisesearch.budget import Budget
from noisesearch.build import as_denoiser, as_reward, build_problem, expand_prompts  # noqa: F401 (re-export)
from noisesearch.io import atomic_write_bytes, atomic_write_json, image_grid, save_png, to_pil
from noisesearch.models.base import Denoiser
from noisesearch.rewards.base import Reward, split_specs
from noisesearch.search import Strategy, make_strategy


@dataclass
class Run:
    """A finished search: chosen images per sample and the report (what ``report.json`` holds)."""

    images: torch.Tensor  # [P, C, H, W] in [0, 1]
    x0: torch.Tensor  # [P, *sample_shape] (latents for latent models)
    report: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """Progress over the budget's NFE (or FLOP) limit, fed by budget charges (noisesearch.progress:
    a bar on a terminal, a line every few seconds otherwise; whole units)."""

    def __init__(self, budget: Budget, enabled: bool, desc: str):
        from noisesearch.progress import Progress

        self.bar = None
        if not enabled:
            return
        self.by_nfe = budget.nfe_limit is not None
        total = budget.nfe_limit * budget.num_searches if self.by_nfe else budget.flops_limit * budget.num_searches
        self.scale, unit = 1.0, "NFE"
        if not self.by_nfe:  # FLOPs in the largest SI unit that keeps >= 100 steps
            self.scale, unit = next(((10.0**e, p + "FLOP") for e, p in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"))
                                     if total / 10.0**e >= 100), (1.0, "FLOP"))
        self.budget = budget
        self.bar = Progress(int(total / self.scale), desc=desc, unit=unit)
        budget.listeners.append(self)

    def __call__(self, kind: str, rows: int) -> None:
        used = float(self.budget.nfe.sum()) if self.by_nfe else float(self.budget.flops.sum())
        self.bar.set(used / self.scale)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close(complete=False)


def generate(
    model: str | Denoiser = "digits",
    prompts: Sequence[str] = ("3",),
    reward: str | Reward = "digit",
    strategy: str | Strategy = "best-of-n",
    budget_nfe: float | None = None,
    budget_flops: float | None = None,
    num_samples: int = 1,
    guidance: float = 1.0,
    steps: int | None = None,
    sampler: str = "euler-ancestral",
    seed: int = 0,
    device: str = "cpu",
    max_batch: int = 512,
    strategy_options: dict[str, Any] | None = None,
    progress: bool = False,
    evaluate: bool = True,
    model_options: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    score_batch: int | None = None,
    eval_rewards: Sequence[str | Reward] | str = (),
    trace: bool = False,
) -> Run:
    """Run one search (see module docstring). Raises ``NoiseSearchError`` on bad input.

    ``model_options`` go to ``load_model`` when ``model`` is a name: for diffusers pipelines
    ``height``, ``width``, ``dtype``, ``negative_prompt``, ``variant``, ``default_steps``,
    ``decode_batch``; for flow pipelines (FLUX, SD3, Lumina2) also ``embedded_guidance``,
    ``offload``, ``vae_tiling``, ``negtome`` (see ``models.flow``).

    ``max_batch`` rows go through the denoiser per call, ``score_batch`` (default ``max_batch``)
    rows through decode + reward per call.

    ``shard=(rank, world)`` runs only the searches ``i`` with ``i % world == rank`` (each with the
    noise stream it has in the whole run); :func:`merge_runs` joins the shards' runs into the run
    of one process (``accelerate launch -m noisesearch generate`` does both).

    ``eval_rewards``: rewards that were not optimised (specs, a comma-separated string, or Reward
    objects) scoring the chosen samples afterwards, outside the budget: ``report["eval_rewards"]``
    and each sample's ``"eval_rewards"`` (see :func:`evaluate_rewards`).

    ``trace``: record every scored candidate of the first sample of each prompt, so that ``save_run``
    draws ``search.png`` (see ``noisesearch.search.trace``)."""
    t_load = time.perf_counter()
    strat = make_strategy(strategy, **(strategy_options or {})) if isinstance(strategy, str) else strategy
    denoiser = as_denoiser(model, device=device, guidance=guidance, options=model_options)
    reward_fn = as_reward(reward, device=device)
    eval_fns = [(r, as_reward(r, device=device)) if isinstance(r, str) else (r.name, r)
                for r in (split_specs(eval_rewards) if isinstance(eval_rewards, str) else eval_rewards)]
    total = len(prompts) * num_samples
    searches = None if shard is None else list(range(shard[0], total, shard[1]))
    if searches == []:
        raise NoiseSearchError(f"{shard[1]} processes for {total} searches: launch at most {total} processes")
    problem = build_problem(denoiser, reward_fn, [str(p) for p in prompts], num_samples=num_samples,
                            budget_nfe=budget_nfe, budget_flops=budget_flops, steps=steps, sampler=sampler,
                            seed=seed, max_batch=max_batch, searches=searches, score_batch=score_batch)
    budget, samp, all_prompts = problem.budget, problem.sampler, problem.prompts
    if trace:
        from noisesearch.search.trace import SearchTrace

        problem.trace = SearchTrace(owners=set(range(0, len(all_prompts), num_samples)))
    load_seconds = time.perf_counter() - t_load

    bar = _Progress(budget, progress, desc=f"{strat.name}")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            result = strat.search(problem)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    images = denoiser.decode(result.x0).float().cpu()

    summary = budget.summary()
    samples = []
    for i, p in enumerate(all_prompts):
        samples.append(
            {
                "index": i if searches is None else searches[i],
                "prompt": p,
                "reward": float(result.rewards[i]),
                "nfe": int(budget.nfe[i]),
                "reward_calls": int(budget.reward_calls[i]),
                "flops": float(budget.flops[i]),
            }
        )
    report: dict[str, Any] = {
        "noisesearch_version": __version__,
        "model": getattr(denoiser, "name", str(model)),
        "guidance": guidance,
        "model_options": {k: str(v) for k, v in (model_options or {}).items()},
        "reward": reward_fn.name,
        "strategy": strat.name,
        "params": strat.params(),
        "sampler": samp.name,
        "steps": samp.num_steps,
        "nfe_per_trajectory": samp.nfe_per_trajectory,
        "seed": seed,
        "num_samples": num_samples,
        "prompts": [str(p) for p in prompts],
        "samples": samples,
        "reward_mean": float(result.rewards.mean()),
        "reward_std": float(result.rewards.std()) if len(samples) > 1 else 0.0,
        **summary,
        "wall_seconds": wall,
        "load_seconds": load_seconds,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "strategy_info": {k: v for k, v in result.info.items() if k != "all_rewards"},
    }
    if hasattr(denoiser, "encode_cost"):  # equal for every strategy: reported, not charged
        report["prompt_encoding"] = denoiser.encode_cost()
    if evaluate and report["model"] == "digits":
        evaluate_digits(report, images)
    if eval_fns:
        evaluate_rewards(report, images, all_prompts, eval_fns)
    extra = {"info": result.info}
    if problem.trace is not None:
        extra["trace"] = problem.trace
    return Run(images=images, x0=result.x0.detach().cpu(), report=report, extra=extra)


def merge_runs(runs: Sequence[Run]) -> Run:
    """One run from the runs of the shards of a multi-process ``generate`` (see ``shard``): samples
    in global order, aggregates recomputed from the per-sample figures, wall time the slowest shard's."""
    import statistics

    if len(runs) == 1:
        return runs[0]
    pairs = sorted(((s["index"], r, j) for r in runs for j, s in enumerate(r.report["samples"])), key=lambda t: t[0])
    samples = [r.report["samples"][j] for _, r, j in pairs]
    if [s["index"] for s in samples] != list(range(len(samples))):
        raise NoiseSearchError("the shards of this run do not cover every search exactly once")
    first = runs[0].report
    report = dict(first)
    rewards = [s["reward"] for s in samples]
    nfe = [s["nfe"] for s in samples]
    flops = [s["flops"] for s in samples]
    report.update(
        samples=samples,
        reward_mean=statistics.fmean(rewards),
        reward_std=statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
        nfe_max=max(nfe), nfe_mean=statistics.fmean(nfe), nfe_total=sum(nfe),
        reward_calls=sum(s["reward_calls"] for s in samples), flops=sum(flops), flops_per_sample_max=max(flops),
        wall_seconds=max(r.report["wall_seconds"] for r in runs),
        load_seconds=max(r.report["load_seconds"] for r in runs),
        processes=len(runs),
        strategy_info={**first["strategy_info"], "note": "strategy_info of the first process's searches"},
    )
    if "judge_accuracy" in first:
        from noisesearch.models.digits import parse_digits

        targets = parse_digits([s["prompt"] for s in samples], "the digits judge").tolist()
        report["judge_accuracy"] = statistics.fmean(float(s["judge_class"] == t) for s, t in zip(samples, targets))
    images = torch.stack([r.images[j] for _, r, j in pairs])
    x0 = torch.stack([r.x0[j] for _, r, j in pairs])
    return Run(images=images, x0=x0, report=report, extra={"info": [r.extra.get("info") for r in runs]})


def evaluate_digits(report: dict, images: torch.Tensor) -> None:
    """Add the independent judge's verdict (never optimised) to a digits report, in place."""
    from noisesearch.models.digits import parse_digits
    from noisesearch.rewards.digit import load_judge

    judge = load_judge("cpu")
    classes, probs = judge.predict(images)
    targets = parse_digits([s["prompt"] for s in report["samples"]], "the digits judge").tolist()
    hits = 0
    for s, c, p, t in zip(report["samples"], classes.tolist(), probs.tolist(), targets):
        s["judge_class"], s["judge_prob"] = int(c), float(p)
        hits += int(int(c) == t)
    report["judge_accuracy"] = hits / max(1, len(report["samples"]))


def evaluate_rewards(report: dict, images: torch.Tensor, prompts: Sequence[str], rewards) -> None:
    """Score the chosen samples with rewards that were not optimised, in place: each sample gets
    ``"eval_rewards": {spec: value}`` and the report ``"eval_rewards": {spec: {mean, std, name,
    flops_per_image}}``. Not charged to the search budget (an evaluation, like the digits judge: a
    reward the search hacked scores high on its own reward, not on these)."""
    from noisesearch.rewards.base import score

    summary = {}
    for spec, fn in rewards:
        values = score(fn, images, list(prompts))
        for s, v in zip(report["samples"], values.tolist()):
            s.setdefault("eval_rewards", {})[spec] = float(v)
        summary[spec] = {
            "name": fn.name,
            "mean": float(values.mean()),
            "std": float(values.std()) if len(values) > 1 else 0.0,
            "flops_per_image": float(fn.flops_per_image),
        }
    report["eval_rewards"] = summary


def save_run(run: Run, out: str | Path, ncol: int | None = None) -> Path:
    """Write ``samples.png`` (grid), ``samples/NNNN.png``, ``images.npy`` and ``report.json``.

    ``report.json`` is written last and atomically: a folder whose report.json exists is complete.
    A stale report.json from an earlier run in the same folder is removed first.
    """
    import io

    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    if report_path.exists():
        report_path.unlink()
    per_prompt = run.report.get("num_samples", 1)
    save_png(out / "samples.png", image_grid(run.images, ncol=ncol or min(per_prompt, 16)))
    sample_dir = out / "samples"
    if sample_dir.exists():
        shutil.rmtree(sample_dir)
    sample_dir.mkdir()
    for s, img in zip(run.report["samples"], run.images):
        name = f"{s['index']:04d}.png"
        save_png(sample_dir / name, to_pil(img))
        s["file"] = f"samples/{name}"
    buf = io.BytesIO()
    np.save(buf, run.images.numpy().astype("float32"))
    atomic_write_bytes(out / "images.npy", buf.getvalue())
    if run.extra.get("trace") is not None:
        from noisesearch.search.trace import plot_search

        n = run.report.get("num_samples", 1)
        prompts = [s["prompt"] for s in run.report["samples"]]
        plot_search(out / "search.png", run.extra["trace"], run.images, prompts, list(range(0, len(prompts), n)),
                    run.report["strategy"], "survivors" in run.extra.get("info", {}))
        run.report["search_plot"] = "search.png"
    atomic_write_json(report_path, run.report)
    return out
