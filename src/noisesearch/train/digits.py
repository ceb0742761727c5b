"""Training and evaluation of the built-in digits model, the reward classifier and the judge.

* ``train_all(out, what, seed)`` (CLI ``noisesearch train-digits --out DIR``) writes
  ``digits_split.json``, ``digits_denoiser.safetensors``, ``digit_classifier.safetensors`` and
  ``digit_judge.safetensors`` to ``DIR``; with the default seed it reproduces the shipped files in
  ``noisesearch/weights`` (up to floating-point differences between machines / thread counts).
* ``python -m noisesearch.train.digits --eval [--weights DIR]`` prints every figure quoted in
  ``docs/digits.md``.

Data: ``sklearn.datasets.load_digits`` (1797 images, 8x8, values 0..16). The split (index lists
into that array) is ``test`` (300 images, held out from everything) and two class-stratified
halves of the rest: the denoiser trains on ``train_a + train_b``, the reward classifier on
``train_a`` only, the judge on ``train_b`` only.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from noisesearch.io import atomic_write_text
from noisesearch.models.digits import (
    DENOISER_FILE,
    NULL_LABEL,
    SPLIT_FILE,
    WEIGHTS_DIR,
    DigitsDenoiser,
    EDMDigits,
    measure_call_flops,
    save_weights,
)
from noisesearch.noise import NoiseSource
from noisesearch.progress import Progress
from noisesearch.rewards.digit import (
    CLASSIFIER_FILE,
    JUDGE_FILE,
    build_classifier,
    load_classifier,
    load_judge,
    measure_image_flops,
)
from noisesearch.sampling import EulerAncestral

N_TEST = 300
P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal training distribution of sigma

DENOISER_DEFAULTS = dict(epochs=500, batch_size=256, lr=2e-3, ema_decay=0.999, label_dropout=0.15, ch=16, emb_dim=128)
CLASSIFIER_DEFAULTS = dict(epochs=150, batch_size=64, lr=1e-3, weight_decay=1e-4)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # deferred: heavy (scikit-learn), only training the digits models reads its data set

    d = load_digits()
    return d.images, d.target


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits: images [N, 1, 8, 8] in [-1, 1] (float32) and labels [N] (long)."""
    images, target = _load_digits_arrays()
    x = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return x, torch.tensor(target, dtype=torch.long)


def make_split(seed: int = 0, n_test: int = N_TEST) -> dict[str, list[int]]:
    """Seeded class-stratified split: ``test`` (``n_test`` images), ``train_a`` and ``train_b``.

    Per class (in a seeded random order) the test share is ``n_test * n_class / N`` rounded by
    largest remainder so that it sums to ``n_test``; the remaining images of the class alternate
    between train_a and train_b.
    """
    _, y = digits_dataset()
    y = y.numpy()
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = n_test * counts / len(y)
    n_cls = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - n_cls), kind="stable")[: n_test - n_cls.sum()]:
        n_cls[i] += 1
    split: dict[str, list[int]] = {"test": [], "train_a": [], "train_b": []}
    for c, k in zip(classes, n_cls):
        idx = rng.permutation(np.flatnonzero(y == c))
        split["test"] += idx[:k].tolist()
        split["train_a"] += idx[k::2].tolist()
        split["train_b"] += idx[k + 1 :: 2].tolist()
    return {k: sorted(int(i) for i in v) for k, v in split.items()}


def save_split(split: dict, path: str | os.PathLike, seed: int) -> None:
    atomic_write_text(Path(path), json.dumps({"seed": seed, "source": "sklearn.datasets.load_digits", **split}, indent=None) + "\n")


