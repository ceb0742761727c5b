"""Stable Diffusion (1.x / 2.x) and SDXL pipelines from diffusers as noisesearch denoisers.

``DiffusersDenoiser`` turns a pipeline's UNet into ``D(x, sigma, cond) -> x0`` on latents
(``models.wrappers`` does the eps / v conversions), applies classifier-free guidance, encodes
prompts with the pipeline's own ``encode_prompt`` and decodes x0 with the pipeline's VAE.

Conventions (matching ``StableDiffusionPipeline.__call__`` exactly):

* The UNet input is ``x / sqrt(sigma^2 + 1)`` (what ``EulerDiscreteScheduler.scale_model_input``
  does) at the training timestep of ``sigma`` (see ``DiscreteVPSchedule``).
* ``guidance`` g: 0 = unconditional only (the empty / negative prompt), 1 = conditional only, any
  other value = CFG ``out = out_uncond + g (out_cond - out_uncond)`` with both branches in one
  batched UNet call (diffusers switches CFG off for ``guidance_scale <= 1``, so its ``g = 0``
  means "conditional only", which is our ``g = 1``).
* ``pipeline_sigmas(N)`` is the pipeline scheduler's own sigma schedule for N steps: Euler
  (``EulerAncestral(d, eta=0, sigmas=d.pipeline_sigmas(N))``) on it reproduces
  ``pipe(prompt, num_inference_steps=N, latents=noise * sigma_0 / scheduler.init_noise_sigma)``
  with an ``EulerDiscreteScheduler``.

``cond`` is a nested dict of batched tensors, one row per prompt, holding only the branches the
guidance needs: ``{"cond": {...}, "uncond": {...}}`` with ``"embeds"`` [B, L, D] (and for SDXL
``"pooled"`` [B, P] and ``"time_ids"`` [B, 6]), so that ``cond_index`` / ``cond_repeat`` work.
"""
from __future__ import annotations

import copy
import os
from typing import Sequence

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.models.wrappers import vp_denoiser

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class _NoTorchvisionNotice:
    """Drops transformers' notice that an image processor falls back from torchvision to PIL:
    noisesearch preprocesses on tensors itself, so the notice (two per run) is noise."""

    def filter(self, record) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_library_notices() -> None:
    """Install :class:`_NoTorchvisionNotice` on transformers' log handlers (once)."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover
        return
    for h in tlog.get_logger().handlers:
        if not any(isinstance(f, _NoTorchvisionNotice) for f in h.filters):
            h.addFilter(_NoTorchvisionNotice())


quiet_library_notices()


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A parameter-free copy of a diffusers / transformers module on the ``meta`` device (same config).

    FLOPs counted on it equal those of the real module, so a model never has to run (or, with
    configs only, be loaded) to be costed.
    """
    import logging

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
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise NoiseSearchError(f"unknown dtype {dtype!r}; use e.g. float32, float16, bfloat16")
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = cuda_default if torch.device(device).type == "cuda" else torch.float32
    return dtype


class PipelineDenoiser:
    """What every diffusers-pipeline denoiser shares: guidance branches, the checked call, VAE decode
    and its cost. Subclasses set ``guidance``, ``wrapper`` (``(x, sigma, cond) -> x0``), ``device``,
    ``decode_vae``, ``decode_batch``, ``sample_shape`` and encode prompts into ``{branch: {...}}``."""

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


