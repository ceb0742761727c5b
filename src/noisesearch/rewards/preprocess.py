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

* strict loading (nothing loads "mostly"): :func:`check_sizes` checks a config's sizes in range
  before anything is built from it, :func:`check_tensors` compares the tensors a model expects with
  those a file holds (missing, unexpected, mis-shaped: one line naming the file and the first few),
  :func:`check_tokenizer` checks that a tokenizer fits its text tower, :func:`read_json` reads a
  config within bounds, :func:`freeze` turns gradients off for scoring.

FLOPs are counted by :func:`noisesearch.flops.count_flops`.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from noisesearch.errors import NoiseSearchError
from noisesearch.io import describe_load_error, read_text_limited
from noisesearch.models.strict import differences
from noisesearch.validate import check_memory

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
        from huggingface_hub import constants  # deferred: optional dependency (huggingface_hub, comes with diffusers)

        offline = constants.HF_HUB_OFFLINE
    except ImportError:  # pragma: no cover
        offline = False
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable or the name is wrong"
    return NoiseSearchError(
        f"{reward} reward: cannot load {source!r} from the Hugging Face hub ({why}): {type(exc).__name__}. "
        f"Download the files where there is network and pass a local folder, e.g. `{example}` (see docs/rewards.md)"
    )


# ---- strict loading -----------------------------------------------------------------------------------
# ranges that every real model of these families fits (ViT-bigG has 48 layers of width 1664; BERT-large
# 24 x 1024); a config outside them is refused before anything is built from it
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 16384), "width": (1, 16384), "intermediate_size": (1, 131072),
    "num_hidden_layers": (1, 512), "layers": (1, 512), "num_attention_heads": (1, 1024), "heads": (1, 1024),
    "head_width": (1, 16384), "image_size": (1, 8192), "patch_size": (1, 8192), "vocab_size": (2, 2_000_000),
    "max_position_embeddings": (1, 1_000_000), "context_length": (1, 1_000_000), "projection_dim": (1, 16384),
    "embed_dim": (1, 16384), "type_vocab_size": (1, 1024), "pad_token_id": (0, 2_000_000),
}
FLOAT_LIMITS: dict[str, tuple[float, float]] = {"mlp_ratio": (0.01, 64.0), "layer_norm_eps": (0.0, 1.0),
                                                "hidden_dropout_prob": (0.0, 1.0), "attention_probs_dropout_prob": (0.0, 1.0)}
MAX_PARAMS = 2e10  # parameters of one reward model (ViT-bigG is 2.5e9)


