"""pickscore, hps, imagereward and aesthetic against their official implementations.

The fixtures under tests/fixtures/rewards/ were written by tools/make_reward_fixtures.py in a
separate reference environment with the official code (hpsv2, image-reward, transformers'
CLIPProcessor, improved-aesthetic-predictor's MLP): tiny random models in the official file layout,
test images and the official scores. Here the project's rewards load those files and must agree
at 1e-5 (relative / absolute); preprocessing of other image sizes must agree within 4 grey levels.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.rewards import make_reward, score  # noqa: E402
from noisesearch.rewards.preprocess import ImagePreprocess  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"
NAMES = ["hps", "imagereward", "pickscore", "aesthetic"]


def _ref(name):
    d = FIXTURES / name
    return np.load(d / "reference.npz"), json.loads((d / "reference.json").read_text())


def _tensor(uint8_hwc: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(uint8_hwc)).float() / 255.0
    return t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def rewards():
    torch.manual_seed(0)
    return {n: make_reward(f"{n}@{FIXTURES / n}") for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_matches_official_on_model_sized_images(rewards, name):
    ref, meta = _ref(name)
    r = rewards[name]
    got = score(r, _tensor(ref["exact_images"]), meta["exact_prompts"]).double()
    want = torch.from_numpy(ref["exact_scores"])
    assert want.std() > 1e-3  # the fixture's scores differ: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_other_sizes_preprocessing_and_model(rewards, name):
    ref, meta = _ref(name)
    r = rewards[name]
    for k, prompt in enumerate(meta["other_prompts"]):
        official = torch.from_numpy(ref[f"other_pixels_{k}"])
        ours = r.preprocess(_tensor(ref[f"other_{k}"]))[0]
        assert ours.shape == official.shape
        grey = ((ours - official).abs() * r.preprocess_fn.std[0]).max().item() * 255
        assert grey <= 4.0, f"{name} image {k}: {grey:.2f} grey levels from the official preprocessing"
        with torch.no_grad():
            from_official_pixels = r.score_pixels(official[None], [prompt]).double().cpu()
        torch.testing.assert_close(from_official_pixels, torch.tensor(ref["other_scores"][k:k + 1]), rtol=1e-5, atol=1e-5)


def test_hps_is_exact_even_when_resizing(rewards):
    """HPSv2 resizes the float tensor (no PIL): the whole path matches, not only the model."""
    ref, meta = _ref("hps")
    for k, prompt in enumerate(meta["other_prompts"]):
        got = score(rewards["hps"], _tensor(ref[f"other_{k}"]), [prompt]).double()
        torch.testing.assert_close(got, torch.tensor(ref["other_scores"][k:k + 1]), rtol=1e-5, atol=1e-5)


def test_hps_config_and_checkpoint_variants(rewards, tmp_path):
    r = rewards["hps"]
    # head counts from the config (head_width 16 -> 2 vision heads; text heads 4), not from shapes
    assert r.model.config.vision_config.num_attention_heads == 2
    assert r.model.config.text_config.num_attention_heads == 4
    assert r.scale == 1.0 and r.preprocess_fn.mode == "pad"
    ref, meta = _ref("hps")
    x, prompts = _tensor(ref["exact_images"]), meta["exact_prompts"]
    want = score(r, x, prompts)
    # a bare state dict without the "module." prefix, named as a file
    d = tmp_path / "hps"
    shutil.copytree(FIXTURES / "hps", d)
    sd = torch.load(d / "HPS_tiny.pt", weights_only=True)["state_dict"]
    (d / "HPS_tiny.pt").unlink()
    torch.save({k.removeprefix("module."): v for k, v in sd.items()}, d / "HPS_v2.1_compressed.pt")
    torch.testing.assert_close(score(make_reward(f"hps@{d / 'HPS_v2.1_compressed.pt'}"), x, prompts), want)
    torch.save(sd, d / "HPS_v2_compressed.pt")
    with pytest.raises(NoiseSearchError, match="name one"):
        make_reward(f"hps@{d}")
    # without open_clip_config.json the model is ViT-H-14: the tiny checkpoint does not fit
    (d / "HPS_v2_compressed.pt").unlink()
    (d / "open_clip_config.json").unlink()
    with pytest.raises(NoiseSearchError, match="do not match ViT-H-14"):
        make_reward(f"hps@{d}")


def test_missing_files_and_offline_hub_names(tmp_path):
    with pytest.raises(NoiseSearchError, match="lacks ImageReward.pt"):
        make_reward(f"imagereward@{tmp_path}")
    with pytest.raises(NoiseSearchError, match="0 .pth heads"):
        make_reward(f"aesthetic@{tmp_path}")
    with pytest.raises(NoiseSearchError, match="needs a folder"):
        make_reward("aesthetic")
    with pytest.raises(NoiseSearchError, match="put HPS_v2"):
        make_reward(f"hps@{tmp_path}")
    with pytest.raises(NoiseSearchError, match="no folder"):
        make_reward("hps@/no/such/dir")
    for spec in ("hps", "hps@v2.0", "imagereward", "pickscore"):
        with pytest.raises(NoiseSearchError, match="Hugging Face hub"):
            make_reward(spec)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_through_module_only(rewards, name):
    """Gradients reach the trainable module's weights; cached text embeddings hold none."""
    import copy

    r = copy.deepcopy(rewards[name])
    assert not any(p.requires_grad for p in r.module.parameters())  # loaded for scoring: gradients off
    r.module.requires_grad_(True)  # as train-reward does to fine-tune
    x = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        out = r(x, ["a cat", "a dog"])
        assert out.shape == (2,) and out.requires_grad
        out.sum().backward()
    grads = [p.grad for p in r.module.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    if hasattr(r, "text_embeddings"):
        assert not r.text_embeddings(["a cat"]).requires_grad
        assert all(p.grad is None for p in r.model.text_model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_flops_counted_and_batches_agree(rewards, name):
    r = rewards[name]
    assert r.flops_per_image > 0
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))  # grayscale goes to 3 channels
    prompts = ["a cat", "a red dog", "a cat"]
    full = score(r, x, prompts)
    parts = torch.cat([score(r, x[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-5)


def test_imagereward_flops_include_the_text_encoder(rewards):
    r = rewards["imagereward"]
    vision = r.module.vision
    from noisesearch.flops import count_flops

    s = r.preprocess_fn.size
    v = count_flops(lambda: vision(pixel_values=torch.zeros(1, 3, s, s)))
    assert r.flops_per_image > v


def test_combinations_with_the_new_rewards():
    hps, pick = f"hps@{FIXTURES / 'hps'}", f"pickscore@{FIXTURES / 'pickscore'}"
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a cat"] * 2 + ["a dog"] * 2
    rs = make_reward(f"ranksum({hps},{pick})")
    out = score(rs, x, prompts)
    assert out.shape == (4,) and set(out.tolist()) <= {0.0, 1.0, 2.0}
    ws = make_reward(f"0.5*{hps}+2*{pick}")
    a, b = score(make_reward(hps), x, prompts), score(make_reward(pick), x, prompts)
    torch.testing.assert_close(score(ws, x, prompts), 0.5 * a + 2 * b, rtol=1e-5, atol=1e-5)
    assert ws.flops_per_image == pytest.approx(make_reward(hps).flops_per_image + make_reward(pick).flops_per_image)


# ---- preprocessing against transformers' CLIPImageProcessor (the PIL path) ----------------------
@pytest.mark.parametrize("hw", [(32, 32), (48, 80), (19, 37), (101, 64), (7, 9)])
def test_preprocessing_within_4_grey_levels_of_clip_image_processor(hw):
    from PIL import Image
    from transformers import CLIPImageProcessor

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=mean, image_std=std, resample=3)
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = rng.integers(0, 256, size=(4, *hw, 3), dtype=np.uint8)
    want = torch.from_numpy(np.stack(proc(images=[Image.fromarray(i) for i in img], return_tensors="np")["pixel_values"]))
    got = ImagePreprocess(32, mean, std, mode="crop", crop_rounding="floor")(_tensor(img))
    assert got.shape == want.shape
    grey = ((got - want).abs() * torch.tensor(std).view(1, 3, 1, 1)).max().item() * 255
    if hw == (32, 32):  # already the model's size: only the normalisation, exact up to float rounding
        assert grey < 1e-3
    else:
        assert grey <= 4.0


def test_pad_mode_geometry():
    pre = ImagePreprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), mode="pad", clamp=False)
    x = torch.ones(1, 3, 8, 16)
    out = pre(x)
    assert out.shape == (1, 3, 16, 16)
    assert torch.all(out[:, :, :4] == 0) and torch.all(out[:, :, 12:] == 0)  # pad 4 top, 4 bottom
    torch.testing.assert_close(out[:, :, 4:12], torch.ones(1, 3, 8, 16))
    assert ImagePreprocess(16, mode="pad")(torch.rand(2, 1, 16, 16)).shape == (2, 3, 16, 16)


