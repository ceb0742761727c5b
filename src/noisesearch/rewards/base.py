"""The reward protocol, name registry, combinations and checked scoring.

A reward scores images in [0, 1] (shape [B, C, H, W]) for their prompts and returns a float tensor
of shape [B]; higher is better. ``flops_per_image`` is its cost, charged per call by the budget.

Everywhere a reward goes (``reward``, ``prune_reward``, ``eval_rewards``, the parts of weighted and
rank sums) it may be given as

* a ``Reward`` object (``name``, ``flops_per_image``, ``__call__(images, prompts)``),
* a plain function ``f(images, prompts) -> [B]`` (:class:`FunctionReward`, named after the function;
  its price per image is the function's ``flops_per_image`` attribute if it has one, else 0: an
  unpriced reward costs nothing in a FLOP budget, so a FLOP budget then buys only network
  evaluations and decodes; declare the price with ``FunctionReward(f, flops_per_image=F)`` or the
  CLI's ``--reward-flops F``), or
* a spec string (CLI ``--reward`` and ``make_reward``):

  * ``NAME`` or ``NAME@ARG`` (ARG is reward specific, e.g. ``clip@/path/to/clip``; a path is taken
    literally: a ``+`` or ``,`` inside it separates only when a known reward follows, and
    ``NAME@"ARG"`` quotes it whole),
  * ``module.path:function`` (a reward function or Reward object by import path;
    ``module.path:factory@ARG`` calls ``factory(ARG, device)``),
  * ``0.7*digit+0.3*brightness``: a weighted sum,
  * ``ranksum(digit,brightness)``: the sum of each candidate's ranks among the candidates of its
    search (see :class:`Comparative`).

A spec is parsed completely or refused with a one-line error.
"""
from __future__ import annotations

import copy
import importlib
import math
import re
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from noisesearch.errors import NoiseSearchError, unknown_name
from noisesearch.pruning.select import rank_sum
from noisesearch.validate import nonneg_number


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
    "ellipticity": "noisesearch.rewards.galaxy:ellipticity_reward",
    "galaxy-size": "noisesearch.rewards.galaxy:size_reward",
    "concentration": "noisesearch.rewards.galaxy:concentration_reward",
}


def register_reward(name: str, target: str) -> None:
    """Register ``module:factory`` under ``name`` (factory(arg, device) -> Reward)."""
    REWARDS[name] = target


