"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 + a BERT with cross-attention to the image in every
layer, and a linear head on the [CLS] output.

Rebuilt on ``transformers.BlipVisionModel`` + ``BlipTextModel`` (no image-reward / timm /
torchvision): the official ``ImageReward.pt`` is converted at load time by
:func:`imagereward_to_hf` (names only: BLIP's ``vit.py`` and ``med.py`` are the models transformers
ported). The score is the official ``ImageReward.score``:

    r = MLP(text_encoder(ids, encoder_hidden_states=visual_encoder(pixels))[:, 0])
    score = (r - 0.16717362830052426) / 1.0333394966054072

with the prompt tokenized by BERT's uncased WordPiece, padded / truncated to 35 tokens. The image is
preprocessed as the official ``_transform(224)`` (shorter side to 224 bicubic, torchvision
``CenterCrop`` offsets, CLIP mean / std), on the device.

Reward spec ``imagereward`` (hub ``THUDM/ImageReward`` + ``bert-base-uncased``'s vocab.txt) or
``imagereward@DIR`` with ``ImageReward.pt``, ``med_config.json``, the BERT ``vocab.txt`` (the official
tokenizer adds ``[DEC]`` as bos and ``[ENC]`` as an extra special token) and optionally
``vision_config.json`` (``image_size``, ``patch_size``, ``width``, ``layers``, ``heads``; the official
ViT-L/16 at 224 when absent). The whole model (vision, text, head) is the trainable ``module``;
only the tokenization is cached per prompt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.io import describe_load_error, load_torch_state_dict
from noisesearch.rewards.aesthetic import PreferenceMLP
from noisesearch.rewards.preprocess import (
    ImagePreprocess,
    TextCache,
    check_params,
    check_sizes,
    check_tensors,
    check_tokenizer,
    check_towers,
    freeze,
    hub_error,
    read_json,
    shapes,
)

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
VIT_L_16 = {"image_size": 224, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16}
HUB_REPO = "THUDM/ImageReward"
HUB_BERT = "google-bert/bert-base-uncased"


def imagereward_to_hf(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split and rename ``ImageReward.pt``: (BlipVisionModel, BlipTextModel, MLP) state dicts.

    BLIP ``vit.py`` -> ``BlipVisionModel``: ``cls_token`` / ``pos_embed`` / ``patch_embed.proj`` ->
    ``embeddings.class_embedding`` / ``position_embedding`` / ``patch_embedding``; ``blocks.i`` ->
    ``encoder.layers.i`` with ``norm1/2`` -> ``layer_norm1/2``, ``attn.qkv`` -> ``self_attn.qkv``,
    ``attn.proj`` -> ``self_attn.projection``; ``norm`` -> ``post_layernorm``. ``med.py``'s BertModel
    has ``BlipTextModel``'s names already. Other BLIP weights (projections for retrieval) are unused."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    vision, text, mlp = {}, {}, {}
    for k, v in state.items():
        if k.startswith("blip.visual_encoder."):
            n = k[len("blip.visual_encoder."):]
            n = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(n, n)
            n = n.replace("patch_embed.proj.", "embeddings.patch_embedding.")
            if n.startswith("blocks."):
                n = "encoder.layers." + n[len("blocks."):]
                n = (n.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
                     .replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection."))
            elif n.startswith("norm."):
                n = "post_layernorm." + n[len("norm."):]
            vision[n] = v
        elif k.startswith("blip.text_encoder."):
            text[k[len("blip.text_encoder."):]] = v
        elif k.startswith("mlp."):
            mlp[k[len("mlp."):]] = v
    return vision, text, mlp


class ImageRewardModule(torch.nn.Module):
    """(pixels, input_ids, attention_mask) -> normalised ImageReward scores [B]."""

    def __init__(self, vision: torch.nn.Module, text: torch.nn.Module, head: PreferenceMLP):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False, return_dict=True)
        r = self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (r - MEAN) / STD


def _read_json(path: Path, what: str) -> dict:
    return read_json(path, "imagereward", what)


def init_tokenizer(vocab_file):
    """BLIP's ``init_tokenizer``: BERT uncased WordPiece + ``[DEC]`` (bos) + ``[ENC]`` (extra special)."""
    from transformers import BertTokenizer  # deferred: optional heavy dependency (transformers)

    tok = BertTokenizer.from_pretrained(os.path.dirname(os.path.abspath(vocab_file)))  # reads vocab.txt there
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScore:
    """ImageReward as a reward (module: :class:`ImageRewardModule`, loaded with gradients off;
    ``module.requires_grad_(True)`` to fine-tune it as a whole)."""

    def __init__(self, module: ImageRewardModule, tokenizer, preprocess: ImagePreprocess, device="cpu",
                 name="imagereward", batch_size: int = 32):
        self.device = torch.device(device)
        self.module = freeze(module.to(self.device))  # gradients off for scoring; requires_grad_(True) to fine-tune
        self.tokenizer, self.preprocess_fn, self.name, self.batch_size = tokenizer, preprocess, name, batch_size
        self._tokens = TextCache(self._tokenize)
        self._flops: float | None = None

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        t = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return torch.stack([t["input_ids"], t["attention_mask"]], dim=1).to(self.device)  # [n, 2, 35]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocess_fn(images, self.device)

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores of preprocessed pixels [B, 3, S, S] for their prompts."""
        tok = self._tokens(list(prompts))
        out = []
        for lo in range(0, pixels.shape[0], self.batch_size):
            t = tok[lo:lo + self.batch_size]
            out.append(self.module(pixels[lo:lo + self.batch_size].to(self.device), t[:, 0], t[:, 1]))
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise NoiseSearchError(f"{images.shape[0]} images but {len(prompts)} prompts")
        tok = self._tokens(list(prompts))
        out = []
        for lo in range(0, images.shape[0], self.batch_size):
            t = tok[lo:lo + self.batch_size]
            out.append(self.module(self.preprocess(images[lo:lo + self.batch_size]), t[:, 0], t[:, 1]))
        return torch.cat(out)

    @property
    def flops_per_image(self) -> float:
        """Vision tower + the cross-attending text encoder at 35 tokens + head, for one image: the text
        encoder reads the image, so it runs per image (only the tokenization is cached)."""
        if self._flops is None:
            s = self.preprocess_fn.size
            x = torch.zeros(1, 3, s, s, device=self.device)
            ids = torch.zeros(1, MAX_LENGTH, dtype=torch.long, device=self.device)
            self._flops = count_flops(lambda: self.module(x, ids, torch.ones_like(ids)))
        return self._flops


KNOWN_UNUSED = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's retrieval projections: not part of the score


def _check_configs(vc: dict, med: dict, vision_where: str, med_where: str) -> None:
    """Every size of both configs in range, before anything is built."""
    check_sizes("imagereward", vision_where, vc, required=("image_size", "patch_size", "width", "layers", "heads"),
                heads=("width", "heads"), patch=("image_size", "patch_size"))
    check_sizes("imagereward", med_where, med, required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "max_position_embeddings"),
                heads=("hidden_size", "num_attention_heads"))
    vw, tw = int(vc["width"]), int(med["hidden_size"])
    check_towers("imagereward", f"{vision_where} and {med_where}",
                 [(int(vc["layers"]), vw, vw * float(vc.get("mlp_ratio", 4.0))),
                  (int(med["num_hidden_layers"]), tw, int(med["intermediate_size"]) + tw)])  # + cross-attention
    from transformers.activations import ACT2FN  # deferred: optional heavy dependency (transformers)

    act = med.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise NoiseSearchError(f"imagereward reward: {med_where}: hidden_act {act!r} is not an activation transformers knows")
    if int(med.get("pad_token_id", 0)) >= int(med["vocab_size"]):
        raise NoiseSearchError(f"imagereward reward: {med_where}: pad_token_id {med.get('pad_token_id')} is not below "
                               f"vocab_size {med['vocab_size']}")


def _hf_configs(vc: dict, med: dict):
    from transformers import BlipTextConfig, BlipVisionConfig  # deferred: optional heavy dependency (transformers)

    width = int(vc["width"])
    vision_cfg = BlipVisionConfig(hidden_size=width, intermediate_size=int(width * float(vc.get("mlp_ratio", 4.0))),
                                  num_hidden_layers=int(vc["layers"]), num_attention_heads=int(vc["heads"]),
                                  image_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]),
                                  hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
    text_cfg = BlipTextConfig(
        vocab_size=int(med["vocab_size"]), hidden_size=int(med["hidden_size"]), encoder_hidden_size=width,
        intermediate_size=int(med["intermediate_size"]), num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]), max_position_embeddings=int(med["max_position_embeddings"]),
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.1)),
        pad_token_id=int(med.get("pad_token_id", 0)), bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True,  # is_decoder: build the cross-attention layers
    )
    return vision_cfg, text_cfg


def _towers(vc: dict, med: dict, where: str):
    """(vision, text) built from the configs, checked on the meta device first (size within this machine)."""
    from transformers import BlipTextModel, BlipVisionModel  # deferred: optional heavy dependency (transformers)

    try:
        vision_cfg, text_cfg = _hf_configs(vc, med)
        with torch.device("meta"):
            meta = torch.nn.ModuleDict({"vision": BlipVisionModel(vision_cfg), "text": BlipTextModel(text_cfg, add_pooling_layer=False)})
    except Exception as e:  # a config transformers refuses (ValueError, ZeroDivisionError, ...)
        raise NoiseSearchError(f"imagereward reward: {where} do not build a model: {describe_load_error(e)}") from None
    check_params("imagereward", where, meta)
    return meta["vision"], meta["text"], vision_cfg, text_cfg


def _split_checkpoint(checkpoint) -> tuple[dict, dict, dict]:
    state = load_torch_state_dict(checkpoint, "imagereward reward")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NoiseSearchError(f"imagereward reward: {checkpoint} holds no state dict of tensors")
    known = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.", *KNOWN_UNUSED)
    other = [k for k in state if not k.removeprefix("module.").startswith(known)]
    if other:
        raise NoiseSearchError(f"imagereward reward: {checkpoint} holds {len(other)} unexpected tensors "
                               f"({', '.join(sorted(other)[:3])}{' ...' if len(other) > 3 else ''}): not an ImageReward checkpoint")
    return imagereward_to_hf(state)


def build_imagereward(checkpoint, med_config, vocab, vision_config=None, name="imagereward", device="cpu"):
    """ImageReward from its checkpoint, ``med_config.json``, BERT vocabulary and optional vision config:
    the configs' sizes are checked first, the towers built on the meta device must match the
    checkpoint exactly (names and shapes), the tokenizer must fit the text tower."""
    from transformers import BlipTextModel, BlipVisionModel  # deferred: optional heavy dependency (transformers)

    vc = dict(VIT_L_16, **(_read_json(Path(vision_config), "vision config") if vision_config else {}))
    med = _read_json(Path(med_config), "med_config")
    where = f"{vision_config or 'the ViT-L/16 defaults'} and {med_config}"
    _check_configs(vc, med, str(vision_config or "the ViT-L/16 defaults"), str(med_config))
    meta_vision, meta_text, vision_cfg, text_cfg = _towers(vc, med, where)
    vis_sd, txt_sd, mlp_sd = _split_checkpoint(checkpoint)
    for what, mod, sd in (("vision", meta_vision, vis_sd), ("text", meta_text, txt_sd)):
        check_tensors("imagereward", f"{checkpoint} ({what} tower)", shapes(mod.state_dict()), shapes(sd),
                      ignore_missing=lambda k: k.endswith("position_ids"), ignore_unexpected=lambda k: k.endswith("position_ids"),
                      config=where)
    head = PreferenceMLP.from_state_dict(mlp_sd, what=f"imagereward reward: {checkpoint}")
    if head.layers[0].in_features != text_cfg.hidden_size:
        raise NoiseSearchError("imagereward reward: the head's input width differs from the text encoder's")
    try:
        tokenizer = init_tokenizer(vocab)
    except Exception as e:
        raise NoiseSearchError(f"imagereward reward: cannot read the tokenizer {vocab}: {describe_load_error(e)}") from None
    check_tokenizer("imagereward", str(vocab), tokenizer, text_cfg.vocab_size)
    vision, text = BlipVisionModel(vision_cfg), BlipTextModel(text_cfg, add_pooling_layer=False)  # sizes now verified
    for mod, sd in ((vision, vis_sd), (text, txt_sd)):
        mod.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=False)
    module = ImageRewardModule(vision, text, head).float()
    pre = ImagePreprocess(int(vc["image_size"]), mode="crop", crop_rounding="round", name="imagereward")
    return ImageRewardScore(module, tokenizer, pre, device=device, name=name)


def imagereward_reward(arg: str | None = None, device="cpu") -> ImageRewardScore:
    """Factory for ``imagereward`` (hub) / ``imagereward@DIR``."""
    name = "imagereward" if arg is None else f"imagereward@{arg}"
    if arg is None:
        try:
            from huggingface_hub import hf_hub_download  # deferred: optional dependency (huggingface_hub, comes with diffusers)

            ckpt = hf_hub_download(HUB_REPO, "ImageReward.pt")
            med = hf_hub_download(HUB_REPO, "med_config.json")
            vocab = hf_hub_download(HUB_BERT, "vocab.txt")
        except Exception as e:
            raise hub_error("imagereward", HUB_REPO, "imagereward@/local/dir", e) from e
        return build_imagereward(ckpt, med, vocab, None, name, device)
    d = Path(arg).expanduser()
    if not d.is_dir():
        raise NoiseSearchError(f"imagereward reward: {arg!r} is no folder; see docs/rewards.md")
    need = [f for f in ("ImageReward.pt", "med_config.json", "vocab.txt") if not (d / f).is_file()]
    if need:
        raise NoiseSearchError(f"imagereward reward: {d} lacks {', '.join(need)} (see docs/rewards.md)")
    vcfg = d / "vision_config.json"
    return build_imagereward(d / "ImageReward.pt", d / "med_config.json", d / "vocab.txt",
                             vcfg if vcfg.is_file() else None, name, device)


__all__ = ["imagereward_reward", "build_imagereward", "imagereward_to_hf", "ImageRewardModule", "ImageRewardScore"]
