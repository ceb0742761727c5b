"""Noise-aware reward fine-tuning by curriculum self-distillation (TTSnap, Yu et al. 2025).

Input: a pool made with ``noisesearch pool ... --save-images`` (the Tweedie estimate of every
candidate at every step, and the base reward of every estimate), read image by image from its
stored files (``train.pool_data.EstimateDataset``): memory does not grow with the pool. Output: a checkpoint folder loaded
by the reward spec ``noise-aware@DIR`` (``noisesearch.rewards.noise_aware``).

**Self-distillation.** The teacher is the base reward of the *finished* image of the same candidate
(``pool.rewards[name][:, :, -1]``: no teacher forward pass is needed). The student starts as a copy of
the base reward model and learns to predict the teacher's value from the noisy estimate ``x0_s``:
``MSE(student(x0_s), teacher)``, optionally plus a pairwise preference loss (logistic loss on the
student's score difference of two candidates of the same prompt, the label being which one the
teacher prefers), weighted by ``pairwise``.

**Curriculum.** One stage per pool step, walking from late (clean) to early (noisy) steps:
``S-2, S-3, ..., 0`` by default (the finished image ``S-1`` is the teacher's own input, scored by the
base reward). Stage ``k`` starts from stage ``k-1``'s weights (stage 0 from the base reward), uses a
fresh optimizer (AdamW) whose learning rate starts at ``lr * lr_decay**k`` and follows a cosine to
zero over the stage's ``iters`` optimizer steps. A share ``replay`` of each batch replays the steps
of earlier stages (and the finished image) so that the model does not forget them. After each stage
its weights are saved (``stage_SS.safetensors``, LoRA merged) and used to score that step: every
step gets the model that was fine-tuned last on it, at the end of a curriculum that reached it from
the clean end. (The paper uses the curriculum's final model; keeping the per-stage snapshots costs
disk, not compute, and never scores a step with a model that has moved on to noisier inputs.)

**LoRA.** ``lora_rank > 0`` trains a fresh LoRA adapter (``peft``; on every Linear / Conv2d layer of
the reward's module) per stage on top of the previous stage's merged weights; ``0`` fine-tunes every
weight. **accelerate** wraps model, optimizer and backward (``accelerate launch`` for several GPUs:
each process draws its own batches, gradients are averaged). **Resumable:** ``train_state.json``
records the finished stages; a rerun with the same configuration continues after the last one
(each stage is seeded from ``(seed, step)``, so a resumed run equals an uninterrupted one). Every
stage file records its step and the run's digest: a file that fails its checksum is retrained, a
file that holds another step or run (copied over) is refused. The manifest ``noise_aware.json`` is
written last; the run holds ``io.output_lock(out)``.

**Held-out candidates.** The last ``holdout`` share of candidates of every prompt is never trained on;
per stage the Spearman correlation (per prompt, averaged) with the final reward on them is recorded
for the base reward and the student.

**Step conditioning** (``step_conditioning``, TTSnap's alternative): the student is wrapped by
``noisesearch.rewards.step_conditioning.StepConditioned`` (adaLN-Zero on the ViT layers, FiLM-Zero
on other models; the identity at initialisation) and told each image's noise level ``sigma``; the
curriculum is the same, and the *final* stage's model scores every trained step (one model, no
per-step snapshots); held-out metrics of that final model are recorded per step
(``heldout_spearman_final_model``) and the gate uses them.

Trainable rewards expose ``module`` (a ``torch.nn.Module``) and compute ``reward(images, prompts)``
through it, differentiably (e.g. the ``digit`` reward).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from noisesearch.dist import destroy_at_exit
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_json, output_lock
from noisesearch.pools import load_pool
from noisesearch.pools.images import PoolImages
from noisesearch.progress import Progress
from noisesearch.pruning import select_top
from noisesearch.rewards.base import make_reward
from noisesearch.rewards.noise_aware import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    load_stage,
    read_stage,
    save_stage,
    stage_identity_error,
)
from noisesearch.rewards.step_conditioning import StepConditioned, set_condition
from noisesearch.train.pool_data import EstimateDataset

STATE = "train_state.json"
MIN_HELD = 16  # fewer held-out candidates per prompt than this: the quality gate is warned about


@dataclass
class TrainConfig:
    reward: str = "digit"  # the pool's reward (teacher values); also the spec of the model to fine-tune
    reward_spec: str = ""  # spec of the base reward model if it differs from the pool name ("" = from the pool)
    steps: tuple[int, ...] = ()  # pool steps to train, any order (walked late -> early); () = 0 .. S-2
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = lora_rank
    lr: float = 3e-3  # start learning rate of the first stage
    lr_decay: float = 0.9  # start learning rate of stage k: lr * lr_decay**k
    iters: int = 400  # optimizer steps per stage
    batch_size: int = 128
    replay: float = 0.25  # share of each batch from the steps of earlier stages (and the final image)
    pairwise: float = 0.0  # weight of the pairwise preference loss (0 = MSE only)
    weight_decay: float = 0.0
    holdout: float = 0.2  # share of candidates per prompt held out (the last ones)
    cross_prompts: bool = False  # also distil the teacher's reward of each image for the pool's other prompts
    gate: bool = True  # drop stages worse than the base reward on held-out candidates by > 1 standard error
    seed: int = 0
    step_conditioning: bool = False  # adaLN-Zero on the noise level: one model (the final stage's) for all steps
    cond_dim: int = 64  # width of the noise-level embedding of step_conditioning

    def check(self) -> None:
        if self.lora_rank < 0:
            raise NoiseSearchError("--lora-rank must be >= 0 (0 = full fine-tuning)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NoiseSearchError("--lr must be a positive number")
        if not 0 < self.lr_decay <= 1:
            raise NoiseSearchError("--lr-decay must be in (0, 1]")
        if self.iters < 1 or self.batch_size < 1:
            raise NoiseSearchError("--iters and --batch-size must be at least 1")
        if not 0 <= self.replay < 1:
            raise NoiseSearchError("--replay must be in [0, 1)")
        if self.pairwise < 0:
            raise NoiseSearchError("--pairwise must be >= 0")
        if not 0 <= self.holdout < 1:
            raise NoiseSearchError("--holdout must be in [0, 1)")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties get their mean rank), as in Spearman's rho."""
    from scipy.stats import rankdata  # deferred: heavy (scipy), only this rank statistic needs it

    return rankdata(x, axis=-1)


