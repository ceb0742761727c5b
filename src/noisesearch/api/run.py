"""The high-level Python API: ``generate(...)`` runs one search end to end and ``save_run`` writes it.

    import noisesearch
    run = noisesearch.generate(model="digits", prompts=["3"], guidance=0, reward="digit",
                               strategy="best-of-n", budget_nfe=360, num_samples=16, seed=0)
    print(run.report["reward_mean"]); noisesearch.save_run(run, "runs/demo")

Everything is built from names (``model``, ``reward``, ``strategy``, ``sampler``) or from objects
(a loaded diffusers pipeline, a Denoiser, a Reward, a plain function ``f(images, prompts) -> [B]``,
a Strategy) in one place (:mod:`noisesearch.build`), so the same call works for the built-in digits
model and for a pipeline already in memory. Randomness flows from ``seed`` through one noise source
with a stream per search (``noisesearch.noise``): adding a prompt does not change the samples of the
others.

The steps of :func:`generate` are named functions over one :class:`GenerateConfig`:
:func:`load_parts` (model, rewards, strategy), :func:`make_problem`, :func:`probe` (every reward scores
a few decoded images before the search; the output folder's disk space is checked),
:func:`run_search`, :func:`make_report` (with :func:`evaluate_rewards`) and :func:`save_run`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from noisesearch import __version__
from noisesearch.budget import Budget
from noisesearch.build import (  # noqa: F401 (as_denoiser, as_reward, expand_prompts: re-exported)
    as_denoiser,
    as_eval_rewards,
    as_reward,
    as_strategy,
    build_problem,
    expand_prompts,
    probe_rewards,
    resolve_prompts,
)
from noisesearch.errors import NoiseSearchError
from noisesearch.figures import save_labelled_grid
from noisesearch.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_disk,
    keep_failed_writes,
    output_lock,
    save_png,
    to_pil,
)
from noisesearch.models.base import Denoiser, describe_denoiser
from noisesearch.progress import Progress
from noisesearch.rewards.base import Reward, is_noise_aware, score
from noisesearch.search import Strategy
from noisesearch.search.trace import SearchTrace, plot_search
from noisesearch.validate import output_dir


@dataclass
class Run:
    """A finished search: chosen images per sample and the report (what ``report.json`` holds).
    ``config``: the options of the run keyed as the CLI's flags (written as ``config.yaml``)."""

    images: torch.Tensor  # [P, C, H, W] in [0, 1]
    x0: torch.Tensor  # [P, *sample_shape] (latents for latent models)
    report: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None


@dataclass
class GenerateConfig:
    """Everything :func:`generate` takes (its keyword arguments, with the same names and defaults).

    ``model``: a name (``digits``, ``galaxygrad:hsc32``), a diffusers folder or hub name, a loaded
    diffusers pipeline object or a Denoiser; ``model_options`` (``height``, ``width``, ``dtype``,
    ``negative_prompt``, ``variant``, ``default_steps``, ``decode_batch``; for flow pipelines also
    ``embedded_guidance``, ``offload``, ``vae_tiling``, ``negtome``) apply to names and objects alike.
    ``guidance``/``device`` None: 1 and the CPU for names, an object's own for objects.
    ``prompts``: optional for unconditional models (one empty prompt).
    ``reward``: a spec, a Reward or a function; ``reward_flops`` declares or overrides its price per
    image (an unpriced function costs 0 FLOPs: a FLOP budget then buys only network evaluations and
    decodes). ``eval_rewards``: rewards not optimised that score the chosen samples after the search,
    outside the budget (specs, a comma-separated string, Reward objects or functions); with
    ``evaluate`` the model's own evaluation rewards (``denoiser.eval_rewards``, the digits judge) too.
    ``strategy``: a name with ``strategy_options`` (``prune_reward`` by name, folder or function) or
    a Strategy. ``max_batch`` rows per denoiser call, ``score_batch`` (default ``max_batch``) rows per
    decode + reward call. ``shard=(rank, world)``: only the searches ``i % world == rank`` (see
    :func:`merge_runs`). ``trace``: record the scored candidates for ``search.png``. ``out``: the run
    folder: its disk space is checked before the search and, with ``save``, it is held
    (``io.output_lock``) for the whole call and written by :func:`save_run`."""

    model: Any = "digits"
    prompts: Sequence[str] | str | None = None
    reward: Any = None  # None: the model's default_reward (digit for the digits model)
    strategy: Any = "best-of-n"
    budget_nfe: float | None = None
    budget_flops: float | None = None
    num_samples: int = 1
    guidance: float | None = None
    steps: int | None = None
    sampler: str = "euler-ancestral"
    seed: int = 0
    device: str | None = None
    max_batch: int = 512
    strategy_options: dict[str, Any] | None = None
    progress: bool = False
    evaluate: bool = True
    model_options: dict[str, Any] | None = None
    shard: tuple[int, int] | None = None
    score_batch: int | None = None
    eval_rewards: Sequence[Any] | str = ()
    trace: bool = True
    reward_flops: float | None = None
    out: str | Path | None = None
    save: bool = True


