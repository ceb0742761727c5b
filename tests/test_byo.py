"""Bring your own pipeline and reward (issue 18): the Python entry point as a user writes it, plain
functions as rewards everywhere a reward goes, honest reports, and the run folder every entry point
writes (issue 21); evaluation rewards probed and outputs held and checked before the search (issue 20)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import noisesearch
from noisesearch import api
from noisesearch.cli import main
from noisesearch.errors import NoiseSearchError
from noisesearch.rewards import REWARDS, FunctionReward, RankSum, WeightedSum, make_reward, register_reward, split_specs
from noisesearch.search import STRATEGIES

DIGITS = dict(model="digits", guidance=0.0, steps=6, seed=0)


def sharpness(images, prompts):
    """Mean absolute difference of neighbouring pixels: a reward a user writes in a minute."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.abs().mean((1, 2, 3)) + dy.abs().mean((1, 2, 3))


def redness(images, prompts):
    return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def brightness(images, prompts):
    return images.mean((1, 2, 3))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny import tiny_flux_pipeline

    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def ddpm():
    pytest.importorskip("diffusers")
    from tiny import tiny_ddpm_pipeline

    return tiny_ddpm_pipeline()


# ---- the done-when script: pipeline objects, plain functions, every strategy ---------------------------
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_user_script_with_pipeline_objects_and_functions(strategy, flux, ddpm):
    options = {"prune_reward": redness} if "prune_reward" in {f for f in STRATEGIES[strategy].__dataclass_fields__} else {}
    for pipe, prompts, model_options in [(flux, ["a red bicycle"], {"height": 32, "width": 32}), (ddpm, None, None)]:
        run = noisesearch.generate(model=pipe, prompts=prompts, reward=sharpness, strategy=strategy, budget_nfe=12,
                                   steps=3, num_samples=2, seed=0, strategy_options=options, model_options=model_options)
        r = run.report
        assert r["reward"] == "sharpness" and r["strategy"] == strategy
        assert r["nfe_max"] <= 12 and len(r["samples"]) == 2
        assert run.images.shape[-2:] == ((32, 32) if pipe is flux else (16, 16))
        reported = torch.tensor([s["reward"] for s in r["samples"]])
        torch.testing.assert_close(reported, sharpness(run.images, [s["prompt"] for s in r["samples"]]), atol=1e-4, rtol=1e-4)
        assert r["denoiser"]["class"] == ("FlowPipelineDenoiser" if pipe is flux else "UnconditionalPipelineDenoiser")
        if options:
            assert r["params"]["prune_reward"] == "redness"


def test_report_records_what_ran(flux):
    run = noisesearch.generate(model=flux, prompts=["a cat"], reward=sharpness, strategy="naive", budget_nfe=3, steps=3,
                               guidance=2.0, model_options={"height": 32, "width": 32})
    d = run.report["denoiser"]
    assert run.report["guidance"] == d["guidance"] == 2.0
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["pipeline"] == "FluxPipeline" and d["parametrisation"]
    assert run.report["device"] == "cpu" and run.report["sampler"] == "euler-ancestral"


def test_prompts_are_optional_for_unconditional_models_only(ddpm):
    run = noisesearch.generate(model=ddpm, reward=brightness, strategy="best-of-n", budget_nfe=6, steps=3, num_samples=2)
    assert [s["prompt"] for s in run.report["samples"]] == ["", ""]
    with pytest.raises(NoiseSearchError, match="at least one prompt"):
        noisesearch.generate(reward=brightness, strategy="naive", budget_nfe=6, **DIGITS)


