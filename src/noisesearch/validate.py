"""Validation before work, one place per kind of input.

* numbers: argparse ``type=`` functions (:func:`positive_int`, :func:`nonneg_int`, :func:`finite_float`)
  that refuse non-finite, out-of-range and absurd values with the unit in the message;
* lists and sweeps: :func:`int_list`;
* paths: :func:`output_dir` (an output folder: writable, not a file, not a folder under a file, and
  either new, empty or a previous run of the same command) and :func:`output_file` (``--json``,
  ``--plot``);
* resources: :func:`check_memory` (an estimate in bytes against the machine's memory, naming the
  flag to change);
* model settings: :func:`check_guidance` (every model's classifier-free guidance scale).

Type functions raise ``argparse.ArgumentTypeError`` (argparse turns it into one line and exit 2,
see ``noisesearch.cli.OneLineParser``); the others raise ``NoiseSearchError`` (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

from noisesearch.config import load_config_file
from noisesearch.errors import NoiseSearchError
from noisesearch.io import read_text_limited

# the largest budget in network evaluations per sample accepted anywhere (a FLUX sample at 50 steps is
# 50 NFEs; ten million is far past any useful search and keeps plans and arrays bounded)
MAX_NFE = 1e7
MAX_INT = 10**9


# ---- numbers ------------------------------------------------------------------------------------------
def _int(text, what: str) -> int:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text) -> int:
    """An integer >= 1 (argparse type)."""
    v = _int(text, "a whole number >= 1")
    if not 1 <= v <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be >= 1 and <= {MAX_INT:g} (a whole number), got {text}")
    return v


def nonneg_int(text) -> int:
    """An integer >= 0 (argparse type)."""
    v = _int(text, "a whole number >= 0")
    if not 0 <= v <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be >= 0 and <= {MAX_INT:g} (a whole number), got {text}")
    return v


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi] (argparse type)."""
    def parse(text) -> int:
        v = _int(text, f"a whole number in {lo}..{hi}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be >= {lo} and <= {hi:g} (a whole number), got {text}")
        return v
    parse.__name__ = "int"
    return parse


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, unit: str = "") -> Callable[[str], float]:
    """A finite float within [lo, hi] (open ends with ``lo_open``/``hi_open``), argparse type."""
    def parse(text) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{' of ' + unit if unit else ''}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low_bad = lo is not None and (v <= lo if lo_open else v < lo)
        high_bad = hi is not None and (v >= hi if hi_open else v > hi)
        if low_bad or high_bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            rng = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
            raise argparse.ArgumentTypeError(f"must be in {rng}{' ' + unit if unit else ''}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


budget_nfe = finite_float(0, MAX_NFE, lo_open=True, unit="NFEs per sample")
budget_flops = finite_float(0, 1e30, lo_open=True, unit="FLOPs per sample")


def int_list(text: str, flag: str, lo: int = 1, hi: int = MAX_INT, min_len: int = 1) -> list[int]:
    """``a,b,c`` -> [a, b, c], every item a whole number in [lo, hi] (NoiseSearchError otherwise)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    out = []
    for t in items:
        try:
            v = int(t)
        except ValueError:
            raise NoiseSearchError(f"{flag} {text!r}: {t!r} is not a whole number (give e.g. 18,72,144)") from None
        if not lo <= v <= hi:
            raise NoiseSearchError(f"{flag} {text!r}: {v} is out of range {lo}..{hi:g}")
        out.append(v)
    if len(out) < min_len:
        raise NoiseSearchError(f"{flag}: give at least {min_len} value{'s' if min_len > 1 else ''}, got {text!r}")
    return out


# ---- paths --------------------------------------------------------------------------------------------
def _check_parent(path: Path, flag: str) -> None:
    """``path`` if it is an existing folder, else its first existing ancestor, must be a writable folder."""
    anc = path if path.is_dir() else path.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise NoiseSearchError(f"{flag} {path}: {anc} is a file, so no folder can be made under it; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise NoiseSearchError(f"{flag} {path}: cannot write in {anc} (permission denied); choose another path")


def output_dir(path, command: str, markers: Iterable[str] = (), flag: str = "--out") -> Path:
    """Check an output folder before any work. Allowed: a path that does not exist yet (its parents
    are made later), an empty folder, or a previous run of the same ``command`` - recognised by its
    ``config.yaml`` (``command: <command>``) or one of ``markers`` (e.g. ``report.json``). Refused:
    an existing file, a folder under a file, a place that is not writable, a folder holding anything else."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NoiseSearchError(f"{flag} {path} is an existing file, not a folder; choose a folder")
    _check_parent(path, flag)
    if not path.exists():
        return path
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        return path
    cfg = path / "config.yaml"
    if cfg.is_file():
        try:
            owner = load_config_file(cfg).get("command")
        except NoiseSearchError:
            owner = None
        if owner == command:
            return path
        if owner:
            raise NoiseSearchError(f"{flag} {path} holds a '{owner}' run, not a '{command}' one; choose another folder")
    if any((path / m).exists() for m in markers):
        return path
    raise NoiseSearchError(f"{flag} {path} is a folder that holds other files (not a previous '{command}' run); "
                           "choose a new or empty folder")


def output_file(path, flag: str, command: str | None = None) -> Path | None:
    """Check a file to write (``--json``, ``--plot``) before any work: not a folder, not under a file,
    in a writable place. An existing JSON file is replaced only if it is a previous ``command`` result."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise NoiseSearchError(f"{flag} {path} is a folder; give a file name, e.g. {Path(path) / 'out.json'}")
    _check_parent(path, flag)
    if path.exists() and not path.is_file():  # a device (/dev/zero), FIFO or socket: never replaced
        raise NoiseSearchError(f"{flag} {path} exists and is not a regular file; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise NoiseSearchError(f"{flag} {path}: the file is not writable; choose another path")
        if command and path.suffix == ".json":
            try:
                old = json.loads(read_text_limited(path, flag, max_bytes=64 * 2**20))  # bounded: not /dev/zero
            except (NoiseSearchError, ValueError):
                old = None
            if not (isinstance(old, dict) and old.get("command") == command):
                raise NoiseSearchError(f"{flag} {path} exists and is not a '{command}' result; choose another file")
    return path


# ---- resources ------------------------------------------------------------------------------------------
def physical_memory() -> int:
    """Bytes of physical memory of this machine (0 if unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(estimate: float, what: str, flags: str, share: float = 0.5, total: int | None = None) -> None:
    """Refuse work whose memory estimate (bytes) exceeds ``share`` of this machine's memory (or of
    ``total`` bytes, e.g. a GPU's), naming the flags to change."""
    total = physical_memory() if total is None else total
    if total and estimate > share * total:
        raise NoiseSearchError(f"{what} would need about {estimate / 2**30:.1f} GiB of memory, more than "
                               f"{share:.0%} of this machine's {total / 2**30:.1f} GiB; reduce {flags}")


def nonneg_number(value, what: str) -> float:
    """``value`` as a finite float >= 0, or a one-line error naming ``what``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise NoiseSearchError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def check_guidance(guidance) -> float:
    """``guidance`` as a float >= 0 (0 = unconditional, 1 = conditional, else classifier-free guidance)."""
    return nonneg_number(guidance, "guidance")


__all__ = ["MAX_NFE", "budget_flops", "budget_nfe", "check_guidance", "check_memory", "finite_float", "int_in", "int_list", "nonneg_int",
           "nonneg_number", "output_dir", "output_file", "physical_memory", "positive_int"]
