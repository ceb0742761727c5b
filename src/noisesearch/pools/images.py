"""A pool's stored estimates (``noisesearch pool --save-images``): every Tweedie estimate as a
compressed image, one file per prompt, read back one image at a time.

Layout (``pool.extra["images"] == "images"``)::

    <pool>/images/prompt_NNNNNN.zip      one per prompt (zip, members stored as they are)
        meta.json                        {"format": "noisesearch-pool-images", "version": 1, "prompt_index",
                                          "prompt", "spec", "codec", "quality", "layout", "candidates",
                                          "steps", "shape"}
        c{j:06d}_s{s:03d}.png            layout "image": candidate j, pool step s, round(255 * estimate) as uint8
        c{j:06d}.png                     layout "strip" (small images): candidate j's S estimates stacked
                                         vertically (step 0 on top), so that a file's and a member's fixed
                                         overhead (~170 bytes) is paid once per candidate, not per estimate

Estimates of at most ``STRIP_MAX_BYTES`` raw bytes (the digits model's 8x8, tiny test pipelines) use
the strip layout; larger ones (a 512x512 FLUX estimate) one member each, so that reading one costs one
decode. Codecs (PIL): ``png`` (lossless, the default: decoding gives back the exact uint8 estimate) and
``webp`` (lossy, ``quality`` 1-100; its effect on the reward is measured in docs/noise_aware.md).
Images with 3 channels are stored as RGB, 4 as RGBA; any other channel count as one grey image of
the channels stacked vertically. Zip members carry a CRC-32 that is checked on every read, and
``meta.json`` says which prompt of which pool (``spec``: the pool's spec digest) a file holds, so a
file copied over another prompt's is refused, not read.

:class:`PoolImages` reads single estimates (``get``) or batches of them (``batch``) and keeps a few
files open (their directories only): its memory does not grow with the pool. Pools written before
this format hold one ``images.npz`` (uint8 ``[P, N, S, C, H, W]``); they are read whole, as before.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write
from noisesearch.pools.load import load_pool

IMAGES_DIR = "images"
LEGACY_IMAGES = "images.npz"
FORMAT = "noisesearch-pool-images"
VERSION = 1
META = "meta.json"
CODECS = {"png": "png", "webp": "webp"}
DEFAULT_WEBP_QUALITY = 90
#: zip bytes per member besides the image: local header (30) + central record (46) + the name twice
MEMBER_OVERHEAD = 76 + 2 * len("c000000_s000.png")
STRIP_MAX_BYTES = 4096  # estimates up to this size (C*H*W) are stored as one strip per candidate


def images_path(out, index: int) -> Path:
    return Path(out) / IMAGES_DIR / f"prompt_{index:06d}.zip"


def member_name(candidate: int, step: int | None, codec: str) -> str:
    """The zip member of an estimate (``step`` None: a candidate's strip)."""
    if step is None:
        return f"c{candidate:06d}.{CODECS[codec]}"
    return f"c{candidate:06d}_s{step:03d}.{CODECS[codec]}"


def layout_for(shape) -> str:
    """``strip`` for small estimates, ``image`` (one member each) for the others."""
    return "strip" if int(np.prod(shape)) <= STRIP_MAX_BYTES else "image"


def strip(estimates: np.ndarray) -> np.ndarray:
    """A candidate's estimates ``[S, C, H, W]`` as one image ``[C, S * H, W]`` (step 0 on top)."""
    S, C, H, W = estimates.shape
    return np.ascontiguousarray(estimates.transpose(1, 0, 2, 3).reshape(C, S * H, W))


def unstrip(image: np.ndarray, steps: int) -> np.ndarray:
    C, SH, W = image.shape
    return image.reshape(C, steps, SH // steps, W).transpose(1, 0, 2, 3)


def check_codec(codec: str, quality: int | None) -> None:
    if codec not in CODECS:
        raise NoiseSearchError(f"unknown image format {codec!r}: use png (lossless) or webp (lossy)")
    if quality is not None and not 1 <= int(quality) <= 100:
        raise NoiseSearchError(f"--webp-quality must be in 1..100, got {quality}")


# ---- encoding -----------------------------------------------------------------------------------
def to_uint8(images) -> np.ndarray:
    """Decoded estimates in [0, 1] (a tensor or array ``[B, C, H, W]``) as stored: round(255 * x)."""
    arr = np.asarray(images.detach().float().cpu().numpy() if hasattr(images, "detach") else images, np.float32)
    return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)


def _to_pil(arr: np.ndarray) -> Image.Image:
    c, h, w = arr.shape
    if c == 3:
        return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")
    if c == 4:
        return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr.reshape(c * h, w)), "L")


