"""A pool in the making: one part file per prompt, and the spec that says what the pool is.

    <out>/parts/spec.json            {"digest": ..., "spec": {model, sampler, rewards, prompts, seed, ...}}
    <out>/parts/prompt_NNNNNN.npz    one prompt's rewards (``r:<name>``, ``na:<name>`` [N, S]) and its
                                     identity: ``spec`` (the digest), ``prompt_index``, ``prompt``, ``seed``

A part is written atomically and only after the prompt's images (``pools.images``), so a part that
exists is a finished prompt. Reading a part checks what it is, not only that it loads: a part of
another prompt of the same pool (a file copied over another) is refused; a part of another pool (an
earlier run's settings) or one that does not load is recomputed.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_bytes, atomic_write_json

PARTS = "parts"
SPEC = "spec.json"
_BAD_NAME = re.compile(r"[^A-Za-z0-9._+-]")


def pool_reward_name(name: str) -> str:
    """A reward's name as a pool key (letters, digits, ``._+-``; anything else becomes ``_``)."""
    out = _BAD_NAME.sub("_", str(name)).strip("_") or "reward"
    if not out[0].isalnum():
        out = "r" + out
    return out


def part_path(out, index: int) -> Path:
    return Path(out) / PARTS / f"prompt_{index:06d}.npz"


def spec_digest(spec_doc: dict) -> str:
    return hashlib.sha256(json.dumps(spec_doc, sort_keys=True).encode()).hexdigest()[:16]


def claim_spec(out, spec_doc: dict) -> str:
    """Record what the pool in ``out`` is (``parts/spec.json``) and return its digest; a folder
    holding parts of a different pool is refused."""
    out = Path(out)
    digest = spec_digest(spec_doc)
    path = out / PARTS / SPEC
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict) and old.get("digest") != digest:
            before = old.get("spec") if isinstance(old.get("spec"), dict) else {}
            diff = sorted(k for k in spec_doc if before.get(k) != spec_doc[k])
            raise NoiseSearchError(
                f"{out} holds parts of a different pool (differs in: {', '.join(diff) or 'format'}); "
                "use another --out or delete that folder")
    atomic_write_json(path, {"digest": digest, "spec": spec_doc})
    return digest


def save_part(path, arrays: dict[str, np.ndarray], digest: str, index: int, prompt: str, seed: int = 0) -> None:
    """One prompt's arrays and its identity (the pool's spec digest, which covers every setting;
    the prompt's index and text; the seed), atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, spec=np.array(digest), prompt_index=np.array(int(index)),
                        prompt=np.array(str(prompt)), seed=np.array(int(seed)))
    atomic_write_bytes(path, buf.getvalue())


def load_part(path, digest: str, index: int, prompt: str) -> dict[str, np.ndarray] | None:
    """The arrays of prompt ``index``'s part, or None when it is missing, does not load, holds a
    NaN reward or belongs to another pool (recompute it). A part of this pool that holds another
    prompt is refused (NoiseSearchError): it was copied over, and recomputing would hide that."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if str(arrays.get("spec", "")) != digest or "prompt_index" not in arrays:
        return None
    held, text = int(arrays["prompt_index"]), str(arrays.get("prompt", ""))
    if held != int(index) or text != str(prompt):
        raise NoiseSearchError(
            f"{path} holds prompt {held} ({text!r}), not prompt {index} ({str(prompt)!r}): a part copied over "
            "another; delete it to recompute that prompt")
    if not any(k.startswith("r:") for k in arrays) or any(
            k.startswith("r:") and not np.all(np.isfinite(v)) for k, v in arrays.items()):
        return None
    return arrays


__all__ = ["PARTS", "SPEC", "pool_reward_name", "part_path", "spec_digest", "claim_spec", "save_part", "load_part"]
