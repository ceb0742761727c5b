"""Loading reward pools: our ``noisesearch-pool`` format and the shared (TTSnap) folder layout.

``load_pool(path)`` detects the format:

* a folder with ``pool.json`` (or the path of that file): the ``noisesearch-pool`` format written by
  :meth:`Pool.save`;
* a folder of ``<model>_<reward>_base.npy`` files (optionally ``<model>_<reward>_naft.npy``, the
  noise-aware variant, NaN where unavailable) plus ``prompts.json``: the layout of the pools
  published with TTSnap (``../shared/data/ttsnap-flux``). Any model prefix works; if several prefixes
  share a folder, pick one with ``model=``. Metadata comes from an optional ``metadata.json`` in the
  folder (keys ``model``, ``num_steps``, ``flops_per_step``, ``flops_per_reward`` (number or
  per-reward dict), ``extra``); when the folder has none, the reference FLUX.1-dev figures of the
  TTSnap paper are used: 9.9 TFLOPs per denoising step and 1.2 TFLOPs per reward call (the step
  count always comes from the arrays). Callers override either with ``Pool.with_metadata`` (CLI
  ``--flops-per-step`` / ``--flops-per-reward``).
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.pools.pool import FORMAT_NAME, FORMAT_VERSION, MANIFEST, PROMPTS, Pool

#: Defaults for shared-layout folders without metadata: the TTSnap paper's FLUX.1-dev figures.
REFERENCE_FLOPS_PER_STEP = 9.9e12
REFERENCE_FLOPS_PER_REWARD = 1.2e12
#: The authors' rescaling of reported figures (display only; AUC gains are invariant to it).
REFERENCE_DISPLAY = {
    "imr": {"offset": 0.16717362830052426, "scale": 1 / 1.0333394966054072, "label": "ImageReward (rescaled)"},
    "hps": {"offset": 0.0, "scale": 100.0, "label": "HPSv2 x 100"},
    "pic": {"offset": 0.0, "scale": 1.0, "label": "PickScore"},
}
SHARED_METADATA = "metadata.json"
_SHARED_RE = re.compile(r"^(?P<model>.+)_(?P<reward>[^_]+)_(?P<kind>base|naft)\.npy$")


def load_pool(path, model: str | None = None) -> Pool:
    """Load and validate a pool from ``path`` (either format; see the module docstring)."""
    p = Path(path)
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    if not p.exists():
        raise NoiseSearchError(f"pool not found: {path}")
    if not p.is_dir():
        raise NoiseSearchError(f"a pool is a folder (with {MANIFEST}, or <model>_<reward>_base.npy files): {path}")
    if (p / MANIFEST).exists():
        return _load_native(p)
    if any(_SHARED_RE.match(f.name) for f in p.iterdir()):
        return _load_shared(p, model)
    raise NoiseSearchError(
        f"{path} holds no pool: expected {MANIFEST} (noisesearch-pool format) or "
        "<model>_<reward>_base.npy files with prompts.json (shared layout)"
    )


# ---- helpers ------------------------------------------------------------------------------------
def _read_json(path: Path, what: str):
    if not path.exists():
        raise NoiseSearchError(f"{what} missing: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NoiseSearchError(f"{what} {path} is not valid JSON ({e})")


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise NoiseSearchError(f"pool array missing: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise NoiseSearchError(f"cannot read {path}: truncated or corrupt .npy file ({e})")
    if not isinstance(arr, np.ndarray):
        raise NoiseSearchError(f"{path} is not a single .npy array")
    return arr


def _read_prompts(path: Path) -> list[str]:
    prompts = _read_json(path, "prompts file")
    if not isinstance(prompts, list) or not all(isinstance(s, str) for s in prompts):
        raise NoiseSearchError(f"{path} must hold a JSON list of prompt strings")
    return prompts


# ---- noisesearch-pool format --------------------------------------------------------------------
def _load_native(d: Path) -> Pool:
    m = _read_json(d / MANIFEST, "pool manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise NoiseSearchError(f"{d / MANIFEST} is not a {FORMAT_NAME} manifest")
    version = m.get("version")
    if not isinstance(version, int) or version < 1:
        raise NoiseSearchError(f"{d / MANIFEST}: missing or invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise NoiseSearchError(
            f"{d / MANIFEST} is format version {version}; this noisesearch reads up to version {FORMAT_VERSION}: upgrade it"
        )
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise NoiseSearchError(f"{d / MANIFEST} lists no reward files")
    rewards, noise_aware = {}, {}
    for name, entry in files.items():
        if not isinstance(entry, dict) or "base" not in entry:
            raise NoiseSearchError(f"{d / MANIFEST}: reward {name!r} has no base file")
        rewards[name] = _load_npy(d / Path(entry["base"]).name)
        if entry.get("noise_aware"):
            noise_aware[name] = _load_npy(d / Path(entry["noise_aware"]).name)
    shape = m.get("shape")
    for name, arr in rewards.items():
        if shape is not None and list(arr.shape) != list(shape):
            raise NoiseSearchError(
                f"{name}: array has shape {tuple(arr.shape)}, manifest says {tuple(shape)} (truncated or replaced file?)"
            )
    prompts = _read_prompts(d / Path(m.get("prompts_file", PROMPTS)).name)
    return Pool(
        rewards=rewards,
        noise_aware=noise_aware,
        prompts=prompts,
        model=m.get("model", "unknown"),
        num_steps=m.get("num_steps", 0),
        flops_per_step=m.get("flops_per_step", 0.0),
        flops_per_reward=m.get("flops_per_reward", {}),
        extra=m.get("extra", {}) or {},
    )


# ---- shared layout ------------------------------------------------------------------------------
def _load_shared(d: Path, model: str | None) -> Pool:
    found: dict[str, dict[str, dict[str, Path]]] = {}
    for f in sorted(d.iterdir()):
        mt = _SHARED_RE.match(f.name)
        if mt:
            found.setdefault(mt["model"], {}).setdefault(mt["reward"], {})[mt["kind"]] = f
    if model is None:
        if len(found) > 1:
            raise NoiseSearchError(f"{d} holds pools of several models ({', '.join(sorted(found))}): choose one")
        model = next(iter(found))
    if model not in found:
        raise NoiseSearchError(f"{d} has no pool for model {model!r}; models: {', '.join(sorted(found))}")
    entries = found[model]
    rewards, noise_aware = {}, {}
    for reward, kinds in entries.items():
        if "base" not in kinds:
            raise NoiseSearchError(f"{kinds['naft'].name} has no base file {model}_{reward}_base.npy")
        rewards[reward] = _load_npy(kinds["base"])
        if "naft" in kinds:
            noise_aware[reward] = _load_npy(kinds["naft"])
    prompts = _read_prompts(d / PROMPTS)
    meta = _read_json(d / SHARED_METADATA, "metadata") if (d / SHARED_METADATA).exists() else None
    if meta is None:
        fpr = {r: REFERENCE_FLOPS_PER_REWARD for r in rewards}
        return Pool(
            rewards=rewards, noise_aware=noise_aware, prompts=prompts, model=model,
            flops_per_step=REFERENCE_FLOPS_PER_STEP, flops_per_reward=fpr,
            extra={
                "source": "shared layout",
                "metadata": "defaults: TTSnap reference FLUX figures (9.9 TFLOPs/step, 1.2 TFLOPs/reward)",
                "display": {r: v for r, v in REFERENCE_DISPLAY.items() if r in rewards},
            },
        )
    if not isinstance(meta, dict):
        raise NoiseSearchError(f"{d / SHARED_METADATA} must hold a JSON object")
    fpr = meta.get("flops_per_reward", 0.0)
    if not isinstance(fpr, dict):
        fpr = {r: fpr for r in rewards}
    extra = dict(meta.get("extra", {}) or {})
    extra.setdefault("source", "shared layout")
    return Pool(
        rewards=rewards, noise_aware=noise_aware, prompts=prompts, model=meta.get("model", model),
        num_steps=meta.get("num_steps", 0), flops_per_step=meta.get("flops_per_step", 0.0),
        flops_per_reward=fpr, extra=extra,
    )
