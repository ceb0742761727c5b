"""Pool generation: layout and metadata, per-candidate determinism, resume after interruption,
sharding with accelerate, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from noisesearch.api import pool as gen
from noisesearch.api.pool import generate_pool
from noisesearch.errors import NoiseSearchError
from noisesearch.noise import CandidateNoise
from noisesearch.pools import load_pool
from noisesearch.pools.images import load_pool_images
from noisesearch.sampling.samplers import step_layout

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPTS = ["3", "7", "1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return env


def _assert_same_pool(a, b, exact: bool = True):
    """Bitwise only within one process (a resumed run); across processes with a tolerance, since
    kernels may differ in the last bits between processes and thread counts."""
    assert a.shape == b.shape and a.prompts == b.prompts
    same = (lambda x, y: np.array_equal(x, y, equal_nan=True)) if exact else (
        lambda x, y: np.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True))
    for k in a.rewards:
        assert same(a.rewards[k], b.rewards[k]), k
    assert set(a.noise_aware) == set(b.noise_aware)
    for k in a.noise_aware:
        assert same(a.noise_aware[k], b.noise_aware[k]), k
    assert a.flops_per_step == b.flops_per_step and a.flops_per_reward == b.flops_per_reward


@pytest.fixture(scope="module")
def digits():
    from noisesearch.models import load_model
    from noisesearch.rewards import make_reward

    return load_model("digits", guidance=0), make_reward("digit")


def test_layout_and_metadata_match_the_cost_model(digits, tmp_path):
    den, reward = digits
    pool = generate_pool(den, [reward], PROMPTS, 6, tmp_path / "p", guidance=0, save_images=True, max_batch=4)
    P, N, S = pool.shape
    assert (P, N, S) == (3, 6, 18)  # 18 Euler-ancestral steps -> 18 estimates, the last the final image
    assert pool.extra["state_steps"] == list(range(17)) + [18]
    assert pool.extra["nfe_at_step"] == [s + 1 for s in range(18)]  # estimate s costs s + 1 NFEs
    assert pool.extra["sigmas"][0] == pytest.approx(80.0) and pool.extra["sigmas"][-1] == 0.0
    assert pool.flops_per_step == pytest.approx(den.flops_per_call)
    assert pool.flops_per_reward == {"digit": pytest.approx(reward.flops_per_image)}
    assert pool.model == "digits" and pool.extra["guidance"] == 0.0
    # the saved estimates are the images the rewards scored
    images = load_pool_images(tmp_path / "p")
    assert images.shape == (3, 6, 18, 1, 8, 8) and images.dtype == np.uint8
    # reload through the simulator's loader
    _assert_same_pool(pool, load_pool(tmp_path / "p"))

    # candidate 4 of prompt 1, replayed alone from its own noise stream, gives the same rewards
    from noisesearch.rewards.base import score
    from noisesearch.sampling import EulerAncestral

    s = EulerAncestral(den, 18)
    noise = CandidateNoise(0, s.noise_shape, [(1, 0, 4)])
    state = s.start(den.encode(["7"]), noise.draw())
    values = [float(score(reward, den.decode(state.x0), ["7"]))]
    while state.step < s.num_steps:
        state = s.step(state, noise.draw() if s.uses_noise(state.step) else None)
        if state.step in pool.extra["state_steps"]:
            values.append(float(score(reward, den.decode(state.x0), ["7"])))
    np.testing.assert_allclose(values, pool.rewards["digit"][1, 4], rtol=1e-4, atol=1e-4)
    # and the estimate images were stored as round(255 * image)
    final = (den.decode(state.x0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(final.astype(int) - images[1, 4, -1].astype(int)).max() <= 1


def test_candidates_depend_only_on_seed_prompt_and_index(digits, tmp_path):
    den, reward = digits
    a = generate_pool(den, [reward], PROMPTS, 5, tmp_path / "a", seed=2, max_batch=5)
    b = generate_pool(den, [reward], PROMPTS[:2], 8, tmp_path / "b", seed=2, max_batch=3)
    np.testing.assert_allclose(a.rewards["digit"][:2], b.rewards["digit"][:, :5], rtol=1e-4, atol=1e-4)
    c = generate_pool(den, [reward], PROMPTS, 5, tmp_path / "c", seed=3, max_batch=5)
    assert not np.allclose(a.rewards["digit"][:, :, -1], c.rewards["digit"][:, :, -1])


def test_interrupted_run_resumes_to_the_identical_pool(digits, tmp_path, monkeypatch):
    den, reward = digits
    kw = dict(seed=4, save_images=True, max_batch=8)
    full = generate_pool(den, [reward], PROMPTS, 8, tmp_path / "full", **kw)

    out = tmp_path / "resumed"
    # 1) a time-sliced run: one prompt, then stop (no manifest yet)
    assert generate_pool(den, [reward], PROMPTS, 8, out, max_prompts=1, **kw) is None
    assert len(list((out / "parts").glob("prompt_*.npz"))) == 1 and not (out / "pool.json").exists()
    # 2) killed (Ctrl-C) in the middle of the next prompt
    real = gen.sample_prompt
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "sample_prompt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_pool(den, [reward], PROMPTS, 8, out, **kw)
    monkeypatch.setattr(gen, "sample_prompt", real)
    assert len(list((out / "parts").glob("prompt_*.npz"))) == 2 and not (out / "pool.json").exists()
    assert not list((out / "parts").glob(".*tmp"))  # no half-written files
    # 3) rerun: finishes the last prompt only and assembles the same pool, bit for bit
    done = []
    monkeypatch.setattr(gen, "sample_prompt", lambda *a, **k: done.append(a[5]) or real(*a, **k))
    resumed = generate_pool(den, [reward], PROMPTS, 8, out, **kw)
    assert done == [2]
    _assert_same_pool(full, resumed)
    _assert_same_pool(full, load_pool(out))
    assert np.array_equal(load_pool_images(out), load_pool_images(tmp_path / "full"))
    # a rerun with other settings into the same folder is refused
    with pytest.raises(NoiseSearchError, match="different pool"):
        generate_pool(den, [reward], PROMPTS, 9, out, **kw)


def test_rerun_with_other_weights_under_the_same_name_is_refused(tmp_path):
    from noisesearch.models.toy import PointMixtureDenoiser
    from noisesearch.rewards.simple import Brightness

    a = PointMixtureDenoiser(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).view(2, 1, 1, 2))
    b = PointMixtureDenoiser(torch.tensor([[-1.0, 1.0], [0.5, -0.5]]).view(2, 1, 1, 2))  # also named "toy"
    generate_pool(a, [Brightness()], ["0", "1"], 3, tmp_path / "t", steps=4, max_prompts=1)
    with pytest.raises(NoiseSearchError, match="fingerprints"):
        generate_pool(b, [Brightness()], ["0", "1"], 3, tmp_path / "t", steps=4)
    assert generate_pool(a, [Brightness()], ["0", "1"], 3, tmp_path / "t", steps=4).shape == (2, 3, 4)


def test_cli_pool_and_bad_input(tmp_path, capsys):
    from noisesearch.cli import main

    out = tmp_path / "cli"
    args = ["pool", "--model", "digits", "--guidance", "0", "--reward", "digit", "--prompts", "0,1",
            "--candidates", "4", "--steps", "6", "--device", "cpu", "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    m = json.loads((out / "pool.json").read_text())
    assert m["shape"] == [2, 4, 6] and m["model"] == "digits" and m["extra"]["command"].startswith("noisesearch pool")
    assert m["extra"]["sampler"] == "euler-ancestral"
    capsys.readouterr()
    for bad, msg in [(["--reward", "nope"], "unknown reward"), (["--prompts", "x"], "prompt"),
                     (["--candidates", "0"], "candidates"), (["--device", "cpu", "--threads", "0"], "--threads")]:
        argv = list(args)
        i = argv.index(bad[0])
        argv[i + 1] = bad[1]
        argv += bad[2:]
        assert main(argv + ["--out", str(tmp_path / "bad")]) == 2, bad
        assert msg in capsys.readouterr().err, bad
    # a corrupt part is recomputed, not trusted
    part = next((out / "parts").glob("prompt_*.npz"))
    part.write_bytes(b"garbage")
    (out / "pool.json").unlink()
    assert main(args + ["--out", str(out)]) == 0
    assert load_pool(out).shape == (2, 4, 6)


def test_accelerate_two_processes_shard_prompts(tmp_path):
    """``accelerate launch --num_processes 2`` on the CPU gives the single-process pool.

    (accelerate's ``--cpu`` launcher starts several processes only through MPI; ``--multi_gpu`` uses
    torchrun, which works without GPUs: our code then joins a gloo process group on the CPU.)"""
    pytest.importorskip("accelerate")
    accelerate = Path(PY).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    import socket

    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["pool", "--model", "digits", "--guidance", "0", "--reward", "digit", "--prompts", "0,1,2",
              "--candidates", "4", "--steps", "6", "--device", "cpu", "--no-progress", "--save-images"]
    r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                        "-m", "noisesearch"] + common + ["--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # the single-process pool (another process: equal within float tolerance)
    r = subprocess.run([PY, "-m", "noisesearch"] + common + ["--out", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_pool(tmp_path / "one"), load_pool(tmp_path / "two")
    _assert_same_pool(a, b, exact=False)
    assert b.extra["processes"] == 2 and a.extra["processes"] == 1
    ia, ib = load_pool_images(tmp_path / "one").astype(int), load_pool_images(tmp_path / "two").astype(int)
    assert np.abs(ia - ib).max() <= 1  # uint8 estimates: rounding may differ by one grey level


def test_step_layout_of_heun_counts_uneven_nfes(digits):
    from noisesearch.sampling import make_sampler

    den, _ = digits
    s = make_sampler("heun", den, 6)
    lay = step_layout(s)
    assert lay["state_steps"][-1] == 6 and lay["nfe_at_step"][-1] == s.nfe_per_trajectory
    assert all(b > a for a, b in zip(lay["nfe_at_step"], lay["nfe_at_step"][1:]))


# ---- stored estimates: compressed, checked, streamed ----------------------------------------------------
def _toy(size: int = 48):
    """A two-point toy denoiser with RGB estimates of ``size`` x ``size`` (and the brightness reward)."""
    from noisesearch.models.toy import PointMixtureDenoiser
    from noisesearch.rewards.simple import Brightness

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 2, 2, generator=g), size=(size, size), mode="bilinear")
    return PointMixtureDenoiser(smooth * 2 - 1), Brightness()


@pytest.mark.parametrize("size", [4, 48])  # 3x4x4: one strip per candidate; 3x48x48: one member per estimate
def test_saved_images_are_png_by_default_and_read_one_at_a_time(tmp_path, size):
    import zipfile

    from noisesearch.pools import PoolImages

    den, reward = _toy(size)
    pool = generate_pool(den, [reward], ["0", "1"], 3, tmp_path / "png", steps=4, save_images=True)
    fmt = pool.extra["images_format"]
    assert fmt["codec"] == "png" and fmt["shape"] == [3, size, size]
    assert fmt["layout"] == ("strip" if size == 4 else "image")
    assert not (tmp_path / "png" / "images.npz").exists()
    with zipfile.ZipFile(tmp_path / "png" / "images" / "prompt_000001.zip") as z:
        names = z.namelist()
    assert "meta.json" in names and all(n.endswith(".png") for n in names if n != "meta.json")
    images = load_pool_images(tmp_path / "png")
    assert images.shape == (2, 3, 4, 3, size, size) and images.dtype == np.uint8
    # lossless: the final estimates are the images the rewards scored, to the grey level
    from noisesearch.rewards.base import score

    finals = torch.from_numpy(images[:, :, -1]).float() / 255
    np.testing.assert_allclose(score(reward, finals.flatten(0, 1), ["0"] * 6).view(2, 3).numpy(),
                               pool.rewards[pool.reward_names[0]][:, :, -1], atol=1 / 255)
    reader = PoolImages(tmp_path / "png", load_pool(tmp_path / "png"), max_open=1)
    assert np.array_equal(reader.get(1, 2, 3), images[1, 2, 3])
    assert np.array_equal(reader.batch([0, 1, 0], [2, 0, 1], [0, 3, 2]), images[[0, 1, 0], [2, 0, 1], [0, 3, 2]])
    reader.close()
    # caches: every prompt file open by default; strips kept up to a byte bound, least recent dropped
    strip_bytes = 3 * 4 * size * size  # S x C x H x W uint8
    reader = PoolImages(tmp_path / "png", load_pool(tmp_path / "png"), strip_cache_bytes=2 * strip_bytes)
    assert reader.max_open == 2
    rows = [(p, c, s) for _ in range(2) for p in range(2) for c in range(3) for s in (3, 0)]
    for p, c, s in rows:
        assert np.array_equal(reader.get(p, c, s), images[p, c, s])
        assert len(reader._open) <= 2
        if size == 4:
            assert reader._strip_bytes == sum(v.nbytes for v in reader._strips.values()) <= 2 * strip_bytes
    reader.close()
    # lossy WebP: estimates within a few grey levels on 48x48 (chroma subsampling blurs the colours of
    # tiny images more: use png for those)
    generate_pool(den, [reward], ["0", "1"], 3, tmp_path / "webp", steps=4, save_images=True, image_format="webp")
    lossy = load_pool_images(tmp_path / "webp")
    assert lossy.shape == images.shape and np.abs(lossy.astype(int) - images.astype(int)).mean() < (4 if size > 8 else 16)
    with pytest.raises(NoiseSearchError, match="webp"):
        generate_pool(den, [reward], ["0"], 3, tmp_path / "bad", steps=4, save_images=True, image_format="jpeg")


def test_pool_states_its_disk_estimate_and_refuses_when_short(tmp_path, capsys, monkeypatch):
    from noisesearch import io
    from noisesearch.cli import main

    args = ["pool", "--model", "digits", "--guidance", "0", "--reward", "digit", "--prompts", "0,1",
            "--candidates", "4", "--steps", "6", "--device", "cpu", "--no-progress", "--save-images"]
    assert main(args + ["--out", str(tmp_path / "ok")]) == 0
    err = capsys.readouterr().err
    assert "pool: about" in err and "estimates x" in err and "free" in err  # said before the work
    monkeypatch.setattr(io, "free_bytes", lambda folder: 1000)
    assert main(args + ["--out", str(tmp_path / "short")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs about" in err[-1] and "free" in err[-1]
    assert not list((tmp_path / "short").glob("parts/prompt_*.npz"))  # refused before any prompt
    assert not (tmp_path / "short" / "parts").exists()  # and no half-made pool left behind
    monkeypatch.undo()
    assert main(args + ["--out", str(tmp_path / "short")]) == 0  # the same folder, with room: a pool


def test_a_part_copied_over_another_prompts_part_is_refused(digits, tmp_path):
    import shutil

    den, reward = digits
    out = tmp_path / "p"
    kw = dict(steps=4, save_images=True)
    assert generate_pool(den, [reward], PROMPTS, 3, out, max_prompts=2, **kw) is None
    shutil.copy(out / "parts" / "prompt_000000.npz", out / "parts" / "prompt_000001.npz")
    with pytest.raises(NoiseSearchError, match=r"holds prompt 0 \('3'\), not prompt 1 \('7'\)"):
        generate_pool(den, [reward], PROMPTS, 3, out, **kw)
    # the images of another prompt are refused too
    (out / "parts" / "prompt_000001.npz").unlink()
    assert generate_pool(den, [reward], PROMPTS, 3, out, max_prompts=1, **kw) is None
    shutil.copy(out / "images" / "prompt_000000.zip", out / "images" / "prompt_000001.zip")
    with pytest.raises(NoiseSearchError, match="images of prompt 0"):
        generate_pool(den, [reward], PROMPTS, 3, out, **kw)


def test_two_runs_into_one_pool_folder_are_refused(digits, tmp_path):
    from noisesearch.io import output_lock

    den, reward = digits
    with output_lock(tmp_path / "p", "another run"):
        with pytest.raises(NoiseSearchError, match="in use by another run"):
            generate_pool(den, [reward], PROMPTS, 3, tmp_path / "p", steps=4)
    assert generate_pool(den, [reward], PROMPTS, 3, tmp_path / "p", steps=4).shape == (3, 3, 4)


def test_pools_with_the_old_single_array_of_images_still_train(digits, tmp_path):
    """Pools written before the per-prompt image files hold one ``images.npz``: still read."""
    import io
    import shutil

    from noisesearch.pools import PoolImages

    den, reward = digits
    out = tmp_path / "old"
    generate_pool(den, [reward], PROMPTS, 3, out, steps=4, save_images=True)
    images = load_pool_images(out)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images)
    (out / "images.npz").write_bytes(buf.getvalue())
    shutil.rmtree(out / "images")
    m = json.loads((out / "pool.json").read_text())
    m["extra"]["images"], m["extra"]["images_format"] = "images.npz", "uint8 [P, N, S, C, H, W]"
    (out / "pool.json").write_text(json.dumps(m))
    assert np.array_equal(load_pool_images(out), images)
    assert np.array_equal(PoolImages(out, load_pool(out)).get(2, 1, 3), images[2, 1, 3])
