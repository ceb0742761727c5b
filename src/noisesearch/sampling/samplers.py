"""Stochastic samplers with the injected noise as an explicit argument.

A ``Sampler`` advances a batched ``State`` one step at a time. ``start(cond, noise)`` places
``x = sigma_0 * noise``; ``step(state, noise)`` moves every row from ``sigmas[i]`` to
``sigmas[i + 1]`` injecting ``noise`` (the action a search strategy chooses). Each state carries
``x0``, the Tweedie estimate a strategy scores, and ``owner``: the index of the search (output
sample) each row belongs to, so that the budget charges every network evaluation to its search.

**Infinite sigma.** Flow-matching pipelines start at t = 1, i.e. ``sigma_0 = inf`` (their
``schedule_sigmas``, which samplers use by default when a denoiser has one). There the state holds
the limit ``x / sigma``, the pure noise, the denoiser reads it as such, and the first step takes the
exact limit of its rule: Euler / Euler-ancestral ``x_1 = x0 + sigma_down * eps`` (``eps = x / sigma``
= the noise; sigma_down = sigma_1 for Euler), Heun an Euler step (a second-order correction over an
infinite interval is undefined) and no churn.

Branching is ``state.repeat(n)`` followed by ``step`` with ``n`` different noises per row; keeping
a subset is ``state.select(idx)``. Network calls are split into chunks of ``max_batch`` rows and
charged to ``budget`` (a ``noisesearch.budget.Budget``) before they run. Noise is never drawn here:
callers pass it (strategies draw from ``problem.noise``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from noisesearch.errors import unknown_name
from noisesearch.models.base import Cond, Denoiser, cond_cat, cond_index, cond_repeat
from noisesearch.sampling.schedules import karras_sigmas


@dataclass
class State:
    """A batch of partial trajectories, all at the same step."""

    x: torch.Tensor  # [B, *sample_shape] at sigma = sampler.sigmas[step]
    x0: torch.Tensor  # [B, *sample_shape] Tweedie estimate after the last network call
    step: int  # index into sampler.sigmas; step == num_steps means finished (x == x0)
    cond: Cond  # batched condition, B rows
    owner: torch.Tensor  # [B] long: which search each row belongs to
    x0_at_x: bool = True  # x0 == D(x, sigma) exactly (a sampler may reuse it)

    def __len__(self) -> int:
        return self.x.shape[0]

    def moved(self, x: torch.Tensor, x0: torch.Tensor, step: int, x0_at_x: bool) -> "State":
        """The same rows (condition, owners) at other values: what a step returns."""
        if type(self) is State:  # the constructor: dataclasses.replace costs more than a small step
            return State(x, x0, step, self.cond, self.owner, x0_at_x)
        return replace(self, x=x, x0=x0, step=step, x0_at_x=x0_at_x)

    def select(self, idx: torch.Tensor | Sequence[int]) -> "State":
        idx = torch.as_tensor(idx, dtype=torch.long)
        on_x = idx.to(self.x.device)
        x, x0 = self.x[on_x], self.x0[on_x]
        cond, owner = cond_index(self.cond, idx), self.owner[idx.to(self.owner.device)]
        if type(self) is State:
            return State(x, x0, self.step, cond, owner, self.x0_at_x)
        return replace(self, x=x, x0=x0, cond=cond, owner=owner)

    def repeat(self, n: int) -> "State":
        """Each row repeated ``n`` times consecutively (row i -> rows i*n .. i*n+n-1)."""
        return replace(
            self,
            x=self.x.repeat_interleave(n, 0),
            x0=self.x0.repeat_interleave(n, 0),
            cond=cond_repeat(self.cond, n),
            owner=self.owner.repeat_interleave(n, 0),
        )

    @staticmethod
    def cat(states: Sequence["State"]) -> "State":
        first = states[0]
        if any(s.step != first.step for s in states):
            raise ValueError("can only concatenate states at the same step")
        return replace(
            first,
            x=torch.cat([s.x for s in states]),
            x0=torch.cat([s.x0 for s in states]),
            cond=cond_cat([s.cond for s in states]),
            owner=torch.cat([s.owner for s in states]),
            x0_at_x=all(s.x0_at_x for s in states),
        )


class Sampler:
    """Base class: schedule, noise drawing, chunked and charged denoiser calls."""

    name = "base"

    def __init__(
        self,
        denoiser: Denoiser,
        steps: int | None = None,
        sigmas: torch.Tensor | None = None,
        rho: float = 7.0,
        max_batch: int = 512,
        budget=None,
    ):
        self.denoiser = denoiser
        if sigmas is None and hasattr(denoiser, "schedule_sigmas"):
            sigmas = denoiser.schedule_sigmas(steps or denoiser.default_steps)  # the model's own (flow pipelines)
        if sigmas is None:
            steps = steps or denoiser.default_steps
            sigmas = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max, rho)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if sigmas[-1] != 0:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.sigmas = sigmas
        self.num_steps = len(sigmas) - 1
        self.max_batch = max_batch
        self.budget = budget
        self.on_call: Callable[[int], None] | None = None  # observer of rows evaluated (e.g. timing)

    def _schedule(self) -> tuple[torch.Tensor, list[float], dict]:
        """What is derived from ``sigmas``, kept while ``sigmas`` is the same tensor (rebuilt when it
        is replaced, e.g. in a copy of the sampler re-timed): its values as a list, and a dict of
        results worked out once per schedule (``noise_steps``)."""
        cache = self.__dict__.get("_schedule_cache")
        if cache is None or cache[0] is not self.sigmas:
            cache = self._schedule_cache = (self.sigmas, self.sigmas.tolist(), {})
        return cache

    def sigma(self, i: int) -> float:
        """``float(self.sigmas[i])`` from the cached list: indexing a tensor costs more than a step's
        arithmetic on small samples."""
        return self._schedule()[1][i]

    # ---- noise shape (the draws come from ``noisesearch.noise.NoiseSource``) ------------------
    @property
    def noise_shape(self) -> tuple[int, ...]:
        return tuple(self.denoiser.sample_shape)

    @property
    def noise_dim(self) -> int:
        return math.prod(self.noise_shape)

    # ---- network calls -----------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond, owner: torch.Tensor) -> torch.Tensor:
        """D(x, sigma, cond) for every row (``sigma``: one level, or a tensor [B] of one per row), in
        chunks, charged to the budget first."""
        if self.budget is not None:
            self.budget.charge(owner, self.budget.cost.nfe(1), "nfe")
        n = x.shape[0]
        if isinstance(sigma, torch.Tensor):
            sig = sigma.to(x.device, x.dtype).reshape(n)
        else:
            sig = torch.full((n,), float(sigma), device=x.device, dtype=x.dtype)
        if n <= self.max_batch:  # one chunk (the usual case): the rows as they are
            out = self.denoiser(x, sig, cond_index(cond, slice(0, n)))
        else:
            outs = []
            for lo in range(0, n, self.max_batch):
                hi = min(lo + self.max_batch, n)
                outs.append(self.denoiser(x[lo:hi], sig[lo:hi], cond_index(cond, slice(lo, hi))))
            out = torch.cat(outs)
        if self.on_call is not None:
            self.on_call(n)
        return out

    # ---- the step rule (subclasses) -------------------------------------------------------------
    def start(self, cond: Cond, noise: torch.Tensor, owner: torch.Tensor | None = None) -> State:
        """Initial states ``x = sigma_0 * noise`` (``noise`` itself at sigma_0 = inf) and their x0."""
        if owner is None:
            owner = torch.arange(noise.shape[0])
        s0 = self.sigma(0)
        x = noise.clone() if math.isinf(s0) else noise * s0
        x0 = self.denoise(x, self.sigma(0), cond, owner)
        return State(x=x, x0=x0, step=0, cond=cond, owner=owner, x0_at_x=True)

    start_nfe = 1

    def step(self, state: State, noise: torch.Tensor | None) -> State:
        raise NotImplementedError

    def step_nfe(self, i: int) -> int:
        """Network calls per row to advance from step ``i`` to ``i + 1`` on a normal trajectory."""
        raise NotImplementedError

    def uses_noise(self, i: int) -> bool:
        """Whether the noise injected at step ``i`` changes anything (it does not at the last step)."""
        raise NotImplementedError

    # ---- derived -----------------------------------------------------------------------------
    def noise_steps(self) -> list[int]:
        """Steps whose injected noise matters (``uses_noise``), worked out once per schedule (a copy
        of the sampler given other ``sigmas`` works them out again)."""
        derived, key = self._schedule()[2], ("noise_steps", self.num_steps)
        if key not in derived:
            derived[key] = [i for i in range(self.num_steps) if self.uses_noise(i)]
        return list(derived[key])

    def decision_levels(self) -> list[tuple[int, float, int]]:
        """``(step, sigma, NFEs of the step)`` of every noise step, worked out once per schedule (a
        strategy's sizer prices dozens of configurations from them)."""
        derived, key = self._schedule()[2], ("decision_levels", self.num_steps)
        if key not in derived:
            derived[key] = [(i, self.sigma(i), self.step_nfe(i)) for i in self.noise_steps()]
        return list(derived[key])

    def nfe_to_end(self, i: int) -> int:
        """Network calls per row from step ``i`` to the end."""
        return sum(self.step_nfe(j) for j in range(i, self.num_steps))

    @property
    def nfe_per_trajectory(self) -> int:
        return self.start_nfe + self.nfe_to_end(0)

    def rollout(self, state: State, noise, until: int | None = None) -> State:
        """Continue every row with fresh Gaussian noise from ``noise`` (a ``NoiseSource``: each row
        draws from its search's stream) until step ``until`` (default: the end)."""
        until = self.num_steps if until is None else until
        while state.step < until:
            z = noise.normal(state.owner) if self.uses_noise(state.step) else None
            state = self.step(state, z)
        return state

    def step_rows(self, x: torch.Tensor, x0: torch.Tensor, steps: Sequence[int], noise: torch.Tensor,
                  cond: Cond, owner: torch.Tensor, x0_at_x: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Rows each at its own step ``steps[r]`` (a ``State`` row by row: ``x``, ``x0``, ``x0_at_x``),
        each taken one step on with its row of ``noise`` (read only where the step injects noise): the
        ``(x, x0, x0_at_x)`` of every row one step later (``x0_at_x`` a bool array). Here one :meth:`step` per distinct step (one
        on the rows as they are when all share it); a sampler whose step is a move then one network
        call at the next level makes one call for all."""
        steps, flags = np.asarray(steps, dtype=np.int64), np.asarray(x0_at_x, dtype=bool)
        keys = steps * 2 + flags
        if (keys == keys[0]).all():
            t = int(steps[0])
            out = self.step(State(x, x0, t, cond, owner, bool(flags[0])), noise if self.uses_noise(t) else None)
            return out.x, out.x0, np.full(len(steps), out.x0_at_x)
        xs, x0s, at_x = torch.empty_like(x), torch.empty_like(x0), flags.copy()
        for key in np.unique(keys).tolist():
            rows = np.flatnonzero(keys == key)
            at = torch.from_numpy(rows)
            on, t = at.to(x.device), key // 2
            out = self.step(State(x[on], x0[on], t, cond_index(cond, at), owner[at.to(owner.device)], bool(key % 2)),
                            noise[on] if self.uses_noise(t) else None)
            xs[on], x0s[on] = out.x, out.x0
            at_x[rows] = out.x0_at_x
        return xs, x0s, at_x

    def check_noise(self, state: State, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            if self.uses_noise(state.step):
                raise ValueError(f"step {state.step} injects noise: pass a noise tensor")
            return torch.zeros_like(state.x)
        if noise.shape != state.x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != state shape {tuple(state.x.shape)}")
        return noise.to(state.x.device, state.x.dtype)


def ancestral_split(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, as in k-diffusion's ``get_ancestral_step``."""
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    if math.isinf(sigma_from):  # the limit sigma_from -> inf
        sigma_up = min(sigma_to, eta * sigma_to)
        return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


class EulerAncestral(Sampler):
    """Euler-ancestral (k-diffusion ``sample_euler_ancestral``); ``eta=0`` is plain Euler (ODE).

    One network call per step (none for the last, which lands on x0): N steps cost N NFEs.
    """

    name = "euler-ancestral"

    def __init__(self, denoiser: Denoiser, steps: int | None = None, eta: float = 1.0, **kw):
        super().__init__(denoiser, steps, **kw)
        self.eta = eta

    def step_nfe(self, i: int) -> int:
        return 1 if self.sigma(i + 1) > 0 else 0

    def uses_noise(self, i: int) -> bool:
        return self.step_sigmas(i)[3] > 0

    def step_sigmas(self, i: int) -> tuple[float, float, float, float]:
        """Step ``i``'s noise levels: ``(sigma_i, sigma_{i+1}, sigma_down, sigma_up)``."""
        s, s_next = self.sigma(i), self.sigma(i + 1)
        return (s, s_next, *ancestral_split(s, s_next, self.eta))

    def step(self, state: State, noise: torch.Tensor | None) -> State:
        i = state.step
        if i >= self.num_steps:
            raise ValueError("state is already at the end of the schedule")
        s, s_next, sigma_down, sigma_up = self.step_sigmas(i)
        noise = self.check_noise(state, noise)
        if math.isinf(s):  # state.x is eps = lim x / sigma: the limit of the step below
            x = state.x0 + state.x * sigma_down
        else:
            d = (state.x - state.x0) / s
            x = state.x + d * (sigma_down - s)
        if s_next == 0:
            return state.moved(x, x, i + 1, True)
        x = x + noise * sigma_up
        x0 = self.denoise(x, s_next, state.cond, state.owner)
        return state.moved(x, x0, i + 1, True)

    def step_rows(self, x: torch.Tensor, x0: torch.Tensor, steps: Sequence[int], noise: torch.Tensor,
                  cond: Cond, owner: torch.Tensor, x0_at_x: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """:meth:`Sampler.step_rows` with one network call for every row (each at its own next
        level): the step's arithmetic with one coefficient per row (the step reads no ``x0_at_x``)."""
        steps = np.asarray(steps, dtype=np.int64)
        table, numbers = self.row_coefficients(x.dtype, x.device)
        if (steps == steps[0]).all() or np.isinf(numbers[0, steps]).any():
            return super().step_rows(x, x0, steps, noise, cond, owner, x0_at_x)
        s, down, up, s_next_rows = table.index_select(1, torch.from_numpy(steps).to(x.device)).view(
            4, len(steps), *([1] * (x.dim() - 1))).unbind(0)
        xn = torch.addcmul(x, (x - x0).div_(s), down)  # x + (x - x0) / s * (sigma_down - s), as in step
        xn.addcmul_(noise.to(x.device, x.dtype), up)
        live = numbers[3, steps] > 0  # the last step lands on x0: no call
        if live.all():
            return xn, self.denoise(xn, s_next_rows, cond, owner), np.ones(len(steps), dtype=bool)
        x0n = xn.clone()
        if live.any():
            at = torch.from_numpy(np.flatnonzero(live))
            on = at.to(x.device)
            x0n[on] = self.denoise(xn[on], s_next_rows[on], cond_index(cond, at), owner[at.to(owner.device)])
        return xn, x0n, np.ones(len(steps), dtype=bool)

    def row_coefficients(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, np.ndarray]:
        """Every step's numbers as :meth:`step` uses them, a column per step: ``(s, sigma_down - s,
        sigma_up (0 for the last step), s_next)`` in ``dtype`` on ``device`` (an infinite ``s`` gives a
        column :meth:`step_rows` never reads), and the same numbers as a float64 numpy array (to index by
        many steps at once on the CPU); worked out once per schedule."""
        derived, key = self._schedule()[2], ("row_coefficients", self.num_steps, self.eta, dtype, str(device))
        if key not in derived:
            rows = []
            for t in range(self.num_steps):
                s, s_next, sigma_down, sigma_up = self.step_sigmas(t)
                rows.append((s, sigma_down - s, sigma_up if s_next > 0 else 0.0, s_next))
            numbers = np.array(rows, dtype=np.float64).T.copy()
            derived[key] = (torch.tensor(numbers, dtype=dtype, device=device), numbers)
        return derived[key]


class Euler(EulerAncestral):
    """Plain Euler on the probability-flow ODE: ``EulerAncestral`` with ``eta = 0``.

    Deterministic: the final image is a function of the initial noise alone (no step injects noise).
    """

    name = "euler"

    def __init__(self, denoiser: Denoiser, steps: int | None = None, **kw):
        if kw.pop("eta", 0.0) != 0.0:
            raise ValueError("the euler sampler is deterministic (eta = 0); use euler-ancestral for eta > 0")
        super().__init__(denoiser, steps, eta=0.0, **kw)


class HeunChurn(Sampler):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) with churn.

    At step i the noise is injected first: ``t_hat = t_i (1 + gamma_i)``,
    ``x_hat = x + sqrt(t_hat^2 - t_i^2) * s_noise * noise``; then a Heun step to ``t_{i+1}``.
    ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` where ``s_tmin <= t_i <= s_tmax``, else 0.
    The state's x0 after a step is the estimate at the Euler-predicted point (the second call).
    """

    name = "heun"

    def __init__(
        self,
        denoiser: Denoiser,
        steps: int | None = None,
        s_churn: float = 40.0,
        s_tmin: float = 0.05,
        s_tmax: float = 50.0,
        s_noise: float = 1.0,
        **kw,
    ):
        super().__init__(denoiser, steps, **kw)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def gamma(self, i: int) -> float:
        t = self.sigma(i)
        if self.s_tmin <= t <= self.s_tmax and math.isfinite(t):
            return min(self.s_churn / self.num_steps, math.sqrt(2) - 1)
        return 0.0

    def step_nfe(self, i: int) -> int:
        if math.isinf(self.sigma(i)):
            return 1 if self.sigma(i + 1) > 0 else 0
        # no first call where the state's x0 is at x: the start, or after an Euler step from inf
        at_x = i == 0 or math.isinf(self.sigma(i - 1))
        first = 0 if (at_x and self.gamma(i) == 0) else 1
        return first + (1 if self.sigma(i + 1) > 0 else 0)

    def uses_noise(self, i: int) -> bool:
        return self.gamma(i) > 0

    def step(self, state: State, noise: torch.Tensor | None) -> State:
        i = state.step
        if i >= self.num_steps:
            raise ValueError("state is already at the end of the schedule")
        t, t_next = self.sigma(i), self.sigma(i + 1)
        noise = self.check_noise(state, noise)
        if math.isinf(t):  # Euler from the pure noise (state.x is eps), no churn
            x_next = state.x0 + t_next * state.x
            if t_next == 0:
                return state.moved(x_next, x_next, i + 1, True)
            x0 = self.denoise(x_next, t_next, state.cond, state.owner)
            return state.moved(x_next, x0, i + 1, True)
        gamma = self.gamma(i)
        t_hat = t * (1 + gamma)
        x_hat = state.x + math.sqrt(max(t_hat**2 - t**2, 0.0)) * self.s_noise * noise
        if gamma == 0 and state.x0_at_x:
            denoised = state.x0
        else:
            denoised = self.denoise(x_hat, t_hat, state.cond, state.owner)
        d = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d
        if t_next == 0:
            return state.moved(x_next, x_next, i + 1, True)
        denoised2 = self.denoise(x_next, t_next, state.cond, state.owner)
        d2 = (x_next - denoised2) / t_next
        x_next = x_hat + (t_next - t_hat) * (d + d2) / 2
        return state.moved(x_next, denoised2, i + 1, False)


def step_layout(sampler) -> dict[str, list]:
    """The Tweedie estimates a trajectory produces (the steps of a pool, the checks of pruning).

    The estimate after ``start`` is index 0, then one after every step that calls the network,
    the finished image last.

    ``state_steps[s]``: the sampler step (``State.step``) of pool index ``s``; ``nfe_at_step[s]``:
    NFEs per trajectory to reach it; ``sigmas[s]``: the noise level of that estimate (0 = final).
    """
    n = sampler.num_steps
    state_steps = [t for t in range(n) if sampler.step_nfe(t) > 0] + [n]
    nfe, nfe_at = sampler.start_nfe, {}
    for t in range(n + 1):
        nfe_at[t] = nfe
        if t < n:
            nfe += sampler.step_nfe(t)
    sigmas = [float(sampler.sigmas[t]) if t < n else 0.0 for t in state_steps]
    return {"state_steps": state_steps, "nfe_at_step": [nfe_at[t] for t in state_steps], "sigmas": sigmas}


SAMPLERS = {"euler-ancestral": EulerAncestral, "euler": Euler, "heun": HeunChurn}


def make_sampler(name: str, denoiser: Denoiser, steps: int | None = None, **kw) -> Sampler:
    if name not in SAMPLERS:
        raise unknown_name("sampler", name, SAMPLERS)
    return SAMPLERS[name](denoiser, steps, **kw)
