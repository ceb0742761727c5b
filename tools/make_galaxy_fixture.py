"""Make tests/fixtures/galaxygrad_scores.npz: the galaxygrad package's own JAX score networks
(HSC_32, HSC_64) at a few noise levels, for the parity test of ``models.galaxygrad``.

Runs in a separate reference venv with JAX (never in the project venv; the package's ``__init__``
imports JAX, Equinox and diffrax)::

    python3 -m venv /work/refvenv-jax
    /work/refvenv-jax/bin/pip install jax equinox diffrax einops
    /work/refvenv-jax/bin/pip install --no-deps galaxygrad==0.1.9
    /work/refvenv-jax/bin/python tools/make_galaxy_fixture.py

For each model and each t, inputs are EDM states ``x = x0 + sigma eps`` with x0 a Gaussian galaxy
blob in the network's units (x' = log(flux + 1) / 0.1), ``sigma = sqrt(e^t - 1)``. The fixture holds
``x``, ``sigma``, ``t``, the network input ``x_t = a x`` (a = exp(-t/2)), the package's score
``score(x_t, t)`` and the denoised ``x0 = x + (s^2 / a) score`` (s^2 = 1 - exp(-t)), float64 maths
after the float32 network. Making it uses only JAX and numpy (no torch, no noisesearch).

``--check`` runs in the project venv instead (torch, no JAX) and prints the largest relative error
of ``noisesearch.models.galaxygrad`` against the fixture::

    .venv/bin/python tools/make_galaxy_fixture.py --check
"""
from __future__ import annotations

import argparse
import os

import numpy as np

T_VALUES = {32: [0.01, 0.5, 3.0, 9.0], 64: [0.05, 2.0]}
SAMPLES = {32: 2, 64: 1}


def blob(side: int, rng: np.random.Generator) -> np.ndarray:
    """An elliptical Gaussian galaxy of random size and angle in x' units, [1, side, side]."""
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2
    q, theta, r = rng.uniform(0.4, 1.0), rng.uniform(0, np.pi), rng.uniform(1.5, side / 8)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    flux = rng.uniform(20, 200) * np.exp(-0.5 * ((u / r) ** 2 + (v / (q * r)) ** 2))
    return (np.log1p(flux) / 0.1)[None]


def model_arrays(model, side: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    xs, sigmas, ts = [], [], []
    for t in T_VALUES[side]:
        for _ in range(SAMPLES[side]):
            sigma = np.sqrt(np.expm1(t))
            xs.append(blob(side, rng) + sigma * rng.standard_normal((1, side, side)))
            sigmas.append(sigma)
            ts.append(t)
    x, sigma, t = np.stack(xs), np.array(sigmas), np.array(ts)
    a = np.exp(-t / 2)[:, None, None, None]
    s2 = -np.expm1(-t)[:, None, None, None]
    x_t = (a * x).astype(np.float32)
    import jax  # the reference venv only
    import jax.numpy as jnp

    score = np.asarray(jax.vmap(model)(jnp.asarray(x_t), jnp.asarray(t, dtype=jnp.float32)), dtype=np.float64)
    x0 = x + s2 / a * score
    return {"x": x.astype(np.float32), "sigma": sigma, "t": t, "x_t": x_t, "score": score.astype(np.float32),
            "x0": x0.astype(np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "galaxygrad_scores.npz"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare noisesearch's torch models with the fixture (project venv)")
    args = ap.parse_args()
    if args.check:
        return check(args.out)
    from galaxygrad.scorenet import HSC_32, HSC_64  # the package's own Equinox models (reference venv only)

    rng = np.random.default_rng(args.seed)
    arrays = {}
    for key, model, side in (("hsc32", HSC_32, 32), ("hsc64", HSC_64, 64)):
        for k, v in model_arrays(model, side, rng).items():
            arrays[f"{key}_{k}"] = v
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items()))


def check(path: str) -> None:
    """Largest per-sample relative error of the torch score and denoiser against the fixture."""
    import torch

    from noisesearch.models.galaxygrad import load_galaxygrad

    f = np.load(path)

    def rel(a, b):
        return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()

    for name in ("hsc32", "hsc64"):
        d = load_galaxygrad(name)
        g = {k: torch.from_numpy(f[f"{name}_{k}"]) for k in ("x", "sigma", "t", "x_t", "score", "x0")}
        with torch.no_grad():
            score, x0 = d.net(g["x_t"], g["t"].float()), d(g["x"], g["sigma"], None)
        ts = sorted(set(g["t"].tolist()))
        print(f"{name}: score {rel(score, g['score']):.1e}, denoiser x0 {rel(x0, g['x0']):.1e} relative (t = {ts})")


if __name__ == "__main__":
    main()
