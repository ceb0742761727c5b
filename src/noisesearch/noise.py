"""The one noise source: every random draw of a search comes from here.

Streams are keyed, never shared: each search ``(prompt index, sample index)`` has its own
``torch.Generator`` seeded by a hash of ``(seed, prompt, sample)``, so adding a prompt or a sample
does not change the samples of the others, and the order in which work is batched cannot either.

Live pruning and pool generation draw per *candidate*: candidate ``j`` of search ``(p, k)`` has the
stream ``(seed, p, k, j)``; a pool's candidate ``j`` of prompt ``p`` is ``(seed, p, 0, j)``, so a live
``ttsnap`` run and a pool made with the same seed and prompts start from the same candidates.

Draws are made on the CPU in float32 (device independent) and moved to the denoiser's device/dtype.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

STREAM_TAG = "noisesearch-noise-v2"


def stream_seed(seed: int, *key: int) -> int:
    """Seed of the stream ``key`` under ``seed`` (a 63-bit hash)."""
    text = ":".join([STREAM_TAG, str(int(seed)), *(str(int(k)) for k in key)])
    h = hashlib.blake2b(text.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _by_stream(owner: torch.Tensor, generators: Sequence[torch.Generator], draw) -> torch.Tensor:
    """Row ``r`` gets the next draw(s) of ``generators[owner[r]]``; one call per stream present."""
    owner = owner.detach().cpu().long()
    rows_of: dict[int, list[int]] = {}
    for r, o in enumerate(owner.tolist()):
        rows_of.setdefault(o, []).append(r)
    out = None
    for o, rows in rows_of.items():
        z = draw(len(rows), generators[o])
        if out is None:
            out = z.new_empty((len(owner), *z.shape[1:]))
        out[torch.tensor(rows)] = z
    if out is None:
        raise ValueError("no rows to draw for")
    return out


class CandidateNoise:
    """Independent Gaussian streams, one per candidate row ``(prompt, sample, candidate)``.

    ``draw(rows)`` returns the next noise of each listed row's stream; a row that is not drawn (a
    pruned candidate) simply stops advancing its stream.
    """

    def __init__(self, seed: int, shape: Sequence[int], keys: Sequence[tuple[int, int, int]], device="cpu",
                 dtype=torch.float32):
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, *k)) for k in keys]

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        rows = range(len(self.generators)) if rows is None else [int(r) for r in rows]
        z = torch.stack([torch.randn(self.shape, generator=self.generators[r], dtype=torch.float32) for r in rows])
        return z.to(self.device, self.dtype)


class NoiseSource:
    """Per-search streams for every draw a strategy makes (noises, coins, resampling uniforms)."""

    def __init__(self, seed: int, shape: Sequence[int], keys: Sequence[tuple[int, int]], device="cpu",
                 dtype=torch.float32):
        self.seed = int(seed)
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.keys = [tuple(int(v) for v in k) for k in keys]
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, *k)) for k in self.keys]

    @classmethod
    def for_prompts(cls, seed: int, shape, num_prompts: int, num_samples: int, **kw) -> "NoiseSource":
        """Searches in prompt-major order: search ``p * num_samples + k`` is (prompt p, sample k)."""
        return cls(seed, shape, [(p, k) for p in range(num_prompts) for k in range(num_samples)], **kw)

    def normal(self, owner: torch.Tensor) -> torch.Tensor:
        """One standard Gaussian noise per row, from the stream of the row's search."""
        z = _by_stream(owner, self.generators, lambda n, g: torch.randn((n, *self.shape), generator=g, dtype=torch.float32))
        return z.to(self.device, self.dtype)

    def uniform(self, owner: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """One uniform [0, 1) number per row (on the CPU), from the stream of the row's search."""
        return _by_stream(owner, self.generators, lambda n, g: torch.rand(n, generator=g, dtype=dtype))

    def candidates(self, owner: Sequence[int], candidate: Sequence[int]) -> CandidateNoise:
        """Per-candidate streams ``(prompt, sample, candidate)`` for rows ``(owner[r], candidate[r])``."""
        keys = [(*self.keys[int(o)], int(j)) for o, j in zip(owner, candidate)]
        return CandidateNoise(self.seed, self.shape, keys, self.device, self.dtype)


__all__ = ["NoiseSource", "CandidateNoise", "stream_seed"]
