"""The README's Python snippets run, in order, as a reader would paste them.

The first loads a pipeline from the hub (``DDPMPipeline.from_pretrained``); nothing is downloaded
here: that one call returns a tiny random DDPMPipeline (tests/tiny.py) instead, everything else runs
as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch, capsys):
    diffusers = pytest.importorskip("diffusers")
    from tiny import tiny_ddpm_pipeline

    monkeypatch.setattr(diffusers.DDPMPipeline, "from_pretrained", classmethod(lambda cls, name, **kw: tiny_ddpm_pipeline()))
    monkeypatch.chdir(tmp_path)  # they write runs/ into the current folder
    text = README.read_text()
    python = text[text.index("## Python API"):]
    assert python.index("```python") < python.index("digits"), "the Python section starts with a pipeline object"
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    for run in ("ddpm", "api"):
        assert (tmp_path / "runs" / run / "report.json").exists()
    assert namespace["run"].report["judge_accuracy"] >= 0
