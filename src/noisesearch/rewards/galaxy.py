"""Rewards an astronomer would ask of galaxy images: ellipticity, size and concentration.

Measured with established astronomy libraries (``pip install 'noisesearch[galaxy]'``):

* **ellipticity** ``1 - b/a`` (b/a the axis ratio) and **size** (the Gaussian-weighted radius
  ``sigma = det(M)^(1/4)`` in pixels) from GalSim's adaptive moments (``galsim.hsm.FindAdaptiveMom``,
  Bernstein & Jarvis 2002; Hirata & Seljak 2003);
* **concentration** ``C = 5 log10(r80 / r20)`` (Bershady et al. 2000; Conselice 2003), the radii
  holding 20 % and 80 % of the flux in circular apertures about the adaptive-moments centroid,
  from photutils' ``CurveOfGrowth``. A Gaussian has C = 2.14, an exponential disk about 2.7.

Images in [0, 1] go back to flux through the inverse of the galaxygrad decode's asinh stretch
(``models.galaxygrad.image_to_flux``; monotone, so any image works; colour images use their luma).
Specs: ``ellipticity`` (higher is more elongated), ``ellipticity@0.5`` (a target: ``-|e - 0.5|``),
likewise ``galaxy-size[@PIXELS]`` (relative to the target: ``-|size - T| / T``) and
``concentration[@C]``; distances to a target are capped at 1. A measurement that fails (no source,
HSM does not converge) scores the reward's worst value (0 without a target, -1 with one).
The rewards are not differentiable and cost no FLOPs in a budget (``flops_per_image = 0``), like
``compressibility``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.models.galaxygrad import image_to_flux

INSTALL_HINT = "install the galaxy rewards' libraries with `pip install 'noisesearch[galaxy]'` (galsim, photutils)"


def _import_galsim():
    try:
        import galsim  # deferred: an optional dependency (the galaxy rewards only)
    except ImportError:
        raise NoiseSearchError(f"galsim is not installed: {INSTALL_HINT}") from None
    return galsim


def _import_curve_of_growth():
    try:
        from photutils.profiles import CurveOfGrowth  # deferred: an optional dependency (concentration only)
    except ImportError:
        raise NoiseSearchError(f"photutils is not installed: {INSTALL_HINT}") from None
    return CurveOfGrowth


def to_flux_arrays(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] images in [0, 1] -> [B, H, W] float64 flux (luma for colour images)."""
    if images.ndim != 4:
        raise NoiseSearchError(f"galaxy rewards take images [B, C, H, W], got shape {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 3:
        images = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return image_to_flux(images[:, 0]).double().numpy()


def adaptive_moments(flux: np.ndarray):
    """GalSim's adaptive moments of one image, or None when they fail (no source, no convergence)."""
    galsim = _import_galsim()
    if not np.isfinite(flux).all() or flux.sum() <= 0:
        return None
    guess = max(1.0, min(flux.shape) / 8)
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(flux)), guess_sig=guess, strict=False)
    if res.moments_status != 0 or not res.moments_sigma > 0:
        return None
    return res


def measure_ellipticity(flux: np.ndarray) -> float | None:
    """``1 - b/a`` from the adaptive moments' shape (reduced shear g: b/a = (1 - |g|) / (1 + |g|))."""
    res = adaptive_moments(flux)
    if res is None:
        return None
    g = float(res.observed_shape.g)
    return 1.0 - (1.0 - g) / (1.0 + g)


def measure_size(flux: np.ndarray) -> float | None:
    """The adaptive moments' radius ``sigma = det(M)^(1/4)`` in pixels."""
    res = adaptive_moments(flux)
    return None if res is None else float(res.moments_sigma)


def measure_concentration(flux: np.ndarray) -> float | None:
    """``5 log10(r80 / r20)`` from the curve of growth about the adaptive-moments centroid, out to
    the largest circle inside the image."""
    res = adaptive_moments(flux)
    if res is None:
        return None
    curve_of_growth = _import_curve_of_growth()
    x, y = float(res.moments_centroid.x) - 1, float(res.moments_centroid.y) - 1  # GalSim is 1-based
    h, w = flux.shape
    r_max = min(x, y, w - 1 - x, h - 1 - y)
    if r_max < 2:
        return None
    cog = curve_of_growth(np.clip(flux, 0, None), (x, y), np.linspace(0.25, r_max, 32))
    if not cog.profile[-1] > 0:
        return None
    cog.normalize(method="max")
    r20, r80 = cog.calc_radius_at_ee(0.2), cog.calc_radius_at_ee(0.8)
    if not (np.isfinite(r20) and np.isfinite(r80) and r20 > 0):
        return None
    return 5.0 * math.log10(r80 / r20)


class GalaxyMeasure:
    """A galaxy measurement as a reward: the value itself (>= 0), or ``-min(|value - target|, 1)``
    (the distance divided by the target when ``relative``) when a target is given; a failed
    measurement scores the worst value (0, or -1 with a target)."""

    flops_per_image = 0.0

    def __init__(self, name: str, measure: Callable[[np.ndarray], float | None], arg: str | None, relative: bool = False,
                 bounds: tuple[float, float] = (0.0, math.inf), example: float = 3.0):
        self.measure, self.relative = measure, relative
        self.target = _parse_target(name, arg, bounds, example)
        self.name = name if self.target is None else f"{name}@{self.target:g}"
        self.worst = 0.0 if self.target is None else -1.0

    def value(self, flux: np.ndarray) -> float:
        v = self.measure(flux)
        if v is None or not math.isfinite(v):
            return self.worst
        if self.target is None:
            return v
        dist = abs(v - self.target) / (self.target if self.relative else 1.0)
        return -min(dist, 1.0)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return torch.tensor([self.value(f) for f in to_flux_arrays(images)], dtype=torch.float32)


def _parse_target(name: str, arg: str | None, bounds: tuple[float, float], example: float) -> float | None:
    if arg is None:
        return None
    try:
        target = float(arg)
    except ValueError:
        target = math.nan
    lo, hi = bounds
    if not (math.isfinite(target) and lo < target < hi):
        raise NoiseSearchError(f"reward {name}@{arg}: the target must be a number in ({lo:g}, {hi:g}), e.g. {name}@{example:g}")
    return target


def ellipticity_reward(arg: str | None = None, device="cpu") -> GalaxyMeasure:
    """``ellipticity`` (1 - b/a, higher is more elongated) or ``ellipticity@E`` (-|e - E|)."""
    _import_galsim()
    return GalaxyMeasure("ellipticity", measure_ellipticity, arg, bounds=(0.0, 1.0), example=0.5)


def size_reward(arg: str | None = None, device="cpu") -> GalaxyMeasure:
    """``galaxy-size`` (adaptive-moments radius in pixels) or ``galaxy-size@R`` (-|size - R| / R)."""
    _import_galsim()
    return GalaxyMeasure("galaxy-size", measure_size, arg, relative=True)


def concentration_reward(arg: str | None = None, device="cpu") -> GalaxyMeasure:
    """``concentration`` (5 log10(r80 / r20)) or ``concentration@C`` (-|C - C_target|)."""
    _import_galsim()
    _import_curve_of_growth()
    return GalaxyMeasure("concentration", measure_concentration, arg)


__all__ = [
    "GalaxyMeasure",
    "ellipticity_reward",
    "size_reward",
    "concentration_reward",
    "measure_ellipticity",
    "measure_size",
    "measure_concentration",
    "adaptive_moments",
    "to_flux_arrays",
]
