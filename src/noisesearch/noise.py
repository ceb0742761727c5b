"""The one noise source: every random draw of a search comes from here.

Streams are keyed, never shared: each search ``(prompt index, sample index)`` has its own
``torch.Generator`` seeded by a hash of ``(seed, prompt, sample)``, so adding a prompt or a sample
does not change the samples of the others, and the order in which work is batched cannot either.

Live pruning and pool generation draw per *candidate*: candidate ``j`` of search ``(p, k)`` has the
stream ``(seed, p, k, j)``; a pool's candidate ``j`` of prompt ``p`` is ``(seed, p, 0, j)``, so a live
``ttsnap`` run and a pool made with the same seed and prompts start from the same candidates.

Draws are made on the CPU (device independent), in blocks per stream (:class:`Stream`: draw ``i``
of a stream depends only on the seed and ``i``), and moved to the denoiser's device/dtype. A source
keeps its streams in a :class:`StreamBank` (the blocks of all its streams in one tensor, each stream
refilled with the generator calls a lone :class:`Stream` makes), so a draw for every row of a batch
is a few array operations, not one call per stream.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

STREAM_TAG = "noisesearch-noise-v2"


def stream_seed(seed: int, *key: int) -> int:
    """Seed of the stream ``key`` under ``seed`` (a 63-bit hash)."""
    text = ":".join([STREAM_TAG, str(int(seed)), *(str(int(k)) for k in key)])
    h = hashlib.blake2b(text.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


#: Noises drawn per refill of a stream's buffer: about a million numbers, at most 64 noises.
BLOCK_NUMBERS = 1 << 20
#: Calls of at most this many rows first try the plain-Python path of ``StreamBank.take``.
SMALL_TAKE = 256


class Stream:
    """One seeded stream of standard normal (or uniform) draws of a fixed shape, drawn in blocks.

    Draw ``i`` of a stream depends only on the seed and ``i`` (never on how many were asked for at
    once), so any batching of the work reproduces the same noises; blocks make a draw cost a slice
    instead of a generator call."""

    def __init__(self, seed: int, shape: Sequence[int], kind: str = "normal"):
        self.shape, self.kind = tuple(shape), kind
        self.generator = torch.Generator().manual_seed(seed)
        self.block = block_size(self.shape)
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


def block_size(shape: Sequence[int]) -> int:
    """Draws per refill of a stream of ``shape``: about a million numbers, at most 64 draws."""
    return max(1, min(64, BLOCK_NUMBERS // max(1, math.prod(shape))))


class StreamBank:
    """Many streams (:class:`Stream`) of one shape and kind, their buffers rows of one tensor,
    drawn for many rows at once.

    Stream ``s`` makes exactly the generator calls of ``Stream(seeds[s], shape, kind)`` (its own
    generator, filled a block at a time, the block sizes of :class:`Stream`), so its draw ``i`` is
    bit-identical to that stream's; a draw is an index into the bank, so a call costs a few array
    operations however many streams it draws from (a block is refilled in place: what :meth:`take`
    returns is always a copy)."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], kind: str = "normal"):
        self.shape, self.kind = tuple(shape), kind
        self.seeds = [int(s) for s in seeds]
        self.block = block_size(self.shape)
        self.generators: list[torch.Generator | None] = [None] * len(self.seeds)  # made at the first refill
        dtype = torch.float32 if kind == "normal" else torch.float64
        self.buffer = torch.empty((len(self.seeds), self.block, *self.shape), dtype=dtype)
        self.flat = self.buffer.view(-1, *self.shape)  # draw j of stream s's block is row s * block + j
        self.pos = [self.block] * len(self.seeds)  # next draw in each stream's block (block: spent)
        self.every = np.arange(len(self.seeds), dtype=np.int64)  # the owners of one draw from each stream, in order

    def __len__(self) -> int:
        return len(self.seeds)

    def take(self, owner: np.ndarray) -> torch.Tensor:
        """Row ``r`` gets the next draw of stream ``owner[r]``, in row order within a stream."""
        owner = np.asarray(owner, dtype=np.int64).reshape(-1)
        n = owner.size
        if n == 0:
            raise ValueError("no rows to draw for")
        if n == len(self.seeds) and np.array_equal(owner, self.every):
            return self._take_every()
        if n <= SMALL_TAKE:
            z = self._take_each_once(owner.tolist())
            if z is not None:
                return z
        order = None if n == 1 or np.diff(owner).min() >= 0 else np.argsort(owner, kind="stable")
        srt = owner if order is None else owner[order]
        self._check(srt[0], srt[-1])
        pos = np.asarray(self.pos, dtype=np.int64)
        counts = np.bincount(srt, minlength=len(self.seeds))
        starts = np.cumsum(counts) - counts
        end = pos + counts
        idx = pos[srt] + (np.arange(n) - starts[srt])
        if (end > self.block).any():  # some stream runs past its block
            z = self._take_crossing(srt, idx, end)
        else:
            z = self._rows(srt, idx)
        self.pos = end.tolist()
        if order is None:
            return z
        return torch.empty_like(z).index_copy_(0, torch.from_numpy(order), z)

    def _take_every(self) -> torch.Tensor:
        """One draw of every stream, in stream order (a step of every search at once): array
        operations on the positions; spent blocks are refilled first."""
        pos = np.asarray(self.pos, dtype=np.int64)
        spent = np.flatnonzero(pos >= self.block)
        for s in spent.tolist():
            self._refill(s)
        pos[spent] = 0
        z = self.flat.index_select(0, torch.from_numpy(self.every * self.block + pos))
        self.pos = (pos + 1).tolist()
        return z

    def _take_each_once(self, owner: list[int]) -> torch.Tensor | None:
        """The draws for rows of distinct streams, in any order (a step of every search, of those
        still drawing, or a tree search's rows ordered by depth), with plain Python on the few rows;
        None for any other call. A stream whose block is spent is refilled first (the refill it
        would make anyway: its next draw is the new block's first, and no other row of the call
        reads its old block)."""
        block, pos, lin, seen = self.block, self.pos, [], set()
        for o in owner:
            if o < 0 or o >= len(pos) or o in seen:
                return None
            seen.add(o)
            if pos[o] >= block:
                self._refill(o)
                pos[o] = 0
            lin.append(o * block + pos[o])
        for o in owner:
            pos[o] += 1
        return self.flat.index_select(0, torch.tensor(lin, dtype=torch.long))

    def _rows(self, stream: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """Draws ``idx`` of the blocks of ``stream`` (a copy: one ``index_select`` of the flat bank)."""
        return self.flat.index_select(0, torch.from_numpy(stream * self.block + idx))

    def _check(self, lowest: int, highest: int) -> None:
        if lowest < 0 or highest >= len(self.seeds):
            raise IndexError(f"stream {int(lowest if lowest < 0 else highest)} out of range ({len(self.seeds)} streams)")

    def _take_crossing(self, srt: np.ndarray, idx: np.ndarray, end: np.ndarray) -> torch.Tensor:
        """The draws of rows grouped by stream (``idx``: each row's position counted from the start of
        its stream's block) where some streams run past their block: block by block, the streams
        that need the next one refilled (the calls ``Stream.take`` makes, in the same order per
        stream); ``end`` becomes each stream's position in its last block."""
        z = torch.empty((srt.size, *self.shape), dtype=self.buffer.dtype)
        lo = 0
        while True:
            rows = np.flatnonzero((idx >= lo) & (idx < lo + self.block))
            if rows.size:
                z.index_copy_(0, torch.from_numpy(rows), self._rows(srt[rows], idx[rows] - lo))
            further = np.flatnonzero(end > lo + self.block)
            if not further.size:
                break
            for s in further.tolist():
                self._refill(s)
            lo += self.block
        refills = np.maximum(end - 1, 0) // self.block
        end -= refills * self.block
        return z

    def _refill(self, s: int) -> None:
        """The next block of stream ``s``, in place (the call ``Stream.take`` makes)."""
        g = self.generators[s]
        if g is None:
            g = self.generators[s] = torch.Generator().manual_seed(self.seeds[s])
        if self.kind == "normal":
            self.buffer[s].normal_(generator=g)
        else:
            self.buffer[s].uniform_(generator=g)


def _owner_array(owner: torch.Tensor | Sequence[int]) -> np.ndarray:
    """Row owners as an int64 numpy array (a tensor on any device, or a sequence of ints)."""
    if isinstance(owner, torch.Tensor):
        return owner.detach().to("cpu", torch.long).numpy().reshape(-1)
    return np.asarray([int(o) for o in owner], dtype=np.int64)


class CandidateNoise:
    """Independent Gaussian streams, one per candidate row ``(prompt, sample, candidate)``.

    ``draw(rows)`` returns the next noise of each listed row's stream; a row that is not drawn (a
    pruned candidate) simply stops advancing its stream.
    """

    def __init__(self, seed: int, shape: Sequence[int], keys: Sequence[tuple[int, int, int]], device="cpu",
                 dtype=torch.float32):
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.streams = StreamBank([stream_seed(seed, *k) for k in keys], self.shape)

    def __len__(self) -> int:
        return len(self.streams)

    def draw(self, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        rows = np.arange(len(self.streams)) if rows is None else _owner_array(rows)
        return self.streams.take(rows).to(self.device, self.dtype)


class NoiseSource:
    """Per-search streams for every draw a strategy makes (noises, coins, resampling uniforms)."""

    def __init__(self, seed: int, shape: Sequence[int], keys: Sequence[tuple[int, int]], device="cpu",
                 dtype=torch.float32):
        self.seed = int(seed)
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.keys = [tuple(int(v) for v in k) for k in keys]
        self.normals = StreamBank([stream_seed(seed, *k) for k in self.keys], self.shape)
        self._uniforms: StreamBank | None = None  # made at the first uniform draw (most strategies make none)

    @property
    def uniforms(self) -> StreamBank:
        if self._uniforms is None:
            self._uniforms = StreamBank([stream_seed(self.seed, *k, -1) for k in self.keys], (), "uniform")
        return self._uniforms

    def normal(self, owner: torch.Tensor) -> torch.Tensor:
        """One standard Gaussian noise per row, from the stream of the row's search."""
        return self.normals.take(_owner_array(owner)).to(self.device, self.dtype)

    def uniform(self, owner: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """One uniform [0, 1) number per row (on the CPU), from the uniform stream of the row's search."""
        return self.uniforms.take(_owner_array(owner)).to(dtype)

    def candidates(self, owner: Sequence[int], candidate: Sequence[int]) -> CandidateNoise:
        """Per-candidate streams ``(prompt, sample, candidate)`` for rows ``(owner[r], candidate[r])``."""
        keys = [(*self.keys[int(o)], int(j)) for o, j in zip(owner, candidate)]
        return CandidateNoise(self.seed, self.shape, keys, self.device, self.dtype)


__all__ = ["NoiseSource", "CandidateNoise", "Stream", "StreamBank", "stream_seed"]
