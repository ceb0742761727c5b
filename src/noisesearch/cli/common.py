"""Options shared by several commands."""
from __future__ import annotations

from noisesearch.errors import NoiseSearchError

THREADS_HELP = "CPU threads for torch (default: torch's own; 1 is fastest on a busy machine)"


def add_threads(group) -> None:
    """``--threads N``."""
    group.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def apply_threads(args) -> None:
    """Set torch's CPU thread count from ``--threads`` (left alone when not given)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise NoiseSearchError("--threads must be at least 1")
    import torch

    torch.set_num_threads(n)
