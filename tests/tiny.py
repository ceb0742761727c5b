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


# ---- flow-matching pipelines (FLUX, SD3, Lumina2) -------------------------------------------------
# T5 / Gemma tokenizers are T5TokenizerFast objects over an in-memory Unigram vocabulary (letters,
# a few words); CLIP tokenizers as above. Every module built from a config is put in eval mode
# (T5's dropout is active in training mode).

_UNIGRAM_WORDS = ["\u2581a", "\u2581red", "\u2581bicycle", "\u2581cat", "\u2581dog", "\u2581photo", "\u2581of", "\u2581blue"]


def t5_tokenizer(max_length: int = 32):
    """A T5TokenizerFast over a tiny Unigram vocabulary built in memory (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(w, -1.0) for w in _UNIGRAM_WORDS]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,<>"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def _tiny_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer) + 4, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, dropout_rate=0.1, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def _tiny_flow_vae(scaling: float, shift: float, latent_channels: int = 4, blocks: int = 2):
    from diffusers import AutoencoderKL

    # two blocks -> vae_scale_factor 2: 16x16 latents decode to 32x32 images (4 blocks: factor 8)
    return AutoencoderKL(
        block_out_channels=(8,) * (blocks - 1) + (16,), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def tiny_flux_pipeline(directory: str | Path, guidance_embeds: bool = True, seed: int = 0):
    """A random FluxPipeline (dev-like with ``guidance_embeds``, schnell-like without): latents
    4x16x16 (packed to 64 tokens of 16), images 3x32x32; dynamic shift as FLUX.1-dev."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    clip_tok = write_clip_tokenizer(Path(directory) / "tokenizer_src")
    text_encoder = CLIPTextModel(tiny_clip_text_config(clip_tok, hidden=32)).eval()
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_flow_vae(0.3611, 0.1159), text_encoder=text_encoder,
                        tokenizer=clip_tok, text_encoder_2=_tiny_t5(t5_tok, 32), tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(directory: str | Path, seed: int = 0):
    """A random StableDiffusion3Pipeline: two CLIP encoders (width 32 each) + T5 (width 64 >= 2 x 32,
    or the pipeline's padding crops the embeddings), latents 4x16x16, images 3x32x32, static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    clip_tok = write_clip_tokenizer(Path(directory) / "tokenizer_src")
    cfg = tiny_clip_text_config(clip_tok, hidden=32, projection_dim=32)
    t5_tok = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_flow_vae(1.5305, 0.0609),
        text_encoder=CLIPTextModelWithProjection(cfg).eval(), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(cfg).eval(), tokenizer_2=clip_tok,
        text_encoder_3=_tiny_t5(t5_tok, 64), tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lumina2_pipeline(directory: str | Path, seed: int = 0):
    """A random Lumina2Pipeline (Gemma2 text encoder; reversed time, negated velocity). The pipeline
    hard-codes a VAE factor of 8, so the VAE has 4 blocks: 64x64 images, latents 4x8x8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = t5_tokenizer(max_length=512)
    gemma = Gemma2Model(Gemma2Config(
        vocab_size=len(tok) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=0, sliding_window=16,
    )).eval()
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(512, 16, 16),
        cap_feat_dim=16,
    ).eval()
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
                           vae=_tiny_flow_vae(0.3611, 0.1159, blocks=4), text_encoder=gemma, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ddpm_pipeline(seed: int = 0):
    """A random unconditional DDPMPipeline on 3x16x16 images (UNet2DModel with two levels)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe
