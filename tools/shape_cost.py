"""What a denoiser call costs at a batch size new to the process: torch's CPU convolutions
(oneDNN) build their kernels for every new input shape, so the first call at a batch size is slower
than the next call at the same size. This is the "first-shape" cost the paired timing of
``noisesearch bench search`` counts as overhead for strategies whose calls vary in size (rbf, dts).

    python tools/shape_cost.py [--sizes 60-99] [--threads 1]

Prints, over the batch sizes given (each new to the process), the mean CPU milliseconds of the
first call and of a second call right after it (the paired call), then the same for a second pass
over the same sizes (kernels cached: the two should agree). Digits UNet, guidance 0, built-in weights.
"""
from __future__ import annotations

import argparse
import statistics
import time

from noisesearch.cli import runtime_defaults

runtime_defaults()  # oneDNN's kernel cache as the CLI sets it (read at its first use, so before torch runs)

import torch  # noqa: E402

from noisesearch.build import as_denoiser  # noqa: E402


def passes(den, sizes: list[int]) -> list[tuple[float, float]]:
    """(first, second) mean CPU ms per call over ``sizes``, for two passes over them."""
    out = []
    for _ in range(2):
        first, second = [], []
        for b in sizes:
            x, s = torch.randn(b, 1, 8, 8), torch.rand(b) + 0.5
            t0 = time.process_time()
            den(x, s, None)
            t1 = time.process_time()
            den(x, s, None)
            t2 = time.process_time()
            first.append(1e3 * (t1 - t0))
            second.append(1e3 * (t2 - t1))
        out.append((statistics.mean(first), statistics.mean(second)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="60-99", help="batch sizes LO-HI (inclusive), each new to the process")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    lo, hi = (int(v) for v in a.sizes.split("-"))
    torch.set_num_threads(a.threads)
    den = as_denoiser("digits", guidance=0)
    with torch.no_grad():
        den(torch.randn(320, 1, 8, 8), torch.ones(320), None)  # one-time start-up outside the sizes
        (f1, s1), (f2, s2) = passes(den, list(range(lo, hi + 1)))
    print(f"batch sizes {lo}-{hi}, {a.threads} thread(s), CPU ms per call")
    print(f"  new to the process: first call {f1:.2f}, paired call {s1:.2f}  (first-shape cost {f1 - s1:+.2f})")
    print(f"  seen before:        first call {f2:.2f}, paired call {s2:.2f}  (difference {f2 - s2:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
