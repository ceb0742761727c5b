"""HPSv2 / HPSv2.1 (Wu et al. 2023): human preference score, an open_clip ViT-H-14 fine-tuned on HPD.

Rebuilt on ``transformers.CLIPModel`` (no open_clip / torchvision): the official open_clip state
dict is converted at load time by :func:`open_clip_to_hf` (a pure mapping of names and layouts).

``score = cos(image_embedding, text_embedding)`` (the diagonal of ``image_features @ text_features.T``
of the normalised open_clip features, as ``hpsv2.score`` computes it; no temperature).

Preprocessing (HPSv2's ``ResizeMaxSize`` on the tensor after ``ToTensor``): the longer side is resized
to ``image_size`` (bicubic, antialiased, not clamped), the image is zero padded to a square (``pad //
2`` left / top), then normalised with the config's mean / std. (The official transform skips the
padding when the longer side already has the size; a non-square image then cannot go through the
model, so here it is always padded.)

Reward spec ``hps@DIR`` / ``hps@FILE.pt`` / ``hps`` (v2.1 from the hub) / ``hps@v2.0`` / ``hps@v2.1``.
``DIR`` holds

* the open_clip checkpoint ``*.pt`` (the state dict, or a dict holding it under ``state_dict``; keys
  possibly prefixed ``module.``), read with ``torch.load(weights_only=True)``; with several ``*.pt``
  files, name the file (``hps@DIR/HPS_v2.1_compressed.pt``);
* ``open_clip_config.json`` as in open_clip's hub repositories: ``model_cfg`` (``embed_dim``,
  ``vision_cfg``, ``text_cfg``, optionally ``quick_gelu``) and ``preprocess_cfg`` (``mean``, ``std``);
  ViT-H-14 with OpenAI's mean / std when absent;
* the CLIP BPE tokenizer: ``vocab.json`` + ``merges.txt``.

Attention head counts come from the config (``vision_cfg.head_width``, default 64, and
``text_cfg.heads``, default 8, as in open_clip), never from tensor shapes.
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.io import describe_load_error, load_torch_state_dict
from noisesearch.rewards.clip import ClipScore
from noisesearch.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    check_params,
    check_sizes,
    check_tensors,
    check_tokenizer,
    check_towers,
    hub_error,
    load_error,
    read_json,
    shapes,
)

VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
HUB_REPO = "xswu/HPSv2"
HUB_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HUB_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # open_clip_config.json + tokenizer


def _norm(path, pre: dict, key: str, default) -> tuple[float, ...]:
    v = pre.get(key, default)
    ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok or (key == "std" and min(v) <= 0):
        raise NoiseSearchError(f"hps reward: {path}: preprocess_cfg.{key} must be three finite numbers"
                               f"{' > 0' if key == 'std' else ''}, got {v!r}")
    return tuple(float(x) for x in v)


def read_open_clip_config(directory) -> tuple[dict, tuple, tuple]:
    """(model_cfg, mean, std) from ``open_clip_config.json`` in ``directory`` (ViT-H-14 if absent),
    every size checked in range before anything is built."""
    path = Path(directory) / "open_clip_config.json"
    if not path.is_file():
        return VIT_H_14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    cfg = read_json(path, "hps", "open_clip config")
    model_cfg = cfg.get("model_cfg", cfg)
    check_sizes("hps", str(path), model_cfg, required=("embed_dim", "vision_cfg", "text_cfg"), prefix="model_cfg.")
    check_sizes("hps", str(path), model_cfg["vision_cfg"], required=("width", "layers", "image_size", "patch_size"),
                prefix="model_cfg.vision_cfg.", heads=("width", "head_width"), patch=("image_size", "patch_size"))
    check_sizes("hps", str(path), model_cfg["text_cfg"], prefix="model_cfg.text_cfg.", heads=("width", "heads"))
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    check_towers("hps", str(path), [(int(c.get("layers", 12)), int(c.get("width", 512)),
                                     int(c.get("width", 512)) * float(c.get("mlp_ratio", 4.0))) for c in (v, t)])
    pre = cfg.get("preprocess_cfg", {})
    if not isinstance(pre, dict):
        raise NoiseSearchError(f"hps reward: {path}: preprocess_cfg must be a mapping")
    return model_cfg, _norm(path, pre, "mean", OPENAI_CLIP_MEAN), _norm(path, pre, "std", OPENAI_CLIP_STD)


def hf_clip_config(model_cfg: dict, tokenizer=None):
    """The ``CLIPConfig`` of an open_clip ``model_cfg`` (plain ViT image tower + transformer text tower)."""
    from transformers import CLIPConfig  # deferred: optional heavy dependency (transformers)

    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    unsupported = [k for k in ("timm_model_name", "hf_model_name") if v.get(k) or t.get(k)]
    if unsupported or v.get("ls_init_value") or t.get("ls_init_value") or v.get("global_average_pool") \
            or v.get("attentional_pool") or isinstance(v.get("layers"), (list, tuple)):
        raise NoiseSearchError("hps reward: only open_clip's plain ViT / text transformer models are supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vw, tw = int(v["width"]), int(t.get("width", 512))
    vheads = vw // int(v.get("head_width", 64))
    theads = int(t.get("heads", 8))
    if vheads < 1 or vw % vheads or tw % theads:
        raise NoiseSearchError(f"hps reward: widths that do not divide into attention heads (vision width {vw}, "
                               f"head_width {v.get('head_width', 64)}; text width {tw}, heads {theads})")
    tcontext = int(t.get("context_length", 77))
    vision = dict(hidden_size=vw, intermediate_size=int(vw * float(v.get("mlp_ratio", 4.0))),
                  num_hidden_layers=int(v["layers"]), num_attention_heads=vheads, image_size=int(v["image_size"]),
                  patch_size=int(v["patch_size"]), hidden_act=act, layer_norm_eps=1e-5,
                  projection_dim=int(model_cfg["embed_dim"]))
    text = dict(vocab_size=int(t.get("vocab_size", 49408)), hidden_size=tw,
                intermediate_size=int(tw * float(t.get("mlp_ratio", 4.0))), num_hidden_layers=int(t.get("layers", 12)),
                num_attention_heads=theads, max_position_embeddings=tcontext, hidden_act=act,
                layer_norm_eps=1e-5, projection_dim=int(model_cfg["embed_dim"]))
    if tokenizer is not None:  # pool the text at the first end-of-text token (open_clip: argmax of the ids)
        text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(model_cfg["embed_dim"]))


def _split_in_proj(out: dict, prefix: str, w: torch.Tensor, b: torch.Tensor) -> None:
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, 0), b.chunk(3, 0)):
        out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = wi.contiguous(), bi.contiguous()


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT image tower, transformer text tower) as ``CLIPModel`` keys.

    ``in_proj`` splits into q / k / v; ``ln_1/2`` -> ``layer_norm1/2``; ``mlp.c_fc/c_proj`` ->
    ``mlp.fc1/fc2``; ``conv1`` -> patch embedding; ``ln_pre/ln_post`` -> ``pre_layrnorm`` /
    ``post_layernorm``; the projections ``proj`` / ``text_projection`` are transposed into Linear
    weights. Unknown keys raise (they would be silently ignored weights)."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    layer_map = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                 "attn.out_proj": "self_attn.out_proj"}
    done = set()
    for tower, hf in (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
                      ("transformer.resblocks.", "text_model.encoder.layers.")):
        for k in [k for k in state if k.startswith(tower)]:
            idx, rest = k[len(tower):].split(".", 1)
            prefix = f"{hf}{idx}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if rest == "attn.in_proj_weight":
                    _split_in_proj(out, f"{prefix}.self_attn", state[k], state[k.replace("_weight", "_bias")])
                done.add(k)
                continue
            mod, _, param = rest.rpartition(".")
            if mod not in layer_map:
                raise NoiseSearchError(f"hps reward: unsupported open_clip weight {k!r}")
            out[f"{prefix}.{layer_map[mod]}.{param}"] = state[k]
            done.add(k)
    simple = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for k, hf in simple.items():
        if k in state:
            out[hf] = state[k]
            done.add(k)
    for k, hf in (("visual.proj", "visual_projection.weight"), ("text_projection", "text_projection.weight")):
        if k in state:
            out[hf] = state[k].t().contiguous()
            done.add(k)
    left = [k for k in state if k not in done and k not in ("attn_mask", "visual.attn_mask")]
    if left:
        raise NoiseSearchError(f"hps reward: unsupported open_clip weights {left[:5]}{' ...' if len(left) > 5 else ''}")
    return out


def load_open_clip_checkpoint(path) -> dict[str, torch.Tensor]:
    obj = load_torch_state_dict(path, "hps reward")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NoiseSearchError(f"hps reward: {path} holds no state dict (nor one under 'state_dict')")
    return obj


def _tokenizer(d: Path, context: int, model_cfg: dict):
    from transformers import CLIPTokenizer  # deferred: optional heavy dependency (transformers)

    if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        raise NoiseSearchError(f"hps reward: {d} needs the CLIP BPE tokenizer files vocab.json and merges.txt")
    try:
        tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=context)
    except Exception as e:
        raise load_error("hps", f"the tokenizer files in {d}", e) from None
    return tok


def _hf_state(checkpoint) -> dict[str, torch.Tensor]:
    try:
        state = open_clip_to_hf(load_open_clip_checkpoint(checkpoint))
    except (KeyError, ValueError, IndexError, RuntimeError) as e:  # an in_proj weight without its bias, a bad name
        raise NoiseSearchError(f"hps reward: {checkpoint} is not an open_clip CLIP checkpoint ({type(e).__name__}: {e})") from None
    state.setdefault("logit_scale", torch.tensor(0.0))
    return state


def _materialise(model, state: dict[str, torch.Tensor]):
    """Load ``state`` into the meta-device ``model`` (assign), rebuilding the position id buffers."""
    model.load_state_dict(state, strict=False, assign=True)
    for n, buf in list(model.named_buffers()):  # position_ids buffers stay on meta: rebuild them
        if buf.is_meta:
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.float()


def build_hps(checkpoint, directory, name: str, device="cpu", batch_size: int = 32) -> ClipScore:
    """The HPS reward from an open_clip checkpoint + the folder with its config and tokenizer; the
    config's sizes are checked first, the model is built on the meta device and must match the
    checkpoint exactly (names and shapes) before it takes the weights."""
    from transformers import CLIPModel  # deferred: optional heavy dependency (transformers)

    model_cfg, mean, std = read_open_clip_config(directory)
    context = int(model_cfg["text_cfg"].get("context_length", 77))
    d = Path(directory)
    tokenizer = _tokenizer(d, context, model_cfg)
    cfg_name = d / "open_clip_config.json" if (d / "open_clip_config.json").is_file() else "ViT-H-14 (no open_clip_config.json)"
    try:
        config = hf_clip_config(model_cfg, tokenizer)
        with torch.device("meta"):
            model = CLIPModel(config)
    except NoiseSearchError:
        raise
    except Exception as e:
        raise NoiseSearchError(f"hps reward: {cfg_name} does not build a model: {describe_load_error(e)}") from None
    check_params("hps", str(cfg_name), model)
    state = _hf_state(checkpoint)
    check_tensors("hps", str(checkpoint), shapes(model.state_dict()), shapes(state),
                  ignore_missing=lambda k: k.endswith("position_ids"), config=str(cfg_name))
    check_tokenizer("hps", str(d), tokenizer, config.text_config.vocab_size)
    model = _materialise(model, state)
    pre = ImagePreprocess(config.vision_config.image_size, mean, std, mode="pad", clamp=False, name="hps")
    return ClipScore(model, tokenizer, device=device, name=name, batch_size=batch_size, preprocess=pre, scale=1.0,
                     max_length=context)


def hps_reward(arg: str | None = None, device="cpu") -> ClipScore:
    """Factory for ``hps`` / ``hps@v2.0`` / ``hps@v2.1`` (hub) and ``hps@DIR`` / ``hps@FILE.pt`` (local)."""
    name = "hps" if arg is None else f"hps@{arg}"
    source = arg or "v2.1"
    if source in HUB_FILES:
        try:
            from huggingface_hub import hf_hub_download  # deferred: optional dependency (huggingface_hub, comes with diffusers)

            ckpt = hf_hub_download(HUB_REPO, HUB_FILES[source])
            cfg = hf_hub_download(HUB_CLIP, "open_clip_config.json")
            hf_hub_download(HUB_CLIP, "vocab.json")
            hf_hub_download(HUB_CLIP, "merges.txt")
        except Exception as e:
            raise hub_error("hps", f"{HUB_REPO}/{HUB_FILES[source]}", "hps@/local/dir", e) from e
        return build_hps(ckpt, os.path.dirname(cfg), name, device)
    p = Path(source).expanduser()
    if p.is_file():
        return build_hps(p, p.parent, name, device)
    if not p.is_dir():
        raise NoiseSearchError(f"hps reward: {source!r} is no folder, .pt file or version (v2.0, v2.1); see docs/rewards.md")
    pts = sorted(glob.glob(str(p / "*.pt")))
    if len(pts) != 1:
        raise NoiseSearchError(
            f"hps reward: {p} holds {len(pts)} *.pt checkpoints; " + ("name one: hps@DIR/FILE.pt" if pts else
                                                                       "put HPS_v2_compressed.pt or HPS_v2.1_compressed.pt there")
        )
    return build_hps(pts[0], p, name, device)


__all__ = ["hps_reward", "build_hps", "open_clip_to_hf", "hf_clip_config", "read_open_clip_config", "VIT_H_14"]