def spearman_per_prompt(scores: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Spearman correlation per prompt of ``scores`` [P, N] with ``final`` [P, N] (NaN if constant)."""
    a, b = _ranks(np.asarray(scores, float)), _ranks(np.asarray(final, float))
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1), np.nan)


def topk_recall(scores: np.ndarray, final: np.ndarray, k: int) -> np.ndarray:
    """Per prompt: share of the ``k`` best candidates by ``final`` found among the ``k`` best by
    ``scores`` (ties to the lower index, as in pruning)."""
    top_s = select_top(np.asarray(scores), k, axis=-1)
    top_f = select_top(np.asarray(final), k, axis=-1)
    return np.array([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_s, top_f)])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage_file(step: int) -> str:
    return f"stage_{step:02d}.safetensors"


def _trainable_module(reward) -> torch.nn.Module:
    module = getattr(reward, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise NoiseSearchError(
            f"reward {getattr(reward, 'name', reward)!r} cannot be fine-tuned: it exposes no torch module "
            "(a trainable reward has a `module` attribute used by its __call__)"
        )
    return module


def _lora_targets(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name]


def _wrap_lora(module: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model  # deferred: optional heavy dependency (peft)
    except ImportError:  # pragma: no cover
        raise NoiseSearchError("LoRA needs peft: pip install peft (or use --lora-rank 0)") from None
    targets = _lora_targets(module)
    if not targets:
        raise NoiseSearchError("LoRA: the reward's module has no Linear or Conv2d layers to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0, bias="none")
    return get_peft_model(module, config)


def _merge_lora(model) -> torch.nn.Module:
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


@torch.no_grad()
def _predict(reward, data: EstimateDataset, cand: np.ndarray, step: int, device, batch: int = 128, sigma=None) -> np.ndarray:
    """Reward of the estimates at ``step`` of candidates ``cand`` of every prompt: [P, len(cand)],
    ``batch`` images at a time (``sigma``: the noise level told to a step-conditioned module)."""
    if sigma is not None:
        set_condition(reward.module, float(sigma))
    P = data.P
    pp, cc = np.meshgrid(np.arange(P), cand, indexing="ij")
    pp, cc = pp.ravel(), cc.ravel()
    out = []
    for lo in range(0, len(pp), batch):
        x, _, prompts = data.batch(pp[lo:lo + batch], cc[lo:lo + batch], np.full(len(pp[lo:lo + batch]), step), device)
        out.append(torch.as_tensor(reward(x, prompts)).float().cpu())
    return torch.cat(out).numpy().reshape(P, len(cand))


def _loss(pred: torch.Tensor, y: torch.Tensor, rows_p: torch.Tensor, pairwise: float) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(pred, y)
    if pairwise > 0:
        same = rows_p[:, None] == rows_p[None, :]
        diff_y = y[:, None] - y[None, :]
        mask = same & (diff_y.abs() > 1e-6)
        if mask.any():
            logits = (pred[:, None] - pred[None, :])[mask]
            target = (diff_y[mask] > 0).float()
            loss = loss + pairwise * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    return loss


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """A training run, set up: the pool and its reward, the curriculum, the teacher, the data, and
    what the run is (``identity`` and its ``digest``, recorded in the state and in every stage file)."""

    config: TrainConfig
    pool: Any
    pool_dir: Path
    name: str  # the pool's key of the reward
    spec: str  # the spec of the reward model that is fine-tuned
    steps: list  # the curriculum: late -> early
    out: Path
    acc: Any
    teacher: Any
    data: EstimateDataset
    sigmas: np.ndarray
    identity: dict
    digest: str
    log: Callable

    @property
    def dev(self):
        return self.acc.device

    @property
    def S(self) -> int:
        return self.pool.shape[2]

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def final_held(self) -> np.ndarray:
        return self.data.own[:, self.data.held]

    @property
    def k_top(self) -> int:
        return max(1, len(self.data.held) // 10)


def train_noise_aware(pool_path, out, config: TrainConfig = TrainConfig(), device: str = "cpu",
                      progress: bool = False, log=print, stop_after: int | None = None, lock: bool = True) -> dict:
    """Train (or continue training) a noise-aware reward into ``out``; returns the manifest.

    ``config.reward`` names the pool's reward by its key or by the spec the pool was made with.
    The run holds ``io.output_lock(out)`` (``lock=False``: the caller holds it, as the CLI does): a
    second run into the same folder is refused.
    ``stop_after``: run at most this many stages in this call, then return the train state (resume
    by calling again) - used by the tests to simulate an interruption. Torch's global CPU random
    state is restored on return (each stage seeds it for its LoRA initialisation and dropout).
    """
    rng_state = torch.get_rng_state()
    try:
        config.check()
        run = _setup(pool_path, out, config, device, log)
        hold = run.main and lock
        with output_lock(out, "noisesearch train-reward") if hold else contextlib.nullcontext():
            return _train(run, progress, stop_after)
    finally:
        torch.set_rng_state(rng_state)


def _train(run: _Run, progress: bool, stop_after: int | None) -> dict:
    state = _resume_state(run)
    manifest = _finished_manifest(run, state)
    if manifest is not None:
        return manifest
    student = _initial_student(run, state)
    student = _run_stages(run, state, student, progress, stop_after)
    if len({int(e["step"]) for e in state["stages"]}) < len(run.steps):
        return state
    if run.config.step_conditioning and len(run.data.held) >= 2:
        _final_model_metrics(run, state, student)
    return _write_manifest(run, state, student)


# ---- setting up ----------------------------------------------------------------------------------
def _setup(pool_path, out, config: TrainConfig, device: str, log) -> _Run:
    pool = load_pool(pool_path)
    name = pool.reward_key(config.reward)
    S = pool.shape[2]
    if S < 2:
        raise NoiseSearchError("the pool has a single step: nothing to train")
    steps = _curriculum(config, S)
    spec = config.reward_spec or (pool.extra.get("reward_specs") or {}).get(name) or name
    pool_dir = Path(pool_path)
    pool_dir = pool_dir.parent if pool_dir.is_file() else pool_dir
    images = PoolImages(pool_dir, pool)  # refuses a pool made without --save-images
    acc = _accelerator(device)
    teacher = make_reward(spec, device=acc.device)
    _trainable_module(teacher)
    data = EstimateDataset(pool, images, name, config.holdout, teacher if config.cross_prompts else None, acc.device,
                           batch=config.batch_size)
    _warn_small_holdout(config, data, log)
    identity = _identity(config, name, steps, pool, data, spec)
    sigmas = np.asarray([float(v) for v in pool.extra.get("sigmas", [])] or _fallback_sigmas(S), np.float32)
    return _Run(config, pool, pool_dir, name, spec, steps, Path(out), acc, teacher, data, sigmas, identity,
                _digest(identity), log)


def _curriculum(config: TrainConfig, S: int) -> list[int]:
    steps = sorted({int(s) for s in (config.steps or range(S - 1))}, reverse=True)
    bad = [s for s in steps if not 0 <= s <= S - 2]
    if bad:
        raise NoiseSearchError(f"--steps {bad} out of range: trainable steps are 0..{S - 2} (step {S - 1} is the final image)")
    return steps


def _accelerator(device: str):
    try:
        from accelerate import Accelerator  # deferred: an optional dependency
    except ImportError:  # pragma: no cover
        raise NoiseSearchError("train-reward needs accelerate: pip install accelerate") from None
    acc = Accelerator(cpu=not str(device).startswith("cuda"))
    destroy_at_exit()  # under `accelerate launch`: leave no live process group to Python's teardown
    return acc


def _warn_small_holdout(config: TrainConfig, data: EstimateDataset, log) -> None:
    if config.gate and len(data.held) < 2:
        log(f"warning: --holdout {config.holdout:g} holds out {len(data.held)} of {data.N} candidates per prompt: the "
            "quality gate is off (every stage's weights are used); raise --holdout to keep it")
    elif config.gate and len(data.held) < MIN_HELD:
        log(f"warning: only {len(data.held)} held-out candidates per prompt decide the quality gate (fewer than "
            f"{MIN_HELD}): its verdicts are noisy; raise --holdout or the pool's --candidates")


def _identity(config: TrainConfig, name: str, steps: list, pool, data: EstimateDataset, spec: str) -> dict:
    """What the run is: a rerun with another identity into the same folder is refused."""
    cfg_id = asdict(config)
    cfg_id["reward"] = name  # the pool's key, however the reward was named
    if not config.step_conditioning:  # runs from before the option keep their digest (resumable)
        cfg_id.pop("step_conditioning")
        cfg_id.pop("cond_dim")
    return {
        "config": cfg_id,
        "steps": steps,
        "pool_shape": list(pool.shape),
        "pool_teacher_sha": hashlib.sha256(data.own.tobytes()).hexdigest()[:16],
        "spec": spec,
    }


# ---- resuming ------------------------------------------------------------------------------------
def _resume_state(run: _Run) -> dict:
    """The train state in ``out`` (a new one when there is none), its stage files verified: a file
    that does not load or fails its checksum is retrained with the stages after it; a file that
    holds another step or another run's weights is refused."""
    state = {"digest": run.digest, "identity": run.identity, "stages": []}
    path = run.out / STATE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict) and old.get("digest") != run.digest:
            raise NoiseSearchError(
                f"{run.out} holds a noise-aware reward trained with other settings or another pool; "
                "use another --out or delete that folder")
        if isinstance(old, dict):
            state = old
    for i, e in enumerate(state["stages"]):
        if not _stage_verifies(run, e, len(state["stages"]) - i):
            state["stages"] = state["stages"][:i]
            if run.main:
                _unlink(run.out / MANIFEST)
                atomic_write_json(path, state)
            break
    return state


