"""Flow-matching pipelines (FLUX, SD3, Lumina2) as noisesearch denoisers.

One denoiser, ``FlowPipelineDenoiser``, turns any rectified-flow transformer into the EDM denoiser
``D(x, sigma, cond) -> x0`` through ``models.wrappers.FlowDenoiser`` (``sigma = t / (1 - t)``,
``x_t = x / (1 + sigma)``, ``x0 = x_t - t v``). What differs between pipeline families lives in a
small ``FlowFamily`` adapter:

* the network's time input: ``time_scale * t`` (SD3 takes ``1000 t``; FLUX takes ``t`` and scales
  it by 1000 itself), or of ``1 - t`` with ``time_reversed`` (Lumina2: t = 0 is noise);
* the sign of the predicted velocity (``velocity_sign``; Lumina2 predicts ``x0 - eps``);
* prompt encoding, latent packing (FLUX packs 2x2 patches into tokens), embedded guidance, the way
  CFG branches combine (Lumina2 renormalises), and the pipeline's timestep shift.

Adding a family (QwenImage, Chroma, Sana, HiDream, ...) is a subclass with ``encode_branches`` and
``network`` (see ``Lumina2Family``, 40 lines) registered in ``FLOW_FAMILIES``.

**Samples** are the *unpacked* latents ``[C, H/f, W/f]`` (``sample_shape``), drawn like the
pipelines draw them (FLUX draws unpacked latents and packs them); packing happens inside the
adapter. Latents are normalised like the pipeline's (``(z - shift) * scale``); ``decode`` undoes it.

**Schedule.** ``schedule_sigmas(N)`` (also ``pipeline_sigmas``) reads the pipeline scheduler's own
shifted flow times after ``set_timesteps`` exactly as the pipeline calls it (FLUX: dynamic shift
``mu`` from the packed token count; SD3: static shift, whose ``set_timesteps`` shifts the last value
twice, hence reading rather than recomputing) and maps them to ``sigma = t / (1 - t)``. The first is
``t = 1``: ``sigma = inf``. The samplers treat an infinite sigma exactly (``sampling.samplers``): the
state at sigma = inf holds the pure noise ``x / sigma`` (= ``x_t`` at t = 1), the network runs at
``t = 1`` on it, and the first step is the limit of the Euler step, ``x_1 = x0 + sigma_1 eps``, which
is the pipeline's flow Euler step. This keeps float32 states exact (clamping t_max to 1 - 1e-6 would
need float64 states). Samplers use this schedule by default for flow models (``Sampler`` asks the
denoiser's ``schedule_sigmas``), so ``--sampler euler`` reproduces the pipeline.

**Guidance.** ``guidance`` is classifier-free guidance as everywhere (0 = unconditional, 1 =
conditional only, else two branches with ``negative_prompt`` or "" as unconditional).
``embedded_guidance`` is FLUX.1-dev's guidance-embedding input (default 3.5), present in every
branch. A timestep-distilled model (FLUX.1-schnell: no guidance embedding, unshifted schedule) gets
a warning: its x0 estimates are not posterior means, so rewards of early estimates mean less.

**Cost and memory.** Networks run in the pipeline dtype (``models.load`` picks bfloat16 on CUDA),
sampler states are float32. ``flops_per_call`` / ``flops_per_decode`` are counted on parameter-free
``meta`` copies of the transformer / VAE. ``encode`` encodes each distinct prompt once, records
its cost (``encode_cost()``: FLOPs and seconds per prompt, written to ``report.json``) and then moves
the text encoders to the CPU on CUDA (``offload_text_encoders``); ``offloaded=True`` marks a pipeline
under ``enable_model_cpu_offload``. ``decode`` decodes ``decode_batch`` latents per VAE call, with
VAE slicing / tiling on request (``vae_tiling``).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.models.negtome import install_negtome
from noisesearch.models.pipeline import (
    MAX_IMAGE_PX,
    PipelineDenoiser,
    adopt_pipeline,
    check_count,
    check_image_size,
    meta_copy,
    pipeline_class,
    to_meta,
)
from noisesearch.models.wrappers import FlowDenoiser, flow_sigma_to_t, flow_t_to_sigma
from noisesearch.validate import check_guidance

# ---- per-family adapters ---------------------------------------------------------------------------


class FlowFamily:
    """What one family of flow pipelines does differently (see the module docstring)."""

    family = "flow"
    time_scale = 1.0  # network time = time_scale * t (or * (1 - t) if time_reversed)
    time_reversed = False
    velocity_sign = 1.0  # network output = velocity_sign * (eps - x0)
    has_embedded_guidance = False
    distilled = False

    default_msl = 256  # text tokens when max_sequence_length is not given

    def __init__(self, pipe, max_sequence_length: int | None = None):
        self.pipe = pipe
        top = self.max_msl()
        if max_sequence_length is not None and not 1 <= max_sequence_length <= top:
            raise NoiseSearchError(f"max_sequence_length must be from 1 to {top} for {type(pipe).__name__}, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def multiple(self) -> int:
        """Image sizes must be multiples of this."""
        return self.vae_scale_factor * 2

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    def default_size(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def max_size(self) -> int:
        """The largest height / width in pixels accepted (see ``check_image_size``): with a dynamic
        shift (FLUX.1-dev), the side of a square of ``4 * max_image_seq_len`` tokens (2048 px for
        FLUX.1): the shift ``mu`` grows linearly in the token count, and beyond this the last step of
        a 28-step schedule starts above sigma 1 (mostly noise); at 16384 px ``exp(mu)`` overflows."""
        tokens = 4 * int(self.pipe.scheduler.config.get("max_image_seq_len", 4096))
        return math.isqrt(tokens) * self.multiple

    def max_msl(self) -> int:
        """The largest ``max_sequence_length`` the pipeline accepts (512 for the T5 of FLUX and SD3)."""
        return 512

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_scale * ((1 - t) if self.time_reversed else t)

    def msl(self, default: int | None = None) -> int:
        return int(self.max_sequence_length or default or self.default_msl)

    # -- to implement --
    def encode_branches(self, prompts: list[str], negative: list[str] | None, need_uncond: bool, device=None) -> dict:
        """{"cond": {...}, "uncond": {...}} of batched tensors (uncond only if ``need_uncond``), on
        ``device`` (default: the pipeline's execution device)."""
        raise NotImplementedError

    def network(self, transformer, x_t: torch.Tensor, t_net: torch.Tensor, cond: dict, guidance, attn_kwargs) -> torch.Tensor:
        """Raw network output for unpacked latents ``x_t`` [B, C, h, w] (model dtype)."""
        raise NotImplementedError

    def combine(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, g: float) -> torch.Tensor:
        return v_uncond + g * (v_cond - v_uncond)

    def timesteps_kwargs(self, steps: int, sample_shape) -> dict:
        """Arguments of ``scheduler.set_timesteps`` as the pipeline's ``__call__`` passes them."""
        sched = self.pipe.scheduler
        kw: dict = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        if sched.config.get("use_dynamic_shifting", False):
            kw["mu"] = self.mu(sample_shape)
        return kw

    def image_seq_len(self, sample_shape) -> int:
        return int(sample_shape[1] * sample_shape[2] // 4)

    def mu(self, sample_shape) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # deferred: optional heavy dependency (diffusers)

        c = self.pipe.scheduler.config
        return calculate_shift(self.image_seq_len(sample_shape), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def text_encoders(self) -> list:
        return [getattr(self.pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.pipe, n, None) is not None]


class FluxFamily(FlowFamily):
    """FluxPipeline (FLUX.1-dev / schnell): CLIP pooled + T5, 2x2 packing, guidance embedding."""

    family = "flux"
    default_msl = 512

    def __init__(self, pipe, max_sequence_length=None):
        super().__init__(pipe, max_sequence_length)
        self.has_embedded_guidance = bool(pipe.transformer.config.guidance_embeds)
        self.distilled = not self.has_embedded_guidance  # schnell: timestep distilled

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels) // 4

    def encode_branches(self, prompts, negative, need_uncond, device=None):
        msl = self.msl()
        dev = device or self.pipe._execution_device
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev, max_sequence_length=msl)
        out = {"cond": {"embeds": embeds, "pooled": pooled}}
        if need_uncond:
            neg = negative or [""] * len(prompts)
            n_embeds, n_pooled, _ = self.pipe.encode_prompt(prompt=neg, prompt_2=None, device=dev, max_sequence_length=msl)
            out["uncond"] = {"embeds": n_embeds, "pooled": n_pooled}
        return out

    def network(self, transformer, x_t, t_net, cond, guidance, attn_kwargs):
        B, C, h, w = x_t.shape
        pipe = self.pipe
        packed = pipe._pack_latents(x_t, B, C, h, w)
        img_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        g = None
        if self.has_embedded_guidance:
            g = torch.full((B,), float(guidance), device=x_t.device, dtype=torch.float32)
        out = transformer(
            # FluxPipeline passes the timestep in the latents' dtype (bf16 on GPU): do the same
            hidden_states=packed, timestep=t_net.to(x_t.dtype), guidance=g, pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"], txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=attn_kwargs,
            return_dict=False,
        )[0]
        vsf = self.vae_scale_factor
        return pipe._unpack_latents(out, h * vsf, w * vsf, vsf)


class SD3Family(FlowFamily):
    """StableDiffusion3Pipeline (SD3 / SD3.5): two CLIPs + T5, transformer takes ``1000 t``."""

    family = "sd3"
    time_scale = 1000.0

    def encode_branches(self, prompts, negative, need_uncond, device=None):
        embeds, n_embeds, pooled, n_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device or self.pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=need_uncond, negative_prompt=negative, max_sequence_length=self.msl(),
        )
        out = {"cond": {"embeds": embeds, "pooled": pooled}}
        if need_uncond:
            out["uncond"] = {"embeds": n_embeds, "pooled": n_pooled}
        return out

    def network(self, transformer, x_t, t_net, cond, guidance, attn_kwargs):
        return transformer(
            # float32 as the pipeline passes it (1000 t in bfloat16 would be rounded to multiples of 4)
            hidden_states=x_t, timestep=t_net, encoder_hidden_states=cond["embeds"],
            pooled_projections=cond["pooled"], joint_attention_kwargs=attn_kwargs, return_dict=False,
        )[0]

    def timesteps_kwargs(self, steps, sample_shape):
        kw = {}  # SD3 lets the scheduler place its timesteps (no sigmas argument)
        if self.pipe.scheduler.config.get("use_dynamic_shifting", False):
            kw["mu"] = self.mu(sample_shape)
        return kw

    def image_seq_len(self, sample_shape):
        p = self.pipe.transformer.config.patch_size
        return int((sample_shape[1] // p) * (sample_shape[2] // p))

    def max_size(self) -> int:
        """The transformer's position-embedding grid (``pos_embed_max_size`` patches a side: 3072 px
        for SD3 medium) bounds the image; a dynamic shift bounds it as for FLUX."""
        cfg = self.pipe.transformer.config
        top = super().max_size() if self.pipe.scheduler.config.get("use_dynamic_shifting", False) else MAX_IMAGE_PX
        if cfg.get("pos_embed_max_size"):
            top = min(top, int(cfg.pos_embed_max_size) * int(cfg.patch_size) * self.vae_scale_factor)
        return top


class Lumina2Family(FlowFamily):
    """Lumina2Pipeline (Lumina-Image 2.0): Gemma2 text encoder, reversed time (t = 0 is noise),
    predicts ``x0 - eps``, CFG renormalised to the conditional velocity's norm (``cfg_normalization``;
    ``cfg_trunc_ratio`` is left at its default 1, i.e. off)."""

    family = "lumina2"
    time_reversed = True
    velocity_sign = -1.0
    cfg_normalization = True

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)  # hard-coded 8 in the pipeline

    def encode_branches(self, prompts, negative, need_uncond, device=None):
        embeds, mask, n_embeds, n_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=need_uncond, negative_prompt=negative,
            device=device or self.pipe._execution_device, max_sequence_length=self.msl(),
        )
        out = {"cond": {"embeds": embeds, "mask": mask}}
        if need_uncond:
            out["uncond"] = {"embeds": n_embeds, "mask": n_mask}
        return out

    def network(self, transformer, x_t, t_net, cond, guidance, attn_kwargs):
        return transformer(
            hidden_states=x_t, timestep=t_net, encoder_hidden_states=cond["embeds"],  # float32, as the pipeline
            encoder_attention_mask=cond["mask"], attention_kwargs=attn_kwargs, return_dict=False,
        )[0]

    def combine(self, v_uncond, v_cond, g):
        v = v_uncond + g * (v_cond - v_uncond)
        if self.cfg_normalization:  # as the pipeline: norms over the last (width) axis
            v = v * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True))
        return v

    def image_seq_len(self, sample_shape):
        return int(sample_shape[0])  # the pipeline passes latents.shape[1] (the channels) to calculate_shift

    def max_size(self) -> int:
        """Rotary positions exist for ``axes_lens[1:]`` patches a side (8192 px for Lumina-Image 2.0)."""
        cfg = self.pipe.transformer.config
        return min(int(n) for n in cfg.axes_lens[1:]) * int(cfg.patch_size) * self.vae_scale_factor

    def max_msl(self) -> int:
        """Caption positions exist for ``axes_lens[0]`` tokens, the image's first position included."""
        return int(self.pipe.transformer.config.axes_lens[0]) - 1


