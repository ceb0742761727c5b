"""Unconditional pixel-space pipelines from diffusers (``DDPMPipeline``, ``DDIMPipeline``) as denoisers.

The pipeline's ``UNet2DModel`` is trained on the discrete VP process of its scheduler
(``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, ``a_t = alphas_cumprod[t]``) and predicts what the
scheduler's ``prediction_type`` says: ``epsilon`` and ``v_prediction`` go through the wrappers of
``models.wrappers`` (``vp_denoiser``), ``sample`` (x0 itself) through ``VPSampleDenoiser`` here.
Samples are images ``[C, H, W]`` in [-1, 1]; ``decode`` rescales them to [0, 1].

The model has no condition: ``conditional = False``, ``encode`` accepts any prompts (they only
count the samples) and returns None, and guidance can only be 0 or 1 (both the one network call).
``pipeline_sigmas(N)`` are the sigmas the pipeline's own scheduler visits in N steps.
"""
from __future__ import annotations

from typing import Sequence

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.models.pipeline import (
    UNET_SIZE_FACTOR,
    adopt_pipeline,
    check_image_size,
    meta_copy,
    pipeline_class,
    scheduler_sigmas,
)
from noisesearch.models.wrappers import DiscreteVPSchedule, VPEpsDenoiser, vp_denoiser
from noisesearch.validate import check_guidance

UNCONDITIONAL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")


class VPSampleDenoiser(VPEpsDenoiser):
    """x0-prediction network on a discrete VP schedule: ``D = output`` (diffusers' ``"sample"``)."""

    prediction_type = "sample"

    @staticmethod
    def to_x0(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0.to(x.dtype)


class UnconditionalPipelineDenoiser:
    """A ``DDPMPipeline`` / ``DDIMPipeline`` (a ``UNet2DModel`` and a discrete VP scheduler) as a denoiser.

    Args:
        pipe: the pipeline (on its device and dtype).
        guidance: None, 0 or 1 (the model has no condition; ``self.guidance`` is None).
        name: display name (default: the pipeline's ``name_or_path``).
        height, width: image size (default: the UNet's ``sample_size``).
        default_steps: steps a sampler uses when none are given.
    """

    family = "ddpm"
    conditional = False
    flops_per_decode = 0.0  # pixel model: decoding is a rescale

    def __init__(self, pipe, guidance: float | None = 1.0, name: str | None = None, height: int | None = None,
                 width: int | None = None, default_steps: int = 50):
        cls = pipeline_class(pipe, UNCONDITIONAL_PIPELINES, "unconditional")
        if guidance is not None:
            _unconditional_guidance(guidance)
        self.guidance = None  # nothing to guide: one network call per evaluation
        self.family = "ddim" if cls == "DDIMPipeline" else "ddpm"
        self.unet = pipe.unet
        adopt_pipeline(self, pipe, self.unet, name, default_steps)
        self._init_schedule(pipe.scheduler)
        self._init_size(height, width)
        self._flops_per_call: float | None = None

    def _init_schedule(self, sched) -> None:
        if not hasattr(sched, "alphas_cumprod"):
            raise NoiseSearchError(f"scheduler {type(sched).__name__} has no alphas_cumprod (not a discrete VP schedule)")
        self.prediction_type = sched.config.get("prediction_type", "epsilon")
        alphas_cumprod = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64).clamp_min(2.0**-24)
        if self.prediction_type == "sample":
            self.wrapper = VPSampleDenoiser(self._unet, DiscreteVPSchedule(alphas_cumprod, interp="log"))
        elif self.prediction_type in ("epsilon", "v_prediction"):
            self.wrapper = vp_denoiser(self._unet, alphas_cumprod, self.prediction_type, interp="log")
        else:
            raise NoiseSearchError(
                f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                "supported: 'epsilon', 'v_prediction', 'sample'"
            )
        self.parametrisation = f"discrete VP, {self.prediction_type}"
        self.schedule = self.wrapper.schedule
        self.sigma_min = self.schedule.sigma_min
        self.sigma_max = self.schedule.sigma_max

    def _init_size(self, height, width) -> None:
        cfg = self.unet.config
        size = cfg.sample_size
        default = size if isinstance(size, int) else int(size[0])
        if not isinstance(size, int) and (height, width) == (None, None):
            height, width = int(size[0]), int(size[1])
        multiple = 2 ** (len(cfg.block_out_channels) - 1)
        self.height, self.width = check_image_size(height, width, default, multiple, type(self.pipe).__name__,
                                                   max_px=UNET_SIZE_FACTOR * default)
        self.sample_shape = (int(cfg.in_channels), self.height, self.width)

    def _unet(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.unet(x_t.to(self.model_dtype), t, return_dict=False)[0]

    # ---- Denoiser protocol -------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> None:
        """No condition: prompts only count the samples."""
        if not len(prompts):
            raise NoiseSearchError("no samples to make (give at least one prompt or sample)")
        return None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """x0 estimate (float32) of images ``x`` at noise levels ``sigma`` [B]."""
        x = x.to(self.device, torch.float32)
        return self.wrapper(x, sigma.to(self.device, torch.float32), None).float()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from x0 in [-1, 1]."""
        return (x0.float() / 2 + 0.5).clamp(0, 1)

    @property
    def flops_per_call(self) -> float:
        """UNet FLOPs of one evaluation of one sample (counted on ``meta``, once)."""
        if self._flops_per_call is None:
            unet = meta_copy(self.unet)
            x = torch.zeros((1, *self.sample_shape), device="meta", dtype=self.model_dtype)
            t = torch.zeros(1, device="meta")
            self._flops_per_call = count_flops(lambda: unet(x, t, return_dict=False))
        return self._flops_per_call

    def pipeline_sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The sigmas the pipeline's scheduler visits in ``steps`` steps, ending with 0 (float64)."""
        return scheduler_sigmas(self.pipe.scheduler, self.schedule, int(steps or self.default_steps))

    def with_settings(self, guidance: float | None = None, device=None):
        """Guidance 0 or 1 is what runs anyway; a device change is refused (move the pipeline)."""
        if device is not None:
            raise NoiseSearchError(f"{self.name} runs where its pipeline is ({self.device}): move the pipeline and pass it again")
        if guidance is not None:
            _unconditional_guidance(guidance)
        return self

    def __repr__(self) -> str:
        return (f"UnconditionalPipelineDenoiser({self.name!r}, {type(self.pipe).__name__}, {self.prediction_type}, "
                f"{self.height}x{self.width}, device={self.device}, dtype={self.model_dtype})")


def _unconditional_guidance(guidance) -> float:
    g = check_guidance(guidance)
    if g not in (0.0, 1.0):
        raise NoiseSearchError(f"an unconditional model has no classifier-free guidance: use guidance 0 or 1, got {g:g}")
    return g


__all__ = ["UnconditionalPipelineDenoiser", "VPSampleDenoiser", "UNCONDITIONAL_PIPELINES"]