def read_json(path, reward: str, what: str = "config") -> dict:
    """A JSON object from ``path`` (bounded, UTF-8), or a one-line NoiseSearchError naming the file."""
    text = read_text_limited(path, f"{reward} reward: {what}", max_bytes=64 * 2**20)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise NoiseSearchError(f"{reward} reward: {what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NoiseSearchError(f"{reward} reward: {what} {path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _number(reward: str, where: str, key: str, value, whole: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (whole and value != int(value)):
        raise NoiseSearchError(f"{reward} reward: {where}: {key} = {value!r} is not a {'whole ' if whole else ''}number")
    return value


def check_sizes(reward: str, where: str, cfg: Mapping, required: Sequence[str] = (), prefix: str = "",
                heads: tuple[str, str] | None = None, patch: tuple[str, str] | None = None) -> None:
    """Check the sizes in ``cfg`` (a config section; ``where`` names its file) before anything is
    built: every key of :data:`SIZE_LIMITS` / :data:`FLOAT_LIMITS` present is a number in range,
    ``required`` keys are present, ``heads`` = (width key, heads key): the width divides into the
    heads; ``patch`` = (image key, patch key): the patch fits the image. One line naming the key."""
    if not isinstance(cfg, Mapping):
        raise NoiseSearchError(f"{reward} reward: {where}: {prefix.rstrip('.') or 'the config'} must be a mapping, "
                               f"not {type(cfg).__name__}")
    for key in required:
        if cfg.get(key) is None:
            raise NoiseSearchError(f"{reward} reward: {where} lacks {prefix}{key}")
    for key, (lo, hi) in SIZE_LIMITS.items():
        if cfg.get(key) is not None:
            v = _number(reward, where, prefix + key, cfg[key], whole=True)
            if not lo <= v <= hi:
                raise NoiseSearchError(f"{reward} reward: {where}: {prefix}{key} = {int(v)} is out of range {lo}..{hi:,}")
    for key, (lo, hi) in FLOAT_LIMITS.items():
        if cfg.get(key) is not None:
            v = _number(reward, where, prefix + key, cfg[key], whole=False)
            if not lo <= v <= hi:
                raise NoiseSearchError(f"{reward} reward: {where}: {prefix}{key} = {v} is out of range {lo:g}..{hi:g}")
    if heads and cfg.get(heads[0]) is not None and cfg.get(heads[1]) is not None and int(cfg[heads[0]]) % int(cfg[heads[1]]):
        raise NoiseSearchError(f"{reward} reward: {where}: {prefix}{heads[0]} = {int(cfg[heads[0]])} does not divide "
                               f"into {prefix}{heads[1]} = {int(cfg[heads[1]])}")
    if patch and cfg.get(patch[0]) is not None and cfg.get(patch[1]) is not None and int(cfg[patch[1]]) > int(cfg[patch[0]]):
        raise NoiseSearchError(f"{reward} reward: {where}: {prefix}{patch[1]} = {int(cfg[patch[1]])} is larger than "
                               f"{prefix}{patch[0]} = {int(cfg[patch[0]])}")


def check_tensors(reward: str, where: str, expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                  ignore_missing: Callable[[str], bool] = lambda k: False,
                  ignore_unexpected: Callable[[str], bool] = lambda k: False, config: str = "its config") -> None:
    """The tensor names and shapes a model ``expected`` (from its config) against those ``found`` in
    the weights file ``where``: any missing, unexpected or mis-shaped tensor is a one-line error
    naming the first few of each (``ignore_*`` are the tensors the format is known to omit / add)."""
    missing = [k for k in expected if k not in found and not ignore_missing(k)]
    unexpected = [k for k in found if k not in expected and not ignore_unexpected(k)]
    shaped = [k for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or shaped):
        return
    diff = differences(missing, unexpected, [(k, tuple(found[k]), tuple(expected[k])) for k in shaped])
    raise NoiseSearchError(f"{reward} reward: the weights {where} do not match {config}: {diff}; "
                           "use the config the weights were saved with")


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def check_towers(reward: str, where: str, towers: Sequence[tuple[int, int, float]]) -> None:
    """A first bound from the sizes alone, before even a meta-device build: transformer towers of
    (layers, width, mlp width) hold at least ``layers * (4 width^2 + 2 width mlp)`` weights."""
    n = sum(float(layers) * (4.0 * width * width + 2.0 * width * mlp) for layers, width, mlp in towers)
    if n > MAX_PARAMS:
        raise NoiseSearchError(f"{reward} reward: {where} describes a model of {n:.3g} parameters (at most {MAX_PARAMS:.0g}); "
                               "check its sizes")


def check_params(reward: str, where: str, model: torch.nn.Module) -> None:
    """Refuse a model (built on the meta device) with more than :data:`MAX_PARAMS` parameters or
    more than half of this machine's memory, before it is built for real."""
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise NoiseSearchError(f"{reward} reward: {where} describes a model of {n:.3g} parameters (at most {MAX_PARAMS:.0g}); "
                               "check its sizes")
    check_memory(4.0 * n, f"{reward} reward ({where})", "the sizes in its config")


def check_tokenizer(reward: str, where: str, tokenizer, vocab_size: int, eos_token_id: int | None = None) -> None:
    """A tokenizer the text tower can use: as many tokens as the tower's embeddings, up to the few
    rows a model may pad its embeddings with (64 + 1 %); more would index past them, far fewer is
    another tokenizer (a folder without its tokenizer files gives transformers' 2-token fallback, and
    every prompt the same ids); and the end-of-text token the tower pools at."""
    n, v = len(tokenizer), int(vocab_size)
    if not v - 64 - v // 100 <= n <= v:
        raise NoiseSearchError(f"{reward} reward: the tokenizer of {where} has {n} tokens but the text tower embeds "
                               f"{v}; give the tokenizer files saved with the model")
    if eos_token_id is not None and eos_token_id != 2 and tokenizer.eos_token_id != eos_token_id:
        # (transformers' CLIP pools at the argmax id when eos_token_id is the legacy 2)
        raise NoiseSearchError(f"{reward} reward: the tokenizer of {where} ends a prompt with token "
                               f"{tokenizer.eos_token_id}, the text tower pools at token {eos_token_id}")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and gradients off: a reward loaded for scoring builds no autograd graph. Call
    ``module.requires_grad_(True)`` to fine-tune it (``train-reward`` does)."""
    return module.eval().requires_grad_(False)


def load_error(reward: str, where: str, e: Exception) -> NoiseSearchError:
    """One line for an exception raised while loading ``where`` (never torch's advice to unpickle)."""
    return NoiseSearchError(f"{reward} reward: cannot load {where}: {describe_load_error(e)}")


__all__ = ["ImagePreprocess", "TextCache", "features", "hub_error", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
           "SIZE_LIMITS", "check_params", "check_sizes", "check_towers", "check_tensors", "check_tokenizer", "freeze", "load_error",
           "read_json", "shapes"]
