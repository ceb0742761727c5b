"""The denoiser protocol every backend implements.

A denoiser maps a noisy sample ``x`` at noise level ``sigma`` (EDM / k-diffusion convention:
``x = x0 + sigma * eps``) and a condition to ``x0``, the Tweedie estimate E[x0 | x]. Latent models
add ``decode`` from x0 to images in [0, 1]; pixel models decode by rescaling.

Optional members, read with ``getattr`` and a default: ``conditional`` (default True; False for
models without a condition, whose ``encode`` only counts the samples, so prompts are optional),
``guidance``, ``family``, ``parametrisation`` and ``with_settings(guidance=None, device=None)``
(a denoiser with another guidance / device; ``models.load_model`` calls it on objects it is given).
``describe_denoiser`` collects what ran for reports.

``cond`` is whatever ``encode`` returns: a tensor or a (nested) dict / tuple of tensors whose first
dimension is the batch. ``cond_index`` / ``cond_repeat`` slice any of these shapes.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

Cond = Any  # tensor, or dict/tuple/list of tensors, batch first


@runtime_checkable
class Denoiser(Protocol):
    name: str
    sample_shape: tuple[int, ...]  # shape of one sample of x (latent shape for latent models)
    sigma_min: float
    sigma_max: float
    default_steps: int
    flops_per_call: float  # FLOPs of one network evaluation for one sample (all CFG branches)
    flops_per_decode: float  # FLOPs of decoding one x0 to an image (the VAE; 0 for pixel models),
    # paid with every reward call, since a reward scores the decoded estimate
    device: torch.device
    dtype: torch.dtype
    # optional (not required by isinstance): conditional: bool = True, guidance, family, parametrisation

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Condition for a batch of prompts; raise NoiseSearchError for prompts it does not know."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 estimate; ``sigma`` has shape [B]."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] from x0 estimates."""


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def describe_denoiser(d) -> dict:
    """What a denoiser object is and runs as, for reports: class, name, family, parametrisation,
    guidance, dtype (of the network where it differs from the states'), device and conditional.
    Works on any object (missing members are None)."""
    family = getattr(d, "family", None)
    if family is not None and not isinstance(family, str):  # an adapter object (models.flow)
        family = getattr(family, "family", type(family).__name__)
    param = getattr(d, "parametrisation", None) or getattr(d, "prediction_type", None)
    guidance = getattr(d, "guidance", None)
    device = getattr(d, "device", None)
    out = {
        "class": type(d).__name__,
        "name": getattr(d, "name", None),
        "family": family,
        "parametrisation": None if param is None else str(param),
        "guidance": None if guidance is None else float(guidance),
        "dtype": _dtype_name(getattr(d, "model_dtype", None) or getattr(d, "dtype", None)),
        "device": None if device is None else str(device),
        "conditional": bool(getattr(d, "conditional", True)),
    }
    pipe = getattr(d, "pipe", None)
    if pipe is not None:
        out["pipeline"] = type(pipe).__name__
    return out


def cond_index(cond: Cond, idx: torch.Tensor | slice) -> Cond:
    """Rows ``idx`` of a batched condition."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx.to(cond.device) if isinstance(idx, torch.Tensor) else idx]
    if isinstance(cond, dict):
        return {k: cond_index(v, idx) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(cond_index(v, idx) for v in cond)
    return cond  # scalars and other metadata are shared by every row


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate batched conditions along the batch dimension."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds), dim=0)
    if isinstance(first, dict):
        return {k: cond_cat([c[k] for c in conds]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(cond_cat([c[i] for c in conds]) for i in range(len(first)))
    return first


def cond_repeat(cond: Cond, n: int) -> Cond:
    """Each row repeated ``n`` times in place (row i -> rows i*n .. i*n+n-1)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.repeat_interleave(n, dim=0)
    if isinstance(cond, dict):
        return {k: cond_repeat(v, n) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(cond_repeat(v, n) for v in cond)
    return cond
