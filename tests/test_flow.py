"""Flow-matching pipelines (FLUX, SD3, Lumina2) as denoisers, on tiny random pipelines saved to disk.

Central checks: deterministic Euler on the pipeline's own schedule (starting at sigma = inf)
reproduces each pipeline's output for the same initial noise; the stochastic samplers and every
search strategy run on them within budget; embedded guidance, the distilled-model warning, FLOPs
counted on ``meta`` and NegToMe.
"""
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from noisesearch import api  # noqa: E402
from noisesearch.budget import Budget  # noqa: E402
from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.flops import count_flops  # noqa: E402
from noisesearch.models import load_model  # noqa: E402
from noisesearch.sampling.samplers import Euler, EulerAncestral, HeunChurn  # noqa: E402

PROMPTS = ["a red bicycle", "a cat"]
STEPS = 3
# Relative tolerance on final latents (max |diff| / max |latent|). Measured on CPU float32:
# FLUX 1.5e-7 / 2.2e-7 (cond / CFG), SD3 3.1e-7 / 2.5e-7, Lumina2 3.5e-7.
PARITY_RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _streams(d, n, seed=0):
    from noisesearch.noise import NoiseSource

    return NoiseSource(seed, d.sample_shape, [(i, 0) for i in range(n)])


def _noise(d, n=2, seed=0):
    return torch.randn((n, *d.sample_shape), generator=torch.Generator().manual_seed(seed))


def _euler(d, noise, prompts=PROMPTS, steps=STEPS):
    s = Euler(d, steps)
    return s.rollout(s.start(d.encode(prompts), noise), _streams(d, len(prompts))).x


def _pipeline(d, noise, prompts, guidance, steps=STEPS):
    """The pipeline's own output latents (unpacked) for the same initial noise."""
    pipe, H, W = d.pipe, d.height, d.width
    fam = d.family.family
    kw = dict(height=H, width=W, num_inference_steps=steps, output_type="latent")
    latents = noise
    if fam == "flux":
        latents = pipe._pack_latents(noise, noise.shape[0], *d.sample_shape)
        if guidance != 1:
            kw.update(true_cfg_scale=guidance, negative_prompt=[""] * len(prompts))
        if d.embedded_guidance is not None:
            kw["guidance_scale"] = d.embedded_guidance
    else:
        kw["guidance_scale"] = guidance
    out = pipe(prompts, latents=latents, **kw).images
    if fam == "flux":
        out = pipe._unpack_latents(out, H, W, d.family.vae_scale_factor)
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,guidance", [("flux", 1.0), ("flux", 3.0), ("sd3", 1.0), ("sd3", 4.0), ("lumina2", 4.0)])
def test_euler_reproduces_the_pipeline(which, guidance, request):
    path = request.getfixturevalue(f"tiny_{which}_dir")
    size = 64 if which == "lumina2" else 32
    d = load_model(path, guidance=guidance, height=size, width=size, default_steps=STEPS)
    noise = _noise(d)
    assert d.sample_shape == ((4, 8, 8) if which == "lumina2" else (4, 16, 16))  # unpacked latents
    ours = _euler(d, noise)
    theirs = _pipeline(d, noise, PROMPTS, guidance)
    assert _rel(ours, theirs) < PARITY_RTOL


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_bfloat16_networks_follow_the_bfloat16_pipeline(which, request):
    """bf16 networks (the CUDA default) with float32 states vs the pipeline's own bf16 run: they differ
    by bf16 rounding only (measured 5e-3 / 7e-3 relative on CPU)."""
    d = load_model(request.getfixturevalue(f"tiny_{which}_dir"), height=32, width=32, dtype="bfloat16")
    assert d.model_dtype == torch.bfloat16 and d.dtype == torch.float32
    noise = _noise(d)
    assert _rel(_euler(d, noise), _pipeline(d, noise, PROMPTS, 1.0).float()) < 3e-2


