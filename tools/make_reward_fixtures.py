"""Build the reference fixtures of the preference rewards with the OFFICIAL implementations.

Runs in a reference environment kept apart from the project's (the official packages need
torchvision, which breaks the project's environment):

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 open-clip-torch "transformers==4.44.*"
    /work/refenv/bin/pip install --no-deps image-reward==1.5 hpsv2
    /work/refenv/bin/python tools/make_reward_fixtures.py --out tests/fixtures/rewards

For each reward it builds a tiny random model with the official code, saves it in the official file
layout (what ``NAME@DIR`` reads), and writes ``reference.npz`` + ``reference.json``:

* ``exact_images`` (uint8 [N, S, S, 3], already the model's size) and ``exact_scores``: the official
  score of each image (through the official PIL / torchvision preprocessing) for ``exact_prompts``;
* ``other_K`` (uint8 images of other sizes), ``other_pixels_K`` (the official preprocessing of it,
  float32 [3, S, S]) and ``other_scores`` (the official score of it) for ``other_prompts``.

Official code used: HPSv2 - ``hpsv2.src.open_clip`` (its model, its ``image_transform`` with
``resize_longest_max``, its tokenizer on a small BPE vocabulary) and the scoring lines of
``hpsv2.img_score.score`` in float32; ImageReward - ``ImageReward.ImageReward`` (``ImageReward.score``
on image files) with BLIP's ``vit.py`` / ``med.py`` / ``init_tokenizer`` on a small WordPiece
vocabulary; PickScore - transformers' ``CLIPModel`` + ``CLIPProcessor`` (PIL) and the scoring lines of
the PickScore README; aesthetic - the MLP of improved-aesthetic-predictor's ``simple_inference.py``
on ``normalized`` CLIP image features, OpenAI CLIP's ``_transform`` (identical in ImageReward).

Tiny sizes: widths 32, 2 layers; the MLP heads are scaled down (same layers and keys, smaller
widths); weights are redrawn with larger variances so that scores differ clearly between inputs.
Everything is seeded: rerunning rewrites the same fixtures (up to library versions).
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = ["a cat", "a photo of a red dog", "the dog, the cat!", "a red cat"]
LONG = "a photo of a cat and a dog and a red cat and a red dog and the cat of the dog"
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "r e", "re d</w>", "t h", "th e</w>",
          "o f</w>", "a n", "an d</w>"]
WORDS = ["a", "cat", "dog", "photo", "of", "red", "the", "and", ",", "!", "##s", "c", "d", "##at", "##og"]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_bpe(d: Path) -> tuple[Path, int]:
    """vocab.json + merges.txt (transformers) and bpe.txt.gz (open_clip's SimpleTokenizer): the same
    vocabulary in open_clip's order (bytes, bytes + </w>, merges, the two special tokens)."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    gz = d.parent / f"_{d.name}_bpe.txt.gz"
    with gzip.open(gz, "wt") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES))  # no trailing newline: it would add an empty merge
    return gz, len(vocab)


def redraw(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Random weights with larger variances (LayerNorm weights near 1): outputs depend clearly on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() or "ln_" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif "logit_scale" in name:
                p.fill_(float(np.log(1 / 0.07)))
            else:
                p.copy_(scale * noise)


def small_mlp(mlp_cls, widths, seed):
    """The official MLP class with its layers rebuilt at smaller widths (same Sequential, same keys)."""
    m = mlp_cls(widths[0])
    nn = torch.nn
    m.layers = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Dropout(0.2), nn.Linear(widths[1], widths[2]),
                             nn.Dropout(0.2), nn.Linear(widths[2], widths[3]), nn.Dropout(0.1),
                             nn.Linear(widths[3], widths[4]), nn.Linear(widths[4], 1))
    redraw(m, seed, scale=0.5)
    return m.eval()


def test_images(size: int, seed: int):
    """Exact-size images (uint8 [N, S, S, 3]) and a few images of other sizes (down, up, odd crops)."""
    rng = np.random.default_rng(seed)

    def img(h, w):
        # smooth + noise so that resampling matters but is not pure noise
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 0.35 + 0.5
        return np.clip(base + 0.15 * rng.standard_normal((h, w, 3)), 0, 1).__mul__(255).round().astype(np.uint8)

    exact = np.stack([img(size, size) for _ in PROMPTS])
    others = [img(3 * size, 2 * size + 3), img(size // 2 + 3, size + 5), img(2 * size + 1, 2 * size + 1)]
    return exact, others


def save(d: Path, exact, exact_scores, others, other_pixels, other_scores, prompts_other, meta):
    arrays = {"exact_images": exact, "exact_scores": np.asarray(exact_scores, np.float64),
              "other_scores": np.asarray(other_scores, np.float64)}
    for k, (im, px) in enumerate(zip(others, other_pixels)):
        arrays[f"other_{k}"] = im
        arrays[f"other_pixels_{k}"] = np.asarray(px, np.float32)
    np.savez_compressed(d / "reference.npz", **arrays)
    meta = dict(meta, exact_prompts=PROMPTS, other_prompts=prompts_other, torch=torch.__version__)
    (d / "reference.json").write_text(json.dumps(meta, indent=1))
    spread = float(np.ptp(exact_scores))
    print(f"{d.name}: exact scores {np.round(exact_scores, 4).tolist()} (spread {spread:.3g}), "
          f"other {np.round(other_scores, 4).tolist()}")
    assert spread > 1e-3, "scores barely differ: the fixture would not test much"


# ---------------------------------------------------------------------------------------------
# HPSv2 (official: hpsv2.src.open_clip)
# ---------------------------------------------------------------------------------------------
def stub_packages(package: str, subpackages=()):
    """Register ``package`` (and sub-packages) without running their __init__ (which import tools
    the reference does not need: hpsv2's downloader, ImageReward's OpenAI-clip scorers)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    base = Path(spec.submodule_search_locations[0])
    for name in (package, *subpackages):
        mod = types.ModuleType(name)
        mod.__path__ = [str(base.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = mod


def make_hps(root: Path):
    stub_packages("hpsv2", ["hpsv2.src"])
    import shutil

    # the hpsv2 wheel lacks the default BPE file its tokenizer module loads at import: open_clip's is the same
    oc = Path(sys.modules["hpsv2"].__path__[0]) / "src" / "open_clip"
    if not (oc / "bpe_simple_vocab_16e6.txt.gz").exists():
        import open_clip

        shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", oc)
    from hpsv2.src.open_clip import factory
    from hpsv2.src.open_clip import tokenizer as oc_tok
    from hpsv2.src.open_clip.tokenizer import SimpleTokenizer

    d = root / "hps"
    d.mkdir(parents=True, exist_ok=True)
    gz, n_vocab = write_clip_bpe(d)
    oc_tok._tokenizer = SimpleTokenizer(bpe_path=str(gz))
    gz.unlink()
    # vision: head_width 16 -> 2 heads; text: 4 heads (the counts come from the config)
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 12, "vocab_size": n_vocab, "width": 32, "heads": 4, "layers": 2}}
    mean, std = [0.5, 0.45, 0.4], [0.25, 0.3, 0.2]
    factory._MODEL_CONFIGS["tiny-hps"] = model_cfg
    torch.manual_seed(0)
    model, _, preprocess_val = factory.create_model_and_transforms(
        "tiny-hps", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=mean, image_std=std,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    redraw(model, 1, scale=0.15)
    model.eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}  # as saved from DDP training
    torch.save({"state_dict": sd, "epoch": 1}, d / "HPS_tiny.pt")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": mean, "std": std}}))

    def official(pil: Image.Image, prompt: str):
        # the scoring lines of hpsv2.img_score.score, float32 (no autocast on the CPU)
        with torch.no_grad():
            image = preprocess_val(pil).unsqueeze(0)
            text = oc_tok.tokenize([prompt], context_length=12)
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            return float(torch.diagonal(logits_per_image)[0]), image[0].numpy()

    exact, others = test_images(32, 10)
    exact_scores = [official(Image.fromarray(im), p)[0] for im, p in zip(exact, PROMPTS)]
    other_prompts = ["a cat", LONG, "a red dog"]
    res = [official(Image.fromarray(im), p) for im, p in zip(others, other_prompts)]
    save(d, exact, exact_scores, others, [r[1] for r in res], [r[0] for r in res], other_prompts,
         {"official": "hpsv2 (hpsv2.src.open_clip, scoring lines of hpsv2.img_score.score in float32)",
          "checkpoint": "HPS_tiny.pt", "context_length": 12})


# ---------------------------------------------------------------------------------------------
# ImageReward (official: the image-reward package's ImageReward.py and BLIP modules)
# ---------------------------------------------------------------------------------------------
def import_image_reward():
    """Import ImageReward's modules without its package __init__ (which needs OpenAI's clip package)
    and with fairscale's checkpoint_wrapper stubbed (unused at inference)."""
    if "ImageReward.ImageReward" not in sys.modules:
        stub_packages("ImageReward", ["ImageReward.models"])
    fs = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    fs.checkpoint_wrapper = lambda m, **k: m
    for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules[n] = types.ModuleType(n)
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = fs
    return (importlib.import_module("ImageReward.ImageReward"), importlib.import_module("ImageReward.models.BLIP.blip"),
            importlib.import_module("ImageReward.models.BLIP.blip_pretrain"), importlib.import_module("ImageReward.models.BLIP.vit"))


def make_imagereward(root: Path):
    ir, blip, blip_pretrain, vit = import_image_reward()
    from transformers import BertTokenizer

    d = root / "imagereward"
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    blip.BertTokenizer.from_pretrained = classmethod(lambda cls, name, **k: BertTokenizer(vocab_file=str(d / "vocab.txt")))
    vc = {"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "heads": 4}
    (d / "vision_config.json").write_text(json.dumps(vc))

    def tiny_vit(v, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return vit.VisionTransformer(img_size=vc["image_size"], patch_size=vc["patch_size"], embed_dim=vc["width"],
                                     depth=vc["layers"], num_heads=vc["heads"], drop_path_rate=0.1), vc["width"]

    blip_pretrain.create_vit = tiny_vit
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
           "encoder_width": 32, "add_cross_attention": True}
    (d / "med_config.json").write_text(json.dumps(med, indent=1))
    torch.manual_seed(0)
    model = ir.ImageReward(med_config=str(d / "med_config.json"), device="cpu")
    model.mlp = small_mlp(ir.MLP, (32, 24, 16, 12, 8), 3)
    model.preprocess = ir._transform(vc["image_size"])  # the official transform at the tiny model's size
    redraw(model.blip, 2, scale=0.15)
    model.eval()
    torch.save(model.state_dict(), d / "ImageReward.pt")

    tmp = root / "_ir_images"
    tmp.mkdir(exist_ok=True)

    def official(arr, prompt, k):
        path = tmp / f"{k}.png"
        Image.fromarray(arr).save(path)
        with torch.no_grad():
            s = model.score(prompt, str(path))
            pixels = model.preprocess(Image.open(path))
        return float(s), pixels.numpy()

    exact, others = test_images(vc["image_size"], 20)
    exact_scores = [official(im, p, f"e{i}")[0] for i, (im, p) in enumerate(zip(exact, PROMPTS))]
    other_prompts = ["a dog", LONG + " " + LONG, "a photo of the cat"]
    res = [official(im, p, f"o{i}") for i, (im, p) in enumerate(zip(others, other_prompts))]
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    save(d, exact, exact_scores, others, [r[1] for r in res], [r[0] for r in res], other_prompts,
         {"official": "image-reward 1.5: ImageReward.score(prompt, image_path), BLIP vit.py / med.py / init_tokenizer"})


# ---------------------------------------------------------------------------------------------
# PickScore and the aesthetic predictor (transformers CLIP folders)
# ---------------------------------------------------------------------------------------------
def tiny_hf_clip(d: Path, seed: int, mean, std, projection_dim=16):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    _, n_vocab = write_clip_bpe(d)
    (d / f"_{d.name}_bpe.txt.gz").unlink(missing_ok=True)
    (d.parent / f"_{d.name}_bpe.txt.gz").unlink(missing_ok=True)
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)
    text = dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, hidden_act="gelu", projection_dim=projection_dim)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="quick_gelu", projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    redraw(model, seed, scale=0.15)
    model.eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=mean,
                            image_std=std, resample=3)
    processor = CLIPProcessor(image_processor=ip, tokenizer=tok)
    model.save_pretrained(d, safe_serialization=True)
    processor.save_pretrained(d)
    return model, processor


