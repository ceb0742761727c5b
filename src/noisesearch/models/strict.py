"""Strict loading: a model matches its weights exactly, or a one-line ``NoiseSearchError`` names the
file and what differs. Nothing loads "mostly".

* ``check_state`` compares the tensors a network expects with those a file holds (names and shapes):
  missing, unexpected and mis-shaped tensors are errors (used for the digits nets).
* Pipeline folders (``load_pipeline_components``): every network of ``model_index.json`` is checked
  before it is built (its ``config.json`` readable, sizes in range, and the network the config
  describes, built on ``meta``, no larger than its safetensors files hold), then loaded with the
  library's own loading report (``output_loading_info``), whose missing / unexpected / mis-shaped
  tensors are errors. Only safetensors files are read (no pickled ``.bin`` weights).
* ``check_tokenizers``: each tokenizer a pipeline needs is present and plausible: its vocabulary
  fits the text tower's embedding (and fills at least ``MIN_VOCAB_FILL`` of it), and a CLIP
  tokenizer's length limit fits the tower's positions.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from noisesearch.errors import NoiseSearchError

MODEL_LIBRARIES = ("diffusers", "transformers")
WEIGHTS_BASENAME = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
MIN_VOCAB_FILL = 0.9  # a tokenizer covers at least this share of its text tower's vocabulary
MAX_CONFIG_INT = 1 << 24  # any size in a config (vocabularies and positions included)
MAX_CONFIG_COUNT = 4096  # layers, blocks and heads
_SIZE_KEY = re.compile(r"(^|_)(num|size|sizes|dim|dims|channels|layers|heads|len|lens|length|vocab|embeddings|features)($|_)")
_COUNT_KEY = re.compile(r"(layers|heads|blocks)")
_SHOW = 3  # names listed per kind of difference


# ---- comparing tensors ------------------------------------------------------------------------------


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOW]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def differences(missing=(), unexpected=(), mismatched=()) -> str:
    """``2 missing (a, b); 1 unexpected (c); 1 mis-shaped (d: file [3, 4], network [3, 5])`` or ''."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        shown = [f"{k}: file {list(a)}, network {list(b)}" for k, a, b in sorted(mismatched)[:_SHOW]]
        more = f", ... ({len(mismatched)} in all)" if len(mismatched) > _SHOW else ""
        parts.append(f"{len(mismatched)} mis-shaped ({'; '.join(shown)}{more})")
    return "; ".join(parts)


def check_state(expected: dict[str, tuple], found: dict[str, tuple], where, hint: str = "") -> None:
    """Raise if the tensor names / shapes ``found`` in a file differ from those ``expected``."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    mismatched = [(k, tuple(found[k]), tuple(expected[k])) for k in set(expected) & set(found)
                  if tuple(found[k]) != tuple(expected[k])]
    diff = differences(missing, unexpected, mismatched)
    if diff:
        raise NoiseSearchError(f"the weights in {where} do not match the network: tensors {diff}{'; ' + hint if hint else ''}")


def state_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """Names and shapes of ``module.state_dict()``, without the aliases of tied parameters."""
    seen, out = set(), {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = tuple(t.shape)
    return out


def safetensors_shapes(paths) -> dict[str, tuple]:
    """Names and shapes of the tensors in safetensors files (headers only; nothing is loaded)."""
    out = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    out[k] = tuple(f.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise NoiseSearchError(f"cannot load {path}: not a readable safetensors file ({e})") from None
    return out


@contextmanager
def quiet_libraries():
    """diffusers' and transformers' loading tables and notices off (their reports become our errors)."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # their "Loading pipeline components / weights" bars too (the libraries are imported by the caller)
    bars = [m for m in (sys.modules.get(f"{lib}.utils.logging") for lib in ("diffusers", "transformers"))
            if m is not None and m.is_progress_bar_enabled()]
    for m in bars:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        for m in bars:
            m.enable_progress_bar()


# ---- pipeline folders: before building ---------------------------------------------------------------


def check_config_numbers(config: dict, where) -> None:
    """Sizes in a config are whole numbers in range (negative, absurd or non-integer sizes refused)."""
    for key, value in config.items():
        if isinstance(value, dict):  # nested configs (e.g. a text_config)
            check_config_numbers(value, where)
            continue
        if key.startswith("_") or not _SIZE_KEY.search(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):  # sizes are whole numbers (factors are floats)
                continue
            top = MAX_CONFIG_COUNT if _COUNT_KEY.search(key) and not key.endswith(("_dim", "_size")) else MAX_CONFIG_INT
            if not 0 <= v <= top:
                raise NoiseSearchError(f"{where}: {key} = {value} is out of range (sizes are from 0 to {top})")


