"""DiffusersDenoiser on tiny random SD / SDXL pipelines saved to disk (no downloads).

The central check: Euler (EulerAncestral, eta=0) on the pipeline scheduler's own sigmas reproduces
the pipeline's output for the same initial noise, for every guidance regime and for eps- and
v-prediction.
"""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from noisesearch.budget import Budget  # noqa: E402
from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.models import cond_index, cond_repeat, load_model  # noqa: E402
from noisesearch.models.sd import DiffusersDenoiser  # noqa: E402
from noisesearch.noise import NoiseSource  # noqa: E402
from noisesearch.sampling.samplers import EulerAncestral  # noqa: E402

PROMPTS = ["a photo of a cat", "a red dog"]
STEPS = 8
# Relative tolerance on final latents (max |diff| / max |latent|) and absolute tolerance on images.
# Measured on CPU float32: latents <= 9e-7 relative, images <= 9e-7 absolute (rounding of the input
# scaling and timesteps); the tolerances leave room for other BLAS back ends.
LATENT_RTOL = 1e-4
IMAGE_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def run_adapter(d, noise, prompts, steps=STEPS):
    """Deterministic Euler with the pipeline's sigmas; returns (final latents, sampler)."""
    sampler = EulerAncestral(d, eta=0.0, sigmas=d.pipeline_sigmas(steps))
    state = sampler.start(d.encode(prompts), noise)
    state = sampler.rollout(state, NoiseSource(0, d.sample_shape, [(i, 0) for i in range(len(prompts))]))
    return state.x, sampler


def run_pipeline(d, noise, prompts, guidance, steps=STEPS, output_type="latent", **kw):
    """The pipeline itself, started from the same x = sigma_0 * noise."""
    pipe = d.pipe
    sigma0 = float(d.pipeline_sigmas(steps)[0])
    pipe.scheduler.set_timesteps(steps)
    latents = noise * sigma0 / float(pipe.scheduler.init_noise_sigma)  # the pipeline multiplies it back
    if guidance == 0:  # diffusers has no "unconditional only": run the uncond prompt without CFG
        if "prompt_embeds" not in kw:
            prompts = [""] * len(prompts)
        guidance = 1.0
    out = pipe(
        None if "prompt_embeds" in kw else prompts,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type=output_type,
        **kw,
    )
    return out.images


def noise_for(d, n=2, seed=1):
    return torch.randn(n, *d.sample_shape, generator=torch.Generator().manual_seed(seed))


def assert_latents_close(ours, ref):
    scale = float(ref.abs().max())
    diff = float((ours - ref).abs().max())
    assert diff <= LATENT_RTOL * scale, f"max |diff| {diff:.3g} vs scale {scale:.3g}"


# ---- loading and properties ---------------------------------------------------------------------


def test_load_model_from_directory(tiny_sd_dir):
    d = load_model(tiny_sd_dir, guidance=3.0)
    assert isinstance(d, DiffusersDenoiser)
    assert d.sample_shape == (4, 8, 8)
    assert (d.height, d.width) == (16, 16)
    sched = d.pipe.scheduler
    sig = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
    assert d.sigma_min == pytest.approx(float(sig[0]), rel=1e-5)
    assert d.sigma_max == pytest.approx(float(sig[-1]), rel=1e-5)
    assert d.default_steps == 30 and d.dtype == torch.float32 and d.device.type == "cpu"
    assert d.name == tiny_sd_dir and d.prediction_type == "epsilon"
    d2 = load_model(tiny_sd_dir, guidance=1.0, height=32, width=24, default_steps=12)
    assert d2.sample_shape == (4, 16, 12) and d2.default_steps == 12
    x0 = d2(noise_for(d2, 1) * 3, torch.tensor([3.0]), d2.encode(["a cat"]))
    assert x0.shape == (1, 4, 16, 12)


