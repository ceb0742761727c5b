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
    torch.testing.assert_close(same, same[:1].expand(3), rtol=1e-5, atol=1e-5)  # batch positions: not bitwise
    diff = score(reward, x, ["a cat", "a dog", "a photo of a red cat"])
    assert len(set(diff.tolist())) == 3
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
    with pytest.raises(NoiseSearchError, match="cannot load"):
        make_reward(f"clip@{tmp_path}")
