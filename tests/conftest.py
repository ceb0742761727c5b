"""Shared pytest fixtures. Each group is self-contained; add new groups below their own header."""
from __future__ import annotations

import os

# Tests never touch the network: the Hugging Face libraries read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


# ---- threads ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _restore_threads():
    """Commands run with ``--threads N`` set torch's thread count for the whole process: put it back
    after every test, so that results a test compares bitwise (a rerun, a resume) are computed at
    the same thread count as the fixtures they are compared with."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one torch thread is as fast and does not thrash a busy machine. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- tiny diffusers pipelines and CLIP models (builders in tests/tiny.py) ---------------------------
# Saved once per session with save_pretrained, so that tests load them by path like a user would.


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Directory of a tiny random StableDiffusionPipeline (eps-prediction, Euler scheduler)."""
    pytest.importorskip("diffusers")
    from tiny import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline(root, prediction_type="epsilon").save_pretrained(root / "pipe")
    return str(root / "pipe")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    """Directory of a tiny random StableDiffusionPipeline with v-prediction."""
    pytest.importorskip("diffusers")
    from tiny import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("tiny_sd_v")
    tiny_sd_pipeline(root, prediction_type="v_prediction", seed=1).save_pretrained(root / "pipe")
    return str(root / "pipe")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """Directory of a tiny random StableDiffusionXLPipeline."""
    pytest.importorskip("diffusers")
    from tiny import tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline(root).save_pretrained(root / "pipe")
    return str(root / "pipe")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """Directory of a tiny random CLIPModel with its tokenizer and preprocessor config."""
    pytest.importorskip("transformers")
    from tiny import tiny_clip_model_dir

    return str(tiny_clip_model_dir(tmp_path_factory.mktemp("tiny_clip")))


# ---- tiny flow-matching pipelines (FLUX dev / schnell, SD3, Lumina2; builders in tests/tiny.py) -------


def _save_flow(tmp_path_factory, name, builder, **kw):
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp(name)
    builder(root, **kw).save_pretrained(root / "pipe")
    return str(root / "pipe")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random FluxPipeline with a guidance embedding (FLUX.1-dev-like), 32x32 images."""
    from tiny import tiny_flux_pipeline

    return _save_flow(tmp_path_factory, "tiny_flux", tiny_flux_pipeline)


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory):
    """A tiny random FluxPipeline without guidance embedding and unshifted (FLUX.1-schnell-like)."""
    from tiny import tiny_flux_pipeline

    return _save_flow(tmp_path_factory, "tiny_flux_schnell", tiny_flux_pipeline, guidance_embeds=False, seed=1)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline, 32x32 images."""
    from tiny import tiny_sd3_pipeline

    return _save_flow(tmp_path_factory, "tiny_sd3", tiny_sd3_pipeline)


@pytest.fixture(scope="session")
def tiny_lumina2_dir(tmp_path_factory):
    """A tiny random Lumina2Pipeline, 64x64 images."""
    from tiny import tiny_lumina2_pipeline

    return _save_flow(tmp_path_factory, "tiny_lumina2", tiny_lumina2_pipeline)
