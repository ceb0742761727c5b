"""The galaxygrad score models in torch against the package's own JAX models (fixture made by
tools/make_galaxy_fixture.py in a reference venv), and the denoiser built around them."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.models import galaxygrad as gg

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "galaxygrad_scores.npz")
needs_galaxygrad = pytest.mark.skipif(not gg.galaxygrad_installed(),
                                      reason="galaxygrad==0.1.9 not installed (pip install --no-deps galaxygrad==0.1.9)")


def rel_err(a, b):
    """Largest per-sample relative error ||a - b|| / ||b||."""
    a, b = torch.as_tensor(a).double().flatten(1), torch.as_tensor(b).double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.fixture(scope="module")
def fixture():
    return np.load(FIXTURE)


@needs_galaxygrad
@pytest.mark.parametrize("name", ["hsc32", "hsc64"])
def test_torch_score_and_denoiser_match_the_jax_package(name, fixture):
    d = gg.load_galaxygrad(name)
    f = {k: torch.from_numpy(fixture[f"{name}_{k}"]) for k in ("x", "sigma", "t", "x_t", "score", "x0")}
    with torch.no_grad():
        score = d.net(f["x_t"], f["t"].float())
        x0 = d(f["x"], f["sigma"], d.encode([""] * len(f["x"])))
    assert rel_err(score, f["score"]) < 1e-4
    assert rel_err(x0, f["x0"]) < 1e-4
    # the adapter's own maths: x0 = x + (s^2 / a) score(a x, t)
    a, s2 = (-f["t"] / 2).exp().view(-1, 1, 1, 1), (-(-f["t"]).expm1()).view(-1, 1, 1, 1)
    assert rel_err(x0, f["x"].double() + s2 / a * score.double()) < 1e-4  # float32 cancellation at t = 9


@needs_galaxygrad
def test_unflipped_transposed_conv_would_not_match(fixture):
    """Equinox's transposed convolution flips its kernel: without the flip the scores are wrong."""
    net = gg.load_network("hsc32")
    net.conv_out.weight.data = net.conv_out.weight.data.flip(-1, -2)
    with torch.no_grad():
        score = net(torch.from_numpy(fixture["hsc32_x_t"]), torch.from_numpy(fixture["hsc32_t"]).float())
    assert rel_err(score, fixture["hsc32_score"]) > 1e-2


@needs_galaxygrad
@pytest.mark.parametrize("name,side", [("hsc32", 32), ("ztf32", 32), ("hsc64", 64), ("ztf64", 64)])
def test_every_model_loads_as_an_unconditional_denoiser(name, side):
    d = gg.load_galaxygrad(name)
    assert d.name == f"galaxygrad:{name}" and d.sample_shape == (1, side, side)
    assert d.conditional is False and d.prediction == "score"
    assert d.sigma_max == pytest.approx(math.sqrt(math.exp(10) - 1))
    assert d.sigma_min == pytest.approx(math.sqrt(math.expm1(gg.T_MIN)))
    assert d.encode([]).shape[0] == 0 and d.encode(["", "a spiral"]).shape[0] == 2
    assert not any(p.requires_grad for p in d.net.parameters())


@needs_galaxygrad
def test_flops_are_counted_like_count_flops():
    from noisesearch.flops import count_flops

    net = gg.load_network("hsc32")
    assert net.flops() == count_flops(lambda: net(torch.zeros(1, 1, 32, 32), torch.ones(1)))


@needs_galaxygrad
def test_refusals():
    with pytest.raises(NoiseSearchError, match="unconditional model"):
        gg.load_galaxygrad("hsc32", guidance=3.0)
    with pytest.raises(NoiseSearchError, match="unknown galaxygrad model"):
        gg.load_galaxygrad("hsc128")
    with pytest.raises(NoiseSearchError, match="takes no option height"):
        gg.load_galaxygrad("hsc32", height=64)
    assert gg.load_galaxygrad("hsc32", guidance=0).conditional is False


@needs_galaxygrad
def test_load_model_name_and_a_short_search():
    from noisesearch.api import generate
    from noisesearch.models import load_model

    d = load_model("galaxygrad:hsc32")
    assert d.name == "galaxygrad:hsc32"
    run = generate(model=d, prompts=[""], reward="brightness", strategy="best-of-n", budget_nfe=16, steps=8,
                   num_samples=2, seed=0, evaluate=False)
    assert run.images.shape == (2, 1, 32, 32)
    assert float(run.images.min()) >= 0 and float(run.images.max()) <= 1
    assert float(run.images.max()) > 0.5  # a galaxy, not an empty or saturated frame
    assert float(run.images.median()) < 0.2  # on a dark background


