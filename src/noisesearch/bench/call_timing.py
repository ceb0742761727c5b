"""How stable is the time of one denoiser call on this machine? (Context for the overhead ratio of
``noisesearch bench search``, docs/search.md.)

Times one call of the digits denoiser on a fixed batch, back to back (median of ``--reps`` calls),
``--rounds`` times with ``--pause`` seconds of other work in between, and prints each round's
median and the spread. On a quiet dedicated machine the rounds agree to a few percent; on a shared
VM they drift, and a ratio whose numerator and denominator are timed at different moments drifts
with them.

    noisesearch bench call_timing [--batch 80] [--rounds 12] [--pause 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from noisesearch.build import as_denoiser


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--pause", type=float, default=5.0, help="seconds of other work (random draws) between rounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    den = as_denoiser("digits", guidance=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *den.sample_shape, generator=g)
    sigma = torch.full((args.batch,), 2.0)
    medians = []
    with torch.no_grad():
        for r in range(args.rounds):
            den(x, sigma, None)  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.process_time()
                den(x, sigma, None)
                times.append(time.process_time() - t0)
            medians.append(statistics.median(times) * 1e3)
            print(f"round {r:2d}: {medians[-1]:7.2f} ms per call (CPU time, median of {args.reps})", flush=True)
            t_end = time.perf_counter() + args.pause
            while time.perf_counter() < t_end:
                torch.randn(4 * args.batch, *den.sample_shape, generator=g).sum()
    lo, hi = min(medians), max(medians)
    print(f"batch {args.batch}: {lo:.2f}-{hi:.2f} ms over {args.rounds} rounds (max/min {hi / lo:.2f}, "
          f"median {statistics.median(medians):.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