def load_split(path: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """The split saved at ``path`` (default: the shipped ``weights/digits_split.json``)."""
    path = Path(path) if path else WEIGHTS_DIR / SPLIT_FILE
    with open(path) as f:
        d = json.load(f)
    return {k: d[k] for k in ("test", "train_a", "train_b")}


def split_data(split: dict, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels) of one part, or of several joined by ``+`` (``train_a+train_b``)."""
    x, y = digits_dataset()
    idx = torch.tensor(sum((split[p] for p in part.split("+")), []), dtype=torch.long)
    return x[idx], y[idx]


def _progress(total: int, desc: str, enabled: bool):
    return Progress(total, desc=desc, enabled=enabled)


def _cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------
# denoiser
# ---------------------------------------------------------------------------------------------
def edm_loss(model: EDMDigits, y: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EDM training loss: sigma ~ exp(N(P_mean, P_std^2)),
    weight(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, loss = weight * |D(y + n) - y|^2."""
    b = y.shape[0]
    sigma = (torch.randn(b, generator=gen) * P_STD + P_MEAN).exp()
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    n = torch.randn(y.shape, generator=gen) * sigma.view(-1, 1, 1, 1)
    D = model(y + n, sigma, labels)
    return (weight.view(-1, 1, 1, 1) * (D - y) ** 2).mean()


def train_denoiser(
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int = 0,
    epochs: int = DENOISER_DEFAULTS["epochs"],
    batch_size: int = DENOISER_DEFAULTS["batch_size"],
    lr: float = DENOISER_DEFAULTS["lr"],
    ema_decay: float = DENOISER_DEFAULTS["ema_decay"],
    label_dropout: float = DENOISER_DEFAULTS["label_dropout"],
    ch: int = DENOISER_DEFAULTS["ch"],
    emb_dim: int = DENOISER_DEFAULTS["emb_dim"],
    progress: bool = True,
) -> EDMDigits:
    """Train the EDM digits denoiser on images ``x`` in [-1, 1] with labels ``y``; returns the EMA
    of the weights. Adam with linear warm-up then cosine decay; labels are replaced by the null label
    with probability ``label_dropout`` (for unconditional sampling and CFG)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = EDMDigits(ch=ch, emb_dim=emb_dim)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    model.train()
    with _progress(total, "denoiser", progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for lo in range(0, n, batch_size):
                idx = perm[lo : lo + batch_size]
                labels = y[idx].clone()
                labels[torch.rand(len(idx), generator=gen) < label_dropout] = NULL_LABEL
                for g in opt.param_groups:
                    g["lr"] = _cosine_lr(step, total, lr, warmup=200)
                loss = edm_loss(model, x[idx], labels, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                decay = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - decay)
                step += 1
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


# ---------------------------------------------------------------------------------------------
# classifiers
# ---------------------------------------------------------------------------------------------
def augment(images01: torch.Tensor, gen: torch.Generator, blur: bool = True) -> torch.Tensor:
    """Mild augmentation of [B, 1, 8, 8] images in [0, 1]: a random shift by up to one pixel (half
    the images), a partial 3x3 blur (a third, if ``blur``), Gaussian pixel noise (half)."""
    b = images01.shape[0]
    x = images01
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    keep = torch.rand(b, generator=gen) < 0.5
    dx[keep], dy[keep] = 1, 1
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, :, None].expand(b, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, :].expand(b, 8, 8)
    x = padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    if blur:
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
        alpha = torch.rand(b, 1, 1, 1, generator=gen) * 0.6 * (torch.rand(b, 1, 1, 1, generator=gen) < 1 / 3)
        x = (1 - alpha) * x + alpha * blurred
    std = torch.rand(b, 1, 1, 1, generator=gen) * 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    x = x + std * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def train_classifier(
    config: dict,
    x01: torch.Tensor,
    y: torch.Tensor,
    seed: int = 0,
    epochs: int = CLASSIFIER_DEFAULTS["epochs"],
    batch_size: int = CLASSIFIER_DEFAULTS["batch_size"],
    lr: float = CLASSIFIER_DEFAULTS["lr"],
    weight_decay: float = CLASSIFIER_DEFAULTS["weight_decay"],
    blur: bool = True,
    desc: str = "classifier",
    progress: bool = True,
):
    """Train a digit classifier (``build_classifier(config)``) on images in [0, 1] with
    cross-entropy, AdamW and cosine decay, with ``augment``ed batches."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    module = build_classifier(config)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    n = x01.shape[0]
    total = epochs * math.ceil(n / batch_size)
    step = 0
    module.train()
    with _progress(total, desc, progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for lo in range(0, n, batch_size):
                idx = perm[lo : lo + batch_size]
                for g in opt.param_groups:
                    g["lr"] = _cosine_lr(step, total, lr, warmup=50)
                loss = F.cross_entropy(module(augment(x01[idx], gen, blur)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
    return module.eval()


CLASSIFIER_CONFIG = dict(arch="patch", c1=32, c2=64, dropout=0.1)
JUDGE_CONFIG = dict(arch="mlp", hidden=256, dropout=0.3)


@torch.no_grad()
def accuracy(module, x01: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    return float((module(x01).argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------------------------
# sampling-based evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_digits(denoiser, labels: torch.Tensor, seed: int = 0, steps: int = 18) -> torch.Tensor:
    """Decoded samples [B, 1, 8, 8] in [0, 1] for digit ``labels`` with EulerAncestral (Karras
    schedule, ``steps`` steps); one noise stream per sample (``noisesearch.noise``) under ``seed``."""
    sampler = EulerAncestral(denoiser, steps)

    noise = NoiseSource(seed, sampler.noise_shape, [(i, 0) for i in range(len(labels))], denoiser.device, denoiser.dtype)
    cond = denoiser.encode([str(int(c)) for c in labels])
    state = sampler.start(cond, noise.normal(torch.arange(len(labels))))
    state = sampler.rollout(state, noise)
    return denoiser.decode(state.x0)


def evaluate(weights_dir: str | os.PathLike | None = None, n_per_digit: int = 100, seed: int = 0) -> dict:
    """Every figure in docs/digits.md, computed from the files in ``weights_dir``."""
    wdir = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    split = load_split(wdir / SPLIT_FILE)
    clf = load_classifier(weights=wdir / CLASSIFIER_FILE)
    judge = load_judge(weights=wdir / JUDGE_FILE)
    r: dict = {"split": {k: len(v) for k, v in split.items()}}
    r["files_bytes"] = {f: (wdir / f).stat().st_size for f in (DENOISER_FILE, CLASSIFIER_FILE, JUDGE_FILE, SPLIT_FILE)}
    xt, yt = split_data(split, "test")
    x01 = (xt + 1) / 2
    r["classifier_test_acc"] = accuracy(clf.module, x01, yt)
    r["judge_test_acc"] = accuracy(judge.module, x01, yt)
    r["classifier_judge_agreement_test"] = float((clf.predict(x01)[0] == judge.predict(x01)[0]).float().mean())
    r["params"] = {"classifier": sum(p.numel() for p in clf.module.parameters()), "judge": sum(p.numel() for p in judge.module.parameters())}
    r["flops_per_image"] = {"classifier": clf.flops_per_image, "judge": judge.flops_per_image}

    labels = torch.arange(10).repeat_interleave(n_per_digit)
    for g in (1.0, 2.0):
        den = DigitsDenoiser(guidance=g, weights=wdir / DENOISER_FILE)
        imgs = sample_digits(den, labels, seed=seed)
        jc, jp = judge.predict(imgs)
        cc, _ = clf.predict(imgs)
        per = [float((jc[labels == d] == d).float().mean()) for d in range(10)]
        r[f"guidance_{g:g}"] = {
            "judge_acc": float((jc == labels).float().mean()),
            "judge_acc_min_digit": min(per),
            "classifier_acc": float((cc == labels).float().mean()),
            "judge_mean_conf": float(jp.mean()),
            "reward_mean": float(clf(imgs, [str(int(c)) for c in labels]).mean()),
        }
    den0 = DigitsDenoiser(guidance=0.0, weights=wdir / DENOISER_FILE)
    imgs = sample_digits(den0, labels, seed=seed)  # labels are ignored at guidance 0
    jc, jp = judge.predict(imgs)
    hist = torch.bincount(jc, minlength=10).tolist()
    r["guidance_0"] = {"judge_class_counts": hist, "judge_mean_conf": float(jp.mean()), "n": len(labels)}

    den1 = DigitsDenoiser(guidance=1.0, weights=wdir / DENOISER_FILE)
    r["denoiser_params"] = sum(p.numel() for p in den1.model.parameters())
    r["denoiser_flops_per_call"] = {"guidance 1": den1.flops_per_call, "guidance 2": DigitsDenoiser(2.0, weights=wdir / DENOISER_FILE).flops_per_call}
    xb = torch.randn(512, 1, 8, 8)
    sb = torch.full((512,), 1.0)
    cb = den1.encode(["3"] * 512)
    times = []
    with torch.no_grad():
        for _ in range(3):
            den1(xb, sb, cb)
        for _ in range(30):
            t0 = time.perf_counter()
            den1(xb, sb, cb)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    r["denoiser_ms_per_call_batch512"] = {"min": times[0], "median": times[len(times) // 2]}
    r["torch_threads"] = torch.get_num_threads()
    return r


# ---------------------------------------------------------------------------------------------
# everything
# ---------------------------------------------------------------------------------------------
WHAT = ("all", "denoiser", "classifier", "judge")


def train_all(
    out: str | os.PathLike,
    what: str = "all",
    seed: int = 0,
    epochs: int | None = None,
    classifier_epochs: int | None = None,
    progress: bool = True,
    log=print,
    threads: int = 1,
) -> dict:
    """Train ``what`` with ``seed`` and write the split and weights to ``out`` (atomically).

    Runs on the CPU with ``threads`` torch threads (default 1: the networks are so small that one
    thread is nearly as fast as two, it stays fast on a busy machine, and results do not depend on
    the machine's core count). Returns the seconds each part took and the classifiers' test
    accuracies.
    """
    if what not in WHAT:
        raise ValueError(f"what must be one of {WHAT}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_all(Path(out), what, seed, epochs, classifier_epochs, progress, log)
    finally:
        torch.set_num_threads(previous)


def _train_all(out: Path, what, seed, epochs, classifier_epochs, progress, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    split = make_split(seed)
    save_split(split, out / SPLIT_FILE, seed)
    log("split: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()) + f" -> {out / SPLIT_FILE}")
    result: dict = {"seconds": {}}
    xt, yt = split_data(split, "test")
    for name, part, config, fname, kind, blur in (
        ("classifier", "train_a", CLASSIFIER_CONFIG, CLASSIFIER_FILE, "digit_classifier", True),
        ("judge", "train_b", JUDGE_CONFIG, JUDGE_FILE, "digit_judge", False),
    ):
        if what not in ("all", name):
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = split_data(split, part)
        kw = {} if classifier_epochs is None else {"epochs": classifier_epochs}
        module = train_classifier(config, (x + 1) / 2, y, seed=seed, blur=blur, desc=name, progress=progress, **kw)
        flops = {"per_image": measure_image_flops(module)}
        save_weights(out / fname, module.state_dict(), kind, module.config, flops)
        acc = accuracy(module, (xt + 1) / 2, yt)
        result["seconds"][name] = time.perf_counter() - t0
        result[f"{name}_test_acc"] = acc
        log(f"{name} ({config['arch']}, trained on {part}, {len(y)} images): test accuracy {acc:.4f} "
            f"({len(yt)} images) -> {out / fname} [{result['seconds'][name]:.0f} s wall, "
            f"{time.process_time() - c0:.0f} s CPU]")
    if what in ("all", "denoiser"):
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = split_data(split, "train_a+train_b")
        kw = {} if epochs is None else {"epochs": epochs}
        model = train_denoiser(x, y, seed=seed, progress=progress, **kw)
        save_weights(out / DENOISER_FILE, model.state_dict(), "digits_denoiser", model.config, measure_call_flops(model))
        result["seconds"]["denoiser"] = time.perf_counter() - t0
        log(f"denoiser (trained on train_a+train_b, {len(y)} images) -> {out / DENOISER_FILE} "
            f"[{result['seconds']['denoiser']:.0f} s wall, {time.process_time() - c0:.0f} s CPU]")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m noisesearch.train.digits",
        description="Evaluate (--eval) the digits model, reward classifier and judge; or train them (see noisesearch train-digits).",
    )
    p.add_argument("--eval", action="store_true", help="print the figures quoted in docs/digits.md")
    p.add_argument("--weights", default=None, help="directory with the weights and split (default: the shipped ones)")
    p.add_argument("--n-per-digit", type=int, default=100, help="samples per digit for the sampling figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.eval:
        p.print_help()
        return 2
    r = evaluate(args.weights, args.n_per_digit, args.seed)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"split sizes: {r['split']}")
    print(f"file sizes (bytes): {r['files_bytes']}")
    print(f"parameters: denoiser {r['denoiser_params']}, classifier {r['params']['classifier']}, judge {r['params']['judge']}")
    print(f"FLOPs: denoiser per call {r['denoiser_flops_per_call']}, per image {r['flops_per_image']}")
    print(f"reward classifier test accuracy: {r['classifier_test_acc']:.4f} ({r['split']['test']} images)")
    print(f"judge test accuracy:             {r['judge_test_acc']:.4f}")
    print(f"classifier/judge agreement on test: {r['classifier_judge_agreement_test']:.4f}")
    for g in ("1", "2"):
        s = r[f"guidance_{g}"]
        print(f"guidance {g}: {10 * args.n_per_digit} samples (EulerAncestral, 18 steps, seed {args.seed}): "
              f"judge accuracy {s['judge_acc']:.4f} (worst digit {s['judge_acc_min_digit']:.2f}), "
              f"classifier accuracy {s['classifier_acc']:.4f}, mean judge confidence {s['judge_mean_conf']:.3f}, "
              f"mean reward {s['reward_mean']:.3f}")
    s = r["guidance_0"]
    print(f"guidance 0: judge classes of {s['n']} unconditional samples: {s['judge_class_counts']}, "
          f"mean judge confidence {s['judge_mean_conf']:.3f}")
    t = r["denoiser_ms_per_call_batch512"]
    print(f"denoiser call, batch 512, guidance 1: min {t['min']:.1f} ms, median {t['median']:.1f} ms of 30 "
          f"({r['torch_threads']} torch threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
