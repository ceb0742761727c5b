"""Shared pieces of the CLIP-family rewards (clip, pickscore, hps, imagereward, aesthetic).

* :class:`ImagePreprocess`: the official image preprocessing redone with torch ops on the device,
  batched and differentiable (the decoder's [0, 1] images never go through PIL):

  - ``mode="crop"`` (CLIP, PickScore, BLIP / ImageReward, the aesthetic predictor): the shorter side
    is resized to ``size`` (the longer one to ``int(size * long / short)``, as torchvision's
    ``Resize(size)`` and ``CLIPImageProcessor`` compute it), bicubic with antialiasing (torch's
    antialiased bicubic is PIL's filter, a = -0.5) in PIL's two passes (width, then height, clipped
    to [0, 1] in between), then the centre ``size x size`` square is cut:
    top / left offset ``(h - size) // 2`` (``crop_rounding="floor"``, ``CLIPImageProcessor``) or
    ``round((h - size) / 2)`` (``"round"``, torchvision's ``CenterCrop``).
  - ``mode="pad"`` (HPSv2's ``ResizeMaxSize``): the longer side is resized to ``size`` (the other to
    ``round(dim * size / long)``), then zeros are padded around it (``pad // 2`` left / top, the rest
    right / bottom) to a square, before normalisation.

  Both then subtract ``mean`` and divide by ``std``. Grayscale is repeated to three channels. An
  image that already has the model's size is only normalised (exactly the official path on it).
  Against the official PIL path (images rounded to 8 bits, resized by PIL) the pixels agree within a
  few grey levels (tests/test_preference_rewards.py checks <= 4/255 against ``CLIPImageProcessor``).

* :class:`TextCache`: per-prompt results of a text computation (embeddings, token ids), computed in
  ``no_grad`` once per distinct prompt.

FLOPs are counted by :func:`noisesearch.flops.count_flops` (re-exported here for the rewards).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops  # noqa: F401 (re-export)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePreprocess:
    """[B, 1 or 3, H, W] in [0, 1] -> normalised [B, 3, size, size] (see the module docstring)."""

    def __init__(self, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, mode: str = "crop",
                 crop_rounding: str = "floor", clamp: bool = True, name: str = "reward"):
        if mode not in ("crop", "pad") or crop_rounding not in ("floor", "round"):
            raise ValueError(f"bad preprocessing mode {mode!r} / crop rounding {crop_rounding!r}")
        self.size, self.mode, self.crop_rounding, self.name = int(size), mode, crop_rounding, name
        self.clamp = clamp  # clamp the resized image to [0, 1] (PIL does, on 8 bits; HPSv2 resizes a float tensor: no)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, device=None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise NoiseSearchError(f"{self.name} reward needs images [B, 1 or 3, H, W], got {tuple(images.shape)}")
        device = images.device if device is None else torch.device(device)
        x = images.to(device, torch.float32).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = self._resize_crop(x) if self.mode == "crop" else self._resize_pad(x)
        return (x - self.mean.to(device)) / self.std.to(device)

    def _resize(self, x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        if (nh, nw) == tuple(x.shape[-2:]):
            return x
        if not self.clamp:  # one pass, as torchvision resizes a float tensor
            return F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        # PIL resizes an 8-bit image in two passes, width then height, clipping in between: so here
        # (without the rounding), which keeps the overshoot of upsampling where PIL has it
        if nw != x.shape[-1]:
            x = F.interpolate(x, size=(x.shape[-2], nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if nh != x.shape[-2]:
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return x

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = x.shape[-2:]
        if h <= w:
            nh, nw = s, int(s * w / h)
        else:
            nh, nw = int(s * h / w), s
        x = self._resize(x, nh, nw)
        if self.crop_rounding == "floor":
            top, left = (nh - s) // 2, (nw - s) // 2
        else:
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        if nh < s or nw < s:  # cannot happen with the sizes above; kept for safety
            raise NoiseSearchError(f"{self.name}: resized image {nh}x{nw} smaller than {s}")
        return x[:, :, top:top + s, left:left + s]

    def _resize_pad(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = x.shape[-2:]
        scale = s / float(max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        x = self._resize(x, nh, nw)
        ph, pw = s - nh, s - nw
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        return x


class TextCache:
    """Per-prompt values of ``fn(list_of_new_prompts) -> [n, ...]`` (computed in no_grad, once)."""

    def __init__(self, fn: Callable[[list[str]], torch.Tensor]):
        self.fn = fn
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            with torch.no_grad():
                values = self.fn(new)
            for p, v in zip(new, values):
                self._cache[p] = v.detach()
        return torch.stack([self._cache[p] for p in prompts])

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)


def features(out) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def hub_error(reward: str, source: str, example: str, exc: Exception) -> NoiseSearchError:
    """The error for a hub name that could not be loaded (offline, or no such repository)."""
    try:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
    except ImportError:  # pragma: no cover
        offline = False
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable or the name is wrong"
    return NoiseSearchError(
        f"{reward} reward: cannot load {source!r} from the Hugging Face hub ({why}): {type(exc).__name__}. "
        f"Download the files where there is network and pass a local folder, e.g. `{example}` (see docs/rewards.md)"
    )


__all__ = ["ImagePreprocess", "TextCache", "count_flops", "features", "hub_error", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