def test_generate_eval_reward_writes_the_extra_scores(tmp_path, capsys):
    from noisesearch.cli import main
    from noisesearch.rewards.base import split_specs

    hps, pick = f"hps@{FIXTURES / 'hps'}", f"pickscore@{FIXTURES / 'pickscore'}"
    assert split_specs(f"{hps},ranksum(digit,brightness), {pick}") == [hps, "ranksum(digit,brightness)", pick]
    out = tmp_path / "run"
    code = main(["generate", "--model", "digits", "--guidance", "0", "--prompt", "3", "--prompt", "5", "--reward", "digit",
                 "--budget-nfe", "24", "--steps", "4", "--num-samples", "2", "--eval-reward", f"{hps},{pick}",
                 "--eval-reward", "brightness", "--no-progress", "--out", str(out), "--threads", "1"])
    assert code == 0
    assert "eval[" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval_rewards"]) - {"judge"} == {hps, pick, "brightness"}  # the digits judge is an eval reward too
    images = torch.from_numpy(np.load(out / "images.npy"))
    prompts = [s["prompt"] for s in report["samples"]]
    for spec in (hps, pick):
        want = score(make_reward(spec), images, prompts)
        got = torch.tensor([s["eval_rewards"][spec] for s in report["samples"]])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert report["eval_rewards"][spec]["mean"] == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-5)
        assert report["eval_rewards"][spec]["flops_per_image"] > 0
    assert "judge_accuracy" in report  # the digits judge still runs


def test_official_aesthetic_head_name_with_plus_signs(rewards, tmp_path):
    """``aesthetic@DIR/sac+logos+ava1-l14-linearMSE.pth``: the path is taken literally (no '+' split)."""
    d = tmp_path / "aesthetic"
    shutil.copytree(FIXTURES / "aesthetic", d)
    (d / "tiny-linearMSE.pth").rename(d / "sac+logos+ava1-l14-linearMSE.pth")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for spec in (f"aesthetic@{d / 'sac+logos+ava1-l14-linearMSE.pth'}", f"aesthetic@{d}"):
        torch.testing.assert_close(score(make_reward(spec), x, ["a", "b"]), score(rewards["aesthetic"], x, ["a", "b"]))