def weight_files(comp_dir: Path, library: str, variant: str | None) -> list[Path]:
    """The safetensors files the library reads for this component (a single file or the shards of an index)."""
    base = WEIGHTS_BASENAME[library]
    index = comp_dir / (f"{base}.safetensors.index.{variant}.json" if variant else f"{base}.safetensors.index.json")
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise NoiseSearchError(f"cannot load {index}: not a readable weights index ({e})") from None
        return [comp_dir / s for s in shards]
    single = comp_dir / (f"{base}.{variant}.safetensors" if variant else f"{base}.safetensors")
    if single.is_file():
        return [single]
    pickled = [f.name for f in comp_dir.glob("*.bin")] if comp_dir.is_dir() else []
    extra = f" (pickled {', '.join(pickled)} are not loaded: convert them to safetensors)" if pickled else ""
    raise NoiseSearchError(f"cannot load {comp_dir}: no {single.name}{extra}")


def model_class(library: str, class_name: str):
    """The network class of a ``model_index.json`` entry, or None for tokenizers, schedulers, ..."""
    try:
        lib = importlib.import_module(library)  # deferred: diffusers / transformers are optional and heavy
        cls = getattr(lib, class_name)
    except (ImportError, AttributeError):
        return None
    bases = {c.__name__ for c in cls.__mro__}
    return cls if bases & {"ModelMixin", "PreTrainedModel"} else None


def read_json_object(path: Path, where: str, not_json: str = "not JSON ({e})",
                     not_object: str = "not a JSON object") -> dict:
    """The JSON object in ``path``, or a one-line ``NoiseSearchError`` "``where``: ``not_json``" (``{e}``
    replaced by the reason) when it is unreadable or not JSON, "``where``: ``not_object``" when not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NoiseSearchError(f"{where}: {not_json.format(e=e)}") from None
    if not isinstance(value, dict):
        raise NoiseSearchError(f"{where}: {not_object}")
    return value


def _read_config(comp_dir: Path) -> dict:
    return read_json_object(comp_dir / "config.json", f"cannot load {comp_dir}",
                            "config.json is missing or not JSON ({e})", "config.json is not a JSON object")


def _meta_build(cls, comp_dir: Path, config: dict) -> torch.nn.Module:
    """The network ``config`` describes, on ``meta`` (no memory), or a one-line error."""
    try:
        with quiet_libraries(), torch.device("meta"):
            if hasattr(cls, "from_config"):  # diffusers ModelMixin
                return cls.from_config(config)
            return cls(cls.config_class.from_dict(config))
    except Exception as e:  # any library error: the config cannot build the network
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NoiseSearchError(f"cannot load {comp_dir}: its config.json does not build a {cls.__name__} ({first})") from None


def precheck_component(comp_dir: Path, library: str, cls, variant: str | None) -> None:
    """Before anything is built: the config is readable and in range, and the network it describes
    is no larger than the weights hold (so a config cannot make a loader allocate without bound)."""
    config = _read_config(comp_dir)
    check_config_numbers(config, comp_dir / "config.json")
    files = weight_files(comp_dir, library, variant)
    found = safetensors_shapes(files)
    expected = state_shapes(_meta_build(cls, comp_dir, config))
    n_expected = sum(math.prod(s) for s in expected.values())
    n_found = sum(math.prod(s) for s in found.values())
    if n_expected > n_found:
        missing = set(expected) - set(found)
        names = f" (missing: {_names(missing)})" if missing else ""
        raise NoiseSearchError(
            f"the weights in {files[0] if len(files) == 1 else comp_dir} do not match {comp_dir / 'config.json'}: the config "
            f"describes a {cls.__name__} of {n_expected:,} weights, the files hold {n_found:,}{names}"
        )


# ---- pipeline folders: loading with the libraries' reports ---------------------------------------------


def _mismatch_from_error(err: Exception) -> list[tuple[str, tuple, tuple]] | None:
    """diffusers raises on a mis-shaped tensor: ``... because KEY expected shape X, but got Y``."""
    m = re.search(r"because (\S+) expected shape torch\.Size\(\[([\d, ]*)\]\), but got torch\.Size\(\[([\d, ]*)\]\)", str(err))
    if not m:
        return None
    shape = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    return [(m.group(1), shape(m.group(3)), shape(m.group(2)))]


def _mismatched(info: dict) -> list[tuple[str, tuple, tuple]]:
    out = []
    for item in info.get("mismatched_keys") or ():
        if isinstance(item, (tuple, list)) and len(item) == 3:
            out.append((str(item[0]), tuple(item[1]), tuple(item[2])))
        else:
            out.append((str(item), (), ()))
    return out


def dtype_kwarg(library: str) -> str:
    """The name of the dtype argument of ``from_pretrained``: ``dtype`` where the library has moved
    to it (transformers 5, recent diffusers), ``torch_dtype`` before."""
    try:
        if library == "transformers":
            major = int(importlib.import_module("transformers").__version__.split(".")[0])
            return "dtype" if major >= 5 else "torch_dtype"
        deprecation_utils = importlib.import_module("diffusers.utils.deprecation_utils")  # deferred: optional
        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    except (ImportError, ValueError):
        return "torch_dtype"


def load_component(folder: Path, component: str, library: str, cls, variant: str | None, dtype: torch.dtype):
    """One network of a pipeline folder, loaded with its library's report; any difference is an error."""
    comp_dir = folder / component
    kw = dict(subfolder=component, output_loading_info=True, use_safetensors=True, **{dtype_kwarg(library): dtype})
    if variant is not None:
        kw["variant"] = variant
    if library == "transformers":
        kw["ignore_mismatched_sizes"] = True  # report them instead of raising with a table on stderr
    try:
        with quiet_libraries():
            model, info = cls.from_pretrained(str(folder), **kw)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as e:
        mismatched = _mismatch_from_error(e)
        if mismatched:
            raise NoiseSearchError(f"the weights in {comp_dir} do not match its config.json: tensors {differences(mismatched=mismatched)}") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NoiseSearchError(f"cannot load {comp_dir} ({type(e).__name__}: {first})") from None
    diff = differences(info.get("missing_keys") or (), info.get("unexpected_keys") or (), _mismatched(info))
    if diff or info.get("error_msgs"):
        raise NoiseSearchError(f"the weights in {comp_dir} do not match its config.json: tensors {diff or info['error_msgs'][0]}")
    return model


