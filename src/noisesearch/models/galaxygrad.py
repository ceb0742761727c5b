"""Pretrained galaxy score models from the ``galaxygrad`` package (arXiv 2401.07313), in torch.

``galaxygrad==0.1.9`` ships Equinox MLP-Mixer score networks trained on galaxy images (HSC and ZTF
surveys, 32x32 and 64x64). The package's ``__init__`` imports JAX, so it is never imported here:
its weight files are located with ``importlib.util.find_spec`` and read with numpy. An ``.eqx``
file is a sequence of ``.npy`` arrays in Equinox's leaf order (``numpy.load`` until the file ends):
the input patch convolution, the output transposed convolution, 4 mixer blocks of 12 arrays, the
final LayerNorm and ``t1 = 10``.

The network (Equinox's score-based MLP-Mixer example, ``galaxygrad/models_eqx.py``): patches of 4,
hidden size 64, mixing widths 512, ReLU, LayerNorm over (channels, patches), and ``t / t1`` fed as a
second input channel. Equinox's transposed convolution flips its kernel relative to torch's, so
the torch weights are the Equinox ones flipped on both spatial axes.

Noise process: the VP-SDE with ``int_beta(t) = t`` on t in (0, 10]: ``x_t = a x0 + s eps`` with
``a = exp(-t/2)``, ``s^2 = 1 - exp(-t)``; the network returns the score. In noisesearch's EDM
convention ``sigma = sqrt(e^t - 1)`` (about 148 at t = 10) and ``x0 = x + (s^2 / a) score(a x, t)``
(``models.wrappers.VPSDE`` with prediction ``"score"``).

Data: the network's ``x'`` is ``log(flux + 1) / 0.1`` of the galaxy's flux (``galaxygrad/scorenet.py``).
``decode`` maps ``x'`` back to flux, ``flux = exp(0.1 x') - 1``, and then to an image in [0, 1]
with a fixed asinh stretch (Lupton et al. 1999), the same for every image so that rewards compare:

    image = clamp(asinh(flux / SOFTENING) / asinh(FLUX_WHITE / SOFTENING), 0, 1)

``image_to_flux`` inverts it (for fluxes >= 0; the negative background noise is clipped to 0).
The package states no licence: install it (``pip install --no-deps galaxygrad==0.1.9``, done by
``make setup``); its weights are never copied into this repository.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch
from torch import nn

from noisesearch.errors import NoiseSearchError, unknown_name
from noisesearch.models.wrappers import VPSDE, NetworkDenoiser

# name -> (weight file in the galaxygrad package, image side)
GALAXY_MODELS = {
    "hsc32": ("eqx_hsc_ScoreNet32.eqx", 32),
    "hsc64": ("eqx_hsc_ScoreNet64.eqx", 64),
    "ztf32": ("eqx_ZTF_ScoreNet32.eqx", 32),
    "ztf64": ("eqx_ZTF_ScoreNet64.eqx", 64),
}
PATCH, HIDDEN, MIX_PATCH, MIX_HIDDEN, NUM_BLOCKS = 4, 64, 512, 512, 4
LOG_SCALE = 0.1  # x' = log(flux + 1) / LOG_SCALE
T_MAX = 10.0  # the package's t1
T_MIN = 1e-3  # sigma_min = sqrt(e^0.001 - 1) ~ 0.032 (in x' units)
SOFTENING = 0.02  # asinh stretch: linear below ~SOFTENING in flux, logarithmic above
FLUX_WHITE = 1.0  # the flux shown as white (1.0); HSC samples peak at about 0.3-1
INSTALL_HINT = "install it with `.venv/bin/pip install --no-deps galaxygrad==0.1.9` (`make setup` does)"


# ---- the network ---------------------------------------------------------------------------------


class MixerBlock(nn.Module):
    """y + MLP over patches of LayerNorm(y), then the same over channels ([B, C, P])."""

    def __init__(self, num_patches: int, hidden: int = HIDDEN, mix_patch: int = MIX_PATCH, mix_hidden: int = MIX_HIDDEN):
        super().__init__()
        self.patch_mixer = nn.Sequential(nn.Linear(num_patches, mix_patch), nn.ReLU(), nn.Linear(mix_patch, num_patches))
        self.hidden_mixer = nn.Sequential(nn.Linear(hidden, mix_hidden), nn.ReLU(), nn.Linear(mix_hidden, hidden))
        self.norm1 = nn.LayerNorm((hidden, num_patches))
        self.norm2 = nn.LayerNorm((num_patches, hidden))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.patch_mixer(self.norm1(y))
        y = y.transpose(1, 2)
        y = y + self.hidden_mixer(self.norm2(y))
        return y.transpose(1, 2)


class GalaxyScoreNet(nn.Module):
    """The galaxygrad ScoreNet: ``score(x', t)`` for x' of shape [B, 1, side, side] and t [B] in (0, t1]."""

    def __init__(self, side: int, t1: float = T_MAX):
        super().__init__()
        if side % PATCH:
            raise NoiseSearchError(f"galaxygrad images are multiples of {PATCH} pixels, got {side}")
        self.side, self.t1 = side, float(t1)
        self.num_patches = (side // PATCH) ** 2
        self.conv_in = nn.Conv2d(2, HIDDEN, PATCH, stride=PATCH)
        self.conv_out = nn.ConvTranspose2d(HIDDEN, 1, PATCH, stride=PATCH)
        self.blocks = nn.ModuleList([MixerBlock(self.num_patches) for _ in range(NUM_BLOCKS)])
        self.norm = nn.LayerNorm((HIDDEN, self.num_patches))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        time_channel = (t.to(x.dtype) / self.t1).view(-1, 1, 1, 1).expand(b, 1, h, w)
        y = self.conv_in(torch.cat([x, time_channel], dim=1))
        ph, pw = y.shape[-2:]
        y = y.flatten(2)
        for block in self.blocks:
            y = block(y)
        y = self.norm(y).view(b, HIDDEN, ph, pw)
        return self.conv_out(y)

    def flops(self) -> float:
        """FLOPs of one forward pass for one sample (matmuls and convolutions, as ``count_flops``)."""
        p = self.num_patches
        conv = 2 * p * HIDDEN * 2 * PATCH**2 + 2 * p * HIDDEN * 1 * PATCH**2
        block = 2 * HIDDEN * (2 * p * MIX_PATCH) + 2 * p * (2 * HIDDEN * MIX_HIDDEN)
        return float(conv + NUM_BLOCKS * block)


# ---- reading the weights -------------------------------------------------------------------------


def package_dir() -> str:
    """The installed galaxygrad package's folder (found without importing it: it imports JAX)."""
    spec = importlib.util.find_spec("galaxygrad")
    if spec is None or not spec.submodule_search_locations:
        raise NoiseSearchError(f"the galaxygrad package is not installed: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def read_eqx(path: str) -> list[np.ndarray]:
    """The arrays of an Equinox ``.eqx`` file, in leaf order (``numpy.load`` until the file ends)."""
    arrays = []
    try:
        with open(path, "rb") as f:
            while True:
                try:
                    arrays.append(np.load(f, allow_pickle=False))
                except EOFError:
                    return arrays
    except (OSError, ValueError) as e:
        raise NoiseSearchError(f"cannot read galaxygrad weights {path}: {e}; reinstall: {INSTALL_HINT}") from None


def _leaf_names(num_blocks: int) -> list[str]:
    """torch names of the Equinox leaves, in Equinox's order (``t1`` last)."""
    names = ["conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"]
    for i in range(num_blocks):
        for mixer in ("patch_mixer", "hidden_mixer"):
            names += [f"blocks.{i}.{mixer}.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")]
        names += [f"blocks.{i}.norm{k}.{p}" for k in (1, 2) for p in ("weight", "bias")]
    return names + ["norm.weight", "norm.bias", "t1"]


def state_from_eqx(arrays: list[np.ndarray], path: str) -> tuple[dict[str, torch.Tensor], float]:
    """(torch state dict, t1) from the Equinox leaves; the transposed convolution's kernel is flipped
    on both spatial axes and its in / out axes swapped (Equinox's convention -> torch's)."""
    names = _leaf_names(NUM_BLOCKS)
    if len(arrays) != len(names):
        raise NoiseSearchError(f"galaxygrad weights {path} hold {len(arrays)} arrays, expected {len(names)}; {INSTALL_HINT}")
    state = {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in zip(names[:-1], arrays[:-1])}
    state["conv_in.bias"] = state["conv_in.bias"].reshape(-1)
    state["conv_out.bias"] = state["conv_out.bias"].reshape(-1)
    state["conv_out.weight"] = state["conv_out.weight"].transpose(0, 1).flip(-1, -2).contiguous()
    return state, float(arrays[-1])


def load_network(name: str, device: str | torch.device = "cpu") -> GalaxyScoreNet:
    """The torch ScoreNet of ``name`` (see ``GALAXY_MODELS``) with the package's weights, in eval mode."""
    if name not in GALAXY_MODELS:
        raise unknown_name("galaxygrad model", name, [f"galaxygrad:{n}" for n in GALAXY_MODELS])
    filename, side = GALAXY_MODELS[name]
    path = os.path.join(package_dir(), filename)
    if not os.path.isfile(path):
        raise NoiseSearchError(f"{path} is missing (galaxygrad releases after 0.1.9 dropped the weights): {INSTALL_HINT}")
    state, t1 = state_from_eqx(read_eqx(path), path)
    net = GalaxyScoreNet(side, t1=t1)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(k for k in expected if expected[k] != got.get(k))
        raise NoiseSearchError(f"galaxygrad weights {path} do not fit a {side}x{side} ScoreNet ({bad[0]}); {INSTALL_HINT}")
    net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)