# ---- plain functions everywhere a reward goes --------------------------------------------------------
def test_unconditional_pipeline_folder_on_the_command_line_needs_no_prompt(ddpm, tmp_path):
    ddpm.save_pretrained(tmp_path / "ddpm")
    assert main(["generate", "--model", str(tmp_path / "ddpm"), "--reward", "brightness", "--strategy", "best-of-n",
                 "--budget-nfe", "6", "--steps", "3", "--num-samples", "2", "--no-progress", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["denoiser"]["conditional"] is False and [s["prompt"] for s in report["samples"]] == ["", ""]


def test_functions_are_rewards_in_every_place():
    r = make_reward(sharpness)
    assert isinstance(r, FunctionReward) and r.name == "sharpness" and r.flops_per_image == 0
    assert FunctionReward(sharpness, flops_per_image=5e3).flops_per_image == 5e3
    ws, rs = WeightedSum([sharpness, brightness], [0.5, 2.0]), RankSum([sharpness, "brightness"])
    assert ws.name == "0.5*sharpness+2*brightness" and rs.name == "ranksum(sharpness,brightness)"
    images = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(ws(images, ["3"] * 3), 0.5 * sharpness(images, None) + 2 * brightness(images, None))
    run = noisesearch.generate(prompts=["3", "7"], reward=ws, strategy="ttsp", budget_nfe=30,
                               strategy_options={"prune_reward": brightness}, eval_rewards=[sharpness, "brightness"], **DIGITS)
    ev = run.report["eval_rewards"]
    assert set(ev) == {"sharpness", "brightness", "judge"} and ev["sharpness"]["name"] == "sharpness"
    for s, img in zip(run.report["samples"], run.images):
        assert s["eval_rewards"]["sharpness"] == pytest.approx(float(sharpness(img[None], None)), abs=1e-5)
    with pytest.raises(NoiseSearchError, match="callable"):
        FunctionReward(3)
    with pytest.raises(NoiseSearchError, match="a reward is a spec string"):
        noisesearch.generate(prompts=["3"], reward=3, strategy="naive", budget_nfe=6, **DIGITS)
    with pytest.raises(NoiseSearchError, match="finite number >= 0"):
        FunctionReward(sharpness, flops_per_image=-1)


def test_unpriced_and_priced_functions_in_a_flop_budget():
    den = noisesearch.load_model("digits", guidance=0)
    per_nfe = den.flops_per_call
    free = noisesearch.generate(prompts=["3"], reward=brightness, strategy="best-of-n", budget_flops=24 * per_nfe, **DIGITS)
    assert free.report["reward_flops_per_image"] == 0 and free.report["nfe_max"] == 24  # the reward costs nothing
    priced = noisesearch.generate(prompts=["3"], reward=brightness, reward_flops=6 * per_nfe, strategy="best-of-n",
                                  budget_flops=24 * per_nfe, **DIGITS)
    r = priced.report
    assert r["reward_flops_per_image"] == 6 * per_nfe
    assert r["nfe_max"] == 12 and r["reward_calls"] == 2  # two candidates of 6 NFEs + 6 NFEs' worth of reward each
    assert r["flops"] == pytest.approx(12 * per_nfe + 2 * 6 * per_nfe)


def test_reward_by_import_path_on_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "myrewards.py").write_text(textwrap.dedent("""
        def sharp(images, prompts):
            return (images[..., 1:] - images[..., :-1]).abs().flatten(1).mean(1)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["generate", "--model", "digits", "--guidance", "0", "--prompt", "3", "--steps", "6", "--no-progress", "--quiet",
            "--budget-flops", "1e9"]
    assert main(base + ["--reward", "myrewards:sharp", "--reward-flops", "2e6", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["reward"] == "sharp" and report["reward_flops_per_image"] == 2e6
    assert make_reward("0.5*myrewards:sharp+0.5*brightness").name == "0.5*sharp+0.5*brightness"
    assert main(base + ["--reward", "digit", "--strategy", "ttsp", "--prune-reward", "myrewards:sharp",
                        "--eval-reward", "myrewards:sharp", "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["params"]["prune_reward"] == "sharp" and report["strategy_info"]["prune_reward"] == "sharp"
    assert report["eval_rewards"]["myrewards:sharp"]["name"] == "sharp"
    for spec, message in [("myrewards:nothere", "has no 'nothere'"), ("nosuchmodule_xyz:f", "cannot import module")]:
        capsys.readouterr()
        assert main(base + ["--reward", spec, "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "b" / "report.json").exists()


def test_a_path_after_at_is_taken_literally():
    seen = []
    register_reward("echo", f"{__name__}:_echo_factory")
    try:
        _echo_factory.seen = seen
        make_reward("echo@/x/sac+logos+ava1-l14-linearMSE.pth")
        make_reward("0.5*echo@/x/a+b.pth+0.5*brightness")
        make_reward('echo@"/x/c+brightness"')
        assert split_specs("echo@/x/a,b.pth,brightness") == ["echo@/x/a,b.pth", "brightness"]
    finally:
        REWARDS.pop("echo")
    assert seen == ["/x/sac+logos+ava1-l14-linearMSE.pth", "/x/a+b.pth", "/x/c+brightness"]
    assert make_reward("0.7*brightness+0.3*compressibility").weights == [0.7, 0.3]  # still a sum


def _echo_factory(arg, device):
    _echo_factory.seen.append(arg)
    return FunctionReward(brightness, name="echo")


# ---- errors before the search ---------------------------------------------------------------------------
class Counting:
    def __init__(self):
        self.calls, self.name, self.flops_per_image = 0, "counting", 0.0

    def __call__(self, images, prompts):
        self.calls += 1
        return images.mean((1, 2, 3))


def test_a_nan_eval_reward_is_refused_before_the_search():
    main_reward = Counting()

    def broken(images, prompts):
        return torch.full((images.shape[0],), float("nan"))

    with pytest.raises(NoiseSearchError, match="--eval-reward broken, probed before the search.*non-finite"):
        noisesearch.generate(prompts=["3"], reward=main_reward, eval_rewards=[broken], strategy="best-of-n", budget_nfe=60,
                             **DIGITS)
    assert main_reward.calls == 1  # the probe only: no search ran


def _nan_factory(arg, device):
    return FunctionReward(lambda images, prompts: torch.full((images.shape[0],), float("nan")), name="nanr")


def _short_factory(arg, device):
    return FunctionReward(lambda images, prompts: torch.zeros(images.shape[0] - 1), name="shortr")


@pytest.mark.parametrize("name, message", [("nanr", "non-finite"), ("shortr", "one value per image")])
def test_a_broken_eval_reward_on_the_command_line_is_refused_before_the_search(tmp_path, capsys, name, message):
    register_reward(name, f"{__name__}:{'_nan_factory' if name == 'nanr' else '_short_factory'}")
    try:
        code = main(["generate", "--prompt", "3", "--guidance", "0", "--budget-nfe", "36", "--no-progress",
                     "--eval-reward", f"brightness,{name}", "--out", str(tmp_path / "out")])
    finally:
        REWARDS.pop(name)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"--eval-reward {name}, probed before the search" in err and message in err
    assert not (tmp_path / "out").exists()


def test_shard_errors_are_one_line_errors_not_name_errors():
    with pytest.raises(NoiseSearchError, match="launch at most 2 processes"):
        api.generate(prompts=["3", "4"], reward="digit", strategy="naive", budget_nfe=6, shard=(2, 3), **DIGITS)
    with pytest.raises(NoiseSearchError, match="0 <= rank < world"):
        api.generate(prompts=["3"], reward="digit", strategy="naive", budget_nfe=6, shard=(3, 2), **DIGITS)
    a = api.generate(prompts=["3", "4"], reward="digit", strategy="naive", budget_nfe=6, shard=(0, 2), **DIGITS)
    with pytest.raises(NoiseSearchError, match="do not cover every search exactly once"):
        api.merge_runs([a, a])


def test_output_folder_held_and_disk_checked_before_the_search(tmp_path, monkeypatch):
    from noisesearch import io

    out = tmp_path / "run"
    with io.output_lock(out, "another run"):
        with pytest.raises(NoiseSearchError, match="in use by another run"):
            api.generate(prompts=["3"], reward="digit", strategy="naive", budget_nfe=6, out=out, **DIGITS)
    monkeypatch.setattr(io, "free_bytes", lambda folder: 1000)
    counting = Counting()
    with pytest.raises(NoiseSearchError, match="needs about .* free"):
        api.generate(prompts=["3"], reward=counting, strategy="best-of-n", budget_nfe=60, out=out, **DIGITS)
    assert counting.calls == 1 and not (out / "report.json").exists()


# ---- the judge is an evaluation reward ----------------------------------------------------------------
def test_judge_accuracy_is_the_mean_of_the_judge_evaluation_reward():
    kw = dict(prompts=["3", "8"], num_samples=2, reward="digit", strategy="best-of-n", budget_nfe=24, **DIGITS)
    run = api.generate(**kw)
    r = run.report
    judge = [s["eval_rewards"]["judge"] for s in r["samples"]]
    assert set(judge) <= {0.0, 1.0} and r["judge_accuracy"] == pytest.approx(sum(judge) / 4)
    assert all(s["judge"] == float(s["judge_class"] == int(s["prompt"])) for s in [
        dict(s, judge=s["eval_rewards"]["judge"]) for s in r["samples"]])
    assert 0 < r["samples"][0]["judge_prob"] <= 1
    assert "judge_accuracy" not in api.generate(**dict(kw, evaluate=False)).report
    shards = [api.generate(**kw, shard=(i, 3)) for i in range(3)]
    merged = api.merge_runs(shards).report
    assert merged["judge_accuracy"] == pytest.approx(r["judge_accuracy"])
    assert merged["eval_rewards"]["judge"]["mean"] == pytest.approx(r["eval_rewards"]["judge"]["mean"])


# ---- one run folder from every entry point -----------------------------------------------------------
FILES = {"report.json", "config.yaml", "samples.png", "search.png", "images.npy", "samples"}


def test_save_run_writes_the_cli_run_folder_and_its_config_repeats_the_run(tmp_path):
    from PIL import Image

    kw = dict(prompts=["3", "5"], num_samples=2, reward="digit", strategy="eps-greedy", budget_nfe=24, **DIGITS)
    run = api.generate(**kw, trace=True)
    api.save_run(run, tmp_path / "api")
    assert {p.name for p in (tmp_path / "api").iterdir()} == FILES
    grid = Image.open(tmp_path / "api" / "samples.png")
    assert grid.width > 2 * 8 * 4 and grid.height > 2 * 8 * 4  # labelled, upscaled cells
    # the API's config.yaml repeats the run on the command line
    assert main(["generate", "--config", str(tmp_path / "api" / "config.yaml"), "--out", str(tmp_path / "cli"),
                 "--no-progress", "--quiet"]) == 0
    assert {p.name for p in (tmp_path / "cli").iterdir()} == FILES
    a = json.loads((tmp_path / "api" / "report.json").read_text())
    b = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert [s["reward"] for s in a["samples"]] == pytest.approx([s["reward"] for s in b["samples"]], abs=1e-5)
    assert a["judge_accuracy"] == b["judge_accuracy"]
    # and generate(out=...) writes the same folder
    api.generate(**kw, trace=True, out=tmp_path / "direct")
    assert {p.name for p in (tmp_path / "direct").iterdir()} == FILES


def test_import_noisesearch_is_cheap_and_exports_the_parts():
    code = "import sys, noisesearch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    for name in ["generate", "save_run", "load_model", "make_reward", "make_strategy", "build_problem", "Denoiser",
                 "Reward", "FunctionReward", "Run"]:
        assert name in noisesearch.__all__ and getattr(noisesearch, name) is not None
    from noisesearch import Reward, generate  # noqa: F401
    with pytest.raises(AttributeError):
        noisesearch.no_such_thing  # noqa: B018


def test_a_model_without_a_default_reward_asks_for_one(ddpm, tmp_path, capsys):
    """The digits model scores with ``digit`` by default; any other model needs a reward: one line, exit 2."""
    with pytest.raises(NoiseSearchError, match="give a reward"):
        noisesearch.generate(model=ddpm, strategy="best-of-n", budget_nfe=6, steps=3)
    ddpm.save_pretrained(tmp_path / "ddpm")
    assert main(["generate", "--model", str(tmp_path / "ddpm"), "--budget-nfe", "6", "--steps", "3",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "give a reward" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "report.json").exists()


def test_api_run_folder_has_search_png_by_default(tmp_path):
    run = noisesearch.generate(model="digits", prompts=["3"], guidance=0, strategy="eps-greedy", budget_nfe=72, num_samples=2)
    noisesearch.save_run(run, tmp_path / "api")
    assert {"report.json", "config.yaml", "samples.png", "search.png"} <= {p.name for p in (tmp_path / "api").iterdir()}


def test_an_eval_reward_failing_only_after_the_search_keeps_the_run(tmp_path, capsys):
    calls = []

    def late_nan(images, prompts):
        calls.append(len(images))
        out = torch.zeros(len(images))
        return out if len(calls) == 1 else out + float("nan")  # fine at the probe, NaN on the results

    run = noisesearch.generate(model="digits", prompts=["3"], guidance=0, strategy="best-of-n", budget_nfe=36,
                               num_samples=2, eval_rewards=[late_nan], out=tmp_path / "run")
    assert len(calls) == 2 and "late_nan" in run.report["eval_errors"]
    assert "late_nan" not in run.report["eval_rewards"] and run.report["judge_accuracy"] is not None
    assert json.loads((tmp_path / "run" / "report.json").read_text())["eval_errors"]
    assert "the run is kept" in capsys.readouterr().err