class DiffusersDenoiser(PipelineDenoiser):
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` as a noisesearch ``Denoiser``.

    Args:
        pipe: the pipeline (already on its device and dtype).
        guidance: 0 = unconditional, 1 = conditional, otherwise classifier-free guidance scale.
        name: display name (defaults to the pipeline's ``name_or_path``).
        height, width: image size in pixels (default: the pipeline's default size).
        default_steps: steps a sampler uses when none are given.
        negative_prompt: the unconditional prompt of CFG (default: the pipeline's default, i.e. ""
            for SD and zero embeddings for SDXL with ``force_zeros_for_empty_prompt``).
        decode_batch: latents decoded per VAE call.

    Sampler states are float32 (``dtype``); the networks run in the pipeline's dtype
    (``model_dtype``), inputs are cast on the way in and x0 back to float32.
    """

    def __init__(
        self,
        pipe,
        guidance: float = 7.5,
        name: str | None = None,
        height: int | None = None,
        width: int | None = None,
        default_steps: int = 30,
        negative_prompt: str | None = None,
        decode_batch: int = 8,
    ):
        cls = type(pipe).__name__
        if cls not in SUPPORTED_PIPELINES:
            raise NoiseSearchError(
                f"unsupported diffusers pipeline {cls}; supported: {', '.join(SUPPORTED_PIPELINES)}"
            )
        if guidance < 0:
            raise NoiseSearchError(f"guidance must be >= 0, got {guidance}")
        self.pipe = pipe
        self.is_xl = cls == "StableDiffusionXLPipeline"
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.guidance = float(guidance)
        self.negative_prompt = negative_prompt
        self.decode_batch = int(decode_batch)
        self.name = name or getattr(pipe, "name_or_path", None) or cls
        self.default_steps = int(default_steps)
        self.device = self.unet.device
        self.model_dtype = self.unet.dtype
        self.dtype = torch.float32  # sampler states

        if getattr(self.unet.config, "time_cond_proj_dim", None) is not None:
            raise NoiseSearchError("guidance-embedded (LCM-style) UNets with time_cond_proj_dim are not supported")
        sched = pipe.scheduler
        self.prediction_type = sched.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise NoiseSearchError(
                f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                "supported: 'epsilon', 'v_prediction'"
            )
        if not hasattr(sched, "alphas_cumprod"):
            raise NoiseSearchError(f"scheduler {type(sched).__name__} has no alphas_cumprod (not a discrete VP schedule)")
        # Karras / exponential / beta sigma schedules place timesteps by log-sigma interpolation,
        # EulerDiscreteScheduler's default schedule by linear interpolation of sigma in t: use the
        # inverse of whichever the pipeline uses, so that its own sigmas hit its own timesteps.
        log_interp = any(sched.config.get(k, False) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        log_interp = log_interp or sched.config.get("interpolation_type", "linear") != "linear"
        # zero-terminal-SNR schedules end at alphas_cumprod = 0 (sigma = inf): cap as diffusers' Euler does
        alphas_cumprod = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64).clamp_min(2.0**-24)
        self.wrapper = vp_denoiser(
            self._guided_unet, alphas_cumprod, self.prediction_type, interp="log" if log_interp else "linear"
        )
        self.schedule = self.wrapper.schedule
        self.sigma_min = self.schedule.sigma_min
        self.sigma_max = self.schedule.sigma_max

        # SDXL's fp16 VAE overflows: its pipeline upcasts it for every decode. Keep a float32 copy
        # for decoding instead (the pipeline's own VAE is left as it is).
        self.decode_vae = self.vae
        if self.is_xl and self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.decode_vae = copy.deepcopy(self.vae).to(torch.float32)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        default_px = self.unet.config.sample_size * self.vae_scale_factor
        self.height = int(height or default_px)
        self.width = int(width or default_px)
        if self.height % self.vae_scale_factor or self.width % self.vae_scale_factor:
            raise NoiseSearchError(
                f"height and width must be multiples of {self.vae_scale_factor}, got {self.height}x{self.width}"
            )
        self.sample_shape = (
            self.unet.config.in_channels,
            self.height // self.vae_scale_factor,
            self.width // self.vae_scale_factor,
        )
        self._flops_per_call: float | None = None
        self._flops_per_decode: float | None = None

    # ---- guidance --------------------------------------------------------------------------------
    def _guided_unet(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The network output (eps or v) with guidance applied; all branches in one UNet call."""
        branches = self.branches
        n = len(branches)
        parts = [cond[b] for b in branches]
        embeds = torch.cat([p["embeds"] for p in parts])
        added = None
        if self.is_xl:
            added = {
                "text_embeds": torch.cat([p["pooled"] for p in parts]),
                "time_ids": torch.cat([p["time_ids"] for p in parts]),
            }
        x_in = torch.cat([x_t] * n).to(self.model_dtype)
        out = self.unet(
            x_in, torch.cat([t] * n), encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False
        )[0]
        if n == 1:
            return out
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance * (out_cond - out_uncond)

    # ---- Denoiser protocol (call and decode: PipelineDenoiser) -------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict:
        """Prompt embeddings via the pipeline's ``encode_prompt``, one row per prompt."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise NoiseSearchError("no prompts to encode")
        n = len(prompts)
        negative = [self.negative_prompt] * n if self.negative_prompt is not None else None
        if self.is_xl:
            embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
            time_ids = torch.tensor(
                [[self.height, self.width, 0, 0, self.height, self.width]], dtype=embeds.dtype, device=self.device
            ).repeat(n, 1)  # original size, crop top-left, target size (as the pipeline's defaults)
            both = {
                "cond": {"embeds": embeds, "pooled": pooled, "time_ids": time_ids},
                "uncond": {"embeds": neg_embeds, "pooled": neg_pooled, "time_ids": time_ids.clone()},
            }
        else:
            embeds, neg_embeds = self.pipe.encode_prompt(
                prompts, self.device, 1, True, negative_prompt=negative
            )
            both = {"cond": {"embeds": embeds}, "uncond": {"embeds": neg_embeds}}
        return {b: {k: v.to(self.device, self.model_dtype) for k, v in both[b].items()} for b in self.branches}

    # ---- costs -----------------------------------------------------------------------------------
    @property
    def flops_per_call(self) -> float:
        """UNet FLOPs of one evaluation of one sample, all guidance branches included (measured once)."""
        if self._flops_per_call is None:
            x = torch.zeros((1, *self.sample_shape), device=self.device)
            sigma = torch.ones(1, device=self.device)
            cond = self.encode([""])
            self._flops_per_call = count_flops(lambda: self(x, sigma, cond))
        return self._flops_per_call

    # ---- the pipeline's own schedule -------------------------------------------------------------
    def pipeline_sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The sigmas the pipeline's scheduler visits in ``steps`` steps, ending with 0 (float64).

        Taken from ``scheduler.sigmas`` after ``set_timesteps(steps)`` where the scheduler keeps
        one sigma per timestep (Euler, Euler-ancestral, LMS, DPM-Solver, ...); otherwise
        (DDIM, PNDM, ...) the sigmas of its distinct timesteps. Pass to a sampler as ``sigmas=``.
        """
        steps = int(steps or self.default_steps)
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(steps, device="cpu")
        timesteps = torch.as_tensor(sched.timesteps).double().cpu()
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None and len(sigmas) == len(timesteps) + 1:
            sigmas = torch.as_tensor(sigmas).double().cpu()
        else:
            keep = torch.ones(len(timesteps), dtype=torch.bool)
            keep[1:] = timesteps[1:] != timesteps[:-1]  # PNDM repeats its first timesteps
            sigmas = self.schedule.t_to_sigma(timesteps[keep])
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        if sigmas[-1] != 0:  # final_sigmas_type="sigma_min": the sampler appends the 0 itself
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return sigmas

    def __repr__(self) -> str:
        return (
            f"DiffusersDenoiser({self.name!r}, {type(self.pipe).__name__}, {self.prediction_type}, "
            f"guidance={self.guidance:g}, {self.height}x{self.width}, device={self.device}, dtype={self.model_dtype})"
        )


# ---- loading ---------------------------------------------------------------------------------------


def _hub_error(name: str, err: Exception) -> NoiseSearchError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        hint = (
            "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache: download it where there is "
            f"network (e.g. `huggingface-cli download {name} --local-dir DIR`) and pass --model DIR"
        )
    else:
        hint = "check the name, your network and, for gated models, `huggingface-cli login`; or pass a local directory"
    return NoiseSearchError(f"cannot load diffusers pipeline {name!r}: {hint} ({type(err).__name__}: {err})")


def _dtype_kwarg() -> str:
    """``dtype`` in recent diffusers (which deprecates ``torch_dtype``), ``torch_dtype`` before."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def load_diffusers(
    name_or_path: str,
    device: str | torch.device = "cpu",
    guidance: float = 7.5,
    dtype: torch.dtype | str | None = None,
    variant: str | None = None,
    **kw,
) -> DiffusersDenoiser:
    """Load a Stable Diffusion / SDXL / flow pipeline (local directory or hub ``org/name``) as a denoiser.

    Flow-matching pipelines (FluxPipeline, StableDiffusion3Pipeline, Lumina2Pipeline; detected from
    ``model_index.json``) become a ``models.flow.FlowPipelineDenoiser``.

    ``dtype``: the network dtype (default on CUDA: bfloat16 for flow pipelines, float16 for SD / SDXL;
    float32 elsewhere); a string like ``"bfloat16"`` works too. ``variant``: a weights variant such as
    ``"fp16"``. ``offload=True``: model CPU offload (``enable_model_cpu_offload``, CUDA only; flow
    pipelines). Other keyword arguments go to the denoiser (height, width, default_steps,
    negative_prompt, decode_batch, ...).
    """
    try:
        import diffusers
    except ImportError as e:
        raise NoiseSearchError("diffusers pipelines need `pip install 'noisesearch[diffusers]'`") from e

    name = str(name_or_path)
    device = torch.device(device)
    offload = bool(kw.pop("offload", False))

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise NoiseSearchError(
                f"{name} is not a diffusers pipeline directory (no model_index.json); "
                "save one with `pipe.save_pretrained(DIR)` or download a full pipeline repository"
            )
        try:
            config = diffusers.DiffusionPipeline.load_config(name)
        except Exception as e:
            raise NoiseSearchError(f"cannot read {os.path.join(name, 'model_index.json')}: {e}") from e
    else:
        try:
            config = diffusers.DiffusionPipeline.load_config(name)
        except Exception as e:
            raise _hub_error(name, e) from e

    from noisesearch.models.flow import FLOW_FAMILIES, FlowPipelineDenoiser

    class_name = config.get("_class_name")
    supported = SUPPORTED_PIPELINES + tuple(FLOW_FAMILIES)
    if class_name not in supported:
        raise NoiseSearchError(
            f"{name} is a {class_name} pipeline; supported: {', '.join(supported)} "
            "(Stable Diffusion 1.x / 2.x, SDXL and the flow-matching FLUX, SD3 and Lumina2 text-to-image)"
        )
    is_flow = class_name in FLOW_FAMILIES
    # flow transformers are trained in bfloat16 (float16 overflows in FLUX); UNets run in float16
    dtype = parse_dtype(dtype, device, torch.bfloat16 if is_flow else torch.float16)
    pipeline_cls = getattr(diffusers, class_name)
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    if variant is not None:
        extra["variant"] = variant
    extra[_dtype_kwarg()] = dtype
    try:
        pipe = pipeline_cls.from_pretrained(name, **extra)
    except Exception as e:
        if not os.path.isdir(name):
            raise _hub_error(name, e) from e
        raise NoiseSearchError(f"cannot load the {class_name} in {name} (missing or broken files?): {e}") from e
    if offload:
        if device.type != "cuda":
            raise NoiseSearchError("--offload (model CPU offload) needs a CUDA device")
        pipe.enable_model_cpu_offload(device=device)  # needs accelerate; each model moves to the GPU when it runs
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    try:
        if is_flow:
            return FlowPipelineDenoiser(pipe, guidance=guidance, name=name, offloaded=offload, **kw)
        if offload:
            raise NoiseSearchError("--offload applies to flow pipelines (FLUX, SD3, Lumina2)")
        return DiffusersDenoiser(pipe, guidance=guidance, name=name, **kw)
    except TypeError as e:
        raise NoiseSearchError(f"bad option for a diffusers model: {e}") from e


__all__ = ["DiffusersDenoiser", "load_diffusers", "SUPPORTED_PIPELINES", "vae_decode", "vae_decode_flops", "meta_copy", "parse_dtype"]
