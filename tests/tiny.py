"""Builders of tiny, randomly initialised diffusers pipelines and CLIP models for offline tests.

Nothing here downloads anything: every component is built from a config, and the CLIP tokenizer
from a small byte-level ``vocab.json`` + ``merges.txt`` written to a temporary directory. The
models are random, so their outputs are meaningless but deterministic, which is all the tests need
(parameterization conventions, schedules, guidance, NFE counting, shapes).

Used by tests/test_diffusers.py and tests/test_clip.py (see the fixtures in tests/conftest.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Byte-level BPE vocabulary: the 256 byte symbols, the same with the end-of-word mark, a few merges
# so that common test words are single tokens, and CLIP's two special tokens.
_MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "r e", "re d</w>"]
MAX_LENGTH = 16  # tokenizer model_max_length == text encoder max_position_embeddings


def write_clip_tokenizer(directory: str | Path, max_length: int = MAX_LENGTH):
    """Write vocab.json, merges.txt and tokenizer_config.json into ``directory``; return the tokenizer."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    for m in _MERGES:
        a, b = m.split()
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)


def tiny_clip_text_config(tokenizer, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer) + 8,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    # two blocks -> vae_scale_factor 2: 8x8 latents decode to 16x16 images
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )


def _scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    # SD's scaled-linear beta schedule (sigma_max ~ 14.6)
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="linspace",
        steps_offset=1,  # unused by "linspace"; 1 avoids the pipeline's deprecation warning
    )


def tiny_sd_pipeline(directory: str | Path, prediction_type: str = "epsilon", seed: int = 0):
    """A random StableDiffusionPipeline (latents 4x8x8, images 3x16x16); the tokenizer files are
    written to ``directory/tokenizer_src``. Not saved: call ``pipe.save_pretrained``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(Path(directory) / "tokenizer_src")
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer)).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(directory: str | Path, seed: int = 0):
    """A random StableDiffusionXLPipeline (two text encoders, pooled embeds, add_time_ids)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(Path(directory) / "tokenizer_src")
    config = tiny_clip_text_config(tokenizer, hidden=32, projection_dim=32)
    text_encoder = CLIPTextModel(config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids * 8 + pooled projection dim
        cross_attention_dim=64,  # both text encoders' hidden states concatenated
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler("epsilon"),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_model_dir(directory: str | Path, seed: int = 0) -> Path:
    """A random CLIPModel (+ tokenizer and image processor) saved to ``directory``; returns it."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(directory)
    text_config = tiny_clip_text_config(tokenizer, hidden=32, projection_dim=16)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    preprocessor = {  # what CLIPImageProcessor.save_pretrained writes, with non-default mean / std
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory
