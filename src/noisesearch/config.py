"""Config files (``--config FILE``, a run's ``config.yaml``) read safely: :func:`load_config_file`.

A config file is YAML, or TOML when its name ends in ``.toml``, mapping option names to values. It
is read within bounds before anything is built from it:

* at most :data:`MAX_CONFIG_BYTES` bytes (``/dev/zero`` or a huge file is refused after reading that much);
* decoded as UTF-8 (a binary or latin-1 file is refused, with the byte that is not UTF-8);
* YAML aliases (``*name``) are expanded only within :data:`MAX_CONFIG_NODES` values in all: a file
  of a few hundred bytes whose aliases would expand to 10^9 entries (a "billion laughs" alias bomb)
  is refused at once, before it is expanded; an alias that refers to itself is refused too;
* brackets nested at most :data:`MAX_CONFIG_DEPTH` deep.

Every problem is a one-line ``NoiseSearchError``. The mapping of the keys to command-line flags is
``noisesearch.cli.config``'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib
import yaml
from yaml.nodes import MappingNode, SequenceNode

from noisesearch.errors import NoiseSearchError
from noisesearch.io import read_text_limited

MAX_CONFIG_BYTES = 2**20  # 1 MiB: a config file of options is a few KB
MAX_CONFIG_NODES = 100_000  # values after the expansion of YAML aliases
MAX_CONFIG_DEPTH = 200  # levels of brackets


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


def _expanded_size(node, limit: int, path: Path) -> int:
    """The number of values ``node`` stands for once its aliases are expanded (shared nodes counted
    each time they are used), computed on the node graph with memoisation: it stops as soon as the
    count passes ``limit``, never expanding anything."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise NoiseSearchError(f"--config {path}: a YAML alias refers to itself (a recursive structure); "
                                   "write the values out")
        total = 1
        if isinstance(n, (SequenceNode, MappingNode)):
            active.add(key)
            children = n.value if isinstance(n, SequenceNode) else [x for pair in n.value for x in pair]
            for child in children:
                total += size(child)
                if total > limit:
                    break
            active.discard(key)
        sizes[key] = total
        if total > limit:
            raise NoiseSearchError(f"--config {path}: its YAML aliases expand to more than {limit:,} values "
                                   "(an alias bomb?); write the options out without aliases")
        return total

    return size(node)


def _flow_depth(text: str, limit: int) -> bool:
    """Whether brackets (``[``, ``{``) nest deeper than ``limit`` anywhere in ``text`` (quotes are not
    parsed: a cheap bound taken before the parser, whose cost grows with the square of the depth)."""
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth = max(0, depth - 1)
    return False


def _load_yaml(text: str, path: Path) -> Any:
    if ("[" in text or "{" in text) and _flow_depth(text, MAX_CONFIG_DEPTH):
        raise NoiseSearchError(f"--config {path} is nested too deeply (more than {MAX_CONFIG_DEPTH} levels of brackets); "
                               "give a flat mapping of options")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml when installed: the same safe constructors
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, MAX_CONFIG_NODES, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _parse(text: str, path: Path) -> Any:
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return _load_yaml(text, path)
    except NoiseSearchError:
        raise
    except RecursionError:
        raise NoiseSearchError(f"--config {path} is nested too deeply; give a flat mapping of options") from None
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, a bad value (e.g. a date out of range)
        raise NoiseSearchError(f"--config {path} does not parse: {_first_line(e)}") from None


def load_config_file(path, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A config file as a dict (YAML, or TOML for ``*.toml``), read within the bounds of the module
    docstring; NoiseSearchError (one line) if it is unreadable, too large, not UTF-8, an alias bomb,
    does not parse or is not a mapping."""
    path = Path(path)
    text = read_text_limited(path, "--config", max_bytes)
    data = _parse(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NoiseSearchError(f"--config {path} must map option names to values (got a {type(data).__name__})")
    return data


__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES", "load_config_file"]
