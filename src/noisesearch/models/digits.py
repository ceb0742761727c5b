"""The built-in ``digits`` model: a tiny class-conditional EDM denoiser for 8x8 digits.

Data: scikit-learn's ``load_digits`` (8x8, values 0..16) scaled to [-1, 1]; one sample is
``x`` of shape (1, 8, 8). Conditions are the prompts ``"0"`` .. ``"9"``; label 10 is the null label
(unconditional), used for label dropout during training and for classifier-free guidance.

The network ``F`` is a small UNet (8x8 -> 4x4 -> 8x8) with a Fourier embedding of the noise level
and a label embedding, both fed to every residual block by FiLM (scale and shift). It is wrapped in
EDM preconditioning (Karras et al. 2022, table 1) with ``sigma_data = 0.5``::

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4
    D(x, sigma, label) = c_skip * x + c_out * F(c_in * x, c_noise, label)

Weights live in ``noisesearch/weights/digits_denoiser.safetensors`` with the architecture config
(and a checksum of the tensors) in the safetensors metadata; ``noisesearch train-digits``
reproduces them. The small safetensors helpers here (``save_weights`` / ``load_weights``) are
shared with the digit classifiers in ``noisesearch.rewards.digit``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops
from noisesearch.io import load_checked_safetensors, save_checked_safetensors
from noisesearch.models.strict import check_state, state_shapes
from noisesearch.validate import check_guidance

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DENOISER_FILE = "digits_denoiser.safetensors"
SPLIT_FILE = "digits_split.json"

NUM_DIGITS = 10
NULL_LABEL = NUM_DIGITS  # the unconditional label
NUM_LABELS = NUM_DIGITS + 1
SIGMA_DATA = 0.5
DIGIT_PROMPTS = tuple(str(d) for d in range(NUM_DIGITS))

RETRAIN_HINT = (
    "re-create it with `noisesearch train-digits --out DIR` and copy DIR/{name} to {dir} "
    "(or reinstall noisesearch)"
)


# ---------------------------------------------------------------------------------------------
# safetensors helpers (shared with noisesearch.rewards.digit)
# ---------------------------------------------------------------------------------------------
def save_weights(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, config: dict, flops: dict | None = None
) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file + ``os.replace``).

    The metadata holds ``kind`` (what the file is), ``config`` (JSON, the constructor arguments of
    the module), ``sha256`` (a digest of the tensors, checked on load) and optionally ``flops``
    (JSON, FLOP counts measured with ``noisesearch.flops.count_flops`` when the file was written, so that loading
    does not have to run ``FlopCounterMode``, whose first use imports torch._dynamo: seconds).
    """
    meta = {"config": json.dumps(config, sort_keys=True)}
    if flops is not None:
        meta["flops"] = json.dumps(flops, sort_keys=True)
    save_checked_safetensors(path, tensors, kind, meta)


