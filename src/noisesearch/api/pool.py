"""Filling a reward pool: sample every candidate of every prompt with a model and record the reward
of its Tweedie (x0) estimate at every step, in the simulator's pool format (``noisesearch.pools``).

    from noisesearch.api.pool import generate_pool
    pool = generate_pool("digits", ["digit"], prompts=list("0123456789"), candidates=200,
                         out="pools/digits", guidance=0, save_images=True)

(the keyword options are the fields of :class:`PoolConfig`; ``make_pool(model, rewards, prompts,
candidates, out, config)`` takes the config itself).

**Steps.** A pool's step axis ``s = 0 .. S-1`` lists the Tweedie estimates a trajectory produces:
the estimate after ``sampler.start`` (``s = 0``), then one after every step that calls the network,
and the finished image last (``s = S - 1``). A sampler step that makes no network call (the last
Euler-ancestral step lands on the previous estimate) adds no new estimate and is skipped, so for
Euler-ancestral with ``K`` steps ``S = K`` and the estimate at index ``s`` costs exactly ``s + 1``
NFEs: the simulator's ``exact`` cost model. ``pool.flops_per_step`` is
``denoiser.flops_per_call * nfe_per_trajectory / S``; ``pool.extra["nfe_at_step"]`` holds the exact
NFE count of every estimate for samplers with uneven steps (Heun), ``extra["state_steps"]`` the
sampler step of every index and ``extra["sigmas"]`` the noise level each estimate was made at (0 for
the finished image). ``flops_per_reward[name]`` is the reward's ``flops_per_image``;
``extra["flops_per_decode"]`` the decode of one estimate (0 for pixel models), which the simulator
adds to every reward call (``CostSpec.from_pool``), as live pruning pays it.

**Determinism.** Candidate ``j`` of prompt ``i`` draws all its noise from its own stream
``(seed, i, 0, j)`` of :mod:`noisesearch.noise`. Nothing else is random, so resuming, sharding over
processes and the order in which prompts are done cannot change a value. Live pruning
(``noisesearch.search.prune``) uses the same streams, so a pool made with the seed of a live run
holds exactly the candidates that run starts.

**Resumable, atomic, checked.** Each prompt is one part file (``pools.parts``: its rewards and which
prompt of which pool it holds) written atomically after the prompt's images; a rerun skips the
parts that exist and refuses a part that holds another prompt; ``parts/spec.json`` records what the
pool is (a rerun with different settings is refused). When every part exists the pool is assembled
(``Pool.save``: arrays first, the manifest ``pool.json`` last). An interrupted run loses at most the
prompt in progress. The run holds ``io.output_lock(out)``: a second run into the same folder is
refused.

**Stored estimates** (``save_images``): every estimate as a PNG (lossless, the default) or lossy WebP
(``image_format="webp"``, ``webp_quality``), one zip per prompt in ``out/images`` (``pools.images``).
Before the work the disk the pool needs is estimated from the encoded size of a probe estimate and
checked (``io.check_disk``); after every prompt it is checked again with the sizes measured so far.

**Sharding.** Under ``accelerate launch`` (or ``torchrun``) each process takes the prompts
``i = rank, rank + world, ...``; the main process assembles after ``wait_for_everyone``.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from noisesearch.build import as_denoiser, as_reward, as_sampler
from noisesearch.dist import dist_state
from noisesearch.errors import NoiseSearchError
from noisesearch.io import check_disk, free_bytes, output_lock
from noisesearch.noise import CandidateNoise
from noisesearch.pools.images import (
    DEFAULT_WEBP_QUALITY,
    IMAGES_DIR,
    MEMBER_OVERHEAD,
    bytes_per_image,
    check_codec,
    encode_image,
    identity_error,
    images_path,
    layout_for,
    member_name,
    read_prompt_meta,
    strip,
    to_uint8,
    write_prompt_images,
)
from noisesearch.pools.parts import PARTS, SPEC, claim_spec, load_part, part_path, pool_reward_name, save_part, spec_digest
from noisesearch.pools.pool import MANIFEST, Pool
from noisesearch.progress import Progress
from noisesearch.rewards.base import at_step, is_noise_aware, score
from noisesearch.sampling.samplers import step_layout

NOISE_DOC = "per candidate: noisesearch.noise stream (seed, prompt_index, 0, candidate)"
PROBE_MARGIN = 1.5  # the probe's estimates are blurrier than the finished images: allow for larger ones


@dataclass
class PoolConfig:
    """How a pool is made (everything but the model, rewards, prompts, candidates and folder)."""

    guidance: float | None = None  # None: 1 for names, a denoiser object's own
    steps: int | None = None  # sampler steps (None: the model's default)
    sampler: str = "euler-ancestral"
    seed: int = 0
    device: str | None = None  # None: the CPU for names, where a denoiser object is
    max_batch: int = 512
    save_images: bool = False  # store every estimate (needed by train-reward)
    image_format: str = "png"  # png (lossless) or webp (lossy)
    webp_quality: int | None = None  # webp only (default 90)
    max_prompts: int | None = None  # compute at most this many missing prompts, then return None
    progress: bool = False
    command: str | None = None  # recorded in the pool's metadata
    model_options: dict | None = None
    log: Callable[[str], Any] | None = None  # where the disk estimate is said (None: silent)
    lock: bool = True  # hold io.output_lock(out); False when the caller holds it (the CLI does)

    def check(self) -> None:
        if self.max_batch < 1:
            raise NoiseSearchError("--max-batch must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise NoiseSearchError("--steps must be at least 1")
        if self.save_images:
            check_codec(self.image_format, self.webp_quality)
            if self.webp_quality is not None and self.image_format != "webp":
                raise NoiseSearchError("--webp-quality applies to --image-format webp only")

    @property
    def quality(self) -> int | None:
        return (self.webp_quality or DEFAULT_WEBP_QUALITY) if self.image_format == "webp" else None


@dataclass
class _Job:
    """A pool run, loaded: the sampler (and its denoiser), the rewards and what the pool is."""

    samp: Any
    layout: dict
    base: dict
    na: dict
    specs: dict
    prompts: list
    candidates: int
    out: Path
    cfg: PoolConfig
    rank: int = 0
    world: int = 1
    dist: Any = None
    spec_doc: dict = field(default_factory=dict)
    digest: str = ""

    @property
    def den(self):
        return self.samp.denoiser

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.wait_for_everyone()


@dataclass
class PromptResult:
    """One prompt's rewards (``r:<name>`` / ``na:<name>`` ``[N, S]``) and encoded estimates."""

    arrays: dict
    images: dict = field(default_factory=dict)
    image_shape: tuple = ()


def score_at_step(reward, images: torch.Tensor, prompts: Sequence[str], step: int, sigma: float) -> torch.Tensor:
    """A reward's scores for estimates at pool index ``step`` / noise level ``sigma`` (noise-aware
    rewards are told the step). Checked like ``score``."""
    return score(at_step(reward, step, sigma), images, prompts)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def generate_pool(model, rewards: Sequence, prompts: Sequence[str], candidates: int, out,
                  config: PoolConfig | None = None, **options) -> Pool | None:
    """Make (or continue) the pool in ``out``; see the module docstring.

    ``model``: a name for ``load_model`` or a Denoiser; ``rewards``: reward specs or Reward objects
    (a noise-aware reward adds its values as the pool's noise-aware variant of its base reward, and
    the base reward is recorded too); ``options``: fields of :class:`PoolConfig` (or give ``config``).
    Returns the ``Pool`` when it is complete (on the main process), else None (``max_prompts``
    reached: rerun to continue)."""
    if config is not None and options:
        raise TypeError("give either config or keyword options, not both")
    return make_pool(model, rewards, prompts, candidates, out, config or PoolConfig(**options))


def make_pool(model, rewards: Sequence, prompts: Sequence[str], candidates: int, out, cfg: PoolConfig) -> Pool | None:
    """:func:`generate_pool` with its :class:`PoolConfig`."""
    t0 = time.perf_counter()
    prompts, candidates, out = _check_inputs(rewards, prompts, candidates, out, cfg)
    job = _load(model, rewards, prompts, candidates, out, cfg)
    hold = job.main and cfg.lock
    lock = output_lock(out, cfg.command or "noisesearch pool") if hold else contextlib.nullcontext()
    with lock:
        fresh = job.main and not (out / PARTS / SPEC).exists()
        if job.main:
            job.digest = claim_spec(out, job.spec_doc)
        job.barrier()
        job.digest = job.digest or spec_digest(job.spec_doc)
        try:
            stopped = _run_prompts(job)
        except NoiseSearchError:
            if fresh:  # refused before any prompt (e.g. short of disk): leave no half-made pool behind
                _forget_spec(out)
            raise
        job.barrier()
        if stopped or not job.main:
            return None
        return _assemble(job, t0)


def _forget_spec(out: Path) -> None:
    """Remove the spec this run wrote into a new pool folder, if no prompt's part was written."""
    parts = out / PARTS
    if any(p.name != SPEC for p in parts.iterdir()):
        return
    (parts / SPEC).unlink(missing_ok=True)
    parts.rmdir()


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _check_inputs(rewards, prompts, candidates, out, cfg: PoolConfig):
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise NoiseSearchError("give at least one prompt (--prompts 0,1,2 or --prompt TEXT)")
    if int(candidates) < 1:
        raise NoiseSearchError(f"--candidates must be at least 1, got {candidates}")
    if not rewards:
        raise NoiseSearchError("give at least one reward (--reward digit)")
    cfg.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NoiseSearchError(f"--out {out} exists and is not a folder")
    return prompts, int(candidates), out


def _load(model, rewards, prompts, candidates, out, cfg: PoolConfig) -> _Job:
    dist = dist_state(str(cfg.device or "cpu"))
    rank, world = (dist.process_index, dist.num_processes) if dist is not None else (0, 1)
    device = str(dist.device) if dist is not None and str(cfg.device).startswith("cuda") else cfg.device
    den = as_denoiser(model, device=device, guidance=cfg.guidance, options=cfg.model_options)
    samp = as_sampler(cfg.sampler, den, cfg.steps, max_batch=cfg.max_batch)
    den.encode(prompts)  # unknown prompts fail here, before any work
    base, na, specs = _load_rewards(rewards, device or getattr(den, "device", "cpu"))
    job = _Job(samp, step_layout(samp), base, na, specs, prompts, candidates, out, cfg, rank, world, dist)
    job.spec_doc = _spec_doc(job, model)
    return job


def _load_rewards(rewards, device) -> tuple[dict, dict, dict]:
    """Base rewards and noise-aware rewards by pool key, and the spec recorded for each key."""
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
    return base, na, specs


def _spec_doc(job: _Job, model) -> dict:
    """What the pool is: a rerun with another spec into the same folder is refused."""
    den, samp, cfg = job.den, job.samp, job.cfg
    doc = {
        "model": getattr(den, "name", str(model)),
        "model_arg": model if isinstance(model, str) else getattr(den, "name", "custom"),
        "guidance": _guidance(den, cfg),
        "sampler": samp.name,
        "num_sampler_steps": samp.num_steps,
        "sigmas_schedule": [float(x) for x in samp.sigmas],
        "rewards": job.specs,
        "prompts": job.prompts,
        "candidates": job.candidates,
        "seed": int(cfg.seed),
        "save_images": bool(cfg.save_images),
        "fingerprints": fingerprints(samp, job.base, job.na, job.layout, job.prompts[0]),
        "noise": NOISE_DOC,
    }
    if cfg.save_images:
        doc["image_format"] = {"codec": cfg.image_format, "quality": cfg.quality}
    if cfg.model_options:
        doc["model_options"] = {k: str(v) for k, v in sorted(cfg.model_options.items())
                                if k not in ("offload", "decode_batch", "vae_tiling")}
    return doc


def _guidance(den, cfg: PoolConfig) -> float:
    """The guidance the pool is sampled with: the denoiser's own where it says, else the one asked for."""
    own = getattr(den, "guidance", None)
    return float(own if own is not None else (1.0 if cfg.guidance is None else cfg.guidance))