def _stage_verifies(run: _Run, entry: dict, redo: int) -> bool:
    path = run.out / entry["file"]
    try:
        _, meta = read_stage(path)
    except NoiseSearchError as err:
        run.log(f"stage file {path} does not verify ({str(err).split(';')[0].split(' (')[0]}); "
                f"retraining from step {entry['step']} ({redo} of {len(run.steps)} stages)")
        return False
    why = stage_identity_error(path, meta, int(entry["step"]), run.digest)
    if why:
        raise NoiseSearchError(f"{why}; delete it to retrain from step {entry['step']}")
    return True


def _unlink(path: Path) -> None:
    if path.exists():
        path.unlink()


def _finished_manifest(run: _Run, state: dict) -> dict | None:
    """The manifest of a finished run with this identity, else None (a stale one is removed)."""
    path = run.out / MANIFEST
    if path.exists() and len(state["stages"]) == len(run.steps):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("digest") == run.digest:
            return manifest
        run.log(f"{path} is unreadable or stale; rewriting it")
    if run.main:
        _unlink(path)
    return None


def _initial_student(run: _Run, state: dict) -> torch.nn.Module:
    """The base module (step-conditioned if asked), or the last finished stage's weights when resuming."""
    student = copy.deepcopy(_trainable_module(run.teacher)).to(run.dev)
    if run.config.step_conditioning:
        student = StepConditioned(student, run.config.cond_dim).to(run.dev)
    if state["stages"]:
        last = state["stages"][-1]
        student.load_state_dict(load_stage(run.out / last["file"]))
        run.log(f"resuming after {len(state['stages'])} of {len(run.steps)} stages (last: step {last['step']})")
    return student


