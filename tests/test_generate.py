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


def test_ranksum_choice_does_not_depend_on_max_batch(tmp_path):
    # ranksum compares the candidates of one search, whatever chunks they were scored in
    chosen = []
    for mb in (512, 12, 6):
        code, out = run_cli(tmp_path, "--prompt", "3", "--prompt", "8", "--reward", "ranksum(digit,brightness)",
                            "--strategy", "best-of-n", "--budget-nfe", "180", "--num-samples", "3", "--seed", "2",
                            "--max-batch", str(mb), out=f"mb{mb}")
        assert code == 0
        report = json.loads((out / "report.json").read_text())
        chosen.append((np.load(out / "images.npy"), [s["reward"] for s in report["samples"]]))
    for images, rewards in chosen[1:]:
        assert rewards == chosen[0][1]  # rank sums are integers: the same picks give the same values
        np.testing.assert_allclose(images, chosen[0][0], atol=1e-4)


@pytest.mark.parametrize("strategy", ["best-of-n", "eps-greedy", "ttsp"])
def test_adding_a_prompt_or_a_sample_does_not_change_the_others(strategy):
    # every search draws from its own noise stream (seed, prompt index, sample index)
    kw = dict(model="digits", guidance=0.0, reward="digit", strategy=strategy, budget_nfe=72, seed=5, evaluate=False)
    one = api.generate(prompts=["4"], num_samples=2, **kw)
    more = api.generate(prompts=["4", "9"], num_samples=3, **kw)
    torch.testing.assert_close(more.images[:2], one.images, atol=1e-5, rtol=1e-5)
    assert [s["reward"] for s in more.report["samples"][:2]] == pytest.approx([s["reward"] for s in one.report["samples"]], abs=1e-4)


def test_a_joined_process_group_is_destroyed_at_exit(monkeypatch):
    """A process that joined a group registers, once, a hook that destroys it before Python's teardown
    (a gloo group left alive there can abort the process: tools/dist_exit.py)."""
    import atexit

    import torch.distributed as td

    from noisesearch import dist

    if not td.is_available():
        pytest.skip("torch.distributed not built")
    hooks = []
    monkeypatch.setattr(dist, "_EXIT_HOOK", False)
    monkeypatch.setattr(atexit, "register", hooks.append)
    dist.destroy_at_exit()
    dist.destroy_at_exit()
    assert hooks == [dist._destroy_group]
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    try:
        assert td.is_initialized()
        hooks[0]()
        assert not td.is_initialized()
        hooks[0]()  # no group left: nothing to do, no error
    finally:
        if td.is_initialized():
            td.destroy_process_group()


def test_accelerate_two_processes_equal_one(tmp_path):
    """``accelerate launch --num_processes 2 -m noisesearch generate`` shards the searches and writes
    one merged run that equals the single-process run of the same seed (within float tolerance)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("accelerate")
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(root / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = BASE + ["--prompt", "2", "--prompt", "5", "--prompt", "7", "--num-samples", "3", "--strategy", "eps-greedy",
                   "--budget-nfe", "100", "--seed", "3", "--device", "cpu"]
    r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                        "-m", "noisesearch"] + args + ["--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    code = main(args + ["--out", str(tmp_path / "one")])
    assert code == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and len(two["samples"]) == 9
    for a, b in zip(one["samples"], two["samples"]):
        assert (a["index"], a["prompt"], a["nfe"], a["reward_calls"]) == (b["index"], b["prompt"], b["nfe"], b["reward_calls"])
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-3) and a["flops"] == pytest.approx(b["flops"])
    assert one["nfe_total"] == two["nfe_total"] and one["reward_mean"] == pytest.approx(two["reward_mean"], abs=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "one" / "images.npy"), np.load(tmp_path / "two" / "images.npy"), atol=1e-3)
