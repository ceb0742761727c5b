"""Measure what ``pool --save-images`` stores per estimate (PNG, lossless, and WebP, lossy) and what the
lossy format does to the reward; extrapolate TTSnap's FLUX pool (200 prompts x 200 candidates x 20
steps at 512x512). Prints a table; the figures in docs/flux.md and docs/noise_aware.md come from it.

    OMP_NUM_THREADS=1 .venv/bin/python tools/pool_image_bytes.py [--candidates 20] [--skip-pipelines]

Measured on: the digits model (8x8 grey, 10 prompts, guidance 0, 18 steps), tiny random FLUX and SD3
pipelines (tests/tiny.py, 32x32 RGB, 4 steps; random weights give noise-like estimates, close to the
worst case for compression) and, as a natural-image reference, matplotlib's sample photograph
(grace_hopper.jpg, cropped to 512x512, with blurred copies standing in for early, blurry estimates).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FLUX_IMAGES = 200 * 200 * 20  # TTSnap's FLUX pool: prompts x candidates x steps
FLUX_PIXELS = 3 * 512 * 512


def stored_bytes_per_image(pool_dir: Path) -> tuple[float, int]:
    """(bytes per estimate as stored in images/, bytes of one raw uint8 estimate)."""
    from noisesearch.pools import load_pool

    pool = load_pool(pool_dir)
    total = sum(f.stat().st_size for f in (pool_dir / "images").glob("prompt_*.zip"))
    c, h, w = pool.extra["images_format"]["shape"]
    return total / int(np.prod(pool.shape)), c * h * w


def reward_effect(png_dir: Path, webp_dir: Path, reward_spec: str) -> dict:
    """The reward of the WebP-decoded estimates against the PNG (exact) ones, over every estimate."""
    from noisesearch.pools import load_pool, load_pool_images
    from noisesearch.rewards import make_reward, score
    from noisesearch.train.noise_aware import spearman_per_prompt

    pool = load_pool(png_dir)
    reward = make_reward(reward_spec)
    a, b = load_pool_images(png_dir), load_pool_images(webp_dir)
    P, N, S = pool.shape
    ra, rb = np.zeros((P, N, S)), np.zeros((P, N, S))
    with torch.no_grad():
        for p in range(P):
            for s in range(S):
                prompts = [pool.prompts[p]] * N
                ra[p, :, s] = score(reward, torch.from_numpy(a[p, :, s]).float() / 255, prompts).numpy()
                rb[p, :, s] = score(reward, torch.from_numpy(b[p, :, s]).float() / 255, prompts).numpy()
    diff = np.abs(rb - ra)
    rho = np.array([spearman_per_prompt(rb[:, :, s], ra[:, :, s]) for s in range(S)])  # [S, P]
    return {"mean_abs_diff": diff.mean(), "se_abs_diff": diff.std(ddof=1) / np.sqrt(diff.size),
            "max_abs_diff": diff.max(), "reward_sd": ra.std(), "spearman": np.nanmean(rho),
            "spearman_min": np.nanmin(rho), "pixel_mae": np.abs(a.astype(int) - b.astype(int)).mean(),
            "top1_same": float(np.mean(ra[:, :, -1].argmax(1) == rb[:, :, -1].argmax(1)))}


def make_pools(root: Path, model, rewards, prompts, candidates, **kw) -> dict[str, Path]:
    from noisesearch.api.pool import generate_pool

    out = {}
    for fmt in ("png", "webp"):
        out[fmt] = root / fmt
        generate_pool(model, rewards, prompts, candidates, out[fmt], save_images=True, image_format=fmt, **kw)
    return out


def natural_reference() -> list[tuple[str, float, float]]:
    """(what, PNG bytes, WebP q90 bytes) for the sample photograph at 512x512, sharp and blurred."""
    import matplotlib.cbook
    from PIL import Image, ImageFilter

    from noisesearch.pools.images import bytes_per_image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        pic = Image.open(f).convert("RGB")
    pic = pic.crop((0, 0, 512, 512))
    rows = []
    for radius in (0, 2, 8):
        img = pic.filter(ImageFilter.GaussianBlur(radius)) if radius else pic
        arr = np.asarray(img).transpose(2, 0, 1)[None]
        rows.append((f"photo 512x512, blur {radius}", bytes_per_image(arr, "png"), bytes_per_image(arr, "webp", 90)))
    return rows


def flux_gb(bytes_per_pixel: float) -> float:
    return FLUX_IMAGES * FLUX_PIXELS * bytes_per_pixel / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--skip-pipelines", action="store_true", help="digits and the photograph only")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py builds the tiny pipelines
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = make_pools(tmp / "digits", "digits", ["digit"], [str(i) for i in range(10)], args.candidates, guidance=0)
        for fmt, path in d.items():
            rows.append((f"digits 1x8x8 ({fmt})", *stored_bytes_per_image(path)))
        effect = reward_effect(d["png"], d["webp"], "digit")
        if not args.skip_pipelines:
            rows += _pipelines(tmp, args.candidates)
    print(f"{'estimates':34s} {'bytes/image':>12s} {'raw bytes':>10s} {'ratio':>7s} {'FLUX pool GB':>13s}")
    for what, per, raw in rows:
        print(f"{what:34s} {per:12.1f} {raw:10d} {per / raw:7.3f} {flux_gb(per / raw):13.0f}")
    for what, png, webp in natural_reference():
        for fmt, per in (("png", png), ("webp q90", webp)):
            print(f"{what + ' (' + fmt + ')':34s} {per:12.1f} {FLUX_PIXELS:10d} {per / FLUX_PIXELS:7.3f} "
                  f"{flux_gb(per / FLUX_PIXELS):13.0f}")
    print(f"raw uint8 FLUX pool: {flux_gb(1.0):.0f} GB")
    print("webp (quality 90) vs png on digits, digit reward over all estimates: "
          f"mean |diff| {effect['mean_abs_diff']:.4f} +- {effect['se_abs_diff']:.4f} (reward sd {effect['reward_sd']:.3f}), "
          f"max {effect['max_abs_diff']:.3f}; per (prompt, step) spearman {effect['spearman']:.4f} "
          f"(min {effect['spearman_min']:.3f}); best final candidate unchanged in {effect['top1_same']:.0%} of prompts; "
          f"pixel MAE {effect['pixel_mae']:.2f} grey levels")
    return 0


def _pipelines(tmp: Path, candidates: int) -> list:
    from tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    rows = []
    for name, builder in (("flux", tiny_flux_pipeline), ("sd3", tiny_sd3_pipeline)):
        pipe_dir = tmp / name / "pipe"
        builder(tmp / name).save_pretrained(pipe_dir)
        p = make_pools(tmp / name, str(pipe_dir), ["brightness"], ["a red bicycle", "a cat"], candidates, steps=4,
                       model_options={"height": 32, "width": 32})
        for fmt, path in p.items():
            rows.append((f"tiny {name} 3x32x32 ({fmt})", *stored_bytes_per_image(path)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
