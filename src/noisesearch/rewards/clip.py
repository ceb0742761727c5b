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

import contextlib
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.io import describe_load_error
from noisesearch.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    TextCache,
    check_params,
    check_sizes,
    check_tensors,
    check_tokenizer,
    check_towers,
    features,
    freeze,
    hub_error,
    load_error,
    read_json,
    shapes,
)

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

    ``module`` (a :class:`ClipImageTower`) is what ``train-reward`` fine-tunes. The model is loaded
    for scoring, with gradients off (no autograd graph is built); after ``module.requires_grad_(True)``
    (as ``train-reward`` does) ``__call__``, which goes through ``self.module``, is differentiable
    with respect to its weights. Scores are returned on the reward's device."""

    def __init__(self, model, tokenizer, device="cpu", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 name: str = "clip", batch_size: int = 32, preprocess: ImagePreprocess | None = None,
                 scale: float | None = None, max_scale: float | None = 100.0, max_length: int | None = None):
        self.model = freeze(model.to(device))  # scoring builds no autograd graph; requires_grad_(True) to fine-tune
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


def _read_norm(reward: str, path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from ``preprocessor_config.json`` if present (three numbers each, std > 0),
    else OpenAI's."""
    cfg_path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(cfg_path):
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    cfg = read_json(cfg_path, reward, "preprocessor config")
    out = []
    for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        v = cfg.get(key, default)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v] * 3
        ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok or (key == "image_std" and min(v) <= 0):
            raise NoiseSearchError(f"{reward} reward: {cfg_path}: {key} must be three finite numbers"
                                   f"{' > 0' if key == 'image_std' else ''}, got {v!r}")
        out.append(tuple(float(x) for x in v))
    return out[0], out[1]


def _is_hub_name(source: str) -> bool:
    return not source.startswith((".", "/", "~")) and source.count("/") == 1


@contextlib.contextmanager
def quiet_transformers():
    """No loading reports or progress bars from transformers while a reward loads (its findings are
    checked here and become one-line errors)."""
    from transformers.utils import logging as hf_logging  # deferred: optional heavy dependency (transformers)

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_clip_config(reward: str, folder: str) -> dict:
    """The sizes in ``folder/config.json`` in range (before anything is built); its contents."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise NoiseSearchError(f"{reward} reward: {folder} has no config.json (a folder saved with CLIPModel.save_pretrained)")
    cfg = read_json(path, reward)
    sections = [k for k in ("text_config", "vision_config") if k in cfg] or [None]
    for sec in sections:
        check_sizes(reward, path, cfg if sec is None else cfg[sec], prefix="" if sec is None else f"{sec}.",
                    heads=("hidden_size", "num_attention_heads"), patch=("image_size", "patch_size"))
    check_sizes(reward, path, {k: cfg[k] for k in ("projection_dim",) if k in cfg})
    towers = [cfg if sec is None else cfg[sec] for sec in sections]
    check_towers(reward, path, [(int(c.get("num_hidden_layers", 12)), int(c.get("hidden_size", 768)),
                                 int(c.get("intermediate_size", 3072))) for c in towers])
    return cfg


def safetensors_shapes(folder: str) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """(file name, {tensor: shape}) of the folder's safetensors weights (one file or shards), read
    from their headers only; None when the folder holds none."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, "weights", "index").get("weight_map", {})
        files, name = sorted(set(weight_map.values())), index
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files, name = ["model.safetensors"], os.path.join(folder, "model.safetensors")
    else:
        return None
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(os.path.join(folder, f), framework="pt") as st:
                for k in st.keys():
                    found[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            raise NoiseSearchError(f"cannot read the weights {os.path.join(folder, f)}: {describe_load_error(e)}") from None
    return name, found


def _text_side(key: str) -> bool:
    return key.startswith(("text_model.", "text_projection.")) or key == "logit_scale"


def check_clip_weights(reward: str, folder: str, model_cls, config) -> None:
    """The model ``config`` describes (built on the meta device: no memory) against the tensors in the
    folder's weights: same names, same shapes, nothing left over; its size within this machine."""
    with torch.device("meta"):
        try:
            meta = model_cls(config)
        except Exception as e:  # a config transformers accepts but cannot build
            raise NoiseSearchError(f"{reward} reward: {folder}/config.json does not build a model: "
                                   f"{describe_load_error(e)}") from None
    check_params(reward, f"{folder}/config.json", meta)
    weights = safetensors_shapes(folder)
    if weights is None:
        return  # a pytorch_model.bin: checked by transformers' loading report (check_loading_info)
    vision_only = not hasattr(meta, "text_model")
    check_tensors(reward, weights[0], shapes(meta.state_dict()), weights[1], ignore_missing=lambda k: k.endswith("position_ids"),
                  ignore_unexpected=lambda k: k.endswith("position_ids") or (vision_only and _text_side(k)),
                  config=f"{folder}/config.json")


def check_loading_info(reward: str, source: str, info: dict, vision_only: bool = False) -> None:
    """transformers' loading report (``output_loading_info=True``) as a one-line error if anything
    is missing, unexpected or mis-shaped (position ids and, for an image tower, the text side excepted)."""
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    unexpected = [k for k in info.get("unexpected_keys", ())
                  if not k.endswith("position_ids") and not (vision_only and _text_side(k))]
    shaped = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", ())]
    errors = [str(e).splitlines()[0] for e in info.get("error_msgs", ()) if str(e).strip()]
    if missing or unexpected or shaped or errors:
        parts = [f"{len(v)} {what} ({', '.join(sorted(v)[:3])}{' ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped),
                                 ("errors", errors)) if v]
        raise NoiseSearchError(f"{reward} reward: the weights of {source} do not match its config: {'; '.join(parts)}")


