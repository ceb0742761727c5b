"""``noisesearch bench NAME [OPTIONS]``: run a shipped benchmark (``noisesearch.bench``)."""
from __future__ import annotations

import argparse
import importlib
import shlex

from noisesearch.bench import BENCHMARKS
from noisesearch.cli import OneLineParser, add_config_option
from noisesearch.cli.config import expand_config, write_config
from noisesearch.errors import NoiseSearchError, unknown_name

# the command's line in `noisesearch --help` (read without building its parser)
HELP = "run a benchmark (search: strategies at equal NFEs on digits-uncond)"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help=HELP,
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
    prog = f"noisesearch bench {args.name}"
    if not hasattr(module, "build_parser"):
        return int(module.main(args.options, prog=prog) or 0)
    return _run_with_config(module, prog, list(args.options))


def _run_with_config(module, prog: str, argv: list[str]) -> int:
    """A benchmark that exposes ``build_parser`` / ``run``: parsed here with one-line errors and
    ``--config FILE``; its resolved options are written beside its results."""
    command = prog.removeprefix("noisesearch ")
    p = module.build_parser(prog, OneLineParser)
    add_config_option(p)
    ns = p.parse_args(expand_config(p, argv, command))
    return int(module.run(ns, f"{prog} {shlex.join(argv)}".strip(),
                          save_config=lambda path: write_config(path, p, ns, command)) or 0)