def _load(name: str, arg: str | None, device) -> Reward:
    if name not in REWARDS:
        raise unknown_name("reward", name, list(REWARDS) + ["<a*r1+b*r2>", "ranksum(r1,r2,...)", "<module.path:function>"])
    module, attr = REWARDS[name].split(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(arg, device) if arg is not None else factory(None, device)


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_IMPORT = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(rf"\s*(?:(?P<w>{_NUMBER})\s*\*\s*)?(?P<r>[^*]+?)\s*")
_NEXT = re.compile(rf"\s*(?P<w>{_NUMBER}\s*\*)?\s*(?P<n>[A-Za-z_][\w.:-]*)\s*(?P<c>.?)", re.S)


def _starts_term(rest: str) -> bool:
    """Whether ``rest`` (the text after a ``+`` or ``,`` inside an ``@`` argument) starts another
    reward term: a weight (``0.3*...``), or a registered name, ``ranksum(`` or an import path that
    ends there. Otherwise the separator belongs to the argument (a path like ``sac+logos.pth``)."""
    m = _NEXT.match(rest)
    if not m:
        return False
    if m.group("w"):
        return True
    name, nxt = m.group("n"), m.group("c")
    known = name in REWARDS or name == "ranksum" or bool(_IMPORT.fullmatch(name))
    return known and nxt in ("", "@", "+", ",", "(", ")")


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside parentheses (unbalanced parentheses are an error). Inside an ``@``
    argument a separator splits only where another term starts (:func:`_starts_term`); a quoted
    argument (``@"..."``) is never split."""
    out, depth, cur, in_arg, quote = [], 0, "", False, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
            cur += ch
            continue
        if in_arg and ch in "\"'" and cur.endswith("@"):
            quote = ch
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise NoiseSearchError(f"reward spec {text!r}: unbalanced ')'")
        # a '+' right after an exponent's 'e' belongs to the number (1e+3), not a separator
        exponent = sep == "+" and i >= 2 and text[i - 1] in "eE" and text[i - 2].isdigit()
        if ch == sep and depth == 0 and not exponent and not (in_arg and not _starts_term(text[i + 1:])):
            out.append(cur)
            cur, in_arg = "", False
        else:
            in_arg = in_arg or (ch == "@" and depth == 0)
            cur += ch
    if quote:
        raise NoiseSearchError(f"reward spec {text!r}: unclosed quote {quote}")
    if depth:
        raise NoiseSearchError(f"reward spec {text!r}: unbalanced '('")
    return out + [cur]


def split_specs(text: str) -> list[str]:
    """Several reward specs in one string: ``"digit,ranksum(a,b),noise-aware@dir"`` split at the
    commas outside parentheses and outside ``@`` paths (empty parts dropped; unbalanced parentheses
    are an error)."""
    return [s.strip() for s in _split_top(text, ",") if s.strip()]


class FunctionReward:
    """A plain function ``fn(images, prompts) -> [B]`` as a :class:`Reward`.

    ``name`` defaults to the function's ``name`` attribute, else its ``__name__``; ``flops_per_image``
    to its ``flops_per_image`` attribute, else 0: an unpriced reward is free in a FLOP budget (the
    budget then pays for network evaluations and decodes only), so declare the price of an expensive
    reward to compare strategies honestly at equal FLOPs."""

    def __init__(self, fn, name: str | None = None, flops_per_image: float | None = None):
        if not callable(fn):
            raise NoiseSearchError(f"a reward must be callable as f(images, prompts) -> [B]; got {type(fn).__name__}")
        self.fn = fn
        self.name = str(name or getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__)
        self.flops_per_image = _price(getattr(fn, "flops_per_image", 0.0) if flops_per_image is None else flops_per_image,
                                      self.name)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(self.fn(images, prompts))

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r}, flops_per_image={self.flops_per_image:g})"


def _price(flops, name: str) -> float:
    return nonneg_number(flops, f"reward {name!r}: the price per image in FLOPs")


def as_reward(reward, device: str | torch.device = "cpu") -> Reward:
    """The one resolution of anything given as a reward: a spec string (:func:`make_reward`), a
    ``Reward`` object (itself) or a plain function (:class:`FunctionReward`)."""
    if isinstance(reward, str):
        return make_reward(reward, device=device)
    if callable(reward) and hasattr(reward, "name") and hasattr(reward, "flops_per_image"):
        return reward
    if callable(reward):
        return FunctionReward(reward)
    raise NoiseSearchError(f"a reward is a spec string (e.g. 'digit'), a Reward object or a function "
                           f"f(images, prompts) -> [B]; got {type(reward).__name__}")


def with_flops(reward: Reward, flops_per_image: float | None) -> Reward:
    """``reward`` priced at ``flops_per_image`` FLOPs per image (``--reward-flops``): a shallow copy with
    the price replaced; ``None`` leaves it as it is."""
    if flops_per_image is None:
        return reward
    out = copy.copy(reward)
    try:
        out.flops_per_image = _price(flops_per_image, reward.name)
    except AttributeError:  # a read-only price (a property): wrap the call instead
        out = FunctionReward(reward, name=reward.name, flops_per_image=flops_per_image)
    return out


def _load_path(path: str, arg: str | None, device) -> Reward:
    """``module.path:attr`` (``@ARG``: ``attr(ARG, device)``, a factory) as a reward."""
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise NoiseSearchError(f"reward {path!r}: cannot import module {module!r} ({e}); is it on PYTHONPATH?") from None
    except AttributeError:
        raise NoiseSearchError(f"reward {path!r}: module {module!r} has no {attr!r}") from None
    if arg is not None:
        if not callable(obj):
            raise NoiseSearchError(f"reward {path}@{arg}: {attr!r} is not a factory f(arg, device)")
        obj = obj(arg, device)
    return as_reward(obj, device)


def _unquote(arg: str) -> str:
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
        return arg[1:-1]
    return arg


def _make_ranksum(spec: str, inner: str, device) -> Reward:
    parts = [p.strip() for p in _split_top(inner, ",")]
    if any(not p for p in parts):
        raise NoiseSearchError(f"reward spec {spec!r} has an empty part; write e.g. ranksum(digit,brightness)")
    if len(parts) < 2:
        raise NoiseSearchError("ranksum(...) needs at least two rewards, e.g. ranksum(digit,brightness)")
    rewards = [make_reward(p, device) for p in parts]
    if any(isinstance(r, Comparative) for r in rewards):
        raise NoiseSearchError(f"reward spec {spec!r}: ranksum(...) cannot be nested")
    return RankSum(rewards)


def _make_weighted(spec: str, terms: list[str], device) -> Reward:
    if any(not t.strip() for t in terms):
        raise NoiseSearchError(f"reward spec {spec!r} has an empty term (a dangling '+'); write e.g. 0.7*digit+0.3*brightness")
    rewards, weights = [], []
    for t in terms:
        tm = _TERM.fullmatch(t)
        if not tm or ("(" in tm.group("r") and "@" not in tm.group("r")):
            raise NoiseSearchError(f"cannot parse reward term {t.strip()!r} in {spec!r}; write e.g. 0.7*digit+0.3*brightness")
        weights.append(float(tm.group("w")) if tm.group("w") else 1.0)
        rewards.append(make_reward(tm.group("r"), device))
    if any(not math.isfinite(w) for w in weights):
        raise NoiseSearchError(f"reward spec {spec!r}: weights must be finite numbers")
    if len(rewards) == 1 and weights[0] == 1.0:
        return rewards[0]
    return WeightedSum(rewards, weights)


def make_reward(spec, device: str | torch.device = "cpu") -> Reward:
    """Build a reward from a spec string (see module docstring); a ``Reward`` object or a function is
    resolved by :func:`as_reward`. The whole spec is parsed or refused: an empty term, a dangling
    ``+`` or ``*``, or an unknown name is an error, never skipped."""
    if not isinstance(spec, str):
        return as_reward(spec, device)
    spec = spec.strip()
    if not spec:
        raise NoiseSearchError("empty reward spec: give e.g. --reward digit")
    m = re.fullmatch(r"ranksum\s*\((.*)\)", spec, flags=re.S)
    if m:
        return _make_ranksum(spec, m.group(1), device)
    terms = _split_top(spec, "+")
    head = terms[0].partition("@")[0]
    if len(terms) > 1 or "*" in head:
        return _make_weighted(spec, terms, device)
    name, at, arg = spec.partition("@")
    name, arg = name.strip(), _unquote(arg.strip())
    if at and not arg:
        raise NoiseSearchError(f"reward spec {spec!r}: nothing after '@'; write {name}@ARG")
    if _IMPORT.fullmatch(name):
        return _load_path(name, arg if at else None, device)
    if not _NAME.fullmatch(name):
        raise NoiseSearchError(f"cannot parse reward spec {spec!r}: a reward is NAME, NAME@ARG or module.path:function, "
                               "e.g. digit or clip@/path/to/clip")
    return _load(name, arg if at else None, device)


class WeightedSum:
    """sum_i w_i * r_i(images, prompts)."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        if len(rewards) != len(weights):
            raise NoiseSearchError("a weighted sum needs one weight per reward")
        self.rewards, self.weights = [as_reward(r) for r in rewards], [float(w) for w in weights]
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights))
        self.flops_per_image = sum(r.flops_per_image for r in self.rewards)

    def __call__(self, images, prompts):
        return sum(w * score(r, images, prompts) for r, w in zip(self.rewards, self.weights))


