"""Command line interface: ``noisesearch <command> ...``.

Each command lives in its own module under ``noisesearch.cli`` with a one-line ``HELP`` and two functions:
``add_parser(subparsers)`` (registers the sub-command and calls ``set_defaults(func=run)``) and
``run(args) -> int``. Add a module name to ``COMMANDS`` to plug a new command in. A command module imports
at its top only what its parser needs without torch; what ``add_parser`` and ``run`` need beyond that is
imported inside them (``# deferred:``), so that ``noisesearch --help`` stays light.

Errors the user can fix (``NoiseSearchError``) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from noisesearch import __version__
from noisesearch.cli.config import expand_config
from noisesearch.dist import launch_info
from noisesearch.errors import NoiseSearchError
from noisesearch.io import output_lock

COMMANDS = ["generate", "simulate", "tune", "pool", "train_reward", "train_digits", "bench"]


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors on one line (``prog: error: message (see prog --help)``), exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_option(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` (handled before parsing by ``noisesearch.cli.config.expand_config``)."""
    p.add_argument("--config", metavar="FILE", default=None,
                   help="read options from a YAML or TOML file (keys named as the flags, e.g. budget-nfe: 360); "
                        "flags on the command line override it. Every run writes its resolved config.yaml")


ALL = "all"


def build_parser(full: str | None = ALL) -> argparse.ArgumentParser:
    """The ``noisesearch`` parser. ``full``: the command whose own options are built (its module's
    ``add_parser``), or ``ALL`` (default); the other commands are listed with their one-line ``HELP`` only,
    so that ``noisesearch --help`` imports none of the commands' dependencies (torch among them)."""
    parser = OneLineParser(
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
        command = name.replace("_", "-")
        if full in (ALL, command):
            module.add_parser(sub)
        else:
            sub.add_parser(command, help=module.HELP)
    for name, p in sub.choices.items():
        if name != "bench":  # bench passes --config on to the benchmark's own parser
            add_config_option(p)
    return parser


LOCKED = {"generate", "pool", "train-reward", "train-digits"}  # commands whose --out is a run folder


def held_output(args):
    """``output_lock(args.out)`` for the commands that write a run folder, taken by the main process
    only; a no-op where ``--out`` cannot be a folder (the command's own check says why)."""
    out = getattr(args, "out", None)
    if args.command not in LOCKED or out is None or (Path(out).exists() and not Path(out).is_dir()):
        return contextlib.nullcontext()
    try:
        info = launch_info()
    except NoiseSearchError:
        info = None  # the command refuses the launcher's variables itself
    if info is not None and info[0] != 0:
        return contextlib.nullcontext()
    return output_lock(out, "noisesearch " + " ".join(getattr(args, "argv", []) or [args.command]), quiet_mkdir=True)


def runtime_defaults() -> None:
    """The process settings every command runs with, where the environment does not set them; call
    before torch runs anything (``main`` does, and so do the tools that time what commands run)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # oneDNN (torch's CPU convolutions) builds its kernels for every new input shape (about 3 ms per
    # batch size for the digits UNet: tools/shape_cost.py) and keeps 1024 of them by default; searches
    # that batch a varying number of rows (rbf, dts) overflow that and rebuild. Read at its first use.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")


def main(argv=None) -> int:
    runtime_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in {n.replace("_", "-") for n in COMMANDS} else None
    parser = build_parser(full=command)  # only the command run builds its options (and imports its needs)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = command if command in sub.choices else None
    try:
        if command and command != "bench":
            argv_full = [command] + expand_config(sub.choices[command], argv[1:], command)
        else:
            argv_full = argv
    except NoiseSearchError as e:
        print(f"noisesearch {command}: error: {e}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv_full)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.cli_parser = sub.choices[args.command]
    try:
        with held_output(args):  # one run at a time in an output folder (noisesearch.io.output_lock)
            return int(args.func(args) or 0)
    except SystemExit as e:  # a benchmark's own argparse
        return e.code if isinstance(e.code, int) else 2
    except NoiseSearchError as e:
        print(f"noisesearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noisesearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
