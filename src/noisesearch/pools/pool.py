"""The in-memory reward pool and its on-disk format (``noisesearch-pool``, version 1).

A pool holds, for ``P`` prompts, ``N`` candidates (starting noises) and ``S`` denoising steps, the
reward of every candidate's Tweedie (x0) estimate at every step, for one or more reward models::

    rewards[name]      float32 [P, N, S]   base (off-the-shelf) reward; step S-1 is the final image
    noise_aware[name]  float32 [P, N, S]   optional noise-aware variant; NaN = not available there,
                                           use the base reward (e.g. steps it was not trained for)

plus metadata: ``model``, ``num_steps`` (= S), ``flops_per_step`` (one denoising step of one
candidate), ``flops_per_reward[name]`` (one call of that reward on one image), ``prompts`` and a
free-form ``extra`` dict (JSON-serialisable; e.g. ``display`` rescaling for plots, provenance).

On disk (see docs/simulator.md)::

    <dir>/pool.json                 manifest, written last: {"format": "noisesearch-pool", "version": 1, ...}
    <dir>/prompts.json              list of P strings
    <dir>/<name>.base.npy           rewards[name]
    <dir>/<name>.noise_aware.npy    noise_aware[name] (only for rewards that have one)

Every file is written to a temporary name and moved into place with ``os.replace``; the manifest
comes last, so a folder with a manifest is always complete.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_save_npy, atomic_write_json
from noisesearch.pools.parts import pool_reward_name

FORMAT_NAME = "noisesearch-pool"
FORMAT_VERSION = 1
MANIFEST = "pool.json"
PROMPTS = "prompts.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _same_spec(a: str, b: str) -> bool:
    """Two reward specs name the same reward: equal, or the same name ``@`` the same path."""
    if a == b:
        return True
    (na, _, pa), (nb, _, pb) = a.partition("@"), b.partition("@")
    if na != nb or not pa or not pb:
        return False
    try:
        return Path(pa).expanduser().resolve() == Path(pb).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith((".base", ".noise_aware")):
        raise NoiseSearchError(
            f"invalid reward name {name!r}: use letters, digits, '_', '.', '+' or '-' (no '/' or spaces)"
        )
    return name


def _checked_reward_array(name: str, arr) -> np.ndarray:
    _check_name(name)
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise NoiseSearchError(
            f"reward {name!r}: expected an array [prompt, candidate, step] (3 dimensions), got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise NoiseSearchError(f"reward {name!r}: expected numbers, got dtype {arr.dtype}")
    if min(arr.shape) < 1:
        raise NoiseSearchError(f"reward {name!r}: empty array of shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        p, c, s = np.argwhere(bad)[0]
        raise NoiseSearchError(
            f"reward {name!r}: {int(bad.sum())} NaN/inf values in the base rewards (first at prompt {p}, "
            f"candidate {c}, step {s}); base rewards must be finite (only noise-aware arrays may hold NaN)"
        )
    return arr


def _checked_rewards(rewards: dict) -> dict[str, np.ndarray]:
    """Base reward arrays: valid names, 3-D, numeric, non-empty, finite, one shared shape; float32."""
    out: dict[str, np.ndarray] = {}
    first = next(iter(rewards))
    for name, arr in rewards.items():
        arr = _checked_reward_array(name, arr)
        if out and arr.shape != out[first].shape:
            raise NoiseSearchError(
                f"reward {name!r} has shape {arr.shape} but {first!r} has {out[first].shape}: "
                "all rewards of a pool must share [prompt, candidate, step]"
            )
        out[name] = arr
    return out


def _checked_noise_aware(noise_aware: dict, rewards: dict, shape) -> dict[str, np.ndarray]:
    """Noise-aware arrays: each of a base reward, of its shape, NaN (not inf) where missing; float32."""
    out = {}
    for name, arr in noise_aware.items():
        if name not in rewards:
            raise NoiseSearchError(
                f"noise-aware reward {name!r} has no base reward; base rewards: {', '.join(rewards)}"
            )
        arr = np.asarray(arr)
        if arr.shape != shape:
            raise NoiseSearchError(f"noise-aware reward {name!r} has shape {arr.shape}, base rewards have {shape}")
        arr = arr.astype(np.float32, copy=False)
        if np.isinf(arr).any():
            raise NoiseSearchError(f"noise-aware reward {name!r} holds inf values (use NaN for missing steps)")
        out[name] = arr
    return out


@dataclass
class Pool:
    """Rewards ``[prompt, candidate, step]`` for one or more reward models, with cost metadata.

    Construction validates everything (shapes, NaN, names, metadata) and raises
    ``NoiseSearchError`` with a message that says what is wrong. Arrays are stored as float32.
    ``num_steps`` may be left at 0 to take it from the arrays.
    """

    rewards: dict[str, np.ndarray]
    noise_aware: dict[str, np.ndarray] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    model: str = "unknown"
    num_steps: int = 0
    flops_per_step: float = 0.0
    flops_per_reward: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check and normalise everything (shapes, NaN, names, metadata); NoiseSearchError if wrong."""
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise NoiseSearchError("a pool needs at least one reward array")
        self.rewards = _checked_rewards(self.rewards)
        shape = self.shape
        self.noise_aware = _checked_noise_aware(self.noise_aware or {}, self.rewards, shape)
        self._check_steps_and_prompts(shape)
        self._check_flops()
        self.model = str(self.model)
        if not isinstance(self.extra, dict):
            raise NoiseSearchError("pool 'extra' metadata must be a dict")

    def _check_steps_and_prompts(self, shape) -> None:
        P, N, S = shape
        if self.num_steps in (0, None):
            self.num_steps = S
        if int(self.num_steps) != S:
            raise NoiseSearchError(f"metadata says {self.num_steps} steps but the reward arrays have {S}")
        self.num_steps = int(self.num_steps)
        if self.prompts is None or len(self.prompts) == 0:
            self.prompts = [f"prompt {i}" for i in range(P)]
        self.prompts = [str(p) for p in self.prompts]
        if len(self.prompts) != P:
            raise NoiseSearchError(f"{len(self.prompts)} prompts given for reward arrays with {P} prompts")

    def _check_flops(self) -> None:
        try:
            self.flops_per_step = float(self.flops_per_step or 0.0)
            fpr = dict(self.flops_per_reward or {})
            self.flops_per_reward = {name: float(fpr.get(name, 0.0)) for name in self.rewards}
        except (TypeError, ValueError):
            raise NoiseSearchError("FLOPs metadata must be numbers")
        unknown = set(fpr) - set(self.rewards)
        if unknown:
            raise NoiseSearchError(f"FLOPs given for unknown rewards {sorted(unknown)}; rewards: {', '.join(self.rewards)}")
        for v in [self.flops_per_step, *self.flops_per_reward.values()]:
            if not math.isfinite(v) or v < 0:
                raise NoiseSearchError(f"FLOPs metadata must be finite and >= 0, got {v}")

    # ---- shape and access -----------------------------------------------------------------------
    @property
    def reward_names(self) -> list[str]:
        return list(self.rewards)

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.rewards.values())).shape

    @property
    def num_prompts(self) -> int:
        return self.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.shape[1]

    def final(self, name: str) -> np.ndarray:
        """Reward of the finished images, [P, N]."""
        return self.rewards[self.check_reward(name)][:, :, -1]

    def check_reward(self, name: str) -> str:
        if name not in self.rewards:
            raise NoiseSearchError(f"unknown reward {name!r}; this pool has: {', '.join(self.rewards)}")
        return name

    def reward_key(self, name: str) -> str:
        """This pool's key for a reward named by its key or by the spec the pool was made with
        (``hps@DIR`` finds the key ``hps__DIR...``, a relative or absolute ``DIR`` alike)."""
        if name in self.rewards:
            return name
        specs = self.extra.get("reward_specs") or {}
        for key, spec in specs.items():
            if key in self.rewards and _same_spec(str(spec), str(name)):
                return key
        key = pool_reward_name(name)
        if key in self.rewards:
            return key
        known = ", ".join(f"{k} (made with {specs[k]!r})" if specs.get(k, k) != k else k for k in self.rewards)
        raise NoiseSearchError(f"the pool has no reward {name!r}; it has: {known}")

    def has_noise_aware(self, name: str) -> bool:
        return name in self.noise_aware and not np.isnan(self.noise_aware[name]).all()

    def scores(self, name: str, noise_aware: bool = False) -> np.ndarray:
        """[P, N, S] scores used for pruning: the base reward, or the noise-aware one where it exists.

        Missing noise-aware values (NaN, or no array) fall back to the base reward. Candidates are
        ranked against each other per (prompt, step), so a (prompt, step) where only some candidates
        have a noise-aware value uses the base reward for all of them: the two models need not share
        a scale."""
        base = self.rewards[self.check_reward(name)]
        if not noise_aware or name not in self.noise_aware:
            return base
        na = self.noise_aware[name]
        missing = np.isnan(na).any(axis=1, keepdims=True)  # [P, 1, S]
        return np.where(missing, base, na)

    def noise_aware_coverage(self, name: str) -> float:
        """Share of (prompt, candidate, step) entries with a noise-aware value (0 when absent)."""
        if name not in self.noise_aware:
            return 0.0
        return float(np.mean(~np.isnan(self.noise_aware[name])))

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, rewards: dict, noise_aware: dict | None = None, **meta) -> "Pool":
        """Convenience constructor: ``Pool.from_arrays({"hps": arr}, flops_per_step=..., ...)``."""
        return cls(rewards=dict(rewards), noise_aware=dict(noise_aware or {}), **meta)

    def select_prompts(self, index) -> "Pool":
        """A pool restricted to some prompts (a slice, a range, or a list of indices)."""
        idx = np.arange(self.num_prompts)[index] if isinstance(index, slice) else np.asarray(list(index), dtype=int)
        if idx.size == 0:
            raise NoiseSearchError("prompt selection is empty")
        if idx.min() < 0 or idx.max() >= self.num_prompts:
            raise NoiseSearchError(f"prompt indices out of range: the pool has {self.num_prompts} prompts")
        return replace(
            self,
            rewards={k: v[idx] for k, v in self.rewards.items()},
            noise_aware={k: v[idx] for k, v in self.noise_aware.items()},
            prompts=[self.prompts[i] for i in idx],
            extra=dict(self.extra),
        )

    def select_rewards(self, names: Sequence[str]) -> "Pool":
        names = [self.check_reward(n) for n in names]
        return replace(
            self,
            rewards={n: self.rewards[n] for n in names},
            noise_aware={n: self.noise_aware[n] for n in names if n in self.noise_aware},
            flops_per_reward={n: self.flops_per_reward[n] for n in names},
            extra=dict(self.extra),
        )

    def with_metadata(self, **changes) -> "Pool":
        """A copy with some metadata replaced (``flops_per_step``, ``flops_per_reward``, ``model`` ...).

        ``flops_per_reward`` may be a number (applied to every reward) or a dict (merged)."""
        fpr = changes.pop("flops_per_reward", None)
        if fpr is not None:
            if isinstance(fpr, dict):
                changes["flops_per_reward"] = {**self.flops_per_reward, **fpr}
            else:
                changes["flops_per_reward"] = {n: float(fpr) for n in self.rewards}
        return replace(self, extra=dict(self.extra), **changes)

    def metadata(self) -> dict:
        """JSON-serialisable metadata (everything but the arrays and prompts)."""
        return {
            "model": self.model,
            "num_prompts": self.num_prompts,
            "num_candidates": self.num_candidates,
            "num_steps": self.num_steps,
            "flops_per_step": self.flops_per_step,
            "flops_per_reward": dict(self.flops_per_reward),
            "rewards": self.reward_names,
            "noise_aware": list(self.noise_aware),
            "extra": self.extra,
        }

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write the pool to ``directory`` in the ``noisesearch-pool`` v1 format, atomically.

        Arrays and prompts go to temporary files moved into place with ``os.replace``; the manifest
        ``pool.json`` is written last (and removed first when overwriting an existing pool), so a
        reader never sees a manifest pointing at partial data.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        manifest_path = d / MANIFEST
        if manifest_path.exists():
            manifest_path.unlink()  # the folder is incomplete until the new manifest lands
        files = {}
        for name, arr in self.rewards.items():
            fname = f"{name}.base.npy"
            atomic_save_npy(d / fname, arr)
            files.setdefault(name, {})["base"] = fname
        for name, arr in self.noise_aware.items():
            fname = f"{name}.noise_aware.npy"
            atomic_save_npy(d / fname, arr)
            files[name]["noise_aware"] = fname
        atomic_write_json(d / PROMPTS, self.prompts)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **self.metadata(),
            "shape": list(self.shape),
            "files": files,
            "prompts_file": PROMPTS,
        }
        atomic_write_json(manifest_path, manifest)
        return d


