"""The built-in digits model, the ``digit`` reward classifier and the judge (shipped weights)."""
from __future__ import annotations

import shutil

import pytest
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.models import load_model
from noisesearch.models.base import Denoiser
from noisesearch.models.digits import DENOISER_FILE, SPLIT_FILE, WEIGHTS_DIR, DigitsDenoiser
from noisesearch.rewards import Reward, make_reward, score
from noisesearch.rewards.digit import CLASSIFIER_FILE, JUDGE_FILE, load_classifier, load_judge
from noisesearch.train.digits import load_split, make_split, sample_digits, split_data

# Measured with `python -m noisesearch.train.digits --eval` (docs/digits.md) minus a margin.
CLASSIFIER_MIN_TEST_ACC = 0.97  # measured 0.9833 (295 / 300)
JUDGE_MIN_TEST_ACC = 0.95  # measured 0.9767 (293 / 300)
SAMPLES_MIN_JUDGE_ACC = 0.90  # 64 samples at guidance 1; measured 1.000 on 1000 samples


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def den1():
    return DigitsDenoiser(guidance=1.0)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def test_images():
    x, y = split_data(load_split(), "test")
    return (x + 1) / 2, y


def test_shipped_weights_load(den1, clf, judge):
    assert isinstance(den1, Denoiser)
    assert den1.name == "digits" and den1.sample_shape == (1, 8, 8) and den1.dtype == torch.float32
    assert (den1.sigma_min, den1.sigma_max, den1.default_steps) == (0.002, 80.0, 18)
    assert isinstance(clf, Reward) and isinstance(judge, Reward)
    assert clf.name == "digit" and judge.name == "judge"
    assert type(clf.module) is not type(judge.module)  # different architectures
    for f in (DENOISER_FILE, CLASSIFIER_FILE, JUDGE_FILE):
        assert (WEIGHTS_DIR / f).stat().st_size < 10 * 2**20
    assert isinstance(load_model("digits", "cpu", guidance=2.0), DigitsDenoiser)


def test_split_is_seeded_and_disjoint():
    split = load_split()
    assert split == make_split(0)
    parts = [set(split[k]) for k in ("test", "train_a", "train_b")]
    assert sum(map(len, parts)) == len(set.union(*parts)) == 1797
    assert len(split["test"]) == 300 and abs(len(split["train_a"]) - len(split["train_b"])) <= 10


def test_encode(den1):
    assert den1.encode(["0", " 7 ", "9"]).tolist() == [0, 7, 9]
    for bad in (["x"], ["12"], [""], ["-1"]):
        with pytest.raises(NoiseSearchError, match="valid prompts"):
            den1.encode(bad)


def test_guidance_branches_and_flops(den1):
    den0, den2 = DigitsDenoiser(guidance=0.0), DigitsDenoiser(guidance=2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=g) * 2
    sigma = torch.full((8,), 2.0)
    cond = den1.encode([str(i) for i in range(8)])
    out = [d(x, sigma, cond) for d in (den0, den1, den2)]
    for o in out:
        assert o.shape == x.shape and torch.isfinite(o).all()
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    torch.testing.assert_close(out[2], out[0] + 2 * (out[1] - out[0]), atol=1e-5, rtol=1e-5)  # CFG
    assert den1.flops_per_call > 0
    assert den0.flops_per_call == den1.flops_per_call
    assert den2.flops_per_call == 2 * den1.flops_per_call
    img = den1.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(5, 1, 1, 1).expand(5, 1, 8, 8))
    assert img.shape == (5, 1, 8, 8) and img.min() == 0 and img.max() == 1 and img[2].eq(0.5).all()


def test_stored_flops_match_flop_counter(den1, clf, judge):
    """The FLOPs stored in the weights' metadata are what FlopCounterMode measures now."""
    from noisesearch.models.digits import measure_call_flops
    from noisesearch.rewards.digit import measure_image_flops

    assert measure_call_flops(den1.model)["1"] == den1.flops_per_call
    assert measure_image_flops(clf.module) == clf.flops_per_image
    assert measure_image_flops(judge.module) == judge.flops_per_image


def test_edm_preconditioning_limits(den1):
    """At tiny sigma D(x) ~= x (c_skip -> 1, c_out -> 0)."""
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = den1(x, torch.full((4,), 1e-4), den1.encode(["1"] * 4))
    torch.testing.assert_close(out, x, atol=1e-3, rtol=0)


