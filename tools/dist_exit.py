"""How often a two-process run aborts when its processes exit with a live gloo process group.

    python tools/dist_exit.py [--runs 30] [--modes none,hook]

Each run is ``accelerate launch --num_processes 2`` of a tiny worker on the CPU: it joins the group
through :func:`noisesearch.dist.dist_state` (mode ``hook``, which registers ``destroy_at_exit``) or
through accelerate's ``PartialState`` alone (mode ``none``), gathers one object, and exits; process 1
exits at once while process 0 waits 0.3 s, as ``noisesearch generate`` does when process 0 writes the
run. A failed run is one whose launcher exits non-zero (without the hook: a process aborts with
"terminate called without an active exception" and the launcher kills the other). Prints the
failures per mode; the runs are sequential, about 6 s each.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = '''
import os, sys, time
from accelerate.utils import gather_object
if os.environ["DIST_EXIT_MODE"] == "hook":
    from noisesearch.dist import dist_state
    state = dist_state("cpu")
else:
    from accelerate import PartialState
    state = PartialState(cpu=True)
gather_object([state.process_index])
if not state.is_main_process:
    sys.exit(0)
time.sleep(0.3)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def failures(mode: str, runs: int, worker: Path) -> tuple[int, str]:
    """(failed runs, the line of the first failure's stderr that names its error) for ``runs`` launches in ``mode``."""
    accelerate = Path(sys.executable).parent / "accelerate"
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_EXIT_MODE=mode,
               PYTHONPATH=os.pathsep.join([str(src)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    failed, first = 0, ""
    for _ in range(runs):
        r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                            str(worker)], capture_output=True, text=True, env=env, timeout=300)
        if r.returncode != 0:
            failed += 1
            first = first or next((ln for ln in r.stderr.splitlines() if "terminate" in ln or "Error" in ln), "?")
    return failed, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="launches per mode (default 30)")
    ap.add_argument("--modes", default="none,hook", help="comma-separated: none, hook (default both)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        for mode in args.modes.split(","):
            failed, first = failures(mode, args.runs, worker)
            print(f"{mode}: {failed} of {args.runs} runs failed" + (f" (first: {first.strip()})" if failed else ""), flush=True)


if __name__ == "__main__":
    main()
