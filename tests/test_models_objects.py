"""``load_model`` on objects: loaded diffusers pipelines of every supported family (options applied as
for a folder), unconditional DDPM / DDIM pipelines, denoiser objects (guidance / device applied or
refused), ``galaxygrad:`` dispatch and ``describe_denoiser``."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.models import describe_denoiser, load_model  # noqa: E402
from noisesearch.models.toy import PointMixtureDenoiser  # noqa: E402
from noisesearch.noise import NoiseSource  # noqa: E402
from noisesearch.sampling.samplers import EulerAncestral  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (fixture, options that differ from the defaults)
FAMILIES = {
    "sd": ("tiny_sd_dir", {"height": 24, "width": 16, "negative_prompt": "blurry", "default_steps": 7}),
    "sdxl": ("tiny_sdxl_dir", {"height": 24, "width": 16, "negative_prompt": "blurry"}),
    "flux": ("tiny_flux_dir", {"height": 16, "width": 32, "embedded_guidance": 2.0, "max_sequence_length": 8}),
    "flux-schnell": ("tiny_flux_schnell_dir", {"height": 16, "width": 16, "negative_prompt": "blurry"}),
    "sd3": ("tiny_sd3_dir", {"height": 16, "width": 32, "negative_prompt": "blurry"}),
    "lumina2": ("tiny_lumina2_dir", {"height": 32, "width": 32}),
}


def _from_pretrained(directory):
    import diffusers

    cls = diffusers.DiffusionPipeline.load_config(directory)["_class_name"]
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls == "StableDiffusionPipeline" else {}
    pipe = getattr(diffusers, cls).from_pretrained(directory, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.filterwarnings("ignore:.*timestep-distilled")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_object_is_the_folder(family, request):
    """A loaded pipeline object and its folder give the same denoiser for the same options."""
    fixture, options = FAMILIES[family]
    directory = request.getfixturevalue(fixture)
    pipe = _from_pretrained(directory)
    by_folder = load_model(directory, guidance=2.0, **options)
    by_object = load_model(pipe, guidance=2.0, **options)
    assert type(by_object) is type(by_folder) and by_object.pipe is pipe
    for key in ("sample_shape", "height", "width", "negative_prompt", "default_steps", "sigma_min", "sigma_max"):
        assert getattr(by_object, key) == getattr(by_folder, key), key
    x = torch.randn((2, *by_folder.sample_shape), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0, 0.5])
    prompts = ["a red cat", "a dog"]
    a = by_folder(x, sigma, by_folder.encode(prompts))
    b = by_object(x, sigma, by_object.encode(prompts))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    info = describe_denoiser(by_object)
    assert info["guidance"] == 2.0 and info["conditional"] is True and info["pipeline"] == type(pipe).__name__
    assert info["family"] in ("sd", "sdxl", "flux", "sd3", "lumina2") and info["dtype"] == "float32"


def test_pipeline_object_options_move_the_pipeline(tiny_flux_dir):
    pipe = _from_pretrained(tiny_flux_dir)
    d = load_model(pipe, dtype="bfloat16", device="cpu", height=32, width=32)
    assert pipe.transformer.dtype == torch.bfloat16 and d.model_dtype == torch.bfloat16
    assert describe_denoiser(d)["dtype"] == "bfloat16"
    with pytest.raises(NoiseSearchError, match="variant"):
        load_model(pipe, variant="fp16")
    with pytest.raises(NoiseSearchError, match="bad option"):
        load_model(pipe, not_an_option=1)
    with pytest.raises(NoiseSearchError, match="multiples of 4"):
        load_model(pipe, height=30)


def test_unsupported_pipeline_object():
    from diffusers import DiffusionPipeline

    pipe = type("MyPipeline", (DiffusionPipeline,), {})()
    with pytest.raises(NoiseSearchError, match="MyPipeline.*supported:.*FluxPipeline.*DDPMPipeline"):
        load_model(pipe)


# ---- unconditional DDPM / DDIM ------------------------------------------------------------------


def tiny_unconditional_pipeline(kind: str = "ddim", prediction_type: str = "epsilon", seed: int = 0):
    """A random DDIMPipeline / DDPMPipeline on 3x16x16 images (UNet2DModel with two levels)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    if kind == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False, prediction_type=prediction_type))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=False, prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_object_reproduces_the_pipeline(prediction_type):
    """Deterministic Euler on the pipeline's own sigmas is DDIM (eta = 0), for every prediction type."""
    pipe = tiny_unconditional_pipeline("ddim", prediction_type)
    d = load_model(pipe)
    assert d.conditional is False and d.guidance is None and d.sample_shape == (3, 16, 16)
    steps, n = 6, 2
    sigmas = d.pipeline_sigmas(steps)
    ref = pipe(batch_size=n, generator=torch.Generator().manual_seed(3), eta=0.0, num_inference_steps=steps,
               output_type="np").images
    start = torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(3))  # the pipeline's x_T
    s0 = float(sigmas[0])
    noise = start * (1 + s0**2) ** 0.5 / s0  # our state sigma_0 * noise is x_T / sqrt(alpha_T)
    sampler = EulerAncestral(d, eta=0.0, sigmas=sigmas)
    state = sampler.rollout(sampler.start(d.encode([""] * n), noise), NoiseSource(0, d.sample_shape, [(i, 0) for i in range(n)]))
    ours = d.decode(state.x).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-4