def _probe_images(sampler, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's estimates (x0, decoded images) of two fixed noises (at the first sigma and at
    sigma 1): 2 NFEs, the same on every run."""
    den = sampler.denoiser
    g = torch.Generator().manual_seed(20240531)
    z = torch.randn((2, *sampler.noise_shape), generator=g, dtype=torch.float32).to(den.device, den.dtype)
    sig = torch.tensor([float(sampler.sigmas[0]), 1.0], dtype=torch.float32)
    scale = sig.nan_to_num(posinf=1.0)  # at sigma = inf (flow models) the state holds the noise itself
    x = z * scale.view(-1, *([1] * (z.ndim - 1))).to(z.device, z.dtype)
    with torch.no_grad():
        x0 = den(x, sig.to(den.device, den.dtype), den.encode([prompt, prompt]))
        return x0, den.decode(x0).float().cpu()


def fingerprints(sampler, rewards: dict, na: dict, layout: dict, prompt: str) -> dict[str, str]:
    """Short digests of what the model and every reward compute on a fixed probe (2 NFEs, a few
    reward calls), rounded to 3 decimals: a rerun with other weights under the same names is
    caught instead of being mixed into the parts of an earlier run."""

    def digest(t) -> str:
        arr = np.round(torch.as_tensor(t).detach().double().cpu().numpy(), 3)
        return hashlib.sha256(arr.tobytes()).hexdigest()[:12]

    x0, images = _probe_images(sampler, prompt)
    out = {"model": digest(x0)}
    S = len(layout["state_steps"])
    with torch.no_grad():
        for name, r in list(rewards.items()) + [(f"noise_aware:{k}", v) for k, v in na.items()]:
            vals = [score_at_step(r, images, [prompt, prompt], s, layout["sigmas"][s]) for s in sorted({0, S // 2, S - 1})]
            out[name] = digest(torch.stack(vals))
    return out


# ---------------------------------------------------------------------------------------------
# disk
# ---------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _rewards_bytes(job: _Job, prompts: int) -> float:
    """The reward arrays of ``prompts`` prompts: in their parts and again in the assembled pool."""
    S = len(job.layout["state_steps"])
    return 2.0 * prompts * job.candidates * S * 4 * (len(job.base) + len(job.na)) + 4096 * prompts


def _check_disk_before(job: _Job, todo: list[int]) -> float:
    """Estimate and check the disk the missing prompts need; returns the bytes per stored estimate
    used (measured on a probe estimate, 0 without images)."""
    cfg = job.cfg
    S = len(job.layout["state_steps"])
    per_image = 0.0
    if not todo:
        return per_image
    if cfg.save_images:
        _, probe = _probe_images(job.samp, job.prompts[0])
        per_image = PROBE_MARGIN * bytes_per_image(to_uint8(probe), cfg.image_format, cfg.quality, S)
    n_images = len(todo) * job.candidates * S if cfg.save_images else 0
    need = n_images * per_image + _rewards_bytes(job, len(todo))
    if cfg.log is not None:
        what = (f"{n_images} estimates x {per_image:.0f} bytes ({cfg.image_format}, measured on a probe estimate "
                f"x {PROBE_MARGIN:g}) + rewards" if cfg.save_images else "reward arrays")
        cfg.log(f"pool: about {_size(need)} to write in {job.out} ({what}); {_size(free_bytes(job.out))} free")
    check_disk(job.out, need, f"the pool ({len(todo)} prompts to go)")
    return per_image


def _check_disk_during(job: _Job, left: int, measured: list[float]) -> None:
    """After a prompt: the remaining prompts at the bytes per estimate measured so far."""
    if not left:
        return
    S = len(job.layout["state_steps"])
    per_image = max(measured) if measured else 0.0
    need = left * job.candidates * S * per_image + _rewards_bytes(job, left)
    try:
        check_disk(job.out, need, f"the pool's remaining {left} prompts")
    except NoiseSearchError as e:
        raise NoiseSearchError(f"{e} (the finished prompts are kept: rerun the same command to continue)") from None


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _finished(job: _Job, i: int) -> dict | None:
    """Prompt ``i``'s part when it and its images are complete and are prompt ``i`` of this pool."""
    arrays = load_part(part_path(job.out, i), job.digest, i, job.prompts[i])
    if arrays is None or not job.cfg.save_images:
        return arrays
    meta = read_prompt_meta(images_path(job.out, i))
    if meta is None:
        return None
    why = identity_error(images_path(job.out, i), meta, i, job.prompts[i], job.digest)
    if why and "another pool" in why:
        return None
    if why:
        raise NoiseSearchError(f"{why}; delete it (and {part_path(job.out, i).name}) to recompute that prompt")
    return arrays


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _run_prompts(job: _Job) -> bool:
    """Sample this process's missing prompts; True when stopped early by ``max_prompts``."""
    cfg = job.cfg
    mine = [i for i in range(len(job.prompts)) if i % job.world == job.rank]
    todo = [i for i in mine if _finished(job, i) is None]
    for i in todo:  # resume verifies: a part that exists but does not load is redone, and said so
        if part_path(job.out, i).exists():
            (cfg.log or _stderr)(f"pool: {part_path(job.out, i)} is corrupt or incomplete; recomputing prompt {i}")
    _check_disk_before(job, todo)
    desc = "pool" + (f" [{job.rank}/{job.world}]" if job.world > 1 else "")
    bar = Progress(len(todo), desc=desc, unit="prompt", enabled=bool(cfg.progress and todo), position=job.rank)
    measured: list[float] = []
    with torch.no_grad():
        for n, i in enumerate(todo):
            if cfg.max_prompts is not None and n >= cfg.max_prompts:
                bar.close(complete=False)
                return True
            codec = (cfg.image_format, cfg.quality) if cfg.save_images else None
            res = sample_prompt(job.samp, job.base, job.na, job.layout, job.prompts[i], i, job.candidates,
                                cfg.seed, cfg.max_batch, codec)
            _save_prompt(job, i, res, measured)
            bar.update(1)
            _check_disk_during(job, len(todo) - n - 1, measured)
    bar.close(complete=False)
    return False