def test_pipeline_sigmas_are_the_schedulers(tiny_sd_dir):
    d = load_model(tiny_sd_dir, guidance=1.0)
    sigmas = d.pipeline_sigmas(STEPS)
    sched = type(d.pipe.scheduler).from_config(d.pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    torch.testing.assert_close(sigmas, sched.sigmas.double())
    assert sigmas[-1] == 0 and len(sigmas) == STEPS + 1
    # our sigma -> timestep map lands on the scheduler's (fractional) timesteps
    t = d.schedule.sigma_to_t(sigmas[:-1])
    torch.testing.assert_close(t, sched.timesteps.double(), rtol=0, atol=1e-3)
    assert len(d.pipeline_sigmas()) == d.default_steps + 1


# ---- (a) agreement with the pipeline --------------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, 1.0, 4.0])
@pytest.mark.parametrize("which", ["eps", "v"])
def test_euler_matches_pipeline(which, guidance, tiny_sd_dir, tiny_sd_v_dir):
    d = load_model(tiny_sd_dir if which == "eps" else tiny_sd_v_dir, guidance=guidance)
    assert d.prediction_type == ("epsilon" if which == "eps" else "v_prediction")
    noise = noise_for(d)
    ours, _ = run_adapter(d, noise, PROMPTS)
    ref = run_pipeline(d, noise, PROMPTS, guidance)
    assert_latents_close(ours, ref)
    ref_images = run_pipeline(d, noise, PROMPTS, guidance, output_type="pt")
    torch.testing.assert_close(d.decode(ours), ref_images, rtol=0, atol=IMAGE_ATOL)


def test_guidance_changes_the_result(tiny_sd_dir):
    noise = None
    outs = []
    for g in (0.0, 1.0, 4.0):
        d = load_model(tiny_sd_dir, guidance=g)
        noise = noise_for(d) if noise is None else noise
        outs.append(run_adapter(d, noise, PROMPTS)[0])
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


# ---- (b) decoding -------------------------------------------------------------------------------------


def test_x0_estimates_decode_to_images(tiny_sd_dir):
    d = load_model(tiny_sd_dir, guidance=2.0, decode_batch=2)
    sampler = EulerAncestral(d, steps=4, eta=1.0)
    state = sampler.start(d.encode(PROMPTS + ["a cat"]), noise_for(d, 3))
    images = d.decode(state.x0)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert d.flops_per_decode > 0


# ---- (c) NFE and FLOP accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("guidance,max_batch", [(1.0, 512), (4.0, 512), (4.0, 2)])
def test_nfe_counting(tiny_sd_dir, guidance, max_batch):
    d = load_model(tiny_sd_dir, guidance=guidance)
    calls = []
    hook = d.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        n, steps = 3, 5
        sampler = EulerAncestral(d, steps=steps, eta=1.0, max_batch=max_batch)
        sampler.budget = Budget(num_searches=n, nfe=1000)
        state = sampler.start(d.encode(["a cat", "a dog", "a red cat"]), noise_for(d, n))
        sampler.rollout(state, NoiseSource(0, d.sample_shape, [(i, 0) for i in range(n)]))
    finally:
        hook.remove()
    branches = 1 if guidance == 1 else 2
    assert sampler.nfe_per_trajectory == steps
    assert sampler.budget.nfe.tolist() == [steps] * n  # one NFE per denoiser call per sample
    chunks = -(-n // max_batch)
    assert len(calls) == steps * chunks  # CFG branches share one batched UNet call
    assert sum(calls) == steps * n * branches


def test_flops_per_call_counts_cfg_branches(tiny_sd_dir):
    f1 = load_model(tiny_sd_dir, guidance=1.0).flops_per_call
    f0 = load_model(tiny_sd_dir, guidance=0.0).flops_per_call
    f4 = load_model(tiny_sd_dir, guidance=4.0).flops_per_call
    assert f1 > 0 and f0 == f1
    assert f4 == pytest.approx(2 * f1, rel=1e-9)


def test_cond_slicing_and_branches(tiny_sd_dir):
    d = load_model(tiny_sd_dir, guidance=4.0)
    cond = d.encode(PROMPTS)
    assert set(cond) == {"uncond", "cond"} and cond["cond"]["embeds"].shape[0] == 2
    rep = cond_repeat(cond, 3)
    assert rep["uncond"]["embeds"].shape[0] == 6
    one = cond_index(rep, torch.tensor([4]))
    torch.testing.assert_close(one["cond"]["embeds"], cond["cond"]["embeds"][1:2])
    assert set(load_model(tiny_sd_dir, guidance=0.0).encode(PROMPTS)) == {"uncond"}
    assert set(load_model(tiny_sd_dir, guidance=1.0).encode(PROMPTS)) == {"cond"}
    with pytest.raises(NoiseSearchError):  # a cond without the uncond branch cannot be guided
        d(noise_for(d), torch.ones(2), {"cond": cond["cond"]})


# ---- SDXL -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, 1.0, 4.0])
def test_sdxl_matches_pipeline(tiny_sdxl_dir, guidance):
    d = load_model(tiny_sdxl_dir, guidance=guidance)
    assert d.is_xl and d.sample_shape == (4, 8, 8)
    cond = d.encode(PROMPTS)
    branch = cond["uncond" if guidance == 0 else "cond"]
    assert branch["pooled"].shape == (2, 32) and branch["time_ids"].shape == (2, 6)
    noise = noise_for(d)
    ours, _ = run_adapter(d, noise, PROMPTS)
    kw = {}
    if guidance == 0:  # SDXL's unconditional branch is all-zero embeddings (force_zeros_for_empty_prompt)
        kw = dict(prompt_embeds=torch.zeros_like(cond["uncond"]["embeds"]),
                  pooled_prompt_embeds=torch.zeros_like(cond["uncond"]["pooled"]))
    ref = run_pipeline(d, noise, PROMPTS, guidance, **kw)
    assert_latents_close(ours, ref)
    if guidance == 4.0:
        ref_images = run_pipeline(d, noise, PROMPTS, guidance, output_type="pt")
        torch.testing.assert_close(d.decode(ours), ref_images, rtol=0, atol=IMAGE_ATOL)
        assert d.flops_per_call == pytest.approx(2 * load_model(tiny_sdxl_dir, guidance=1.0).flops_per_call)


# ---- errors ---------------------------------------------------------------------------------------------------


def test_not_a_pipeline_directory(tmp_path):
    with pytest.raises(NoiseSearchError, match="model_index.json"):
        load_model(str(tmp_path))


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "_diffusers_version": "0.30.0"}))
    with pytest.raises(NoiseSearchError, match="KandinskyPipeline.*supported"):
        load_model(str(tmp_path))


