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
from typing import Sequence

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.models.pipeline import (
    UNET_SIZE_FACTOR,
    PipelineDenoiser,
    adopt_pipeline,
    check_count,
    check_image_size,
    pipeline_class,
    scheduler_sigmas,
)
from noisesearch.models.wrappers import vp_denoiser
from noisesearch.validate import check_guidance

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


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

    family = "sd"
    conditional = True

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
        cls = pipeline_class(pipe, SD_PIPELINES, "diffusers")
        self.guidance = check_guidance(guidance)
        self.is_xl = cls == "StableDiffusionXLPipeline"
        self.family = "sdxl" if self.is_xl else "sd"
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.negative_prompt = negative_prompt
        self.decode_batch = check_count("decode_batch", decode_batch)
        adopt_pipeline(self, pipe, self.unet, name, default_steps)
        self._init_schedule(pipe.scheduler)
        self._init_decoder()
        self._init_size(height, width)
        self._flops_per_call: float | None = None
        self._flops_per_decode: float | None = None

    def _init_schedule(self, sched) -> None:
        """The discrete VP wrapper of the UNet on the scheduler's ``alphas_cumprod``."""
        if getattr(self.unet.config, "time_cond_proj_dim", None) is not None:
            raise NoiseSearchError("guidance-embedded (LCM-style) UNets with time_cond_proj_dim are not supported")
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
        self.parametrisation = f"discrete VP, {self.prediction_type}"
        self.schedule = self.wrapper.schedule
        self.sigma_min = self.schedule.sigma_min
        self.sigma_max = self.schedule.sigma_max

    def _init_decoder(self) -> None:
        """SDXL's fp16 VAE overflows: its pipeline upcasts it for every decode. Keep a float32 copy
        for decoding instead (the pipeline's own VAE is left as it is)."""
        self.decode_vae = self.vae
        if self.is_xl and self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.decode_vae = copy.deepcopy(self.vae).to(torch.float32)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _init_size(self, height: int | None, width: int | None) -> None:
        """Image size (default: the UNet's sample size) and the latent ``sample_shape``."""
        f = self.vae_scale_factor
        default_px = self.unet.config.sample_size * f
        # 4x the trained size a side (2048 px for SD 1.x, 4096 for SDXL): UNets run at any size, far
        # beyond their training size they repeat objects; memory is checked with the budget
        self.height, self.width = check_image_size(height, width, default_px, f, type(self.pipe).__name__,
                                                   max_px=UNET_SIZE_FACTOR * default_px)
        self.sample_shape = (self.unet.config.in_channels, self.height // f, self.width // f)

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
        return scheduler_sigmas(self.pipe.scheduler, self.schedule, int(steps or self.default_steps))

    def __repr__(self) -> str:
        return (
            f"DiffusersDenoiser({self.name!r}, {type(self.pipe).__name__}, {self.prediction_type}, "
            f"guidance={self.guidance:g}, {self.height}x{self.width}, device={self.device}, dtype={self.model_dtype})"
        )


__all__ = ["DiffusersDenoiser", "SD_PIPELINES"]
