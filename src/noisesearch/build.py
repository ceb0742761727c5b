"""The one place that turns names into a denoiser, a reward, a sampler and a problem.

Used by the API (``api.generate``), the benchmarks and pool generation, so that ``--model``,
``--reward`` and ``--sampler`` mean the same everywhere and every problem is priced the same way:
one :class:`~noisesearch.budget.CostModel` from the denoiser's ``flops_per_call`` and
``flops_per_decode`` and the reward's ``flops_per_image``, one
:class:`~noisesearch.noise.NoiseSource` from the seed.
"""
from __future__ import annotations

from typing import Any, Sequence

from noisesearch.budget import Budget, CostModel
from noisesearch.errors import NoiseSearchError
from noisesearch.models import load_model
from noisesearch.models.base import Denoiser
from noisesearch.noise import NoiseSource
from noisesearch.rewards.base import Reward, make_reward
from noisesearch.sampling.samplers import Sampler, make_sampler
from noisesearch.validate import MAX_NFE


def as_denoiser(model: str | Denoiser, device: str = "cpu", guidance: float = 1.0,
                options: dict[str, Any] | None = None) -> Denoiser:
    """A denoiser from a name (``digits``, a diffusers folder or hub name) or the object itself."""
    if not isinstance(model, str):
        if options:
            raise NoiseSearchError("model options apply when the model is given by name; configure a denoiser object directly")
        return model
    return load_model(model, device=device, guidance=guidance, **(options or {}))


def as_reward(reward: str | Reward, device: str = "cpu") -> Reward:
    """A reward from a spec (``digit``, ``0.7*digit+0.3*brightness``, ``ranksum(a,b)``) or the object."""
    return make_reward(reward, device=device) if isinstance(reward, str) else reward


def as_sampler(name: str, denoiser: Denoiser, steps: int | None = None, max_batch: int = 512, budget: Budget | None = None,
               **options) -> Sampler:
    if steps is not None and steps < 1:
        raise NoiseSearchError(f"--steps must be at least 1, got {steps}")
    if max_batch < 1:
        raise NoiseSearchError(f"--max-batch must be at least 1, got {max_batch}")
    return make_sampler(name, denoiser, steps, max_batch=max_batch, budget=budget, **options)


def expand_prompts(prompts: Sequence[str], num_samples: int) -> list[str]:
    """Each prompt repeated ``num_samples`` times (prompt-major)."""
    if not prompts:
        raise NoiseSearchError("give at least one prompt (--prompt or --prompts-file)")
    if num_samples < 1:
        raise NoiseSearchError("--num-samples must be at least 1")
    return [str(p) for p in prompts for _ in range(num_samples)]


def cost_model(denoiser: Denoiser, reward: Reward) -> CostModel:
    """Prices of a problem: an NFE, a reward call of ``reward``, and the decode each reward call needs."""
    return CostModel(float(denoiser.flops_per_call), float(reward.flops_per_image),
                     float(denoiser.flops_per_decode))


def check_search_memory(samp: Sampler, budget: Budget, num_searches: int, denoiser: Denoiser) -> None:
    """Refuse a budget whose widest search cannot fit in memory, before allocating: best-of-N holds
    every candidate at once, budget / (cost of one trajectory) of them per search, each with its state,
    estimate and noise (and temporaries): about 4 copies of a sample."""
    import math

    import torch

    from noisesearch.validate import check_memory, physical_memory

    per_traj_nfe = max(1, int(getattr(samp, "nfe_per_trajectory", 1) or 1))
    rows = 0.0
    if budget.nfe_limit is not None:
        rows = budget.nfe_limit / per_traj_nfe
    elif budget.flops_limit is not None:
        per_traj = per_traj_nfe * budget.cost.nfe(1).flops + budget.cost.reward(1).flops
        rows = budget.flops_limit / per_traj if per_traj > 0 else 0.0
    dtype = getattr(denoiser, "dtype", torch.float32) or torch.float32
    row_bytes = math.prod(samp.noise_shape) * torch.empty((), dtype=dtype).element_size() * 4
    dev = torch.device(getattr(denoiser, "device", "cpu") or "cpu")
    total = None
    if dev.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(dev).total_memory
    check_memory(rows * num_searches * row_bytes, f"the search ({rows * num_searches:,.0f} candidates at once)",
                 "--budget-nfe/--budget-flops or --num-samples", total=total or physical_memory())


def build_problem(denoiser: Denoiser, reward: Reward, prompts: Sequence[str], *, num_samples: int = 1,
                  budget_nfe: float | None = None, budget_flops: float | None = None, steps: int | None = None,
                  sampler: str = "euler-ancestral", seed: int = 0, max_batch: int = 512,
                  sampler_options: dict[str, Any] | None = None, searches: Sequence[int] | None = None,
                  score_batch: int | None = None):
    """A :class:`~noisesearch.search.base.Problem`: ``num_samples`` searches per prompt (prompt-major:
    search ``i`` is sample ``i % num_samples`` of prompt ``i // num_samples``), each with its own
    budget and noise stream ``(seed, prompt index, sample index)``. ``searches`` keeps only those
    global search indices (one shard of a multi-process run): each keeps its stream, so a shard's
    samples are those of the single-process run. ``score_batch``: rows decoded and scored per chunk
    (default ``max_batch``, the denoiser's chunk)."""
    from noisesearch.search.base import Problem

    all_prompts = expand_prompts(prompts, num_samples)
    fpc = float(getattr(denoiser, "flops_per_call", 0.0) or 0.0)
    if budget_flops is not None and fpc > 0 and budget_flops / fpc > MAX_NFE:
        raise NoiseSearchError(f"--budget-flops {budget_flops:g} buys {budget_flops / fpc:.3g} NFEs of this model per sample; "
                               f"at most {MAX_NFE:g} (lower --budget-flops)")
    searches = list(range(len(all_prompts))) if searches is None else [int(i) for i in searches]
    if not searches or min(searches) < 0 or max(searches) >= len(all_prompts):
        raise NoiseSearchError(f"searches must be indices in [0, {len(all_prompts)}), got {searches[:5]}")
    all_prompts = [all_prompts[i] for i in searches]
    budget = Budget(len(all_prompts), nfe=budget_nfe, flops=budget_flops, cost=cost_model(denoiser, reward))
    samp = as_sampler(sampler, denoiser, steps, max_batch=max_batch, budget=budget, **(sampler_options or {}))
    check_search_memory(samp, budget, len(all_prompts), denoiser)
    cond = denoiser.encode(all_prompts)
    noise = NoiseSource(seed, samp.noise_shape, [(i // num_samples, i % num_samples) for i in searches],
                        device=denoiser.device, dtype=denoiser.dtype)
    if score_batch is not None and score_batch < 1:
        raise NoiseSearchError(f"--score-batch must be at least 1, got {score_batch}")
    return Problem(samp, reward, budget, all_prompts, cond, noise, score_batch=score_batch)


__all__ = ["as_denoiser", "as_reward", "as_sampler", "build_problem", "cost_model", "expand_prompts"]
