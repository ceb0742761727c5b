"""``noisesearch generate``: run one search strategy and write samples, a grid and report.json."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import shlex
import sys
from pathlib import Path

from noisesearch.cli.common import (
    add_pipeline_options,
    add_threads,
    apply_threads,
    pipeline_model_options,
    resolve_device,
)
from noisesearch.cli.config import resolved_config
from noisesearch.dist import dist_state
from noisesearch.errors import NoiseSearchError
from noisesearch.io import read_text_limited
from noisesearch.validate import budget_flops, budget_nfe, finite_float, int_in, nonneg_int, output_dir, positive_int

EPILOG = """examples:
  noisesearch generate --model digits --prompt 3 --guidance 0 --reward digit \\
      --strategy best-of-n --budget-nfe 360 --num-samples 16 --seed 0 --out runs/demo
  noisesearch generate --model path/to/sd-pipeline --prompt "a red bicycle" --guidance 7.5 \\
      --reward clip@path/to/clip --strategy best-of-n --budget-nfe 120 --steps 30 --out runs/sd

outputs in --out: samples.png (grid), samples/NNNN.png, images.npy, search.png (the rewards of the
candidates' estimates at every scored step, chosen path highlighted), config.yaml (every option: repeat
the run with --config), report.json (written last). --out must be new, empty or a previous generate run.
"""


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _float_tuple(text: str) -> tuple[float, ...]:
    parse = finite_float()
    return tuple(parse(t) for t in str(text).split(",") if t.strip())


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(nonneg_int(t) for t in str(text).split(",") if t.strip())


_float_tuple.__name__ = "comma-separated numbers"
_int_tuple.__name__ = "comma-separated whole numbers"
_parse_bool.__name__ = "true/false"
_TYPES = {"int": nonneg_int, "float": finite_float(), "bool": _parse_bool, "str": str, "tuple[float, ...]": _float_tuple,
          "tuple[int, ...]": _int_tuple}
_KIND = {"int": "whole number", "float": "number", "bool": "true/false", "str": "text",
         "tuple[float, ...]": "comma-separated numbers", "tuple[int, ...]": "comma-separated whole numbers"}


def _field_comments(cls) -> dict[str, str]:
    """{field: the comment on its line} from a strategy dataclass's source (its documentation)."""
    out = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' notes
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s{4}(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


# what an option means on the command line where it differs from the strategy field's note (the
# strategies take objects; the CLI resolves names through noisesearch.build)
_CLI_NOTES = {"prune_reward": "reward scoring the checks: a reward spec, e.g. noise-aware@DIR (a train-reward checkpoint "
                              "folder) or mypackage.rewards:function; default: the search's reward"}


def strategy_option_fields():
    """{option name: (parse type, [(strategy, default), ...], kind, [what it does, ...])} over every
    registered strategy (descriptions from the comments of the strategies' dataclass fields)."""
    from noisesearch.search import STRATEGIES  # deferred: torch; only this command's parser needs it

    opts: dict[str, tuple] = {}
    for sname, cls in STRATEGIES.items():
        notes = {**_field_comments(cls), **_CLI_NOTES}
        for f in dataclasses.fields(cls):
            tname = str(f.type).replace("typing.", "")
            typ = _TYPES.get(tname, str)
            default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            entry = opts.setdefault(f.name, (typ, [], _KIND.get(tname, "text"), []))
            entry[1].append((sname, default))
            if notes.get(f.name):
                entry[3].append((sname, notes[f.name]))
    for typ, users, kind, notes in opts.values():  # one strategy: its note; several: "name: note" each
        groups: dict[str, list[str]] = {}
        for sname, note in notes:
            groups.setdefault(note, []).append(sname)
        notes[:] = [n if len(groups) == 1 else f"{', '.join(names)}: {n}" for n, names in groups.items()]
    return opts


def _fmt_default(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) if v else "none"
    if v == "":
        return "none"
    return str(v)


# the command's line in `noisesearch --help` (read without building its parser)
HELP = "search for samples that score high on a reward, within a compute budget"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help=HELP,
        description="Run a search strategy on a model for a reward within a budget; write samples, a grid and report.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", default="digits", help="'digits' (built in), galaxygrad:hsc32 (and hsc64, ztf32, ztf64), a diffusers pipeline folder, or a hub name org/model (default: digits)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); for digits a digit 0-9; optional for unconditional models")
    g.add_argument("--prompts-file", type=Path, help="file with one prompt per line (or a JSON list)")
    g.add_argument("--guidance", type=finite_float(0, 1e4), default=1.0, help="0 = unconditional, 1 = conditional, > 1 classifier-free guidance (default: 1)")
    g.add_argument("--steps", type=int_in(1, 10000), default=None, help="sampling steps (default: the model's, 18 for digits)")
    g.add_argument("--sampler", default="euler-ancestral", help="euler-ancestral (default), euler (deterministic), heun (EDM Heun with churn)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default)")
    g.add_argument("--max-batch", type=positive_int, default=512, help="rows per network call (default: 512)")
    g.add_argument("--score-batch", type=positive_int, default=None,
                   help="rows decoded and scored per reward call (default: --max-batch); smaller saves GPU memory "
                   "with a VAE and a large reward model")
    add_threads(g)

    g = p.add_argument_group("diffusers pipelines (SD, SDXL, FLUX, SD3, Lumina2)")
    add_pipeline_options(g)

    g = p.add_argument_group("search")
    g.add_argument("--reward", default=None, help="reward spec: a name (digit, judge, brightness, compressibility, clip@PATH, pickscore@DIR, hps@DIR, imagereward@DIR, aesthetic@DIR), a function by import path (mypackage.rewards:sharpness, f(images, prompts) -> [B]), 0.7*a+0.3*b, or ranksum(a,b) (default: digit, for --model digits; required for other models)")
    g.add_argument("--reward-flops", type=finite_float(0, 1e30), default=None, metavar="F",
                   help="declare or override the reward's price in FLOPs per image (a function by import path costs 0 "
                   "unless declared: a FLOP budget then pays only for network evaluations and decodes)")
    g.add_argument("--eval-reward", action="append", default=[], metavar="SPECS",
                   help="rewards NOT optimised that score the chosen samples afterwards, comma-separated, repeatable "
                   "(e.g. hps@DIR,pickscore@DIR); written to report.json (eval_rewards), outside the budget")
    g.add_argument("--strategy", default="best-of-n", help="search strategy (default: best-of-n); see the strategy options below")
    g.add_argument("--budget-nfe", type=budget_nfe, default=None, help="budget in network evaluations (NFEs) per sample, > 0 and at most 1e7")
    g.add_argument("--budget-flops", type=budget_flops, default=None, help="budget in FLOPs per sample (network and reward calls), > 0, e.g. 8.03e8")
    g.add_argument("--num-samples", type=int_in(1, 100000), default=1, help="independent searches (output samples) per prompt (default: 1)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")

    g = p.add_argument_group(
        "strategy options",
        "Each applies to the strategies listed with their defaults in [...]. A size option given 0 (its "
        "default) is fitted to the budget: the largest size the budget affords. true/false options take "
        "true or false (also yes/no, 1/0).")
    for name, (typ, users, kind, notes) in sorted(strategy_option_fields().items()):
        which = ", ".join(f"{s}={_fmt_default(d)}" for s, d in users)
        what = "; ".join(notes) if notes else ""
        g.add_argument("--" + name.replace("_", "-"), dest="opt_" + name, type=typ, default=None,
                       metavar=name.upper() if kind != "true/false" else "{true,false}",
                       help=f"({kind}) {what} [{which}]".replace("%", "%%"))

    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("runs/generate"), help="output folder (default: runs/generate)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (on a terminal a bar, otherwise a line every few seconds)")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)
    return p


