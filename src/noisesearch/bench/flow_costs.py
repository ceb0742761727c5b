"""FLOPs and parameter counts of FLUX.1-dev, SD3.5-large and SDXL, counted on the ``meta`` device
from their published configs (no weights are loaded or downloaded), for docs/flux.md.

    PYTHONPATH=src noisesearch bench flow_costs

Per image: one transformer / UNet evaluation (one CFG branch), one VAE decode, and the text encoders
(T5-XXL with 512 tokens for FLUX, 256 for SD3; CLIPs with 77).
"""
from __future__ import annotations

import argparse
import json

import torch

from noisesearch.flops import count_flops

FLUX_DEV = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
                num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096, num_attention_heads=38,
                  num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=192,
                  qk_norm="rms_norm", sample_size=128)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
              use_quant_conv=False, use_post_quant_conv=False)
VAE_4 = dict(VAE_16, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True)


def meta(cls, cfg, dtype=torch.bfloat16):
    with torch.device("meta"):
        return cls.from_config(cfg).to(dtype)


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def t5_xxl(tokens: int):
    from transformers import T5Config, T5EncoderModel  # deferred: optional heavy dependency (transformers)

    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        m = T5EncoderModel(cfg).to(torch.bfloat16)
    ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")
    return params(m), count_flops(lambda: m(ids))


def main(argv=None, prog=None) -> int:
    argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]).parse_args(argv)
    from diffusers import (  # deferred: optional heavy dependency (diffusers)
        AutoencoderKL,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    out = {}
    m = meta(FluxTransformer2DModel, FLUX_DEV)
    for px in (512, 1024):
        n = (px // 16) ** 2  # packed tokens
        kw = dict(hidden_states=torch.zeros(1, n, 64), timestep=torch.ones(1), guidance=torch.ones(1),
                  pooled_projections=torch.zeros(1, 768), encoder_hidden_states=torch.zeros(1, 512, 4096),
                  txt_ids=torch.zeros(512, 3), img_ids=torch.zeros(n, 3))
        kw = {k: v.to("meta", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in kw.items()}
        out[f"flux1-dev@{px}"] = {"transformer_params": params(m), "flops_per_call": count_flops(lambda: m(**kw, return_dict=False))}
    m = meta(SD3Transformer2DModel, SD35_LARGE)
    for px in (512, 1024):
        kw = dict(hidden_states=torch.zeros(1, 16, px // 8, px // 8), timestep=torch.ones(1), pooled_projections=torch.zeros(1, 2048),
                  encoder_hidden_states=torch.zeros(1, 333, 4096))  # 77 CLIP + 256 T5 tokens
        kw = {k: v.to("meta", torch.bfloat16) for k, v in kw.items()}
        out[f"sd3.5-large@{px}"] = {"transformer_params": params(m), "flops_per_call": count_flops(lambda: m(**kw, return_dict=False))}
    m = meta(UNet2DConditionModel, SDXL_UNET, torch.float16)
    for px in (512, 1024):
        kw = dict(sample=torch.zeros(1, 4, px // 8, px // 8), timestep=torch.ones(1), encoder_hidden_states=torch.zeros(1, 77, 2048))
        kw = {k: v.to("meta", torch.float16) for k, v in kw.items()}
        added = {"text_embeds": torch.zeros(1, 1280, device="meta", dtype=torch.float16), "time_ids": torch.zeros(1, 6, device="meta", dtype=torch.float16)}
        out[f"sdxl@{px}"] = {"unet_params": params(m), "flops_per_call": count_flops(lambda: m(**kw, added_cond_kwargs=added, return_dict=False))}
    for name, cfg in (("vae16", VAE_16), ("vae4", VAE_4)):
        v = meta(AutoencoderKL, cfg)
        for px in (512, 1024):
            z = torch.zeros(1, cfg["latent_channels"], px // 8, px // 8, device="meta", dtype=torch.bfloat16)
            out[f"{name}@{px}"] = {"vae_params": params(v), "flops_per_decode": count_flops(lambda: v.decode(z, return_dict=False))}
    for tokens in (256, 512):
        p, f = t5_xxl(tokens)
        out[f"t5-xxl@{tokens}"] = {"params": p, "flops_per_prompt": f}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
