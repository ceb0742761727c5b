"""Denoiser backends, all exposing D(x, sigma, cond) -> x0 (see ``models.base``)."""
from __future__ import annotations

import os

from noisesearch.errors import NoiseSearchError, unknown_name
from noisesearch.models.base import Cond, Denoiser, cond_cat, cond_index, cond_repeat

BUILTIN_MODELS = {"digits": "the built-in 8x8 digits diffusion model (class-conditional, shipped weights)"}


def load_model(name: str, device: str = "cpu", guidance: float = 1.0, **kw) -> Denoiser:
    """A denoiser by name: ``digits``, a diffusers pipeline directory, or a hub name ``org/model``.

    ``guidance``: 0 = unconditional, 1 = conditional, > 1 classifier-free guidance.
    """
    if name == "digits":
        from noisesearch.models.digits import DigitsDenoiser

        extra = sorted(set(kw) - {"weights"})
        if extra:
            raise NoiseSearchError(
                f"the digits model takes no option {', '.join(extra)} (8x8 images, float32); "
                "height, width, dtype and negative prompts apply to diffusers pipelines"
            )
        return DigitsDenoiser(guidance=guidance, device=device, **kw)
    if os.path.isdir(name) or (name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))):
        from noisesearch.models.diffusers import load_diffusers

        return load_diffusers(name, device=device, guidance=guidance, **kw)
    raise unknown_name("model", name, list(BUILTIN_MODELS) + ["<diffusers pipeline directory>", "<hub org/name>"])


__all__ = ["Denoiser", "Cond", "cond_index", "cond_cat", "cond_repeat", "load_model", "BUILTIN_MODELS"]
