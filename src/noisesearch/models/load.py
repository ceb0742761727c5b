"""``load_model``: the one place where a model given any way becomes a denoiser.

``model`` may be

* ``"digits"``: the built-in 8x8 digits model;
* ``"galaxygrad:<name>"``: a pretrained galaxy score model (``models.galaxygrad``);
* a diffusers pipeline folder or hub name ``org/model`` (Stable Diffusion 1.x / 2.x, SDXL, FLUX,
  SD3 / 3.5, Lumina2, DDPM / DDIM), loaded strictly (``models.strict``);
* a loaded diffusers pipeline object of those classes, dispatched from its class;
* a denoiser object (anything with the ``models.base.Denoiser`` members).

Options (height, width, dtype, negative_prompt, ...) mean the same for a folder and an object.
``device=None`` / ``guidance=None`` mean "unchanged": where a loaded object is, the guidance it
has; for names the CPU and guidance 1 (conditional).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from noisesearch.errors import NoiseSearchError, unknown_name
from noisesearch.models.base import Denoiser
from noisesearch.models.digits import DigitsDenoiser
from noisesearch.models.flow import FLOW_FAMILIES, FlowPipelineDenoiser
from noisesearch.models.galaxygrad import load_galaxygrad
from noisesearch.models.pipeline import parse_dtype, quiet_library_notices
from noisesearch.models.sd import SD_PIPELINES, DiffusersDenoiser
from noisesearch.models.strict import check_tokenizers, load_pipeline_components, quiet_libraries, read_json_object
from noisesearch.models.unconditional import UNCONDITIONAL_PIPELINES, UnconditionalPipelineDenoiser

BUILTIN_MODELS = {
    "digits": "the built-in 8x8 digits diffusion model (class-conditional, shipped weights)",
    "galaxygrad:<name>": "a pretrained galaxy score model from the galaxygrad package (e.g. galaxygrad:hsc32)",
}
FLOW_PIPELINES = tuple(FLOW_FAMILIES)
SUPPORTED_PIPELINES = SD_PIPELINES + FLOW_PIPELINES + UNCONDITIONAL_PIPELINES
DENOISER_MEMBERS = ("sample_shape", "sigma_min", "sigma_max", "default_steps", "flops_per_call", "flops_per_decode",
                    "encode", "decode", "__call__")


def load_model(model: Any, device: str | torch.device | None = None, guidance: float | None = None, **options) -> Denoiser:
    """A denoiser from a name, a folder, ``galaxygrad:<name>``, a diffusers pipeline object or a
    denoiser object (see the module docstring).

    ``guidance``: 0 = unconditional, 1 = conditional, > 1 classifier-free guidance; None keeps a
    denoiser object's own (1 for everything built here). ``device``: None keeps an object where it
    is (the CPU for names). Raises ``NoiseSearchError`` (one line) for anything it cannot honour.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str):
        return _load_named(model, device, guidance, options)
    if is_pipeline(model):
        return denoiser_from_pipeline(model, device=device, guidance=1.0 if guidance is None else guidance, **options)
    return adapt_denoiser(model, device=device, guidance=guidance, options=options)


def _load_named(name: str, device, guidance, options: dict) -> Denoiser:
    device = "cpu" if device is None else device
    guidance = 1.0 if guidance is None else guidance
    if name == "digits":
        extra = sorted(set(options) - {"weights"})
        if extra:
            raise NoiseSearchError(
                f"the digits model takes no option {', '.join(extra)} (8x8 images, float32); "
                "height, width, dtype and negative prompts apply to diffusers pipelines"
            )
        return DigitsDenoiser(guidance=guidance, device=device, **options)
    if name.startswith("galaxygrad:"):
        try:
            return load_galaxygrad(name.split(":", 1)[1], device=device, guidance=guidance, **options)
        except TypeError as e:
            raise NoiseSearchError(f"bad option for {name}: {e}") from e
    if os.path.isdir(name) or (name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))):
        return load_diffusers(name, device=device, guidance=guidance, **options)
    raise unknown_name("model", name, list(BUILTIN_MODELS) + ["<diffusers pipeline directory>", "<hub org/name>"])


# ---- diffusers pipelines ---------------------------------------------------------------------------


def _import_diffusers():
    try:
        import diffusers  # deferred: an optional, heavy dependency
    except ImportError as e:
        raise NoiseSearchError("diffusers pipelines need `pip install 'noisesearch[diffusers]'`") from e
    quiet_library_notices()
    return diffusers


