"""Strict loading (issue 20): pipeline folders whose weights, configs or tokenizers do not match are a
one-line NoiseSearchError naming the file and what differs, before anything is built; image sizes
have a range whose largest value works; the digits nets match their files exactly."""
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.models import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _broken(src, tmp_path, component, filename, change):
    """A copy of the pipeline folder ``src`` with ``component/filename`` changed by ``change``."""
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    path = dst / component / filename
    if change in (remove, _pickled_only):
        change(path)
    elif filename.endswith(".json"):
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    elif filename.endswith(".safetensors"):
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return str(dst)


def drop_first(t):
    t.pop(sorted(t)[0])


def add_extra(t):
    t["extra.weight"] = torch.zeros(3)


def grow_first_matrix(t):
    k = next(k for k in sorted(t) if t[k].ndim == 2)
    t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _set(key, value):
    def change(config):
        config[key] = value

    change.__name__ = f"{key}={value}"
    return change


def _pickled_only(path):
    """Replace the safetensors weights by a pickled .bin file (never loaded)."""
    torch.save(load_file(path), path.with_name("pytorch_model.bin"))
    path.unlink()


SD_CASES = [
    ("unet", "diffusion_pytorch_model.safetensors", drop_first, r"unet.*UNet2DConditionModel of [\d,]+ weights, the files hold .*missing: conv_in.bias"),
    ("unet", "diffusion_pytorch_model.safetensors", add_extra, r"unet do not match its config.json: tensors 1 unexpected \(extra.weight\)"),
    ("unet", "diffusion_pytorch_model.safetensors", grow_first_matrix, r"unet do not match .*1 mis-shaped \(.*: file \[17, 64\], network \[16, 64\]\)"),
    ("text_encoder", "model.safetensors", drop_first, r"text_encoder.*CLIPTextModel of .* weights, the files hold"),
    ("text_encoder", "model.safetensors", add_extra, r"text_encoder do not match .*1 unexpected \(extra.weight\)"),
    ("text_encoder", "model.safetensors", grow_first_matrix, r"text_encoder do not match .*mis-shaped .*file \[17, 32\], network \[16, 32\]"),
    ("text_encoder", "config.json", _set("num_hidden_layers", 3), r"text_encoder/config.json: the config describes"),
    ("text_encoder", "config.json", _set("num_hidden_layers", -4), r"num_hidden_layers = -4 is out of range"),
    ("text_encoder", "config.json", _set("num_hidden_layers", 0), r"text_encoder do not match .*32 unexpected"),
    ("text_encoder", "config.json", _set("intermediate_size", 10**7), r"describes a CLIPTextModel of 1,300,026,368 weights"),
    ("text_encoder", "config.json", _set("hidden_size", 10**12), r"hidden_size = 1000000000000 is out of range"),
    ("unet", "config.json", _set("block_out_channels", [16, 64]), r"unet/config.json: the config describes"),
    ("text_encoder", "config.json", remove, r"text_encoder: config.json is missing or not JSON"),
    ("unet", "diffusion_pytorch_model.safetensors", remove, r"cannot load .*unet: no diffusion_pytorch_model.safetensors"),
    ("unet", "diffusion_pytorch_model.safetensors", _pickled_only, r"pickled pytorch_model.bin are not loaded"),
    ("tokenizer", "tokenizer.json", remove, r"tokenizer does not fit text_encoder: 2 tokens for an embedding of \d+"),
    ("tokenizer", "", remove, r"tokenizer does not fit text_encoder: 2 tokens"),
    ("tokenizer", "tokenizer_config.json", remove, r"tokenizer pads to \d+ tokens but text_encoder has 16 positions"),
    ("scheduler", "scheduler_config.json", _set("num_train_timesteps", 10**12), r"num_train_timesteps = 1000000000000 is out of range"),
    ("scheduler", "scheduler_config.json", _set("beta_end", -1), r"beta_end = -1 is out of range"),
]