def load_pipeline_components(folder, model_index: dict, variant: str | None, dtype: torch.dtype) -> dict:
    """Every network of a pipeline folder, each checked before it is built and loaded strictly."""
    folder = Path(folder)
    out = {}
    for component, entry in model_index.items():
        if component.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
            continue
        library, class_name = entry
        cls = model_class(library, class_name) if library in MODEL_LIBRARIES else None
        if cls is None:  # tokenizers, schedulers, processors: the pipeline loads them (see check_tokenizers)
            for path in (folder / component).glob("scheduler_config.json"):
                precheck_config_file(path)
            continue
        if not (folder / component).is_dir():
            raise NoiseSearchError(f"cannot load {folder}: model_index.json names {component} ({class_name}) but there is no folder {component}")
        precheck_component(folder / component, library, cls, variant)
        out[component] = load_component(folder, component, library, cls, variant, dtype)
    return out


def precheck_config_file(path: Path) -> None:
    """A scheduler's (or processor's) config: readable, sizes in range; a scheduler's training
    timesteps from 1 to 100000 (they size its tables, built when the pipeline loads), its betas in (0, 1)."""
    config = read_json_object(path, f"cannot load {path}")
    check_config_numbers(config, path)
    n = config.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100_000:
        raise NoiseSearchError(f"{path}: num_train_timesteps = {n!r} is out of range (1 to 100000)")
    for key in ("beta_start", "beta_end"):  # a DDPM-style beta schedule: each beta is a variance in (0, 1)
        b = config.get(key)
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1):
            raise NoiseSearchError(f"{path}: {key} = {b!r} is out of range (a variance between 0 and 1)")


# ---- tokenizers -------------------------------------------------------------------------------------


def check_tokenizers(pipe, where, is_folder: bool = True) -> None:
    """Each (tokenizer, text encoder) pair of the pipeline: the tokenizer is there, its vocabulary
    fits the encoder's embedding and fills at least ``MIN_VOCAB_FILL`` of it (a tokenizer rebuilt
    from missing files has a handful of tokens), and a CLIP tokenizer pads within the positions.
    ``where``: the pipeline's folder, or (``is_folder=False``) words naming a pipeline object."""
    for suffix in ("", "_2", "_3"):
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if encoder is None:
            continue
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        folder = os.path.join(str(where), f"tokenizer{suffix}") if is_folder else f"tokenizer{suffix} of {where}"
        if tokenizer is None:
            raise NoiseSearchError(f"cannot load {where}: text_encoder{suffix} has no tokenizer{suffix}")
        vocab = int(getattr(encoder.config, "vocab_size", 0) or 0)
        n = len(tokenizer)
        if vocab and not MIN_VOCAB_FILL * vocab <= n <= vocab:
            raise NoiseSearchError(
                f"the tokenizer in {folder} does not fit text_encoder{suffix}: {n} tokens for an embedding of {vocab} "
                "(missing or wrong tokenizer files?)"
            )
        positions = getattr(encoder.config, "max_position_embeddings", None)
        if type(encoder).__name__.startswith("CLIP") and positions and tokenizer.model_max_length > positions:
            raise NoiseSearchError(
                f"the tokenizer in {folder} pads to {tokenizer.model_max_length} tokens but text_encoder{suffix} has "
                f"{positions} positions (model_max_length missing from tokenizer_config.json?)"
            )


__all__ = ["check_state", "state_shapes", "safetensors_shapes", "differences", "check_config_numbers", "weight_files",
           "precheck_component", "load_component", "load_pipeline_components", "precheck_config_file", "check_tokenizers",
           "dtype_kwarg", "quiet_libraries", "read_json_object", "MIN_VOCAB_FILL"]
