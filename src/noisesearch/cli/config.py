"""``--config FILE`` for every command, and the resolved ``config.yaml`` every run writes.

A config file (YAML, or TOML when it ends in ``.toml``; read within bounds by
:func:`noisesearch.config.load_config_file`) maps option names to values; the keys are
the flags without the leading dashes (``budget-nfe`` or ``budget_nfe``), plus an optional
``command`` that must name the command it is given to. Values become the flags they name, placed
before the command line, so flags given on the command line override the file (for repeatable
flags such as ``--prompt`` the command line replaces the file's list). A flag ``--no-x`` takes
``true``/``false``; a switch such as ``--offload`` takes ``true``/``false``.

Every run writes the fully resolved configuration (every option, defaults included) as
``config.yaml`` into its output folder (:func:`write_config`); ``--config that/config.yaml``
repeats the run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from noisesearch.config import load_config_file
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_text

_SKIP = {"help", "config", "version"}


def _long_name(action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return (longs[0] if longs else action.option_strings[0]).lstrip("-")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{flag name (dashes) and dest: action} of the parser's optional arguments."""
    out = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in _SKIP or isinstance(a, argparse._HelpAction):
            continue
        out[_long_name(a)] = a
        out.setdefault(a.dest.replace("_", "-"), a)
    return out


def _find_config(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, path, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest += argv[i:]
            break
        if tok == "--config":
            if i + 1 >= len(argv):
                raise NoiseSearchError("--config needs a file name")
            path = argv[i + 1]
            i += 2
            continue
        if tok.startswith("--config="):
            path = tok.split("=", 1)[1]
            i += 1
            continue
        rest.append(tok)
        i += 1
    return path, rest


def _given(action, argv: list[str]) -> bool:
    return any(t == o or t.startswith(o + "=") for t in argv for o in action.option_strings)


def _bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise NoiseSearchError(f"--config: {key} takes true or false, got {value!r}")


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def expand_config(parser: argparse.ArgumentParser, argv: list[str], command: str) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's options (placed first, so the command
    line overrides them). Unknown keys, a config of another command and badly typed switches are
    one-line errors. Required options the file gives are no longer required on the command line."""
    path, rest = _find_config(argv)
    if path is None:
        return argv
    data = load_config_file(path)
    owner = data.pop("command", None)
    if owner is not None and owner != command:
        raise NoiseSearchError(f"--config {path} is a '{owner}' configuration, not a '{command}' one")
    actions = _actions(parser)
    tokens: list[str] = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("_", "-")
        action = actions.get(name)
        if action is None:
            known = sorted({_long_name(a) for a in actions.values()})
            raise NoiseSearchError(f"--config {path}: unknown option {key!r} for '{command}'; valid: {', '.join(known)}")
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch and value is not None:
            value = _bool(value, key)  # checked even when the command line gives the flag
        if _given(action, rest) or value is None:
            continue
        opt = [o for o in action.option_strings if o.startswith("--")][0]
        if switch:
            if value:
                tokens.append(opt)
        elif isinstance(action, argparse._AppendAction):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                tokens += [opt, _text(v)]
        elif action.nargs == 0:
            raise NoiseSearchError(f"--config: {key} cannot be set from a file")
        else:
            tokens.append(f"{opt}={_text(value)}")
        action.required = False
    return tokens + rest


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def resolved_config(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every option of ``parser`` with its value in ``args``, keyed by flag name (``--no-x`` keys hold
    whether the flag is given), plus ``command``."""
    out: dict[str, Any] = {"command": command}
    for a in parser._actions:
        if not a.option_strings or a.dest in _SKIP or isinstance(a, argparse._HelpAction):
            continue
        if not hasattr(args, a.dest):
            continue
        value = getattr(args, a.dest)
        if isinstance(a, argparse._StoreFalseAction):
            value = not value
        out[_long_name(a)] = _plain(value)
    return out


def config_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    head = f"# noisesearch {command}: the fully resolved options of this run; repeat it with\n" \
           f"#   noisesearch {command} --config THIS_FILE [--out OTHER_FOLDER]\n"
    return head + yaml.safe_dump(resolved_config(parser, args, command), sort_keys=False, default_flow_style=False)


def write_config(path, parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> Path:
    """Write the resolved configuration (0644, atomically) to ``path``."""
    return atomic_write_text(path, config_text(parser, args, command))
