"""The one noise source: every random draw of a search comes from here.

Streams are keyed, never shared: each search ``(prompt index, sample index)`` has its own
``torch.Generator`` seeded by a hash of ``(seed, prompt, sample)``, so adding a prompt or a sample
does not change the samples of the others, and the order in which work is batched cannot either.

Live pruning and pool generation draw per *candidate*: candidate ``j`` of search ``(p, k)`` has the
stream ``(seed, p, k, j)``; a pool's candidate ``j`` of prompt ``p`` is ``(seed, p, 0, j)``, so a live
``ttsnap`` run and a pool made with the same seed and prompts start from the same candidates.

Draws are made on the CPU (device independent), in blocks per stream (:class:`Stream`: draw ``i``
of a stream depends only on the seed and ``i``), and moved to the denoiser's device/dtype.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

STREAM_TAG = "noisesearch-noise-v2"


def stream_seed(seed: int, *key: int) -> int:
    """Seed of the stream ``key`` under ``seed`` (a 63-bit hash)."""
    text = ":".join([STREAM_TAG, str(int(seed)), *(str(int(k)) for k in key)])
    h = hashlib.blake2b(text.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


#: Noises drawn per refill of a stream's buffer: about a million numbers, at most 64 noises.
BLOCK_NUMBERS = 1 << 20


class Stream:
    """One seeded stream of standard normal (or uniform) draws of a fixed shape, drawn in blocks.

    Draw ``i`` of a stream depends only on the seed and ``i`` (never on how many were asked for at
    once), so any batching of the work reproduces the same noises; blocks make a draw cost a slice
    instead of a generator call."""

    def __init__(self, seed: int, shape: Sequence[int], kind: str = "normal"):
        self.shape, self.kind = tuple(shape), kind
        self.generator = torch.Generator().manual_seed(seed)
        numel = max(1, math.prod(self.shape))
        self.block = max(1, min(64, BLOCK_NUMBERS // numel))
        self.buffer: torch.Tensor | None = None
        self.pos = self.filled = 0

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` draws (normal: float32, uniform: float64)."""
        if self.pos + n <= self.filled:  # the common case: one slice of the buffer
            self.pos += n
            return self.buffer[self.pos - n : self.pos]
        parts = []
        while n > 0:
            if self.pos == self.filled:
                size = (self.block, *self.shape)
                self.buffer = (torch.randn(size, generator=self.generator, dtype=torch.float32) if self.kind == "normal"
                               else torch.rand(size, generator=self.generator, dtype=torch.float64))
                self.pos, self.filled = 0, self.block
            k = min(n, self.filled - self.pos)
            parts.append(self.buffer[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _by_stream(owner: torch.Tensor, streams: Sequence[Stream], dtype=torch.float32) -> torch.Tensor:
    """Row ``r`` gets the next draw of ``streams[owner[r]]``, in row order within a stream (rows
    grouped by stream, the usual layout, need no reordering)."""
    owner = owner.detach().cpu().long()
    if owner.numel() == 0:
        raise ValueError("no rows to draw for")
    grouped = owner.numel() == 1 or bool((owner[1:] >= owner[:-1]).all())
    order = None if grouped else torch.argsort(owner, stable=True)
    ids, counts = torch.unique_consecutive(owner if grouped else owner[order], return_counts=True)
    parts = [streams[o].take(c) for o, c in zip(ids.tolist(), counts.tolist())]
    z = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype)
    if grouped:
        return z
    out = torch.empty_like(z)
    out[order] = z
    return out


class CandidateNoise:
    """Independent Gaussian streams, one per candidate row ``(prompt, sample, candidate)``.

    ``draw(rows)`` returns the next noise of each listed row's stream; a row that is not drawn (a
    pruned candidate) simply stops advancing its stream.
    """

    def __init__(self, seed: int, shape: Sequence[int], keys: Sequence[tuple[int, int, int]], device="cpu",
                 dtype=torch.float32):
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.streams = [Stream(stream_seed(seed, *k), self.shape) for k in keys]

    def __len__(self) -> int:
        return len(self.streams)

    def draw(self, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(self.streams)) if rows is None else torch.as_tensor([int(r) for r in rows])
        return _by_stream(rows, self.streams).to(self.device, self.dtype)


class NoiseSource:
    """Per-search streams for every draw a strategy makes (noises, coins, resampling uniforms)."""

    def __init__(self, seed: int, shape: Sequence[int], keys: Sequence[tuple[int, int]], device="cpu",
                 dtype=torch.float32):
        self.seed = int(seed)
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.keys = [tuple(int(v) for v in k) for k in keys]
        self.normals = [Stream(stream_seed(seed, *k), self.shape) for k in self.keys]
        self.uniforms = [Stream(stream_seed(seed, *k, -1), (), "uniform") for k in self.keys]

    def normal(self, owner: torch.Tensor) -> torch.Tensor:
        """One standard Gaussian noise per row, from the stream of the row's search."""
        return _by_stream(owner, self.normals).to(self.device, self.dtype)

    def uniform(self, owner: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """One uniform [0, 1) number per row (on the CPU), from the uniform stream of the row's search."""
        return _by_stream(owner, self.uniforms, dtype)

    def candidates(self, owner: Sequence[int], candidate: Sequence[int]) -> CandidateNoise:
        """Per-candidate streams ``(prompt, sample, candidate)`` for rows ``(owner[r], candidate[r])``."""
        keys = [(*self.keys[int(o)], int(j)) for o, j in zip(owner, candidate)]
        return CandidateNoise(self.seed, self.shape, keys, self.device, self.dtype)


__all__ = ["NoiseSource", "CandidateNoise", "Stream", "stream_seed"]