def encode_image(arr: np.ndarray, codec: str = "png", quality: int | None = None) -> bytes:
    """One uint8 estimate ``[C, H, W]`` as PNG (lossless) or WebP (lossy at ``quality``) bytes."""
    buf = io.BytesIO()
    pic = _to_pil(arr)
    if codec == "png":
        pic.save(buf, format="PNG", compress_level=6)
    else:
        pic.save(buf, format="WEBP", quality=int(quality or DEFAULT_WEBP_QUALITY), method=4)
    return buf.getvalue()


def decode_image(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Bytes written by :func:`encode_image` back to uint8 ``[C, H, W]``."""
    c, h, w = shape
    with Image.open(io.BytesIO(data)) as pic:
        if c in (3, 4):
            arr = np.asarray(pic.convert("RGB" if c == 3 else "RGBA")).transpose(2, 0, 1)
        else:
            arr = np.asarray(pic.convert("L")).reshape(c, h, w)
    if arr.shape != (c, h, w):
        raise ValueError(f"image of shape {arr.shape}, expected {(c, h, w)}")
    return np.array(arr, order="C")  # a writable copy (PIL's buffer is read-only)


def bytes_per_image(images: np.ndarray, codec: str = "png", quality: int | None = None, steps: int = 1) -> float:
    """Stored bytes of one estimate, measured on ``images`` (uint8 ``[B, C, H, W]``): their mean
    encoded size plus the zip entry around each (small estimates, stored as strips of ``steps``: the
    entry shared by ``steps`` estimates; each image's own file header is counted, an upper bound)."""
    size = float(np.mean([len(encode_image(a, codec, quality)) for a in images]))
    share = steps if layout_for(images.shape[1:]) == "strip" else 1
    return size + MEMBER_OVERHEAD / max(1, share)


def write_prompt_images(path, meta: dict, members: dict[str, bytes]) -> Path:
    """Write one prompt's encoded estimates (``members``: name -> bytes) and ``meta`` atomically."""
    doc = json.dumps({"format": FORMAT, "version": VERSION, **meta}, sort_keys=True).encode()

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            z.writestr(META, doc)
            for name, data in members.items():
                z.writestr(name, data)

    return atomic_write(path, write)


def read_prompt_meta(path) -> dict | None:
    """The ``meta.json`` of a prompt's image file, or None when it is missing or unreadable."""
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(META))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def identity_error(path, meta: dict, index: int, prompt: str, spec: str) -> str | None:
    """Why the image file at ``path`` is not prompt ``index`` (``prompt``) of pool ``spec``, or None."""
    if meta.get("spec") != spec:
        return f"{path} holds images of another pool (spec {meta.get('spec')!r}, this pool {spec!r})"
    if meta.get("prompt_index") != index or meta.get("prompt") != prompt:
        return (f"{path} holds the images of prompt {meta.get('prompt_index')} ({meta.get('prompt')!r}), "
                f"not of prompt {index} ({prompt!r}): a file copied over another")
    return None


# ---- reading ------------------------------------------------------------------------------------
class PoolImages:
    """The stored estimates of a pool, read on demand (see the module docstring).

    ``PoolImages(directory, pool)``: ``shape`` is ``(P, N, S, C, H, W)``; ``get(p, c, s)`` one
    uint8 image ``[C, H, W]``; ``batch(rows_p, rows_c, steps)`` uint8 ``[B, C, H, W]``;
    ``prompt(p)`` all estimates of one prompt ``[N, S, C, H, W]``. At most ``max_open`` prompt
    files are open at a time (least recently used closed first; default: every prompt of the pool up
    to 256, within a quarter of the process's file limit), and decoded strips are kept up to
    ``strip_cache_bytes`` (least recently used dropped first). Training draws random rows of every
    prompt: with 8 files open and 64 strips cached, a random batch of 128 digits estimates took
    504-568 ms (a prompt file reopened, with its checks and zip directory, for most rows), 13-27 ms
    with these caches (``python tools/pool_read_speed.py pools/digits``)."""

    def __init__(self, directory, pool, max_open: int | None = None, strip_cache_bytes: int = 256 << 20):
        self.dir = Path(directory)
        self.pool = pool
        self.max_open = max(1, int(max_open if max_open is not None else default_max_open(pool.shape[0])))
        self.strip_cache_bytes = int(strip_cache_bytes)
        self._strip_bytes = 0
        self._open: OrderedDict[int, zipfile.ZipFile] = OrderedDict()
        name = pool.extra.get("images")
        if not name or not (self.dir / name).exists():
            raise NoiseSearchError(
                f"the pool at {directory} has no estimate images: make it with `noisesearch pool ... --save-images`")
        self.legacy = None
        if name == LEGACY_IMAGES:
            self.legacy = _read_legacy(self.dir / name, pool.shape)  # the old single-array format: read whole
            self.codec, self.image_shape = "npz", tuple(self.legacy.shape[3:])
        else:
            fmt = pool.extra.get("images_format") or {}
            if not isinstance(fmt, dict) or fmt.get("codec") not in CODECS or len(fmt.get("shape") or ()) != 3:
                raise NoiseSearchError(f"{directory}/pool.json: unreadable images_format {fmt!r}; remake the pool")
            self.codec, self.image_shape = fmt["codec"], tuple(int(v) for v in fmt["shape"])
            self.layout = fmt.get("layout", "image")
        self.spec = str(pool.extra.get("spec_digest", ""))
        self._strips: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # a few decoded strips

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.pool.shape, *self.image_shape)

    def _zip(self, p: int) -> zipfile.ZipFile:
        z = self._open.get(p)
        if z is not None:
            self._open.move_to_end(p)
            return z
        path = images_path(self.dir, p)
        meta = read_prompt_meta(path)
        if meta is None:
            raise NoiseSearchError(f"cannot read the pool images {path} (missing or corrupt); remake the pool")
        why = identity_error(path, meta, p, self.pool.prompts[p], self.spec)
        if why:
            raise NoiseSearchError(f"{why}; remake the pool or put the right file back")
        z = zipfile.ZipFile(path)
        self._open[p] = z
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return z

    def get(self, p: int, c: int, s: int) -> np.ndarray:
        p, c, s = int(p), int(c), int(s)
        if self.legacy is not None:
            return self.legacy[p, c, s]
        if self.layout == "strip":
            return self._strip(p, c)[s].copy()
        return self._read(p, member_name(c, s, self.codec), self.image_shape)

    def _read(self, p: int, name: str, shape) -> np.ndarray:
        try:
            return decode_image(self._zip(p).read(name), shape)
        except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise NoiseSearchError(f"cannot read {name} in {images_path(self.dir, p)} ({e}); remake the pool") from None

    def _strip(self, p: int, c: int) -> np.ndarray:
        got = self._strips.get((p, c))
        if got is not None:
            self._strips.move_to_end((p, c))
            return got
        S = self.pool.shape[2]
        C, H, W = self.image_shape
        got = unstrip(self._read(p, member_name(c, None, self.codec), (C, S * H, W)), S)
        self._strips[(p, c)] = got
        self._strip_bytes += got.nbytes
        while self._strip_bytes > self.strip_cache_bytes and len(self._strips) > 1:
            self._strip_bytes -= self._strips.popitem(last=False)[1].nbytes
        return got

    def batch(self, rows_p: Iterable[int], rows_c: Iterable[int], steps: Iterable[int]) -> np.ndarray:
        rows = list(zip(rows_p, rows_c, steps))
        out = np.empty((len(rows), *self.image_shape), np.uint8)
        for i, (p, c, s) in enumerate(rows):
            out[i] = self.get(p, c, s)
        return out

    def prompt(self, p: int) -> np.ndarray:
        _, N, S = self.pool.shape
        cc, ss = np.meshgrid(np.arange(N), np.arange(S), indexing="ij")
        return self.batch([p] * (N * S), cc.ravel(), ss.ravel()).reshape(N, S, *self.image_shape)

    def close(self) -> None:
        opened = getattr(self, "_open", None) or {}
        while opened:
            opened.popitem()[1].close()

    def __del__(self):
        self.close()