def generate(model: Any = "digits", prompts: Sequence[str] | str | None = None, reward: Any = None,
             strategy: str | Strategy = "best-of-n", budget_nfe: float | None = None, budget_flops: float | None = None,
             num_samples: int = 1, guidance: float | None = None, steps: int | None = None,
             sampler: str = "euler-ancestral", seed: int = 0, device: str | None = None, max_batch: int = 512,
             strategy_options: dict[str, Any] | None = None, progress: bool = False, evaluate: bool = True,
             model_options: dict[str, Any] | None = None, shard: tuple[int, int] | None = None,
             score_batch: int | None = None, eval_rewards: Sequence[Any] | str = (), trace: bool = True,
             reward_flops: float | None = None, out: str | Path | None = None, save: bool = True) -> Run:
    """Run one search (see the module docstring; every argument is described on
    :class:`GenerateConfig`). Raises ``NoiseSearchError`` (one line) on bad input, before any search."""
    return run_generate(GenerateConfig(**locals()))


def run_generate(cfg: GenerateConfig) -> Run:
    """:func:`generate` from a :class:`GenerateConfig`: the named steps in order."""
    _check_shard(cfg)
    _check_device(cfg.device)
    hold = cfg.out is not None and cfg.save
    if hold:  # new, empty or an earlier run's folder (checked before it is locked, which adds the lock files)
        output_dir(Path(cfg.out), "generate", ["report.json"])
    with output_lock(cfg.out, "noisesearch generate") if hold else contextlib.nullcontext():
        t0 = time.perf_counter()
        parts = load_parts(cfg)
        problem = make_problem(cfg, parts)
        probe(cfg, parts, problem)
        load_seconds = time.perf_counter() - t0
        result, wall = run_search(parts.strategy, problem, cfg.progress)
        run = make_run(cfg, parts, problem, result, wall, load_seconds)
        if hold:
            save_run(run, cfg.out)
    return run


