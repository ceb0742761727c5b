"""Options shared by several commands."""
from __future__ import annotations

from pathlib import Path

from noisesearch.cli.config import write_config
from noisesearch.errors import NoiseSearchError
from noisesearch.validate import finite_float, int_in, positive_int

THREADS_HELP = "CPU threads for torch (default: torch's own; 1 is fastest on a busy machine)"


def add_threads(group) -> None:
    """``--threads N``."""
    group.add_argument("--threads", type=int_in(1, 4096), default=None, help=THREADS_HELP)


def apply_threads(args) -> None:
    """Set torch's CPU thread count from ``--threads`` (left alone when not given)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise NoiseSearchError("--threads must be at least 1")
    import torch  # deferred: keeps `noisesearch --help` free of torch

    torch.set_num_threads(n)


def write_run_config(args, folder) -> None:
    """Write the run's fully resolved options as ``folder/config.yaml`` (``--config`` repeats the run)."""
    parser = getattr(args, "cli_parser", None)
    if parser is None:
        return

    write_config(Path(folder) / "config.yaml", parser, args, args.command)


def write_config_beside(args, file) -> None:
    """Write the resolved options next to an output file: ``out.json`` -> ``out.config.yaml``."""
    parser = getattr(args, "cli_parser", None)
    if parser is None:
        return

    file = Path(file)
    write_config(file.with_name(file.stem + ".config.yaml"), parser, args, args.command)


def resolve_device(name: str) -> str:
    """``--device``: ``auto`` picks CUDA when available; a CUDA device that is not there is a clear error."""
    import torch  # deferred: keeps `noisesearch --help` free of torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NoiseSearchError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


# ---- diffusers / flow pipeline options (generate and pool) -------------------------------------------
_PIPELINE_KEYS = ("height", "width", "dtype", "negative_prompt", "variant")
_FLOW_KEYS = ("embedded_guidance", "decode_batch")


def add_pipeline_options(group, base: bool = True) -> None:
    """Options of diffusers pipelines: ``--height/--width/--dtype/--negative-prompt/--variant`` (with
    ``base``) and the flow-pipeline ones (``--embedded-guidance``, ``--offload``, ``--decode-batch``,
    ``--vae-tiling``, ``--negtome*``)."""
    if base:
        group.add_argument("--height", type=int_in(8, 16384), default=None, help="image height in pixels (default: the pipeline's)")
        group.add_argument("--width", type=int_in(8, 16384), default=None, help="image width in pixels (default: the pipeline's)")
        group.add_argument("--dtype", default=None, help="network dtype: float32, float16, bfloat16 (default on CUDA: bfloat16 for FLUX/SD3, float16 for SD/SDXL; else float32)")
        group.add_argument("--negative-prompt", default=None, help="the unconditional prompt of classifier-free guidance (default: empty)")
        group.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    group.add_argument("--embedded-guidance", type=finite_float(0, 1e4), default=None, help="FLUX.1-dev's guidance-embedding input (default 3.5); --guidance stays classifier-free guidance")
    group.add_argument("--offload", action="store_true", help="model CPU offload for small GPUs (flow pipelines, CUDA)")
    group.add_argument("--decode-batch", type=positive_int, default=None, help="latents per VAE decode call when estimates are decoded for the reward (default: 8 SD, 4 flow)")
    group.add_argument("--vae-tiling", action="store_true", help="VAE slicing and tiling (flow pipelines; large images on small GPUs)")
    group.add_argument("--negtome", action="store_true", help="NegToMe: push the candidates of a prompt apart in FLUX's attention (diversity)")
    group.add_argument("--negtome-alpha", type=finite_float(), default=0.9, help="NegToMe strength (default: 0.9)")
    group.add_argument("--negtome-threshold", type=finite_float(-1, 1), default=0.65, help="NegToMe cosine-similarity threshold (default: 0.65)")
    group.add_argument("--negtome-window", default="0.9,1.0", help="NegToMe flow-time window lo,hi (1 = noise; default: 0.9,1.0)")


def pipeline_model_options(args) -> dict:
    """``model_options`` for ``load_model`` from the options of ``add_pipeline_options``."""
    opts = {k: getattr(args, k) for k in _PIPELINE_KEYS + _FLOW_KEYS if getattr(args, k, None) is not None}
    if getattr(args, "offload", False):
        opts["offload"] = True
    if getattr(args, "vae_tiling", False):
        opts["vae_tiling"] = True
    if getattr(args, "negtome", False):
        try:
            lo, hi = (float(v) for v in str(args.negtome_window).split(","))
        except ValueError:
            raise NoiseSearchError(f"--negtome-window must be lo,hi (flow times), got {args.negtome_window!r}") from None
        opts["negtome"] = {"alpha": args.negtome_alpha, "threshold": args.negtome_threshold, "window": (lo, hi)}
    return opts
