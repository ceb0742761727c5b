"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, Schuhmann 2022): a linear head on the
L2-normalised CLIP ViT-L/14 image embedding; prompts are ignored.

``score = MLP(e / |e|)`` with ``e`` the projected CLIP image embedding and ``MLP`` the official
``nn.Sequential`` of Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
Linear(64, 16), Linear(16, 1) (no activations; state dict keys ``layers.0/2/4/6/7.weight|bias``; the
widths are read from the file). Preprocessing is OpenAI CLIP's (shorter side to 224 bicubic,
torchvision ``CenterCrop`` offsets ``round((h - 224) / 2)``, CLIP mean / std), on the device.

Reward spec ``aesthetic@DIR``: a transformers CLIP ViT-L/14 folder (``openai/clip-vit-large-patch14``;
only the vision tower and projection are loaded) plus the head's ``.pth`` (the official
``sac+logos+ava1-l14-linearMSE.pth``; with several ``.pth`` files, ``aesthetic@DIR/NAME.pth``).
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.io import load_torch_state_dict
from noisesearch.rewards.clip import load_clip_folder
from noisesearch.rewards.preprocess import ImagePreprocess, freeze

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class PreferenceMLP(torch.nn.Module):
    """The official head of the aesthetic predictor and of ImageReward (same layers, same keys):
    Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear - no activations. ``widths``:
    the input and the four hidden widths (official: (768, 1024, 128, 64, 16))."""

    def __init__(self, widths: Sequence[int] = (768, 1024, 128, 64, 16), dropout=(0.2, 0.2, 0.1)):
        super().__init__()
        w = list(widths)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(w[0], w[1]), torch.nn.Dropout(dropout[0]),
            torch.nn.Linear(w[1], w[2]), torch.nn.Dropout(dropout[1]),
            torch.nn.Linear(w[2], w[3]), torch.nn.Dropout(dropout[2]),
            torch.nn.Linear(w[3], w[4]), torch.nn.Linear(w[4], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "layers.", what: str = "head") -> "PreferenceMLP":
        """The head whose widths the 2-D weights of ``state`` give; every tensor checked (names,
        shapes, nothing else in ``state``) before the head is built."""
        idx = (0, 2, 4, 6, 7)
        weights = [state.get(f"{prefix}{i}.weight") for i in idx]
        if not all(isinstance(w, torch.Tensor) and w.ndim == 2 for w in weights):
            raise NoiseSearchError(f"{what}: no 2-D weights {', '.join(f'{prefix}{i}.weight' for i in idx)}: "
                                   "not the official MLP head")
        widths = [int(w.shape[1]) for w in weights]
        expected = {}
        for n, (i, w_in) in enumerate(zip(idx, widths)):
            w_out = widths[n + 1] if n + 1 < len(widths) else 1
            expected[f"{prefix}{i}.weight"], expected[f"{prefix}{i}.bias"] = (w_out, w_in), (w_out,)
        found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else ("not a tensor",) for k, v in state.items()}
        bad = [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
        if bad:
            k = bad[0]
            raise NoiseSearchError(f"{what}: {len(bad)} tensors do not fit the official MLP head of widths {widths} "
                                   f"({k}: {found.get(k, 'missing')} in the file, {expected.get(k, 'unexpected')} expected)")
        head = cls(widths)
        head.load_state_dict({k[len(prefix) - len("layers."):]: v for k, v in state.items()}, strict=True)
        return head


class AestheticModule(torch.nn.Module):
    """pixels -> aesthetic score: CLIP vision tower + projection, L2 normalisation, the MLP head."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: torch.nn.Module, head: PreferenceMLP):
        super().__init__()
        self.vision_model, self.visual_projection, self.head = vision_model, visual_projection, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return self.head(F.normalize(emb.float(), dim=-1)).squeeze(-1)


class AestheticScore:
    """The aesthetic predictor as a reward (module: :class:`AestheticModule`, loaded with gradients off;
    ``module.requires_grad_(True)`` to fine-tune it)."""

    def __init__(self, module: AestheticModule, preprocess: ImagePreprocess, device="cpu", name="aesthetic",
                 batch_size: int = 32):
        self.device = torch.device(device)
        self.module = freeze(module.to(self.device))  # gradients off for scoring; requires_grad_(True) to fine-tune
        self.preprocess_fn, self.name, self.batch_size = preprocess, name, batch_size
        self._flops: float | None = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocess_fn(images, self.device)

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Scores of preprocessed pixels [B, 3, S, S]."""
        return torch.cat([self.module(pixels[lo:lo + self.batch_size].to(self.device)) for lo in range(0, pixels.shape[0], self.batch_size)])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise NoiseSearchError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return torch.cat([self.module(self.preprocess(images[lo:lo + self.batch_size]))
                          for lo in range(0, images.shape[0], self.batch_size)]).float()

    @property
    def flops_per_image(self) -> float:
        if self._flops is None:
            s = self.preprocess_fn.size
            x = torch.zeros(1, 3, s, s, device=self.device)
            self._flops = count_flops(lambda: self.module(x))
        return self._flops


def aesthetic_reward(arg: str | None = None, device="cpu") -> AestheticScore:
    """Factory for ``aesthetic@DIR`` (a CLIP ViT-L/14 folder + the head's .pth) or ``aesthetic@DIR/HEAD.pth``."""
    from transformers import CLIPVisionModelWithProjection  # deferred: optional heavy dependency (transformers)

    if not arg:
        raise NoiseSearchError(
            "reward 'aesthetic' needs a folder: aesthetic@DIR with a transformers CLIP ViT-L/14 "
            f"(openai/clip-vit-large-patch14) and the head {HEAD_FILE} (see docs/rewards.md)"
        )
    p = Path(arg).expanduser()
    if p.is_file():
        head_path, folder = p, p.parent
    else:
        if not p.is_dir():
            raise NoiseSearchError(f"aesthetic reward: {arg!r} is no folder; see docs/rewards.md")
        heads = sorted(glob.glob(str(p / "*.pth")))
        if len(heads) != 1:
            raise NoiseSearchError(f"aesthetic reward: {p} holds {len(heads)} .pth heads; "
                                   + ("name one: aesthetic@DIR/HEAD.pth" if heads else f"put {HEAD_FILE} there"))
        head_path, folder = Path(heads[0]), p
    state = load_torch_state_dict(head_path, "aesthetic reward")
    head = PreferenceMLP.from_state_dict(state, what=f"aesthetic reward: {head_path}")
    # only the vision tower and projection of the folder's CLIP model are loaded (its text side is not
    # reported as unexpected); everything else must match exactly (load_clip_folder)
    vision, _, mean, std = load_clip_folder("aesthetic", str(folder), model_cls=CLIPVisionModelWithProjection,
                                            tokenizer=False)
    if head.layers[0].in_features != vision.config.projection_dim:
        raise NoiseSearchError(f"aesthetic reward: the head takes {head.layers[0].in_features}-d embeddings, "
                               f"the CLIP model in {folder} makes {vision.config.projection_dim}-d ones")
    module = AestheticModule(vision.vision_model, vision.visual_projection, head)
    pre = ImagePreprocess(int(vision.config.image_size), mean, std, mode="crop", crop_rounding="round", name="aesthetic")
    return AestheticScore(module, pre, device=device, name=f"aesthetic@{arg}")


__all__ = ["aesthetic_reward", "AestheticScore", "AestheticModule", "PreferenceMLP"]