def _save_prompt(job: _Job, i: int, res: PromptResult, measured: list[float]) -> None:
    """Images first, then the part (whose existence says the prompt is done)."""
    if job.cfg.save_images:
        meta = {"prompt_index": i, "prompt": job.prompts[i], "spec": job.digest, "seed": job.cfg.seed,
                "codec": job.cfg.image_format,
                "quality": job.cfg.quality, "layout": layout_for(res.image_shape), "candidates": job.candidates,
                "steps": len(job.layout["state_steps"]), "shape": list(res.image_shape)}
        write_prompt_images(images_path(job.out, i), meta, res.images)
        n_images = job.candidates * len(job.layout["state_steps"])
        measured.append((sum(len(v) for v in res.images.values()) + MEMBER_OVERHEAD * len(res.images)) / n_images)
    save_part(part_path(job.out, i), res.arrays, job.digest, i, job.prompts[i], job.cfg.seed)


class _Recorder:
    """Collects the rewards (and encoded images) of the candidates of one prompt."""

    def __init__(self, rewards: dict, na: dict, layout: dict, num_rows: int, codec: tuple | None):
        self.rewards, self.na, self.layout, self.codec = rewards, na, layout, codec
        S = len(layout["state_steps"])
        self.values = {k: np.full((num_rows, S), np.nan, np.float32) for k in list(rewards) + [f"na:{k}" for k in na]}
        self.images: dict[str, bytes] = {}
        self.image_shape: tuple = ()
        self._chunk: np.ndarray | None = None  # strip layout: the chunk's estimates [rows, S, C, H, W]
        self.index = {t: s for s, t in enumerate(layout["state_steps"])}

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
        if self.codec is not None:
            self._keep_images(to_uint8(images), lo, s)

    def _keep_images(self, arr: np.ndarray, lo: int, s: int) -> None:
        """Encode now (one member per estimate), or keep the chunk's small estimates for their strips."""
        self.image_shape = tuple(arr.shape[1:])
        if layout_for(self.image_shape) == "image":
            for j, a in enumerate(arr, lo):
                self.images[member_name(j, s, self.codec[0])] = encode_image(a, *self.codec)
            return
        if self._chunk is None or self._chunk.shape[0] != arr.shape[0]:
            self._chunk = np.zeros((arr.shape[0], len(self.layout["state_steps"]), *arr.shape[1:]), np.uint8)
        self._chunk[:, s] = arr

    def finish_chunk(self, lo: int) -> None:
        """After a chunk's last step: encode its candidates' strips."""
        if self._chunk is not None:
            for j, a in enumerate(self._chunk, lo):
                self.images[member_name(j, None, self.codec[0])] = encode_image(strip(a), *self.codec)
            self._chunk = None

    def result(self) -> PromptResult:
        arrays = {f"r:{k}": v for k, v in self.values.items() if not k.startswith("na:")}
        arrays.update({f"na:{k[3:]}": v for k, v in self.values.items() if k.startswith("na:")})
        return PromptResult(arrays, self.images, self.image_shape)


