"""``noisesearch train-digits``: retrain the built-in digits denoiser, reward classifier and judge.

With the default seed this reproduces the shipped files in ``noisesearch/weights`` (see
``docs/digits.md``); copy the files from ``--out`` there to replace them.
"""
from __future__ import annotations

import time

from noisesearch.cli.common import write_run_config
from noisesearch.errors import NoiseSearchError
from noisesearch.validate import int_in, nonneg_int, output_dir

# the command's line in `noisesearch --help` (read without building its parser)
HELP = "train the built-in 8x8 digits model, reward classifier and judge"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train-digits",
        help=HELP,
        description="Train the built-in digits diffusion model (EDM), the 'digit' reward classifier and the judge "
        "on scikit-learn's digits, seeded; writes the split and safetensors weights to --out.",
    )
    p.add_argument("--out", required=True, help="output folder: new, empty or a previous train-digits run (created if missing)")
    p.add_argument("--what", default="all", choices=["all", "denoiser", "classifier", "judge"], help="what to train (default: all)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0 = the shipped weights)")
    p.add_argument("--epochs", type=int_in(1, 10**6), default=None, help="denoiser epochs over train_a+train_b (default 500)")
    p.add_argument("--classifier-epochs", type=int_in(1, 10**6), default=None, help="epochs for the reward classifier and the judge (default 150)")
    p.add_argument("--threads", type=int_in(1, 4096), default=1, help="torch CPU threads (default 1; see docs/digits.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress display (on a terminal a bar, otherwise a line every few seconds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from noisesearch.train.digits import train_all  # deferred: keeps `noisesearch --help` free of torch

    for name in ("epochs", "classifier_epochs", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise NoiseSearchError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    output_dir(args.out, "train-digits", ["digits_denoiser.safetensors", "digit_classifier.safetensors", "digit_judge.safetensors", "digits_split.json"])
    t0 = time.perf_counter()
    try:
        train_all(args.out, args.what, args.seed, args.epochs, args.classifier_epochs, progress=not args.no_progress, threads=args.threads)
    except OSError as e:
        raise NoiseSearchError(f"cannot write to {args.out}: {e}") from None

    write_run_config(args, args.out)
    print(f"done in {time.perf_counter() - t0:.0f} s; files in {args.out}")
    return 0