def _check_shard(cfg: GenerateConfig) -> None:
    if cfg.shard is None:
        return
    try:
        rank, world = (int(v) for v in cfg.shard)
    except (TypeError, ValueError):
        raise NoiseSearchError(f"shard=(rank, world) takes two whole numbers, got {cfg.shard!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise NoiseSearchError(f"shard=(rank, world) needs 0 <= rank < world, got {tuple(cfg.shard)}")


def _check_device(device) -> None:
    """``device=``: a torch device that is there (a missing GPU is one line, not torch's assertion)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise NoiseSearchError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NoiseSearchError(f"device={device!r}: no CUDA device is available here; use 'cpu'")


@dataclass
class Parts:
    """What a run is made of, resolved from the config: objects only."""

    strategy: Strategy
    denoiser: Denoiser
    reward: Reward
    eval_rewards: list[tuple[str, Reward]]
    prompts: list[str]


def load_parts(cfg: GenerateConfig) -> Parts:
    """The strategy (first: unknown names and options are refused before anything loads), the
    denoiser, the rewards and the prompts."""
    device = cfg.device
    strat = as_strategy(cfg.strategy, cfg.strategy_options, device or "cpu")
    denoiser = as_denoiser(cfg.model, device=device, guidance=cfg.guidance, options=cfg.model_options)
    rdevice = device or str(getattr(denoiser, "device", "cpu") or "cpu")
    prompts = resolve_prompts(cfg.prompts, denoiser)
    reward = as_reward(model_reward(cfg.reward, denoiser), device=rdevice, flops_per_image=cfg.reward_flops)
    specs = list(as_eval_rewards(cfg.eval_rewards, rdevice))
    if cfg.evaluate:
        specs += [(s, r) for s, r in as_eval_rewards(list(getattr(denoiser, "eval_rewards", ()) or ()), rdevice)
                  if s not in dict(specs)]
    return Parts(strat, denoiser, reward, specs, prompts)


def model_reward(reward: Any, denoiser) -> Any:
    """The reward as given; None: the model's own default (``denoiser.default_reward``: ``digit`` for the
    built-in digits model), else a one-line error asking for one."""
    if reward is not None:
        return reward
    default = getattr(denoiser, "default_reward", None)
    if default is None:
        raise NoiseSearchError(f"give a reward (--reward) for model {getattr(denoiser, 'name', type(denoiser).__name__)}: "
                               "a name, a spec such as clip@DIR, a function f(images, prompts) -> [B] "
                               "(on the command line mypackage.rewards:f)")
    return default


def make_problem(cfg: GenerateConfig, parts: Parts):
    """The problem (budget, sampler, noise, prompts) of the searches this process runs; a run with
    more processes than searches is refused."""
    searches = shard_searches(cfg, len(parts.prompts))
    problem = build_problem(parts.denoiser, parts.reward, parts.prompts, num_samples=cfg.num_samples,
                            budget_nfe=cfg.budget_nfe, budget_flops=cfg.budget_flops, steps=cfg.steps,
                            sampler=cfg.sampler, seed=cfg.seed, max_batch=cfg.max_batch, searches=searches,
                            score_batch=cfg.score_batch)
    if cfg.trace and cfg.shard is None:  # search.png is drawn for single-process runs only
        problem.trace = SearchTrace(owners=set(range(0, len(problem.prompts), cfg.num_samples)))
    return problem


def shard_searches(cfg: GenerateConfig, num_prompts: int) -> list[int] | None:
    """The global indices of the searches this process runs (None: all of them)."""
    if cfg.shard is None:
        return None
    total = num_prompts * cfg.num_samples
    rank, world = (int(v) for v in cfg.shard)
    searches = list(range(rank, total, world))
    if not searches:
        raise NoiseSearchError(f"{world} processes for {total} searches: launch at most {total} processes")
    return searches


def probe(cfg: GenerateConfig, parts: Parts, problem) -> None:
    """Before the search: the reward and every evaluation reward score a few decoded images (a NaN,
    a failure or a wrong shape is refused now, not after the search), and the output folder has the
    disk space the run will write."""
    checks = [("--reward " + parts.reward.name, parts.reward)] if not is_noise_aware(parts.reward) else []
    checks += [(f"--eval-reward {spec}", r) for spec, r in parts.eval_rewards]
    images = probe_rewards(problem, checks)
    if cfg.out is not None:
        check_disk(cfg.out, run_bytes(images.shape[1:], problem.num_searches, cfg.trace), "the run's images and report")


def run_bytes(image_shape: Sequence[int], num_images: int, trace: bool = False) -> float:
    """About the bytes a run folder takes (an upper estimate): ``images.npy`` (float32), one PNG per
    sample and the grids (at most raw size, upscaled to 64 px for tiny images), the report."""
    raw = math.prod(image_shape)
    cell = max(raw, 64 * 64 * 3)
    grids = 2 if trace else 1
    return num_images * (4 * raw + raw + grids * cell + 2048) + 2**20


def run_search(strategy: Strategy, problem, progress: bool) -> tuple[Any, float]:
    """The search itself (gradients off), with a progress display over the budget; (result, seconds)."""
    bar = _Progress(problem.budget, progress, desc=f"{strategy.name}")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            result = strategy.search(problem)
    finally:
        bar.close()
    return result, time.perf_counter() - t0


def make_run(cfg: GenerateConfig, parts: Parts, problem, result, wall: float, load_seconds: float) -> Run:
    """Decode the chosen samples, write the report (evaluations included) and the config."""
    images = parts.denoiser.decode(result.x0).float().cpu()
    report = make_report(cfg, parts, problem, result, wall, load_seconds)
    if parts.eval_rewards:
        evaluate_rewards(report, images, problem.prompts, parts.eval_rewards)
    extra = {"info": result.info}
    if problem.trace is not None:
        extra["trace"] = problem.trace
    return Run(images=images, x0=result.x0.detach().cpu(), report=report, extra=extra, config=run_config_dict(cfg, parts))


def _samples(problem, result, searches: list[int] | None) -> list[dict]:
    budget = problem.budget
    return [{"index": i if searches is None else searches[i], "prompt": p, "reward": float(result.rewards[i]),
             "nfe": int(budget.nfe[i]), "reward_calls": int(budget.reward_calls[i]), "flops": float(budget.flops[i])}
            for i, p in enumerate(problem.prompts)]


def _plain(value):
    """A value for the report: rewards and other objects by name."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "name", None) or type(value).__name__