def test_missing_weights(tiny_sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    for f in os.listdir(broken / "unet"):
        if f.endswith((".safetensors", ".bin")):
            os.remove(broken / "unet" / f)
    with pytest.raises(NoiseSearchError, match="cannot load"):
        load_model(str(broken))


def test_hub_name_offline():
    with pytest.raises(NoiseSearchError, match="HF_HUB_OFFLINE"):
        load_model("noisesearch-tests/no-such-pipeline")


def test_bad_option(tiny_sd_dir):
    with pytest.raises(NoiseSearchError):
        load_model(tiny_sd_dir, no_such_option=1)
    with pytest.raises(NoiseSearchError):
        load_model(tiny_sd_dir, height=21)


@pytest.mark.parametrize(
    "scheduler,config",
    [
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
        ("DDIMScheduler", {}),
        ("PNDMScheduler", {"skip_prk_steps": True}),
        ("DPMSolverMultistepScheduler", {}),
    ],
)
def test_pipeline_sigmas_hit_the_pipeline_timesteps(tiny_sd_dir, scheduler, config):
    """With other schedulers, sampling on ``pipeline_sigmas`` evaluates the UNet at the scheduler's timesteps."""
    import diffusers

    d = load_model(tiny_sd_dir, guidance=1.0)
    pipe = d.pipe
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **config)
    d = DiffusersDenoiser(pipe, guidance=1.0)
    sigmas = d.pipeline_sigmas(STEPS)
    assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all() and (sigmas[:-1].diff() < 0).all()
    assert len(sigmas) == STEPS + 1
    sched = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    timesteps = list(dict.fromkeys(sched.timesteps.double().tolist()))  # distinct, in order
    torch.testing.assert_close(d.schedule.sigma_to_t(sigmas[:-1]), torch.tensor(timesteps, dtype=torch.float64), rtol=0, atol=2e-3)


def test_float16_weights_keep_float32_states(tiny_sdxl_dir):
    """Half-precision networks: states and x0 stay float32, SDXL decodes with a float32 VAE copy."""
    d = load_model(tiny_sdxl_dir, guidance=4.0, dtype="float16")
    assert d.model_dtype == torch.float16 and d.dtype == torch.float32
    assert d.decode_vae.dtype == torch.float32 and d.pipe.vae.dtype == torch.float16  # the pipeline is untouched
    sampler = EulerAncestral(d, steps=3)
    state = sampler.start(d.encode(PROMPTS), noise_for(d))
    state = sampler.rollout(state, NoiseSource(0, d.sample_shape, [(i, 0) for i in range(len(PROMPTS))]))
    images = d.decode(state.x)
    assert state.x.dtype == torch.float32 and torch.isfinite(images).all()
    with pytest.raises(NoiseSearchError, match="dtype"):
        load_model(tiny_sdxl_dir, dtype="float17")


def test_generate_cli_pipeline_options(tiny_sd_dir, tmp_path, capsys):
    import json

    import numpy as np

    from noisesearch.cli import main

    out = tmp_path / "run"
    argv = ["generate", "--model", tiny_sd_dir, "--prompt", "a cat", "--guidance", "2", "--steps", "4",
            "--height", "32", "--width", "24", "--dtype", "float32", "--negative-prompt", "blurry",
            "--reward", "brightness", "--strategy", "best-of-n", "--budget-nfe", "8", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model_options"] == {"height": "32", "width": "24", "dtype": "float32", "negative_prompt": "blurry"}
    assert np.load(out / "images.npy").shape == (1, 3, 32, 24)
    assert report["samples"][0]["nfe"] == 8  # best-of-2 with CFG: 2 x 4 steps (both branches in one call)
    # the negative prompt is used: another one gives another image from the same seed
    argv2 = list(argv)
    argv2[argv2.index("blurry")] = "a dog"
    argv2[-1] = str(tmp_path / "run3")
    assert main(argv2) == 0
    assert not np.allclose(np.load(out / "images.npy"), np.load(tmp_path / "run3" / "images.npy"))
    # the digits model has no such options: one clear line, exit code 2
    assert main(["generate", "--prompt", "3", "--height", "32", "--budget-nfe", "18", "--out", str(tmp_path / "d")]) == 2
    assert "diffusers pipelines" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
