"""Compute accounting: every network evaluation and reward call is charged to the search it serves.

One path: the sampler charges its network evaluations and the problem charges its reward calls, both
through :meth:`Budget.charge`, at prices set by one :class:`CostModel`:

* one NFE (one denoiser call on one sample row, all guidance branches) costs ``flops_per_nfe``;
* one reward call on one candidate costs the reward's ``flops_per_image`` **plus**
  ``flops_per_decode``, the decode of the Tweedie estimate it scores (the VAE on a latent model,
  0 for pixel models).

A ``Budget`` covers ``num_searches`` independent searches (one per output sample). A limit is given
per search in NFEs, in FLOPs (network, decode and reward FLOPs together), or both. Charges happen
*before* the work runs and raise ``BudgetError`` if any search would go over.

Plans: a strategy states what a size costs (a :class:`Cost` per search); :meth:`Budget.fit` finds the
largest affordable size (the one sizing function of the package, also used by the simulator through
:func:`largest_affordable`), and :meth:`Budget.check_spent` verifies after the run that each search
spent what was planned.

A strategy with several knobs (candidates per decision, which steps are scored) offers several
configurations (:class:`SizeOption`, each with its own cost function); :meth:`Budget.fit_options`
picks one by a stated rule: among the configurations whose smallest size is affordable, the one whose
smallest size uses the largest share of the budget (the nearest to the strategy's own configuration,
which is the most expensive: it is listed first, and wins ties), then the largest affordable size of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from noisesearch.errors import BudgetError

#: NFE limits may be fractional (``--budget-nfe 360.5``); counts are integers, compared with this slack.
NFE_TOLERANCE = 1e-9
#: FLOPs are float sums; a plan within this relative slack of the limit fits.
FLOPS_RTOL = 1e-12
#: A size past this means the budget does not bound the search (e.g. a FLOP budget with free calls).
MAX_SIZE = 1 << 40


@dataclass(frozen=True)
class Cost:
    """What one search spends: NFEs, reward calls and FLOPs (of both)."""

    nfe: int = 0
    reward_calls: int = 0
    flops: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.nfe + other.nfe, self.reward_calls + other.reward_calls, self.flops + other.flops)

    def __mul__(self, k: int) -> "Cost":
        return Cost(self.nfe * k, self.reward_calls * k, self.flops * k)

    __rmul__ = __mul__

    def as_dict(self) -> dict:
        return {"nfe": int(self.nfe), "reward_calls": int(self.reward_calls), "flops": float(self.flops)}


@dataclass(frozen=True)
class CostModel:
    """Prices: FLOPs of one network evaluation, of one decode, of one call of the problem's reward."""

    flops_per_nfe: float = 0.0
    flops_per_reward: float = 0.0  # the problem's reward, per image
    flops_per_decode: float = 0.0  # decoding one Tweedie estimate to an image (0 for pixel models)

    def nfe(self, n: int = 1) -> Cost:
        return Cost(nfe=int(n), flops=n * self.flops_per_nfe)

    def reward(self, n: int = 1, flops_per_image: float | None = None) -> Cost:
        """``n`` reward calls (of the problem's reward, or of one costing ``flops_per_image``), decode included."""
        r = self.flops_per_reward if flops_per_image is None else float(flops_per_image)
        return Cost(reward_calls=int(n), flops=n * (r + self.flops_per_decode))


@dataclass(frozen=True)
class SizeOption:
    """One configuration the sizer may choose: what a size costs, the smallest meaningful size, a size
    the user fixed (None: fit it), and a cap on the fitted size (None: the budget alone decides)."""

    cost_of: Callable[[int], Cost]
    start: int = 1
    fixed: int | None = None
    cap: int | None = None


def within(value: float, limit: float | None, nfe: bool = False) -> bool:
    """Whether ``value`` fits ``limit`` (None = no limit), with the named tolerances."""
    if limit is None:
        return True
    return value <= limit + NFE_TOLERANCE if nfe else value <= limit * (1 + FLOPS_RTOL)


