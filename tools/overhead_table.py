"""The overhead table of docs/search.md from one or more runs of ``noisesearch bench search``.

    python3 tools/overhead_table.py RUN_DIR [RUN_DIR ...]

Prints one markdown row per strategy: the paired overhead ratio, the same without the first-shape
cost (what the calls at batch sizes new to the process took beyond their paired call: oneDNN
building its kernels, ``tools/shape_cost.py``) and the number of those calls, the ratio over
denoiser + reward time (both timed in pairs), the in-run ratio without the reward, and the reward's
paired time per NFE of paired denoiser time, at budgets 72 and 360; a range where the runs differ
(with three runs or more, the median and then the range).
"""
from __future__ import annotations

import glob
import json
import statistics
import sys

BUDGETS = (72, 360)
COLUMNS = ("overhead_ratio_paired", "overhead_ratio_paired_warm", "new_batch_shapes", "overhead_ratio_paired_compute",
           "overhead_ratio_without_reward", "reward_share")


def cells_of(run_dir: str) -> list[dict]:
    (path,) = glob.glob(f"{run_dir}/*results.json")
    with open(path) as f:
        return [c for c in json.load(f)["cells"] if c.get("status") == "ok"]


def value(cell: dict, key: str) -> float:
    if key == "reward_share":
        return cell["reward_cpu_seconds_paired"] / cell["denoiser_cpu_seconds_paired"]
    return cell.get(key)


def span(values: list[float]) -> str:
    if not values or any(v is None for v in values):
        return "n/a"  # a run from before the column existed
    fmt = "{:d}" if all(isinstance(v, int) for v in values) else "{:.2f}"
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    if len(values) >= 3 and lo != hi:  # three runs or more: the median, then the range
        return f"{statistics.median(values):.2f} ({lo}-{hi})"
    return lo if lo == hi else f"{lo}-{hi}"


def main(run_dirs: list[str]) -> None:
    runs = [cells_of(d) for d in run_dirs]
    labels = list(dict.fromkeys(c["label"] for c in runs[0]))
    print("| strategy | paired 72 / 360 | paired, first-shape cost out 72 / 360 | calls at new batch sizes 72 / 360 "
          "| over denoiser + reward 72 / 360 | without reward (in-run) 72 / 360 | reward time per NFE 72 / 360 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        row = [label]
        for key in COLUMNS:
            row.append(" / ".join(span([value(c, key) for cells in runs for c in cells
                                        if c["label"] == label and c["budget"] == b]) for b in BUDGETS))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
