"""Reward pools: the noisesearch-pool format, the shared layout, validation and merging."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from noisesearch.errors import NoiseSearchError
from noisesearch.pools import FORMAT_NAME, FORMAT_VERSION, Pool, load_pool, merge_pools
from noisesearch.simulate.synthetic import make_synthetic_pool


def small_pool(**kw):
    kw.setdefault("num_prompts", 6)
    kw.setdefault("num_candidates", 8)
    kw.setdefault("num_steps", 5)
    kw.setdefault("rewards", ("hps", "imr"))
    return make_synthetic_pool(**kw)


def write_shared(d: Path, pool: Pool, prefix="flux", naft=True, prompts=True):
    d.mkdir(parents=True, exist_ok=True)
    for r, arr in pool.rewards.items():
        np.save(d / f"{prefix}_{r}_base.npy", arr)
        if naft and r in pool.noise_aware:
            np.save(d / f"{prefix}_{r}_naft.npy", pool.noise_aware[r])
    if prompts:
        (d / "prompts.json").write_text(json.dumps(pool.prompts))
    return d


# ---- our format ----------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    pool = small_pool()
    pool.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "pool.json").read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["version"] == FORMAT_VERSION == 1
    assert manifest["shape"] == [6, 8, 5]
    assert not [f for f in os.listdir(tmp_path / "p") if f.endswith(".tmp")]
    back = load_pool(tmp_path / "p")
    assert back.reward_names == ["hps", "imr"]
    for r in pool.rewards:
        np.testing.assert_array_equal(back.rewards[r], pool.rewards[r])
        np.testing.assert_array_equal(back.noise_aware[r], pool.noise_aware[r])  # NaN kept (equal_nan)
    assert back.prompts == pool.prompts
    assert back.flops_per_step == pool.flops_per_step and back.flops_per_reward == pool.flops_per_reward
    assert back.num_steps == 5 and back.model == "synthetic" and back.extra["seed"] == 0
    # loading through the manifest path works too
    assert load_pool(tmp_path / "p" / "pool.json").shape == (6, 8, 5)


def test_from_arrays_defaults_and_scores():
    base = np.zeros((2, 3, 4), np.float32)
    na = np.full((2, 3, 4), np.nan, np.float32)
    na[:, :, 0] = 5.0
    pool = Pool.from_arrays({"r": base}, {"r": na}, flops_per_step=1.0, flops_per_reward={"r": 2.0})
    assert pool.num_steps == 4 and len(pool.prompts) == 2
    s = pool.scores("r", noise_aware=True)
    assert (s[:, :, 0] == 5).all() and (s[:, :, 1:] == 0).all()  # NaN falls back to base
    assert pool.scores("r", noise_aware=False) is pool.rewards["r"]
    assert 0 < pool.noise_aware_coverage("r") < 1
    # a (prompt, step) where only some candidates have a noise-aware value uses base for all of them
    na[1, 2, 0] = np.nan
    pool = Pool.from_arrays({"r": base}, {"r": na}, flops_per_step=1.0)
    s = pool.scores("r", noise_aware=True)
    assert (s[0, :, 0] == 5).all() and (s[1, :, 0] == 0).all()


def test_select_and_merge_prompt_ranges(tmp_path):
    pool = small_pool()
    a, b = pool.select_prompts(slice(0, 2)), pool.select_prompts(range(2, 6))
    merged = merge_pools([a, b])
    for r in pool.rewards:
        np.testing.assert_array_equal(merged.rewards[r], pool.rewards[r])
    assert merged.prompts == pool.prompts
    # incremental: save a part, load it, merge with the next part, save again
    a.save(tmp_path / "inc")
    merge_pools([load_pool(tmp_path / "inc"), b]).save(tmp_path / "inc")
    assert load_pool(tmp_path / "inc").num_prompts == 6
    with pytest.raises(NoiseSearchError):
        merge_pools([a, small_pool(num_candidates=9)])
    with pytest.raises(NoiseSearchError):
        pool.select_prompts([7])


def test_with_metadata_overrides():
    pool = small_pool()
    p2 = pool.with_metadata(flops_per_step=1e12, flops_per_reward=3e11)
    assert p2.flops_per_step == 1e12 and set(p2.flops_per_reward.values()) == {3e11}
    p3 = pool.with_metadata(flops_per_reward={"hps": 1.0})
    assert p3.flops_per_reward["hps"] == 1.0 and p3.flops_per_reward["imr"] == pool.flops_per_reward["imr"]


# ---- shared layout -------------------------------------------------------------------------------
def test_shared_layout_defaults(tmp_path):
    pool = small_pool()
    d = write_shared(tmp_path / "s", pool, prefix="sd_xl")  # any prefix, even with underscores
    got = load_pool(d)
    assert got.model == "sd_xl" and sorted(got.reward_names) == ["hps", "imr"]
    assert got.flops_per_step == 9.9e12 and got.flops_per_reward == {"hps": 1.2e12, "imr": 1.2e12}
    assert got.num_steps == 5
    assert "display" in got.extra  # the authors' figure rescaling for hps / imr
    s = got.scores("hps", True)
    assert np.isfinite(s).all()


def test_shared_layout_metadata_file(tmp_path):
    pool = small_pool()
    d = write_shared(tmp_path / "s", pool)
    (d / "metadata.json").write_text(json.dumps({"model": "m", "flops_per_step": 2e12, "flops_per_reward": {"hps": 1e11, "imr": 2e11}}))
    got = load_pool(d)
    assert got.model == "m" and got.flops_per_step == 2e12 and got.flops_per_reward["imr"] == 2e11


def test_shared_layout_without_naft(tmp_path):
    d = write_shared(tmp_path / "s", small_pool(), naft=False)
    got = load_pool(d)
    assert got.noise_aware == {} and not got.has_noise_aware("hps")


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_arrays():
    good = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(NoiseSearchError, match="3 dimensions"):
        Pool.from_arrays({"r": np.zeros((2, 3))})
    with pytest.raises(NoiseSearchError, match="share"):
        Pool.from_arrays({"a": good, "b": np.zeros((2, 3, 5))})
    bad = good.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(NoiseSearchError, match="NaN"):
        Pool.from_arrays({"r": bad})
    with pytest.raises(NoiseSearchError, match="shape"):
        Pool.from_arrays({"r": good}, {"r": np.zeros((2, 3, 5))})
    with pytest.raises(NoiseSearchError, match="no base"):
        Pool.from_arrays({"r": good}, {"q": good})
    with pytest.raises(NoiseSearchError, match="prompts"):
        Pool.from_arrays({"r": good}, prompts=["only one"])
    with pytest.raises(NoiseSearchError, match="steps"):
        Pool.from_arrays({"r": good}, num_steps=7)
    with pytest.raises(NoiseSearchError, match="invalid reward name"):
        Pool.from_arrays({"a/b": good})
    with pytest.raises(NoiseSearchError, match="unknown reward"):
        Pool.from_arrays({"r": good}).check_reward("nope")


def test_bad_folders(tmp_path):
    with pytest.raises(NoiseSearchError, match="not found"):
        load_pool(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoiseSearchError, match="holds no pool"):
        load_pool(tmp_path / "empty")
    # missing prompts.json
    d = write_shared(tmp_path / "noprompts", small_pool(), prompts=False)
    with pytest.raises(NoiseSearchError, match="prompts"):
        load_pool(d)
    # truncated npy
    d = write_shared(tmp_path / "trunc", small_pool())
    f = d / "flux_hps_base.npy"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(NoiseSearchError, match="truncated or corrupt"):
        load_pool(d)
    # two models in one folder
    d = write_shared(tmp_path / "two", small_pool())
    write_shared(d, small_pool(), prefix="sd")
    with pytest.raises(NoiseSearchError, match="several models"):
        load_pool(d)
    assert load_pool(d, model="sd").model == "sd"
    # naft without base
    d = tmp_path / "orphan"
    d.mkdir()
    np.save(d / "m_r_naft.npy", np.zeros((1, 2, 3), np.float32))
    (d / "prompts.json").write_text('["p"]')
    with pytest.raises(NoiseSearchError, match="no base file"):
        load_pool(d)


def test_bad_manifest(tmp_path):
    pool = small_pool()
    d = pool.save(tmp_path / "p")
    m = json.loads((d / "pool.json").read_text())
    (d / "pool.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(NoiseSearchError, match="version 99"):
        load_pool(d)
    (d / "pool.json").write_text(json.dumps({**m, "shape": [6, 8, 4]}))
    with pytest.raises(NoiseSearchError, match="manifest says"):
        load_pool(d)
    (d / "pool.json").write_text("{not json")
    with pytest.raises(NoiseSearchError, match="not valid JSON"):
        load_pool(d)
    (d / "pool.json").write_text(json.dumps({**m, "format": "other"}))
    with pytest.raises(NoiseSearchError, match="not a noisesearch-pool"):
        load_pool(d)


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ttsnap-flux"


def test_shared_flux_pool_loads():
    if not (SHARED / "prompts.json").exists():
        pytest.skip("shared TTSnap pools not available")
    pool = load_pool(SHARED)
    assert pool.shape == (200, 200, 20) and pool.model == "flux"
    assert sorted(pool.reward_names) == ["hps", "imr", "pic"]
    assert all(pool.has_noise_aware(r) for r in pool.reward_names)
    assert np.isnan(pool.noise_aware["hps"][:, :, 15:]).all()
