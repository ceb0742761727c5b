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


# ---- the digit reward's inference path (issue 19, overhead) -------------------------------
def _conv_reference_logits(module, images01):
    """DigitPatchCNN as two real 2x2 stride-2 convolutions (``F.conv2d``) with its weights: what its
    patch-wise ``Linear`` layers must compute."""
    from torch.nn import functional as F

    c1, c2 = module.conv1.out_features, module.conv2.out_features
    w1 = module.conv1.weight.reshape(c1, 1, 2, 2)  # patch pixels row-major
    w2 = module.conv2.weight.reshape(c2, 2, 2, c1).permute(0, 3, 1, 2)  # block positions row-major, channels last
    h = F.relu(F.conv2d(images01 * 2 - 1, w1, module.conv1.bias, stride=2))  # [B, c1, 4, 4]
    h = F.relu(F.conv2d(h, w2, module.conv2.bias, stride=2))  # [B, c2, 2, 2]
    return module.fc(h.permute(0, 2, 3, 1).flatten(1))  # positions row-major, channels last


@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17, 80, 320, 1100])
def test_digit_reward_is_the_patch_convolution(batch):
    from torch.nn import functional as F

    from noisesearch.rewards.digit import CHUNK, load_classifier

    clf = load_classifier()
    g = torch.Generator().manual_seed(batch)
    images = (torch.randn(batch, 1, 8, 8, generator=g) * 0.6 + 0.5).clamp(0, 1)
    prompts = [str(i % 10) for i in range(batch)]
    targets = torch.tensor([i % 10 for i in range(batch)])
    with torch.no_grad():  # the scoring path (Problem.score) runs without gradients
        logits = clf.logits(images)
        torch.testing.assert_close(logits, _conv_reference_logits(clf.module, images), rtol=1e-5, atol=1e-5)
        if batch <= CHUNK:  # one chunk: the module's own forward, bit for bit
            assert torch.equal(logits, clf.module(images))
        want = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        assert torch.equal(clf(images, prompts), want)
        assert torch.equal(score(clf, images, prompts), want)
        assert torch.equal(clf.predict(images)[0], logits.argmax(1))
    # with gradients on, the plain path: the same values
    torch.testing.assert_close(clf.logits(images), logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["patch", "cnn"])
def test_digit_classifier_still_trains_with_dropout(arch):
    from noisesearch.rewards.digit import build_classifier

    torch.manual_seed(0)
    m = build_classifier({"arch": arch}).train()
    x = torch.rand(20, 1, 8, 8)
    a, b = m(x), m(x)
    assert not torch.equal(a, b)  # dropout is active in training mode
    a.sum().backward()
    first = m.conv1.weight.grad
    assert first is not None and first.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))  # no dropout in eval mode
    if arch == "patch":
        torch.testing.assert_close(m(x), _conv_reference_logits(m, x), rtol=1e-5, atol=1e-5)


def test_digit_targets_fast_lookup_and_errors():
    from noisesearch.rewards.digit import parse_targets

    assert parse_targets(["3", " 7 ", "0"], "r").tolist() == [3, 7, 0]
    assert parse_targets("5", "r").tolist() == [5]
    with pytest.raises(NoiseSearchError, match="r does not know the prompt '12'"):
        parse_targets(["1", "12"], "r")
    with pytest.raises(NoiseSearchError):
        parse_targets("12", "r")
    with pytest.raises(NoiseSearchError):
        parse_targets([None], "r")