def _tokenizer_files(reward: str, folder: str) -> None:
    have = set(os.listdir(folder))
    if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
        raise NoiseSearchError(f"{reward} reward: {folder} lacks the tokenizer files (vocab.json and merges.txt, or "
                               "tokenizer.json): save the tokenizer with the model (tokenizer.save_pretrained)")


def load_tokenizer(reward: str, source: str, text_config):
    """The CLIP tokenizer of ``source``, present (local folders) and fitting the text tower."""
    from transformers import AutoTokenizer  # deferred: optional heavy dependency (transformers)

    if os.path.isdir(source):
        _tokenizer_files(reward, source)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        if os.path.isdir(source):
            raise load_error(reward, f"the tokenizer in {source}", e) from None

        raise hub_error(reward, source, f"{reward}@/local/path", e) from e
    check_tokenizer(reward, source, tok, text_config.vocab_size, getattr(text_config, "eos_token_id", None))
    return tok


def _load_model(reward: str, source: str, model_cls, local: bool):
    """``model_cls.from_pretrained(source)``, strict: a local folder is checked against its config
    before anything is built; transformers' loading report must be clean."""
    config_cls = model_cls.config_class
    if local:
        check_clip_config(reward, source)
    try:
        with quiet_transformers():
            config = config_cls.from_pretrained(source)
    except Exception as e:
        if local:
            raise NoiseSearchError(f"{reward} reward: {source}/config.json: {describe_load_error(e)}") from None

        raise hub_error(reward, source, f"{reward}@/local/path", e) from e
    if local:
        check_clip_weights(reward, source, model_cls, config)
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(source, config=config, output_loading_info=True)
    except Exception as e:
        if "mismatched" in str(e):  # transformers' "look at the above report!" for tensors of another shape
            raise NoiseSearchError(f"{reward} reward: the weights of {source} do not match its config "
                                   "(tensors of another shape); use the config the weights were saved with") from None
        if local:
            raise load_error(reward, source, e) from None

        raise hub_error(reward, source, f"{reward}@/local/path", e) from e
    check_loading_info(reward, source, info, vision_only=not hasattr(model, "text_model"))
    return model, config


def load_clip_folder(reward: str, source: str, processor_source: str | None = None, model_cls=None,
                     tokenizer: bool = True):
    """(model, tokenizer or None, mean, std) from a transformers CLIP folder or hub name, loaded
    strictly: config sizes checked before anything is built, weights that match the config exactly
    (names and shapes; nothing random, nothing dropped), tokenizer files present and fitting the text
    tower, a plausible preprocessor config. The model comes with gradients off (``freeze``).

    ``processor_source``: where the tokenizer and ``preprocessor_config.json`` live when not with the
    model (PickScore's hub model uses LAION's processor). ``model_cls``: ``CLIPModel`` by default."""
    try:
        from transformers import CLIPModel  # deferred: optional heavy dependency (transformers)
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
    model, config = _load_model(reward, source, model_cls, local)
    tok = load_tokenizer(reward, proc, config.text_config) if tokenizer else None
    return freeze(model), tok, *_processor_norm(reward, proc)


def _processor_norm(reward: str, proc: str) -> tuple[tuple, tuple]:
    if os.path.isdir(proc):
        return _read_norm(reward, proc)
    try:  # the processor's own mean / std from the hub cache
        from huggingface_hub import hf_hub_download  # deferred: optional dependency (huggingface_hub, comes with diffusers)

        cfg_file = hf_hub_download(proc, "preprocessor_config.json")
    except Exception:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return _read_norm(reward, os.path.dirname(cfg_file))


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


__all__ = ["ClipScore", "ClipImageTower", "clip_reward", "DEFAULT_CLIP", "load_clip_folder", "check_clip_config",
           "check_clip_weights", "check_loading_info", "load_tokenizer", "quiet_transformers", "safetensors_shapes"]