def test_eqx_reader_and_leaf_layout(tmp_path):
    net = gg.GalaxyScoreNet(32)
    state = net.state_dict()
    names = gg._leaf_names(gg.NUM_BLOCKS)
    path = tmp_path / "fake.eqx"
    with open(path, "wb") as f:
        for n in names[:-1]:
            a = state[n].numpy()
            if n == "conv_out.weight":  # store it the Equinox way
                a = np.ascontiguousarray(np.flip(a, (-2, -1)).transpose(1, 0, 2, 3))
            if n.endswith("bias") and n.startswith("conv"):
                a = a.reshape(-1, 1, 1)
            np.save(f, a)
        np.save(f, np.float32(10.0))
    arrays = gg.read_eqx(str(path))
    assert len(arrays) == 55 and float(arrays[-1]) == 10.0
    loaded, t1 = gg.state_from_eqx(arrays, str(path))
    assert t1 == 10.0
    for n in state:
        torch.testing.assert_close(loaded[n], state[n], rtol=0, atol=0)
    with pytest.raises(NoiseSearchError, match="hold 54 arrays"):
        gg.state_from_eqx(arrays[:-1], str(path))


def test_not_installed_is_one_line_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "galaxygrad" else real(name, *a))
    with pytest.raises(NoiseSearchError, match="pip install --no-deps galaxygrad==0.1.9"):
        gg.load_galaxygrad("hsc32")
    assert gg.galaxygrad_installed() is False


def test_stretch_is_documented_and_invertible():
    flux = torch.tensor([0.0, 0.001, 0.02, 0.3, 1.0])
    img = gg.flux_to_image(flux)
    assert float(img[0]) == 0.0 and float(img[-1]) == pytest.approx(1.0)
    assert (img[1:] > img[:-1]).all()
    torch.testing.assert_close(gg.image_to_flux(img), flux, rtol=1e-4, atol=1e-6)
    x = gg.from_flux(flux)
    torch.testing.assert_close(gg.to_flux(x), flux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gg.decode_galaxy(x), img)
    assert float(gg.flux_to_image(torch.tensor([-0.5]))) == 0.0


# ---- galaxy rewards on synthetic blobs of known shape ---------------------------------------------

needs_astro = pytest.mark.skipif(importlib.util.find_spec("galsim") is None or importlib.util.find_spec("photutils") is None,
                                 reason="galaxy rewards need `pip install 'noisesearch[galaxy]'`")


def blob_image(q, size, profile="gauss", side=32, theta=0.5, amp=0.8):
    """An elliptical blob of axis ratio q = b/a and radius det(M)^(1/4) = size (Gaussian), drawn in
    flux and shown through the galaxygrad stretch, [1, side, side]."""
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2 + 0.3
    u, v = xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)
    r2 = (u / size) ** 2 * q + (v / size) ** 2 / q  # a = size / sqrt(q), b = size * sqrt(q)
    flux = amp * (np.exp(-0.5 * r2) if profile == "gauss" else np.exp(-np.sqrt(r2)))
    return gg.flux_to_image(torch.from_numpy(flux).float())[None]


