"""CLIP score: how well an image matches its prompt, by a transformers ``CLIPModel``.

``score = s * cos(image_embedding, text_embedding)`` with ``s = exp(logit_scale)`` (the model's
own temperature, capped at 100 as in CLIP training; it is 100 for OpenAI's CLIP models, so the
score is the usual "100 * cosine" CLIP score).

Reward spec: ``clip`` (OpenAI ``openai/clip-vit-base-patch32`` from the Hugging Face hub or its
local cache) or ``clip@ARG`` where ARG is a local directory saved with ``save_pretrained`` (model,
tokenizer, optionally ``preprocessor_config.json``) or another hub name.

Preprocessing is done with torch ops on the [0, 1] image batch (no PIL / torchvision round trip):
grayscale is repeated to 3 channels, the shorter side is resized (bicubic, antialiased) to the
model's ``image_size``, the centre square is cropped, and CLIP's mean / std normalisation applied
(from ``preprocessor_config.json`` when present, else OpenAI's constants).

Cost: ``flops_per_image`` is the vision tower + projection for one image, measured once with
``FlopCounterMode``. Text embeddings are computed once per distinct prompt and cached, so their cost
is amortised over all the images scored for a prompt and *not* included; ``flops_per_prompt``
reports it.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class ClipScore:
    """CLIP score reward (see module docstring)."""

    def __init__(self, model, tokenizer, device="cpu", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 name: str = "clip", batch_size: int = 32):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.name = name
        self.batch_size = batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
        self._text_cache: dict[str, torch.Tensor] = {}
        self._flops_per_image: float | None = None
        self._flops_per_prompt: float | None = None

    # ---- preprocessing ---------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> normalised [B, 3, S, S] pixel values (S = image_size)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise NoiseSearchError(f"CLIP reward needs images [B, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[:, :, top : top + s, left : left + s]
        return (x - self.mean) / self.std

    # ---- embeddings ------------------------------------------------------------------------------
    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D]."""
        outs = []
        for lo in range(0, images.shape[0], self.batch_size):
            pixels = self.preprocess(images[lo : lo + self.batch_size])
            outs.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return F.normalize(torch.cat(outs).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, D], cached per distinct prompt."""
        new = sorted({p for p in prompts if p not in self._text_cache})
        if new:
            tokens = self.tokenizer(
                new, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            emb = _features(self.model.get_text_features(**tokens))
            for p, e in zip(new, F.normalize(emb.float(), dim=-1)):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B] CLIP scores (float32, on the CPU)."""
        if len(prompts) != images.shape[0]:
            raise NoiseSearchError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_embeddings(images)
        txt = self.text_embeddings(list(prompts))
        return (self.scale * (img * txt).sum(-1)).cpu()

    # ---- costs -----------------------------------------------------------------------------------
    @property
    def flops_per_image(self) -> float:
        """Vision tower + projection FLOPs for one image (text embeddings are cached, see module doc)."""
        if self._flops_per_image is None:
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            self._flops_per_image = count_flops(lambda: self.model.get_image_features(pixel_values=x))
        return self._flops_per_image

    @property
    def flops_per_prompt(self) -> float:
        """Text tower FLOPs for one prompt at full length (paid once per distinct prompt)."""
        if self._flops_per_prompt is None:
            ids = torch.full((1, self.max_length), int(self.tokenizer.pad_token_id or 0), device=self.device)
            self._flops_per_prompt = count_flops(lambda: self.model.get_text_features(input_ids=ids))
        return self._flops_per_prompt


def _read_norm(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from ``preprocessor_config.json`` if present, else OpenAI's."""
    cfg_path = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        return tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD))
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def clip_reward(arg: str | None = None, device="cpu") -> ClipScore:
    """Factory for the ``clip`` / ``clip@ARG`` reward (ARG: a local directory or a hub name)."""
    try:
        from transformers import AutoTokenizer, CLIPModel

        from noisesearch.models.diffusers import quiet_library_notices

        quiet_library_notices()
    except ImportError as e:
        raise NoiseSearchError("the clip reward needs `pip install transformers` (or 'noisesearch[diffusers]')") from e

    source = arg or DEFAULT_CLIP
    local = os.path.isdir(source)
    if not local and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise NoiseSearchError(
            f"clip reward: {source!r} is neither a local directory nor a hub name 'org/name'; "
            "pass `clip@/path/to/clip` (a directory saved with CLIPModel.save_pretrained + its tokenizer)"
        )
    try:
        model = CLIPModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        if local:
            raise NoiseSearchError(
                f"clip reward: cannot load a CLIP model and tokenizer from {source}: {type(e).__name__}: {e}"
            ) from e
        from huggingface_hub import constants

        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub is unreachable or the name is wrong"
        raise NoiseSearchError(
            f"clip reward: cannot load {source!r} from the Hugging Face hub ({why}). Download it where there is network "
            f"(`huggingface-cli download {source} --local-dir DIR`) and pass `--reward clip@DIR`, i.e. `clip@/local/path`"
        ) from e
    mean, std = _read_norm(source) if local else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    name = "clip" if arg is None else f"clip@{arg}"
    return ClipScore(model, tokenizer, device=device, mean=mean, std=std, name=name)


__all__ = ["ClipScore", "clip_reward", "DEFAULT_CLIP"]
