"""File input and output.

* the one atomic writer (and its bytes / text / JSON / npy / figure forms); a write that fails (a
  full disk) keeps what was computed elsewhere and says where (:func:`atomic_write`,
  :func:`keep_failed_writes`);
* :func:`output_lock`: one run at a time in an output folder; :func:`check_disk`: free space before work;
* :func:`read_text_limited`: a text input file read within a size limit and decoded as UTF-8;
* image grids; checked safetensors; official ``.pt`` state dicts read without unpickling code.

The file helpers need no torch (``validate``, ``config`` and ``noisesearch --help`` use them); the
tensor helpers import it when called (``# deferred:``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image
from safetensors import SafetensorError, safe_open

from noisesearch.errors import NoiseSearchError

if TYPE_CHECKING:
    import torch

# ---- reading bounded text ---------------------------------------------------------------------------
MAX_TEXT_BYTES = 16 * 2**20  # a prompts or config file larger than this is not a prompts or config file


def read_text_limited(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of ``path`` (``what`` names it for the user, e.g. ``--prompts-file``): at most
    ``max_bytes`` bytes (``/dev/zero`` and other endless or huge files are refused after reading that
    much), decoded as UTF-8 (a BOM is dropped); NoiseSearchError (one line) otherwise."""
    path = Path(path)
    try:
        if path.is_dir():
            raise NoiseSearchError(f"cannot read {what} {path}: it is a folder; give a text file")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise NoiseSearchError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise NoiseSearchError(f"{what} {path} is larger than {max_bytes / 2**20:g} MiB; "
                               "give a smaller text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NoiseSearchError(f"{what} {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                               "save it as UTF-8") from None
    if "\x00" in text:
        raise NoiseSearchError(f"{what} {path} holds NUL bytes: a binary file, not text; give a UTF-8 text file")
    return text


# ---- writing --------------------------------------------------------------------------------------------
_KEEP: list | None = None  # inside keep_failed_writes: [(target, kept path, reason)], else None


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file beside ``path``, synced, 0644, then moved to ``path``
    (never over a folder, device, FIFO or socket)."""
    if path.exists() and not path.is_file():  # (following a link: a link to /dev/zero is refused too)
        raise NoiseSearchError(f"{path} exists and is not a regular file (a folder, device or pipe); it is never replaced")
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
        with contextlib.suppress(OSError):
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _keep_elsewhere(path: Path, write: Callable[[BinaryIO], None]) -> Path | None:
    """Write what could not be written at ``path``: beside it (``NAME.kept-PID``), else in the
    system's temporary folder (``noisesearch-kept-PID/NAME``); the path written, or None."""
    pid = os.getpid()
    for place in (path.with_name(f"{path.name}.kept-{pid}"),
                  Path(tempfile.gettempdir()) / f"noisesearch-kept-{pid}" / path.parent.name / path.name):
        try:
            _write_file(place, write)
            return place
        except OSError:
            continue
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """The one atomic writer: ``write(f)`` fills a temporary file in the same folder, which is then
    synced, made readable by others (0644: outputs, weights and pools are meant to be shared) and
    moved into place with ``os.replace``. A failure leaves no partial file and the old one intact.

    When the write fails with an ``OSError`` (a full disk, a folder gone), ``write`` is run again
    into a file beside the target or in the temporary folder, and a one-line NoiseSearchError says
    where what was computed is kept (inside :func:`keep_failed_writes`, at the end of the block)."""
    path = Path(path)
    try:
        if _KEEP:  # an earlier write of this block failed: the later ones (report.json) must not complete the folder
            raise OSError(f"not written after the failure of {_KEEP[0][0].name}")
        _write_file(path, write)
    except OSError as e:
        reason = e.strerror or str(e)
        kept = _keep_elsewhere(path, write)
        if _KEEP is not None:
            _KEEP.append((path, kept, reason))
            return path
        raise NoiseSearchError(_kept_message([(path, kept, reason)])) from None
    return path


def _kept_message(failed: list) -> str:
    path, _, reason = failed[0]  # the first failure says why
    kept = [k for _, k, _ in failed if k is not None]
    what = f"{path}" if len(failed) == 1 else f"{len(failed)} files ({path}, ...)"
    if not kept:
        return f"cannot write {what}: {reason}; nothing could be kept elsewhere either (free some space)"
    where = str(kept[0]) if len(kept) == 1 else os.path.commonpath([str(k.parent) for k in kept])
    if len(Path(where).parts) <= 2:  # kept in places with little in common: name them
        places = sorted({str(k.parent) for k in kept})
        where = " and ".join(places[:2]) + (f" (and {len(places) - 2} more folders)" if len(places) > 2 else "")
    lost = "" if len(kept) == len(failed) else f" ({len(failed) - len(kept)} could not be kept)"
    return f"cannot write {what}: {reason}; what was computed is kept in {where}{lost}"


@contextlib.contextmanager
def keep_failed_writes() -> Iterator[None]:
    """Within the block, an atomic write that fails keeps its data elsewhere (see :func:`atomic_write`)
    and the later writes of the block go there too (so that a run folder is never completed by a
    file written after a failure); at its end one NoiseSearchError names where everything that could
    not be written is kept. Wrap the writing of a run's outputs in it."""
    global _KEEP
    outer, _KEEP = _KEEP, []
    try:
        yield
        failed = _KEEP
    finally:
        _KEEP = outer
    if failed:
        if outer is not None:
            outer.extend(failed)
        else:
            raise NoiseSearchError(_kept_message(failed))


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
    if isinstance(obj, (np.ndarray, np.generic)) or type(obj).__module__.startswith("torch"):
        return obj.tolist()  # tensors and arrays
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One image [C, H, W] in [0, 1] to PIL, upscaled by ``scale`` (nearest neighbour)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
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
    buf = _io.BytesIO()
    pic.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def describe_load_error(e: Exception) -> str:
    """One line for a ``torch.load(weights_only=True)`` failure, without torch's advice to load with
    ``weights_only=False`` (which would run whatever code the file holds)."""
    text = str(e)
    if "weights_only" not in text and "Weights only" not in text:
        return f"{type(e).__name__}: {' '.join(text.split())[:300]}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = next((ln for ln in lines if ln.startswith(("Trying to load", "Unsupported"))), None)
    why = why or next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines
                       if "WeightsUnpickler error:" in ln and ln.split("WeightsUnpickler error:", 1)[1].strip()), "")
    return ("the file holds more than tensors (a pickled Python object"
            f"{': ' + why.rstrip('.') if why else ''}), and noisesearch never runs code from a weights file; "
            "use the official checkpoint (a state dict of tensors), or re-save its state dict or convert it to safetensors")


