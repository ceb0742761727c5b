"""The one place that turns names (and users' objects) into a denoiser, rewards, a strategy, a sampler
and a problem.

Used by the API (``api.generate``), the benchmarks and pool generation, so that ``--model``,
``--reward``, ``--prune-reward`` and ``--sampler`` mean the same everywhere and every problem is
priced the same way: one :class:`~noisesearch.budget.CostModel` from the denoiser's
``flops_per_call`` and ``flops_per_decode`` and the reward's ``flops_per_image``, one
:class:`~noisesearch.noise.NoiseSource` from the seed.

A model may be a name, a folder, a loaded diffusers pipeline or a denoiser object
(:func:`noisesearch.models.load_model`); a reward a spec, a ``Reward`` object or a plain function
(:func:`noisesearch.rewards.base.as_reward`). Strategies only ever receive objects.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from noisesearch.budget import Budget, CostModel
from noisesearch.errors import NoiseSearchError
from noisesearch.models import load_model
from noisesearch.models.base import Denoiser
from noisesearch.noise import NoiseSource
from noisesearch.rewards.base import Reward, score, split_specs, with_flops
from noisesearch.rewards.base import as_reward as _as_reward
from noisesearch.rewards.noise_aware import is_noise_aware_dir, load_noise_aware
from noisesearch.sampling.samplers import Sampler, make_sampler
from noisesearch.search import STRATEGIES, Strategy, make_strategy
from noisesearch.search.base import Problem
from noisesearch.validate import MAX_NFE, check_memory


def as_denoiser(model: Any, device: str | None = None, guidance: float | None = None,
                options: dict[str, Any] | None = None) -> Denoiser:
    """A denoiser from a name (``digits``, ``galaxygrad:hsc32``, a diffusers folder or hub name), a
    loaded diffusers pipeline or a denoiser object (:func:`noisesearch.models.load_model`; the options
    apply to objects as to folders; ``device``/``guidance`` None keep an object's own)."""
    return load_model(model, device=device, guidance=guidance, **(options or {}))


def as_reward(reward: Any, device: str | torch.device = "cpu", flops_per_image: float | None = None) -> Reward:
    """A reward from a spec (``digit``, ``0.7*digit+0.3*brightness``, ``ranksum(a,b)``,
    ``mypkg.rewards:sharpness``), a ``Reward`` object or a plain function ``f(images, prompts) -> [B]``;
    ``flops_per_image`` declares or overrides its price per image (``--reward-flops``)."""
    return with_flops(_as_reward(reward, device), flops_per_image)


def as_eval_rewards(rewards: Any, device: str | torch.device = "cpu") -> list[tuple[str, Reward]]:
    """Evaluation rewards as ``[(key, reward)]``: a comma-separated string of specs, or a sequence of
    specs, ``Reward`` objects and functions. The key is the spec as given, or the reward's name for an
    object; repeated keys are kept once."""
    items = split_specs(rewards) if isinstance(rewards, str) else list(rewards or ())
    out: dict[str, Reward] = {}
    for item in items:
        fn = as_reward(item, device)
        out.setdefault(item.strip() if isinstance(item, str) else fn.name, fn)
    return list(out.items())


def as_prune_reward(reward: Any, device: str | torch.device = "cpu") -> Reward | None:
    """The reward scoring a pruning strategy's checks: None or ``""`` (the search's own reward), a
    noise-aware checkpoint folder (``train-reward``'s ``--out``), any reward spec, a ``Reward`` object
    or a plain function."""
    if reward is None or (isinstance(reward, str) and not reward.strip()):
        return None
    if isinstance(reward, str):
        spec = reward.strip()
        looks_like_path = "@" not in spec and ("/" in spec or spec.startswith((".", "~")))
        if is_noise_aware_dir(spec) or Path(spec).is_dir() or looks_like_path:
            return load_noise_aware(spec, device)  # a folder without a finished manifest gets a clear error
    return as_reward(reward, device)


def as_strategy(strategy: Any, options: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> Strategy:
    """A strategy from a name and its options (``make_strategy``) or the object itself, with a
    ``prune_reward`` given by name, folder or function resolved to a ``Reward`` object here (strategies
    take objects only). Unknown strategies and options are refused before any reward is loaded."""
    options = dict(options or {})
    if not isinstance(strategy, str):
        if options:
            raise NoiseSearchError("strategy options apply to a strategy given by name; set them on the strategy object")
        if getattr(strategy, "prune_reward", None) is None or not dataclasses.is_dataclass(strategy):
            return strategy
        return dataclasses.replace(strategy, prune_reward=as_prune_reward(strategy.prune_reward, device))
    prune = options.pop("prune_reward", None)
    strat = make_strategy(strategy, **options)
    if prune is None:
        return strat
    if "prune_reward" not in {f.name for f in dataclasses.fields(STRATEGIES[strategy])}:
        make_strategy(strategy, prune_reward=None, **options)  # the one-line "does not apply" error
    return dataclasses.replace(strat, prune_reward=as_prune_reward(prune, device))


def as_sampler(name: str, denoiser: Denoiser, steps: int | None = None, max_batch: int = 512, budget: Budget | None = None,
               **options) -> Sampler:
    if steps is not None and steps < 1:
        raise NoiseSearchError(f"--steps must be at least 1, got {steps}")
    if max_batch < 1:
        raise NoiseSearchError(f"--max-batch must be at least 1, got {max_batch}")
    return make_sampler(name, denoiser, steps, max_batch=max_batch, budget=budget, **options)


def resolve_prompts(prompts: Sequence[str] | str | None, denoiser: Denoiser) -> list[str]:
    """The prompts of a run: as given (a single string is one prompt); for an unconditional denoiser
    (``conditional`` False) they are optional and default to one empty prompt."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or len(prompts) == 0:
        if getattr(denoiser, "conditional", True):
            raise NoiseSearchError("give at least one prompt (--prompt or --prompts-file; "
                                   "prompts are optional only for unconditional models)")
        return [""]
    return [str(p) for p in prompts]


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
                 "--budget-nfe/--budget-flops or --num-samples", total=total)


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


def probe_images(problem, n: int = 2, seed: int = 0) -> torch.Tensor:
    """``n`` images the problem's denoiser decodes from random estimates (its own generator, not the
    search's noise): what rewards are probed with before a search. One decode, no network call."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *problem.sampler.noise_shape), generator=g)
    den = problem.denoiser
    with torch.no_grad():
        return den.decode(x0.to(getattr(den, "device", "cpu"), getattr(den, "dtype", torch.float32))).float().cpu()


def probe_rewards(problem, rewards: Sequence[tuple[str, Reward]], images: torch.Tensor | None = None) -> torch.Tensor:
    """Score a few probe images (:func:`probe_images`) with each ``(what, reward)`` for the first
    prompts of the problem, before any search: a reward that fails, returns NaN or the wrong shape is
    refused with one line naming it (``what``, e.g. ``--eval-reward hps@DIR``). Returns the images."""
    images = probe_images(problem) if images is None else images
    prompts = [problem.prompts[i % len(problem.prompts)] for i in range(images.shape[0])]
    for what, reward in rewards:
        try:
            score(reward, images, prompts)
        except NoiseSearchError as e:
            raise NoiseSearchError(f"{what}, probed before the search: {e}") from None
    return images


__all__ = ["as_denoiser", "as_reward", "as_eval_rewards", "as_prune_reward", "as_strategy", "as_sampler", "build_problem",
           "cost_model", "expand_prompts", "resolve_prompts", "probe_images", "probe_rewards"]