def make_pickscore(root: Path):
    d = root / "pickscore"
    d.mkdir(parents=True, exist_ok=True)
    model, processor = tiny_hf_clip(d, 4, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])

    def official(pils, prompt):
        # the scoring lines of PickScore's README (max_length: the tiny model's context instead of 77)
        image_inputs = processor(images=pils, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        return scores.numpy(), image_inputs["pixel_values"].numpy()

    exact, others = test_images(32, 30)
    exact_scores = [official([Image.fromarray(im)], p)[0][0] for im, p in zip(exact, PROMPTS)]
    other_prompts = ["a red dog", LONG, "the cat"]
    res = [official([Image.fromarray(im)], p) for im, p in zip(others, other_prompts)]
    save(d, exact, exact_scores, others, [r[1][0] for r in res], [r[0][0] for r in res], other_prompts,
         {"official": "transformers 4.44 CLIPModel + CLIPProcessor (PIL), PickScore README scoring lines"})


class AestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's ``MLP`` (simple_inference.py; a LightningModule there, with the
    training-only xcol / ycol and no other forward logic)."""

    def __init__(self, input_size, xcol="emb", ycol="avg_rating"):
        super().__init__()
        self.input_size, self.xcol, self.ycol = input_size, xcol, ycol
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    """improved-aesthetic-predictor's ``normalized``."""
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def make_aesthetic(root: Path):
    ir, *_ = import_image_reward()  # OpenAI CLIP's _transform, copied verbatim into ImageReward.py
    d = root / "aesthetic"
    d.mkdir(parents=True, exist_ok=True)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    model, _ = tiny_hf_clip(d, 5, mean, std, projection_dim=16)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        (d / f).unlink(missing_ok=True)  # the aesthetic reward reads the vision tower only
    head = small_mlp(AestheticMLP, (16, 24, 16, 12, 8), 6)
    torch.save(head.state_dict(), d / "tiny-linearMSE.pth")
    preprocess = ir._transform(32)

    def official(pil):
        image = preprocess(pil).unsqueeze(0)
        with torch.no_grad():
            image_features = model.get_image_features(pixel_values=image)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        prediction = head(torch.from_numpy(im_emb_arr).float())
        return float(prediction[0, 0]), image[0].numpy()

    exact, others = test_images(32, 40)
    exact_scores = [official(Image.fromarray(im))[0] for im in exact]
    other_prompts = ["", "", ""]
    res = [official(Image.fromarray(im)) for im in others]
    save(d, exact, exact_scores, others, [r[1] for r in res], [r[0] for r in res], other_prompts,
         {"official": "improved-aesthetic-predictor MLP + normalized on transformers 4.44 CLIP image features, "
                      "OpenAI CLIP _transform"})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures/rewards", type=Path)
    ap.add_argument("--only", default="hps,imagereward,pickscore,aesthetic")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    makers = {"hps": make_hps, "imagereward": make_imagereward, "pickscore": make_pickscore, "aesthetic": make_aesthetic}
    for name in args.only.split(","):
        makers[name](args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {args.out}")
    assert total < 2e6, "the fixtures must stay under 2 MB"


if __name__ == "__main__":
    main()