def strategy_params(strategy: Strategy) -> dict[str, Any]:
    """The strategy's options as plain values (a prune reward by its name)."""
    if not dataclasses.is_dataclass(strategy):
        return {}
    return {f.name: _plain(getattr(strategy, f.name)) for f in dataclasses.fields(strategy)}


def make_report(cfg: GenerateConfig, parts: Parts, problem, result, wall: float, load_seconds: float) -> dict[str, Any]:
    """``report.json``: what ran (the denoiser as described by ``describe_denoiser``, not the
    arguments), what it spent and what it scored."""
    d = describe_denoiser(parts.denoiser)
    samples = _samples(problem, result, shard_searches(cfg, len(parts.prompts)))
    samp = problem.sampler
    report: dict[str, Any] = {
        "noisesearch_version": __version__,
        "model": d.get("name") or d["class"],
        "denoiser": d,
        "guidance": d.get("guidance"),
        "dtype": d.get("dtype"),
        "model_options": {k: str(v) for k, v in (cfg.model_options or {}).items()},
        "reward": parts.reward.name,
        "reward_flops_per_image": float(parts.reward.flops_per_image),
        "strategy": parts.strategy.name,
        "params": strategy_params(parts.strategy),
        "sampler": samp.name, "steps": samp.num_steps, "nfe_per_trajectory": samp.nfe_per_trajectory,
        "seed": cfg.seed, "num_samples": cfg.num_samples, "prompts": list(parts.prompts), "samples": samples,
        "reward_mean": float(result.rewards.mean()),
        "reward_std": float(result.rewards.std()) if len(samples) > 1 else 0.0,
        **problem.budget.summary(),
        "wall_seconds": wall, "load_seconds": load_seconds,
        "device": d.get("device") or str(cfg.device or "cpu"),
        "torch": torch.__version__, "python": platform.python_version(),
        "strategy_info": {k: v for k, v in result.info.items() if k != "all_rewards"},
    }
    if hasattr(parts.denoiser, "encode_cost"):  # equal for every strategy: reported, not charged
        report["prompt_encoding"] = parts.denoiser.encode_cost()
    return report


def evaluate_rewards(report: dict, images: torch.Tensor, prompts: Sequence[str], rewards) -> None:
    """Score the chosen samples with rewards that were not optimised, in place: each sample gets
    ``"eval_rewards": {key: value}`` (and ``"<key>_<detail>"`` for a reward with ``details``, e.g.
    the judge's ``judge_class`` and ``judge_prob``), the report ``"eval_rewards": {key: {mean, std,
    name, flops_per_image}}`` and, where the judge is among them, ``judge_accuracy`` (the mean of
    ``judge``). Not charged to the search budget: a reward the search hacked scores high on its own
    reward, not on these. An evaluation reward that fails on the chosen samples (NaN, wrong shape; it was
    probed before the search) is left out with a warning and ``report["eval_errors"]``: the search is kept."""
    meta = {}
    for key, fn in rewards:
        try:
            values = score(fn, images, list(prompts))
        except NoiseSearchError as e:  # probed fine before the search, failed on its results: keep the run
            report.setdefault("eval_errors", {})[key] = str(e)
            print(f"warning: evaluation reward {key!r} failed on the chosen samples, the run is kept without it: {e}",
                  file=sys.stderr)
            continue
        for s, v in zip(report["samples"], values.tolist()):
            s.setdefault("eval_rewards", {})[key] = float(v)
        details = getattr(fn, "details", None)
        if callable(details):
            with torch.no_grad():
                for name, vals in details(images, list(prompts)).items():
                    for s, v in zip(report["samples"], list(vals)):
                        s[f"{key}_{name}"] = v
        meta[key] = {"name": fn.name, "flops_per_image": float(fn.flops_per_image)}
    report["eval_rewards"] = meta
    summarize_eval(report)


def summarize_eval(report: dict) -> None:
    """The evaluation rewards' means and spreads from the samples' values (also after merging
    shards), and ``judge_accuracy``: the mean of ``judge`` among them."""
    for key, meta in report.get("eval_rewards", {}).items():
        values = [s["eval_rewards"][key] for s in report["samples"]]
        meta.update(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)
    if "judge" in report.get("eval_rewards", {}):
        report["judge_accuracy"] = report["eval_rewards"]["judge"]["mean"]


def merge_runs(runs: Sequence[Run]) -> Run:
    """One run from the runs of the shards of a multi-process ``generate`` (see ``shard``): samples
    in global order, aggregates recomputed from the per-sample figures, wall time the slowest shard's."""
    if len(runs) == 1:
        return runs[0]
    pairs = sorted(((s["index"], r, j) for r in runs for j, s in enumerate(r.report["samples"])), key=lambda t: t[0])
    samples = [r.report["samples"][j] for _, r, j in pairs]
    if [s["index"] for s in samples] != list(range(len(samples))):
        raise NoiseSearchError("the shards of this run do not cover every search exactly once")
    first = runs[0].report
    report = dict(first, eval_rewards={k: dict(v) for k, v in first.get("eval_rewards", {}).items()})
    rewards, nfe, flops = ([s[k] for s in samples] for k in ("reward", "nfe", "flops"))
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
    summarize_eval(report)
    images = torch.stack([r.images[j] for _, r, j in pairs])
    x0 = torch.stack([r.x0[j] for _, r, j in pairs])
    return Run(images=images, x0=x0, report=report, extra={"info": [r.extra.get("info") for r in runs]},
               config=runs[0].config)