# ---- data <-> images -----------------------------------------------------------------------------


def to_flux(x: torch.Tensor) -> torch.Tensor:
    """The network's data x' -> flux: ``exp(0.1 x') - 1``."""
    return torch.expm1(LOG_SCALE * x.float())


def from_flux(flux: torch.Tensor) -> torch.Tensor:
    """Flux -> the network's data x' = log(flux + 1) / 0.1."""
    return torch.log1p(flux.float()) / LOG_SCALE


def flux_to_image(flux: torch.Tensor) -> torch.Tensor:
    """The documented asinh stretch: flux -> [0, 1] (0 and below black, FLUX_WHITE and above white)."""
    return (torch.asinh(flux / SOFTENING) / math.asinh(FLUX_WHITE / SOFTENING)).clamp(0, 1)


def image_to_flux(images: torch.Tensor) -> torch.Tensor:
    """The inverse of ``flux_to_image`` on [0, 1] (negative fluxes come back as 0)."""
    return SOFTENING * torch.sinh(images.float().clamp(0, 1) * math.asinh(FLUX_WHITE / SOFTENING))


def decode_galaxy(x0: torch.Tensor) -> torch.Tensor:
    """x' estimates [B, 1, H, W] -> images in [0, 1] through flux and the asinh stretch."""
    return flux_to_image(to_flux(x0))