@pytest.mark.parametrize("component,filename,change,message", SD_CASES,
                         ids=[f"{c[0]}-{c[2].__name__}" for c in SD_CASES])
def test_broken_sd_folder_is_refused_in_one_line(tiny_sd_dir, tmp_path, component, filename, change, message):
    broken = _broken(tiny_sd_dir, tmp_path, component, filename, change)
    with pytest.raises(NoiseSearchError, match=message) as e:
        load_model(broken)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_component_folder_missing(tiny_sd_dir, tmp_path):
    broken = _broken(tiny_sd_dir, tmp_path, "vae", "", remove)
    with pytest.raises(NoiseSearchError, match="model_index.json names vae .AutoencoderKL. but there is no folder vae"):
        load_model(broken)


@pytest.mark.parametrize("component,filename,message", [
    ("transformer", "diffusion_pytorch_model.safetensors", "transformer.*FluxTransformer2DModel of"),
    ("text_encoder_2", "model.safetensors", "text_encoder_2.*T5EncoderModel of"),  # the tied embedding counts once
])
def test_broken_flux_folder(tiny_flux_dir, tmp_path, component, filename, message):
    with pytest.raises(NoiseSearchError, match=message):
        load_model(_broken(tiny_flux_dir, tmp_path, component, filename, drop_first))


def test_intact_folders_load(tiny_flux_dir, tiny_sdxl_dir):
    """The checks pass on every tensor of a folder written by save_pretrained (tied T5 weights included)."""
    assert load_model(tiny_flux_dir, height=32, width=32).sample_shape == (4, 16, 16)
    assert load_model(tiny_sdxl_dir).sample_shape == (4, 8, 8)


# ---- image sizes: a range whose largest value works -----------------------------------------------------


@pytest.fixture
def flux_small(tmp_path):
    """The tiny FLUX with a scheduler calibrated on 64 tokens: largest side 16 tokens (64 px), fast to run."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(tmp_path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=16, max_image_seq_len=64)
    return pipe


def _largest_works(d):
    sig = d.schedule_sigmas(4) if hasattr(d, "schedule_sigmas") else d.pipeline_sigmas(4)
    finite = sig[1:] if math.isinf(float(sig[0])) else sig
    assert torch.isfinite(finite).all() and (finite[:-1] > finite[1:]).all()
    cond = d.encode(["a red cat"])
    s = float(finite[0])
    x0 = d(torch.randn(1, *d.sample_shape) * s, torch.tensor([s]), cond)
    assert x0.shape == (1, *d.sample_shape) and torch.isfinite(x0).all()


def test_flux_sizes(flux_small, tiny_flux_dir):
    d = load_model(flux_small, height=64, width=64)  # the largest accepted: 16 x 16 tokens = 4 x max_image_seq_len
    _largest_works(d)
    with pytest.raises(NoiseSearchError, match=r"^height and width must be multiples of 4 from 4 to 64 for FluxPipeline, got 68x64$"):
        load_model(flux_small, height=68, width=64)
    with pytest.raises(NoiseSearchError, match="from 4 to 512 for FluxPipeline, got 16384x16384"):
        load_model(tiny_flux_dir, height=16384, width=16384)  # an OverflowError traceback before
    for bad in (0, -16, 31.5, "32", True):
        with pytest.raises(NoiseSearchError, match="height"):
            load_model(flux_small, height=bad)


@pytest.mark.parametrize("fixture,top,multiple", [("tiny_sd_dir", 64, 2), ("tiny_sdxl_dir", 64, 2), ("tiny_sd3_dir", 64, 4),
                                                  ("tiny_lumina2_dir", 256, 16)])
def test_largest_size_works(fixture, top, multiple, request):
    directory = request.getfixturevalue(fixture)
    _largest_works(load_model(directory, guidance=2.0, height=top, width=multiple))
    _largest_works(load_model(directory, guidance=2.0, height=multiple, width=top))
    with pytest.raises(NoiseSearchError, match=f"from {multiple} to {top} for"):
        load_model(directory, height=top + multiple)


def test_real_flux_config_range():
    """FLUX.1's scheduler (max_image_seq_len 4096, VAE factor 8 and 2x2 packing): 2048 px a side at most."""
    from noisesearch.models.flow import FluxFamily

    class Pipe:  # only what max_size reads
        class scheduler:
            config = {"max_image_seq_len": 4096}

        class vae:
            class config:
                block_out_channels = [128, 256, 512, 512]

    fam = FluxFamily.__new__(FluxFamily)
    fam.pipe = Pipe
    assert fam.max_size() == 2048


