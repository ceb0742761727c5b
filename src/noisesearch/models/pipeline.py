"""What every diffusers-pipeline denoiser shares: ``PipelineDenoiser`` (guidance branches, the
checked call, VAE decoding and its cost) and the helpers around it (dtype names, ``meta`` copies for
FLOP counts, the pipelines' latent normalisation).

``models.sd`` (Stable Diffusion 1.x / 2.x, SDXL), ``models.flow`` (FLUX, SD3, Lumina2) and
``models.unconditional`` (DDPM / DDIM) build on it; ``models.load`` loads pipelines.
"""
from __future__ import annotations

import copy
import logging

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.validate import check_guidance


class _NoTorchvisionNotice:
    """Drops transformers' notice that an image processor falls back from torchvision to PIL:
    noisesearch preprocesses on tensors itself, so the notice (two per run) is noise."""

    def filter(self, record) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_library_notices() -> None:
    """Install :class:`_NoTorchvisionNotice` on transformers' log handlers (once)."""
    try:
        from transformers.utils import logging as tlog  # deferred: optional heavy dependency (transformers)
    except ImportError:  # pragma: no cover
        return
    for h in tlog.get_logger().handlers:
        if not any(isinstance(f, _NoTorchvisionNotice) for f in h.filters):
            h.addFilter(_NoTorchvisionNotice())


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A parameter-free copy of a diffusers / transformers module on the ``meta`` device (same config).

    FLOPs counted on it equal those of the real module, so a model never has to run (or, with
    configs only, be loaded) to be costed.
    """
    quiet = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            if hasattr(module, "from_config"):  # diffusers ModelMixin
                copy_ = type(module).from_config(module.config)
            else:  # transformers PreTrainedModel
                copy_ = type(module)(module.config)
        return copy_.to(dtype=next(module.parameters()).dtype).eval()
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def to_meta(obj):
    """Tensors (in nested dicts / tuples / lists) as meta tensors of the same shape and dtype."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, dict):
        return {k: to_meta(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_meta(v) for v in obj)
    return obj


def vae_latents_to_vae_input(vae, z: torch.Tensor) -> torch.Tensor:
    """Undo the pipeline's latent normalisation (``latents_mean/std`` or ``scaling/shift_factor``)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        c = z.shape[1]
        mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, c, 1, 1)
        std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, c, 1, 1)
        return z * std / cfg.scaling_factor + mean
    z = z / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None) is not None:
        z = z + cfg.shift_factor
    return z


@torch.no_grad()
def vae_decode(vae, x0: torch.Tensor, decode_batch: int, device) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] (float32) from normalised latents, ``decode_batch`` per VAE call."""
    images = []
    for lo in range(0, x0.shape[0], max(1, int(decode_batch))):
        z = vae_latents_to_vae_input(vae, x0[lo : lo + decode_batch].to(device, vae.dtype))
        img = vae.decode(z, return_dict=False)[0]
        images.append((img.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def vae_decode_flops(vae, sample_shape) -> float:
    """VAE decoder FLOPs for one image of latent shape ``sample_shape``, counted on ``meta``."""
    meta_vae = meta_copy(vae)
    z = torch.zeros((1, *sample_shape), device="meta", dtype=next(vae.parameters()).dtype)
    return count_flops(lambda: meta_vae.decode(vae_latents_to_vae_input(meta_vae, z), return_dict=False))


def parse_dtype(dtype, device: torch.device, cuda_default: torch.dtype = torch.float16) -> torch.dtype:
    """``dtype`` (a torch.dtype, a name like ``"bfloat16"`` or None) -> torch.dtype; None gives
    ``cuda_default`` on CUDA and float32 elsewhere."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is None:
        dtype = cuda_default if torch.device(device).type == "cuda" else torch.float32
    if dtype not in NETWORK_DTYPES:
        raise NoiseSearchError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return dtype


NETWORK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_IMAGE_PX = 4096  # default largest height / width a pipeline adapter accepts (see ``check_image_size``)
UNET_SIZE_FACTOR = 4  # UNet pipelines accept up to this times their trained size a side


def check_count(what: str, value, none_ok: bool = False, limit: int = 1 << 20) -> int | None:
    """A positive whole number ``value`` (below ``limit``) for the option ``what``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value <= limit:
        raise NoiseSearchError(f"{what} must be a whole number from 1 to {limit}, got {value!r}")
    return int(value)


def check_image_size(height, width, default_px: int, multiple: int, what: str, max_px: int = MAX_IMAGE_PX) -> tuple[int, int]:
    """(height, width) in pixels: defaults filled in, each a multiple of ``multiple`` in
    [``multiple``, ``max_px``]; checked before anything is built or run."""
    out = []
    for label, v in (("height", height), ("width", width)):
        v = default_px if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise NoiseSearchError(f"{label} must be a whole number of pixels, got {v!r}")
        out.append(int(v))
    top = max_px - max_px % multiple
    if any(not multiple <= v <= top or v % multiple for v in out):
        raise NoiseSearchError(
            f"height and width must be multiples of {multiple} from {multiple} to {top} for {what}, got {out[0]}x{out[1]}"
        )
    return out[0], out[1]


def scheduler_sigmas(scheduler, schedule, steps: int) -> torch.Tensor:
    """The sigmas a discrete-VP ``scheduler`` visits in ``steps`` steps, ending with 0 (float64).

    Taken from ``scheduler.sigmas`` after ``set_timesteps(steps)`` where the scheduler keeps one
    sigma per timestep (Euler, Euler-ancestral, LMS, DPM-Solver, ...); otherwise (DDPM, DDIM, PNDM,
    ...) the sigmas of its distinct timesteps through ``schedule`` (a ``DiscreteVPSchedule``).
    """
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device="cpu")
    timesteps = torch.as_tensor(sched.timesteps).double().cpu()
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(timesteps) + 1:
        sigmas = torch.as_tensor(sigmas).double().cpu()
    else:
        keep = torch.ones(len(timesteps), dtype=torch.bool)
        keep[1:] = timesteps[1:] != timesteps[:-1]  # PNDM repeats its first timesteps
        sigmas = schedule.t_to_sigma(timesteps[keep])
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if sigmas[-1] != 0:  # final_sigmas_type="sigma_min": the sampler appends the 0 itself
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def pipeline_class(pipe, supported, kind: str) -> str:
    """The class name of ``pipe``, refused unless it is one of ``supported`` (``kind``: words for the message)."""
    cls = type(pipe).__name__
    if cls not in supported:
        raise NoiseSearchError(f"unsupported {kind} pipeline {cls}; supported: {', '.join(supported)}")
    return cls


def adopt_pipeline(denoiser, pipe, network, name: str | None, default_steps: int) -> None:
    """The fields every pipeline denoiser takes from its pipeline and its denoising ``network``:
    ``pipe``, ``name``, ``default_steps``, ``device``, ``model_dtype`` and float32 sampler states."""
    denoiser.pipe = pipe
    denoiser.name = name or getattr(pipe, "name_or_path", None) or type(pipe).__name__
    denoiser.default_steps = check_count("default_steps", default_steps)
    denoiser.device = network.device
    denoiser.model_dtype = network.dtype
    denoiser.dtype = torch.float32  # sampler states


class PipelineDenoiser:
    """What every diffusers-pipeline denoiser shares: guidance branches, the checked call, VAE decode
    and its cost. Subclasses set ``guidance``, ``wrapper`` (``(x, sigma, cond) -> x0``), ``device``,
    ``decode_vae``, ``decode_batch``, ``sample_shape`` and encode prompts into ``{branch: {...}}``."""

    conditional = True

    def with_settings(self, guidance: float | None = None, device=None):
        """This denoiser with another ``guidance`` (a shallow copy sharing the pipeline); a
        ``device`` change is refused: the networks stay where the pipeline is."""
        if device is not None:
            raise NoiseSearchError(
                f"{self.name} runs where its pipeline is ({self.device}): move the pipeline (pipe.to(device)) "
                "and pass the pipeline object, or leave device out"
            )
        if guidance is None:
            return self
        out = copy.copy(self)
        out.guidance = check_guidance(guidance)
        net = getattr(self.wrapper, "net", None)
        if getattr(net, "__self__", None) is self:  # the wrapper calls this object's network method: rebind
            out.wrapper = copy.copy(self.wrapper)
            out.wrapper.net = getattr(out, net.__name__)
        out._flops_per_call = None  # the branches changed
        out._meta_cond = None
        if isinstance(getattr(self, "encode_stats", None), dict):
            out.encode_stats = dict(self.encode_stats)
        return out

    @property
    def branches(self) -> tuple[str, ...]:
        """Network branches one evaluation needs: ('uncond',), ('cond',) or ('uncond', 'cond')."""
        if self.guidance == 0:
            return ("uncond",)
        if self.guidance == 1:
            return ("cond",)
        return ("uncond", "cond")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """x0 estimate (float32) of latents ``x`` at noise levels ``sigma`` [B]."""
        missing = [b for b in self.branches if b not in cond]
        if missing:
            raise NoiseSearchError(
                f"condition lacks the {missing} branch(es) for guidance {self.guidance:g}: encode prompts with this denoiser"
            )
        x = x.to(self.device, torch.float32)
        sigma = sigma.to(self.device, torch.float32)
        return self.wrapper(x, sigma, cond).float()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32) from latent x0 estimates, ``decode_batch`` per VAE call."""
        return vae_decode(self.decode_vae, x0, self.decode_batch, self.device)

    @property
    def flops_per_decode(self) -> float:
        """VAE decoder FLOPs for one image (counted on ``meta``, once)."""
        if getattr(self, "_flops_per_decode", None) is None:
            self._flops_per_decode = vae_decode_flops(self.decode_vae, self.sample_shape)
        return self._flops_per_decode


__all__ = [
    "PipelineDenoiser",
    "adopt_pipeline",
    "pipeline_class",
    "meta_copy",
    "to_meta",
    "parse_dtype",
    "vae_decode",
    "vae_decode_flops",
    "vae_latents_to_vae_input",
    "quiet_library_notices",
    "check_count",
    "check_image_size",
    "scheduler_sigmas",
    "MAX_IMAGE_PX",
    "UNET_SIZE_FACTOR",
]
