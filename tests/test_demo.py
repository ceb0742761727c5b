"""``make demo`` (``python -m noisesearch.demo``): a small run writes the figure, the report and the
same run folders as the CLI."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from noisesearch import demo

RUN_FILES = ("report.json", "config.yaml", "samples.png", "search.png")


def test_quick_demo_writes_figure_summary_and_run_folders(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--strategies", "best-of-n,eps-greedy", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "noisesearch bench search" in printed  # where the longer benchmark lives
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget_nfe"] == demo.QUICK["budget_nfe"] and summary["samples_per_target"] == 1
    assert summary["threads"] == 1
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert list(rows) == ["best-of-n", "eps-greedy"]
    for name, r in rows.items():
        # equal compute: every strategy within the same NFE budget per sample; best-of-N spends it all
        assert 18 <= r["nfe_max"] <= summary["budget_nfe"]
        assert 0.0 <= r["judge_accuracy"] <= 1.0 and 0.0 <= r["classifier_accuracy"] <= 1.0
        for f in RUN_FILES:
            assert (out / name / f).is_file(), f"{name}/{f}"
        report = json.loads((out / name / "report.json").read_text())
        assert report["strategy"] == name and len(report["samples"]) == 10
    assert rows["best-of-n"]["nfe_max"] == summary["budget_nfe"]
    with Image.open(out / "comparison.png") as pic:
        assert pic.format == "PNG"
        # a labelled grid: two rows of upscaled 8x8 digits plus labels, ten columns plus the row labels
        assert pic.height > 2 * 64 and pic.width > 10 * 64


def test_demo_refuses_a_budget_below_one_trajectory(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--budget-nfe", "5", "--out", str(tmp_path / "d")])
    assert e.value.code == 2
    assert not (tmp_path / "d").exists()


def test_quick_defaults():
    cfg = demo.parse_args(["--quick"])
    assert cfg.budget_nfe == demo.QUICK["budget_nfe"] and cfg.samples == 1
    assert cfg.strategies == tuple(demo.QUICK["strategies"].split(","))
    full = demo.parse_args([])
    assert full.threads == 1 and full.samples == 4 and "best-of-n" in full.strategies


def test_demo_refuses_a_folder_holding_something_else(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert demo.main(["--quick", "--out", str(out)]) == 2
    assert "demo: error:" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_keep_freed_memory_is_taken_by_glibc():
    import platform

    kept = demo.keep_freed_memory()
    assert isinstance(kept, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert kept  # mallopt accepted both settings
