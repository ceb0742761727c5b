"""Denoiser backends, all exposing D(x, sigma, cond) -> x0 (see ``models.base``).

* ``base``: the ``Denoiser`` protocol, ``describe_denoiser`` and the condition helpers;
* ``load``: ``load_model`` (names, folders, hub names, ``galaxygrad:<name>``, pipeline objects,
  denoiser objects) and the diffusers pipeline loader;
* ``strict``: strict loading (weights, configs and tokenizers must match);
* ``pipeline``: what every diffusers-pipeline denoiser shares (``PipelineDenoiser``);
* ``sd``: Stable Diffusion 1.x / 2.x and SDXL; ``flow``: FLUX, SD3 / 3.5, Lumina2;
  ``unconditional``: DDPM / DDIM; ``negtome``: NegToMe for FLUX;
* ``wrappers``: networks of any parametrisation as denoisers; ``galaxygrad``: the galaxy models;
* ``digits``: the built-in digits model; ``toy``: an exact toy denoiser for tests.
"""
from __future__ import annotations

from noisesearch.models.base import Cond, Denoiser, cond_cat, cond_index, cond_repeat, describe_denoiser
from noisesearch.models.load import BUILTIN_MODELS, SUPPORTED_PIPELINES, load_model

__all__ = [
    "Denoiser",
    "Cond",
    "cond_index",
    "cond_cat",
    "cond_repeat",
    "describe_denoiser",
    "load_model",
    "BUILTIN_MODELS",
    "SUPPORTED_PIPELINES",
]