def largest_affordable(fits: Callable[[int], bool], start: int = 1) -> int:
    """Largest ``n >= start`` with ``fits(n)`` (``fits`` monotone: true up to some n, false after);
    ``start - 1`` when even ``start`` does not fit. Exponential search, then bisection."""
    if not fits(start):
        return start - 1
    lo, hi = start, start + 1
    while fits(hi):
        lo, hi = hi, 2 * hi
        if hi > MAX_SIZE:
            raise BudgetError("the budget does not bound this search: give its size explicitly or a tighter budget")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class Budget:
    def __init__(
        self,
        num_searches: int,
        nfe: float | None = None,
        flops: float | None = None,
        cost: CostModel | None = None,
    ):
        if nfe is None and flops is None:
            raise BudgetError("give a budget: NFEs per sample (--budget-nfe) or FLOPs per sample (--budget-flops)")
        for what, v in (("--budget-nfe", nfe), ("--budget-flops", flops)):
            if v is not None and not (v == v and 0 < v < float("inf")):
                raise BudgetError(f"{what} must be a positive finite number, got {v}")
        self.num_searches = num_searches
        self.nfe_limit = nfe
        self.flops_limit = flops
        self.cost = cost or CostModel()
        self.nfe = torch.zeros(num_searches, dtype=torch.long)
        self.reward_calls = torch.zeros(num_searches, dtype=torch.long)
        self.flops = torch.zeros(num_searches, dtype=torch.float64)
        self.listeners = []  # callables(kind, rows) notified after each charge (progress bars)

    # ---- planning ----------------------------------------------------------------------------
    def spent_max(self) -> Cost:
        """The most any search has spent so far (what limits what is still affordable)."""
        if not self.num_searches:
            return Cost()
        # ``charge`` replaces the counters (never changes them in place): while they are the same
        # tensors the maxima are too (a sizer asks for them once per configuration it prices)
        counters = (self.nfe, self.reward_calls, self.flops)
        cached = self.__dict__.get("_spent_max")
        if cached is None or any(a is not b for a, b in zip(cached[0], counters)):
            cached = self._spent_max = (counters, Cost(int(self.nfe.max()), int(self.reward_calls.max()), float(self.flops.max())))
        return cached[1]

    def affords(self, cost: Cost) -> bool:
        """Whether every search may still spend ``cost``."""
        used = self.spent_max()
        return within(used.nfe + cost.nfe, self.nfe_limit, nfe=True) and within(used.flops + cost.flops, self.flops_limit)

    def fit(self, cost_of: Callable[[int], Cost], start: int = 1, what: Callable[[int], str] | None = None) -> int:
        """Largest size ``n >= start`` whose ``cost_of(n)`` is affordable; a clear BudgetError when
        even ``start`` is not (``what(n)`` names the work for the message)."""
        first = cost_of(start)
        self.require(first, what(start) if what else f"size {start}")
        if self.nfe_limit is None and first.flops <= 0:
            raise BudgetError("cannot size the search: the budget does not constrain any cost it incurs")
        return largest_affordable(lambda n: self.affords(cost_of(n)), start)

    def share(self, cost: Cost) -> float:
        """The largest fraction of a limit that spending ``cost`` on top of what is spent would use."""
        used = self.spent_max()
        parts = []
        if self.nfe_limit is not None:
            parts.append((used.nfe + cost.nfe) / self.nfe_limit)
        if self.flops_limit is not None:
            parts.append((used.flops + cost.flops) / self.flops_limit)
        return max(parts)

    def fit_options(self, options: Sequence[SizeOption], what: Callable[[int, int], str] | None = None) -> tuple[int, int]:
        """(index, size) of the chosen configuration: among the options whose smallest size (``fixed``
        or ``start``) is affordable, the one whose smallest size uses the largest share of the budget
        (ties: the first listed), at its fixed size or its largest affordable size (at most ``cap``).
        A clear BudgetError naming the cheapest option when none is affordable."""
        smallest = [o.fixed or o.start for o in options]
        costs = [o.cost_of(n) for o, n in zip(options, smallest)]
        affordable = [i for i, c in enumerate(costs) if self.affords(c)]
        if not affordable:
            cheapest = min(range(len(options)), key=lambda i: (self.share(costs[i]), i))
            self.require(costs[cheapest], what(cheapest, smallest[cheapest]) if what else f"size {smallest[cheapest]}")
        best = max(affordable, key=lambda i: (self.share(costs[i]), -i))
        option = options[best]
        if option.fixed:
            return best, option.fixed
        size = self.fit(option.cost_of, option.start, (lambda n: what(best, n)) if what else None)
        return best, size if option.cap is None else max(1, min(size, option.cap))

    def require(self, cost: Cost, what: str) -> None:
        """Raise a clear BudgetError if one search cannot afford ``cost``."""
        if self.affords(cost):
            return
        limit = []
        if self.nfe_limit is not None:
            limit.append(f"{self.nfe_limit:g} NFEs")
        if self.flops_limit is not None:
            limit.append(f"{self.flops_limit:.4g} FLOPs")
        raise BudgetError(
            f"budget too small: {what} needs {cost.nfe} NFEs"
            + (f" ({cost.flops:.4g} FLOPs)" if self.flops_limit is not None else "")
            + f" per sample, the budget allows {' and '.join(limit)}; raise the budget to at least "
            + (f"{cost.nfe} NFEs" if self.nfe_limit is not None else f"{cost.flops:.4g} FLOPs")
            + " per sample"
        )

    # ---- charging ----------------------------------------------------------------------------
    def charge(self, owner: torch.Tensor, per_row: Cost, kind: str) -> None:
        """Charge ``per_row`` to the search of every row of ``owner`` (limits checked first)."""
        counts, rows = self._counts(owner)
        # numpy on the tensors' memory, only the parts that change: the same int64 / float64 sums as
        # in torch, with fewer and cheaper calls (a step of a small search calls this twice)
        nfe, calls, flops = self.nfe, self.reward_calls, self.flops
        if per_row.nfe:
            new = nfe.numpy() + (counts if per_row.nfe == 1 else counts * per_row.nfe)
            if self.num_searches and self.nfe_limit is not None and not within(float(new.max()), self.nfe_limit, nfe=True):
                raise BudgetError(f"budget exceeded: a search would use {int(new.max())} NFEs, limit {self.nfe_limit:g}")
            nfe = torch.from_numpy(new)
        if per_row.flops:
            new = flops.numpy() + counts.astype(np.float64) * per_row.flops
            if self.num_searches and self.flops_limit is not None and not within(float(new.max()), self.flops_limit):
                raise BudgetError(
                    f"budget exceeded: a search would use {float(new.max()):.4g} FLOPs, limit {self.flops_limit:.4g}"
                )
            flops = torch.from_numpy(new)
        if per_row.reward_calls:
            calls = torch.from_numpy(calls.numpy() + (counts if per_row.reward_calls == 1 else counts * per_row.reward_calls))
        self.nfe, self.reward_calls, self.flops = nfe, calls, flops
        for listener in self.listeners:
            listener(kind, rows)

    def _counts(self, owner: torch.Tensor) -> tuple[np.ndarray, int]:
        """(rows per search, rows) of ``owner``; the last owner's counts are kept while it is the
        same unmodified tensor (a step's network call and its reward call charge the same rows)."""
        last = getattr(self, "_counted", None)
        try:
            version = owner._version
        except RuntimeError:  # an inference-mode tensor has no version counter: count it every time
            version = None
        if last is not None and version is not None and last[0] is owner and last[1] == version:
            return last[2], last[3]
        flat = owner.detach().to("cpu", torch.long).numpy().ravel()
        counts = np.bincount(flat, minlength=self.num_searches)
        self._counted = (owner, version, counts, int(flat.size))
        return counts, int(flat.size)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.nfe.clone(), self.reward_calls.clone(), self.flops.clone()

    def check_spent(self, before, planned: Cost, exact: bool = True) -> None:
        """After a run: every search spent exactly ``planned`` since ``before`` (at most, when the
        plan is an upper bound). A mismatch is a defect of the strategy, never of the input."""
        nfe = self.nfe - before[0]
        calls = self.reward_calls - before[1]
        flops = self.flops - before[2]
        tol = 1e-9 * max(1.0, abs(planned.flops))
        if exact:
            ok = bool((nfe == planned.nfe).all() and (calls == planned.reward_calls).all()
                      and ((flops - planned.flops).abs() <= tol).all())
        else:
            ok = bool((nfe <= planned.nfe).all() and (calls <= planned.reward_calls).all() and (flops <= planned.flops + tol).all())
        if not ok:
            raise RuntimeError(
                f"accounting defect: planned {planned.as_dict()} per search, spent NFEs {sorted(set(nfe.tolist()))}, "
                f"reward calls {sorted(set(calls.tolist()))}, FLOPs up to {float(flops.max()):.6g}"
            )

    # ---- reporting ---------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "budget_nfe": self.nfe_limit,
            "budget_flops": self.flops_limit,
            "nfe_max": int(self.nfe.max()) if self.num_searches else 0,
            "nfe_mean": float(self.nfe.double().mean()) if self.num_searches else 0.0,
            "nfe_total": int(self.nfe.sum()),
            "reward_calls": int(self.reward_calls.sum()),
            "flops": float(self.flops.sum()),
            "flops_per_sample_max": float(self.flops.max()) if self.num_searches else 0.0,
            "flops_per_nfe": self.cost.flops_per_nfe,
            "flops_per_reward": self.cost.flops_per_reward,
            "flops_per_decode": self.cost.flops_per_decode,
        }