def merge_pools(pools: Iterable[Pool]) -> Pool:
    """Concatenate pools along the prompt axis (e.g. prompt ranges generated separately).

    All parts must agree on rewards, noise-aware variants, candidates, steps and cost metadata.
    ``extra`` is taken from the first part.
    """
    pools = list(pools)
    if not pools:
        raise NoiseSearchError("nothing to merge")
    first = pools[0]
    for i, p in enumerate(pools[1:], 1):
        if p.reward_names != first.reward_names or set(p.noise_aware) != set(first.noise_aware):
            raise NoiseSearchError(f"pool part {i} has rewards {p.reward_names}, part 0 has {first.reward_names}")
        if p.shape[1:] != first.shape[1:]:
            raise NoiseSearchError(
                f"pool part {i} has {p.num_candidates} candidates x {p.num_steps} steps, "
                f"part 0 has {first.num_candidates} x {first.num_steps}"
            )
        if (p.model, p.flops_per_step, p.flops_per_reward) != (first.model, first.flops_per_step, first.flops_per_reward):
            raise NoiseSearchError(f"pool part {i} has different model or FLOPs metadata than part 0")
    return replace(
        first,
        rewards={k: np.concatenate([p.rewards[k] for p in pools]) for k in first.rewards},
        noise_aware={k: np.concatenate([p.noise_aware[k] for p in pools]) for k in first.noise_aware},
        prompts=[s for p in pools for s in p.prompts],
        extra=dict(first.extra),
    )
