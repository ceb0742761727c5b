"""``noisesearch train-reward``: fine-tune a noise-aware reward on a pool (curriculum self-distillation)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from noisesearch.cli.common import add_threads, apply_threads, resolve_device, write_run_config
from noisesearch.errors import NoiseSearchError
from noisesearch.validate import finite_float, int_in, nonneg_int, output_dir, positive_int

EPILOG = """examples:
  noisesearch pool --model digits --guidance 0 --reward digit --prompts 0,1,2,3,4,5,6,7,8,9 \\
      --candidates 400 --save-images --out pools/digits
  noisesearch train-reward --pool pools/digits --reward digit --out rewards/digit-noise-aware
  noisesearch generate --model digits --guidance 0 --reward digit --prompt 3 --strategy ttsnap \\
      --prune-reward noise-aware@rewards/digit-noise-aware --budget-flops 2e9 --out runs/ttsnap

The result is the reward spec noise-aware@DIR (usable in generate and pool). A rerun of the same
command continues an interrupted training after its last finished stage; every finished stage file is
verified first: one that does not load or fails its checksum is retrained (with the stages after it);
one that holds another step's or another run's weights (a file copied over) is refused.
--out must be new, empty or a previous train-reward run; it also holds config.yaml. Training reads the
pool's stored estimates one batch at a time: its memory does not grow with the pool.
"""


# the command's line in `noisesearch --help` (read without building its parser)
HELP = "fine-tune a noise-aware reward model on a pool's Tweedie estimates"


def add_parser(sub) -> argparse.ArgumentParser:
    from noisesearch.train.noise_aware import TrainConfig  # deferred: torch; only this command's parser needs it

    d = TrainConfig()
    p = sub.add_parser(
        "train-reward",
        help=HELP,
        description="Curriculum self-distillation (TTSnap): the student (a copy of the reward model) learns to predict "
        "the reward of the finished image from the Tweedie estimate of each step, one stage per step from late to early.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pool", required=True, type=Path, help="pool folder made with `noisesearch pool ... --save-images`")
    p.add_argument("--reward", required=True, help="the pool's reward to distil (teacher values): the spec the pool was "
                   "made with (e.g. digit, hps@DIR) or its key in pool.json")
    p.add_argument("--reward-spec", default="", help="spec of the reward model to fine-tune if it differs from the pool's record")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder (the reward spec noise-aware@OUT)")
    p.add_argument("--steps", default="", help="pool steps to train, comma-separated (default: all but the final image)")
    p.add_argument("--lora-rank", type=int_in(0, 4096), default=d.lora_rank, help=f"LoRA rank through peft; 0 = full fine-tuning (default: {d.lora_rank})")
    p.add_argument("--lora-alpha", type=finite_float(0), default=d.lora_alpha, help="LoRA alpha (default: the rank)")
    p.add_argument("--lr", type=finite_float(0, 10, lo_open=True), default=d.lr, help=f"start learning rate of the first stage (default: {d.lr:g})")
    p.add_argument("--lr-decay", type=finite_float(0, 1, lo_open=True), default=d.lr_decay, help=f"start learning rate of stage k = lr * decay^k (default: {d.lr_decay:g})")
    p.add_argument("--iters", type=int_in(1, 10**7), default=d.iters, help=f"optimizer steps per stage (default: {d.iters})")
    p.add_argument("--batch-size", type=int_in(1, 10**6), default=d.batch_size, help=f"batch size (default: {d.batch_size})")
    p.add_argument("--replay", type=finite_float(0, 1, hi_open=True), default=d.replay, help=f"share of each batch replaying earlier stages' steps (default: {d.replay:g})")
    p.add_argument("--pairwise", type=finite_float(0, 1e6), default=d.pairwise, help=f"weight of the pairwise preference loss (default: {d.pairwise:g} = MSE only)")
    p.add_argument("--weight-decay", type=finite_float(0, 1e3), default=d.weight_decay, help=f"AdamW weight decay (default: {d.weight_decay:g})")
    p.add_argument("--holdout", type=finite_float(0, 1, hi_open=True), default=d.holdout, help=f"share of candidates per prompt held out to gate each stage (default: {d.holdout:g}; 0 turns the gate off, with a warning)")
    p.add_argument("--cross-prompts", action="store_true", help="also distil the teacher's reward of every image for the "
                   "pool's other prompts (valid when sampling ignores the prompt, e.g. guidance 0)")
    p.add_argument("--no-gate", dest="gate", action="store_false", help="use every stage's weights, even where they do not "
                   "beat the base reward on held-out candidates (default: such steps are scored by the base reward)")
    p.add_argument("--step-conditioning", action="store_true", help="condition the reward model on the noise level "
                   "(adaLN-Zero on ViT layers, FiLM-Zero otherwise; identity at initialisation): the final stage's model "
                   "scores every step instead of per-step snapshots")
    p.add_argument("--cond-dim", type=positive_int, default=d.cond_dim, help=f"noise-level embedding width of --step-conditioning (default: {d.cond_dim})")
    p.add_argument("--seed", type=nonneg_int, default=d.seed, help="seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... or auto (default)")
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    apply_threads(args)
    # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.train.noise_aware import (
        TrainConfig,
        train_noise_aware,
    )

    try:
        steps = tuple(int(s) for s in args.steps.split(",") if s.strip())
    except ValueError:
        raise NoiseSearchError(f"--steps {args.steps!r}: give comma-separated step indices, e.g. 0,1,2") from None
    output_dir(args.out, "train-reward", ["train_state.json", "noise_aware.json"])
    if args.out.resolve() == args.pool.resolve():
        raise NoiseSearchError("--out must not be the --pool folder")
    config = TrainConfig(
        reward=args.reward,
        reward_spec=args.reward_spec,
        steps=steps,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lr=args.lr,
        lr_decay=args.lr_decay,
        iters=args.iters,
        batch_size=args.batch_size,
        replay=args.replay,
        pairwise=args.pairwise,
        weight_decay=args.weight_decay,
        holdout=args.holdout,
        cross_prompts=args.cross_prompts,
        gate=args.gate,
        seed=args.seed,
        step_conditioning=args.step_conditioning,
        cond_dim=args.cond_dim,
    )
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    manifest = train_noise_aware(args.pool, args.out, config, device=resolve_device(args.device),
                                 progress=not (args.no_progress or args.quiet), log=log,
                                 lock=False)  # the CLI holds io.output_lock(--out) around the command
    if manifest.get("format"):
        write_run_config(args, args.out)
    if not args.quiet and manifest.get("format"):
        print(f"noise-aware reward noise-aware@{args.out}: steps {manifest['steps'][0]}..{manifest['steps'][-1]} "
              f"({len(manifest['stages'])} stages) on {manifest['base_reward']}")
    return 0
