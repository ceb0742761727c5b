"""Regression suite of bad input (issue #12): every command, every kind of bad input.

Each case runs the CLI in-process and checks the exit code (2), that the message is one line naming
the problem (no traceback), and what is left on disk (nothing that looks complete; what was there
is untouched). Then: resume verifies (train-reward, pool), a run repeats from its config.yaml, every
output is 0644, every strategy draws search.png, progress lines are plain off a terminal.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from noisesearch.cli import main
from noisesearch.simulate.synthetic import make_synthetic_pool

GEN = ["generate", "--guidance", "0", "--prompt", "3", "--steps", "6", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("bad")
    (r / "afile").write_text("not a folder\n")
    (r / "foreign").mkdir()
    (r / "foreign" / "notes.txt").write_text("mine\n")
    (r / "poolrun").mkdir()
    (r / "poolrun" / "config.yaml").write_text("command: pool\nout: x\n")
    (r / "adir").mkdir()
    (r / "other.json").write_text('{"something": 1}\n')
    (r / "cfg_unknown.yaml").write_text("prompt: ['3']\nbudget-nfe: 36\nno-such-flag: 1\n")
    (r / "cfg_pool.yaml").write_text("command: pool\nprompts: '1,2'\n")
    (r / "cfg_bad.yaml").write_text("budget-nfe: [36\n")
    (r / "cfg_list.yaml").write_text("- 1\n- 2\n")
    (r / "cfg_switch.yaml").write_text("prompt: ['3']\nbudget-nfe: 36\nno-progress: maybe\n")
    make_synthetic_pool(num_prompts=12, num_candidates=8, num_steps=6).save(r / "synpool")
    make_synthetic_pool(num_prompts=4, num_candidates=1, num_steps=6).save(r / "onepool")
    return r


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


S, P = "{root}/synpool", "{root}/onepool"
CASES = [
    # ---- expressions: a reward spec is parsed completely or refused ----
    ("reward-dangling-plus", GEN + ["--budget-nfe", "36", "--reward", "0.7*digit+"], "empty term|dangling"),
    ("reward-plus-around", GEN + ["--budget-nfe", "36", "--reward", "+digit+"], "empty term|dangling"),
    ("reward-star", GEN + ["--budget-nfe", "36", "--reward", "0.7*"], "reward"),
    ("reward-at-nothing", GEN + ["--budget-nfe", "36", "--reward", "clip@"], "nothing after '@'"),
    ("ranksum-one", GEN + ["--budget-nfe", "36", "--reward", "ranksum(digit)"], "at least two"),
    ("pool-reward", ["pool", "--prompts", "1", "--reward", "digit+", "--out", "{root}/p1"], "empty term|dangling"),
    # ---- numbers ----
    ("budget-nan", GEN + ["--budget-nfe", "nan"], "--budget-nfe.*finite"),
    ("budget-inf", GEN + ["--budget-nfe", "inf"], "--budget-nfe.*finite"),
    ("budget-huge", GEN + ["--budget-nfe", "1e30"], "--budget-nfe.*must be in"),
    ("budget-neg", GEN + ["--budget-nfe", "-5"], "--budget-nfe.*must be in"),
    ("budget-text", GEN + ["--budget-nfe", "lots"], "--budget-nfe.*expected a number"),
    ("flops-nan", GEN + ["--budget-flops", "nan"], "--budget-flops.*finite"),
    ("flops-absurd", GEN + ["--budget-flops", "1e29"], "--budget-flops .*NFE"),
    ("max-batch-0", GEN + ["--budget-nfe", "36", "--max-batch", "0"], "--max-batch.*>= 1"),
    ("threads-0", GEN + ["--budget-nfe", "36", "--threads", "0"], "--threads.*>= 1"),
    ("num-samples-0", GEN + ["--budget-nfe", "36", "--num-samples", "0"], "--num-samples.*>= 1"),
    ("steps-0", GEN + ["--budget-nfe", "36", "--steps", "0"], "--steps.*>= 1"),
    ("seed-neg", GEN + ["--budget-nfe", "36", "--seed", "-1"], "--seed.*>= 0"),
    ("beams-neg", GEN + ["--budget-nfe", "36", "--strategy", "beam", "--beams", "-1"], "--beams.*>= 0"),
    ("bool-opt", GEN + ["--budget-nfe", "36", "--strategy", "eps-greedy", "--elitist", "maybe"], "--elitist.*true/false"),
    ("radius-nan", GEN + ["--budget-nfe", "36", "--strategy", "eps-greedy", "--radius", "nan"], "--radius.*finite"),
    ("keep-text", GEN + ["--budget-nfe", "36", "--strategy", "ttsp", "--keep", "0.5,x"], "--keep"),
    ("budget-too-small", GEN + ["--budget-nfe", "3"], "budget too small"),
    ("pool-candidates-0", ["pool", "--prompts", "1", "--candidates", "0", "--out", "{root}/p2"], "--candidates.*>= 1"),
    ("pool-max-batch-0", ["pool", "--prompts", "1", "--max-batch", "0", "--out", "{root}/p3"], "--max-batch.*>= 1"),
    ("simulate-budgets-tiny-step", ["simulate", "--pool", S, "--reward", "r1", "--budgets", "400:4000:0.0001"], "budgets; at most"),
    ("simulate-budgets-text", ["simulate", "--pool", S, "--reward", "r1", "--budgets", "abc"], "--budgets: expected"),
    ("simulate-budgets-nan", ["simulate", "--pool", S, "--reward", "r1", "--budgets", "nan,2"], "--budgets"),
    ("simulate-iters-huge", ["simulate", "--pool", S, "--reward", "r1", "--iters", "100000000"], "--iters.*<= 1e\\+07"),
    ("simulate-iters-0", ["simulate", "--pool", S, "--reward", "r1", "--iters", "0"], "--iters.*>= 1"),
    ("tune-iters-0", ["tune", "--pool", S, "--reward", "r1", "--train-prompts", "0:6", "--iters-test", "0"], "--iters-test.*>= 1"),
    ("train-holdout-1", ["train-reward", "--pool", S, "--reward", "r1", "--out", "{root}/t1", "--holdout", "1"], "--holdout.*must be in"),
    ("train-lr-nan", ["train-reward", "--pool", S, "--reward", "r1", "--out", "{root}/t1", "--lr", "nan"], "--lr.*finite"),
    ("train-iters-0", ["train-reward", "--pool", S, "--reward", "r1", "--out", "{root}/t1", "--iters", "0"], "--iters.*>= 1"),
    ("bench-budgets-text", ["bench", "search", "--budgets", "abc", "--out", "{root}/b1"], "--budgets.*not a whole number"),
    ("bench-budget-below-one", ["bench", "search", "--budgets", "10,72", "--out", "{root}/b1"], "--budgets.*out of range 18"),
    ("bench-seeds-0", ["bench", "search", "--seeds", "0", "--out", "{root}/b1"], "--seeds.*>= 1"),
    ("bench-threads-0", ["bench", "search", "--threads", "0", "--out", "{root}/b1"], "--threads.*>= 1"),
    ("bench-strategy", ["bench", "search", "--strategies", "magic", "--out", "{root}/b1"], "unknown strategy configuration"),
    ("train-digits-epochs-0", ["train-digits", "--epochs", "0", "--out", "{root}/d1"], "--epochs.*>= 1"),
    # ---- quiet nonsense ----
    ("tune-one-candidate", ["tune", "--pool", P, "--reward", "r1", "--train-prompts", "0:2"], "at least 2"),
    ("simulate-one-candidate", ["simulate", "--pool", P, "--reward", "r1"], "at least 2"),
    ("bench-no-name", ["bench"], "give a benchmark NAME"),
    # ---- paths: checked before any work ----
    ("gen-out-file", GEN + ["--budget-nfe", "36", "--out", "{root}/afile"], "existing file"),
    ("gen-out-under-file", GEN + ["--budget-nfe", "36", "--out", "{root}/afile/run"], "is a file"),
    ("gen-out-foreign", GEN + ["--budget-nfe", "36", "--out", "{root}/foreign"], "holds other files"),
    ("gen-out-other-command", GEN + ["--budget-nfe", "36", "--out", "{root}/poolrun"], "holds a 'pool' run"),
    ("pool-out-file", ["pool", "--prompts", "1", "--out", "{root}/afile"], "existing file"),
    ("train-out-file", ["train-reward", "--pool", S, "--reward", "r1", "--out", "{root}/afile"], "existing file"),
    ("train-out-is-pool", ["train-reward", "--pool", S, "--reward", "r1", "--out", S], "--out"),
    ("bench-out-file", ["bench", "search", "--budgets", "18", "--out", "{root}/afile"], "existing file"),
    ("bench-out-under-file", ["bench", "search", "--budgets", "18", "--out", "{root}/afile/x"], "is a file"),
    ("simulate-json-folder", ["simulate", "--pool", S, "--reward", "r1", "--json", "{root}/adir"], "--json.*is a folder"),
    ("simulate-json-under-file", ["simulate", "--pool", S, "--reward", "r1", "--json", "{root}/afile/x.json"], "is a file"),
    ("simulate-json-clobber", ["simulate", "--pool", S, "--reward", "r1", "--json", "{root}/other.json"], "not a 'simulate' result"),
    ("simulate-plot-folder", ["simulate", "--pool", S, "--reward", "r1", "--plot", "{root}/adir"], "--plot.*is a folder"),
    ("tune-json-folder", ["tune", "--pool", S, "--reward", "r1", "--train-prompts", "0:6", "--json", "{root}/adir"], "is a folder"),
    ("train-digits-out-file", ["train-digits", "--out", "{root}/afile"], "existing file"),
    # ---- config files ----
    ("config-unknown-key", ["generate", "--config", "{root}/cfg_unknown.yaml", "--out", "{root}/c1"], "unknown option 'no-such-flag'"),
    ("config-other-command", ["generate", "--config", "{root}/cfg_pool.yaml", "--out", "{root}/c1"], "'pool' configuration"),
    ("config-missing", ["generate", "--config", "{root}/nope.yaml", "--out", "{root}/c1"], "cannot read --config"),
    ("config-bad-yaml", ["generate", "--config", "{root}/cfg_bad.yaml", "--out", "{root}/c1"], "does not parse"),
    ("config-not-mapping", ["generate", "--config", "{root}/cfg_list.yaml", "--out", "{root}/c1"], "must map option names"),
    ("config-bad-switch", ["generate", "--config", "{root}/cfg_switch.yaml", "--out", "{root}/c1"], "takes true or false"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_left(root, capsys, name, argv, message):
    argv = [a.format(root=root) for a in argv]
    if "--no-progress" not in argv and argv[0] not in ("bench",):
        argv.append("--no-progress")
    watched = [Path(a) for a in argv if a.startswith(str(root))]
    before = {p: _snapshot(p) for p in watched}
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err, captured.out[-500:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    for p in watched:  # nothing made, nothing changed
        assert _snapshot(p) == before[p], p


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes everywhere")
def test_unwritable_output_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(GEN + ["--budget-nfe", "36", "--out", str(ro / "run")]) == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_memory_is_estimated_before_allocating(root, capsys, monkeypatch):
    import noisesearch.validate as v

    monkeypatch.setattr(v, "physical_memory", lambda: 2**30)  # a 1 GiB machine
    code = main(["simulate", "--pool", f"{root}/synpool", "--reward", "r1", "--iters", "5000000", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "GiB of memory" in err and "--iters" in err
    code = main(GEN + ["--budget-nfe", "1e7", "--num-samples", "50", "--out", f"{root}/gm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "GiB of memory" in err and "--num-samples" in err
    assert not (root / "gm").exists()
    code = main(["bench", "search", "--budgets", "1000000", "--seeds", "10000", "--out", f"{root}/bm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "GiB of memory" in err and "--seeds" in err
    assert not (root / "bm").exists()


# ---- resume verifies ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "pool"
    code = main(["pool", "--model", "digits", "--guidance", "0", "--reward", "digit", "--prompts", "1,7", "--candidates", "6",
                 "--steps", "4", "--save-images", "--threads", "1", "--out", str(out), "--no-progress", "--quiet"])
    assert code == 0
    return out


TRAIN = ["--reward", "digit", "--iters", "2", "--batch-size", "8", "--holdout", "0.34", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def na_reward(digits_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("na") / "na"
    assert main(["train-reward", "--pool", str(digits_pool), "--out", str(out), *TRAIN, "--quiet"]) == 0
    return out


def test_train_reward_rerun_retrains_a_corrupt_stage(digits_pool, na_reward, tmp_path, capsys):
    import shutil

    out = tmp_path / "na"
    shutil.copytree(na_reward, out)
    args = ["train-reward", "--pool", str(digits_pool), "--out", str(out), *TRAIN]
    assert (out / "config.yaml").exists()
    good = (out / "stage_01.safetensors").read_bytes()
    (out / "stage_01.safetensors").write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "does not verify" in err and "retraining" in err
    from noisesearch.rewards.noise_aware import load_noise_aware, load_stage

    load_stage(out / "stage_01.safetensors")  # verifies now
    load_noise_aware(str(out))
    # held-out candidates: 2 per prompt decide the gate, which is warned about
    assert "held-out candidates per prompt" in err


def test_pool_rerun_recomputes_a_corrupt_part(digits_pool, tmp_path, capsys):
    import shutil

    from noisesearch.pools import load_pool

    copy = tmp_path / "pool"
    shutil.copytree(digits_pool, copy)
    part = sorted((copy / "parts").glob("prompt_*.npz"))[0]
    part.write_bytes(part.read_bytes()[:100])
    capsys.readouterr()
    code = main(["pool", "--model", "digits", "--guidance", "0", "--reward", "digit", "--prompts", "1,7", "--candidates", "6",
                 "--steps", "4", "--save-images", "--threads", "1", "--out", str(copy), "--no-progress", "--quiet"])
    assert code == 0 and "corrupt" in capsys.readouterr().err
    a, b = load_pool(digits_pool), load_pool(copy)
    assert np.array_equal(a.rewards["digit"], b.rewards["digit"])


# ---- runs repeat from their config.yaml -------------------------------------------------------------------
VOLATILE = {"wall_seconds", "load_seconds", "command"}


def _report(d: Path) -> dict:
    r = json.loads((d / "report.json").read_text())
    return {k: v for k, v in r.items() if k not in VOLATILE}


def test_generate_repeats_from_its_config_and_flags_override(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(GEN + ["--budget-nfe", "24", "--num-samples", "2", "--strategy", "beam", "--out", str(a)]) == 0
    cfg = a / "config.yaml"
    assert cfg.exists() and "budget-nfe: 24" in cfg.read_text()
    assert main(["generate", "--config", str(cfg), "--out", str(b)]) == 0
    assert _report(a) == _report(b)
    assert np.array_equal(np.load(a / "images.npy"), np.load(b / "images.npy"))
    # a flag on the command line overrides the file; repeated flags replace the file's list
    assert main(["generate", "--config", str(cfg), "--out", str(c), "--seed", "1", "--prompt", "4"]) == 0
    rc = json.loads((c / "report.json").read_text())
    assert rc["seed"] == 1 and rc["prompts"] == ["4"]
    # rerunning into a previous run of the same command is allowed (checked before any work)
    from noisesearch.validate import output_dir

    output_dir(a, "generate", ["report.json"])


def test_toml_config(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('prompt = ["2"]\nguidance = 0\nsteps = 6\nbudget_nfe = 12\nstrategy = "best-of-n"\nno-progress = true\n')
    assert main(["generate", "--config", str(cfg), "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "report.json").read_text())["nfe_max"] == 12


def test_simulate_json_writes_its_config_and_repeats(root, tmp_path):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--pool", f"{root}/synpool", "--reward", "r1", "--iters", "4", "--json", str(out), "--no-progress"]) == 0
    cfg = tmp_path / "sim.config.yaml"
    assert cfg.exists()
    first = json.loads(out.read_text())
    assert main(["simulate", "--config", str(cfg)]) == 0  # same file: a previous simulate result may be replaced
    assert json.loads(out.read_text())["methods"] == first["methods"]


# ---- everything written is readable by others --------------------------------------------------------------
def _modes(folder: Path):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_outputs_are_0644(root, digits_pool, tmp_path):
    g = tmp_path / "g"
    assert main(GEN + ["--budget-nfe", "24", "--out", str(g)]) == 0
    sim, plot = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["simulate", "--pool", f"{root}/synpool", "--reward", "r1", "--iters", "3", "--json", str(sim), "--plot", str(plot),
                 "--no-progress"]) == 0
    tj = tmp_path / "t.json"
    assert main(["tune", "--pool", f"{root}/synpool", "--reward", "r1", "--train-prompts", "0:6", "--test-prompts", "6:12",
                 "--explore", "2", "--iters-explore", "2", "--iters-confirm", "2", "--iters-test", "2", "--max-checks", "1", "--json", str(tj),
                 "--no-progress"]) == 0
    modes = {**_modes(g), **_modes(digits_pool), **{p.name: stat.S_IMODE(p.stat().st_mode) for p in (sim, plot, tj)}}
    for name in ("report.json", "config.yaml", "search.png", "images.npy", "pool.json", "prompts.json", "digit.base.npy"):
        assert name in modes, name
    bad = {k: oct(v) for k, v in modes.items() if v != 0o644}
    assert not bad, bad


# ---- search.png for every strategy ------------------------------------------------------------------------------
def test_every_strategy_draws_search_png(tmp_path, na_reward):
    from noisesearch import api
    from noisesearch.search import STRATEGIES

    for name in STRATEGIES:
        opts = {"prune_reward": f"noise-aware@{na_reward}"} if name == "ttsnap" else {}
        run = api.generate(model="digits", prompts=["3"], guidance=0, reward="digit", strategy=name, budget_nfe=32,
                           num_samples=1, steps=4, seed=0, strategy_options=opts, trace=True, evaluate=False)
        out = api.save_run(run, tmp_path / name)
        png = out / "search.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# ---- first contact: progress and help ---------------------------------------------------------------------------
def test_progress_off_a_terminal_is_plain_lines_in_whole_units():
    from noisesearch.progress import Progress

    buf = io.StringIO()
    bar = Progress(5760.0, desc="best-of-n", unit="NFE", file=buf, interval=0.0)
    for _ in range(10):
        bar.set(bar.n + 640.0)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and ".0/" not in text and "5760/5760 NFE (100%)" in text


def test_tune_progress_ends_at_100_percent():
    from noisesearch.progress import Progress

    buf = io.StringIO()
    bar = Progress(100, desc="tune", unit="plan", file=buf, interval=0.0)
    bar.update(98)
    bar.close()
    assert buf.getvalue().strip().splitlines()[-1].startswith("tune: 100/100 plan (100%)")


def test_help_answers_the_first_questions(capsys):
    def entry(text: str, flag: str) -> str:
        """The help of ``flag`` (its line in the options list and the continuation lines)."""
        lines = text.splitlines()
        i = next(k for k, ln in enumerate(lines) if re.match(rf"\s+{flag}(?![\w-])", ln))
        out = [lines[i]]
        for ln in lines[i + 1:]:
            if re.match(r"\s+-", ln) or not ln.strip():
                break
            out.append(ln)
        return " ".join(" ".join(out).split()[1:])

    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "fitted to the budget" in flat and "true or false" in flat and "noise-aware@DIR" in flat
    for flag in ("--beams", "--particles", "--simulations", "--keep", "--prune-steps", "--elitist", "--potential"):
        e = entry(text, flag)
        assert "(" in e and "[" in e and len(e.split()) > 5, (flag, e)
    assert "0 = fit to the budget" in entry(text, "--beams")
    assert main(["bench", "search", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--other-budgets", "--other-seeds", "--other-strategies", "--max-batch", "--config", "--budgets"):
        assert len(entry(text, flag).split()) > 3, flag