def _hub_error(name: str, err: Exception) -> NoiseSearchError:
    from huggingface_hub import constants  # deferred: comes with diffusers

    if constants.HF_HUB_OFFLINE:
        hint = (
            "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache: download it where there is "
            f"network (e.g. `huggingface-cli download {name} --local-dir DIR`) and pass --model DIR"
        )
    else:
        hint = "check the name, your network and, for gated models, `huggingface-cli login`; or pass a local directory"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return NoiseSearchError(f"cannot load diffusers pipeline {name!r}: {hint} ({type(err).__name__}: {first})")


def _local_folder(diffusers, name: str, variant: str | None) -> Path:
    """The folder of a pipeline: ``name`` itself, or the hub snapshot of ``org/name`` (downloaded
    or from the cache), so that hub and folder pipelines are checked the same way."""
    if os.path.isdir(name):
        return Path(name)
    try:
        return Path(diffusers.DiffusionPipeline.download(name, variant=variant, use_safetensors=True))
    except Exception as e:  # any hub / network error
        raise _hub_error(name, e) from e


def _read_model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    if not path.is_file():
        raise NoiseSearchError(
            f"{folder} is not a diffusers pipeline directory (no model_index.json); "
            "save one with `pipe.save_pretrained(DIR)` or download a full pipeline repository"
        )
    return read_json_object(path, f"cannot read {path}", "{e}")


def _check_class(class_name, what: str) -> str:
    if class_name not in SUPPORTED_PIPELINES:
        raise NoiseSearchError(
            f"{what} is a {class_name} pipeline; supported: {', '.join(SUPPORTED_PIPELINES)} "
            "(Stable Diffusion 1.x / 2.x, SDXL, the flow-matching FLUX, SD3 and Lumina2, unconditional DDPM / DDIM)"
        )
    return class_name


def _default_dtype(class_name: str, dtype, device) -> torch.dtype:
    """Flow transformers are trained in bfloat16 (float16 overflows in FLUX); UNets run in float16 (on CUDA)."""
    return parse_dtype(dtype, device, torch.bfloat16 if class_name in FLOW_FAMILIES else torch.float16)


def load_diffusers(name_or_path: str, device: str | torch.device = "cpu", guidance: float = 1.0,
                   dtype: torch.dtype | str | None = None, variant: str | None = None, **kw) -> Denoiser:
    """Load a pipeline folder or hub ``org/name`` (a class of ``SUPPORTED_PIPELINES``) as a denoiser,
    strictly (``models.strict``): every network matches its weights, tokenizers fit their encoders.

    ``dtype``: the network dtype (default on CUDA: bfloat16 for flow pipelines, float16 for UNets;
    float32 elsewhere); a string like ``"bfloat16"`` works too. ``variant``: a weights variant such as
    ``"fp16"``. ``offload=True``: model CPU offload (``enable_model_cpu_offload``, CUDA only; flow
    pipelines). Other keyword arguments go to the denoiser (height, width, default_steps,
    negative_prompt, decode_batch, ...).
    """
    diffusers = _import_diffusers()
    name = str(name_or_path)
    device = torch.device(device)
    folder = _local_folder(diffusers, name, variant)
    index = _read_model_index(folder)
    class_name = _check_class(index.get("_class_name"), name)
    offload = _check_offload(class_name, device, kw.pop("offload", False))
    dtype = _default_dtype(class_name, dtype, device)
    components = load_pipeline_components(folder, index, variant, dtype)
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    try:
        with quiet_libraries():
            pipe = getattr(diffusers, class_name).from_pretrained(str(folder), **components, **extra)
    except Exception as e:  # tokenizers, schedulers, processors: any library error
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NoiseSearchError(f"cannot load the {class_name} in {name} (missing or broken files?): {first}") from None
    check_tokenizers(pipe, folder)
    _place(pipe, device, offload)
    return _adapter(pipe, class_name, guidance, name, offload, kw)


def denoiser_from_pipeline(pipe, device=None, guidance: float = 1.0, dtype: torch.dtype | str | None = None,
                           name: str | None = None, **kw) -> Denoiser:
    """A loaded diffusers pipeline object as a denoiser, with the options of ``load_diffusers``.

    ``dtype`` and ``device`` (or ``offload=True``) move the pipeline itself, as ``pipe.to`` does;
    left out, it stays as it is."""
    _import_diffusers()
    class_name = _check_class(type(pipe).__name__, f"the {type(pipe).__name__} object")
    if kw.pop("variant", None) is not None:
        raise NoiseSearchError("variant selects weight files when loading a folder; a pipeline object is loaded already")
    offload = _check_offload(class_name, torch.device(device or "cuda"), kw.pop("offload", False))
    if dtype is not None:
        pipe.to(dtype=_default_dtype(class_name, dtype, device or "cpu"))
    if device is not None or offload:
        _place(pipe, torch.device(device or "cuda"), offload)
    check_tokenizers(pipe, f"the {class_name} object", is_folder=False)
    offloaded = offload or getattr(pipe, "_offload_device", None) is not None
    return _adapter(pipe, class_name, guidance, name, offloaded, kw)


