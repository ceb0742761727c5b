"""File output: the one atomic writer (and its bytes / text / JSON / npy / figure forms), image grids,
checked safetensors."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from PIL import Image


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """The one atomic writer: ``write(f)`` fills a temporary file in the same folder, which is then
    synced, made readable by others (0644: outputs, weights and pools are meant to be shared) and
    moved into place with ``os.replace``. A failure leaves no partial file and the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def atomic_save_figure(path: str | os.PathLike, fig, **savefig_kw) -> Path:
    """A matplotlib figure as PNG (``savefig_kw`` e.g. ``dpi``); the figure is left open."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig_kw))


def _jsonable(obj: Any):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One image [C, H, W] in [0, 1] to PIL, upscaled by ``scale`` (nearest neighbour)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pic = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)))
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    return pic


def image_grid(images: torch.Tensor, ncol: int | None = None, scale: int | None = None, pad: int = 2) -> Image.Image:
    """Grid of images [B, C, H, W] in [0, 1]; small images are upscaled so the grid is viewable."""
    b, c, h, w = images.shape
    scale = scale or max(1, 64 // max(h, w))
    ncol = ncol or math.ceil(math.sqrt(b))
    nrow = math.ceil(b / ncol)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = Image.new("RGB", (ncol * cell_w + pad, nrow * cell_h + pad), (255, 255, 255))
    for i in range(b):
        r, col = divmod(i, ncol)
        grid.paste(to_pil(images[i], scale).convert("RGB"), (pad + col * cell_w, pad + r * cell_h))
    return grid


def save_png(path: str | os.PathLike, pic: Image.Image) -> None:
    import io as _io

    buf = _io.BytesIO()
    pic.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_torch_state_dict(path: str | os.PathLike, what: str) -> dict:
    """The state dict in an official PyTorch checkpoint (``*.pt`` / ``*.pth``), read with
    ``weights_only=True`` (never unpickling code); a dict holding it under ``state_dict`` is
    unwrapped. ``what`` names the reward for the one-line error of an unreadable file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        from noisesearch.errors import NoiseSearchError

        raise NoiseSearchError(f"{what}: cannot read {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict: detects corrupt weight files."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checked_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` atomically as safetensors with ``kind`` and a ``sha256`` digest in the
    metadata (plus ``metadata``), so that ``load_checked_safetensors`` can tell a wrong or corrupt file."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "kind": kind, "sha256": tensor_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checked_safetensors(path: str | os.PathLike, kind: str, what: str, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by ``save_checked_safetensors``. Raises
    ``NoiseSearchError`` (``what`` names the file for the user, ``hint`` says what to do) if it is
    missing, unreadable, truncated, of another kind or fails its checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    from noisesearch.errors import NoiseSearchError

    path = Path(path)
    if not path.is_file():
        raise NoiseSearchError(f"{what} not found at {path}; {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NoiseSearchError(f"{what} at {path} is corrupt or truncated ({e}); {hint}") from None
    if metadata.get("kind") != kind:
        raise NoiseSearchError(f"{path} holds {metadata.get('kind') or 'unknown'!r} data, not {kind!r}; {hint}")
    if metadata.get("sha256") != tensor_digest(tensors):
        raise NoiseSearchError(f"{what} at {path} fails its checksum (corrupt file); {hint}")
    return tensors, metadata
