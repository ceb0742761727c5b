"""Noise-aware rewards: curriculum training (full and LoRA), resume, loading, step awareness, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from noisesearch.api.pool import generate_pool
from noisesearch.errors import NoiseSearchError
from noisesearch.rewards import make_reward, score
from noisesearch.rewards.noise_aware import NoiseAwareReward, load_noise_aware, load_stage
from noisesearch.train.noise_aware import TrainConfig, spearman_per_prompt, topk_recall, train_noise_aware

CFG = dict(reward="digit", iters=6, batch_size=32, lr=1e-3, holdout=0.25, gate=False)



@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("na") / "pool"
    generate_pool("digits", ["digit"], [str(i) for i in range(10)], 8, d, guidance=0, steps=6, seed=11, save_images=True)
    return d


@pytest.fixture(scope="module")
def trained(pool_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("na") / "reward"
    manifest = train_noise_aware(pool_dir, out, TrainConfig(steps=(1, 3), **CFG), log=lambda *a: None)
    return out, manifest


def test_metrics():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    ours = spearman_per_prompt(a, b)
    ref = [spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert spearman_per_prompt(a, a) == pytest.approx([1, 1, 1])
    assert topk_recall(a, a, 5).tolist() == [1, 1, 1]
    assert topk_recall(np.array([[1, 2, 3, 4.0]]), np.array([[4, 3, 2, 1.0]]), 2).tolist() == [0.0]


def test_training_writes_stages_and_the_reward_knows_its_step(trained, pool_dir):
    out, m = trained
    assert m["steps"] == [1, 3] and m["curriculum"] == [3, 1]  # late -> early
    assert [s["lr"] for s in m["stages"]] == pytest.approx([1e-3, 1e-3 * 0.9])
    assert m["num_steps"] == 6 and m["sigmas"][-1] == 0.0 and m["base_reward"] == "digit"
    for s in m["stages"]:
        assert {"heldout_spearman", "heldout_spearman_base", "loss_first", "loss_last"} <= set(s)
    r = make_reward(f"noise-aware@{out}")
    assert isinstance(r, NoiseAwareReward) and r.steps == [1, 3]
    base = make_reward("digit")
    assert r.flops_per_image == base.flops_per_image
    images = torch.rand(5, 1, 8, 8)
    prompts = list("01234")
    # uncovered steps and the final image: the base reward; covered steps: that stage's weights
    for step in (0, 2, 4, 5, None):
        assert torch.equal(r.score_at(images, prompts, step=step), score(base, images, prompts))
    s3 = r.score_at(images, prompts, step=3)
    s1 = r.score_at(images, prompts, step=1)
    assert not torch.allclose(s3, s1) and not torch.allclose(s3, score(base, images, prompts))
    ref = make_reward("digit")
    ref.module.load_state_dict(load_stage(out / "stage_03.safetensors"))
    assert torch.allclose(s3, score(ref, images, prompts))
    # bound to a step it is a plain reward; by sigma it picks the stage trained at that noise level
    assert torch.equal(score(r.at(step=3), images, prompts), s3)
    assert torch.equal(r.score_at(images, prompts, sigma=m["sigmas"][3] * 1.01), s3)
    assert torch.equal(r.score_at(images, prompts, step=4, sigma=m["sigmas"][1]), s1)  # sigma wins when it disagrees
    assert r.covers(step=3) and not r.covers(step=5) and not r.covers(sigma=0.0)
    r.step = 1
    assert torch.equal(score(r, images, prompts), s1)
    with pytest.raises(NoiseSearchError, match="out of range"):
        r.score_at(images, prompts, step=6)


def test_noise_aware_reward_in_a_pool(trained, tmp_path):
    out, _ = trained
    pool = generate_pool("digits", [f"noise-aware@{out}"], ["2", "5"], 4, tmp_path / "p", guidance=0, steps=6, seed=1)
    assert set(pool.rewards) == {"digit"} and set(pool.noise_aware) == {"digit"}
    na = pool.noise_aware["digit"]
    assert np.isnan(na[:, :, [0, 2, 4, 5]]).all() and np.isfinite(na[:, :, [1, 3]]).all()
    assert not np.allclose(na[:, :, 3], pool.rewards["digit"][:, :, 3])


def test_resume_after_interruption_equals_uninterrupted(pool_dir, trained, tmp_path):
    out_full, _ = trained
    out = tmp_path / "r"
    cfg = TrainConfig(steps=(1, 3), **CFG)
    state = train_noise_aware(pool_dir, out, cfg, log=lambda *a: None, stop_after=1)
    assert [s["step"] for s in state["stages"]] == [3] and not (out / "noise_aware.json").exists()
    with pytest.raises(NoiseSearchError, match="not finished"):
        load_noise_aware(str(out))
    logs = []
    m = train_noise_aware(pool_dir, out, cfg, log=logs.append)
    assert any("resuming" in x for x in logs) and m["steps"] == [1, 3]
    for f in ("stage_01.safetensors", "stage_03.safetensors"):
        a, b = load_stage(out / f), load_stage(out_full / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    with pytest.raises(NoiseSearchError, match="other settings"):
        train_noise_aware(pool_dir, out, TrainConfig(steps=(1, 3), **{**CFG, "iters": 7}), log=lambda *a: None)


def test_lora_trains_an_adapter_and_merges_it(pool_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    cfg = TrainConfig(steps=(2,), lora_rank=2, **{**CFG, "lr": 5e-3, "iters": 8})
    m = train_noise_aware(pool_dir, out, cfg, log=lambda *a: None)
    tensors = load_stage(out / m["stages"][0]["file"])
    base = make_reward("digit").module.state_dict()
    assert set(tensors) == set(base)  # merged: a plain state dict of the base module
    changed = [k for k in base if not torch.equal(tensors[k], base[k])]
    assert changed and all(k.endswith("weight") for k in changed)  # LoRA moves weights, not biases


def test_gate_falls_back_to_the_base_reward_where_a_stage_does_not_help(pool_dir, tmp_path):
    cfg = TrainConfig(steps=(4,), **{**CFG, "gate": True, "lr": 1.0, "iters": 4})  # a learning rate that wrecks it
    m = train_noise_aware(pool_dir, tmp_path / "gate", cfg, log=lambda *a: None)
    assert m["stages"][0]["use"] is False and m["steps"] == []
    assert m["stages"][0]["heldout_spearman"] <= m["stages"][0]["heldout_spearman_base"]
    r = load_noise_aware(str(tmp_path / "gate"))
    images = torch.rand(4, 1, 8, 8)
    assert not r.covers(step=4)
    assert torch.equal(r.score_at(images, list("0123"), step=4), score(make_reward("digit"), images, list("0123")))


def test_training_reduces_the_distillation_loss(pool_dir, tmp_path):
    m = train_noise_aware(pool_dir, tmp_path / "fit", TrainConfig(steps=(2,), **{**CFG, "iters": 40, "lr": 2e-3}),
                          log=lambda *a: None)
    s = m["stages"][0]
    assert s["loss_last"] < 0.8 * s["loss_first"]


def test_bad_inputs_exit_2(pool_dir, trained, tmp_path, capsys):
    from types import SimpleNamespace

    from noisesearch.cli import main

    out, _ = trained

    def cli(*args):
        capsys.readouterr()
        code = main(list(args) + ["--no-progress"])
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    r = cli("train-reward", "--pool", str(tmp_path / "missing"), "--reward", "digit", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "pool not found" in r.stderr
    r = cli("train-reward", "--pool", str(pool_dir), "--reward", "brightness", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no reward 'brightness'" in r.stderr
    noimg = tmp_path / "noimg"
    generate_pool("digits", ["digit"], ["1"], 2, noimg, guidance=0, steps=4)
    r = cli("train-reward", "--pool", str(noimg), "--reward", "digit", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--save-images" in r.stderr
    r = cli("train-reward", "--pool", str(pool_dir), "--reward", "digit", "--out", str(tmp_path / "o"), "--steps", "5")
    assert r.returncode == 2 and "out of range" in r.stderr

    # a corrupt checkpoint: truncated stage file, then a broken manifest
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    stage = bad / "stage_01.safetensors"
    stage.write_bytes(stage.read_bytes()[:-100])
    with pytest.raises(NoiseSearchError, match="corrupt|checksum"):
        load_noise_aware(str(bad))
    r = cli("generate", "--model", "digits", "--guidance", "0", "--prompt", "3", "--reward", f"noise-aware@{bad}",
            "--budget-nfe", "18", "--out", str(tmp_path / "g"), "--no-progress")
    assert r.returncode == 2 and "noise-aware" in r.stderr
    (bad / "noise_aware.json").write_text("{not json")
    with pytest.raises(NoiseSearchError, match="corrupt"):
        load_noise_aware(str(bad))
    with pytest.raises(NoiseSearchError, match="needs its checkpoint folder"):
        make_reward("noise-aware")


def test_noise_aware_reward_in_generate_is_the_final_reward(trained):
    from noisesearch import api

    out, _ = trained
    run = api.generate(model="digits", prompts=["4"], guidance=0, reward=f"noise-aware@{out}", strategy="best-of-n",
                       budget_nfe=12, steps=6, seed=0, evaluate=False)
    base = api.generate(model="digits", prompts=["4"], guidance=0, reward="digit", strategy="best-of-n",
                        budget_nfe=12, steps=6, seed=0, evaluate=False)
    assert run.report["reward_mean"] == pytest.approx(base.report["reward_mean"])


# ---- identity, locks, gradients, streaming ---------------------------------------------------------------
def _copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_stage_file_copied_over_another_is_refused(trained, tmp_path, capsys):
    from noisesearch.cli import main

    out, _ = trained
    bad = _copy_dir(out, tmp_path / "swapped")
    (bad / "stage_03.safetensors").write_bytes((bad / "stage_01.safetensors").read_bytes())  # checksum is its own
    with pytest.raises(NoiseSearchError, match="holds the weights of step 1.*not of step 3"):
        load_noise_aware(str(bad))
    capsys.readouterr()
    code = main(["generate", "--model", "digits", "--guidance", "0", "--prompt", "3", "--reward", "digit", "--steps", "6",
                 "--strategy", "ttsnap", "--prune-reward", f"noise-aware@{bad}", "--prune-steps", "1,3", "--keep", "0.5,0.5",
                 "--budget-nfe", "60", "--out", str(tmp_path / "g"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "not of step 3" in err and len(err.strip().splitlines()) == 1
    # the rerun of the training refuses it too (instead of keeping it as a finished stage)
    (bad / "noise_aware.json").unlink()
    with pytest.raises(NoiseSearchError, match="not of step 3"):
        train_noise_aware(_pool_of(trained), bad, TrainConfig(steps=(1, 3), **CFG), log=lambda *a: None)


def _pool_of(trained):
    import json

    out, _ = trained
    return json.loads((out / "noise_aware.json").read_text())["pool"]


def test_a_stage_of_another_training_run_is_refused(pool_dir, trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    train_noise_aware(pool_dir, other, TrainConfig(steps=(1, 3), **{**CFG, "seed": 5}), log=lambda *a: None)
    bad = _copy_dir(out, tmp_path / "mixed")
    (bad / "stage_03.safetensors").write_bytes((other / "stage_03.safetensors").read_bytes())
    with pytest.raises(NoiseSearchError, match="another training run"):
        load_noise_aware(str(bad))


def test_two_trainings_into_one_folder_are_refused(pool_dir, tmp_path):
    from noisesearch.io import output_lock

    with output_lock(tmp_path / "r", "another run"):
        with pytest.raises(NoiseSearchError, match="in use by another run"):
            train_noise_aware(pool_dir, tmp_path / "r", TrainConfig(steps=(3,), **CFG), log=lambda *a: None)


def test_training_turns_gradients_on_for_a_reward_loaded_without_them(pool_dir, tmp_path, monkeypatch):
    import noisesearch.train.noise_aware as na

    def frozen(spec, device="cpu"):
        r = make_reward(spec, device=device)
        r.module.requires_grad_(False)  # as the reward loaders hand rewards out for scoring
        return r

    monkeypatch.setattr(na, "make_reward", frozen)
    m = train_noise_aware(pool_dir, tmp_path / "r", TrainConfig(steps=(3,), **{**CFG, "iters": 20, "lr": 2e-3}),
                          log=lambda *a: None)
    tensors = load_stage(tmp_path / "r" / "stage_03.safetensors")
    base = make_reward("digit").module.state_dict()
    assert any(not torch.equal(tensors[k], base[k]) for k in base)
    assert m["stages"][0]["loss_last"] < m["stages"][0]["loss_first"]


def test_training_data_is_read_from_the_stored_images(pool_dir):
    from noisesearch.pools import PoolImages, load_pool, load_pool_images
    from noisesearch.train.pool_data import EstimateDataset

    pool = load_pool(pool_dir)
    images = load_pool_images(pool_dir)
    data = EstimateDataset(pool, PoolImages(pool_dir, pool, max_open=2), "digit", 0.25)
    assert len(data) == int(np.prod(pool.shape))
    x, y, prompt = data[int(np.ravel_multi_index((3, 5, 2), pool.shape))]
    assert torch.equal(x, torch.from_numpy(images[3, 5, 2]).float() / 255)
    assert y == pytest.approx(pool.rewards["digit"][3, 5, -1]) and prompt == pool.prompts[3]
    rows_p, rows_c, steps = np.array([9, 0, 4]), np.array([1, 7, 2]), np.array([5, 0, 3])
    xb, yb, prompts = data.batch(rows_p, rows_c, steps, "cpu")
    assert torch.equal(xb, torch.from_numpy(images[rows_p, rows_c, steps]).float() / 255)
    assert prompts == [pool.prompts[i] for i in rows_p]


def test_a_stage_that_does_not_fit_the_reward_is_refused_at_load(trained):
    out, m = trained
    r = make_reward(f"noise-aware@{out}")
    stage = dict(r.stages[1])
    name = next(iter(stage))
    for broken in ({**stage, name: torch.zeros(3, 3)}, {k: v for k, v in stage.items() if k != name},
                   {**stage, "extra.weight": torch.zeros(2)}):
        with pytest.raises(NoiseSearchError, match="step 1 do not fit") as e:
            NoiseAwareReward(make_reward("digit"), "digit", {1: broken, 3: r.stages[3]}, r.manifest, out)
        assert "\n" not in str(e.value)
