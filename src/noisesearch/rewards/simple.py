"""Rewards that need no model: brightness and JPEG compressibility (as in Ramesh & Mardani)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from noisesearch.errors import NoiseSearchError


class Brightness:
    """Mean pixel intensity in [0, 1] (luma for colour images)."""

    name = "brightness"

    def __init__(self, arg=None, device="cpu"):
        if arg is not None:
            raise NoiseSearchError("reward 'brightness' takes no argument")
        self.flops_per_image = 0.0  # set per image size at call time; negligible

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        images = images.clamp(0, 1)
        if images.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
            images = (images * w.view(1, 3, 1, 1)).sum(1, keepdim=True)
        return images.flatten(1).mean(1)


class Compressibility:
    """Negative JPEG size relative to the raw image size: -(jpeg bytes) / (H * W * C).

    Higher is more compressible. ``quality`` is the JPEG quality (default 95, as in the paper's
    JPEG-compressibility reward); images smaller than 32 px are upscaled (nearest) first so that
    JPEG blocks see structure.
    """

    name = "compressibility"

    def __init__(self, arg=None, device="cpu"):
        self.quality = int(arg) if arg else 95
        self.flops_per_image = 0.0

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = []
        for im in arr:
            c, h, w = im.shape
            pic = Image.fromarray(im[0] if c == 1 else np.transpose(im, (1, 2, 0)))
            if min(h, w) < 32:
                f = -(-32 // min(h, w))
                pic = pic.resize((w * f, h * f), Image.NEAREST)
            buf = io.BytesIO()
            pic.save(buf, format="JPEG", quality=self.quality)
            raw = pic.size[0] * pic.size[1] * c
            out.append(-buf.tell() / raw)
        return torch.tensor(out, dtype=torch.float32)