def default_max_open(prompts: int) -> int:
    """Prompt files to keep open: every prompt up to 256, at most a quarter of the soft limit on open
    files (at least 8)."""
    try:
        import resource  # deferred: POSIX only

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1024
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(1, min(prompts, 256, max(8, soft // 4)))


def _read_legacy(path: Path, shape) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise NoiseSearchError(f"cannot read the pool images {path} ({e}); remake the pool") from None
    if images.shape[:3] != tuple(shape):
        raise NoiseSearchError(f"pool images have shape {images.shape}, the rewards {tuple(shape)}: remake the pool")
    return images


def load_pool_images(path) -> np.ndarray:
    """All uint8 estimates ``[P, N, S, C, H, W]`` saved with a pool, in memory (for small pools;
    :class:`PoolImages` reads them one at a time)."""
    pool = load_pool(path)
    d = Path(path)
    reader = PoolImages(d.parent if d.is_file() else d, pool)
    try:
        return np.stack([reader.prompt(p) for p in range(pool.num_prompts)])
    finally:
        reader.close()


__all__ = ["PoolImages", "load_pool_images", "encode_image", "decode_image", "bytes_per_image", "to_uint8",
           "layout_for", "strip", "unstrip",
           "write_prompt_images", "read_prompt_meta", "identity_error", "images_path", "member_name", "check_codec",
           "IMAGES_DIR", "CODECS", "DEFAULT_WEBP_QUALITY"]
