"""CLIP score reward on a tiny random CLIPModel saved to disk, loaded through ``make_reward``."""
import pytest
import torch

pytest.importorskip("transformers")

from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.rewards import make_reward, score  # noqa: E402
from noisesearch.rewards.clip import DEFAULT_CLIP, ClipScore, clip_reward  # noqa: E402


@pytest.fixture(scope="module")
def reward(tiny_clip_dir):
    return make_reward(f"clip@{tiny_clip_dir}")


def images(n, c=3, h=24, w=40, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_loads_by_path_with_its_normalisation(reward, tiny_clip_dir):
    assert isinstance(reward, ClipScore)
    assert reward.name == f"clip@{tiny_clip_dir}"
    assert reward.image_size == 32
    torch.testing.assert_close(reward.mean.flatten(), torch.full((3,), 0.5))  # from preprocessor_config.json
    torch.testing.assert_close(reward.std.flatten(), torch.full((3,), 0.25))


def test_shape_and_determinism(reward):
    x = images(4)
    prompts = ["a cat", "a dog", "a photo", "a red cat"]
    a = score(reward, x, prompts)
    b = score(reward, x, prompts)
    assert a.shape == (4,) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a second instance loaded from the same directory agrees (no hidden randomness)
    c = score(make_reward(f"clip@{reward.name.split('@', 1)[1]}"), x, prompts)
    torch.testing.assert_close(a, c)
    # the score is scale * cosine: bounded by the model's logit scale
    assert (a.abs() <= reward.scale + 1e-4).all()


def test_identical_images_identical_scores_and_prompts_matter(reward):
    one = images(1)
    x = one.repeat(3, 1, 1, 1)
    same = score(reward, x, ["a cat"] * 3)
    # batch positions may differ in the last bits (CPU kernels): equal within float tolerance
    torch.testing.assert_close(same, same[:1].expand(3), rtol=1e-5, atol=1e-5)
    diff = score(reward, x, ["a cat", "a dog", "a photo of a red cat"])
    assert min(abs(a - b) for i, a in enumerate(diff.tolist()) for b in diff.tolist()[i + 1:]) > 1e-4
    # batching does not change a score
    torch.testing.assert_close(score(reward, one, ["a dog"]), diff[1:2], rtol=1e-5, atol=1e-5)


def test_grayscale_and_preprocessing(reward):
    gray = images(2, c=1, h=32, w=32)
    torch.testing.assert_close(score(reward, gray, ["a cat"] * 2), score(reward, gray.repeat(1, 3, 1, 1), ["a cat"] * 2))
    pix = reward.preprocess(images(2, h=50, w=20))
    assert pix.shape == (2, 3, 32, 32)
    # a constant image normalises to (v - mean) / std everywhere
    flat = reward.preprocess(torch.full((1, 3, 16, 16), 0.75))
    torch.testing.assert_close(flat, torch.full_like(flat, (0.75 - 0.5) / 0.25), rtol=1e-5, atol=1e-5)
    with pytest.raises(NoiseSearchError):
        reward.preprocess(torch.rand(1, 2, 8, 8))


def test_flops(reward):
    assert reward.flops_per_image > 0 and reward.flops_per_prompt > 0
    # the vision tower of a 32x32 image in 8x8 patches: at least the patch-embedding matmul
    assert reward.flops_per_image >= 2 * 16 * (3 * 8 * 8) * 32


def test_hub_name_offline_error():
    with pytest.raises(NoiseSearchError, match="clip@/local/path"):
        make_reward("clip@noisesearch-tests/no-such-clip")


def test_default_hub_model_offline_error():
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_CLIP, "config.json"), str):
        pytest.skip(f"{DEFAULT_CLIP} is in the local cache: loading it offline works")
    with pytest.raises(NoiseSearchError, match="HF_HUB_OFFLINE.*clip@/local/path"):
        clip_reward(None, "cpu")


def test_bad_paths(tmp_path):
    with pytest.raises(NoiseSearchError, match="neither a local directory"):
        make_reward("clip@/no/such/dir")
    with pytest.raises(NoiseSearchError, match="has no config.json"):
        make_reward(f"clip@{tmp_path}")


# ---- strict loading (issue 20): nothing loads "mostly" -------------------------------------------------
def _copy(tiny_clip_dir, tmp_path):
    import shutil
    from pathlib import Path

    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    return Path(d)


def _set(d, section, **kw):
    import json

    cfg = json.loads((d / "config.json").read_text())
    cfg[section].update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("section, change, message", [
    ("vision_config", {"num_hidden_layers": 3}, r"missing \(vision_model\.encoder\.layers\.2"),
    ("vision_config", {"num_hidden_layers": -4}, "num_hidden_layers = -4 is out of range"),
    ("vision_config", {"num_hidden_layers": 1}, r"unexpected \(vision_model\.encoder\.layers\.1"),
    ("text_config", {"hidden_size": 48}, "mis-shaped"),
    ("text_config", {"vocab_size": 10**9}, "vocab_size = 1000000000 is out of range"),
], ids=["more-layers", "negative-layers", "fewer-layers", "misshaped", "absurd-vocab"])
def test_config_that_does_not_match_the_weights_is_refused(tiny_clip_dir, tmp_path, section, change, message):
    d = _copy(tiny_clip_dir, tmp_path)
    _set(d, section, **change)
    with pytest.raises(NoiseSearchError, match=message) as e:
        make_reward(f"clip@{d}")
    assert len(str(e.value).splitlines()) == 1 and "config.json" in str(e.value)


def test_missing_tokenizer_is_refused_not_a_two_token_one(tiny_clip_dir, tmp_path):
    d = _copy(tiny_clip_dir, tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # tokenizer_config.json stays: transformers alone
        if (d / name).exists():                                    # would build a 2-token tokenizer from it
            (d / name).unlink()
    with pytest.raises(NoiseSearchError, match="lacks the tokenizer files"):
        make_reward(f"clip@{d}")


def test_loaded_for_scoring_without_gradients(reward):
    assert not any(p.requires_grad for p in reward.model.parameters())
    with torch.enable_grad():
        assert not reward(images(2), ["a cat", "a dog"]).requires_grad


@pytest.mark.parametrize("section, change, message", [
    ("vision_config", {"num_hidden_layers": 3}, "do not match its config: .*missing"),
    ("vision_config", {"num_hidden_layers": 1}, "do not match its config: .*unexpected"),
    ("text_config", {"intermediate_size": 40}, "do not match its config"),
], ids=["more-layers", "fewer-layers", "misshaped"])
def test_pytorch_bin_folder_is_checked_by_the_loading_report(tiny_clip_dir, tmp_path, section, change, message):
    """Without safetensors headers to read, transformers' loading report decides, with the same strictness."""
    from safetensors.torch import load_file

    d = _copy(tiny_clip_dir, tmp_path)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    make_reward(f"clip@{d}")  # as saved: loads
    _set(d, section, **change)
    with pytest.raises(NoiseSearchError, match=message) as e:
        make_reward(f"clip@{d}")
    assert len(str(e.value).splitlines()) == 1 and "above report" not in str(e.value)
