"""Noise-aware rewards: a reward model fine-tuned to score the Tweedie estimates of one step.

Made by ``noisesearch train-reward`` (``noisesearch.train.noise_aware``); loaded with the reward spec
``noise-aware@DIR``. The checkpoint folder holds

    noise_aware.json          manifest, written last: base reward spec and name, the pool's step
                              layout (steps, sigmas), one entry per trained stage
    stage_SS.safetensors      the fine-tuned weights of the base reward's ``module`` after the stage
                              that trained pool step SS (LoRA already merged), with a checksum and
                              a record of what it is (its step, the training run's digest): a
                              stage file copied over another is refused when loaded

**Which weights score what.** Stage ``k`` trains step ``s_k`` (walking from late to early steps),
starting from stage ``k-1``'s weights; the estimates of step ``s`` are scored with the weights of the
stage that trained ``s``. Steps without a stage (the finished image, steps left out of training, and
stages marked ``"use": false`` because they did not beat the base reward on the training pool's
held-out candidates) are scored by the base reward, like the NaN fallback of a pool's noise-aware
arrays.

**Telling it the step.** ``score_at(images, prompts, step=s, sigma=σ)``, or ``reward.at(step=s,
sigma=σ)`` for a plain ``Reward`` bound to one step (what ``noisesearch.rewards.score`` accepts).
``step`` is a pool step index (see ``noisesearch.api.pool``); when ``sigma`` is given and does
not match the training schedule's sigma at ``step`` (another step count or sampler), the stage
trained at the nearest noise level (in log sigma) is used; ``sigma = 0`` is the finished image.
Called like any reward (``reward(images, prompts)``) it scores at ``reward.step`` / ``reward.sigma``
when set, else as the finished image (the base reward).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Sequence

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.io import load_checked_safetensors, save_checked_safetensors
from noisesearch.models.strict import differences
from noisesearch.rewards.base import make_reward
from noisesearch.rewards.step_conditioning import StepConditioned, set_condition

MANIFEST = "noise_aware.json"
FORMAT_NAME = "noisesearch-noise-aware"
FORMAT_VERSION = 1
STAGE_KIND = "noise_aware_stage"
TRAIN_HINT = "train it with `noisesearch train-reward --pool POOL --reward NAME --out {dir}`"


# ---------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------
def save_stage(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a stage's state dict atomically with its checksum and ``meta`` (JSON) in the metadata."""
    save_checked_safetensors(path, tensors, STAGE_KIND, {"meta": json.dumps(meta, sort_keys=True)})


def load_stage(path) -> dict[str, torch.Tensor]:
    """A stage's state dict; ``NoiseSearchError`` if missing, truncated, of another kind or corrupt."""
    return read_stage(path)[0]


