"""NegToMe (negative token merging, Singh et al. 2024, arXiv 2412.01339) for FLUX transformers.

NegToMe pushes the images of a batch apart for diversity: in the attention output of the image
tokens, every token whose most similar token in *another* image of its group has cosine similarity
above ``threshold`` is extrapolated away from it, ``h <- (1 + alpha) h - alpha h_match``; only
while the flow time ``t`` is inside ``window`` (early steps; t = 1 is pure noise).

Here a group is the rows of one network call that share a prompt and a guidance branch (the
candidates of one prompt); the original implementation uses the first image of the batch as the only
reference, we use every other image of the group (the first is then moved too). It is installed as a
wrapper around the attention processors of the double-stream (joint) blocks and is inactive outside
the window. Defaults follow the original FLUX code: alpha 0.9, threshold 0.65, t in [0.9, 1]
(its timesteps 1000 .. 900).

Caveat: with NegToMe a row's estimate depends on the other rows of the same network call, so results
depend on ``--max-batch`` (the chunking) and are not a function of each candidate's noise alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from noisesearch.errors import NoiseSearchError


@dataclass
class NegToMe:
    alpha: float = 0.9
    threshold: float = 0.65
    window: tuple[float, float] = (0.9, 1.0)  # flow times t (1 = noise) where it is active

    def __post_init__(self):
        lo, hi = (float(v) for v in self.window)
        if not 0 <= lo <= hi <= 1:
            raise NoiseSearchError(f"--negtome-window must be lo,hi with 0 <= lo <= hi <= 1 (flow time, 1 = noise), got {self.window}")
        self.window = (lo, hi)
        if self.alpha < 0:
            raise NoiseSearchError(f"--negtome-alpha must be >= 0, got {self.alpha}")


class NegToMeState:
    """Shared by the processors of one transformer: the config, the current time and row groups."""

    def __init__(self, config: NegToMe):
        self.config = config
        self.t = None
        self.groups: torch.Tensor | None = None  # [B] group id per row of the current call

    def set_time(self, t: float) -> None:
        self.t = float(t)

    @property
    def active(self) -> bool:
        lo, hi = self.config.window
        return self.t is not None and lo <= self.t <= hi and self.config.alpha > 0


def merge_negative(h: torch.Tensor, groups: torch.Tensor | None, alpha: float, threshold: float) -> torch.Tensor:
    """``h`` [B, N, D]: each token pushed away from its most similar token in the other rows of its group."""
    B, N, D = h.shape
    if B < 2:
        return h
    groups = torch.zeros(B, dtype=torch.long, device=h.device) if groups is None else groups.to(h.device)
    hf = h.float()
    hn = F.normalize(hf, dim=-1)
    out = hf.clone()
    for g in torch.unique(groups):
        rows = torch.nonzero(groups == g).flatten().tolist()
        if len(rows) < 2:
            continue
        for i in rows:  # one row at a time: memory N x (G - 1) N
            others = [j for j in rows if j != i]
            ref = hf[others].reshape(-1, D)
            sim = hn[i] @ hn[others].reshape(-1, D).T  # [N, (G-1) N]
            best, idx = sim.max(dim=-1)
            push = (best > threshold).unsqueeze(-1)
            out[i] = torch.where(push, (1 + alpha) * hf[i] - alpha * ref[idx], hf[i])
    return out.to(h.dtype)


class NegToMeProcessor:
    """Wraps an attention processor of a FLUX joint block; edits the image-token output when active."""

    def __init__(self, inner, state: NegToMeState):
        self.inner = inner
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if not self.state.active or encoder_hidden_states is None:
            return out
        c = self.state.config
        if isinstance(out, tuple):
            return (merge_negative(out[0], self.state.groups, c.alpha, c.threshold),) + tuple(out[1:])
        return merge_negative(out, self.state.groups, c.alpha, c.threshold)


def install_negtome(transformer, config: NegToMe | dict) -> NegToMeState:
    """Wrap the attention processors of ``transformer.transformer_blocks``; return the shared state."""
    if isinstance(config, dict):
        config = NegToMe(**config)
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        raise NoiseSearchError("NegToMe needs a FLUX transformer (transformer_blocks with joint attention)")
    state = NegToMeState(config)
    for block in blocks:
        proc = block.attn.processor
        if isinstance(proc, NegToMeProcessor):
            proc = proc.inner
        block.attn.set_processor(NegToMeProcessor(proc, state))
    return state


def uninstall_negtome(transformer) -> None:
    for block in getattr(transformer, "transformer_blocks", []):
        proc = block.attn.processor
        if isinstance(proc, NegToMeProcessor):
            block.attn.set_processor(proc.inner)


__all__ = ["NegToMe", "NegToMeState", "NegToMeProcessor", "install_negtome", "uninstall_negtome", "merge_negative"]
