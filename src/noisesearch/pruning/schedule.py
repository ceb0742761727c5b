"""Pruning schedules: check steps, keep fractions, survivor counts, the paper's published schedules.

See :mod:`noisesearch.pruning` for the rules shared by live pruning and the simulator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from noisesearch.errors import NoiseSearchError


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneSchedule:
    """Check steps (strictly increasing, >= 0) and the fraction of alive candidates kept at each.

    An empty schedule means no pruning (best-of-N).
    """

    steps: tuple[int, ...]
    keep: tuple[float, ...]

    def __post_init__(self):
        steps = tuple(int(s) for s in self.steps)
        keep = tuple(float(a) for a in self.keep)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "keep", keep)
        if len(steps) != len(keep):
            raise NoiseSearchError(
                f"a pruning schedule needs one keep fraction per check step: got {len(steps)} steps "
                f"and {len(keep)} keep fractions"
            )
        if any(s < 0 for s in steps):
            raise NoiseSearchError(f"check steps must be >= 0, got {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise NoiseSearchError(f"check steps must be strictly increasing, got {list(steps)}")
        if any(not (0.0 < a <= 1.0) for a in keep):
            raise NoiseSearchError(f"keep fractions must be in (0, 1], got {list(keep)}")

    def validate(self, num_steps: int) -> "PruneSchedule":
        """Check the steps fit a sampler of ``num_steps`` steps (the last check <= num_steps - 2)."""
        if self.steps and self.steps[-1] > num_steps - 2:
            raise NoiseSearchError(
                f"check step {self.steps[-1]} is out of range for {num_steps} denoising steps: "
                f"checks must lie in [0, {num_steps - 2}] (step {num_steps - 1} is the final image)"
            )
        return self

    @property
    def num_checks(self) -> int:
        return len(self.steps)

    @classmethod
    def parse(cls, steps: str, keep: str) -> "PruneSchedule":
        """From CLI strings such as ``"2,6,11"`` and ``"0.4,0.4,0.5"``."""
        try:
            s = tuple(int(x) for x in steps.split(",") if x.strip()) if steps else ()
            k = tuple(float(x) for x in keep.split(",") if x.strip()) if keep else ()
        except ValueError:
            raise NoiseSearchError(f"cannot parse schedule steps {steps!r} / keep {keep!r}: use e.g. 2,6,11 and 0.4,0.4,0.5")
        return cls(s, k)

    @classmethod
    def from_fractions(cls, positions: Sequence[float], keep: Sequence[float], num_steps: int) -> "PruneSchedule":
        """Build a schedule from check positions given as fractions of the trajectory.

        ``position`` p in [0, 1) maps to step ``round(p * (num_steps - 1))``, clipped to
        ``[0, num_steps - 2]``; duplicates after rounding are merged (keeping the product of their
        keep fractions), so the result is always valid for ``num_steps``.
        """
        last = max(num_steps - 2, 0)
        merged: dict[int, float] = {}
        for p, a in sorted(zip(positions, keep)):
            s = int(min(max(round(float(p) * (num_steps - 1)), 0), last))
            merged[s] = merged.get(s, 1.0) * float(a)
        steps = tuple(sorted(merged))
        return cls(steps, tuple(merged[s] for s in steps)).validate(num_steps)

    def survivors(self, n: int) -> list[int]:
        """Integer alive counts ``[n_0 = n, n_1, ..., n_k]`` after each check."""
        counts = [int(n)]
        for a in self.keep:
            counts.append(keep_count(counts[-1], a))
        return counts

    def active_checks(self, n: int) -> list[bool]:
        """Per check, whether it prunes anyone when ``n`` candidates start. A check that would keep
        every alive candidate is skipped (no reward call) under the exact cost model."""
        counts = self.survivors(n)
        return [b < a for a, b in zip(counts, counts[1:])]

    def as_dict(self) -> dict:
        return {"steps": list(self.steps), "keep": [round(a, 6) for a in self.keep]}

    def __str__(self) -> str:
        if not self.steps:
            return "no pruning"
        return "steps " + ",".join(map(str, self.steps)) + "; keep " + ",".join(f"{a:g}" for a in self.keep)


def keep_count(alive: int, frac: float) -> int:
    """Number of candidates kept out of ``alive``: ``max(1, round(frac * alive))`` (Python round)."""
    if alive <= 0:
        return 0
    return max(1, int(round(frac * alive)))



def published_schedule(num_rewards: int, num_steps: int) -> PruneSchedule:
    """The TTSnap paper's hand-tuned schedules (for 20 steps), mapped to ``num_steps`` by position.

    Single reward: steps [2, 6, 11], keep [0.4, 0.4, 0.5]. Multi-reward: steps [4, 6, 11], keep
    [0.4, 0.5, 0.6]. For another step count the check positions keep their fraction of the
    trajectory (``s / 19``).
    """
    steps, keep = ((2, 6, 11), (0.4, 0.4, 0.5)) if num_rewards == 1 else ((4, 6, 11), (0.4, 0.5, 0.6))
    if num_steps == 20:
        return PruneSchedule(steps, keep)
    return PruneSchedule.from_fractions([s / 19 for s in steps], keep, num_steps)