@pytest.mark.parametrize("fname", [DENOISER_FILE, CLASSIFIER_FILE, JUDGE_FILE])
def test_bad_weights_files(tmp_path, fname):
    def load(path):
        if fname == DENOISER_FILE:
            return DigitsDenoiser(weights=path)
        return (load_classifier if fname == CLASSIFIER_FILE else load_judge)(weights=path)

    path = tmp_path / fname
    with pytest.raises(NoiseSearchError, match="train-digits"):
        load(path)  # missing
    shutil.copy(WEIGHTS_DIR / fname, path)
    load(path)  # an intact copy loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(NoiseSearchError, match="corrupt or truncated"):
        load(path)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # a corrupt tensor byte
    path.write_bytes(bytes(flipped))
    with pytest.raises(NoiseSearchError, match="checksum"):
        load(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(NoiseSearchError, match="train-digits"):
        load(path)


def test_classifier_and_judge_test_accuracy(clf, judge, test_images):
    x01, y = test_images
    c_cls, p_cls = clf.predict(x01)
    c_jdg, p_jdg = judge.predict(x01)
    assert c_cls.dtype == torch.long and p_cls.shape == (len(y),) and (p_cls <= 1).all()
    assert (c_cls == y).float().mean() >= CLASSIFIER_MIN_TEST_ACC
    assert (c_jdg == y).float().mean() >= JUDGE_MIN_TEST_ACC


def test_conditional_samples_are_recognised_by_the_judge(den1, judge):
    labels = torch.arange(64) % 10
    images = sample_digits(den1, labels, seed=123)
    assert images.shape == (64, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    classes, _ = judge.predict(images)
    assert (classes == labels).float().mean() >= SAMPLES_MIN_JUDGE_ACC


def test_reward_values_and_errors(clf, judge, test_images):
    x01, y = test_images
    prompts = [str(int(d)) for d in y[:16]]
    for r in (clf, judge, make_reward("digit"), make_reward("judge")):
        v = score(r, x01[:16], prompts)
        assert v.shape == (16,)
        if r.name == "judge":  # the judge's verdict: 1 where it reads the target digit (its mean is the accuracy)
            assert set(v.tolist()) <= {0.0, 1.0}
        else:  # the classifier: log p(target digit | image)
            assert (v <= 0).all()
        assert r.flops_per_image > 0
        # the right digit scores higher than a wrong one on average
        wrong = [str((int(d) + 1) % 10) for d in y[:16]]
        assert v.mean() > score(r, x01[:16], wrong).mean()
        with pytest.raises(NoiseSearchError, match=r"\[B, 1, 8, 8\]"):
            r(x01[:4, 0], prompts[:4])
        with pytest.raises(NoiseSearchError, match=r"\[B, 1, 8, 8\]"):
            r(torch.rand(4, 3, 8, 8), prompts[:4])
        with pytest.raises(NoiseSearchError, match="prompts"):
            r(x01[:2], ["3", "cat"])


def test_train_digits_cli_writes_loadable_files(tmp_path, capsys):
    from noisesearch.cli import main

    rc = main(["train-digits", "--out", str(tmp_path), "--what", "judge", "--classifier-epochs", "1", "--no-progress"])
    assert rc == 0
    assert "test accuracy" in capsys.readouterr().out
    assert load_split(tmp_path / SPLIT_FILE) == load_split()
    assert load_judge(weights=tmp_path / JUDGE_FILE).predict(torch.zeros(2, 1, 8, 8))[0].shape == (2,)
    assert main(["train-digits", "--out", str(tmp_path), "--epochs", "0"]) == 2


def test_strided_max_pool_equals_max_pool2d():
    from torch.nn import functional as F

    from noisesearch.rewards.digit import max_pool2

    h = torch.randn(7, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    h[:, :, :4] = torch.relu(h[:, :, :4])  # ties at zero, as after a ReLU
    assert torch.equal(max_pool2(h), F.max_pool2d(h, 2))
    assert torch.equal(max_pool2(h[:, :, :4, :4]), F.max_pool2d(h[:, :, :4, :4], 2))


def test_large_batches_are_classified_in_chunks():
    from noisesearch.rewards.digit import CHUNK

    clf = load_classifier()
    images = torch.rand(2 * CHUNK + 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    clf.module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    logits = clf.logits(images)
    assert calls == [CHUNK, CHUNK, 3] and logits.shape == (2 * CHUNK + 3, 10)
    with torch.no_grad():  # each row's logits are its own: the same as one pass over every row
        whole = clf.module(images)
    assert torch.allclose(logits, whole, atol=1e-5)
    rewards = clf(images, [str(i % 10) for i in range(len(images))])
    assert rewards.shape == (len(images),) and bool((rewards <= 0).all())
