"""Peak memory (max RSS) of ``noisesearch train-reward`` on a pool of the tests' size and on one 10x
larger: the training streams the stored estimates (``train.pool_data.EstimateDataset``), so its memory
should not grow with the pool. Prints one line per run; docs/noise_aware.md quotes them.

    OMP_NUM_THREADS=1 .venv/bin/python tools/train_reward_rss.py [--root DIR]

Pools: the digits model (10 prompts x 8 candidates x 6 steps, tests/test_noise_aware.py's pool, and
10 x 80 x 6) trained with the digit reward; and a toy model with 3x256x256 estimates (4 prompts x 10
candidates x 4 steps, tests/test_reward_training.py's pool size, and 4 x 100 x 4) trained with the
tiny HPS fixture, where loading every estimate would take 31 MB and 315 MB. Each training: 2 stages
of 10 iterations at batch 16, in its own process, measured with /usr/bin/time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HPS = ROOT / "tests" / "fixtures" / "rewards" / "hps"


def toy_denoiser(size: int = 256):
    from noisesearch.models.toy import PointMixtureDenoiser

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    return PointMixtureDenoiser(smooth * 2 - 1)


def make_pools(root: Path) -> list[tuple[str, Path, str]]:
    from noisesearch.api.pool import generate_pool

    pools = []
    for label, n in (("tests' size", 8), ("10x", 80)):
        out = root / f"digits_{n}"
        generate_pool("digits", ["digit"], [str(i) for i in range(10)], n, out, guidance=0, steps=6, seed=11,
                      save_images=True)
        pools.append((f"digits 10 x {n} x 6 ({label})", out, "digit"))
    spec = f"hps@{HPS}"
    for label, n in (("tests' size", 10), ("10x", 100)):
        out = root / f"toy_{n}"
        generate_pool(toy_denoiser(), [spec], ["0", "1", "2", "3"], n, out, steps=4,
                      seed=3, save_images=True)
        pools.append((f"toy 3x256x256, 4 x {n} x 4 ({label})", out, spec))
    return pools


def peak_rss_mb(pool: Path, reward: str, out: Path) -> float:
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "noisesearch", "train-reward", "--pool", str(pool),
           "--reward", reward, "--out", str(out), "--steps", "1,2", "--iters", "10", "--batch-size", "16",
           "--holdout", "0.3", "--no-gate", "--quiet", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return int(r.stderr.strip().splitlines()[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="where the pools go (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        for what, pool, reward in make_pools(root):
            from noisesearch.pools import load_pool

            p = load_pool(pool)
            raw = int(np.prod(p.shape)) * int(np.prod(p.extra["images_format"]["shape"])) / 1e6
            stored = sum(f.stat().st_size for f in (pool / "images").glob("*.zip")) / 1e6
            rss = peak_rss_mb(pool, reward, root / f"na_{pool.name}")
            print(f"{what:40s} estimates {raw:8.1f} MB raw, {stored:7.1f} MB stored; train-reward peak RSS {rss:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