def sample_prompt(sampler, rewards: dict, na: dict, layout: dict, prompt: str, index: int, candidates: int,
                  seed: int, max_batch: int, codec: tuple | None = None) -> PromptResult:
    """Rewards ``[N, S]`` of every candidate of one prompt (and, with ``codec`` = (format, quality),
    every estimate encoded)."""
    den = sampler.denoiser
    rec = _Recorder(rewards, na, layout, candidates, codec)
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
        rec.finish_chunk(lo)
    return rec.result()


# ---------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------
def _collect(job: _Job) -> list[dict] | None:
    """Every prompt's part, or None when some are missing (another process stopped early or failed)."""
    parts = [_finished(job, i) for i in range(len(job.prompts))]
    return None if any(p is None for p in parts) else parts


def _extra(job: _Job) -> dict:
    samp, den, cfg = job.samp, job.den, job.cfg
    extra = {
        "generator": "noisesearch pool",
        "guidance": _guidance(den, cfg),
        "sampler": samp.name,
        "sampler_steps": samp.num_steps,
        "seed": int(cfg.seed),
        "candidates": job.candidates,
        "reward_specs": job.specs,
        "state_steps": job.layout["state_steps"],
        "nfe_at_step": job.layout["nfe_at_step"],
        "sigmas": job.layout["sigmas"],
        "flops_per_nfe": float(getattr(den, "flops_per_call", 0.0)),
        "flops_per_decode": float(den.flops_per_decode),
        "nfe_per_trajectory": samp.nfe_per_trajectory,
        "noise": NOISE_DOC,
        "images": IMAGES_DIR if cfg.save_images else None,
        "images_format": _images_format(job) if cfg.save_images else None,
        "spec_digest": job.digest,
        "fingerprints": job.spec_doc["fingerprints"],
        "processes": job.world,
        "seconds": None,
    }
    if hasattr(den, "encode_cost"):  # prompt encoding (this process's prompts): reported, not charged
        extra["prompt_encoding"] = den.encode_cost()
    if cfg.model_options:
        extra["model_options"] = {k: str(v) for k, v in cfg.model_options.items()}
    if cfg.command:
        extra["command"] = cfg.command
    if job.na:
        extra["flops_per_noise_aware_reward"] = {k: float(getattr(r, "flops_per_image", 0.0)) for k, r in job.na.items()}
    return extra


def _images_format(job: _Job) -> dict:
    meta = read_prompt_meta(images_path(job.out, 0)) or {}
    strips = meta.get("layout") == "strip"
    return {"codec": job.cfg.image_format, "quality": job.cfg.quality, "shape": meta.get("shape"),
            "layout": meta.get("layout", "image"),
            "files": "images/prompt_NNNNNN.zip, member " + ("cJJJJJJ.<codec>: candidate J's S estimates stacked vertically"
                                                            if strips else "cJJJJJJ_sSSS.<codec>: candidate J, pool step S"),
            "values": "uint8 round(255 * decoded estimate)" + ("" if job.cfg.image_format == "png" else ", lossy")}


def _assemble(job: _Job, t0: float) -> Pool | None:
    parts = _collect(job)
    if parts is None:
        return None
    S = len(job.layout["state_steps"])
    pool = Pool(
        rewards={k: np.stack([p[f"r:{k}"] for p in parts]) for k in job.base},
        noise_aware={k: np.stack([p[f"na:{k}"] for p in parts]) for k in job.na},
        prompts=job.prompts,
        model=job.spec_doc["model"],
        num_steps=S,
        flops_per_step=float(getattr(job.den, "flops_per_call", 0.0)) * job.samp.nfe_per_trajectory / S,
        flops_per_reward={k: float(getattr(r, "flops_per_image", 0.0)) for k, r in job.base.items()},
        extra=_extra(job),
    )
    manifest = job.out / MANIFEST
    if manifest.exists():
        manifest.unlink()  # incomplete until the new manifest lands
    pool.extra["seconds"] = round(time.perf_counter() - t0, 3)
    pool.save(job.out)
    return pool


__all__ = ["PoolConfig", "PromptResult", "generate_pool", "make_pool", "sample_prompt", "fingerprints",
           "score_at_step", "step_layout"]
