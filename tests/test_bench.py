"""``noisesearch bench search``: the search benchmark as a command (a tiny sweep)."""
from __future__ import annotations

import json

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
