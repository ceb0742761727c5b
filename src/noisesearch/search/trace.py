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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    """Write ``search.png``: one panel per search in ``panels`` (the chosen sample of each prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    from noisesearch.io import atomic_save_figure

    panels = panels[:max_panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    finals = thumbnails(final_images)
    for ax, o in zip(axes[:, 0], panels):
        recs = [(r, (r.owner == o).nonzero().flatten()) for r in trace.records]
        recs = [(r, idx) for r, idx in recs if len(idx)]
        if not recs:
            ax.text(0.5, 0.5, "no scored candidates", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"prompt {prompts[o]!r}")
            continue
        target = finals[o].float()
        path_pts = []
        for main in {r.main for r, _ in recs}:  # one scatter per colour: a collection per step is slow to draw
            pts = [(float(r.step), r.scores[idx].float()) for r, idx in recs if r.main == main]
            ax.scatter(torch.cat([torch.full_like(sc, st) for st, sc in pts]).numpy(), torch.cat([sc for _, sc in pts]).numpy(),
                       s=8, c="0.6" if main else "tab:orange", alpha=0.6, linewidths=0, zorder=1)
        for j, (r, idx) in enumerate(recs):
            sc = r.scores[idx]
            if mark_drops and j + 1 < len(recs) and len(recs[j + 1][1]) < len(idx):
                dropped = torch.argsort(sc.double(), stable=True)[: len(idx) - len(recs[j + 1][1])]
                ax.scatter([r.step] * len(dropped), sc[dropped].numpy(), s=22, marker="x", c="tab:red", zorder=2,
                           label="pruned here" if not any(t.get_label() == "pruned here" for t in ax.collections) else None)
            th = r.thumbs[idx].float()
            if th.shape[1:] == target.shape:
                dist = ((th - target) ** 2).flatten(1).sum(1)
                k = int(torch.argmin(dist))
                path_pts.append((r.step, float(sc[k]), r.thumbs[idx[k]]))
        if path_pts:
            xs, ys, ims = zip(*path_pts)
            ax.plot(xs, ys, "-o", c="tab:blue", ms=4, lw=1.5, zorder=3, label="chosen path (nearest estimate)")
            every = max(1, len(ims) // 8)
            for x, y, im in list(zip(xs, ys, ims))[::every]:
                arr = im.permute(1, 2, 0).numpy()
                arr = arr[..., 0] if arr.shape[-1] == 1 else arr
                zoom = 24 / max(arr.shape[:2])
                box = OffsetImage(arr, zoom=zoom, cmap="gray" if arr.ndim == 2 else None)
                ax.add_artist(AnnotationBbox(box, (x, y), xybox=(0, 22), xycoords="data", boxcoords="offset points",
                                             frameon=True, pad=0.1, zorder=4))
        ax.set_title(f"{strategy}: prompt {prompts[o]!r} (search {o})", fontsize=9, pad=30)
        ax.set_xlabel("sampling step of the scored estimate")
        ax.set_ylabel("reward")
        ax.margins(y=0.35)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("grey: the reward of every scored candidate's Tweedie estimate (orange: prune reward); "
                 "blue: the chosen sample's path", fontsize=8)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=90)
    plt.close(fig)