class Comparative:
    """A reward whose value compares candidates: ``combine`` turns each part's scores into one value
    per row, comparing only rows of the same group (the candidates of one search). The problem
    scores the parts in any chunks and combines once per call, so results never depend on how the
    rows were batched (``--max-batch``)."""

    rewards: list

    def combine(self, values: Sequence[torch.Tensor], groups: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images, prompts):
        """Scored alone: the rows of the same prompt are one group."""
        index: dict[str, int] = {}
        groups = torch.tensor([index.setdefault(p, len(index)) for p in prompts])
        return self.combine([score(r, images, prompts) for r in self.rewards], groups)


class RankSum(Comparative):
    """Sum over rewards of each candidate's rank (0 = worst) among the candidates of its group:
    scale-free aggregation as in TTSnap's multi-reward setting. Ties rank the lower row higher (the
    pruning rule, :func:`noisesearch.pruning.order_keys`). Values compare within a group only."""

    def __init__(self, rewards: Sequence[Reward]):
        self.rewards = [as_reward(r) for r in rewards]
        self.name = "ranksum(" + ",".join(r.name for r in self.rewards) + ")"
        self.flops_per_image = sum(r.flops_per_image for r in self.rewards)

    def combine(self, values, groups):
        groups = torch.as_tensor(groups).cpu().long()
        total = torch.zeros(groups.numel(), dtype=torch.float64)
        for gid in torch.unique(groups).tolist():
            rows = (groups == gid).nonzero().flatten()
            ranks = rank_sum([v.double().cpu()[rows].numpy() for v in values])
            total[rows] = torch.as_tensor(ranks, dtype=torch.float64)
        return total.float()


def is_comparative(reward) -> bool:
    return isinstance(reward, Comparative)


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
    if not np.isfinite(out.numpy()).all():  # numpy: one cheap call on the few values
        bad = int((~torch.isfinite(out)).sum())
        raise NoiseSearchError(
            f"reward {reward.name!r} returned {bad} non-finite value(s) (NaN or inf) for {n} images; "
            "fix the reward (or its inputs) so that it returns finite scores"
        )
    return out


def is_noise_aware(reward) -> bool:
    """A noise-aware reward scores an estimate knowing its step (``reward.at(step, sigma)``)."""
    return callable(getattr(reward, "at", None)) and hasattr(reward, "base_name")


def at_step(reward: Reward, step: int | None, sigma: float | None = None) -> Reward:
    """The reward that scores estimates made at pool step ``step`` (noise level ``sigma``): noise-aware
    rewards (also inside sums and rank sums) are told the step; every other reward is itself."""
    if step is None:
        return reward
    if is_noise_aware(reward):
        return reward.at(step=step, sigma=sigma)
    if isinstance(reward, (Comparative, WeightedSum)):
        parts = [at_step(r, step, sigma) for r in reward.rewards]
        if all(p is r for p, r in zip(parts, reward.rewards)):
            return reward
        out = copy.copy(reward)
        out.rewards = parts
        return out
    return reward
