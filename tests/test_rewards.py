import pytest
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.rewards import RankSum, WeightedSum, make_reward, score
from noisesearch.rewards.simple import Brightness, Compressibility


def test_brightness_is_mean_intensity():
    imgs = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5), torch.ones(1, 8, 8)])
    assert make_reward("brightness")(imgs, ["a"] * 3).tolist() == [0.0, 0.5, 1.0]
    rgb = torch.ones(2, 3, 4, 4)
    assert torch.allclose(Brightness()(rgb, ["a", "b"]), torch.ones(2))


def test_compressibility_prefers_flat_images_over_noise():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 1, 8, 8), 0.3)
    noisy = torch.rand(1, 1, 8, 8, generator=g)
    r = Compressibility()(torch.cat([flat, noisy]), ["x", "x"])
    assert r[0] > r[1] and (r < 0).all()


class Const:
    def __init__(self, values, name="c"):
        self.values, self.name, self.flops_per_image = torch.tensor(values), name, 3.0

    def __call__(self, images, prompts):
        return self.values[: images.shape[0]]


def test_weighted_sum_and_rank_sum():
    imgs = torch.zeros(4, 1, 2, 2)
    a, b = Const([1.0, 2.0, 3.0, 4.0], "a"), Const([40.0, 30.0, 20.0, 10.0], "b")
    ws = WeightedSum([a, b], [2.0, 0.5])
    assert ws(imgs, ["p"] * 4).tolist() == [22.0, 19.0, 16.0, 13.0]
    assert ws.flops_per_image == 6.0
    rs = RankSum([a, Const([0.0, 5.0, 1.0, 9.0], "c")])
    # ranks within the prompt group: a -> 0,1,2,3 ; c -> 0,2,1,3
    assert rs(imgs, ["p"] * 4).tolist() == [0.0, 3.0, 3.0, 6.0]
    # groups are ranked separately
    assert rs(imgs, ["p", "p", "q", "q"]).tolist() == [0.0, 2.0, 0.0, 2.0]


def test_spec_parsing():
    r = make_reward("0.7*brightness+0.3*compressibility")
    assert isinstance(r, WeightedSum) and r.weights == [0.7, 0.3]
    assert isinstance(make_reward("ranksum(brightness,compressibility)"), RankSum)
    assert make_reward("compressibility@50").quality == 50


def test_unknown_reward_lists_valid_names():
    with pytest.raises(NoiseSearchError, match="valid rewards: digit, .*brightness.*compressibility"):
        make_reward("sharpness")


def test_nan_and_wrong_shape_are_clear_errors():
    imgs = torch.zeros(3, 1, 2, 2)
    with pytest.raises(NoiseSearchError, match="non-finite"):
        score(Const([1.0, float("nan"), 2.0]), imgs, ["p"] * 3)
    with pytest.raises(NoiseSearchError, match="one value per image"):
        score(Const([1.0, 2.0]), imgs, ["p"] * 3)
    with pytest.raises(NoiseSearchError, match="prompts"):
        score(Const([1.0, 2.0, 3.0]), imgs, ["p"] * 2)
