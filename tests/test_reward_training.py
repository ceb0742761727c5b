"""train-reward on the preference rewards (tiny random versions from tests/fixtures/rewards):
pools of the digits model scored by hps / imagereward / pickscore, curriculum self-distillation
end to end through the CLI (full and LoRA), the result loaded as noise-aware@DIR."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from noisesearch.api.pool import generate_pool  # noqa: E402
from noisesearch.pools import load_pool  # noqa: E402
from noisesearch.rewards import make_reward, score  # noqa: E402
from noisesearch.rewards.noise_aware import NoiseAwareReward, load_stage  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"


def _pool(tmp_path_factory, name):
    d = tmp_path_factory.mktemp(f"pool_{name}") / "pool"
    spec = f"{name}@{FIXTURES / name}"
    generate_pool("digits", [spec], [str(i) for i in range(4)], 10, d, guidance=0, steps=4, seed=3, save_images=True)
    (key,) = load_pool(d).rewards
    return d, spec, key


@pytest.mark.parametrize("name,lora", [("hps", 0), ("pickscore", 0), ("imagereward", 4)])
def test_train_reward_end_to_end(tmp_path_factory, name, lora, capsys):
    from noisesearch.cli import main

    pool, spec, key = _pool(tmp_path_factory, name)
    out = tmp_path_factory.mktemp(f"na_{name}") / "reward"
    args = ["train-reward", "--pool", str(pool), "--reward", key, "--out", str(out), "--steps", "1,2",
            "--iters", "25", "--batch-size", "16", "--lr", "3e-3" if lora else "1e-3", "--holdout", "0.3",
            "--no-gate", "--no-progress", "--threads", "1"]
    if lora:
        args += ["--lora-rank", str(lora)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "held-out spearman" in err  # reported per stage (step)
    m = json.loads((out / "noise_aware.json").read_text())
    assert m["base_reward"] == spec and m["steps"] == [1, 2]
    for st in m["stages"]:
        assert np.isfinite(st["heldout_spearman"]) and np.isfinite(st["heldout_spearman_base"])
        assert st["loss_last"] < st["loss_first"], st
    r = make_reward(f"noise-aware@{out}")
    assert isinstance(r, NoiseAwareReward) and r.flops_per_image == make_reward(spec).flops_per_image
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["0", "1", "2"]
    s2 = r.score_at(x, prompts, step=2)
    ref = make_reward(spec)
    ref.module.load_state_dict(load_stage(out / "stage_02.safetensors"))
    torch.testing.assert_close(s2, score(ref, x, prompts).to(s2.device), rtol=1e-5, atol=1e-5)
    base = score(make_reward(spec), x, prompts)
    assert not torch.allclose(s2.cpu(), base, atol=1e-6)  # fine-tuned weights differ from the base reward
    torch.testing.assert_close(r.score_at(x, prompts, step=3).cpu(), base, rtol=1e-5, atol=1e-5)  # final image: base


def test_step_conditioning_is_the_identity_at_init_and_trains(tmp_path_factory):
    import copy

    from noisesearch.rewards.step_conditioning import StepConditioned, set_condition
    from noisesearch.train.noise_aware import TrainConfig, train_noise_aware

    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = list("0123")
    for spec, kind in (("digit", "film"), (f"hps@{FIXTURES / 'hps'}", "adaln"), (f"imagereward@{FIXTURES / 'imagereward'}", "adaln")):
        r = make_reward(spec)
        base = score(r, x, prompts)
        c = copy.deepcopy(r)
        c.module = StepConditioned(copy.deepcopy(r.module))
        assert c.module.kind == kind
        set_condition(c.module, torch.tensor([0.0, 1.0, 10.0, 80.0]))
        torch.testing.assert_close(score(c, x, prompts), base, rtol=1e-6, atol=1e-6)  # adaLN-Zero: identity

    pool, spec, key = _pool(tmp_path_factory, "hps")
    out = tmp_path_factory.mktemp("na_cond") / "reward"
    m = train_noise_aware(pool, out, TrainConfig(reward=key, steps=(1, 2), iters=25, batch_size=16, lr=1e-3, holdout=0.3,
                                                 gate=False, step_conditioning=True, cond_dim=16), log=lambda *a: None)
    assert m["step_conditioning"]["kind"] == "adaln" and m["scoring"].startswith("final-model")
    for st in m["stages"]:
        assert st["loss_last"] < st["loss_first"] and np.isfinite(st["heldout_spearman_final_model"])
    r = make_reward(f"noise-aware@{out}")
    assert r.flops_per_image > make_reward(spec).flops_per_image  # the modulation is charged too
    s1, s2 = r.score_at(x, prompts, step=1), r.score_at(x, prompts, step=2)
    assert not torch.allclose(s1, s2)  # the same weights, told another noise level
    ref = make_reward(spec)
    ref.module = StepConditioned(ref.module, 16)
    ref.module.load_state_dict(load_stage(out / m["step_conditioning"]["final_file"]))
    set_condition(ref.module, m["sigmas"][1])
    torch.testing.assert_close(s1.cpu(), score(ref, x, prompts), rtol=1e-5, atol=1e-5)


def test_film_modulates_the_features_of_linear_layers_on_patches():
    """FiLM-Zero on DigitPatchCNN: its ``conv*`` are Linear layers on [B, 4, 4, c] patches, so the
    scale and shift act on the last (feature) axis, as a hand-written modulation does."""
    from torch.nn import functional as F

    from noisesearch.rewards.digit import build_classifier
    from noisesearch.rewards.step_conditioning import StepConditioned, set_condition

    torch.manual_seed(0)
    inner = build_classifier({"arch": "patch", "c1": 8, "c2": 16}).eval()
    m = StepConditioned(copy.deepcopy(inner), 16).eval()
    for h in m.heads:
        torch.nn.init.normal_(h.weight, std=0.5)
        torch.nn.init.normal_(h.bias, std=0.5)
    x = torch.rand(3, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0, 20.0])
    set_condition(m, sigma)
    got = m(x)
    c = m.embed(m.features(sigma))
    (s1, sc1), (s2, sc2) = (head(c).chunk(2, dim=1) for head in m.heads)  # shift, scale per layer
    b = x.shape[0]
    h = (x * 2 - 1).reshape(b, 4, 2, 4, 2).transpose(2, 3).reshape(b, 4, 4, 4)
    h = F.relu(inner.conv1(h) * (1 + sc1[:, None, None]) + s1[:, None, None])
    h = h.reshape(b, 2, 2, 2, 2, -1).transpose(2, 3).reshape(b, 2, 2, -1)
    h = F.relu(inner.conv2(h) * (1 + sc2[:, None, None]) + s2[:, None, None]).flatten(1)
    torch.testing.assert_close(got, inner.fc(h), rtol=1e-5, atol=1e-5)


def test_train_reward_takes_the_spec_the_pool_was_made_with(tmp_path_factory, capsys):
    """``--reward hps@DIR`` names the same reward in ``pool`` and ``train-reward`` (the pool's key
    ``hps_...`` works too, and a relative spelling of the folder as well)."""
    import os

    from noisesearch.cli import main

    pool, spec, key = _pool(tmp_path_factory, "hps")
    assert key != spec
    common = ["--pool", str(pool), "--steps", "2", "--iters", "2", "--batch-size", "8", "--holdout", "0.3",
              "--no-gate", "--no-progress", "--threads", "1"]
    outs = []
    for i, name in enumerate([spec, f"hps@{os.path.relpath(FIXTURES / 'hps')}", key]):
        out = tmp_path_factory.mktemp(f"na_spec{i}") / "reward"
        assert main(["train-reward", "--reward", name, "--out", str(out)] + common) == 0, capsys.readouterr().err
        outs.append(json.loads((out / "noise_aware.json").read_text()))
    assert all(m["pool_reward"] == key and m["base_reward"] == spec for m in outs)
    assert outs[0]["digest"] == outs[1]["digest"] == outs[2]["digest"]  # the same run, however it is named
    capsys.readouterr()
    assert main(["train-reward", "--reward", "hps@/nowhere", "--out", str(tmp_path_factory.mktemp("x") / "r")] + common) == 2
    assert "no reward 'hps@/nowhere'" in capsys.readouterr().err
