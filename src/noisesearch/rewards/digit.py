"""The ``digit`` reward (a small CNN) and the independent ``judge`` (an MLP) for 8x8 digits.

Two classifiers of different architectures, trained on disjoint halves of the training images
(see ``docs/digits.md``):

* the reward classifier ``DigitPatchCNN`` (train_a, with mild shift / noise / blur augmentation) is
  what search strategies optimise (reward ``digit``). It is small on purpose: a search scores every
  candidate, and the benchmarks compare strategies at equal NFEs, so the reward should cost next
  to nothing beside a denoiser call (0.02 of one: 75 kFLOPs per image against 3.72 MFLOPs).
  ``DigitCNN``, the round-2 reward (3x3 convolutions, 0.37 MFLOPs), still loads from its files;
* the judge ``DigitMLP`` (train_b) is only for evaluation: it is never used for optimisation, so
  that "the reward went up" can be checked against an opinion the search could not exploit.

Input convention (both modules): ``forward(images01) -> logits``, with ``images01`` a float tensor
[B, 1, 8, 8] in [0, 1] (what ``DigitsDenoiser.decode`` returns; 0 = background) and ``logits``
[B, 10] for digits 0..9. The modules are plain ``nn.Module``s made of ``Conv2d`` / ``Linear``
layers (plus ReLU, pooling, dropout), so they can be fine-tuned with LoRA (peft) by targeting
``conv*`` / ``fc*`` layers (``DigitPatchCNN``'s ``conv*`` are ``Linear`` layers on patches).

As a reward, the classifier returns ``log p(target digit | image)`` (<= 0), with target
``int(prompt)``; the judge returns its verdict, 1 when it reads the target digit and 0 otherwise, so
that the mean of ``judge`` among a run's evaluation rewards is the judge accuracy
(``report["judge_accuracy"]``; its ``details`` add each sample's ``judge_class`` and ``judge_prob``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.models.digits import DIGIT_PROMPTS, WEIGHTS_DIR, build_checked, load_weights, parse_digits

CLASSIFIER_FILE = "digit_classifier.safetensors"
JUDGE_FILE = "digit_judge.safetensors"
IMAGE_SHAPE = (1, 8, 8)
#: Rows per forward pass of a classifier. With ``DigitCNN`` one pass over 1600 images took 1.45x as
#: long on a CPU as the same images in chunks of 200-800 (its activations no longer fit the cache; one
#: thread, median of 12 rounds: 53 ms vs 36 ms); the patch CNN's are small enough either way. Each
#: row's logits do not depend on its neighbours.
CHUNK = 512


def max_pool2(h: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling with stride 2 (even H and W), as strided maxima.

    Equal to ``F.max_pool2d(h, 2)`` bit for bit, and 2-3x faster on a CPU for the small feature
    maps of ``DigitCNN``: ``max_pool2d`` computes the argmax indices as well, which took half of
    the classifier's time there (the reward is called on every candidate of every search step).
    """
    h = torch.maximum(h[:, :, 0::2], h[:, :, 1::2])
    return torch.maximum(h[..., 0::2], h[..., 1::2])


