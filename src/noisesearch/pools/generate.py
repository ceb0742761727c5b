"""Pool generation: sample every candidate of every prompt with a model we can run and record the
reward of its Tweedie (x0) estimate at every step, in the simulator's pool format.

    from noisesearch.pools.generate import generate_pool
    pool = generate_pool("digits", ["digit"], prompts=list("0123456789"), candidates=200,
                         out="pools/digits", guidance=0, save_images=True)

**Steps.** A pool's step axis ``s = 0 .. S-1`` lists the Tweedie estimates a trajectory produces:
the estimate after ``sampler.start`` (``s = 0``), then one after every step that calls the network,
and the finished image last (``s = S - 1``). A sampler step that makes no network call (the last
Euler-ancestral step lands on the previous estimate) adds no new estimate and is skipped, so for
Euler-ancestral with ``K`` steps ``S = K`` and the estimate at index ``s`` costs exactly ``s + 1``
NFEs: the simulator's ``exact`` cost model (``s + 1`` denoising steps for the estimate at ``s``).
``pool.flops_per_step`` is ``denoiser.flops_per_call * nfe_per_trajectory / S`` (the NFEs of one
step times FLOPs per NFE; exact for Euler-ancestral); ``pool.extra["nfe_at_step"]`` holds the exact
NFE count of every estimate for samplers with uneven steps (Heun), ``extra["state_steps"]`` the
sampler step of every index and ``extra["sigmas"]`` the noise level each estimate was made at (0 for
the finished image). ``flops_per_reward[name]`` is the reward's ``flops_per_image``;
``extra["flops_per_decode"]`` the decode of one estimate (0 for pixel models), which the simulator
adds to every reward call (``CostSpec.from_pool``), as live pruning pays it.

**Determinism.** Candidate ``j`` of prompt ``i`` draws all its noise (the initial noise, then one
draw per noise-injecting step) from its own stream ``(seed, i, 0, j)`` of :mod:`noisesearch.noise`. Nothing else is random, so resuming, sharding over
processes and the order in which prompts are done cannot change a value. Live pruning
(``noisesearch.search.prune``) uses the same streams, so a pool made with the seed of a live run
holds exactly the candidates that run starts.

**Resumable, atomic.** Each prompt is one part file ``<out>/parts/prompt_NNNNNN.npz`` written
atomically; a rerun skips the parts that exist (``parts/spec.json`` records what the pool is; a rerun
with different settings is refused). When every part exists the parts are assembled into the pool
(``Pool.save``: arrays first, the manifest ``pool.json`` last) plus, with ``save_images``, the
estimates as ``images.npz`` (``images``: uint8 ``[P, N, S, C, H, W]``, compressed). An interrupted
run loses at most the prompt in progress.

**Sharding.** Under ``accelerate launch`` (or ``torchrun``) each process takes the prompts
``i = rank, rank + world, ...``; the main process assembles after ``wait_for_everyone``.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from noisesearch.dist import dist_state
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_bytes
from noisesearch.noise import CandidateNoise
from noisesearch.rewards.base import at_step, is_noise_aware, score
from noisesearch.sampling.samplers import step_layout

PARTS = "parts"
SPEC = "spec.json"
IMAGES = "images.npz"
_BAD_NAME = re.compile(r"[^A-Za-z0-9._+-]")


def pool_reward_name(name: str) -> str:
    """A reward's name as a pool key (letters, digits, ``._+-``; anything else becomes ``_``)."""
    out = _BAD_NAME.sub("_", str(name)).strip("_") or "reward"
    if not out[0].isalnum():
        out = "r" + out
    return out