# ---- the denoiser --------------------------------------------------------------------------------


def _identity(t):
    return t


def galaxy_process() -> VPSDE:
    """The galaxygrad noise process: VP-SDE with int_beta(t) = t on t in [T_MIN, 10]."""
    return VPSDE(int_beta=_identity, inverse_int_beta=_identity, t_min=T_MIN, t_max=T_MAX)


def load_galaxygrad(name: str, device: str | torch.device = "cpu", guidance: float = 1.0, **options) -> NetworkDenoiser:
    """``galaxygrad:<name>`` as a denoiser: the torch ScoreNet through the VP-SDE score adapter.

    The models are unconditional (``conditional = False``; any prompts, the empty one included, give
    the same samples): ``guidance`` must be 1 (or 0, the same model). Option: ``default_steps`` (32)."""
    if guidance not in (0, 1):
        raise NoiseSearchError(f"galaxygrad:{name} is an unconditional model: guidance must be 1 (or 0), got {guidance:g}")
    extra = sorted(set(options) - {"default_steps"})
    if extra:
        raise NoiseSearchError(f"galaxygrad:{name} takes no option {', '.join(extra)}; it takes default_steps")
    net = load_network(name, device=device)
    d = NetworkDenoiser(net, "score", galaxy_process(), (1, net.side, net.side), name=f"galaxygrad:{name}",
                        conditional=False, decode=decode_galaxy, default_steps=int(options.get("default_steps", 32)),
                        flops_per_call=net.flops())
    d.family = "galaxygrad"
    return d


def galaxygrad_installed() -> bool:
    """Whether the galaxygrad package (with its weight files) is installed."""
    try:
        return os.path.isfile(os.path.join(package_dir(), GALAXY_MODELS["hsc32"][0]))
    except NoiseSearchError:
        return False


__all__ = [
    "GALAXY_MODELS",
    "GalaxyScoreNet",
    "MixerBlock",
    "load_galaxygrad",
    "load_network",
    "read_eqx",
    "state_from_eqx",
    "package_dir",
    "galaxygrad_installed",
    "galaxy_process",
    "to_flux",
    "from_flux",
    "flux_to_image",
    "image_to_flux",
    "decode_galaxy",
]