def test_ddpm_object_and_folder(tmp_path):
    pipe = tiny_unconditional_pipeline("ddpm")
    d = load_model(pipe, height=32, width=32, default_steps=5)
    assert d.sample_shape == (3, 32, 32) and d.default_steps == 5 and d.flops_per_decode == 0
    assert d.encode(["", "anything"]) is None  # prompts only count the samples
    assert d.flops_per_call > 0
    x0 = d(torch.randn(2, 3, 32, 32) * 5, torch.tensor([5.0, 5.0]), None)
    assert x0.shape == (2, 3, 32, 32) and torch.isfinite(x0).all()
    img = d.decode(x0)
    assert img.min() >= 0 and img.max() <= 1
    info = describe_denoiser(d)
    assert info["conditional"] is False and info["family"] == "ddpm" and info["parametrisation"] == "discrete VP, epsilon"
    for g in (0, 1, None):
        load_model(pipe, guidance=g)
    with pytest.raises(NoiseSearchError, match="no classifier-free guidance"):
        load_model(pipe, guidance=3.0)
    pipe.save_pretrained(tmp_path / "ddpm")
    d2 = load_model(str(tmp_path / "ddpm"))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(d2(x, torch.tensor([1.0]), None), load_model(pipe)(x, torch.tensor([1.0]), None))
    with pytest.raises(NoiseSearchError, match="offload applies to flow"):
        load_model(pipe, offload=True, device="cuda")
    with pytest.raises(NoiseSearchError, match="offload applies to flow"):
        load_model(str(tmp_path / "ddpm"), offload=True, device="cuda")


# ---- denoiser objects -------------------------------------------------------------------------------


def test_denoiser_object_guidance_applied_or_refused(tiny_sd_dir):
    d = load_model(tiny_sd_dir, guidance=1.0)
    assert load_model(d) is d and load_model(d, guidance=1.0, device="cpu") is d
    d3 = load_model(d, guidance=3.0)
    assert d3.guidance == 3.0 and d.guidance == 1.0 and d3.pipe is d.pipe
    assert d3.flops_per_call == pytest.approx(2 * d.flops_per_call, rel=0.05)  # two branches now
    assert set(d3.encode(["a cat"])) == {"cond", "uncond"}
    with pytest.raises(NoiseSearchError, match="runs where its pipeline is"):
        load_model(d, device="meta")
    with pytest.raises(NoiseSearchError, match="model options"):
        load_model(d, height=32)

    digits = load_model("digits", guidance=1.0)
    assert load_model(digits, guidance=2.5).guidance == 2.5 and digits.guidance == 1.0

    toy = PointMixtureDenoiser(torch.randn(3, 1, 2, 2))
    assert load_model(toy) is toy and load_model(toy, guidance=1.0, device="cpu") is toy
    with pytest.raises(NoiseSearchError, match="cannot change to guidance 3 .it has none"):
        load_model(toy, guidance=3.0)
    with pytest.raises(NoiseSearchError, match="cannot change to device meta"):
        load_model(toy, device="meta")


@pytest.mark.parametrize("obj", [42, print, object()])
def test_not_a_denoiser(obj):
    with pytest.raises(NoiseSearchError, match="is not a denoiser"):
        load_model(obj)


def test_galaxygrad_dispatch(monkeypatch):
    calls = []

    def load_galaxygrad(name, device="cpu", guidance=1.0):
        calls.append((name, device, guidance))
        return "a galaxy denoiser"

    monkeypatch.setattr("noisesearch.models.load.load_galaxygrad", load_galaxygrad)
    assert load_model("galaxygrad:hsc32", device="cpu", guidance=0) == "a galaxy denoiser"
    assert calls == [("hsc32", "cpu", 0)]
    with pytest.raises(NoiseSearchError, match="bad option for galaxygrad:hsc32"):
        load_model("galaxygrad:hsc32", height=64)


def test_describe_any_object():
    info = describe_denoiser(object())
    assert info == {"class": "object", "name": None, "family": None, "parametrisation": None, "guidance": None,
                    "dtype": None, "device": None, "conditional": True}
    info = describe_denoiser(load_model("digits", guidance=2.0))
    assert info["class"] == "DigitsDenoiser" and info["guidance"] == 2.0 and info["device"] == "cpu"
    assert info["parametrisation"].startswith("EDM")


def test_pipeline_object_with_a_wrong_tokenizer(tiny_flux_dir):
    pipe = _from_pretrained(tiny_flux_dir)
    pipe.tokenizer_2 = pipe.tokenizer  # CLIP's vocabulary for the T5 tower
    with pytest.raises(NoiseSearchError, match="tokenizer_2 of the FluxPipeline object does not fit text_encoder_2"):
        load_model(pipe)


def test_offload_needs_cuda(tiny_flux_dir):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(NoiseSearchError, match="needs a CUDA device"):
        load_model(tiny_flux_dir, offload=True, device="cuda")
    pipe = _from_pretrained(tiny_flux_dir)
    with pytest.raises(NoiseSearchError, match="needs a CUDA device"):
        load_model(pipe, offload=True)
    assert getattr(pipe, "_offload_device", None) is None  # refused before the pipeline was touched