def test_schedule_is_the_schedulers_and_starts_at_inf(tiny_flux_dir, tiny_sd3_dir):
    for path in (tiny_flux_dir, tiny_sd3_dir):
        d = load_model(path, height=32, width=32)
        sig = d.schedule_sigmas(5)
        assert len(sig) == 6 and math.isinf(sig[0]) and sig[-1] == 0
        assert torch.all(sig[1:-1] > 0) and torch.all(sig[1:-1].diff() < 0)
        t = d.pipeline_flow_times(5)
        assert torch.allclose(sig[1:] / (1 + sig[1:]), t[1:], rtol=1e-12, atol=0)
        s = EulerAncestral(d, 5)  # the samplers' default schedule for a flow model
        assert torch.equal(s.sigmas, sig)


def test_flux_dynamic_shift_is_a_sigma_scale(tiny_flux_dir):
    """FLUX's dynamic shift multiplies sigma by e^mu (mu from the token count)."""
    d = load_model(tiny_flux_dir, height=32, width=32)
    sig = d.schedule_sigmas(4)[1:-1]
    t0 = torch.linspace(1, 1 / 4, 4, dtype=torch.float64)[1:]
    mu = d.family.mu(d.sample_shape)
    assert torch.allclose(sig, math.exp(mu) * t0 / (1 - t0), rtol=1e-5)


# ---- stochastic samplers from sigma = inf ---------------------------------------------------------


@pytest.mark.parametrize("cls", [EulerAncestral, HeunChurn])
def test_stochastic_samplers_run_and_charge_what_they_plan(cls, tiny_sd3_dir):
    d = load_model(tiny_sd3_dir, height=32, width=32)
    budget = Budget(2, nfe=100)
    s = cls(d, 4, budget=budget)
    st = s.rollout(s.start(d.encode(PROMPTS), _noise(d)), _streams(d, len(PROMPTS), 1))
    assert torch.isfinite(st.x).all() and st.step == s.num_steps
    assert int(budget.nfe[0]) == s.nfe_per_trajectory
    # noise matters: another stream gives another image
    st2 = s.rollout(s.start(d.encode(PROMPTS), _noise(d)), _streams(d, len(PROMPTS), 2))
    assert not torch.allclose(st.x, st2.x)


def test_ancestral_first_step_from_inf_is_the_euler_limit(tiny_flux_dir):
    """At sigma_0 = inf: ancestral (eta=1) keeps nothing of x but x0; Euler keeps x0 + sigma_1 * noise."""
    d = load_model(tiny_flux_dir, height=32, width=32)
    s = EulerAncestral(d, STEPS, eta=1.0)
    st = s.start(d.encode(PROMPTS), _noise(d))
    z = _noise(d, seed=5)
    nxt = s.step(st, z)
    assert torch.allclose(nxt.x, st.x0 + float(s.sigmas[1]) * z, atol=1e-5)


# ---- guidance ---------------------------------------------------------------------------------------


def test_embedded_guidance_is_an_input_and_not_cfg(tiny_flux_dir, tiny_sd3_dir):
    a = load_model(tiny_flux_dir, height=32, width=32)
    b = load_model(tiny_flux_dir, height=32, width=32, embedded_guidance=7.0)
    assert a.embedded_guidance == 3.5 and a.branches == ("cond",) and b.branches == ("cond",)
    noise = _noise(a)
    assert _rel(_euler(a, noise), _euler(b, noise)) > 1e-4
    assert _rel(_euler(b, noise), _pipeline(b, noise, PROMPTS, 1.0)) < PARITY_RTOL
    with pytest.raises(NoiseSearchError, match="no guidance embedding"):
        load_model(tiny_sd3_dir, embedded_guidance=3.5)


def test_distilled_flux_warns(tiny_flux_schnell_dir):
    with pytest.warns(UserWarning, match="not posterior means"):
        d = load_model(tiny_flux_schnell_dir, height=32, width=32)
    assert d.embedded_guidance is None
    noise = _noise(d)
    assert _rel(_euler(d, noise), _pipeline(d, noise, PROMPTS, 1.0)) < PARITY_RTOL


# ---- costs ----------------------------------------------------------------------------------------