def score_at_step(reward, images: torch.Tensor, prompts: Sequence[str], step: int, sigma: float) -> torch.Tensor:
    """A reward's scores for estimates at pool index ``step`` / noise level ``sigma`` (noise-aware
    rewards are told the step). Checked like ``score``."""
    return score(at_step(reward, step, sigma), images, prompts)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def fingerprints(sampler, rewards: dict, na: dict, layout: dict, prompt: str) -> dict[str, str]:
    """Short digests of what the model and every reward compute on a fixed probe (2 NFEs, a few
    reward calls), rounded to 3 decimals: a rerun with other weights under the same names is
    caught instead of being mixed into the parts of an earlier run."""
    den = sampler.denoiser
    g = torch.Generator().manual_seed(20240531)
    z = torch.randn((2, *sampler.noise_shape), generator=g, dtype=torch.float32).to(den.device, den.dtype)
    sig = torch.tensor([float(sampler.sigmas[0]), 1.0], dtype=torch.float32)
    scale = sig.nan_to_num(posinf=1.0)  # at sigma = inf (flow models) the state holds the noise itself
    x = z * scale.view(-1, *([1] * (z.ndim - 1))).to(z.device, z.dtype)

    def digest(t) -> str:
        arr = np.round(torch.as_tensor(t).detach().double().cpu().numpy(), 3)
        return hashlib.sha256(arr.tobytes()).hexdigest()[:12]

    with torch.no_grad():
        x0 = den(x, sig.to(den.device, den.dtype), den.encode([prompt, prompt]))
        images = den.decode(x0).float().cpu()
        out = {"model": digest(x0)}
        S = len(layout["state_steps"])
        for name, r in list(rewards.items()) + [(f"noise_aware:{k}", v) for k, v in na.items()]:
            vals = [score_at_step(r, images, [prompt, prompt], s, layout["sigmas"][s]) for s in sorted({0, S // 2, S - 1})]
            out[name] = digest(torch.stack(vals))
    return out


def _part_path(out: Path, i: int) -> Path:
    return out / PARTS / f"prompt_{i:06d}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load_part(path: Path, spec_digest: str) -> dict[str, np.ndarray] | None:
    """A part's arrays, or None when it is missing, unreadable or from another spec."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if str(arrays.get("spec", "")) != spec_digest:
        return None
    if not any(k.startswith("r:") for k in arrays) or any(
            k.startswith("r:") and not np.all(np.isfinite(v)) for k, v in arrays.items()):
        return None
    return arrays


class _Recorder:
    """Collects the rewards (and images) of one chunk of candidates of one prompt."""

    def __init__(self, rewards: dict, na: dict, layout: dict, num_rows: int, save_images: bool):
        self.rewards, self.na, self.layout, self.save_images = rewards, na, layout, save_images
        S = len(layout["state_steps"])
        self.values = {k: np.full((num_rows, S), np.nan, np.float32) for k in list(rewards) + [f"na:{k}" for k in na]}
        self.images = None
        self.index = {t: s for s, t in enumerate(layout["state_steps"])}
        self.num_rows = num_rows

    def record(self, state, lo: int, decode, prompts: list[str]) -> None:
        s = self.index.get(state.step)
        if s is None:
            return
        sigma = self.layout["sigmas"][s]
        images = decode(state.x0).float().cpu()
        hi = lo + images.shape[0]
        for name, r in self.rewards.items():
            self.values[name][lo:hi, s] = score_at_step(r, images, prompts, s, sigma).numpy()
        for name, r in self.na.items():
            if r.covers(step=s, sigma=sigma):
                self.values[f"na:{name}"][lo:hi, s] = score_at_step(r, images, prompts, s, sigma).numpy()
        if self.save_images:
            arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            if self.images is None:
                self.images = np.zeros((self.num_rows, len(self.layout["state_steps"]), *arr.shape[1:]), np.uint8)
            self.images[lo:hi, s] = arr


def sample_prompt(sampler, rewards: dict, na: dict, layout: dict, prompt: str, index: int, candidates: int,
                  seed: int, max_batch: int, save_images: bool) -> dict[str, np.ndarray]:
    """Rewards ``[N, S]`` (and uint8 images ``[N, S, C, H, W]``) of every candidate of one prompt."""
    den = sampler.denoiser
    rec = _Recorder(rewards, na, layout, candidates, save_images)
    for lo in range(0, candidates, max_batch):
        hi = min(candidates, lo + max_batch)
        noise = CandidateNoise(seed, sampler.noise_shape, [(index, 0, j) for j in range(lo, hi)], den.device, den.dtype)
        prompts = [prompt] * (hi - lo)
        state = sampler.start(den.encode(prompts), noise.draw())
        rec.record(state, lo, den.decode, prompts)
        while state.step < sampler.num_steps:
            z = noise.draw() if sampler.uses_noise(state.step) else None
            state = sampler.step(state, z)
            rec.record(state, lo, den.decode, prompts)
    out = {f"r:{k}": v for k, v in rec.values.items() if not k.startswith("na:")}
    out.update({f"na:{k[3:]}": v for k, v in rec.values.items() if k.startswith("na:")})
    if save_images:
        out["images"] = rec.images
    return out


def generate_pool(
    model,
    rewards: Sequence,
    prompts: Sequence[str],
    candidates: int,
    out,
    guidance: float = 1.0,
    steps: int | None = None,
    sampler: str = "euler-ancestral",
    seed: int = 0,
    device: str = "cpu",
    max_batch: int = 512,
    save_images: bool = False,
    max_prompts: int | None = None,
    progress: bool = False,
    command: str | None = None,
    model_options: dict | None = None,
):
    """Make (or continue) the pool in ``out``; see the module docstring.

    ``model``: a name for ``load_model`` or a Denoiser; ``rewards``: reward specs or Reward objects
    (a noise-aware reward adds its values as the pool's noise-aware variant of its base reward, and
    the base reward is recorded too). ``max_prompts``: compute at most this many missing prompts in
    this process, then return None without assembling (rerun to continue). Returns the ``Pool`` when
    it is complete (on the main process), else None.
    """
    from noisesearch.build import as_denoiser, as_reward, as_sampler
    from noisesearch.pools.pool import MANIFEST, Pool

    t0 = time.perf_counter()
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise NoiseSearchError("give at least one prompt (--prompts 0,1,2 or --prompt TEXT)")
    if int(candidates) < 1:
        raise NoiseSearchError(f"--candidates must be at least 1, got {candidates}")
    if max_batch < 1:
        raise NoiseSearchError("--max-batch must be at least 1")
    if not rewards:
        raise NoiseSearchError("give at least one reward (--reward digit)")
    if steps is not None and steps < 1:
        raise NoiseSearchError("--steps must be at least 1")
    candidates = int(candidates)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NoiseSearchError(f"--out {out} exists and is not a folder")
    dist = dist_state(device)
    rank, world = (dist.process_index, dist.num_processes) if dist is not None else (0, 1)

    if dist is not None and str(device).startswith("cuda"):
        device = str(dist.device)  # one GPU per process under accelerate launch
    den = as_denoiser(model, device=device, guidance=guidance, options=model_options)
    samp = as_sampler(sampler, den, steps, max_batch=max_batch)
    den.encode(prompts)  # unknown prompts fail here, before any work
    layout = step_layout(samp)
    S = len(layout["state_steps"])

    base: dict[str, Any] = {}
    na: dict[str, Any] = {}
    specs: dict[str, str] = {}
    for r in rewards:
        spec = r if isinstance(r, str) else getattr(r, "name", type(r).__name__)
        obj = as_reward(r, device=device)
        if is_noise_aware(obj):
            key = pool_reward_name(obj.base_name)
            if key in na:
                raise NoiseSearchError(f"two noise-aware rewards for {key!r}: give one")
            na[key] = obj
            specs[f"noise_aware:{key}"] = spec
            if key not in base:
                base[key] = obj.base
                specs[key] = obj.base_spec
        else:
            key = pool_reward_name(obj.name)
            if key in base and specs.get(key) != spec:
                raise NoiseSearchError(f"two rewards share the pool name {key!r}: {specs[key]!r} and {spec!r}")
            base[key] = obj
            specs[key] = spec

    spec_doc = {
        "model": getattr(den, "name", str(model)),
        "model_arg": model if isinstance(model, str) else getattr(den, "name", "custom"),
        "guidance": float(guidance),
        "sampler": samp.name,
        "num_sampler_steps": samp.num_steps,
        "sigmas_schedule": [float(x) for x in samp.sigmas],
        "rewards": specs,
        "prompts": prompts,
        "candidates": candidates,
        "seed": int(seed),
        "save_images": bool(save_images),
        "fingerprints": fingerprints(samp, base, na, layout, prompts[0]),
        "noise": "per candidate: noisesearch.noise stream (seed, prompt_index, 0, candidate)",
    }
    if model_options:
        spec_doc["model_options"] = {k: str(v) for k, v in sorted(model_options.items()) if k not in ("offload", "decode_batch", "vae_tiling")}
    digest = hashlib.sha256(json.dumps(spec_doc, sort_keys=True).encode()).hexdigest()[:16]
    spec_path = out / PARTS / SPEC
    if rank == 0:
        if spec_path.exists():
            try:
                old = json.loads(spec_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old is not None and old.get("digest") != digest:
                diff = sorted(k for k in spec_doc if old.get("spec", {}).get(k) != spec_doc[k])
                raise NoiseSearchError(
                    f"{out} holds parts of a different pool (differs in: {', '.join(diff) or 'format'}); "
                    "use another --out or delete that folder"
                )
        from noisesearch.io import atomic_write_json

        atomic_write_json(spec_path, {"digest": digest, "spec": spec_doc})
    if dist is not None:
        dist.wait_for_everyone()

    mine = [i for i in range(len(prompts)) if i % world == rank]
    todo = [i for i in mine if _load_part(_part_path(out, i), digest) is None]
    for i in todo:  # resume verifies: a part that exists but does not load is redone, and said so
        if _part_path(out, i).exists():
            print(f"pool: {_part_path(out, i)} is corrupt or incomplete; recomputing prompt {i}", file=sys.stderr)
    from noisesearch.progress import Progress

    desc = "pool" + (f" [{rank}/{world}]" if world > 1 else "")
    bar = Progress(len(todo), desc=desc, unit="prompt", enabled=bool(progress and todo), position=rank)
    done_now = 0
    stopped = False
    with torch.no_grad():
        for i in todo:
            if max_prompts is not None and done_now >= max_prompts:
                stopped = True
                break
            arrays = sample_prompt(samp, base, na, layout, prompts[i], i, candidates, seed, max_batch, save_images)
            arrays["spec"] = np.array(digest)
            _save_npz(_part_path(out, i), arrays)
            done_now += 1
            bar.update(1)
    bar.close(complete=False)
    if dist is not None:
        dist.wait_for_everyone()
    if stopped or rank != 0:
        return None

    parts = []
    missing = []
    for i in range(len(prompts)):
        p = _load_part(_part_path(out, i), digest)
        if p is None:
            missing.append(i)
        parts.append(p)
    if missing:  # another process stopped early (max_prompts) or failed
        return None

    names = list(base)
    reward_arrays = {k: np.stack([p[f"r:{k}"] for p in parts]) for k in names}
    na_arrays = {k: np.stack([p[f"na:{k}"] for p in parts]) for k in na}
    flops_call = float(getattr(den, "flops_per_call", 0.0))
    extra = {
        "generator": "noisesearch pool",
        "guidance": float(guidance),
        "sampler": samp.name,
        "sampler_steps": samp.num_steps,
        "seed": int(seed),
        "candidates": candidates,
        "reward_specs": specs,
        "state_steps": layout["state_steps"],
        "nfe_at_step": layout["nfe_at_step"],
        "sigmas": layout["sigmas"],
        "flops_per_nfe": flops_call,
        "flops_per_decode": float(den.flops_per_decode),
        "nfe_per_trajectory": samp.nfe_per_trajectory,
        "noise": spec_doc["noise"],
        "images": IMAGES if save_images else None,
        "images_format": "uint8 [P, N, S, C, H, W] = round(255 * decoded estimate)" if save_images else None,
        "spec_digest": digest,
        "fingerprints": spec_doc["fingerprints"],
        "processes": world,
        "seconds": None,
    }
    if hasattr(den, "encode_cost"):  # prompt encoding (this process's prompts): reported, not charged
        extra["prompt_encoding"] = den.encode_cost()
    if model_options:
        extra["model_options"] = {k: str(v) for k, v in model_options.items()}
    if command:
        extra["command"] = command
    fpr = {k: float(getattr(r, "flops_per_image", 0.0)) for k, r in base.items()}
    if na:
        extra["flops_per_noise_aware_reward"] = {k: float(getattr(r, "flops_per_image", 0.0)) for k, r in na.items()}
    pool = Pool(
        rewards=reward_arrays,
        noise_aware=na_arrays,
        prompts=prompts,
        model=spec_doc["model"],
        num_steps=S,
        flops_per_step=flops_call * samp.nfe_per_trajectory / S,
        flops_per_reward=fpr,
        extra=extra,
    )
    manifest = out / MANIFEST
    if manifest.exists():
        manifest.unlink()  # incomplete until the new manifest lands
    if save_images:
        _save_npz(out / IMAGES, {"images": np.stack([p["images"] for p in parts])})
    pool.extra["seconds"] = round(time.perf_counter() - t0, 3)
    pool.save(out)
    return pool


def load_pool_images(path) -> np.ndarray:
    """The uint8 estimates ``[P, N, S, C, H, W]`` saved with a pool (``--save-images``)."""
    from noisesearch.pools import load_pool

    pool = load_pool(path)
    name = pool.extra.get("images")
    d = Path(path)
    d = d.parent if d.is_file() else d
    if not name or not (d / name).is_file():
        raise NoiseSearchError(
            f"the pool at {path} has no estimate images: make it with `noisesearch pool ... --save-images`"
        )
    try:
        with np.load(d / name, allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise NoiseSearchError(f"cannot read the pool images {d / name} ({e}); remake the pool") from None
    if images.shape[:3] != pool.shape:
        raise NoiseSearchError(f"pool images have shape {images.shape}, the rewards {pool.shape}: remake the pool")
    return images


__all__ = [
    "generate_pool",
    "sample_prompt",
    "step_layout",
    "load_pool_images",
    "pool_reward_name",
    "score_at_step",
    "is_noise_aware",
]
