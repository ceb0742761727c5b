"""Noise-trajectory search at equal compute on ``digits-uncond`` (issue #3): the same as
``noisesearch bench search`` (``noisesearch.bench.search``), with the tables and plots written into
``docs/`` by default.

    .venv/bin/python benchmarks/search.py                       # the full run (about 9 min, one thread)
    .venv/bin/python benchmarks/search.py --budget-kind flops   # budgets in FLOPs (search_flops_*)
    .venv/bin/python benchmarks/search.py --help
"""
import sys
from pathlib import Path

from noisesearch.bench.search import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/search.py", default_out=Path(__file__).resolve().parents[1] / "docs"))
