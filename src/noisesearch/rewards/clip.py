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
from noisesearch.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess, TextCache, count_flops, features

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class ClipImageTower(torch.nn.Module):
    """A ``CLIPModel``'s image side: vision transformer + projection, pixels -> (unnormalised) embeddings.

    The trainable ``module`` of the CLIP-family rewards (the text side stays out of it: its embeddings
    are cached per prompt and are never fine-tuned, so the cache cannot go stale)."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: torch.nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)


class ClipScore:
    """CLIP score reward (see module docstring); also PickScore and HPSv2 (``scale``, ``preprocess``).

    ``module`` (a :class:`ClipImageTower`) is what ``train-reward`` fine-tunes; ``__call__`` goes
    through ``self.module`` and is differentiable when called with gradients enabled. Scores are
    returned on the reward's device."""

    def __init__(self, model, tokenizer, device="cpu", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 name: str = "clip", batch_size: int = 32, preprocess: ImagePreprocess | None = None,
                 scale: float | None = None, max_scale: float | None = 100.0, max_length: int | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.name = name
        self.batch_size = batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)
        self.preprocess_fn = preprocess or ImagePreprocess(self.image_size, mean, std, name=name)
        self.mean = self.preprocess_fn.mean.to(self.device)
        self.std = self.preprocess_fn.std.to(self.device)
        if scale is None:
            s = model.logit_scale.detach().exp()
            scale = float(s.clamp(max=max_scale) if max_scale is not None else s)
        self.scale = float(scale)
        self.module = ClipImageTower(self.model.vision_model, self.model.visual_projection)
        self._text = TextCache(self._encode_text)
        self._flops_per_image: float | None = None
        self._flops_per_prompt: float | None = None

    # ---- preprocessing ---------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> normalised [B, 3, S, S] pixel values (S = image_size)."""
        return self.preprocess_fn(images, self.device)

    # ---- embeddings ------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] through ``self.module`` (differentiable under grad)."""
        outs = []
        for lo in range(0, images.shape[0], self.batch_size):
            outs.append(self.module(self.preprocess(images[lo : lo + self.batch_size])))
        return F.normalize(torch.cat(outs).float(), dim=-1)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        emb = features(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
        return F.normalize(emb.float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, D], cached per distinct prompt (computed without gradients)."""
        return self._text(list(prompts))

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B] scores of already preprocessed pixel values [B, 3, S, S]."""
        img = torch.cat([self.module(pixels[lo : lo + self.batch_size].to(self.device))
                         for lo in range(0, pixels.shape[0], self.batch_size)])
        return self.scale * (F.normalize(img.float(), dim=-1) * self.text_embeddings(list(prompts))).sum(-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B] scores ``scale * cos`` (float32, on the reward's device)."""
        if len(prompts) != images.shape[0]:
            raise NoiseSearchError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_embeddings(images)
        txt = self.text_embeddings(list(prompts))
        return self.scale * (img * txt).sum(-1)

    # ---- costs -----------------------------------------------------------------------------------
    @property
    def flops_per_image(self) -> float:
        """Vision tower + projection FLOPs for one image (text embeddings are cached, see module doc)."""
        if self._flops_per_image is None:
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            self._flops_per_image = count_flops(lambda: self.module(x))
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


def _is_hub_name(source: str) -> bool:
    return not source.startswith((".", "/", "~")) and source.count("/") == 1


def load_clip_folder(reward: str, source: str, processor_source: str | None = None, model_cls=None,
                     tokenizer: bool = True):
    """(model, tokenizer or None, mean, std) from a transformers CLIP folder or hub name.

    ``processor_source``: where the tokenizer and ``preprocessor_config.json`` live when not with the
    model (PickScore's hub model uses LAION's processor). ``model_cls``: ``CLIPModel`` by default."""
    try:
        from transformers import AutoTokenizer, CLIPModel

        from noisesearch.models.diffusers import quiet_library_notices

        quiet_library_notices()
    except ImportError as e:
        raise NoiseSearchError(f"the {reward} reward needs `pip install transformers` (or 'noisesearch[diffusers]')") from e
    model_cls = model_cls or CLIPModel
    local = os.path.isdir(source)
    if not local and not _is_hub_name(source):
        raise NoiseSearchError(
            f"{reward} reward: {source!r} is neither a local directory nor a hub name 'org/name'; "
            f"pass `{reward}@/path/to/dir` (a directory saved with CLIPModel.save_pretrained + its tokenizer)"
        )
    proc = processor_source or source
    try:
        model = model_cls.from_pretrained(source)
        tok = AutoTokenizer.from_pretrained(proc) if tokenizer else None
    except Exception as e:
        if local:
            raise NoiseSearchError(
                f"{reward} reward: cannot load a CLIP model{' and tokenizer' if tokenizer else ''} from {source}: "
                f"{type(e).__name__}: {e}"
            ) from e
        from noisesearch.rewards.preprocess import hub_error

        raise hub_error(reward, source, f"{reward}@/local/path", e) from e
    if os.path.isdir(proc):
        mean, std = _read_norm(proc)
    else:
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        try:  # the processor's own mean / std from the hub cache
            from huggingface_hub import hf_hub_download

            cfg_file = hf_hub_download(proc, "preprocessor_config.json")
            mean, std = _read_norm(os.path.dirname(cfg_file))
        except Exception:
            pass
    return model, tok, mean, std


def clip_reward(arg: str | None = None, device="cpu") -> ClipScore:
    """Factory for the ``clip`` / ``clip@ARG`` reward (ARG: a local directory or a hub name)."""
    source = arg or DEFAULT_CLIP
    try:
        model, tokenizer, mean, std = load_clip_folder("clip", source)
    except NoiseSearchError as e:
        if "Hugging Face hub" in str(e):
            raise NoiseSearchError(
                f"clip reward: cannot load {source!r} from the Hugging Face hub ({str(e).split('(', 1)[1].split(')')[0]}). "
                f"Download it where there is network (`huggingface-cli download {source} --local-dir DIR`) and pass "
                "`--reward clip@DIR`, i.e. `clip@/local/path`"
            ) from e
        raise
    name = "clip" if arg is None else f"clip@{arg}"
    return ClipScore(model, tokenizer, device=device, mean=mean, std=std, name=name)


__all__ = ["ClipScore", "ClipImageTower", "clip_reward", "DEFAULT_CLIP", "load_clip_folder"]
