"""What a search looked at: the reward of every scored candidate's Tweedie estimate, step by step,
and a small picture of each, drawn as ``search.png`` by ``noisesearch generate``.

Off by default (``Problem.trace is None`` costs nothing). When on, :meth:`Problem.score` hands every
scored batch to :meth:`SearchTrace.record`: the step, the owner (search) of each row, the scores and a
thumbnail of the decoded estimate (the images the reward saw, so no extra decode is paid). Only the
searches in ``owners`` are kept (the first sample of each prompt), with at most ``max_rows`` rows.

The chosen path is reconstructed, not tracked: at every scored step it is the candidate of that search
whose estimate is nearest (pixel distance of the thumbnails) to the chosen final sample. For a best-of-N
or pruned search this is the chosen trajectory itself (its estimates converge to the final image); for
searches that branch (beam, SMC, MCTS, eps-greedy) it is the nearest ancestor-like estimate - an
approximation documented in the figure. Pruned candidates (``ttsnap``/``ttsp``) are marked where they
were dropped: at a check whose next scoring sees fewer rows, the lowest-scored ones are the dropped.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from noisesearch.io import atomic_save_figure

THUMB = 32


@dataclass
class _Record:
    step: int
    sigma: float | None
    main: bool  # the problem's own reward (False: a prune reward)
    owner: torch.Tensor  # [n] long
    scores: torch.Tensor  # [n] float
    thumbs: torch.Tensor  # [n, C, h, w] uint8


def thumbnails(images: torch.Tensor, size: int = THUMB) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> uint8 [B, C, h, w] with max(h, w) <= size (area downsampling)."""
    images = images.detach().float().cpu()
    h, w = images.shape[-2:]
    if max(h, w) > size:
        scale = size / max(h, w)
        images = F.interpolate(images, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class SearchTrace:
    owners: set[int]  # searches to keep
    max_rows: int = 200_000
    records: list[_Record] = field(default_factory=list)
    rows: int = 0

    def wants(self, owner: torch.Tensor) -> torch.Tensor:
        keep = torch.tensor([int(o) in self.owners for o in owner.tolist()], dtype=torch.bool)
        if self.rows >= self.max_rows:
            keep[:] = False
        return keep

    def record(self, step: int, sigma: float | None, main: bool, owner: torch.Tensor, scores: torch.Tensor,
               thumbs: torch.Tensor) -> None:
        keep = self.wants(owner.cpu())
        if not keep.any():
            return
        self.records.append(_Record(int(step), sigma, main, owner.cpu()[keep].long(), scores.detach().float().cpu()[keep],
                                    thumbs[keep]))
        self.rows += int(keep.sum())


def plot_search(path, trace: SearchTrace, final_images: torch.Tensor, prompts: list[str], panels: list[int],
                strategy: str, mark_drops: bool, max_panels: int = 8) -> None:
    """Write ``search.png``: one panel per search in ``panels`` (the chosen sample of each prompt), two
    columns; above each panel, the chosen path's estimates as a strip of thumbnails aligned with the steps.
    A fixed layout on a bare ``Figure`` (Agg, no pyplot state, no tight_layout): a fraction of a second."""
    from matplotlib.figure import Figure  # deferred: matplotlib (0.3 s to import) is only for this figure
    from matplotlib.ticker import MaxNLocator  # deferred: as above

    finals = thumbnails(final_images)
    data = [_panel_data(trace, o, finals[o]) for o in panels[:max_panels]]
    steps = [r.step for r in trace.records] or [0]
    xlim = (min(0, min(steps)) - 0.5, max(steps) + 0.5)
    xticks = [t for t in MaxNLocator(nbins=4, integer=True).tick_values(*xlim) if xlim[0] <= t <= xlim[1]]
    ncol = 1 if len(data) == 1 else 2
    nrow = math.ceil(len(data) / ncol)
    handles = _legend_handles(trace, mark_drops and any(d is not None and d.drops[0] for d in data))
    width, dpi = 5.2 * ncol + 0.3, 90  # inches, pixels per inch
    title = textwrap.wrap(f"{strategy}: the reward of every scored candidate's Tweedie estimate, step by step. "
                          "Chosen path: at each step, the candidate nearest the final sample (exact for best-of-N, "
                          "approximate for branching searches).", width=int(width * 16))
    legend_cols = len(handles) if ncol == 2 else 1  # one panel column: too narrow for two entries side by side
    legend_rows = math.ceil(len(handles) / legend_cols)
    top, bottom, row_h = 0.15 * len(title) + 0.2 * legend_rows + 0.25, 0.45, 2.2
    height = top + bottom + row_h * nrow
    fig = Figure(figsize=(width, height), dpi=dpi)
    for i, (o, d) in enumerate(zip(panels, data)):
        r_, c_ = divmod(i, ncol)
        left, base = 0.55 + c_ * 5.2, bottom + (nrow - 1 - r_) * row_h + 0.3  # inches
        ax = fig.add_axes((left / width, base / height, 4.5 / width, 1.25 / height))
        _draw_panel(ax, d, xlim, mark_drops)
        if d is not None and d.path:  # the strip: pixels placed on the figure, no axes to lay out
            fig.figimage(_thumb_strip(d.path, xlim, round(4.5 * dpi), round(0.4 * dpi)),
                         xo=round(left * dpi), yo=round((base + 1.3) * dpi), origin="upper")
        fig.text((left + 2.25) / width, (base + 1.75) / height, f"prompt {_short(prompts[o])!r} (search {o})",
                 fontsize=8, ha="center", va="bottom")
        ax.set_xticks(xticks)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
        last_row = r_ == nrow - 1 or i + ncol >= len(data)
        ax.tick_params(labelsize=7, labelbottom=last_row)
        if c_ == 0:
            ax.set_ylabel("reward", fontsize=8)
        if last_row:
            ax.set_xlabel("sampling step of the scored estimate", fontsize=8)
    fig.text(0.5, 1 - 0.08 / height, "\n".join(title), fontsize=8, ha="center", va="top", linespacing=1.3)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - (0.12 + 0.15 * len(title)) / height),
               ncol=legend_cols, fontsize=7, frameon=False)
    atomic_save_figure(path, fig, dpi=dpi, pil_kwargs={"compress_level": 1})  # figimage: the figure's own dpi