def read_stage(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A stage's state dict and what it records of itself (``step``, ``stage``, ``base_reward`` and,
    since identity checks, ``digest``: the training run's); errors as :func:`load_stage`."""
    path = Path(path)
    tensors, metadata = load_checked_safetensors(path, STAGE_KIND, "noise-aware checkpoint", TRAIN_HINT.format(dir=path.parent))
    try:
        meta = json.loads(metadata.get("meta") or "{}")
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise NoiseSearchError(f"{path}: unreadable stage record; {TRAIN_HINT.format(dir=path.parent)}")
    return tensors, meta


def stage_identity_error(path, meta: dict, step: int, digest: str | None) -> str | None:
    """Why the stage file at ``path`` (its record ``meta``) is not the stage of ``step`` of the
    training run ``digest``, or None. Files written before stages recorded their run are checked
    for their step only."""
    held = meta.get("step")
    if held is None or int(held) != int(step):
        return (f"{path} holds the weights of step {held} (stage_{int(held or 0):02d}), not of step {step}: a stage file "
                "copied over another")
    if digest and meta.get("digest") and meta["digest"] != digest:
        return f"{path} holds a stage of another training run ({meta['digest']}, this run {digest})"
    return None


def read_manifest(directory) -> dict:
    d = Path(directory)
    hint = TRAIN_HINT.format(dir=d)
    if not d.is_dir():
        raise NoiseSearchError(f"no noise-aware reward at {d}: not a folder; {hint}")
    path = d / MANIFEST
    if not path.is_file():
        extra = " (training not finished: rerun the same train-reward command to continue)" if (d / "train_state.json").exists() else ""
        raise NoiseSearchError(f"no noise-aware reward at {d}: {MANIFEST} missing{extra}; {hint}")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NoiseSearchError(f"{path} is corrupt ({e}); {hint}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise NoiseSearchError(f"{path} is not a {FORMAT_NAME} manifest; {hint}")
    if not isinstance(m.get("version"), int) or m["version"] > FORMAT_VERSION:
        raise NoiseSearchError(f"{path}: unsupported format version {m.get('version')!r}; upgrade noisesearch")
    for key in ("base_reward", "num_steps", "sigmas", "stages"):
        if key not in m:
            raise NoiseSearchError(f"{path} lacks {key!r}; {hint}")
    return m


# ---------------------------------------------------------------------------------------------
# the reward
# ---------------------------------------------------------------------------------------------
class _AtStep:
    """A noise-aware reward bound to one step: a plain Reward."""

    def __init__(self, parent: "NoiseAwareReward", step: int | None, sigma: float | None):
        self.parent, self.step, self.sigma = parent, step, sigma
        resolved = parent.resolve(step, sigma)
        self.name = f"{parent.name}[step {resolved}]"
        self.flops_per_image = parent.flops_per_image

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.parent.score_at(images, prompts, step=self.step, sigma=self.sigma)


class NoiseAwareReward:
    """See the module docstring. ``base`` is the base Reward (it must expose its ``module``)."""

    def __init__(self, base, base_spec: str, stages: dict[int, dict[str, torch.Tensor]], manifest: dict, directory=None):
        if not isinstance(getattr(base, "module", None), torch.nn.Module):
            raise NoiseSearchError(f"reward {base.name!r} has no torch module to load noise-aware weights into")
        self.base = base
        self.base_spec = base_spec
        self.base_name = str(manifest.get("base_name") or base.name)
        self.name = f"noise-aware({self.base_name})"
        self.flops_per_image = float(base.flops_per_image)
        self.manifest = manifest
        self.directory = None if directory is None else str(directory)
        self.num_steps = int(manifest["num_steps"])
        self.sigmas = [float(s) for s in manifest["sigmas"]]
        if len(self.sigmas) != self.num_steps:
            raise NoiseSearchError(f"noise-aware manifest: {len(self.sigmas)} sigmas for {self.num_steps} steps")
        self.stages = dict(stages)
        self._scorer = copy.deepcopy(base)
        cond = manifest.get("step_conditioning")
        self.conditioned = bool(cond)
        if cond:  # trained with step conditioning (noisesearch.rewards.step_conditioning)
            self._scorer.module = StepConditioned(self._scorer.module, int(cond.get("cond_dim", 64)))
            # the modulation MLPs run per image too (a multiply-add per weight)
            extra = self._scorer.module.embed.parameters(), self._scorer.module.heads.parameters()
            self.flops_per_image += float(sum(2 * p.numel() for ps in extra for p in ps if p.ndim == 2))
        self._check_stages()
        self._active: int | None = None
        self.step: int | None = None  # set to score at a step when called as a plain reward
        self.sigma: float | None = None

    def _check_stages(self) -> None:
        """Every stage must fit the reward's module exactly (names and shapes), checked at load: a
        stage that does not fit is refused before any search, never half-loaded at a later step."""
        expected = {k: tuple(v.shape) for k, v in self._scorer.module.state_dict().items()}
        where = self.directory or "the noise-aware reward"
        for step, state in sorted(self.stages.items()):
            got = {k: tuple(v.shape) for k, v in state.items()}
            missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            shaped = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
            if missing or unexpected or shaped:
                diff = differences(missing, unexpected, [(k, got[k], expected[k]) for k in shaped])
                raise NoiseSearchError(f"{where}: the weights of step {step} do not fit reward {self.base_name!r} "
                                       f"({diff}); retrain them with train-reward")

    @property
    def steps(self) -> list[int]:
        """Pool step indices that have their own fine-tuned weights."""
        return sorted(self.stages)

    def resolve(self, step: int | None = None, sigma: float | None = None) -> int:
        """The training pool's step index whose model scores estimates at ``step`` / ``sigma``."""
        S = self.num_steps
        if sigma is not None:
            sigma = float(sigma)
            if step is not None and 0 <= int(step) < S and math.isclose(self.sigmas[int(step)], sigma, rel_tol=1e-6, abs_tol=1e-12):
                return int(step)
            if sigma <= 0:
                return S - 1
            cands = [(abs(math.log(s) - math.log(sigma)), i) for i, s in enumerate(self.sigmas) if s > 0]
            return min(cands)[1] if cands else S - 1
        if step is not None and not -S <= int(step) < S:
            raise NoiseSearchError(f"step {step} is out of range: the noise-aware reward covers steps 0..{S - 1}")
        if step is not None:
            step = int(step) % S
        return S - 1 if step is None else step

    def covers(self, step: int | None = None, sigma: float | None = None) -> bool:
        """Whether estimates at ``step`` / ``sigma`` get fine-tuned weights (else the base reward)."""
        return self.resolve(step, sigma) in self.stages

    def at(self, step: int | None = None, sigma: float | None = None) -> _AtStep:
        return _AtStep(self, step, sigma)

    def score_at(self, images: torch.Tensor, prompts: Sequence[str], step: int | None = None,
                 sigma: float | None = None) -> torch.Tensor:
        s = self.resolve(step, sigma)
        if s not in self.stages:
            return self.base(images, prompts)
        if self.conditioned:  # one step-conditioned model for every step: tell it the noise level
            set_condition(self._scorer.module, self.sigmas[s] if sigma is None else float(sigma))
        if self._active != s and not (self.conditioned and self._active is not None):
            module = self._scorer.module
            try:
                module.load_state_dict(self.stages[s], strict=True)
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise NoiseSearchError(
                    f"noise-aware weights for step {s} do not fit reward {self.base_name!r} ({first}); retrain them"
                ) from None
            self._active = s
        return self._scorer(images, prompts)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score_at(images, prompts, step=self.step, sigma=self.sigma)

    def __repr__(self) -> str:
        return f"NoiseAwareReward(base={self.base_spec!r}, steps={self.steps}, dir={self.directory!r})"


def load_noise_aware(arg: str | None, device: str | torch.device = "cpu") -> NoiseAwareReward:
    """Reward spec ``noise-aware@DIR``: the noise-aware reward trained into ``DIR``."""
    if not arg:
        raise NoiseSearchError("reward 'noise-aware' needs its checkpoint folder: noise-aware@DIR")
    d = Path(arg).expanduser()
    m = read_manifest(d)
    base_spec = str(m["base_reward"])
    if "noise-aware" in base_spec:
        raise NoiseSearchError(f"{d / MANIFEST}: the base reward cannot itself be noise-aware ({base_spec!r})")
    base = make_reward(base_spec, device=device)
    stages: dict[int, dict[str, torch.Tensor]] = {}
    final = m.get("step_conditioning", {}).get("final_file") if isinstance(m.get("step_conditioning"), dict) else None
    final_tensors = None
    for entry in m["stages"]:
        if isinstance(entry, dict) and not entry.get("use", True):
            continue  # trained, but no better than the base reward on held-out candidates
        try:
            step, fname = int(entry["step"]), str(entry["file"])
        except (KeyError, TypeError, ValueError):
            raise NoiseSearchError(f"{d / MANIFEST}: malformed stage entry {entry!r}; {TRAIN_HINT.format(dir=d)}") from None
        if final:  # step conditioning: the final stage's model scores every trained step
            if final_tensors is None:
                final_tensors = _checked_stage(d, final, int(m["stages"][-1]["step"]), m, base)
            stages[step] = final_tensors
            continue
        stages[step] = _checked_stage(d, fname, step, m, base)
    reward = NoiseAwareReward(base, base_spec, stages, m, d)
    # fail now, not at the first call, if the weights do not fit the base reward's module
    ref = reward._scorer.module.state_dict()
    for step, tensors in stages.items():
        if set(tensors) != set(ref) or any(tensors[k].shape != ref[k].shape for k in ref):
            raise NoiseSearchError(
                f"noise-aware weights for step {step} in {d} do not fit reward {base_spec!r}; {TRAIN_HINT.format(dir=d)}"
            )
    return reward


def _checked_stage(d: Path, fname: str, step: int, manifest: dict, base) -> dict[str, torch.Tensor]:
    """The weights of ``step``'s stage file, refused when the file records another step or run."""
    path = d / Path(fname).name
    tensors, meta = read_stage(path)
    why = stage_identity_error(path, meta, step, manifest.get("digest"))
    if why:
        raise NoiseSearchError(f"{why}; retrain: {TRAIN_HINT.format(dir=d)}")
    return {k: v.to(getattr(base, "device", "cpu")) for k, v in tensors.items()}


def is_noise_aware_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


__all__ = ["NoiseAwareReward", "load_noise_aware", "save_stage", "load_stage", "read_stage", "stage_identity_error",
           "read_manifest", "is_noise_aware_dir"]
