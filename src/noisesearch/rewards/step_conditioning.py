"""Step conditioning of a reward model (TTSnap's alternative to per-step models): adaLN-Zero.

:class:`StepConditioned` wraps a reward's ``module`` and modulates it by the noise level ``sigma`` of
the image it scores, so that one model can score every step:

* **ViT layers** (a module with ``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``: the
  encoder layers of transformers' CLIP and BLIP vision towers, i.e. the image towers of clip,
  pickscore, hps, aesthetic and imagereward): adaLN as in DiT, per layer a shift and scale of each
  LayerNorm's output and a gate of each residual branch, ``LN(x) * (1 + scale) + shift`` and
  ``x + (1 + gate) * branch``.
* **other models** (no ViT layer, e.g. the digit patch CNN): FiLM of every hidden Conv2d / Linear
  output (all but the last layer), ``y * (1 + scale) + shift``, on a Conv2d's channels (dim 1) and a
  Linear's features (its last dim, also when it runs on a grid of patches ``[B, H, W, C]``).

The modulations come from ``c(sigma)`` (sinusoidal features of ``log(1 + sigma)`` through a small
MLP) by Linear layers initialised to zero ("-Zero"): at initialisation the wrapped model is exactly
the reward model (the gate is ``1 + gate`` rather than DiT's ``gate``, since the branches are
pretrained).

The condition is set per batch with :func:`set_condition` (one sigma, or one per image); when the
reward splits a batch into chunks, each forward call takes the next conditions in order.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _is_vit_layer(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp"))


class _Modulated(nn.Module):
    """A submodule whose output is modulated by ``self.mod`` (set by :class:`StepConditioned` for
    the current batch): ``film`` -> ``y * (1 + scale) + shift``, ``gate`` -> ``y * (1 + gate)``
    (on the first element when the submodule returns a tuple)."""

    def __init__(self, inner: nn.Module, kind: str, channels_last: bool):
        super().__init__()
        self.inner, self.kind, self.channels_last = inner, kind, channels_last
        self.mod: tuple[torch.Tensor, ...] | None = None

    def _expand(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channels_last or like.ndim == 2:
            return v.reshape(v.shape[0], *([1] * (like.ndim - 2)), v.shape[1])
        return v.reshape(v.shape[0], v.shape[1], *([1] * (like.ndim - 2)))

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if self.mod is None:
            return out
        first = out[0] if isinstance(out, tuple) else out
        if self.kind == "film":
            shift, scale = self.mod
            y = first * (1 + self._expand(scale, first)) + self._expand(shift, first)
        else:
            y = first * (1 + self._expand(self.mod[0], first))
        return (y, *out[1:]) if isinstance(out, tuple) else y


def _replace(root: nn.Module, name: str, kind: str, channels_last: bool) -> _Modulated:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    wrapped = _Modulated(getattr(parent, child), kind, channels_last)
    setattr(parent, child, wrapped)
    return wrapped


class StepConditioned(nn.Module):
    """``inner`` modulated by the noise level (see the module docstring). ``forward`` = inner's.
    The modulated submodules of ``inner`` are replaced in place by wrappers (pass a copy)."""

    def __init__(self, inner: nn.Module, cond_dim: int = 64):
        super().__init__()
        self.inner = inner
        self.cond_dim = int(cond_dim)
        self.embed = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU())
        vit = [n for n, m in inner.named_modules() if _is_vit_layer(m)]
        self.kind = "adaln" if vit else "film"
        heads: list[nn.Module] = []
        self._slots: list[list[_Modulated]] = []  # per head: the modulated submodules, in chunk order
        if vit:
            for name in vit:
                layer = inner.get_submodule(name)
                d = layer.layer_norm1.normalized_shape[0]
                heads.append(nn.Linear(cond_dim, 6 * d))
                self._slots.append([_replace(inner, f"{name}.layer_norm1", "film", True),
                                    _replace(inner, f"{name}.self_attn", "gate", True),
                                    _replace(inner, f"{name}.layer_norm2", "film", True),
                                    _replace(inner, f"{name}.mlp", "gate", True)])
        else:
            names = [n for n, m in inner.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]
            for n in names[:-1]:
                m = inner.get_submodule(n)
                heads.append(nn.Linear(cond_dim, 2 * (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)))
                # a Linear's features are its last dim (also on [B, H, W, C] patches); a Conv2d's dim 1
                self._slots.append([_replace(inner, n, "film", isinstance(m, nn.Linear))])
        if not heads:
            raise ValueError("step conditioning: the reward's module has no ViT layer nor hidden Conv2d / Linear layer")
        self.heads = nn.ModuleList(heads)
        for h in self.heads:  # adaLN-Zero: the identity at initialisation
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        self._cond: torch.Tensor | None = None
        self._pos = 0

    # ---- the condition ---------------------------------------------------------------------------
    def features(self, sigma: torch.Tensor) -> torch.Tensor:
        u = torch.log1p(sigma.float().clamp(min=0))[:, None]
        half = self.cond_dim // 2
        freq = torch.exp(torch.arange(half, device=u.device, dtype=torch.float32) * (-math.log(100.0) / max(1, half - 1)))
        ang = u * freq[None] * 10.0
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)

    def set_condition(self, sigma) -> None:
        """``sigma``: a float (every image) or a tensor [B] (one per image of the next batch)."""
        self._cond = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        self._pos = 0

    def _take(self, n: int, device) -> torch.Tensor:
        cond = self._cond if self._cond is not None else torch.zeros(1)
        if cond.numel() == 1:
            return cond.to(device).expand(n)
        if self._pos + n > cond.numel():
            raise RuntimeError(f"step conditioning: {cond.numel()} conditions set, the batches need {self._pos + n}")
        out = cond[self._pos:self._pos + n].to(device)
        self._pos += n
        return out

    def forward(self, *args, **kwargs):
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        c = self.embed(self.features(self._take(first.shape[0], first.device)))
        for head, slots in zip(self.heads, self._slots):
            parts = head(c).chunk(6 if self.kind == "adaln" else 2, dim=-1)
            if self.kind == "adaln":
                slots[0].mod, slots[1].mod, slots[2].mod, slots[3].mod = parts[0:2], parts[2:3], parts[3:5], parts[5:6]
            else:
                slots[0].mod = parts
        try:
            return self.inner(*args, **kwargs)
        finally:
            for slots in self._slots:
                for m in slots:
                    m.mod = None


def set_condition(module: nn.Module, sigma) -> bool:
    """Set the noise level on every :class:`StepConditioned` inside ``module`` (through peft /
    accelerate wrappers); False when there is none."""
    found = False
    for m in module.modules():
        if isinstance(m, StepConditioned):
            m.set_condition(sigma)
            found = True
    return found


__all__ = ["StepConditioned", "set_condition"]
