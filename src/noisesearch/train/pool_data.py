"""The training data of a noise-aware reward, streamed from a pool's stored estimates.

:class:`EstimateDataset` pairs every stored estimate ``(prompt p, candidate c, step s)`` with its
teacher value (the base reward of the finished image of the same candidate) and reads the image
from the pool's files when it is asked for (``pools.images.PoolImages``): one item
(``dataset[i]``) or one batch (``dataset.batch(rows_p, rows_c, steps, device)``). Memory holds the
reward arrays and a few open files, never the images of the pool.
"""
from __future__ import annotations

import numpy as np
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.pools.images import PoolImages


class EstimateDataset(torch.utils.data.Dataset):
    """Estimates and teacher values of a pool's reward ``name``, split into train / held-out candidates.

    ``teacher[i, j, q]``: the teacher's reward of the finished image of candidate ``j`` of prompt
    ``i`` for prompt ``q``. Without ``teacher_reward`` only ``q = i`` is used (the pool's values);
    with it (cross-prompt targets) the teacher is run on the stored finished images for every other
    prompt too, ``batch`` images at a time. ``held``: the last ``holdout`` share of candidates
    of every prompt, never trained on."""

    def __init__(self, pool, images: PoolImages, name: str, holdout: float, teacher_reward=None, device="cpu",
                 batch: int = 128):
        P, N, S = pool.shape
        self.P, self.N, self.S = P, N, S
        self.prompts = list(pool.prompts)
        self.images = images
        self.base = pool.rewards[name]  # [P, N, S]
        self.own = pool.rewards[name][:, :, -1].astype(np.float32)  # [P, N]
        n_hold = int(round(holdout * N))
        self.n_train = N - n_hold
        if self.n_train < 2:
            raise NoiseSearchError(f"the pool has {N} candidates per prompt: too few to train on with --holdout {holdout}")
        self.held = np.arange(self.n_train, N)
        self.cross = teacher_reward is not None
        self.teacher = self._cross_teacher(teacher_reward, device, batch) if self.cross else None

    @torch.no_grad()
    def _cross_teacher(self, teacher_reward, device, batch: int) -> np.ndarray:
        P, N = self.P, self.N
        teacher = np.empty((P, N, P), np.float32)
        for i in range(P):
            for lo in range(0, N, batch):
                hi = min(N, lo + batch)
                final = self.images.batch([i] * (hi - lo), range(lo, hi), [self.S - 1] * (hi - lo))
                x = torch.from_numpy(final).to(device=device, dtype=torch.float32) / 255.0
                for q in range(P):
                    teacher[i, lo:hi, q] = torch.as_tensor(teacher_reward(x, [self.prompts[q]] * (hi - lo))).float().cpu().numpy()
        teacher[np.arange(P), :, np.arange(P)] = self.own  # the exact values where the pool has them
        return teacher

    def __len__(self) -> int:
        return self.P * self.N * self.S

    def __getitem__(self, index: int):
        """(image float [C, H, W] in [0, 1], teacher value for its own prompt, prompt text)."""
        p, c, s = np.unravel_index(int(index), (self.P, self.N, self.S))
        x = torch.from_numpy(self.images.get(p, c, s)).float() / 255.0
        return x, torch.tensor(float(self.own[p, c])), self.prompts[p]

    def batch(self, rows_p: np.ndarray, rows_c: np.ndarray, steps: np.ndarray, device, rows_q: np.ndarray | None = None):
        """Images of candidates (rows_p, rows_c) at ``steps``, teacher values for prompts ``rows_q``
        (default: their own prompts), and the prompt texts."""
        rows_q = rows_p if rows_q is None else rows_q
        x = torch.from_numpy(self.images.batch(rows_p, rows_c, steps)).to(device=device, dtype=torch.float32) / 255.0
        y = self.own[rows_p, rows_c] if self.teacher is None else self.teacher[rows_p, rows_c, rows_q]
        prompts = [self.prompts[q] for q in np.asarray(rows_q).tolist()]
        return x, torch.from_numpy(np.ascontiguousarray(y)).to(device), prompts


__all__ = ["EstimateDataset"]