def load_torch_state_dict(path: str | os.PathLike, what: str) -> dict:
    """The state dict in an official PyTorch checkpoint (``*.pt`` / ``*.pth``), read with
    ``weights_only=True`` (never unpickling code); a dict holding it under ``state_dict`` is
    unwrapped. ``what`` names the reward for the one-line error of an unreadable file."""
    # deferred: torch; the file helpers above serve `noisesearch --help` (validate, config) without it
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NoiseSearchError(f"{what}: cannot read {path}: {describe_load_error(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict: detects corrupt weight files."""
    # deferred: torch; the file helpers above serve `noisesearch --help` (validate, config) without it
    import torch

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
    # deferred: torch; the file helpers above serve `noisesearch --help` (validate, config) without it
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "kind": kind, "sha256": tensor_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checked_safetensors(path: str | os.PathLike, kind: str, what: str, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by ``save_checked_safetensors``. Raises
    ``NoiseSearchError`` (``what`` names the file for the user, ``hint`` says what to do) if it is
    missing, unreadable, truncated, of another kind or fails its checksum."""
    # deferred: torch; the file helpers above serve `noisesearch --help` (validate, config) without it
    from safetensors.torch import load_file

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


# ---- output folders: one run at a time, enough space ----------------------------------------------------
LOCK_NAME = ".noisesearch.lock"
OWNER_NAME = ".noisesearch.owner"


def _lock_owner(folder: Path) -> str:
    try:
        info = json.loads((folder / OWNER_NAME).read_text())
        return f"pid {int(info['pid'])} on {info.get('host', '?')}, started {info.get('started', '?')}: {info.get('command', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown (it is starting)"


def _missing_top(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None if it exists)."""
    top = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        top = p
    return top


def _remove_made(folder: Path, top: Path | None) -> None:
    """Remove the folders :func:`output_lock` made, if the run left nothing in them."""
    if top is None:
        return
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()  # only if empty
        except OSError:
            return
        if p == top:
            return


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str = "noisesearch", quiet_mkdir: bool = False) -> Iterator[Path]:
    """Hold the output folder ``folder`` for this run (made if needed): a second run into it while
    this one holds it is refused with a one-line NoiseSearchError naming the running process (its
    pid, host, start time and command). The lock is a ``filelock`` lock on ``folder/.noisesearch.lock``
    (the system releases it when the process dies: no stale locks); ``.noisesearch.owner`` says who
    holds it. Both files are removed at the end (before the lock is released), and a folder this
    call made is removed again if the run left nothing in it. ``quiet_mkdir``: when the folder
    cannot be made or locked, run without the lock (the caller's own check of the path says why)."""
    folder = Path(folder)
    top = _missing_top(folder)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise NoiseSearchError(f"{folder} is in use by another run ({_lock_owner(folder)}); wait for it to "
                               "finish or choose another output folder") from None
    except OSError as e:
        if not quiet_mkdir:
            raise NoiseSearchError(f"cannot make or lock the output folder {folder}: {e.strerror or e}") from None
        lock = None
    if lock is None:
        yield folder
        return
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):
            _write_file(folder / OWNER_NAME, lambda f: f.write(json.dumps(owner).encode()))
        yield folder
    finally:
        for name in (OWNER_NAME, LOCK_NAME):  # removed while held: a later run makes a new lock file
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        lock.release()
        _remove_made(folder, top)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that holds ``folder`` or would hold it."""
    p = Path(folder).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def check_disk(folder: str | os.PathLike, nbytes: float, what: str, margin: float = 1.1) -> None:
    """Refuse, before the work, ``what`` (e.g. ``"the run's images and report"``) that will write about
    ``nbytes`` bytes into ``folder`` when the free space there is less than ``margin * nbytes``."""
    need = float(nbytes) * margin
    try:
        free = free_bytes(folder)
    except OSError:  # cannot tell: the atomic writes still keep what fails
        return
    if need > free:
        raise NoiseSearchError(f"{what} needs about {_size(need)} in {folder}, but only {_size(free)} is free there; "
                               "free some space or choose another output folder")


__all__ = ["MAX_TEXT_BYTES", "atomic_save_figure", "atomic_save_npy", "atomic_write", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text", "check_disk", "describe_load_error", "free_bytes", "image_grid", "keep_failed_writes",
           "load_checked_safetensors", "load_torch_state_dict", "output_lock", "read_text_limited", "save_checked_safetensors",
           "save_png", "tensor_digest", "to_pil"]
