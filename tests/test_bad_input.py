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
                 "--steps", "4", "--save-images", "--threads", "1", "--out", str(copy), "--no-progress"])
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


# ==== issue 20: bounded inputs, locked outputs, writes that cannot be lost, launchers ==========================
BOMB = "".join(f"{k}: &{k} [{', '.join(['*' + p] * 10 if p else ['x'] * 10)}]\n"
               for p, k in zip([None, "a", "b", "c", "d", "e", "f", "g"], "abcdefgh")) + "prompt: [" + ", ".join(["*h"] * 10) + "]\n"


def _one_line_exit_2(capsys, argv, message, last_line_only=False):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    line = err.splitlines()[-1] if last_line_only else err
    assert len(line.splitlines()) == 1, err
    assert re.search(message, line), err
    return line


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    r = tmp_path_factory.mktemp("bounded")
    (r / "bomb.yaml").write_text(BOMB)
    # the same bomb through a mapping's merge keys, and an alias that contains itself
    (r / "bomb_map.yaml").write_text("".join(f"{k}: &{k} {{{', '.join(f'{k}{i}: *{p}' if p else f'{k}{i}: x' for i in range(10))}}}\n"
                                             for p, k in zip([None, "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi"))
                                     + "prompt: [*i]\n")
    (r / "recursive.yaml").write_text("prompt: &p [*p]\n")
    (r / "latin1.yaml").write_bytes("prompt: ['café']\nbudget-nfe: 36\n".encode("latin-1"))
    (r / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (r / "deep.yaml").write_text("prompt: " + "[" * 20000 + "]" * 20000 + "\n")
    (r / "big.toml").write_text("# " + "x" * (2**20 + 10) + "\n")
    (r / "latin1.txt").write_bytes("un café\nune crème\n".encode("latin-1"))
    (r / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (r / "nul.txt").write_bytes(b"a cat\x00\na dog\n")
    return r


def test_bomb_is_small():
    assert len(BOMB.encode()) < 2048


CONFIG_CASES = [
    ("alias-bomb", "bomb.yaml", "aliases expand to more than"),
    ("alias-bomb-mapping", "bomb_map.yaml", "aliases expand to more than"),
    ("alias-recursive", "recursive.yaml", "refers to itself"),
    ("config-latin1", "latin1.yaml", "not UTF-8"),
    ("config-binary", "binary.yaml", "not UTF-8"),
    ("config-nested", "deep.yaml", "nested too deeply|does not parse"),
    ("config-huge-toml", "big.toml", "larger than 1 MiB"),
]


@pytest.mark.parametrize("name, file, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_files_are_bounded(bounded, capsys, name, file, message):
    import time

    t0 = time.perf_counter()
    for command in (["generate"], ["pool", "--prompts", "1"]):
        _one_line_exit_2(capsys, command + ["--config", str(bounded / file), "--out", str(bounded / "c")], message)
    assert time.perf_counter() - t0 < 10  # refused at once, not after expanding
    assert not (bounded / "c").exists()


def test_config_from_dev_zero_is_refused_by_size(capsys, tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    _one_line_exit_2(capsys, ["generate", "--config", "/dev/zero", "--out", str(tmp_path / "c")], "larger than 1 MiB")
    _one_line_exit_2(capsys, ["generate", "--config", str(tmp_path), "--out", str(tmp_path / "c")], "folder")


def test_config_loader_sits_below_validate():
    from noisesearch.cli.config import load_config_file as via_cli
    from noisesearch.config import load_config_file

    assert via_cli is load_config_file
    src = Path(__file__).parents[1] / "src" / "noisesearch" / "validate.py"
    assert "from noisesearch.cli" not in src.read_text() and "import noisesearch.cli" not in src.read_text()


PROMPT_FILE_CASES = [
    ("prompts-latin1", "latin1.txt", "not UTF-8"),
    ("prompts-binary", "binary.txt", "not UTF-8"),
    ("prompts-nul", "nul.txt", "NUL bytes"),
    ("prompts-folder", ".", "folder"),
    ("prompts-missing", "nope.txt", "cannot read --prompts-file"),
]


@pytest.mark.parametrize("name, file, message", PROMPT_FILE_CASES, ids=[c[0] for c in PROMPT_FILE_CASES])
def test_prompts_files_are_utf8_text(bounded, capsys, name, file, message):
    path = str(bounded / file)
    _one_line_exit_2(capsys, GEN + ["--budget-nfe", "36", "--prompts-file", path, "--out", str(bounded / "g")], message)
    _one_line_exit_2(capsys, ["pool", "--prompts-file", path, "--out", str(bounded / "p"), "--no-progress"], message)
    assert not (bounded / "g").exists() and not (bounded / "p").exists()


def test_prompts_file_dev_zero_is_refused_by_size(capsys, tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    _one_line_exit_2(capsys, GEN + ["--budget-nfe", "36", "--prompts-file", "/dev/zero", "--out", str(tmp_path / "g")],
                     "larger than 16 MiB")


def test_prompts_file_utf8_with_bom_works(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff3\n5\n".encode("utf-8"))
    from noisesearch.io import read_text_limited

    assert read_text_limited(f, "--prompts-file").splitlines() == ["3", "5"]


# ---- launchers -------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_CASES = [
    ("world-size-stray", {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but no rank"),
    ("pmi-size-stray", {"PMI_SIZE": "4"}, "PMI_SIZE=4 is set but no rank"),
    ("world-size-rank-no-master", {"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not"),
    ("world-size-text", {"WORLD_SIZE": "two"}, "not a whole number"),
    ("world-size-zero", {"WORLD_SIZE": "0"}, "must be >= 1"),
    ("sizes-disagree", {"WORLD_SIZE": "2", "PMI_SIZE": "3"}, "disagree"),
    ("rank-out-of-range", {"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1"}, "out of range"),
]


@pytest.mark.parametrize("name, env, message", DIST_CASES, ids=[c[0] for c in DIST_CASES])
def test_stray_launcher_variables(monkeypatch, capsys, tmp_path, name, env, message):
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "RANK", "PMI_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _one_line_exit_2(capsys, GEN + ["--budget-nfe", "36", "--out", str(tmp_path / "g")], message)
    _one_line_exit_2(capsys, ["pool", "--prompts", "1", "--out", str(tmp_path / "p"), "--no-progress"], message)
    assert not (tmp_path / "g").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("port_var", [True, False], ids=["port-set", "default-port"])
def test_rank_1_without_rank_0_says_so_and_gives_up(monkeypatch, capsys, tmp_path, port_var):
    import time

    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    if port_var:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    else:
        monkeypatch.delenv("MASTER_PORT", raising=False)
        from noisesearch import dist

        monkeypatch.setattr(dist, "DEFAULT_PORT", _free_port())
    monkeypatch.setenv("NOISESEARCH_DIST_TIMEOUT", "1.5")
    t0 = time.perf_counter()
    capsys.readouterr()
    code = main(GEN + ["--budget-nfe", "36", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.perf_counter() - t0 < 30
    assert "waiting up to 1.5 s for process 0" in err[0]  # a clear word while it waits
    assert len(err) == 2 and "no process 0 answered" in err[1] and "accelerate launch" in err[1], err
    monkeypatch.setenv("NOISESEARCH_DIST_TIMEOUT", "soon")
    _one_line_exit_2(capsys, GEN + ["--budget-nfe", "36", "--out", str(tmp_path / "g")], "NOISESEARCH_DIST_TIMEOUT")


def test_rank_1_goes_on_when_rank_0_listens():
    import socket
    import threading

    from noisesearch.dist import wait_for_rank0

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def listen_later():
        import time

        time.sleep(0.5)
        srv.listen(1)

    threading.Thread(target=listen_later, daemon=True).start()
    try:
        wait_for_rank0(1, 2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, timeout=10)
    finally:
        srv.close()


# ---- one run at a time in an output folder -----------------------------------------------------------------
HOLD = """
import sys, time
from noisesearch.io import output_lock
with output_lock(sys.argv[1], "noisesearch generate --out held"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A folder held by another process (a run in progress); yields (folder, pid)."""
    import subprocess
    import sys

    folder = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("argv", [
    GEN + ["--budget-nfe", "36"],
    ["pool", "--prompts", "1", "--candidates", "2", "--steps", "4", "--no-progress"],
    ["train-reward", "--pool", "{pool}", "--reward", "r1", "--no-progress"],
    ["train-digits", "--epochs", "1"],
], ids=["generate", "pool", "train-reward", "train-digits"])
def test_second_run_into_a_folder_in_use_is_refused(held, root, capsys, argv):
    folder, pid = held
    before = _snapshot(folder)
    argv = [a.format(pool=root / "synpool") for a in argv] + ["--out", str(folder)]
    line = _one_line_exit_2(capsys, argv, "in use by another run")
    assert f"pid {pid}" in line and "noisesearch generate --out held" in line
    assert _snapshot(folder) == before


def test_lock_is_released_and_leaves_nothing(tmp_path, capsys):
    from noisesearch.errors import NoiseSearchError
    from noisesearch.io import output_lock

    out = tmp_path / "a" / "b" / "run"
    with output_lock(out, "first"):
        assert out.is_dir()
        with pytest.raises(NoiseSearchError, match=rf"in use by another run \(pid {os.getpid()} .*first"):
            with output_lock(out, "second"):
                pass
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed
    g = tmp_path / "g"
    assert main(GEN + ["--budget-nfe", "24", "--out", str(g)]) == 0
    assert not [p.name for p in g.iterdir() if p.name.startswith(".")]  # no lock files left behind
    assert main(GEN + ["--budget-nfe", "24", "--out", str(g)]) == 0  # a finished run's folder is free again


def test_two_runs_started_together_never_lose_a_result(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "both"
    cmd = [sys.executable, "-m", "noisesearch", *GEN, "--budget-nfe", "24", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] == 2]
    assert len(ok) + len(refused) == 2, results
    for _, _, err in refused:
        assert "in use by another run" in err and len(err.strip().splitlines()) == 1
    report = json.loads((out / "report.json").read_text())
    if len(ok) == 1:  # the refused one said so; the folder holds the run that said "wrote"
        seed = 1 if results[0][0] == 0 else 2
        assert report["seed"] == seed
    # (both exit 0 only when they did not overlap: the second replaced the first, as a rerun does)


# ---- disk space and writes that fail ------------------------------------------------------------------------
def test_check_disk_refuses_before_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from noisesearch.errors import NoiseSearchError
    from noisesearch.io import check_disk

    check_disk(tmp_path / "new" / "run", 1000, "the run")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(NoiseSearchError, match=r"the pool needs about 11\.0 MiB in .* only 5\.0 MiB is free"):
        check_disk(tmp_path / "new" / "run", 10 * 2**20, "the pool")
    check_disk(tmp_path, 2**20, "the pool")


def _full_disk(monkeypatch, folder: Path):
    """Make every file written under ``folder`` fail with ENOSPC at fsync (a full file system there)."""
    import errno

    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_failed_write_keeps_what_was_computed(tmp_path, monkeypatch):
    from noisesearch.errors import NoiseSearchError
    from noisesearch.io import atomic_write_json, atomic_write_text

    full = tmp_path / "full"
    atomic_write_text(full / "old.txt", "old\n")
    _full_disk(monkeypatch, full)
    with pytest.raises(NoiseSearchError) as e:
        atomic_write_json(full / "result.json", {"a": 1})
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "No space left on device" in msg and "kept in" in msg
    kept = Path(msg.split("kept in ")[1].split(" (")[0])
    files = list(kept.rglob("result.json")) if kept.is_dir() else [kept]
    assert json.loads(files[0].read_text()) == {"a": 1}
    assert not (full / "result.json").exists() and (full / "old.txt").read_text() == "old\n"
    assert not [p for p in full.iterdir() if p.name.endswith(".tmp")]  # no partial files


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_generate_on_a_full_disk_keeps_the_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk(monkeypatch, out)
    line = _one_line_exit_2(capsys, GEN + ["--budget-nfe", "24", "--num-samples", "2", "--out", str(out)], "No space left")
    kept = Path(line.split("kept in ")[1].split(" (")[0])
    assert not (out / "report.json").exists()  # the folder is not completed by a later write
    report = next(kept.rglob("report.json"))
    images = np.load(next(kept.rglob("images.npy")))
    assert json.loads(report.read_text())["num_samples"] == 2 and images.shape[0] == 2
    import shutil

    shutil.rmtree(kept)


# ---- reward folders load strictly or not at all (issue 20) ----------------------------------------------
REWARD_FIXTURES = Path(__file__).parent / "fixtures" / "rewards"


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_safetensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def _edit_pt(path: Path, fn) -> None:
    import torch

    obj = torch.load(path, weights_only=True)
    sd = obj["state_dict"] if "state_dict" in obj else obj
    fn(sd)
    torch.save(obj, path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo noisesearch-test-payload-ran",))


def _pickle_payload(path: Path) -> None:
    import torch

    torch.save({"layers.0.weight": _Payload()}, path)


def _zeros(*shape):
    import torch

    return torch.zeros(*shape)


def _cfg(section, **kw):
    return lambda d: _edit_json(d / "config.json", lambda c: c[section].update(kw))


def _occ(section, **kw):
    return lambda d: _edit_json(d / "open_clip_config.json", lambda c: c["model_cfg"][section].update(kw))


def _unlink(*names):
    return lambda d: [(d / n).unlink() for n in names]


def _vocab_json(n):
    """n more tokens than the text tower embeds (a tokenizer of another model: its ids index past the embeddings)."""
    return lambda d: _edit_json(d / "vocab.json", lambda v: v.update({f"zz{i}</w>": len(v) + i for i in range(n)}))


REWARD_CASES = [
    # (id, fixture, reward kind, corruption, message)
    ("clip-more-vision-layers", "pickscore", "clip", _cfg("vision_config", num_hidden_layers=4), r"missing \(vision_model\.encoder\.layers\.2"),
    ("clip-negative-layers", "pickscore", "clip", _cfg("vision_config", num_hidden_layers=-4), r"num_hidden_layers = -4 is out of range"),
    ("pickscore-more-text-layers", "pickscore", "pickscore", _cfg("text_config", num_hidden_layers=3), "missing"),
    ("pickscore-fewer-layers", "pickscore", "pickscore", _cfg("vision_config", num_hidden_layers=1), "unexpected"),
    ("clip-misshaped", "pickscore", "clip", _cfg("vision_config", intermediate_size=40), r"6 mis-shaped \(vision_model\.encoder\.layers\.0\.mlp\.fc1\.bias: file \[37\], network \[40\]"),
    ("clip-unexpected-tensor", "pickscore", "clip",
     lambda d: _edit_safetensors(d / "model.safetensors", lambda sd: sd.update({"vision_model.extra.weight": _zeros(3)})),
     r"1 unexpected \(vision_model\.extra\.weight\)"),
    ("clip-no-tokenizer", "pickscore", "clip", _unlink("vocab.json", "merges.txt"), "lacks the tokenizer files"),
    ("pickscore-no-tokenizer-config-either", "pickscore", "pickscore",
     _unlink("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"), "lacks the tokenizer files"),
    ("clip-other-tokenizer", "pickscore", "clip", _vocab_json(10), r"has 539 tokens but the text tower embeds 529"),
    ("clip-eos-mismatch", "pickscore", "clip", _cfg("text_config", eos_token_id=5), "pools at token 5"),
    ("clip-heads-do-not-divide", "pickscore", "clip", _cfg("vision_config", num_attention_heads=3), "does not divide"),
    ("clip-zero-patch", "pickscore", "clip", _cfg("vision_config", patch_size=0), r"patch_size = 0 is out of range"),
    ("clip-patch-larger-than-image", "pickscore", "clip", _cfg("vision_config", patch_size=64), "larger than"),
    ("clip-size-text", "pickscore", "clip", _cfg("vision_config", hidden_size="big"), "not a whole number"),
    ("clip-absurd-size", "pickscore", "pickscore", _cfg("vision_config", hidden_size=16384, intermediate_size=131072,
                                                         num_hidden_layers=64, num_attention_heads=128), "parameters|GiB of memory"),
    ("clip-config-not-json", "pickscore", "clip", lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    ("clip-config-list", "pickscore", "clip", lambda d: (d / "config.json").write_text("[1]"), "must hold a JSON object"),
    ("clip-config-latin1", "pickscore", "clip", lambda d: (d / "config.json").write_bytes(b'{"a": "caf\xe9"}'), "not UTF-8"),
    ("clip-bad-std", "pickscore", "clip",
     lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.update(image_std=[0, 0, 0])), "image_std"),
    ("clip-bad-mean", "pickscore", "clip",
     lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.update(image_mean="grey")), "image_mean"),
    ("clip-truncated-weights", "pickscore", "clip",
     lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "cannot read the weights"),
    ("aesthetic-more-vision-layers", "aesthetic", "aesthetic", _cfg("vision_config", num_hidden_layers=3), "missing"),
    ("aesthetic-head-extra-tensor", "aesthetic", "aesthetic",
     lambda d: _edit_pt(d / "tiny-linearMSE.pth", lambda sd: sd.update({"layers.9.weight": _zeros(2, 2)})), "layers.9.weight"),
    ("aesthetic-head-misshaped", "aesthetic", "aesthetic",
     lambda d: _edit_pt(d / "tiny-linearMSE.pth", lambda sd: sd.update({"layers.0.bias": _zeros(5)})), r"layers\.0\.bias: \(5,\)"),
    ("aesthetic-head-pickle", "aesthetic", "aesthetic", lambda d: _pickle_payload(d / "tiny-linearMSE.pth"), "never runs code"),
    ("hps-more-vision-layers", "hps", "hps", _occ("vision_cfg", layers=4), "missing"),
    ("hps-negative-layers", "hps", "hps", _occ("vision_cfg", layers=-4), "layers = -4 is out of range"),
    ("hps-head-width-0", "hps", "hps", _occ("vision_cfg", head_width=0), "head_width = 0 is out of range"),
    ("hps-head-width-does-not-divide", "hps", "hps", _occ("vision_cfg", head_width=5), "does not divide"),
    ("hps-text-heads-0", "hps", "hps", _occ("text_cfg", heads=0), "heads = 0 is out of range"),
    ("hps-no-text-cfg", "hps", "hps", lambda d: _edit_json(d / "open_clip_config.json", lambda c: c["model_cfg"].pop("text_cfg")),
     "lacks model_cfg.text_cfg"),
    ("hps-mlp-ratio-text", "hps", "hps", _occ("vision_cfg", mlp_ratio="four"), "not a number"),
    ("hps-absurd-size", "hps", "hps", _occ("vision_cfg", width=16384, layers=64, head_width=128), "parameters|GiB of memory"),
    ("hps-no-tokenizer", "hps", "hps", _unlink("vocab.json"), "vocab.json and merges.txt"),
    ("hps-other-tokenizer", "hps", "hps", _vocab_json(3), r"has 532 tokens but the text tower embeds 529"),
    ("hps-bad-std", "hps", "hps", lambda d: _edit_json(d / "open_clip_config.json", lambda c: c["preprocess_cfg"].update(std=[1, 0, 1])),
     "preprocess_cfg.std"),
    ("hps-unexpected-tensor", "hps", "hps",
     lambda d: _edit_pt(d / "HPS_tiny.pt", lambda sd: sd.update({"module.visual.extra": _zeros(3)})), "unsupported open_clip weight"),
    ("hps-pickle", "hps", "hps", lambda d: _pickle_payload(d / "HPS_tiny.pt"), "never runs code"),
    ("imagereward-more-vision-layers", "imagereward", "imagereward",
     lambda d: _edit_json(d / "vision_config.json", lambda c: c.update(layers=3)), "missing"),
    ("imagereward-negative-layers", "imagereward", "imagereward",
     lambda d: _edit_json(d / "med_config.json", lambda c: c.update(num_hidden_layers=-4)), "num_hidden_layers = -4 is out of range"),
    ("imagereward-absurd-sizes", "imagereward", "imagereward",
     lambda d: _edit_json(d / "vision_config.json", lambda c: c.update(width=16384, layers=64, heads=128)), "parameters|GiB of memory"),
    ("imagereward-absurd-text", "imagereward", "imagereward",
     lambda d: _edit_json(d / "med_config.json", lambda c: c.update(hidden_size=16384, intermediate_size=131072, num_hidden_layers=64,
                                                                     num_attention_heads=128)), "parameters|GiB of memory"),
    ("imagereward-heads-0", "imagereward", "imagereward",
     lambda d: _edit_json(d / "med_config.json", lambda c: c.update(num_attention_heads=0)), "num_attention_heads = 0 is out of range"),
    ("imagereward-no-vocab-size", "imagereward", "imagereward",
     lambda d: _edit_json(d / "med_config.json", lambda c: c.pop("vocab_size")), "lacks vocab_size"),
    ("imagereward-bad-activation", "imagereward", "imagereward",
     lambda d: _edit_json(d / "med_config.json", lambda c: c.update(hidden_act="wiggle")), "hidden_act 'wiggle'"),
    ("imagereward-vision-not-mapping", "imagereward", "imagereward", lambda d: (d / "vision_config.json").write_text("[3]"),
     "must hold a JSON object"),
    ("imagereward-other-vocab", "imagereward", "imagereward",
     lambda d: (d / "vocab.txt").write_text((d / "vocab.txt").read_text() + "zebra\nhorse\n"), r"has 24 tokens but the text tower embeds 22"),
    ("imagereward-unexpected-tensor", "imagereward", "imagereward",
     lambda d: _edit_pt(d / "ImageReward.pt", lambda sd: sd.update({"blip.itm_head.weight": _zeros(2)})), "unexpected tensors"),
    ("imagereward-misshaped-head", "imagereward", "imagereward",
     lambda d: _edit_pt(d / "ImageReward.pt", lambda sd: sd.update({"mlp.layers.2.bias": _zeros(7)})), "official MLP head"),
    ("imagereward-pickle", "imagereward", "imagereward", lambda d: _pickle_payload(d / "ImageReward.pt"), "never runs code"),
]


@pytest.mark.parametrize("name, fixture, kind, corrupt, message", REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_reward_folder_that_does_not_match_is_refused(tmp_path, capsys, name, fixture, kind, corrupt, message):
    import shutil
    import time

    pytest.importorskip("transformers")
    d = tmp_path / fixture
    shutil.copytree(REWARD_FIXTURES / fixture, d)
    corrupt(d)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    line = _one_line_exit_2(capsys, GEN + ["--budget-nfe", "36", "--reward", f"{kind}@{d}", "--out", str(out)], message)
    assert time.perf_counter() - t0 < 30  # before any search, and absurd sizes before any allocation
    assert "weights_only=False" not in line and "will likely succeed" not in line and len(line) < 1200
    assert not out.exists()
    # the same folder as an --eval-reward and through the Python API
    _one_line_exit_2(capsys, GEN + ["--budget-nfe", "36", "--eval-reward", f"{kind}@{d}", "--out", str(out)], message)
    from noisesearch.errors import NoiseSearchError
    from noisesearch.rewards import make_reward

    with pytest.raises(NoiseSearchError, match=message):
        make_reward(f"{kind}@{d}")


def test_blocked_pickle_never_ran(tmp_path, capfd):
    from noisesearch.errors import NoiseSearchError
    from noisesearch.io import load_torch_state_dict

    _pickle_payload(tmp_path / "x.pt")
    with pytest.raises(NoiseSearchError) as e:
        load_torch_state_dict(tmp_path / "x.pt", "test")
    assert "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1
    assert "payload-ran" not in capfd.readouterr().out


@pytest.mark.parametrize("fixture, kind", [("pickscore", "clip"), ("pickscore", "pickscore"), ("hps", "hps"),
                                           ("imagereward", "imagereward"), ("aesthetic", "aesthetic")])
def test_rewards_are_loaded_with_gradients_off(fixture, kind):
    import torch

    pytest.importorskip("transformers")
    from noisesearch.rewards import make_reward

    r = make_reward(f"{kind}@{REWARD_FIXTURES / fixture}")
    assert not any(p.requires_grad for p in r.module.parameters())
    with torch.enable_grad():
        out = r(torch.rand(2, 3, 16, 16), ["a cat", "a dog"])
    assert not out.requires_grad  # no autograd graph when scoring, even with gradients enabled
    r.module.requires_grad_(True)  # to fine-tune (train-reward does this)
    with torch.enable_grad():
        assert r(torch.rand(2, 3, 16, 16), ["a cat", "a dog"]).requires_grad


@pytest.mark.parametrize("source, message", [("/dev/zero", "larger than 64 MiB"), ("latin1.txt", "not UTF-8")], ids=["dev-zero", "latin1"])
def test_other_json_inputs_are_bounded(root, bounded, capsys, source, message):
    if source.startswith("/dev/") and not os.path.exists(source):
        pytest.skip(f"no {source}")
    path = source if source.startswith("/") else str(bounded / source)
    _one_line_exit_2(capsys, ["simulate", "--pool", f"{root}/synpool", "--reward", "r1", "--method", "tuned", "--from", path,
                              "--no-progress"], message)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_outputs_never_replace_special_files(root, tmp_path, capsys):
    """An existing output path that is not a regular file (a FIFO here; a device such as /dev/zero
    alike) is refused before any work, and the atomic writer never replaces one."""
    from noisesearch.errors import NoiseSearchError
    from noisesearch.io import atomic_write_text

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for flag in ("--json", "--plot"):
        _one_line_exit_2(capsys, ["simulate", "--pool", f"{root}/synpool", "--reward", "r1", flag, str(fifo), "--no-progress"],
                         "not a regular file")
    with pytest.raises(NoiseSearchError, match="not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# ---- QA round 3 (issues 18, 20): variants found by hand ----------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"device": "cpux"}, "device='cpux' is not a device"),
    ({"device": "cuda"}, "no CUDA device is available here"),
    ({"shard": (0, "x")}, "shard=.* takes two whole numbers"),
], ids=["device-typo", "device-cuda-absent", "shard-text"])
def test_api_device_and_shard_are_one_line(kw, message):
    import torch

    import noisesearch
    from noisesearch.errors import NoiseSearchError

    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(NoiseSearchError, match=message):
        noisesearch.generate(model="digits", prompts=["3"], reward="digit", guidance=0, steps=6, budget_nfe=12, **kw)


def test_rank_0_says_it_waits_for_the_others(monkeypatch, capsys, tmp_path):
    """Rank 0's rendezvous waits for the other ranks (torch's timeout): it says so, as rank > 0 does."""
    import accelerate

    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))

    def no_rendezvous(*a, **k):
        raise RuntimeError("timed out waiting for the other ranks")

    monkeypatch.setattr(accelerate, "PartialState", no_rendezvous)
    capsys.readouterr()
    code = main(GEN + ["--budget-nfe", "36", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "process 0 of 2 waiting for the other 1" in err[0], err
    assert len(err) == 2 and "cannot start process 0 of 2" in err[1], err
    assert not (tmp_path / "g").exists()


def test_heldout_mean_of_all_nan_is_quiet():
    import warnings

    from noisesearch.train.noise_aware import _nanmean

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(_nanmean(np.array([np.nan, np.nan])))
        assert _nanmean(np.array([np.nan, 0.5])) == 0.5


@pytest.mark.parametrize("guidance", [-1, float("inf"), float("nan"), "strong"])
def test_one_guidance_check_for_every_model(guidance):
    from noisesearch.errors import NoiseSearchError
    from noisesearch.models import load_model
    from noisesearch.validate import check_guidance

    for check in (lambda: load_model("digits", guidance=guidance), lambda: check_guidance(guidance)):
        with pytest.raises(NoiseSearchError, match="guidance must be a finite number >= 0"):
            check()
    assert check_guidance("2.5") == 2.5 and check_guidance(0) == 0.0
