"""Noise-aware reward fine-tuning by curriculum self-distillation (TTSnap, Yu et al. 2025).

Input: a pool made with ``noisesearch pool ... --save-images`` (the Tweedie estimate of every
candidate at every step, and the base reward of every estimate). Output: a checkpoint folder loaded
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
(each stage is seeded from ``(seed, step)``, so a resumed run equals an uninterrupted one). The
manifest ``noise_aware.json`` is written last.

**Held-out candidates.** The last ``holdout`` share of candidates of every prompt is never trained on;
per stage the Spearman correlation (per prompt, averaged) with the final reward on them is recorded
for the base reward and the student.

**Step conditioning** (``step_conditioning``, TTSnap's alternative): the student is wrapped by
``noisesearch.train.step_conditioning.StepConditioned`` (adaLN-Zero on the ViT layers, FiLM-Zero
on other models; the identity at initialisation) and told each image's noise level ``sigma``; the
curriculum is the same, and the *final* stage's model scores every trained step (one model, no
per-step snapshots); held-out metrics of that final model are recorded per step
(``heldout_spearman_final_model``) and the gate uses them.

Trainable rewards expose ``module`` (a ``torch.nn.Module``) and compute ``reward(images, prompts)``
through it, differentiably (e.g. the ``digit`` reward).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.rewards.noise_aware import FORMAT_NAME, FORMAT_VERSION, MANIFEST, load_stage, save_stage
from noisesearch.train.step_conditioning import set_condition

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
    from scipy.stats import rankdata

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
    from noisesearch.pruning import select_top

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
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover
        raise NoiseSearchError("LoRA needs peft: pip install peft (or use --lora-rank 0)") from None
    targets = _lora_targets(module)
    if not targets:
        raise NoiseSearchError("LoRA: the reward's module has no Linear or Conv2d layers to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0, bias="none")
    return get_peft_model(module, config)


def _merge_lora(model) -> torch.nn.Module:
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


class _Data:
    """Pool images and teacher values, split into train / held-out candidates.

    ``teacher[i, j, q]``: the teacher's reward of the finished image of candidate ``j`` of prompt
    ``i`` for prompt ``q``. Without ``cross_prompts`` only ``q = i`` is used (the pool's values);
    with it the teacher is run on the stored finished images for every other prompt too.
    """

    def __init__(self, pool, images: np.ndarray, name: str, holdout: float, teacher_reward=None, device="cpu"):
        P, N, S = pool.shape
        self.P, self.N, self.S = P, N, S
        self.prompts = list(pool.prompts)
        self.images = images  # uint8 [P, N, S, C, H, W]
        self.base = pool.rewards[name]  # [P, N, S]
        own = pool.rewards[name][:, :, -1].astype(np.float32)  # [P, N]
        self.own = own
        n_hold = int(round(holdout * N))
        self.n_train = N - n_hold
        if self.n_train < 2:
            raise NoiseSearchError(f"the pool has {N} candidates per prompt: too few to train on with --holdout {holdout}")
        self.held = np.arange(self.n_train, N)
        self.cross = teacher_reward is not None
        if self.cross:
            self.teacher = np.empty((P, N, P), np.float32)
            with torch.no_grad():
                for i in range(P):
                    x = torch.from_numpy(images[i, :, -1]).to(device=device, dtype=torch.float32) / 255.0
                    for q in range(P):
                        self.teacher[i, :, q] = torch.as_tensor(teacher_reward(x, [self.prompts[q]] * N)).float().cpu().numpy()
            self.teacher[np.arange(P), :, np.arange(P)] = own  # the exact values where the pool has them
        else:
            self.teacher = None

    def batch(self, rows_p: np.ndarray, rows_c: np.ndarray, steps: np.ndarray, device, rows_q: np.ndarray | None = None):
        """Images of candidates (rows_p, rows_c) at ``steps``, teacher values for prompts ``rows_q``
        (default: their own prompts), and the prompt texts."""
        rows_q = rows_p if rows_q is None else rows_q
        x = torch.from_numpy(self.images[rows_p, rows_c, steps]).to(device=device, dtype=torch.float32) / 255.0
        y = self.own[rows_p, rows_c] if self.teacher is None else self.teacher[rows_p, rows_c, rows_q]
        prompts = [self.prompts[q] for q in rows_q.tolist()]
        return x, torch.from_numpy(np.ascontiguousarray(y)).to(device), prompts


@torch.no_grad()
def _predict(reward, data: _Data, cand: np.ndarray, step: int, device, batch: int = 1024, sigma=None) -> np.ndarray:
    """Reward of the estimates at ``step`` of candidates ``cand`` of every prompt: [P, len(cand)]
    (``sigma``: the noise level told to a step-conditioned module)."""
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
def train_noise_aware(pool_path, out, config: TrainConfig = TrainConfig(), device: str = "cpu",
                      progress: bool = False, log=print, stop_after: int | None = None) -> dict:
    """Train (or continue training) a noise-aware reward into ``out``; returns the manifest.

    ``stop_after``: run at most this many stages in this call, then return the train state (resume
    by calling again) - used by the tests to simulate an interruption. Torch's global CPU random
    state is restored on return (each stage seeds it for its LoRA initialisation and dropout).
    """
    rng_state = torch.get_rng_state()
    try:
        return _train(pool_path, out, config, device, progress, log, stop_after)
    finally:
        torch.set_rng_state(rng_state)


def _train(pool_path, out, config: TrainConfig, device: str, progress: bool, log, stop_after: int | None) -> dict:
    from noisesearch.pools import load_pool
    from noisesearch.pools.generate import load_pool_images
    from noisesearch.rewards.base import make_reward

    config.check()
    pool = load_pool(pool_path)
    name = config.reward
    if name not in pool.rewards:
        raise NoiseSearchError(f"the pool at {pool_path} has no reward {name!r}; it has: {', '.join(pool.rewards)}")
    P, N, S = pool.shape
    if S < 2:
        raise NoiseSearchError("the pool has a single step: nothing to train")
    steps = sorted({int(s) for s in (config.steps or range(S - 1))}, reverse=True)
    bad = [s for s in steps if not 0 <= s <= S - 2]
    if bad:
        raise NoiseSearchError(f"--steps {bad} out of range: trainable steps are 0..{S - 2} (step {S - 1} is the final image)")
    spec = config.reward_spec or pool.extra.get("reward_specs", {}).get(name) or name
    images = load_pool_images(pool_path)
    data = None  # built once the teacher is loaded (cross-prompt targets need it)

    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover
        raise NoiseSearchError("train-reward needs accelerate: pip install accelerate") from None
    acc = Accelerator(cpu=not str(device).startswith("cuda"))
    dev = acc.device

    teacher_reward = make_reward(spec, device=dev)
    base_module = _trainable_module(teacher_reward)
    data = _Data(pool, images, name, config.holdout, teacher_reward if config.cross_prompts else None, dev)
    if config.gate and len(data.held) < 2:
        log(f"warning: --holdout {config.holdout:g} holds out {len(data.held)} of {N} candidates per prompt: the quality "
            "gate is off (every stage's weights are used); raise --holdout to keep it")
    elif config.gate and len(data.held) < MIN_HELD:
        log(f"warning: only {len(data.held)} held-out candidates per prompt decide the quality gate (fewer than "
            f"{MIN_HELD}): its verdicts are noisy; raise --holdout or the pool's --candidates")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool_dir = Path(pool_path)
    pool_dir = pool_dir.parent if pool_dir.is_file() else pool_dir
    cfg_id = asdict(config)
    if not config.step_conditioning:  # runs from before the option keep their digest (resumable)
        cfg_id.pop("step_conditioning")
        cfg_id.pop("cond_dim")
    identity = {
        "config": cfg_id,
        "steps": steps,
        "pool_shape": [P, N, S],
        "pool_teacher_sha": hashlib.sha256(data.own.tobytes()).hexdigest()[:16],
        "spec": spec,
    }
    digest = _digest(identity)
    state_path = out / STATE
    state = {"digest": digest, "identity": identity, "stages": []}
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old.get("digest") != digest:
            raise NoiseSearchError(
                f"{out} holds a noise-aware reward trained with other settings or another pool; "
                "use another --out or delete that folder"
            )
        if old is not None:
            state = old
    manifest_path = out / MANIFEST
    # resume verifies: every finished stage's file must load and pass its checksum; the first that
    # does not is retrained, with every stage after it (each stage starts from the previous one)
    for i, e in enumerate(state["stages"]):
        try:
            load_stage(out / e["file"])
        except NoiseSearchError as err:
            log(f"stage file {out / e['file']} does not verify ({str(err).split(';')[0].split(' (')[0]}); "
                f"retraining from step {e['step']} ({len(state['stages']) - i} of {len(steps)} stages)")
            state["stages"] = state["stages"][:i]
            if acc.is_main_process:
                from noisesearch.io import atomic_write_json

                if manifest_path.exists():
                    manifest_path.unlink()
                atomic_write_json(state_path, state)
            break
    if manifest_path.exists() and len(state["stages"]) == len(steps):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("digest") == digest:
            return manifest
        log(f"{manifest_path} is unreadable or stale; rewriting it")
    if manifest_path.exists():
        manifest_path.unlink()

    # the student: the base module, or the last finished stage's weights when resuming
    student = copy.deepcopy(base_module).to(dev)
    sigmas = np.asarray([float(v) for v in pool.extra.get("sigmas", [])] or _fallback_sigmas(S), np.float32)
    if config.step_conditioning:
        from noisesearch.train.step_conditioning import StepConditioned

        student = StepConditioned(student, config.cond_dim).to(dev)
    done = {int(e["step"]) for e in state["stages"]}
    if state["stages"]:
        last = state["stages"][-1]
        student.load_state_dict(load_stage(out / last["file"]))
        log(f"resuming after {len(done)} of {len(steps)} stages (last: step {last['step']})")
    scorer = copy.deepcopy(teacher_reward)  # the Reward object whose module is the student
    final_held = data.own[:, data.held]
    k_top = max(1, len(data.held) // 10)
    ran = 0
    for k, step in enumerate(steps):
        if step in done:
            continue
        if stop_after is not None and ran >= stop_after:
            break
        t0 = time.perf_counter()
        seed_k = config.seed * 1_000_003 + step * 7919 + 17
        torch.manual_seed(seed_k)  # LoRA init and dropout: a resumed stage equals an uninterrupted one
        model = student
        if config.lora_rank > 0:
            model = _wrap_lora(student, config.lora_rank, config.lora_alpha)
        else:
            model.requires_grad_(True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        lr0 = config.lr * config.lr_decay**k
        opt = torch.optim.AdamW(params, lr=lr0, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / config.iters)))
        model, opt = acc.prepare(model, opt)
        scorer.module = model
        rng = np.random.default_rng([config.seed, step, acc.process_index])
        replay_steps = np.array(sorted({s for s in steps if s > step} | {S - 1}))
        losses = []
        from noisesearch.progress import Progress

        bar = Progress(config.iters, desc=f"stage {k + 1}/{len(steps)} (step {step})", unit="iter",
                       enabled=progress and acc.is_main_process)
        for it in range(config.iters):
            B = config.batch_size
            rows_p = rng.integers(0, data.P, B)
            rows_c = rng.integers(0, data.n_train, B)
            rows_q = rng.integers(0, data.P, B) if data.cross else rows_p
            use_replay = rng.random(B) < config.replay
            st = np.where(use_replay, replay_steps[rng.integers(0, len(replay_steps), B)], step)
            x, y, prompts = data.batch(rows_p, rows_c, st, dev, rows_q)
            if config.step_conditioning:
                set_condition(model, torch.from_numpy(sigmas[st]))
            with torch.enable_grad():
                pred = scorer(x, prompts)
                if not isinstance(pred, torch.Tensor) or not pred.requires_grad:
                    raise NoiseSearchError(f"reward {spec!r} is not differentiable through its module: cannot fine-tune it")
                loss = _loss(pred.float().reshape(-1), y, torch.from_numpy(rows_q).to(dev), config.pairwise)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        acc.wait_for_everyone()
        model = acc.unwrap_model(model)
        acc.free_memory()
        student = _merge_lora(model) if config.lora_rank > 0 else model
        student.eval().requires_grad_(False)
        scorer.module = student
        entry = {
            "stage": k,
            "step": step,
            "sigma": float(pool.extra.get("sigmas", [None] * S)[step]) if pool.extra.get("sigmas") else None,
            "file": _stage_file(step),
            "lr": lr0,
            "iters": config.iters,
            "loss_first": float(np.mean(losses[: max(1, len(losses) // 10)])),
            "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if len(data.held) >= 2:
            pred_held = _predict(scorer, data, data.held, step, dev, sigma=sigmas[step])
            base_held = data.base[:, data.held, step]
            sp_base = spearman_per_prompt(base_held, final_held)
            sp_student = spearman_per_prompt(pred_held, final_held)
            diff = sp_student - sp_base
            entry["heldout_spearman_base"] = float(np.nanmean(sp_base))
            entry["heldout_spearman"] = float(np.nanmean(sp_student))
            entry["heldout_spearman_diff_se"] = float(np.nanstd(diff, ddof=1) / np.sqrt(max(1, np.isfinite(diff).sum())))\
                if np.isfinite(diff).sum() > 1 else 0.0
            entry["heldout_top10pct_recall_base"] = float(topk_recall(base_held, final_held, k_top).mean())
            entry["heldout_top10pct_recall"] = float(topk_recall(pred_held, final_held, k_top).mean())
        # the gate: drop a stage that is worse than the base reward on held-out candidates by more than
        # one standard error of the paired difference (over prompts)
        entry["use"] = bool(not config.gate or "heldout_spearman" not in entry
                            or entry["heldout_spearman"] - entry["heldout_spearman_base"] >= -entry["heldout_spearman_diff_se"])
        if acc.is_main_process:
            save_stage(out / entry["file"], student.state_dict(), {"step": step, "stage": k, "base_reward": spec})
            state["stages"].append(entry)
            from noisesearch.io import atomic_write_json

            atomic_write_json(state_path, state)
        acc.wait_for_everyone()
        done.add(step)
        ran += 1
        msg = f"stage {k + 1}/{len(steps)} step {step}: loss {entry['loss_first']:.4f} -> {entry['loss_last']:.4f}"
        if "heldout_spearman" in entry:
            msg += f", held-out spearman {entry['heldout_spearman_base']:.3f} (base) -> {entry['heldout_spearman']:.3f}"
            msg += "" if entry["use"] else " [not used: the base reward scores this step]"
        log(msg + f" ({entry['seconds']:.1f} s)")

    if len(done) < len(steps):
        return state
    if config.step_conditioning and len(data.held) >= 2:
        _final_model_metrics(state, scorer, student, out, data, sigmas, dev, config.gate, final_held, k_top, acc)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base_reward": spec,
        "base_name": getattr(teacher_reward, "name", name),
        "pool_reward": name,
        "pool": str(pool_dir),
        "model": pool.model,
        "num_steps": S,
        "sigmas": [float(s) for s in pool.extra.get("sigmas", [])] or _fallback_sigmas(S),
        "state_steps": pool.extra.get("state_steps"),
        "sampler": pool.extra.get("sampler"),
        "steps": sorted(int(e["step"]) for e in state["stages"] if e.get("use", True)),
        "curriculum": steps,
        "scoring": ("final-model: every trained step is scored by the final stage's step-conditioned model, told "
                    "the step's sigma (steps marked use=false and untrained steps: the base reward)")
        if config.step_conditioning else
        "per-stage: step s is scored with the weights saved after the stage that trained s "
                   "(stages marked use=false, which did not beat the base reward on held-out candidates, "
                   "and untrained steps are scored by the base reward)",
        **({"step_conditioning": {"kind": student.kind, "cond_dim": config.cond_dim,
                                  "final_file": state["stages"][-1]["file"]}} if config.step_conditioning else {}),
        "stages": state["stages"],
        "config": asdict(config),
        "train_candidates": data.n_train,
        "heldout_candidates": [int(data.held[0]), int(data.held[-1]) + 1] if len(data.held) else None,
        "digest": digest,
    }
    if acc.is_main_process:
        from noisesearch.io import atomic_write_json

        atomic_write_json(manifest_path, manifest)
    acc.wait_for_everyone()
    return manifest


def _final_model_metrics(state, scorer, student, out, data, sigmas, dev, gate, final_held, k_top, acc) -> None:
    """Step conditioning: held-out metrics of the final model at every trained step; the gate uses them."""
    if not isinstance(student, torch.nn.Module) or "heldout_spearman" not in state["stages"][-1]:
        return
    scorer.module = student  # the final stage's model (trained now, or loaded from its file on a resume)
    for entry in state["stages"]:
        step = int(entry["step"])
        pred = _predict(scorer, data, data.held, step, dev, sigma=sigmas[step])
        sp_base = spearman_per_prompt(data.base[:, data.held, step], final_held)
        diff = spearman_per_prompt(pred, final_held) - sp_base
        entry["heldout_spearman_final_model"] = float(np.nanmean(spearman_per_prompt(pred, final_held)))
        entry["heldout_top10pct_recall_final_model"] = float(topk_recall(pred, final_held, k_top).mean())
        se = float(np.nanstd(diff, ddof=1) / np.sqrt(max(1, np.isfinite(diff).sum()))) if np.isfinite(diff).sum() > 1 else 0.0
        entry["use"] = bool(not gate or float(np.nanmean(diff)) >= -se)
    if acc.is_main_process:
        from noisesearch.io import atomic_write_json

        atomic_write_json(out / STATE, state)


def _fallback_sigmas(S: int) -> list[float]:
    """Pools without sigma metadata: a placeholder decreasing schedule (step matching only)."""
    return [float(S - s) for s in range(S - 1)] + [0.0]


__all__ = ["TrainConfig", "train_noise_aware", "spearman_per_prompt", "topk_recall"]
