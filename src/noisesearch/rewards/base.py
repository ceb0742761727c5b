"""The reward protocol, name registry, combinations and checked scoring.

A reward scores images in [0, 1] (shape [B, C, H, W]) for their prompts and returns a float tensor
of shape [B]; higher is better. ``flops_per_image`` is its cost, charged per call by the budget.

Reward specs (CLI ``--reward`` and ``make_reward``):

* ``NAME`` or ``NAME@ARG`` (ARG is reward specific, e.g. ``clip@/path/to/clip``),
* ``0.7*digit+0.3*brightness``: a weighted sum,
* ``ranksum(digit,brightness)``: the sum of per-prompt ranks within each call.
"""
from __future__ import annotations

import importlib
import re
from typing import Protocol, Sequence, runtime_checkable

import torch

from noisesearch.errors import NoiseSearchError, unknown_name


@runtime_checkable
class Reward(Protocol):
    name: str
    flops_per_image: float

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


# name -> "module:factory"; factories take (arg: str | None, device) and return a Reward.
REWARDS: dict[str, str] = {
    "digit": "noisesearch.rewards.digit:digit_reward",
    "judge": "noisesearch.rewards.digit:judge_reward",
    "brightness": "noisesearch.rewards.simple:Brightness",
    "compressibility": "noisesearch.rewards.simple:Compressibility",
    "clip": "noisesearch.rewards.clip:clip_reward",
    "noise-aware": "noisesearch.rewards.noise_aware:load_noise_aware",
    "pickscore": "noisesearch.rewards.pickscore:pickscore_reward",
    "hps": "noisesearch.rewards.hps:hps_reward",
    "imagereward": "noisesearch.rewards.imagereward:imagereward_reward",
    "aesthetic": "noisesearch.rewards.aesthetic:aesthetic_reward",
}


def register_reward(name: str, target: str) -> None:
    """Register ``module:factory`` under ``name`` (factory(arg, device) -> Reward)."""
    REWARDS[name] = target


def _load(name: str, arg: str | None, device) -> Reward:
    if name not in REWARDS:
        raise unknown_name("reward", name, list(REWARDS) + ["<a*r1+b*r2>", "ranksum(r1,r2,...)"])
    module, attr = REWARDS[name].split(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(arg, device) if arg is not None else factory(None, device)


_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?\d*\.?\d+(?:e[-+]?\d+)?)\s*\*)?\s*(?P<r>[^*]+?)\s*$")


def make_reward(spec: str, device: str | torch.device = "cpu") -> Reward:
    """Build a reward from a spec string (see module docstring)."""
    spec = spec.strip()
    if not spec:
        raise NoiseSearchError("empty reward spec")
    m = re.fullmatch(r"ranksum\((.*)\)", spec)
    if m:
        parts = [p for p in m.group(1).split(",") if p.strip()]
        if len(parts) < 2:
            raise NoiseSearchError("ranksum(...) needs at least two rewards, e.g. ranksum(digit,brightness)")
        return RankSum([make_reward(p, device) for p in parts])
    if "+" in spec or "*" in spec:
        terms = [t for t in re.split(r"(?<![0-9]e)\+", spec) if t.strip()]
        rewards, weights = [], []
        for t in terms:
            tm = _TERM.match(t)
            if not tm:
                raise NoiseSearchError(f"cannot parse reward term {t!r}; write e.g. 0.7*digit+0.3*brightness")
            weights.append(float(tm.group("w")) if tm.group("w") else 1.0)
            rewards.append(make_reward(tm.group("r"), device))
        if len(rewards) == 1 and weights[0] == 1.0:
            return rewards[0]
        return WeightedSum(rewards, weights)
    name, _, arg = spec.partition("@")
    return _load(name.strip(), arg.strip() or None, device)


class WeightedSum:
    """sum_i w_i * r_i(images, prompts)."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        if len(rewards) != len(weights):
            raise NoiseSearchError("a weighted sum needs one weight per reward")
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights))
        self.flops_per_image = sum(r.flops_per_image for r in self.rewards)

    def __call__(self, images, prompts):
        return sum(w * score(r, images, prompts) for r, w in zip(self.rewards, self.weights))


class RankSum:
    """Sum over rewards of each image's rank (0 = worst) among the images of the same prompt in
    this call: scale-free aggregation as in TTSnap's multi-reward setting. Values are comparable
    only within one call."""

    def __init__(self, rewards: Sequence[Reward]):
        self.rewards = list(rewards)
        self.name = "ranksum(" + ",".join(r.name for r in self.rewards) + ")"
        self.flops_per_image = sum(r.flops_per_image for r in self.rewards)

    def __call__(self, images, prompts):
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        for r in self.rewards:
            values = score(r, images, prompts).double().cpu()
            for rows in groups.values():
                idx = torch.tensor(rows)
                total[idx] += values[idx].argsort().argsort().double()
        return total.float()


def score(reward: Reward, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` and check its output: shape [B], finite. Returns float32 on the CPU."""
    n = images.shape[0]
    if len(prompts) != n:
        raise NoiseSearchError(f"{n} images but {len(prompts)} prompts given to reward {reward.name!r}")
    with torch.no_grad():
        out = reward(images, prompts)
    out = torch.as_tensor(out)
    if out.shape != (n,):
        raise NoiseSearchError(
            f"reward {reward.name!r} returned shape {tuple(out.shape)} for {n} images; a reward must return one value per image"
        )
    out = out.detach().float().cpu()
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise NoiseSearchError(
            f"reward {reward.name!r} returned {bad} non-finite value(s) (NaN or inf) for {n} images; "
            "fix the reward (or its inputs) so that it returns finite scores"
        )
    return out
