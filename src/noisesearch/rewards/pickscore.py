"""PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.

A plain transformers ``CLIPModel``: ``score = exp(logit_scale) * cos(image_embedding, text_embedding)``
as the official code computes it (``model.logit_scale.exp() * text_embs @ image_embs.T``; no cap).
Preprocessing is ``CLIPImageProcessor``'s (shorter side to 224, bicubic; centre crop with the
``(h - 224) // 2`` offset; the processor's mean / std), redone on the device (``rewards.preprocess``).

Reward spec ``pickscore`` (the hub model ``yuvalkirstain/PickScore_v1`` with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as the official example) or ``pickscore@DIR``: a
transformers CLIP folder with its processor files (tokenizer + ``preprocessor_config.json``).
"""
from __future__ import annotations

from noisesearch.rewards.clip import ClipScore, load_clip_folder
from noisesearch.rewards.preprocess import ImagePreprocess

HUB_MODEL = "yuvalkirstain/PickScore_v1"
HUB_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickscore_reward(arg: str | None = None, device="cpu") -> ClipScore:
    """Factory for ``pickscore`` (hub) / ``pickscore@DIR``."""
    source = arg or HUB_MODEL
    model, tokenizer, mean, std = load_clip_folder("pickscore", source, None if arg else HUB_PROCESSOR)
    size = int(model.config.vision_config.image_size)
    pre = ImagePreprocess(size, mean, std, mode="crop", crop_rounding="floor", name="pickscore")
    name = "pickscore" if arg is None else f"pickscore@{arg}"
    return ClipScore(model, tokenizer, device=device, name=name, preprocess=pre, max_scale=None)


__all__ = ["pickscore_reward", "HUB_MODEL", "HUB_PROCESSOR"]