def read_prompts(args) -> list[str]:
    """``--prompt`` (repeatable) and ``--prompts-file`` (one per line, or a JSON list; UTF-8, bounded)."""
    prompts = list(args.prompt)
    if args.prompts_file:
        text = read_text_limited(args.prompts_file, "--prompts-file")
        if text.lstrip().startswith("["):
            try:
                prompts += [str(x) for x in json.loads(text)]
            except json.JSONDecodeError as e:
                raise NoiseSearchError(f"--prompts-file {args.prompts_file} looks like JSON but does not parse: {e}") from None
        else:
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def generate_kwargs(args, prompts: list[str], device: str, dist) -> dict:
    """The keyword arguments of ``noisesearch.generate`` from the parsed options."""
    from noisesearch.rewards.base import split_specs  # deferred: keeps `noisesearch --help` free of torch

    return dict(
        model=args.model, prompts=prompts or None, reward=args.reward, reward_flops=args.reward_flops,
        strategy=args.strategy, budget_nfe=args.budget_nfe, budget_flops=args.budget_flops,
        num_samples=args.num_samples, guidance=args.guidance, steps=args.steps, sampler=args.sampler, seed=args.seed,
        device=device, max_batch=args.max_batch, score_batch=args.score_batch,
        strategy_options={k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None},
        progress=not (args.no_progress or args.quiet) and (dist is None or dist.is_main_process),
        model_options=pipeline_model_options(args),
        shard=None if dist is None else (dist.process_index, dist.num_processes),
        eval_rewards=[spec for text in args.eval_reward for spec in split_specs(text)],
        trace=dist is None,  # search.png is drawn for single-process runs only
        out=args.out, save=False,  # out: its disk space is checked before the search; written here
    )