def _check_offload(class_name: str, device: torch.device, offload) -> bool:
    """``offload`` (model CPU offload) checked before anything is loaded or moved."""
    if not offload:
        return False
    if class_name not in FLOW_FAMILIES:
        raise NoiseSearchError("--offload applies to flow pipelines (FLUX, SD3, Lumina2)")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise NoiseSearchError("--offload (model CPU offload) needs a CUDA device")
    return True


def _place(pipe, device: torch.device, offload: bool) -> None:
    if offload:
        pipe.enable_model_cpu_offload(device=device)  # needs accelerate; each model moves to the GPU when it runs
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)


def _adapter(pipe, class_name: str, guidance: float, name: str | None, offloaded: bool, options: dict) -> Denoiser:
    """The denoiser class of ``class_name`` around ``pipe``; a bad option is a one-line error."""
    try:
        if class_name in FLOW_FAMILIES:
            return FlowPipelineDenoiser(pipe, guidance=guidance, name=name, offloaded=offloaded, **options)
        if offloaded:
            raise NoiseSearchError(f"the {class_name} is under model CPU offload, which applies to flow pipelines only")
        if class_name in UNCONDITIONAL_PIPELINES:
            return UnconditionalPipelineDenoiser(pipe, guidance=guidance, name=name, **options)
        return DiffusersDenoiser(pipe, guidance=guidance, name=name, **options)
    except TypeError as e:
        raise NoiseSearchError(f"bad option for a {class_name}: {e}") from e


# ---- denoiser objects ------------------------------------------------------------------------------


def is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers pipeline (checked by class name: diffusers is not imported)."""
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


def _same_device(want, have) -> bool:
    want, have = torch.device(want), torch.device(have)
    return want.type == have.type and (want.index is None or have.index is None or want.index == have.index)


def adapt_denoiser(d, device=None, guidance: float | None = None, options: dict | None = None) -> Denoiser:
    """A denoiser object with ``guidance`` / ``device`` applied (through its ``with_settings`` where
    it has one) or refused in one line when it differs from the object's own; never ignored."""
    missing = [m for m in DENOISER_MEMBERS if not _has_static(d, m)]
    if missing:
        raise NoiseSearchError(
            f"a {type(d).__name__} object is not a denoiser (no {', '.join(missing)}): pass a model name, a folder, "
            "a diffusers pipeline object or an object with the noisesearch.models.Denoiser members"
        )
    if options:
        raise NoiseSearchError(
            f"model options ({', '.join(sorted(options))}) apply to names, folders and pipeline objects; "
            f"configure the {type(d).__name__} object itself"
        )
    own_guidance = getattr(d, "guidance", None)
    change_guidance = guidance is not None and not _same_guidance(guidance, own_guidance)
    own_device = getattr(d, "device", None)
    change_device = device is not None and own_device is not None and not _same_device(device, own_device)
    if not (change_guidance or change_device):
        return d
    if hasattr(d, "with_settings"):
        return d.with_settings(guidance=guidance if change_guidance else None, device=device if change_device else None)
    what = (f"guidance {guidance:g} (it has {'none' if own_guidance is None else f'{own_guidance:g}'})" if change_guidance
            else f"device {device} (it is on {own_device})")
    raise NoiseSearchError(f"the {type(d).__name__} object cannot change to {what}: build it that way, or leave the argument out")


def _same_guidance(guidance: float, own) -> bool:
    if own is None:  # a denoiser without guidance is the plain conditional one
        return float(guidance) == 1.0
    return float(guidance) == float(own)


def _has_static(obj, name: str) -> bool:
    """``hasattr`` that does not evaluate properties (some count FLOPs when read)."""
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        return False


__all__ = ["load_model", "load_diffusers", "denoiser_from_pipeline", "adapt_denoiser", "is_pipeline", "BUILTIN_MODELS", "SUPPORTED_PIPELINES", "SD_PIPELINES",
           "FLOW_PIPELINES", "UNCONDITIONAL_PIPELINES"]
