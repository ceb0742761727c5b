"""Command line interface: ``noisesearch <command> ...``.

Each command lives in its own module under ``noisesearch.cli`` with two functions:
``add_parser(subparsers)`` (registers the sub-command and calls ``set_defaults(func=run)``) and
``run(args) -> int``. Add a module name to ``COMMANDS`` to plug a new command in.

Errors the user can fix (``NoiseSearchError``) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from noisesearch import __version__
from noisesearch.errors import NoiseSearchError

COMMANDS = ["generate", "simulate", "tune", "pool", "train_reward", "train_digits", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisesearch",
        description="Test-time scaling for diffusion and flow image models: search the injected noise, "
        "prune candidates early, and account for every FLOP spent.",
    )
    parser.add_argument("--version", action="version", version=f"noisesearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"noisesearch.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"noisesearch.cli.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NoiseSearchError as e:
        print(f"noisesearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noisesearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