def _legend_handles(trace: SearchTrace, drops: bool) -> list:
    from matplotlib.lines import Line2D  # deferred: matplotlib is only for search.png

    handles = [Line2D([], [], ls="", marker="o", ms=4, c="0.6", label="every scored candidate (its estimate's reward)"),
               Line2D([], [], ls="-", marker="o", ms=3, c="tab:blue", label="chosen path (nearest estimate, shown above)")]
    if any(not r.main for r in trace.records):
        handles.insert(1, Line2D([], [], ls="", marker="o", ms=4, c="tab:orange", label="prune reward"))
    if drops:
        handles.append(Line2D([], [], ls="", marker="x", ms=5, c="tab:red", label="pruned here"))
    return handles


@dataclass
class _Panel:
    points: dict[bool, tuple[list[float], list[float]]]  # main? -> (steps, scores)
    drops: tuple[list[float], list[float]]
    path: list[tuple[int, float, torch.Tensor]]  # (step, score, thumbnail)


def _panel_data(trace: SearchTrace, o: int, target: torch.Tensor) -> _Panel | None:
    """One search's scored candidates, the ones pruned and its chosen path (nearest estimate per step)."""
    recs = [(r, (r.owner == o).nonzero().flatten()) for r in trace.records]
    recs = [(r, idx) for r, idx in recs if len(idx)]
    if not recs:
        return None
    data = _Panel({}, ([], []), [])
    target = target.float()
    for j, (r, idx) in enumerate(recs):
        sc = r.scores[idx]
        xs, ys = data.points.setdefault(r.main, ([], []))
        xs.extend([float(r.step)] * len(idx))
        ys.extend(sc.tolist())
        if j + 1 < len(recs) and len(recs[j + 1][1]) < len(idx):
            dropped = torch.argsort(sc.double(), stable=True)[: len(idx) - len(recs[j + 1][1])]
            data.drops[0].extend([float(r.step)] * len(dropped))
            data.drops[1].extend(sc[dropped].tolist())
        th = r.thumbs[idx]
        if th.shape[1:] == target.shape:
            k = int(torch.argmin(((th.float() - target) ** 2).flatten(1).sum(1)))
            data.path.append((r.step, float(sc[k]), th[k]))
    return data


def _draw_panel(ax, data: _Panel | None, xlim, mark_drops: bool) -> None:
    """Draw one search's rewards on ``ax``: its scored candidates, those pruned (``mark_drops``), its path."""
    ax.set_xlim(*xlim)
    if data is None:
        ax.text(0.5, 0.5, "no scored candidates", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    for main, (xs, ys) in data.points.items():  # one scatter per colour: a collection per step is slow to draw
        ax.scatter(xs, ys, s=8, c="0.6" if main else "tab:orange", alpha=0.6, linewidths=0, zorder=1)
    if mark_drops and data.drops[0]:
        ax.scatter(*data.drops, s=22, marker="x", c="tab:red", zorder=2)
    if data.path:
        xs, ys, _ = zip(*data.path)
        ax.plot(xs, ys, "-o", c="tab:blue", ms=3, lw=1.2, zorder=3)


def _thumb_strip(path: list[tuple[int, float, torch.Tensor]], xlim, width: int, height: int) -> np.ndarray:
    """An RGB image of ``width`` x at most ``height`` pixels: the path's thumbnails (grey frame, enlarged by a
    whole factor) centred on their steps, on white; kept right to left (the final estimate first) where they
    would overlap."""
    c, h, w = path[0][2].shape
    scale = max(1, height // (h + 2))
    cols = max(w + 2, width // scale)
    canvas = np.full((h + 2, cols, 3), 255, dtype=np.uint8)
    right = cols + 1
    for step, _, th in sorted(path, key=lambda p: p[0], reverse=True):
        x = round((step - xlim[0]) / (xlim[1] - xlim[0]) * cols - (w + 2) / 2)
        x = min(max(x, 0), cols - w - 2)
        if x + w + 2 > right:
            continue
        arr = th.permute(1, 2, 0).numpy()
        canvas[:, x:x + w + 2] = 150
        canvas[1:h + 1, x + 1:x + w + 1] = arr if c == 3 else arr[..., :1]
        right = x
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def _short(text: str, n: int = 40) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"
