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


def resolve_device(name: str) -> str:
    """``--device``: ``auto`` picks CUDA when available; a CUDA device that is not there is a clear error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NoiseSearchError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name