class DigitCNN(nn.Module):
    """The round-2 reward classifier: conv(1->c)-conv(c->2c)-maxpool-conv(2c->2c)-maxpool-fc-fc.

    ``forward(images01 [B, 1, 8, 8] in [0, 1]) -> logits [B, 10]``.
    """

    def __init__(self, ch: int = 10, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.config = dict(arch="cnn", ch=ch, hidden=hidden, dropout=dropout)
        self.conv1 = nn.Conv2d(1, ch, 3, padding=1)  # 8x8
        self.conv2 = nn.Conv2d(ch, 2 * ch, 3, padding=1)  # 8x8 -> pool 4x4
        self.conv3 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)  # 4x4 -> pool 2x2
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(2 * ch * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        h = images01 * 2 - 1
        h = F.relu(self.conv1(h))
        h = max_pool2(F.relu(self.conv2(h)))
        h = max_pool2(F.relu(self.conv3(h))).flatten(1)
        if self.training:  # dropout is the identity in eval mode: skip the module calls
            return self.fc2(self.dropout(F.relu(self.fc1(self.dropout(h)))))
        return self.fc2(F.relu(self.fc1(h)))


class DigitPatchCNN(nn.Module):
    """Reward classifier: two 2x2 stride-2 convolutions (1->c1 on pixels, c1->c2 on the 4x4 grid they
    make), ReLU after each, then a linear layer on the 2x2 grid. Each convolution's patches do not
    overlap, so it is one ``Linear`` applied to every patch (``conv1``: the 4 pixels of a patch,
    ``conv2``: the 4 x c1 features of a 2x2 block, in row-major order, channels last): one matrix
    product per layer, no convolution kernel to call.

    ``forward(images01 [B, 1, 8, 8] in [0, 1]) -> logits [B, 10]``.
    """

    def __init__(self, c1: int = 32, c2: int = 64, dropout: float = 0.1):
        super().__init__()
        self.config = dict(arch="patch", c1=c1, c2=c2, dropout=dropout)
        self.conv1 = nn.Linear(4, c1)  # 8x8 pixels -> 4x4 x c1
        self.conv2 = nn.Linear(4 * c1, c2)  # 4x4 x c1 -> 2x2 x c2
        self.fc = nn.Linear(4 * c2, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        b = images01.shape[0]
        # [B, 1, 8, 8] -> [B, 4, 4, 4]: the 2x2 patch at block (i, j), its pixels row-major
        h = (images01 * 2 - 1).reshape(b, 4, 2, 4, 2).transpose(2, 3).reshape(b, 4, 4, 4)
        h = F.relu(self.conv1(h))  # [B, 4, 4, c1]
        # [B, 4, 4, c1] -> [B, 2, 2, 4 c1]: the 2x2 block of positions, each position's c1 features
        h = h.reshape(b, 2, 2, 2, 2, -1).transpose(2, 3).reshape(b, 2, 2, -1)
        h = F.relu(self.conv2(h)).flatten(1)  # [B, 2 * 2 * c2]
        return self.fc(self.dropout(h) if self.training else h)


class DigitMLP(nn.Module):
    """Judge: an MLP on the 64 pixels, 64 -> hidden -> hidden -> 10 (ReLU, dropout).

    ``forward(images01 [B, 1, 8, 8] in [0, 1]) -> logits [B, 10]``.
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.config = dict(arch="mlp", hidden=hidden, dropout=dropout)
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        h = (images01 * 2 - 1).flatten(1)
        h = self.dropout(F.relu(self.fc1(h)))
        h = self.dropout(F.relu(self.fc2(h)))
        return self.fc3(h)


ARCHS = {"patch": DigitPatchCNN, "cnn": DigitCNN, "mlp": DigitMLP}


def build_classifier(config: dict) -> nn.Module:
    """A fresh classifier module from a config (``{"arch": "cnn" | "mlp", ...}``)."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in ARCHS:
        raise NoiseSearchError(f"unknown digit classifier architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[arch](**config)


_TARGETS = {p: d for d, p in enumerate(DIGIT_PROMPTS)}


def parse_targets(prompts: Sequence[str], who: str) -> torch.Tensor:
    """Target digits for prompts ``"0"`` .. ``"9"`` (:func:`noisesearch.models.digits.parse_digits`;
    the usual exact prompts by one dict look-up each, anything else through ``parse_digits``)."""
    if not isinstance(prompts, str):
        try:
            return torch.tensor([_TARGETS[p] for p in prompts], dtype=torch.long)
        except (KeyError, TypeError):
            pass
    return parse_digits(prompts, who)


class DigitClassifier:
    """A digit classifier wrapped as a ``Reward`` (log p(target | image)) with ``predict``.

    ``module`` is the plain ``nn.Module`` (``forward(images01) -> logits``); it is in eval mode
    with gradients off; call ``module.requires_grad_(True)`` to fine-tune it.
    """

    def __init__(self, module: nn.Module, name: str, device: str | torch.device = "cpu", flops_per_image: float | None = None):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self.name = name
        if flops_per_image is None:
            flops_per_image = measure_image_flops(self.module)
        self.flops_per_image = float(flops_per_image)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise NoiseSearchError(
                f"reward {self.name!r} expects images of shape [B, 1, 8, 8] in [0, 1] "
                f"(decoded samples of the digits model); got {got}"
            )
        return images.to(self.device, torch.float32)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, 10] for images [B, 1, 8, 8] in [0, 1], in chunks of at most ``CHUNK`` rows."""
        images = self.check_images(images)
        if images.shape[0] <= CHUNK:
            return self.module(images)
        return torch.cat([self.module(chunk) for chunk in images.split(CHUNK)])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """log p(int(prompt) | image), shape [B], values <= 0."""
        targets = parse_targets(prompts, f"reward {self.name!r}").to(self.device)
        logits = self.logits(images)
        if targets.shape[0] != logits.shape[0]:
            raise NoiseSearchError(f"{logits.shape[0]} images but {targets.shape[0]} prompts given to reward {self.name!r}")
        return F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax class LongTensor[B], its probability Tensor[B])."""
        probs = F.softmax(self.logits(images).float(), dim=1)
        p, c = probs.max(dim=1)
        return c, p

    def __repr__(self) -> str:
        return f"DigitClassifier(name={self.name!r}, module={type(self.module).__name__}, device={str(self.device)!r})"


class DigitJudge(DigitClassifier):
    """The judge as a reward: 1.0 where it reads the target digit, else 0.0 (its mean is the judge
    accuracy). An evaluation reward: never optimise it (it is flat almost everywhere)."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        targets = parse_targets(prompts, f"reward {self.name!r}")
        classes, _ = self.predict(images)
        if targets.shape[0] != classes.shape[0]:
            raise NoiseSearchError(f"{classes.shape[0]} images but {targets.shape[0]} prompts given to reward {self.name!r}")
        return (classes.cpu() == targets).float()

    def details(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, list]:
        """Per image: the class the judge reads and its probability (recorded by evaluations)."""
        classes, probs = self.predict(images)
        return {"class": [int(c) for c in classes.tolist()], "prob": [float(p) for p in probs.tolist()]}


def measure_image_flops(module: nn.Module) -> float:
    """FLOPs of classifying one image, counted with ``FlopCounterMode``."""
    device = next(module.parameters()).device
    return count_flops(lambda: module(torch.zeros(1, *IMAGE_SHAPE, device=device)))


def load_classifier_module(path: str | os.PathLike, kind: str) -> tuple[nn.Module, float | None]:
    """The plain ``nn.Module`` stored at ``path`` (``kind``: digit_classifier or digit_judge) and
    its FLOPs per image as measured when the file was written (``None`` if not stored)."""
    tensors, config, flops = load_weights(path, kind)
    return build_checked(lambda: build_classifier(config), tensors, path, kind), flops.get("per_image")


def load_classifier(device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> DigitClassifier:
    """The reward classifier (``DigitPatchCNN``, trained on train_a) as a ``DigitClassifier``."""
    path = Path(weights) if weights else WEIGHTS_DIR / CLASSIFIER_FILE
    module, flops = load_classifier_module(path, "digit_classifier")
    return DigitClassifier(module, "digit", device, flops)


def load_judge(device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> DigitJudge:
    """The judge (``DigitMLP``, trained on train_b) as a :class:`DigitJudge`; for evaluation only."""
    path = Path(weights) if weights else WEIGHTS_DIR / JUDGE_FILE
    module, flops = load_classifier_module(path, "digit_judge")
    return DigitJudge(module, "judge", device, flops)


def digit_reward(arg: str | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """Reward ``digit`` (``digit@PATH`` loads other classifier weights)."""
    return load_classifier(device, arg)


def judge_reward(arg: str | None = None, device: str | torch.device = "cpu") -> DigitJudge:
    """Reward ``judge`` (``judge@PATH`` loads other judge weights): 1 where the judge reads the target
    digit, else 0. An evaluation reward: do not optimise it."""
    return load_judge(device, arg)
