"""How fast a training loop reads a pool's stored estimates: random batches of 128 rows (prompt,
candidate, step), as ``train-reward`` draws them, with the reader's default caches and with the
caches it had before round 3's fix (8 prompt files open, 64 decoded strips).

    python tools/pool_read_speed.py POOL_DIR [--batches 200]

Prints CPU milliseconds per batch for each reader, over the first and the last quarter of the
batches (the strip cache fills as training goes). POOL_DIR: a pool made with ``--save-images``
(e.g. ``pools/digits`` from ``noisesearch bench noise_aware``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from noisesearch.pools import PoolImages, load_pool


def timed_batches(reader: PoolImages, shape: tuple[int, int, int], batches: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    P, N, S = shape
    out = []
    for _ in range(batches):
        t = time.process_time()
        reader.batch(rng.integers(0, P, 128), rng.integers(0, N, 128), rng.integers(0, S, 128))
        out.append(time.process_time() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pool")
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    pool = load_pool(args.pool)
    P, N, S = pool.shape
    fmt = pool.extra.get("images_format") or {}
    strip = S * int(np.prod(fmt.get("shape") or (1, 1, 1)))  # bytes of one candidate's decoded strip
    for name, kw in (("before the fix (8 files, 64 strips)", {"max_open": 8, "strip_cache_bytes": 64 * strip}),
                     ("defaults", {})):
        reader = PoolImages(args.pool, pool, **kw)
        times = timed_batches(reader, (P, N, S), args.batches)
        reader.close()
        q = max(1, len(times) // 4)
        print(f"{name}: {1e3 * np.mean(times[:q]):.1f} ms per batch of 128 (first quarter), "
              f"{1e3 * np.mean(times[-q:]):.1f} ms (last quarter); {reader.max_open} files open at most")


if __name__ == "__main__":
    main()