def load_weights(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, config, flops) from a file written by ``save_weights`` (``flops`` is ``{}`` if the
    file has none); ``NoiseSearchError`` if the file is missing, unreadable, truncated, of another
    kind or fails its checksum."""
    path = Path(path)
    hint = RETRAIN_HINT.format(name=path.name, dir=path.parent)
    tensors, metadata = load_checked_safetensors(path, kind, f"{kind} weights", hint)
    try:
        config = json.loads(metadata["config"])
        flops = json.loads(metadata.get("flops") or "{}")
    except (KeyError, json.JSONDecodeError):
        raise NoiseSearchError(f"{kind} weights at {path} have no readable config; {hint}") from None
    return tensors, config, flops


def load_state(module: nn.Module, tensors: dict[str, torch.Tensor], path, kind: str) -> nn.Module:
    """``module.load_state_dict(tensors)``; a one-line ``NoiseSearchError`` naming the missing,
    unexpected and mis-shaped tensors on any mismatch."""
    hint = RETRAIN_HINT.format(name=Path(path).name, dir=Path(path).parent)
    check_state(state_shapes(module), {k: tuple(v.shape) for k, v in tensors.items()}, f"{kind} weights at {path}", hint)
    module.load_state_dict(tensors, strict=True)
    return module


class _NoRandomInit(TorchFunctionMode):
    """Skips the random in-place initialisers (``normal_``, ``uniform_``, ...) on ``meta`` tensors: only
    shapes matter there, and ``normal_`` on ``meta`` imports torch's Python meta kernels (sympy,
    dynamo: about 2 s of CPU time on first use)."""

    SKIP = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                      "xavier_uniform_", "xavier_normal_", "orthogonal_", "random_", "bernoulli_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIP:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # torch.nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_checked(build: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], path, kind: str) -> nn.Module:
    """``build()`` loaded with ``tensors``, checked before anything is allocated: the network is
    first built on ``meta`` and its tensor names and shapes must equal the file's (a config cannot
    make the loader allocate without bound); then built for real and loaded strictly."""
    hint = RETRAIN_HINT.format(name=Path(path).name, dir=Path(path).parent)
    try:
        with torch.device("meta"), _NoRandomInit():
            meta = build()
    except NoiseSearchError:
        raise
    except Exception as e:  # any error of the constructor: the stored config is not a network
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NoiseSearchError(f"{kind} weights at {path} have a config that builds no network ({first}); {hint}") from None
    check_state(state_shapes(meta), {k: tuple(v.shape) for k, v in tensors.items()}, f"{kind} weights at {path}", hint)
    return load_state(build(), tensors, path, kind)


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------
class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar ``c_noise`` (fixed geometric frequencies)."""

    def __init__(self, dim: int, max_period: float = 100.0):
        super().__init__()
        half = dim // 2
        if torch.empty(0).device.type == "meta":  # the loader's shape check: arithmetic on meta is slow (seconds)
            self.register_buffer("freqs", torch.empty(half), persistent=False)
            return
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * 2 * math.pi, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _groups(channels: int) -> int:
    return max(1, min(8, channels // 4))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, FiLM by the embedding, GroupNorm-SiLU-Conv, plus a skip (1x1 if the
    channel count changes); the sum is scaled by sqrt(1/2) as in EDM's UNet blocks."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (h + self.skip(x)) * math.sqrt(0.5)


class DigitsUNet(nn.Module):
    """The raw network F(c_in * x, c_noise, label) on [B, 1, 8, 8].

    8x8 (``ch`` channels) -> 4x4 (``2 * ch``) -> 8x8, one residual block per stage, two in the
    middle, additive skip connections.
    """

    def __init__(self, ch: int = 16, emb_dim: int = 128, num_labels: int = NUM_LABELS, dropout: float = 0.0):
        super().__init__()
        self.config = dict(ch=ch, emb_dim=emb_dim, num_labels=num_labels, dropout=dropout)
        c0, c1 = ch, 2 * ch
        self.noise_embed = FourierEmbedding(emb_dim // 2)
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_labels, emb_dim)
        self.conv_in = nn.Conv2d(1, c0, 3, padding=1)
        self.enc0 = ResBlock(c0, c0, emb_dim, dropout)  # 8x8
        self.down = nn.Conv2d(c0, c0, 3, stride=2, padding=1)  # -> 4x4
        self.enc1 = ResBlock(c0, c1, emb_dim, dropout)  # 4x4
        self.mid0 = ResBlock(c1, c1, emb_dim, dropout)
        self.mid1 = ResBlock(c1, c1, emb_dim, dropout)
        self.dec1 = ResBlock(c1, c1, emb_dim, dropout)  # 4x4, input mid + enc1 skip
        self.up = nn.Conv2d(c1, c0, 1)  # channels for 8x8 (after nearest upsampling)
        self.dec0 = ResBlock(c0, c0, emb_dim, dropout)  # 8x8, input up + enc0 skip
        self.norm_out = nn.GroupNorm(_groups(c0), c0)
        self.conv_out = nn.Conv2d(c0, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.noise_mlp(self.noise_embed(c_noise)) + self.label_embed(labels))
        h0 = self.enc0(self.conv_in(x), emb)
        h1 = self.enc1(self.down(h0), emb)
        h = self.mid1(self.mid0(h1, emb), emb)
        h = self.dec1(h + h1, emb)
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.dec0(h + h0, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMDigits(nn.Module):
    """D(x, sigma, label) = c_skip * x + c_out * F(c_in * x, c_noise, label) (EDM preconditioning)."""

    def __init__(self, sigma_data: float = SIGMA_DATA, **net_config):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.net = DigitsUNet(**net_config)
        self.config = dict(sigma_data=self.sigma_data, **self.net.config)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F_x = self.net(c_in * x, c_noise, labels)
        return c_skip * x + c_out * F_x


def measure_call_flops(model: EDMDigits) -> dict[str, float]:
    """FLOPs of one denoiser call for one sample: ``{"1": one branch, "2": two CFG branches}``."""
    out = {}
    for branches in (1, 2):
        x = torch.zeros(branches, 1, 8, 8, device=next(model.parameters()).device)
        sigma = torch.ones(branches, device=x.device)
        labels = torch.zeros(branches, dtype=torch.long, device=x.device)
        out[str(branches)] = count_flops(lambda: model(x, sigma, labels))
    return out


def load_edm_digits(weights: str | os.PathLike | None = None, device="cpu") -> tuple[EDMDigits, dict]:
    """The preconditioned network with weights from ``weights`` (default: the shipped file), and
    the FLOP counts stored with it (``measure_call_flops`` at training time; ``{}`` if absent)."""
    path = Path(weights) if weights is not None else WEIGHTS_DIR / DENOISER_FILE
    tensors, config, flops = load_weights(path, "digits_denoiser")
    if not isinstance(config, dict):
        raise NoiseSearchError(f"digits_denoiser weights at {path} have an unknown config ({config!r})")
    model = build_checked(lambda: EDMDigits(**config), tensors, path, "digits_denoiser")
    return model.to(device).eval().requires_grad_(False), flops


# ---------------------------------------------------------------------------------------------
# the Denoiser
# ---------------------------------------------------------------------------------------------
_FLOPS_CACHE: dict[str, dict[str, float]] = {}  # config JSON -> measure_call_flops


def parse_digits(prompts: Sequence[str] | str, who: str = "the digits model", device="cpu") -> torch.Tensor:
    """The one digit-prompt parser: LongTensor of digits for prompts ``"0"`` .. ``"9"`` (surrounding
    whitespace ignored); ``NoiseSearchError`` naming ``who`` for anything else."""
    if isinstance(prompts, str):
        prompts = [prompts]
    labels = []
    for p in prompts:
        s = p.strip() if isinstance(p, str) else None
        if s not in DIGIT_PROMPTS:
            raise NoiseSearchError(f"{who} does not know the prompt {p!r}; valid prompts: {', '.join(DIGIT_PROMPTS)} (the digit to show)")
        labels.append(int(s))
    return torch.tensor(labels, dtype=torch.long, device=device)


def encode_digits(prompts: Sequence[str] | str, device="cpu") -> torch.Tensor:
    """Digit labels of the prompts, for the denoiser (see :func:`parse_digits`)."""
    return parse_digits(prompts, "the digits model", device)


class DigitsDenoiser:
    """The ``digits`` backend of the Denoiser protocol (see ``noisesearch.models.base``).

    ``guidance``: 0 = unconditional (null label, one network evaluation per call), 1 = conditional
    (one evaluation), otherwise classifier-free guidance ``uncond + g * (cond - uncond)`` with both
    branches in one batched forward (two evaluations).
    """

    name = "digits"
    sample_shape = (1, 8, 8)
    sigma_min = 0.002
    sigma_max = 80.0
    default_steps = 18
    flops_per_decode = 0.0  # pixel model: decoding is a rescale
    dtype = torch.float32
    prompts = DIGIT_PROMPTS
    default_reward = "digit"  # the reward of generate without one: log p(target digit | image)
    eval_rewards = ("judge",)  # scored after every search with evaluate=True (generate): the independent judge

    family = "digits"
    parametrisation = f"EDM preconditioning (sigma_data {SIGMA_DATA}), x0"
    conditional = True

    def __init__(self, guidance: float = 1.0, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None):
        self.guidance = guidance = check_guidance(guidance)
        self.weights = weights
        self.device = torch.device(device)
        self.model, stored_flops = load_edm_digits(weights, self.device)
        self.branches = 1 if guidance in (0.0, 1.0) else 2
        # FLOPs depend only on the architecture: measured with FlopCounterMode when the weights
        # were written (stored in their metadata), else measured here once per process.
        key = json.dumps(self.model.config, sort_keys=True)
        if key not in _FLOPS_CACHE:
            _FLOPS_CACHE[key] = stored_flops if set(stored_flops) >= {"1", "2"} else measure_call_flops(self.model)
        self.flops_per_call = float(_FLOPS_CACHE[key][str(self.branches)])

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_digits(prompts, self.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.device, torch.float32)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma).to(self.device, torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        elif sigma.numel() != b:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {b}")
        null = torch.full((b,), NULL_LABEL, dtype=torch.long, device=self.device)
        if self.guidance == 0:
            return self.model(x, sigma, null).to(in_dtype)
        if cond is None:
            raise NoiseSearchError("the digits model needs a condition (from encode) unless guidance is 0")
        labels = cond.to(self.device).reshape(b)
        if self.guidance == 1:
            return self.model(x, sigma, labels).to(in_dtype)
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond_x0, uncond_x0 = both[:b], both[b:]
        return (uncond_x0 + self.guidance * (cond_x0 - uncond_x0)).to(in_dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)

    def with_settings(self, guidance: float | None = None, device=None) -> "DigitsDenoiser":
        """The same weights with another guidance and / or on another device (a new denoiser)."""
        return DigitsDenoiser(guidance=self.guidance if guidance is None else guidance,
                              device=self.device if device is None else device, weights=self.weights)

    def __repr__(self) -> str:
        return f"DigitsDenoiser(guidance={self.guidance:g}, device={str(self.device)!r})"
