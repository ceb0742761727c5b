"""``noisesearch bench NAME [OPTIONS]``: run a shipped benchmark (``noisesearch.bench``)."""
from __future__ import annotations

import argparse
import importlib

from noisesearch.bench import BENCHMARKS
from noisesearch.errors import NoiseSearchError, unknown_name


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark (search: strategies at equal NFEs on digits-uncond)",
        description="Run a shipped benchmark; the options after NAME are the benchmark's own "
        "(noisesearch bench NAME --help lists them).",
        epilog="benchmarks:\n" + "\n".join(f"  {k}: {v}" for k, v in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", nargs="?", help=f"benchmark: {', '.join(BENCHMARKS)}")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options, all optional "
                   "(noisesearch bench NAME --help lists them; search also takes --config FILE)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.name:
        raise NoiseSearchError(f"give a benchmark NAME: {', '.join(BENCHMARKS)} (then its options, all optional; "
                               "noisesearch bench NAME --help)")
    if args.name not in BENCHMARKS:
        raise unknown_name("benchmark", args.name, list(BENCHMARKS))
    module = importlib.import_module(f"noisesearch.bench.{args.name}")
    return int(module.main(args.options, prog=f"noisesearch bench {args.name}") or 0)