@pytest.mark.parametrize("msl,ok", [(512, True), (513, False), (0, False)])
def test_max_sequence_length_range(tiny_flux_dir, msl, ok):
    if ok:
        assert load_model(tiny_flux_dir, max_sequence_length=msl).family.msl() == msl
    else:
        with pytest.raises(NoiseSearchError, match="max_sequence_length"):
            load_model(tiny_flux_dir, max_sequence_length=msl)


# ---- digits nets -----------------------------------------------------------------------------------------


def _digits_file(tmp_path, change_tensors=None, change_config=None):
    from noisesearch.models.digits import DENOISER_FILE, WEIGHTS_DIR, load_weights, save_weights

    tensors, config, flops = load_weights(WEIGHTS_DIR / DENOISER_FILE, "digits_denoiser")
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    path = tmp_path / "den.safetensors"
    save_weights(path, tensors, "digits_denoiser", config, flops)
    return path


@pytest.mark.parametrize("tensors,config,message", [
    (drop_first, None, r"tensors 1 missing \("),
    (add_extra, None, r"tensors 1 unexpected \(extra.weight\)"),
    (grow_first_matrix, None, r"1 mis-shaped \(.*: file \[\d+, \d+\], network \[\d+, \d+\]\)"),
    (None, _set("ch", 10**5), r"mis-shaped"),  # refused before anything is allocated
    (None, _set("ch", 10**9), r"config that builds no network"),
    (None, _set("ch", -3), r"config that builds no network"),
    (None, _set("depth", 3), r"config that builds no network"),
])
def test_digits_weights_must_match(tmp_path, tensors, config, message):
    from noisesearch.models.digits import DigitsDenoiser

    path = _digits_file(tmp_path, tensors, config)
    with pytest.raises(NoiseSearchError, match=message) as e:
        DigitsDenoiser(weights=path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_known_legacy_layouts_still_load(tiny_sd_dir, tmp_path):
    """What real checkpoints hold and the libraries convert or ignore is not an error: old VAE attention
    names (query / key / value / proj_attn) and CLIP's stored position_ids."""
    def legacy_names(t):
        for k in list(t):
            new = k
            for a, b in {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}.items():
                new = new.replace(a, b)
            t[new] = t.pop(k)

    folder = _broken(tiny_sd_dir, tmp_path, "vae", "diffusion_pytorch_model.safetensors", legacy_names)
    text = tmp_path / "broken" / "text_encoder" / "model.safetensors"
    tensors = load_file(text)
    tensors["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(tensors, text)
    d = load_model(folder)
    ref = load_model(tiny_sd_dir)
    x0 = torch.randn(1, *d.sample_shape)
    torch.testing.assert_close(d.decode(x0), ref.decode(x0))


@pytest.mark.parametrize("option,value,message", [
    ("dtype", "int8", "unsupported dtype"), ("dtype", "float99", "unsupported dtype"),
    ("default_steps", 0, "default_steps must be a whole number from 1"), ("decode_batch", -1, "decode_batch"),
    ("default_steps", 2.5, "default_steps"), ("guidance", float("nan"), "guidance"), ("guidance", -1, "guidance"),
])
def test_options_out_of_range(tiny_sd_dir, option, value, message):
    with pytest.raises(NoiseSearchError, match=message):
        load_model(tiny_sd_dir, **{option: value})