def run(args) -> int:
    """Check the options, hold --out, search (each process its shard under ``accelerate launch``),
    and write the run folder with ``save_run`` (the main process, once)."""
    from noisesearch import api  # deferred: keeps `noisesearch --help` free of torch

    prompts = read_prompts(args)
    apply_threads(args)
    if args.budget_nfe is None and args.budget_flops is None:
        raise NoiseSearchError("give a budget: --budget-nfe N (network evaluations per sample) or --budget-flops F")
    output_dir(args.out, "generate", ["report.json"])
    device = resolve_device(args.device)
    dist = dist_state(device)  # several processes under `accelerate launch`: each runs a shard
    if dist is not None and device.startswith("cuda"):
        device = str(dist.device)
    # --out is held by the CLI's main (noisesearch.cli.held_output) for the whole command
    result = api.generate(**generate_kwargs(args, prompts, device, dist))
    if dist is not None:  # the main process merges the shards and writes the one run
        from accelerate.utils import gather_object  # deferred: optional dependency (accelerate), multi-process runs only

        shards = gather_object([result])
        if not dist.is_main_process:
            return 0
        result = api.merge_runs(shards)
    result.config = run_config(args)
    result.report["command"] = "noisesearch " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    out = api.save_run(result, args.out)
    if not args.quiet:
        print(summary_line(result.report))
        names = ["samples.png", "samples/", "images.npy", "search.png", "config.yaml", "report.json"]
        print("wrote " + ", ".join(f"{out}/{n}" for n in names if (out / n.rstrip("/")).exists()))
    return 0


def run_config(args) -> dict | None:
    """The run's fully resolved options (``config.yaml``), as the CLI parsed them."""
    parser = getattr(args, "cli_parser", None)
    if parser is None:
        return None

    return resolved_config(parser, args, args.command)


def summary_line(r: dict) -> str:
    line = f"{r['strategy']}: reward_mean {r['reward_mean']:.4f}"
    if "judge_accuracy" in r:
        line += f"  judge_accuracy {r['judge_accuracy']:.3f}"
    for spec, e in r.get("eval_rewards", {}).items():
        if spec != "judge":
            line += f"  eval[{spec}] {e['mean']:.4f}"
    return line + f"  nfe_max {r['nfe_max']}  reward_calls {r['reward_calls']}  flops {r['flops']:.3g}  wall {r['wall_seconds']:.2f}s"

