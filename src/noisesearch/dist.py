"""Several processes (``accelerate launch`` / ``torchrun``): who am I, and how many are we.

``dist_state(device)`` is accelerate's ``PartialState`` when the run was launched with more than one
process, else None. ``pool`` shards prompts and ``generate`` shards searches over the processes
(:func:`noisesearch.api.generate` ``shard=``); every candidate keeps its own noise stream, so a
sharded run equals the single-process run up to float rounding.

The launcher's variables are checked first (:func:`launch_info`), each problem one line: a stray
``WORLD_SIZE`` / ``PMI_SIZE`` without a launcher (no ``MASTER_ADDR``, no rank), sizes that disagree,
a rank out of range. A process other than rank 0 first waits for rank 0 to listen at
``MASTER_ADDR:MASTER_PORT``, saying so on stderr, for at most ``NOISESEARCH_DIST_TIMEOUT`` seconds
(default 120), and then gives up with one line instead of waiting silently for a rank 0 that never comes.

A process that joined a group destroys it when the interpreter exits (:func:`destroy_at_exit`): one that
exits with a live gloo group can abort in its teardown ("terminate called without an active exception",
SIGABRT), and the launcher then kills the others and fails the run (``python tools/dist_exit.py``).
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import time
from typing import Mapping

from noisesearch.errors import NoiseSearchError

SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
DEFAULT_PORT = 29500  # accelerate's and torchrun's
DEFAULT_TIMEOUT = 120.0
_EXIT_HOOK = False  # whether destroy_at_exit has registered its hook
_HINT = "start the processes with `accelerate launch --num_processes N` (or torchrun), or unset {} to run one process"


def _ints(env: Mapping[str, str], names) -> dict[str, int]:
    out = {}
    for k in names:
        text = env.get(k, "").strip()
        if not text:
            continue
        try:
            out[k] = int(text)
        except ValueError:
            raise NoiseSearchError(f"{k}={text!r} is not a whole number; " + _HINT.format(k)) from None
    return out


def launch_info(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, world size) when a launcher started several processes, None for one process;
    NoiseSearchError (one line) when the variables cannot come from a launcher."""
    env = os.environ if env is None else env
    sizes = _ints(env, SIZE_VARS)
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise NoiseSearchError(f"{bad[0]}: a number of processes must be >= 1; " + _HINT.format(bad[0].split("=")[0]))
    if len(set(sizes.values())) > 1:
        given = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise NoiseSearchError(f"the numbers of processes disagree ({given}); " + _HINT.format("the stray ones"))
    world = max(sizes.values(), default=1)
    if world == 1:
        return None
    size_var = next(iter(sizes))
    ranks = _ints(env, RANK_VARS)
    if not ranks:
        raise NoiseSearchError(f"{size_var}={world} is set but no rank ({', '.join(RANK_VARS[:2])}): no launcher started "
                               "this process; " + _HINT.format(size_var))
    rank_var, rank = next(iter(ranks.items()))
    if not 0 <= rank < world:
        raise NoiseSearchError(f"{rank_var}={rank} is out of range for {size_var}={world} (0..{world - 1}); "
                               + _HINT.format(f"{rank_var} and {size_var}"))
    if not env.get("MASTER_ADDR", "").strip():
        raise NoiseSearchError(f"{size_var}={world} is set but MASTER_ADDR is not: no launcher started this process "
                               "(processes meet at MASTER_ADDR:MASTER_PORT); " + _HINT.format(size_var))
    return rank, world


def _timeout(env: Mapping[str, str]) -> float:
    text = env.get("NOISESEARCH_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise NoiseSearchError(f"NOISESEARCH_DIST_TIMEOUT={text!r} must be a number of seconds in (0, 1e6)")
    return value


def wait_for_rank0(rank: int, world: int, env: Mapping[str, str] | None = None, timeout: float | None = None) -> None:
    """For a process of rank > 0: wait (saying so on stderr) until rank 0 listens at
    MASTER_ADDR:MASTER_PORT, at most ``timeout`` seconds (``NOISESEARCH_DIST_TIMEOUT``, default 120);
    NoiseSearchError (one line) if it never does. A plain TCP connection, opened and closed."""
    env = os.environ if env is None else env
    host = env.get("MASTER_ADDR", "").strip()
    port_text = env.get("MASTER_PORT", "").strip() or str(DEFAULT_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise NoiseSearchError(f"MASTER_PORT={port_text!r} is not a port number") from None
    timeout = _timeout(env) if timeout is None else timeout
    print(f"noisesearch: process {rank} of {world} waiting up to {timeout:g} s for process 0 at {host}:{port}",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise NoiseSearchError(f"process {rank} of {world}: no process 0 answered at {host}:{port} within {timeout:g} s "
                           "(NOISESEARCH_DIST_TIMEOUT); " + _HINT.format("RANK and WORLD_SIZE"))


def _destroy_group() -> None:
    import torch.distributed as td  # deferred: keeps `noisesearch --help` free of torch

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def destroy_at_exit() -> None:
    """Destroy torch's default process group, if one is still alive, when the interpreter exits
    (registered once). Without it, a process can abort while Python tears the gloo group down:
    4 of 30 two-process runs here, 0 of 30 with it (``python tools/dist_exit.py``)."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(_destroy_group)
        _EXIT_HOOK = True


def dist_state(device: str):
    """accelerate's PartialState when launched with several processes, else None (one process).
    The launcher's variables are checked first (:func:`launch_info`); a rank > 0 waits for rank 0
    within a time limit (:func:`wait_for_rank0`)."""
    info = launch_info()
    if info is None:
        return None
    try:
        from accelerate import PartialState  # deferred: optional dependency (accelerate), multi-process runs only
    except ImportError:  # pragma: no cover - accelerate is an optional dependency
        raise NoiseSearchError("sharding over processes needs accelerate: pip install accelerate") from None
    rank, world = info
    if rank > 0:
        wait_for_rank0(rank, world)
    else:  # torch's rendezvous waits for the others without a word: say so, as the other ranks do
        where = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '') or DEFAULT_PORT}"
        print(f"noisesearch: process 0 of {world} waiting for the other {world - 1} at {where} (torch's rendezvous timeout)",
              file=sys.stderr, flush=True)
    try:
        state = PartialState(cpu=not str(device).startswith("cuda"))
    except (ValueError, RuntimeError) as e:  # the rendezvous failed (torch.distributed's errors are RuntimeErrors)
        first = " ".join(str(e).strip().splitlines()[0].split()) if str(e).strip() else type(e).__name__
        raise NoiseSearchError(f"cannot start process {rank} of {world}: {first[:300]}; " + _HINT.format("WORLD_SIZE")) from None
    destroy_at_exit()
    return state


__all__ = ["DEFAULT_TIMEOUT", "destroy_at_exit", "dist_state", "launch_info", "wait_for_rank0"]