@needs_astro
def test_ellipticity_and_size_of_gaussians_are_exact():
    from noisesearch.rewards.base import make_reward

    qs, sizes = [1.0, 0.7, 0.4, 0.7], [1.5, 3.0, 2.0, 4.0]
    images = torch.stack([blob_image(q, s) for q, s in zip(qs, sizes)])
    e = make_reward("ellipticity")(images, [""] * 4)
    torch.testing.assert_close(e, torch.tensor([0.0, 0.3, 0.6, 0.3]), atol=1e-4, rtol=0)
    size = make_reward("galaxy-size")(images, [""] * 4)
    torch.testing.assert_close(size, torch.tensor(sizes), atol=1e-3, rtol=0)
    target = make_reward("ellipticity@0.3")
    assert target.name == "ellipticity@0.3"
    torch.testing.assert_close(target(images, [""] * 4), torch.tensor([-0.3, 0.0, -0.3, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(make_reward("galaxy-size@2")(images, [""] * 4), torch.tensor([-0.25, -0.5, 0.0, -1.0]),
                               atol=1e-3, rtol=0)


@needs_astro
def test_concentration_orders_profiles():
    from noisesearch.rewards.base import make_reward

    images = torch.stack([blob_image(1.0, 2.5), blob_image(1.0, 2.0, profile="exp")])
    c = make_reward("concentration")(images, ["", ""])
    assert float(c[0]) == pytest.approx(5 * math.log10(math.sqrt(math.log(5) / math.log(1.25))), abs=0.05)  # 2.14
    assert 2.5 < float(c[1]) < 3.0  # exponential disk
    assert float(make_reward("concentration@2.14")(images[:1], [""])) > -0.05


@needs_astro
def test_failed_measurements_score_the_worst_value_and_bad_targets_are_refused():
    from noisesearch.rewards.base import make_reward

    empty = torch.zeros(2, 1, 32, 32)
    assert make_reward("ellipticity")(empty, ["", ""]).tolist() == [0.0, 0.0]
    assert make_reward("concentration@3")(empty, ["", ""]).tolist() == [-1.0, -1.0]
    colour = blob_image(0.5, 2.0).expand(3, 32, 32)[None]
    assert float(make_reward("ellipticity")(colour, [""])) == pytest.approx(0.5, abs=1e-3)
    for spec in ("ellipticity@1.5", "ellipticity@round", "galaxy-size@-2"):
        with pytest.raises(NoiseSearchError, match="target must be a number"):
            make_reward(spec)


@needs_galaxygrad
@needs_astro
def test_galaxies_benchmark_writes_its_figures(tmp_path):
    import json

    from noisesearch.bench import BENCHMARKS, galaxies

    assert "galaxies" in BENCHMARKS
    out = tmp_path / "g"
    argv = ["--budgets", "32", "--seeds", "2", "--steps", "8", "--strategies", "best-of-n,eps-greedy", "--grid", "2",
            "--out", str(out)]
    assert galaxies.main(argv) == 0
    res = json.loads((out / "galaxies_results.json").read_text())
    cells = {c["strategy"]: c for c in res["cells"]}
    assert set(cells) == {"naive", "best-of-n", "eps-greedy"}
    for c in cells.values():
        assert c["nfe_mean"] <= c["budget"] and len(c["rewards"]) == 2
        assert "eval:galaxy-size" in c and "eval:concentration" in c
    assert "| 32 |" in (out / "galaxies_results.md").read_text()
    assert (out / "galaxies_samples.png").stat().st_size > 0 and (out / "galaxies_reward_vs_nfe.png").stat().st_size > 0
    with pytest.raises(NoiseSearchError, match="unknown"):
        galaxies.main(["--strategies", "best-of-n,magic", "--out", str(out)])


@needs_galaxygrad
@needs_astro
def test_galaxies_benchmark_prices_the_reward_and_runs_the_new_strategies(tmp_path, capsys):
    """--reward-price P: FLOP budgets in NFE-equivalents, each reward call priced at P NFEs, spent within budget;
    --no-progress: no line per cell."""
    import json

    from noisesearch.bench import galaxies

    out = tmp_path / "g"
    argv = ["--reward-price", "1", "--budgets", "40", "--seeds", "2", "--steps", "8", "--grid", "2",
            "--strategies", "best-of-n,evo,rbf,dts,auto", "--out", str(out), "--no-progress"]
    assert galaxies.main(argv) == 0
    assert " NFE: " not in capsys.readouterr().err
    res = json.loads((out / "galaxies_results.json").read_text())
    assert res["meta"]["reward_price_nfe"] == 1.0 and res["meta"]["budget_kind"] == "flops"
    cells = {c["strategy"]: c for c in res["cells"]}
    assert set(cells) == {"naive", "best-of-n", "evo", "rbf", "dts", "auto"}
    for c in cells.values():
        assert "refused" not in c, c
        # every reward call costs one NFE: FLOPs spent = NFEs + reward calls, within the budget
        assert c["flops_mean_in_nfe"] == pytest.approx(c["nfe_mean"] + c["reward_calls_mean"], rel=1e-6)
        assert c["flops_mean_in_nfe"] <= c["budget"] * (1 + 1e-9)
    assert cells["naive"]["budget"] == 9 and cells["best-of-n"]["strategy_info"]["candidates"] == 4  # 4 x (8 + 1) <= 40
    assert cells["auto"]["strategy_info"]["auto"]["strategy"] in ("best-of-n", "eps-greedy", "beam", "smc", "evo", "rbf", "dts")
    assert "reward 1 NFE" in (out / "galaxies_results.md").read_text()
    for bad in ("-1", "nan"):
        with pytest.raises(NoiseSearchError, match="reward-price"):
            galaxies.main(["--reward-price", bad, "--out", str(out)])
