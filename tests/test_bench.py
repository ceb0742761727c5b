"""``noisesearch bench search``: the search benchmark as a command (a tiny sweep)."""
from __future__ import annotations

import json

import torch

from noisesearch.cli import main


def test_bench_search_tiny_sweep(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "search", "--budgets", "18,40", "--seeds", "1", "--strategies", "naive,best-of-n,eps-greedy,smc",
                 "--other-rewards", "", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "search_results.json").read_text())
    assert res["meta"]["command"].startswith("noisesearch bench search --budgets 18,40")
    assert res["meta"]["searches_per_cell"] == 10
    cells = {(c["label"], c["budget"]): c for c in res["cells"]}
    assert set(cells) == {(s, b) for s in ("naive", "best-of-n", "eps-greedy", "smc") for b in (18, 40)}
    for (label, budget), c in cells.items():
        assert c["status"] == "ok" and c["nfe_max"] <= budget
        assert 0.0 <= c["judge_accuracy"] <= 1.0 and c["overhead_ratio_in_run"] > 0
        # paired timing: one extra timed call per denoiser call, none of it charged to the strategy
        assert c["denoiser_cpu_seconds_paired"] > 0 and c["overhead_ratio_paired"] > 0
        # reward calls paired too: the ratio over denoiser + reward time is below the one over the denoiser alone
        assert c["reward_cpu_seconds_paired"] > 0
        assert 0 < c["overhead_ratio_paired_compute"] < c["overhead_ratio_paired"]
    # 18 NFEs is one trajectory: no choice anywhere, so only the final image is scored
    assert cells[("eps-greedy", 18)]["reward_calls_mean"] == 1 and cells[("smc", 18)]["reward_calls_mean"] == 1
    # 40 NFEs buy two trajectories' worth: best-of-2 and two SMC particles
    assert cells[("best-of-n", 40)]["fitted"] == "n=2" and cells[("smc", 40)]["info"]["particles"] == 2
    md = (out / "search_results.md").read_text()
    assert "| eps-greedy |" in md and (out / "search_reward_vs_nfe.png").stat().st_size > 1000


def test_bench_unknown_name(capsys):
    assert main(["bench", "nope"]) == 2
    assert "valid benchmarks: search, noise_aware" in capsys.readouterr().err


def test_every_benchmark_has_help(capsys):
    # every benchmark lives in noisesearch.bench and answers --help without doing any work
    from noisesearch.bench import BENCHMARKS

    for name in BENCHMARKS:
        assert main(["bench", name, "--help"]) == 0, name
        assert f"noisesearch bench {name}" in capsys.readouterr().out


def test_bench_search_config_file_and_labelled_samples(tmp_path):
    # --config FILE is handled by the CLI (the benchmark never imports noisesearch.cli); the resolved
    # options are written beside the results, and the samples grid is written with its labels
    cfg = tmp_path / "b.yaml"
    cfg.write_text("budgets: '18'\nseeds: 1\nstrategies: naive,best-of-n\nother-rewards: ''\n")
    out = tmp_path / "bench"
    assert main(["bench", "search", "--config", str(cfg), "--no-paired-timing", "--out", str(out)]) == 0
    res = json.loads((out / "search_results.json").read_text())
    assert {(c["label"], c["budget"]) for c in res["cells"]} == {("naive", 18), ("best-of-n", 18)}
    written = (out / "search_config.yaml").read_text()
    assert "budgets: '18'" in written or "budgets: \"18\"" in written or "budgets: 18" in written
    from PIL import Image

    with Image.open(out / "search_samples.png") as pic:
        assert pic.width > 10 * 64 and pic.height > 2 * 64


def test_bench_train_args_become_a_train_config():
    import pytest

    from noisesearch.bench.noise_aware import train_config
    from noisesearch.errors import NoiseSearchError

    c = train_config("--iters 300 --lora-rank 8 --no-gate --steps 1,3 --lr 0.01", reward="digit")
    assert (c.iters, c.lora_rank, c.gate, c.steps, c.lr, c.reward) == (300, 8, False, (1, 3), 0.01, "digit")
    assert train_config("--step-conditioning", gate=False).step_conditioning is True
    with pytest.raises(NoiseSearchError, match="unknown option"):
        train_config("--nope 3")
    with pytest.raises(NoiseSearchError, match="takes integers"):
        train_config("--iters many")


def test_timed_denoiser_counts_calls_at_new_batch_sizes(monkeypatch):
    """A call at a batch size the process has not used is counted once, with what it took beyond its
    paired call; the same size again is not new, and sizes the call timer measured are not new."""
    from noisesearch.bench import search as bs

    now, built, calls = [0.0], set(), []
    monkeypatch.setattr(bs, "CLOCK", lambda: now[0])
    monkeypatch.setattr(bs, "SEEN_BATCHES", {7})

    def fn(x, sigma, cond):  # 1 time unit a call, 3 more the first time at a size (kernels built)
        b = x.shape[0]
        calls.append(b)
        now[0] += 1.0 if b in built else 4.0
        built.add(b)
        return x

    tden = bs.TimedDenoiser(fn, paired=True)
    for b in (3, 3, 5, 7):
        tden(torch.zeros(b, 1), torch.ones(b), None)
    assert calls == [3, 3, 3, 3, 5, 5, 7, 7]  # every call made twice (paired)
    assert tden.new_shapes == 2 and bs.SEEN_BATCHES == {3, 5, 7}
    assert tden.first_shape_seconds == 6.0  # sizes 3 and 5: 4 - 1 each; size 7 was seen (its 3 units are not counted)
    assert tden.paired_seconds == 4.0 and tden.seconds == 4.0 + 4.0 + 1.0 + 4.0