FLOW_FAMILIES: dict[str, type[FlowFamily]] = {
    "FluxPipeline": FluxFamily,
    "StableDiffusion3Pipeline": SD3Family,
    "Lumina2Pipeline": Lumina2Family,
}


# ---- the denoiser ----------------------------------------------------------------------------------


class FlowPipelineDenoiser(PipelineDenoiser):
    """A flow-matching diffusers pipeline as a noisesearch ``Denoiser`` (see the module docstring).

    Args:
        pipe: the pipeline (on its device and dtype, or under model CPU offload with ``offloaded``).
        guidance: 0 = unconditional, 1 = conditional, otherwise classifier-free guidance scale.
        name, height, width, default_steps, negative_prompt: as ``DiffusersDenoiser``.
        embedded_guidance: FLUX.1-dev's guidance input (default 3.5); an error for models without one.
        decode_batch: latents decoded per VAE call. vae_tiling: enable VAE slicing and tiling.
        max_sequence_length: text tokens (default: the pipeline's, 512 for FLUX's T5).
        offload_text_encoders: after encoding, move the text encoders to the CPU (CUDA only).
        negtome: a ``models.negtome.NegToMe`` config (FLUX only), or None.
    """

    conditional = True
    parametrisation = "rectified flow, velocity"

    def __init__(
        self,
        pipe,
        guidance: float = 1.0,
        name: str | None = None,
        height: int | None = None,
        width: int | None = None,
        default_steps: int = 28,
        negative_prompt: str | None = None,
        embedded_guidance: float | None = None,
        decode_batch: int = 4,
        vae_tiling: bool = False,
        max_sequence_length: int | None = None,
        offload_text_encoders: bool = True,
        offloaded: bool = False,
        negtome=None,
    ):
        cls = pipeline_class(pipe, FLOW_FAMILIES, "flow")
        self.guidance = check_guidance(guidance)
        self.family = FLOW_FAMILIES[cls](pipe, check_count("max_sequence_length", max_sequence_length, none_ok=True))
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.decode_vae = self.vae
        self.negative_prompt = negative_prompt
        self.decode_batch = check_count("decode_batch", decode_batch)
        adopt_pipeline(self, pipe, self.transformer, name, default_steps)
        self.offloaded = bool(offloaded)
        if offloaded:  # the networks move on and off the GPU: run where the pipeline executes
            self.device = pipe._execution_device
        self.offload_text_encoders = bool(offload_text_encoders)
        self._init_guidance(embedded_guidance)
        if vae_tiling:
            self.vae.enable_slicing()
            self.vae.enable_tiling()
        self._init_size(height, width)
        self._init_wrapper()
        self._init_negtome(negtome)
        self._flops_per_call: float | None = None
        self._flops_per_decode: float | None = None
        self._encode_flops: float | None = None
        self.encode_stats = {"prompts": 0, "seconds": 0.0}
        self._meta_cond = None

    def _init_guidance(self, embedded_guidance: float | None) -> None:
        """FLUX.1-dev's embedded guidance (default 3.5); a warning for timestep-distilled models."""
        if embedded_guidance is not None and not self.family.has_embedded_guidance:
            raise NoiseSearchError(
                f"--embedded-guidance: {self.name} has no guidance embedding (only guidance-distilled FLUX.1-dev has); "
                "use --guidance for classifier-free guidance"
            )
        self.embedded_guidance = None
        if self.family.has_embedded_guidance:
            self.embedded_guidance = float(3.5 if embedded_guidance is None else embedded_guidance)
        if self.family.distilled:
            warnings.warn(
                f"{self.name} is timestep-distilled (no guidance embedding, e.g. FLUX.1-schnell): its x0 estimates are "
                "not posterior means, so rewards of intermediate estimates are less informative",
                stacklevel=3,
            )

    def _init_size(self, height: int | None, width: int | None) -> None:
        """Image size (default: the pipeline's) and the unpacked latent ``sample_shape``."""
        fam = self.family
        f = fam.vae_scale_factor
        self.height, self.width = check_image_size(
            height, width, fam.default_size(), fam.multiple, type(self.pipe).__name__, max_px=fam.max_size()
        )
        self.sample_shape = (fam.latent_channels(), self.height // f, self.width // f)

    def _init_wrapper(self) -> None:
        """The flow wrapper, its ``t`` range covering the pipeline's default schedule."""
        self._sigmas_cache: dict[int, torch.Tensor] = {}
        sig = self.schedule_sigmas(self.default_steps)
        finite = sig[torch.isfinite(sig) & (sig > 0)]
        t_max = 0.999 if len(finite) == 0 else max(0.999, float(flow_sigma_to_t(finite.max())))
        t_min = min(1e-3, float(flow_sigma_to_t(finite.min()))) if len(finite) else 1e-3
        self.wrapper = FlowDenoiser(self._velocity, timestep_scale=1.0, t_min=t_min, t_max=min(t_max, 1 - 1e-6))
        self.sigma_min = self.wrapper.sigma_min
        self.sigma_max = self.wrapper.sigma_max  # Karras schedules stop here; the default schedule starts at inf

    def _init_negtome(self, negtome) -> None:
        self.negtome = None
        self._attn_kwargs = None
        if negtome is not None:
            if self.family.family != "flux":
                raise NoiseSearchError("--negtome is implemented for FLUX pipelines")
            self.negtome = install_negtome(self.transformer, negtome)

    # ---- guidance --------------------------------------------------------------------------------
    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, transformer=None) -> torch.Tensor:
        """Guided velocity ``eps - x0`` at flow time ``t`` [B]; all branches in one network call."""
        fam = self.family
        transformer = transformer if transformer is not None else self.transformer
        branches = self.branches
        n = len(branches)
        parts = [cond[b] for b in branches]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        x_in = torch.cat([x_t] * n).to(self.model_dtype)
        t_net = fam.network_time(torch.cat([t] * n).to(x_t.device, torch.float32))
        if self.negtome is not None:  # time window and groups (rows of one prompt and branch)
            self.negtome.set_time(float(t.reshape(-1)[0]))
            key = batch["pooled"] if "pooled" in batch else batch["embeds"].flatten(1)
            self.negtome.groups = torch.unique(key.float(), dim=0, return_inverse=True)[1]
        out = fam.network(transformer, x_in, t_net, batch, self.embedded_guidance, self._attn_kwargs)
        out = out.float() * fam.velocity_sign
        if n == 1:
            return out
        v_uncond, v_cond = out.chunk(2)
        return fam.combine(v_uncond, v_cond, self.guidance)

    # ---- Denoiser protocol (call and decode: PipelineDenoiser; x may be at sigma = inf) -----------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict:
        """Prompt embeddings, one row per prompt; each distinct prompt is encoded once."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise NoiseSearchError("no prompts to encode")
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts])
        self._text_encoders_to(self.device)
        t0 = time.perf_counter()
        negative = [self.negative_prompt] * len(unique) if self.negative_prompt is not None else None
        both = self.family.encode_branches(unique, negative, need_uncond="uncond" in self.branches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.encode_stats["seconds"] += time.perf_counter() - t0
        self.encode_stats["prompts"] += len(unique)
        if self.offload_text_encoders and self.device.type == "cuda" and not self.offloaded:
            self._text_encoders_to(torch.device("cpu"))
            torch.cuda.empty_cache()
        cond = {
            b: {k: v.to(self.device, self.model_dtype if v.is_floating_point() else v.dtype)[index.to(v.device)] for k, v in both[b].items()}
            for b in self.branches
        }
        self._meta_cond = to_meta({b: {k: v[:1] for k, v in c.items()} for b, c in cond.items()})  # shapes for FLOP counts
        return cond

    def _text_encoders_to(self, device: torch.device) -> None:
        if self.offloaded:
            return  # accelerate's hooks move them
        for enc in self.family.text_encoders():
            if enc.device != device:
                enc.to(device)

    def encode_cost(self) -> dict:
        """Prompt-encoding cost: FLOPs per prompt (counted once) and measured seconds per prompt.

        Equal for every strategy (each distinct prompt is encoded once per search), so reported, not charged."""
        if self._encode_flops is None:
            self._encode_flops = self._count_encode_flops()
        n = max(1, self.encode_stats["prompts"])
        return {
            "flops_per_prompt": float(self._encode_flops),
            "seconds_per_prompt": self.encode_stats["seconds"] / n if self.encode_stats["prompts"] else None,
            "prompts_encoded": self.encode_stats["prompts"],
        }

    def _count_encode_flops(self) -> float:
        """Text-encoder FLOPs of one prompt (both branches under CFG), on ``meta`` copies of the encoders
        (nothing moves to the GPU); where an encoder cannot run on ``meta``, on the real ones."""
        fam, pipe = self.family, self.pipe
        names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
        saved = {n: getattr(pipe, n) for n in names}
        n_branches = 2 if "uncond" in self.branches else 1
        try:
            for n in names:
                setattr(pipe, n, meta_copy(saved[n]))
            return n_branches * count_flops(lambda: fam.encode_branches(["a"], None, need_uncond=False, device=torch.device("meta")))
        except (NotImplementedError, RuntimeError):
            pass
        finally:
            for n in names:
                setattr(pipe, n, saved[n])
        was = [e.device for e in fam.text_encoders()]
        self._text_encoders_to(self.device)
        try:
            return n_branches * count_flops(lambda: fam.encode_branches(["a"], None, need_uncond=False))
        finally:
            for e, d in zip(fam.text_encoders(), was):
                e.to(d)

    # ---- costs -----------------------------------------------------------------------------------
    @property
    def flops_per_call(self) -> float:
        """Transformer FLOPs of one evaluation of one sample, all CFG branches (counted on ``meta``)."""
        if self._flops_per_call is None:
            cond = self._meta_cond if self._meta_cond is not None else to_meta(self.encode([""]))  # no re-encoding
            meta_tr = meta_copy(self.transformer)
            x = torch.zeros((1, *self.sample_shape), device="meta")
            t = torch.full((1,), 0.5, device="meta")
            negtome, self.negtome = self.negtome, None
            try:
                self._flops_per_call = count_flops(lambda: self._velocity(x, t, cond, transformer=meta_tr))
            except (NotImplementedError, RuntimeError):  # data-dependent code (Lumina2 reads its mask): run it
                real = self.encode([""])
                xr = torch.zeros((1, *self.sample_shape), device=self.device)
                tr = torch.full((1,), 0.5, device=self.device)
                self._flops_per_call = count_flops(lambda: self._velocity(xr, tr, real))
            finally:
                self.negtome = negtome
        return self._flops_per_call

    # ---- the pipeline's own schedule -------------------------------------------------------------
    def pipeline_flow_times(self, steps: int | None = None) -> torch.Tensor:
        """The flow times t the pipeline visits in ``steps`` steps (scheduler.sigmas: 1 ... 0), float64."""
        steps = int(steps or self.default_steps)
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(steps, device="cpu", **self.family.timesteps_kwargs(steps, self.sample_shape))
        t = torch.as_tensor(sched.sigmas).double().cpu()
        if t[-1] != 0:
            t = torch.cat([t, t.new_zeros(1)])
        return t

    def schedule_sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The pipeline's sigmas for ``steps`` steps (float64, from inf at t = 1 down to 0).

        The samplers' default schedule for this denoiser; pass to a sampler as ``sigmas=`` too."""
        steps = int(steps or self.default_steps)
        if steps < 1:
            raise NoiseSearchError("--steps must be at least 1")
        if steps not in self._sigmas_cache:
            t = self.pipeline_flow_times(steps)
            sig = torch.where(t >= 1, torch.full_like(t, math.inf), flow_t_to_sigma(t.clamp(max=1 - 1e-12)))
            self._sigmas_cache[steps] = sig
        return self._sigmas_cache[steps].clone()

    pipeline_sigmas = schedule_sigmas

    def __repr__(self) -> str:
        eg = f", embedded_guidance={self.embedded_guidance:g}" if self.embedded_guidance is not None else ""
        return (
            f"FlowPipelineDenoiser({self.name!r}, {type(self.pipe).__name__}, guidance={self.guidance:g}{eg}, "
            f"{self.height}x{self.width}, device={self.device}, dtype={self.model_dtype})"
        )


__all__ = ["FlowPipelineDenoiser", "FlowFamily", "FluxFamily", "SD3Family", "Lumina2Family", "FLOW_FAMILIES"]
