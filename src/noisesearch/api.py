"""The high-level Python API: ``generate(...)`` runs one search end to end and ``save_run`` writes it.

    from noisesearch import api
    run = api.generate(model="digits", prompts=["3"], guidance=0, reward="digit",
                       strategy="best-of-n", budget_nfe=360, num_samples=16, seed=0)
    print(run.report["reward_mean"]); api.save_run(run, "runs/demo")

Everything is built from names (``model``, ``reward``, ``strategy``, ``sampler``) or from objects
(a Denoiser, a Reward, a Strategy), so the same call works for the built-in digits model and for a
diffusers pipeline. Randomness flows from one ``torch.Generator`` seeded with ``seed``.
"""
from __future__ import annotations

import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from noisesearch import __version__
from noisesearch.budget import Budget, CostModel
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_bytes, atomic_write_json, image_grid, save_png, to_pil
from noisesearch.models import load_model
from noisesearch.models.base import Denoiser
from noisesearch.rewards.base import Reward, make_reward
from noisesearch.sampling.samplers import Sampler, make_sampler
from noisesearch.search import Strategy, make_strategy
from noisesearch.search.base import Problem


@dataclass
class Run:
    """A finished search: chosen images per sample and the report (what ``report.json`` holds)."""

    images: torch.Tensor  # [P, C, H, W] in [0, 1]
    x0: torch.Tensor  # [P, *sample_shape] (latents for latent models)
    report: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """A tqdm bar over the budget's NFE (or FLOP) limit, fed by budget charges."""

    def __init__(self, budget: Budget, enabled: bool, desc: str):
        self.bar = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.by_nfe = budget.nfe_limit is not None
        total = budget.nfe_limit * budget.num_searches if self.by_nfe else budget.flops_limit * budget.num_searches
        self.budget = budget
        self.bar = tqdm(total=total, desc=desc, unit="NFE" if self.by_nfe else "FLOP", unit_scale=not self.by_nfe, leave=False, file=sys.stderr)
        budget.listeners.append(self)

    def __call__(self, kind: str, rows: int) -> None:
        used = float(self.budget.nfe.sum()) if self.by_nfe else float(self.budget.flops.sum())
        self.bar.update(used - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def expand_prompts(prompts: Sequence[str], num_samples: int) -> list[str]:
    """Each prompt repeated ``num_samples`` times (prompt-major)."""
    if not prompts:
        raise NoiseSearchError("give at least one prompt (--prompt or --prompts-file)")
    if num_samples < 1:
        raise NoiseSearchError("--num-samples must be at least 1")
    return [p for p in prompts for _ in range(num_samples)]


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
    eval_rewards: Sequence[str | Reward] | str = (),
) -> Run:
    """Run one search (see module docstring). Raises ``NoiseSearchError`` on bad input.

    ``model_options`` go to ``load_model`` when ``model`` is a name: for diffusers pipelines
    ``height``, ``width``, ``dtype``, ``negative_prompt``, ``variant``, ``default_steps``.

    ``eval_rewards``: rewards that were not optimised (specs, a comma-separated string, or Reward
    objects) scoring the chosen samples afterwards, outside the budget: ``report["eval_rewards"]``
    and each sample's ``"eval_rewards"`` (see :func:`evaluate_rewards`)."""
    t_load = time.perf_counter()
    strat = make_strategy(strategy, **(strategy_options or {})) if isinstance(strategy, str) else strategy
    if model_options and not isinstance(model, str):
        raise NoiseSearchError("model_options apply when the model is given by name; configure a denoiser object directly")
    denoiser = load_model(model, device=device, guidance=guidance, **(model_options or {})) if isinstance(model, str) else model
    reward_fn = make_reward(reward, device=device) if isinstance(reward, str) else reward
    from noisesearch.pools.generate import split_specs

    eval_fns = [(r, make_reward(r, device=device)) if isinstance(r, str) else (r.name, r)
                for r in (split_specs(eval_rewards) if isinstance(eval_rewards, str) else eval_rewards)]
    all_prompts = expand_prompts([str(p) for p in prompts], num_samples)
    cond = denoiser.encode(all_prompts)
    if steps is not None and steps < 1:
        raise NoiseSearchError("--steps must be at least 1")
    budget = Budget(
        len(all_prompts),
        nfe=budget_nfe,
        flops=budget_flops,
        # a reward call on a latent model pays for decoding the Tweedie estimate too
        cost=CostModel(denoiser.flops_per_call, reward_fn.flops_per_image + getattr(denoiser, "flops_per_decode", 0.0)),
    )
    samp: Sampler = make_sampler(sampler, denoiser, steps, max_batch=max_batch, budget=budget)
    generator = torch.Generator().manual_seed(seed)
    problem = Problem(samp, reward_fn, budget, all_prompts, cond, generator)
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
                "index": i,
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
        "prompts": list(dict.fromkeys(all_prompts)),
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
    if evaluate and report["model"] == "digits":
        evaluate_digits(report, images)
    if eval_fns:
        evaluate_rewards(report, images, all_prompts, eval_fns)
    return Run(images=images, x0=result.x0.detach().cpu(), report=report, extra={"info": result.info})


def evaluate_digits(report: dict, images: torch.Tensor) -> None:
    """Add the independent judge's verdict (never optimised) to a digits report, in place."""
    from noisesearch.rewards.digit import load_judge

    judge = load_judge("cpu")
    classes, probs = judge.predict(images)
    hits = 0
    for s, c, p in zip(report["samples"], classes.tolist(), probs.tolist()):
        s["judge_class"], s["judge_prob"] = int(c), float(p)
        hits += int(str(c) == s["prompt"].strip())
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
    atomic_write_json(report_path, run.report)
    return out