# ---- the stages ----------------------------------------------------------------------------------
def _run_stages(run: _Run, state: dict, student, progress: bool, stop_after: int | None):
    done = {int(e["step"]) for e in state["stages"]}
    scorer = copy.deepcopy(run.teacher)  # the Reward object whose module is the student
    ran = 0
    for k, step in enumerate(run.steps):
        if step in done:
            continue
        if stop_after is not None and ran >= stop_after:
            break
        student, entry = _train_stage(run, scorer, student, k, step, progress)
        _record_stage(run, state, student, entry)
        ran += 1
    return student


def _prepare_stage(run: _Run, student, k: int):
    """The stage's trainable model (a fresh LoRA adapter, or every weight), optimizer and schedule."""
    cfg = run.config
    model = student
    if cfg.lora_rank > 0:
        model = _wrap_lora(student, cfg.lora_rank, cfg.lora_alpha)
    else:
        model.requires_grad_(True)  # rewards are loaded for scoring with gradients off
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr0 = cfg.lr * cfg.lr_decay**k
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / cfg.iters)))
    model, opt = run.acc.prepare(model, opt)
    return model, opt, sched, lr0


def _train_stage(run: _Run, scorer, student, k: int, step: int, progress: bool):
    """Stage ``k`` (pool step ``step``): fine-tune, then measure on the held-out candidates."""
    cfg = run.config
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed * 1_000_003 + step * 7919 + 17)  # LoRA init and dropout: a resumed stage equals an uninterrupted one
    model, opt, sched, lr0 = _prepare_stage(run, student, k)
    scorer.module = model
    losses = _stage_iterations(run, scorer, model, opt, sched, k, step, progress)
    run.acc.wait_for_everyone()
    model = run.acc.unwrap_model(model)
    run.acc.free_memory()
    student = _merge_lora(model) if cfg.lora_rank > 0 else model
    student.eval().requires_grad_(False)
    scorer.module = student
    sigmas = run.pool.extra.get("sigmas")
    tenth = max(1, len(losses) // 10)
    entry = {"stage": k, "step": step, "sigma": float(sigmas[step]) if sigmas else None, "file": _stage_file(step),
             "lr": lr0, "iters": cfg.iters, "loss_first": float(np.mean(losses[:tenth])),
             "loss_last": float(np.mean(losses[-tenth:])), "seconds": round(time.perf_counter() - t0, 2)}
    if len(run.data.held) >= 2:
        entry.update(_heldout_metrics(run, scorer, step))
    # the gate: drop a stage that is worse than the base reward on held-out candidates by more than
    # one standard error of the paired difference (over prompts)
    entry["use"] = bool(not cfg.gate or "heldout_spearman" not in entry
                        or entry["heldout_spearman"] - entry["heldout_spearman_base"] >= -entry["heldout_spearman_diff_se"])
    return student, entry


def _stage_iterations(run: _Run, scorer, model, opt, sched, k: int, step: int, progress: bool) -> list[float]:
    cfg, acc = run.config, run.acc
    rng = np.random.default_rng([cfg.seed, step, acc.process_index])
    replay_steps = np.array(sorted({s for s in run.steps if s > step} | {run.S - 1}))
    bar = Progress(cfg.iters, desc=f"stage {k + 1}/{len(run.steps)} (step {step})", unit="iter",
                   enabled=progress and acc.is_main_process)
    losses = []
    for it in range(cfg.iters):
        loss = _batch_loss(run, scorer, model, rng, step, replay_steps)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if it % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    return losses


def _batch_loss(run: _Run, scorer, model, rng, step: int, replay_steps: np.ndarray) -> torch.Tensor:
    """One batch: candidates of the training share, at ``step`` or (a ``replay`` share) a later step."""
    cfg, data, B = run.config, run.data, run.config.batch_size
    rows_p = rng.integers(0, data.P, B)
    rows_c = rng.integers(0, data.n_train, B)
    rows_q = rng.integers(0, data.P, B) if data.cross else rows_p
    use_replay = rng.random(B) < cfg.replay
    st = np.where(use_replay, replay_steps[rng.integers(0, len(replay_steps), B)], step)
    x, y, prompts = data.batch(rows_p, rows_c, st, run.dev, rows_q)
    if cfg.step_conditioning:
        set_condition(model, torch.from_numpy(run.sigmas[st]))
    with torch.enable_grad():
        pred = scorer(x, prompts)
        if not isinstance(pred, torch.Tensor) or not pred.requires_grad:
            raise NoiseSearchError(f"reward {run.spec!r} is not differentiable through its module: cannot fine-tune it")
        return _loss(pred.float().reshape(-1), y, torch.from_numpy(rows_q).to(run.dev), cfg.pairwise)


def _paired_se(diff: np.ndarray) -> float:
    n = int(np.isfinite(diff).sum())
    return float(np.nanstd(diff, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def _nanmean(x) -> float:
    """``np.nanmean`` without its "Mean of empty slice" warning: NaN when every value is NaN."""
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if (~np.isnan(x)).any() else float("nan")


def _heldout_metrics(run: _Run, scorer, step: int) -> dict:
    """Spearman and top-10% recall against the final reward on the held-out candidates, base vs student."""
    data, final_held = run.data, run.final_held
    pred_held = _predict(scorer, data, data.held, step, run.dev, run.config.batch_size, sigma=run.sigmas[step])
    base_held = data.base[:, data.held, step]
    sp_base = spearman_per_prompt(base_held, final_held)
    sp_student = spearman_per_prompt(pred_held, final_held)
    return {
        "heldout_spearman_base": _nanmean(sp_base),
        "heldout_spearman": _nanmean(sp_student),
        "heldout_spearman_diff_se": _paired_se(sp_student - sp_base),
        "heldout_top10pct_recall_base": float(topk_recall(base_held, final_held, run.k_top).mean()),
        "heldout_top10pct_recall": float(topk_recall(pred_held, final_held, run.k_top).mean()),
    }


def _record_stage(run: _Run, state: dict, student, entry: dict) -> None:
    """Save the stage's weights with what they are (step, run digest), then the train state."""
    if run.main:
        meta = {"step": entry["step"], "stage": entry["stage"], "sigma": entry["sigma"], "base_reward": run.spec,
                "pool_reward": run.name, "seed": run.config.seed, "digest": run.digest}  # digest: every setting
        save_stage(run.out / entry["file"], student.state_dict(), meta)
    state["stages"].append(entry)
    if run.main:
        atomic_write_json(run.out / STATE, state)
    run.acc.wait_for_everyone()
    msg = f"stage {entry['stage'] + 1}/{len(run.steps)} step {entry['step']}: loss {entry['loss_first']:.4f} -> {entry['loss_last']:.4f}"
    if "heldout_spearman" in entry:
        msg += f", held-out spearman {entry['heldout_spearman_base']:.3f} (base) -> {entry['heldout_spearman']:.3f}"
        msg += "" if entry["use"] else " [not used: the base reward scores this step]"
    run.log(msg + f" ({entry['seconds']:.1f} s)")


# ---- finishing -----------------------------------------------------------------------------------
def _final_model_metrics(run: _Run, state: dict, student) -> None:
    """Step conditioning: held-out metrics of the final model at every trained step; the gate uses them."""
    if not isinstance(student, torch.nn.Module) or "heldout_spearman" not in state["stages"][-1]:
        return
    scorer = copy.deepcopy(run.teacher)
    scorer.module = student  # the final stage's model (trained now, or loaded from its file on a resume)
    data, final_held = run.data, run.final_held
    for entry in state["stages"]:
        step = int(entry["step"])
        pred = _predict(scorer, data, data.held, step, run.dev, run.config.batch_size, sigma=run.sigmas[step])
        sp_base = spearman_per_prompt(data.base[:, data.held, step], final_held)
        diff = spearman_per_prompt(pred, final_held) - sp_base
        entry["heldout_spearman_final_model"] = float(np.nanmean(spearman_per_prompt(pred, final_held)))
        entry["heldout_top10pct_recall_final_model"] = float(topk_recall(pred, final_held, run.k_top).mean())
        entry["use"] = bool(not run.config.gate or float(np.nanmean(diff)) >= -_paired_se(diff))
    if run.main:
        atomic_write_json(run.out / STATE, state)


def _write_manifest(run: _Run, state: dict, student) -> dict:
    cfg, pool, S = run.config, run.pool, run.S
    per_stage = ("per-stage: step s is scored with the weights saved after the stage that trained s "
                 "(stages marked use=false, which did not beat the base reward on held-out candidates, "
                 "and untrained steps are scored by the base reward)")
    final_model = ("final-model: every trained step is scored by the final stage's step-conditioned model, told "
                   "the step's sigma (steps marked use=false and untrained steps: the base reward)")
    data = run.data
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base_reward": run.spec,
        "base_name": getattr(run.teacher, "name", run.name),
        "pool_reward": run.name,
        "pool": str(run.pool_dir),
        "model": pool.model,
        "num_steps": S,
        "sigmas": [float(s) for s in pool.extra.get("sigmas", [])] or _fallback_sigmas(S),
        "state_steps": pool.extra.get("state_steps"),
        "sampler": pool.extra.get("sampler"),
        "steps": sorted(int(e["step"]) for e in state["stages"] if e.get("use", True)),
        "curriculum": run.steps,
        "scoring": final_model if cfg.step_conditioning else per_stage,
        **({"step_conditioning": {"kind": student.kind, "cond_dim": cfg.cond_dim,
                                  "final_file": state["stages"][-1]["file"]}} if cfg.step_conditioning else {}),
        "stages": state["stages"],
        "config": asdict(cfg),
        "train_candidates": data.n_train,
        "heldout_candidates": [int(data.held[0]), int(data.held[-1]) + 1] if len(data.held) else None,
        "digest": run.digest,
    }
    if run.main:
        atomic_write_json(run.out / MANIFEST, manifest)
    run.acc.wait_for_everyone()
    return manifest


def _fallback_sigmas(S: int) -> list[float]:
    """Pools without sigma metadata: a placeholder decreasing schedule (step matching only)."""
    return [float(S - s) for s in range(S - 1)] + [0.0]


__all__ = ["TrainConfig", "train_noise_aware", "spearman_per_prompt", "topk_recall", "EstimateDataset"]
