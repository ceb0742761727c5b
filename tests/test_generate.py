"""End-to-end tests of `noisesearch generate` on the built-in digits model (shipped weights)."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from noisesearch import api
from noisesearch.cli import main
from noisesearch.rewards import register_reward
from noisesearch.rewards.base import REWARDS

BASE = ["generate", "--model", "digits", "--guidance", "0", "--reward", "digit", "--no-progress", "--quiet"]


def run_cli(tmp_path, *extra, out="run"):
    code = main(BASE + ["--out", str(tmp_path / out), *extra])
    return code, tmp_path / out


def test_the_documented_command_writes_a_complete_run(tmp_path):
    code, out = run_cli(tmp_path, "--prompt", "3", "--strategy", "best-of-n", "--budget-nfe", "72", "--num-samples", "4", "--seed", "0")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ["strategy", "params", "seed", "samples", "reward_mean", "judge_accuracy", "nfe_max", "reward_calls", "flops", "wall_seconds"]:
        assert key in report, key
    assert report["strategy"] == "best-of-n" and report["seed"] == 0
    assert len(report["samples"]) == 4
    for s in report["samples"]:
        assert s["prompt"] == "3" and s["nfe"] == 72 and 0 <= s["judge_class"] <= 9 and 0 < s["judge_prob"] <= 1
        assert (out / s["file"]).exists()
    # best-of-4 at 72 NFEs: 4 candidates x 18 steps, one reward call each
    assert report["nfe_max"] == 72 and report["reward_calls"] == 16 and report["strategy_info"]["candidates"] == 4
    assert report["reward_mean"] == pytest.approx(np.mean([s["reward"] for s in report["samples"]]))
    assert report["judge_accuracy"] == pytest.approx(np.mean([s["judge_class"] == 3 for s in report["samples"]]))
    assert report["flops"] > 0 and (out / "samples.png").stat().st_size > 0
    images = np.load(out / "images.npy")
    assert images.shape == (4, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_same_seed_same_numbers_and_images_other_seed_differs(tmp_path):
    args = ["--prompt", "1", "--prompt", "7", "--strategy", "best-of-n", "--budget-nfe", "54", "--num-samples", "2"]
    reports, images = [], []
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        code, out = run_cli(tmp_path, *args, "--seed", str(seed), out=name)
        assert code == 0
        r = json.loads((out / "report.json").read_text())
        reports.append([(s["prompt"], s["reward"], s["nfe"], s["judge_class"], s["judge_prob"]) for s in r["samples"]])
        images.append(np.load(out / "images.npy"))
    assert reports[0] == reports[1] and np.array_equal(images[0], images[1])
    assert reports[0] != reports[2]


def test_best_of_n_beats_naive_on_digits_uncond():
    kw = dict(model="digits", prompts=[str(d) for d in range(10)], guidance=0.0, reward="digit", num_samples=4, seed=0)
    naive = api.generate(strategy="naive", budget_nfe=18, **kw).report
    best = api.generate(strategy="best-of-n", budget_nfe=180, **kw).report
    assert best["reward_mean"] > naive["reward_mean"] + 3
    assert best["judge_accuracy"] > naive["judge_accuracy"] + 0.3
    assert naive["nfe_max"] == 18 and best["nfe_max"] == 180


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nosuchmodel", "--prompt", "3", "--budget-nfe", "36"], "valid models: digits"),
        (["--prompt", "3", "--budget-nfe", "36", "--reward", "sharpness"], "valid rewards"),
        (["--prompt", "3", "--budget-nfe", "36", "--strategy", "magic"], "valid strategies: .*best-of-n"),
        (["--prompt", "3", "--budget-nfe", "10"], "budget too small"),
        (["--prompt", "12", "--budget-nfe", "36"], "0-9|digit"),
        (["--prompt", "3"], "give a budget"),
        (["--budget-nfe", "36"], "at least one prompt"),
        (["--prompt", "3", "--budget-nfe", "36", "--strategy", "naive", "--n-candidates", "3"], "do not apply to strategy 'naive'"),
    ],
)
def test_bad_input_is_a_clear_message_and_exit_code_2(tmp_path, capsys, extra, message):
    code = main(["generate", "--no-progress", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "report.json").exists()


class NanReward:
    name, flops_per_image = "nan", 0.0

    def __init__(self, arg=None, device="cpu"):
        pass

    def __call__(self, images, prompts):
        out = torch.zeros(images.shape[0])
        out[0] = float("nan")
        return out


class ShortReward(NanReward):
    name = "short"

    def __call__(self, images, prompts):
        return torch.zeros(images.shape[0] - 1)


@pytest.mark.parametrize("name, message", [("nan", "non-finite"), ("short", "one value per image")])
def test_broken_rewards_stop_the_run_without_output(tmp_path, capsys, name, message):
    register_reward(name, f"{__name__}:{'NanReward' if name == 'nan' else 'ShortReward'}")
    try:
        code = main(["generate", "--no-progress", "--prompt", "3", "--budget-nfe", "36", "--reward", name, "--out", str(tmp_path / "out")])
    finally:
        REWARDS.pop(name)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rerun_into_the_same_folder_replaces_the_report_and_a_failed_rerun_removes_nothing_complete(tmp_path, capsys):
    code, out = run_cli(tmp_path, "--prompt", "3", "--strategy", "naive", "--budget-nfe", "18")
    assert code == 0 and (out / "report.json").exists()
    # a failing run into an existing folder must fail before touching it
    code = main(BASE + ["--out", str(out), "--prompt", "3", "--budget-nfe", "5"])
    assert code == 2 and json.loads((out / "report.json").read_text())["strategy"] == "naive"


def test_corrupt_weights_are_a_clear_error(tmp_path, monkeypatch, capsys):
    import noisesearch.models.digits as digits

    src = digits.WEIGHTS_DIR / "digits_denoiser.safetensors" if hasattr(digits, "WEIGHTS_DIR") else None
    if src is None:
        pytest.skip("digits module exposes no WEIGHTS_DIR")
    broken = tmp_path / "weights"
    shutil.copytree(digits.WEIGHTS_DIR, broken)
    data = (broken / "digits_denoiser.safetensors").read_bytes()
    (broken / "digits_denoiser.safetensors").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(digits, "WEIGHTS_DIR", broken)
    code = main(BASE + ["--out", str(tmp_path / "out"), "--prompt", "3", "--budget-nfe", "18"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "train-digits" in err