def test_flops_on_meta_equal_a_real_count(tiny_flux_dir):
    d = load_model(tiny_flux_dir, guidance=3.0, height=32, width=32)
    cond = d.encode([""])
    x = torch.zeros((1, *d.sample_shape))
    real = count_flops(lambda: d(x, torch.full((1,), 0.5), cond))
    assert d.flops_per_call == pytest.approx(real, rel=1e-6)
    real_dec = count_flops(lambda: d.decode(x))
    assert d.flops_per_decode == pytest.approx(real_dec, rel=1e-6)
    cost = d.encode_cost()  # text encoders counted on meta copies too; x2 for the two CFG branches
    real_enc = count_flops(lambda: d.family.encode_branches(["a"], None, need_uncond=False))
    assert cost["flops_per_prompt"] == pytest.approx(2 * real_enc, rel=1e-6) and cost["prompts_encoded"] >= 1


def test_flow_wrapper_at_infinite_sigma():
    """sigma = inf: x holds the noise, the network sees t = 1 and x0 = x - v."""
    from noisesearch.models.wrappers import FlowDenoiser

    seen = {}

    def net(x_t, t, cond):
        seen["t"], seen["x_t"] = t.clone(), x_t.clone()
        return torch.full_like(x_t, 0.25)

    w = FlowDenoiser(net, timestep_scale=1000.0)
    x = torch.randn(2, 3)
    x0 = w(x, torch.tensor([math.inf, 1.0]), None)
    assert seen["t"].tolist() == [1000.0, 500.0]
    assert torch.allclose(seen["x_t"], torch.stack([x[0], x[1] / 2]))
    assert torch.allclose(x0, torch.stack([x[0] - 0.25, x[1] / 2 - 0.125]))


def test_prompts_are_encoded_once(tiny_sd3_dir):
    d = load_model(tiny_sd3_dir, height=32, width=32)
    n0 = d.encode_stats["prompts"]
    cond = d.encode(["a cat", "a dog", "a cat", "a cat"])
    assert d.encode_stats["prompts"] - n0 == 2
    assert torch.equal(cond["cond"]["embeds"][0], cond["cond"]["embeds"][2])


# ---- every strategy, through the API and the CLI --------------------------------------------------

STRATEGY_OPTS = {
    "naive": {},
    "best-of-n": {},
    "eps-greedy": {"n_candidates": 2},
    "zero-order": {"n_candidates": 2},
    "beam": {},
    "mcts": {},
    "smc": {},
    "ttsp": {"prune_steps": (1,), "keep": (0.5,)},
}


@pytest.mark.parametrize("which", ["flux", "sd3"])
@pytest.mark.parametrize("strategy", sorted(STRATEGY_OPTS))
def test_every_strategy_runs_within_budget(which, strategy, request):
    path = request.getfixturevalue(f"tiny_{which}_dir")
    d = load_model(path, height=32, width=32, guidance=1.0)
    budget = 12
    run = api.generate(model=d, prompts=["a red bicycle"], reward="brightness", strategy=strategy, budget_nfe=budget,
                       steps=STEPS, seed=0, strategy_options=STRATEGY_OPTS[strategy], evaluate=False, max_batch=8)
    assert run.report["nfe_max"] <= budget
    assert run.images.shape == (1, 3, 32, 32) and torch.isfinite(run.images).all()
    assert run.report["prompt_encoding"]["flops_per_prompt"] > 0