# ---- the run's configuration (config.yaml) ---------------------------------------------------------------
def _given_as(value, parts_value=None):
    """How an argument is written in config.yaml: names as given, objects by their name."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_given_as(v) for v in value]
    return getattr(parts_value, "name", None) or getattr(value, "name", None) or getattr(value, "__name__", None) \
        or f"<{type(value).__name__} object>"


def run_config_dict(cfg: GenerateConfig, parts: Parts) -> dict[str, Any]:
    """The run's options keyed as the CLI's flags (``noisesearch generate --config config.yaml``
    repeats a run whose model, rewards and strategy were given by name; objects are recorded by name)."""
    guidance = getattr(parts.denoiser, "guidance", None)
    out: dict[str, Any] = {"command": "generate", "model": _given_as(cfg.model, parts.denoiser),
                           "prompt": list(parts.prompts), "guidance": cfg.guidance if guidance is None else float(guidance),
                           "steps": cfg.steps, "sampler": cfg.sampler, "device": cfg.device or "auto",
                           "max-batch": cfg.max_batch, "score-batch": cfg.score_batch,
                           "reward": _given_as(cfg.reward, parts.reward), "reward-flops": cfg.reward_flops,
                           "eval-reward": [k for k, _ in parts.eval_rewards], "strategy": parts.strategy.name,
                           "budget-nfe": cfg.budget_nfe, "budget-flops": cfg.budget_flops,
                           "num-samples": cfg.num_samples, "seed": cfg.seed}
    out.update({k.replace("_", "-"): _given_as(v) for k, v in (cfg.model_options or {}).items()
                if isinstance(v, (str, int, float, bool))})
    out.update({k.replace("_", "-"): _given_as(v) for k, v in (cfg.strategy_options or {}).items()})
    return out


def _config_text(config: dict[str, Any]) -> str:
    head = ("# noisesearch generate: the options of this run; repeat it with\n"
            "#   noisesearch generate --config THIS_FILE [--out OTHER_FOLDER]\n"
            "# (models, rewards and strategies given as Python objects are recorded by name)\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# ---- the run folder ------------------------------------------------------------------------------------
def save_run(run: Run, out: str | Path, ncol: int | None = None) -> Path:
    """Write the run folder, the same from every entry point (CLI, API, demo): ``samples.png`` (a
    labelled grid: a row per prompt, a column per sample), ``samples/NNNN.png``, ``images.npy``,
    ``search.png`` (with ``trace``), ``config.yaml`` and ``report.json``.

    ``report.json`` is written last and atomically: a folder whose report.json exists is complete.
    A stale report.json from an earlier run in the same folder is removed first. A write that fails
    (a full disk) keeps what was computed elsewhere and says where (``io.keep_failed_writes``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    if report_path.exists():
        report_path.unlink()
    with keep_failed_writes():
        save_samples_grid(run, out / "samples.png", ncol)
        _save_samples(run, out)
        _save_search_plot(run, out)
        atomic_write_text(out / "config.yaml", _config_text(run.config or _config_from_report(run.report)))
        atomic_write_json(report_path, run.report)
    return out


def _config_from_report(report: dict) -> dict[str, Any]:
    """For a run made without a config (an old pickled Run): what the report says."""
    keys = {"model": "model", "prompts": "prompt", "reward": "reward", "strategy": "strategy", "seed": "seed",
            "num_samples": "num-samples", "sampler": "sampler", "guidance": "guidance"}
    return {"command": "generate", **{flag: report.get(k) for k, flag in keys.items() if k in report}}


def save_samples_grid(run: Run, path: Path, ncol: int | None = None, max_rows: int = 32, max_side: int = 256) -> Path:
    """``samples.png``: the chosen samples with a row per prompt (labelled with the prompt, its mean
    reward and judge accuracy) and a column per sample (at most ``ncol``, default 16, and ``max_rows``
    prompts shown; images larger than ``max_side`` pixels shrunk to it)."""
    r = run.report
    samples = r["samples"]
    n = max(1, int(r.get("num_samples", 1)))
    n = n if len(samples) % n == 0 else 1  # prompt-major: sample i of prompt p is row p * n + i
    num_rows, k = min(len(samples) // n, max_rows), min(n, ncol or 16)
    images = run.images[[p * n + j for p in range(num_rows) for j in range(k)]]
    if max(images.shape[-2:]) > max_side:  # a sheet to look at: samples/NNNN.png keep the native resolution
        scale = max_side / max(images.shape[-2:])
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="area")
    row_labels = [_row_label(samples[p * n:(p + 1) * n]) for p in range(num_rows)]
    shown = "" if num_rows * n == len(samples) and k == n else f" (shown: {num_rows} prompts x {k} samples)"
    title = (f"{r.get('strategy')}: {r.get('nfe_max')} NFEs, {r.get('flops_per_sample_max', 0):.3g} FLOPs per sample (max)\n"
             f"reward {r.get('reward')}: mean {r.get('reward_mean', float('nan')):.4g}"
             + (f"; judge accuracy {r['judge_accuracy']:.3f}" if "judge_accuracy" in r else "") + shown)
    return save_labelled_grid(path, images, num_rows, row_labels, [f"sample {j}" for j in range(k)], title)


def _row_label(row: list[dict]) -> str:
    """A prompt's row: the prompt, its mean reward and, with the judge, its judge accuracy."""
    label = f"{_short(row[0]['prompt'])}\nreward {statistics.fmean(s['reward'] for s in row):.3g}"
    judged = [s["eval_rewards"]["judge"] for s in row if "judge" in s.get("eval_rewards", {})]
    return label + (f"\njudge {statistics.fmean(judged):.2f}" if judged else "")


def _short(text: str, n: int = 28) -> str:
    text = str(text) or "(no prompt)"
    return text if len(text) <= n else text[: n - 1] + "…"


def _save_samples(run: Run, out: Path) -> None:
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


def _save_search_plot(run: Run, out: Path) -> None:
    if run.extra.get("trace") is None:
        return

    n = run.report.get("num_samples", 1)
    prompts = [s["prompt"] for s in run.report["samples"]]
    plot_search(out / "search.png", run.extra["trace"], run.images, prompts, list(range(0, len(prompts), n)),
                run.report["strategy"], "survivors" in run.extra.get("info", {}))
    run.report["search_plot"] = "search.png"


class _Progress:
    """Progress over the budget's NFE (or FLOP) limit, fed by budget charges (noisesearch.progress:
    a bar on a terminal, a line every few seconds otherwise; whole units)."""

    def __init__(self, budget: Budget, enabled: bool, desc: str):
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


__all__ = ["Run", "GenerateConfig", "generate", "run_generate", "load_parts", "make_problem", "probe", "run_search",
           "make_run", "make_report", "evaluate_rewards", "summarize_eval", "merge_runs", "save_run", "save_samples_grid",
           "run_bytes"]