def test_cli_generate_on_flux(tiny_flux_dir, tmp_path):
    from noisesearch.cli import main

    out = tmp_path / "run"
    rc = main(["generate", "--model", tiny_flux_dir, "--prompt", "a red bicycle", "--strategy", "eps-greedy",
               "--n-candidates", "2", "--budget-nfe", "12", "--steps", "3", "--height", "32", "--width", "32",
               "--reward", "brightness", "--embedded-guidance", "4.0", "--decode-batch", "2", "--device", "cpu",
               "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["nfe_max"] <= 12 and report["model_options"]["embedded_guidance"] == "4.0"
    assert report["prompt_encoding"]["seconds_per_prompt"] >= 0


# ---- pool + train-reward + live ttsnap on FLUX and SD3 -----------------------------------------------


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_pool_train_reward_ttsnap(which, request, tmp_path):
    from noisesearch.cli import main
    from noisesearch.pools import load_pool

    clip = f"clip@{request.getfixturevalue('tiny_clip_dir')}"  # a tiny random CLIP: trainable image tower
    model = request.getfixturevalue(f"tiny_{which}_dir")
    base = ["--model", model, "--height", "32", "--width", "32", "--steps", "3", "--device", "cpu"]
    rc = main(["pool", *base, "--prompt", "a red bicycle", "--prompt", "a cat", "--candidates", "4",
               "--reward", clip, "--save-images", "--out", str(tmp_path / "pool"), "--quiet"])
    assert rc == 0
    pool = load_pool(tmp_path / "pool")
    P, N, S = pool.shape
    assert (P, N, S) == (2, 4, 3)
    from noisesearch.pools import load_pool_images  # the stored estimates (pools.images)

    assert load_pool_images(tmp_path / "pool").shape == (2, 4, 3, 3, 32, 32)
    key = pool.reward_names[0]
    rc = main(["train-reward", "--pool", str(tmp_path / "pool"), "--reward", key, "--out", str(tmp_path / "na"),
               "--steps", "1", "--iters", "2", "--batch-size", "4", "--lora-rank", "0", "--device", "cpu", "--quiet"])
    assert rc == 0
    run = api.generate(model=model, prompts=["a red bicycle"], reward=clip, strategy="ttsnap", budget_nfe=12,
                       steps=3, seed=0, strategy_options={"prune_reward": str(tmp_path / "na"), "prune_steps": (1,), "keep": (0.5,)},
                       evaluate=False, model_options={"height": 32, "width": 32})
    assert run.report["nfe_max"] <= 12
    assert run.report["strategy_info"]["candidates"] >= 2


# ---- NegToMe --------------------------------------------------------------------------------------


def _mean_pairwise(images):
    flat = images.flatten(1)
    dist = torch.cdist(flat, flat)
    n = len(flat)
    return float(dist.sum() / (n * (n - 1)))


def test_negtome_changes_images_and_raises_diversity(tiny_flux_dir):
    kw = dict(height=32, width=32, default_steps=STEPS)
    plain = load_model(tiny_flux_dir, **kw)
    nt = load_model(tiny_flux_dir, negtome={"alpha": 4.0, "threshold": 0.0, "window": (0.0, 1.0)}, **kw)
    noise = _noise(plain, n=4, seed=3)
    prompts = ["a red bicycle"] * 4
    a = plain.decode(_euler(plain, noise, prompts))
    b = nt.decode(_euler(nt, noise, prompts))
    assert (a - b).abs().max() > 1e-3
    assert _mean_pairwise(b) > _mean_pairwise(a)
    # outside its time window it changes nothing
    off = load_model(tiny_flux_dir, negtome={"alpha": 4.0, "threshold": 0.0, "window": (0.0, 0.0)}, **kw)
    assert _rel(_euler(off, noise, prompts), _euler(plain, noise, prompts)) < 1e-6


def test_negtome_is_flux_only_and_validated(tiny_sd3_dir, tiny_flux_dir):
    with pytest.raises(NoiseSearchError, match="FLUX"):
        load_model(tiny_sd3_dir, negtome={})
    with pytest.raises(NoiseSearchError, match="window"):
        load_model(tiny_flux_dir, negtome={"window": (0.5, 2.0)})



def test_flux_pool_resumes(tiny_flux_dir, tmp_path):
    """An interrupted FLUX pool (--max-prompts) continued by a rerun equals a run in one go.
    (Sharding with ``accelerate launch`` is model independent: tests/test_pool_generate.py.)"""
    import numpy as np

    from noisesearch.cli import main
    from noisesearch.pools import load_pool

    common = ["pool", "--model", tiny_flux_dir, "--height", "32", "--width", "32", "--steps", "2", "--reward", "brightness",
              "--prompts", "a red bicycle,a cat", "--candidates", "2", "--device", "cpu", "--no-progress", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one"), "--max-prompts", "1"]) == 0  # interrupted after one prompt
    assert not (tmp_path / "one" / "pool.json").exists()
    assert main(common + ["--out", str(tmp_path / "one")]) == 0  # resumed
    assert main(common + ["--out", str(tmp_path / "two")]) == 0
    a, b = load_pool(tmp_path / "one"), load_pool(tmp_path / "two")
    assert a.shape == b.shape == (2, 2, 2)
    np.testing.assert_allclose(a.rewards["brightness"], b.rewards["brightness"], rtol=1e-5, atol=1e-6)
