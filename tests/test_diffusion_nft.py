"""diffusion_nft.py: the optimality probability and the loss against hand computations and a transcription of the
official code, AdvantageFlow's Prop. 3 (NFT's loss is AF(gamma = 1 - A, lambda = 0)), the one-iteration gradient, the
evaluation EMA, argument errors and smoke runs."""

import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

import advantageflow as af
import diffusion_nft as nft
from common import models, rewards, run, sampling
from tests.helpers import prewarmed
from tests.helpers.cli_check import check_flags
from tests.helpers.loss_batch import grad_v as _grad, loss_batch as _batch
from tests.helpers.run_logs import first_iteration, scalars

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--threads", "1", "--prompts-per-iter", "2", "--group-size", "3", "--train-batch-size", "3",
        "--eval-samples-per-prompt", "1", "--num-steps", "3"]


def test_nft_optimality_hand_computed():
    """Official stat_tracking.py: z = (R - group mean) / (np.std of all rewards + 1e-4); np.std is the population
    std (ddof 0): here sqrt(mean((R - 0.6)^2)) = sqrt(0.14)."""
    rewards_ = [0.0, 1.0, 0.5, 0.5, 1.0]
    groups = torch.tensor([0, 0, 1, 1, 1])
    std = statistics.pstdev(rewards_)
    assert std == pytest.approx(math.sqrt(0.14))
    z = torch.tensor([-0.5, 0.5, -1 / 6, -1 / 6, 1 / 3]) / (std + 1e-4)
    r = nft.nft_optimality(torch.tensor(rewards_), groups, 5.0)
    assert torch.allclose(r, (z.clamp(-5, 5) / 5 / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert r[1].item() == pytest.approx(0.5 + 0.5 / (math.sqrt(0.14) + 1e-4) / 10, abs=1e-6)

@pytest.mark.parametrize("weighting", ["none", "shared"])
def test_af_one_minus_a_equals_nft_beta_one(weighting):
    """AF paper eq. 14 / Proposition 3: AF(gamma = 1 - A, lambda = 0) and DiffusionNFT(beta = 1, r = (1 + A)/2)
    have identical gradients with plain prediction losses, and also with one shared adaptive denominator."""
    b = _batch(seed=3)
    r = (1 + b["adv"]) / 2

    def af_fn(v):
        return af.af_loss(v, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["sigma"], b["adv"], 1 - b["adv"], 0.0,
                          weighting)

    def nft_fn(v):
        return nft.nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, 1.0, weighting)

    g_af, g_nft = _grad(af_fn, b), _grad(nft_fn, b)
    assert torch.allclose(g_af, g_nft, atol=1e-6)
    assert g_af.abs().max() > 1e-3


def test_nft_run_is_af_with_clip5_advantage_and_kappa5():
    """What a diffusion_nft.py run optimises (plain prediction losses): 5 * NFT(beta = 1, r = clip(z, -5, 5)/10 + 1/2) has the
    gradient of AF with A = clip(z, -5, 5), gamma = 5 - A, lambda = 0, i.e. curvature kappa = 5 for every sample
    (docs/diffusion_nft.md); z is the reward z-score over the global population std."""
    b = _batch(seed=4)
    rewards_ = torch.zeros(120)  # 60 pairs; one outlier pair gives |z| ~ 5.5 (clipped), another |z| < 5
    rewards_[0], rewards_[2] = 1.0, 0.3
    groups = torch.arange(120) // 2
    r = nft.nft_optimality(rewards_, groups, 5.0)[:6]
    z = (rewards_ - utils_group_mean(rewards_, groups)) / (rewards_.std(unbiased=False) + 1e-4)
    a = z.clamp(-5, 5)[:6]
    assert (a.abs() == 5).any() and (a.abs() < 5).any()  # both regimes occur
    g_nft = _grad(lambda v: 5 * nft.nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, 1.0, "none"), b)
    g_af = _grad(lambda v: af.af_loss(v, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["sigma"], a, 5 - a, 0.0), b)
    assert torch.allclose(g_nft, g_af, atol=1e-5)

def utils_group_mean(x, groups):
    return torch.stack([x[groups == g].mean() for g in groups.tolist()])

def official_nft_loss(v, v_old, x0, x_t, sigma, r, beta):
    """DiffusionNFT's per-sample loss, transcribed term by term from scripts/train_nft_sd3.py: implicit positive
    beta v + (1 - beta) v_old and negative (1 + beta) v_old - beta v, each turned into an x0 prediction, squared
    error divided by its own float64 adaptive weight max(mean|pred - x0|, 1e-5), then r P / beta + (1 - r) N / beta."""
    out = []
    for k in range(len(r)):
        s = sigma[k].item()
        pos_pred = x_t[k] - s * (beta * v[k] + (1 - beta) * v_old[k])
        neg_pred = x_t[k] - s * ((1 + beta) * v_old[k] - beta * v[k])
        w_pos = max((pos_pred.double() - x0[k].double()).abs().mean().item(), 1e-5)
        w_neg = max((neg_pred.double() - x0[k].double()).abs().mean().item(), 1e-5)
        p = ((pos_pred - x0[k]) ** 2 / w_pos).mean()
        n = ((neg_pred - x0[k]) ** 2 / w_neg).mean()
        out.append(r[k] * p / beta + (1 - r[k]) * n / beta)
    return torch.stack(out)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_nft_loss_matches_official_transcription(beta):
    """At beta = 1, (1 + beta) v_old - beta v and 2 v_old - beta v coincide; beta = 0.1 tells them apart."""
    b = _batch(seed=7)
    r = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.9])
    mine = nft.nft_loss(b["v"], b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta, "separate")
    ref = official_nft_loss(b["v"], b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta)
    assert torch.allclose(mine, ref.float(), rtol=1e-5)
    g_mine = _grad(lambda v: nft.nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta, "separate"), b)
    g_ref = _grad(lambda v: official_nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta), b)
    assert torch.allclose(g_mine, g_ref.float(), rtol=1e-4, atol=1e-7)

def test_eval_ema_decay_and_swap():
    """DiffusionNFT's evaluation EMA: after optimizer step s, ema <- d ema + (1 - d) theta, d = min((1+s)/(10+s), 0.9);
    swapped() shows the EMA and restores the learner."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = run.EMA([p], 0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step(1)  # d = 2/11
    assert ema.shadow[0][0].item() == pytest.approx(9 / 11)
    ema.step(100)  # d = 0.9 (capped)
    assert ema.shadow[0][0].item() == pytest.approx(0.9 * 9 / 11 + 0.1)
    with ema.swapped():
        assert p[0].item() == pytest.approx(0.9 * 9 / 11 + 0.1)
    assert p[0].item() == 1.0


def test_one_iteration_loss_is_the_mean_over_images_and_timesteps(tmp_path):
    """The gradient the script accumulates over 2 micro-batches x int(0.99 * 3) = 2 distinct grid timesteps must be
    that of ONE mean over all 6 x 2 (image, timestep) items (official: loss / (grad-accumulation x timesteps)): the
    logged pre-clip gradient norm against this computation."""
    flags = ["--num-iterations", "1", "--threads", "1", "--prompts-per-iter", "2", "--group-size", "3",
             "--train-batch-size", "3", "--num-steps", "3", "--eval-samples-per-prompt", "1", "--no-save-model",
             "--reward", "jpeg_compressibility", "--eval-ema", "0"]
    out_dir, _ = _run(tmp_path, *flags)
    logged = scalars(out_dir, "losses/grad_norm")[1]

    torch.set_num_threads(1)
    model, captions, meta, groups, pe, pooled, gen = first_iteration(2, 3)
    policy = models.Policy(model.transformer, 0, None, with_old=True)
    sigmas, n, n_t = model.sigmas(3), 6, 2
    noise = torch.randn(n, *model.latent_shape, generator=gen)
    with policy.old() as old:
        x0 = sampling.sample(old, pe, pooled, sigmas, noise)["latents"]
    reward, _ = rewards.build_reward("jpeg_compressibility")(model.decode(x0), captions, meta)
    grid = torch.rand(n, 3, generator=gen).argsort(1)[:, :n_t]  # distinct grid points per image
    sigma = torch.cat([sigmas[grid[:, j]] for j in range(n_t)])  # (n * n_t,) all items in one batch
    eps = torch.cat([torch.randn(n, *model.latent_shape, generator=gen) for _ in range(n_t)])
    x0, pe, pooled = x0.repeat(n_t, 1, 1, 1), pe.repeat(n_t, 1, 1), pooled.repeat(n_t, 1)
    assert len(set(grid[0].tolist())) == n_t
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad(), policy.old() as old, policy.ref() as ref:
        v_old, v_ref = sampling.predict(old, x_t, sigma, pe, pooled), sampling.predict(ref, x_t, sigma, pe, pooled)
    v = sampling.predict(policy.transformer, x_t, sigma, pe, pooled)
    # official: 5 * mean[(r P + (1 - r) N) / beta] + 1e-4 * mean (v - v_ref)^2
    r = nft.nft_optimality(reward, groups, 5.0).repeat(n_t)
    loss = 5 * nft.nft_loss(v, v_old, x0, x_t, sigma, r, 1.0).mean() + 1e-4 * ((v - v_ref) ** 2).mean()
    loss.backward()
    expected = torch.stack([p.grad.norm() for p in policy.parameters()]).norm().item()
    assert expected > 1e-4
    assert logged == pytest.approx(expected, rel=1e-3)


def test_bad_flags_fail_before_loading():
    code, err = check_flags("diffusion_nft", ["--adaptive-weight", "big"])
    assert code != 0 and err == ["error: unknown --adaptive-weight 'big'; choose from: separate, shared, none"]
    code, err = check_flags("diffusion_nft", ["--beta", "0"])
    assert code != 0 and err == ["error: --beta 0.0 and --adv-clip 5.0 must be > 0"]
    code, err = check_flags("diffusion_nft", ["--num-steps", "3", "--timestep-fraction", "0.2"])
    assert code != 0 and "distinct grid sigmas per image" in err[0]
    code, err = check_flags("diffusion_nft", ["--group-size", "1"])
    assert code != 0 and "--group-size 1 must be >= 2" in err[0]


def _run(tmp_path, *extra, name="run"):
    out_dir = tmp_path / name
    out = prewarmed.run(["diffusion_nft.py", "--output-dir", out_dir, *extra], cwd=ROOT, env=ENV, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out_dir, json.loads((out_dir / "summary.json").read_text())


@pytest.mark.parametrize("flags", [[], ["--lora-rank", "4", "--kl-coef", "0"]])
def test_smoke_embedded(tmp_path, flags):
    out_dir, summary = _run(tmp_path, "--num-iterations", "2", *TINY, *flags)
    assert summary["reward_queries"] == 2 * 6
    for k in ("base", "final"):
        assert 0 <= summary[k]["reward_mean"] <= 1 and "strict_accuracy" in summary[k] and "accuracy" in summary[k]
    assert (out_dir / "checkpoint.pt").is_file()
    assert (out_dir / ("lora" if "--lora-rank" in flags else "transformer")).is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir))
    acc.Reload()
    has_kl_metric = "losses/v_minus_v_ref_sq" in acc.Tags()["scalars"]
    assert has_kl_metric == ("--kl-coef" not in flags)  # no KL term, no KL metric (not |v|^2 under another name)


def test_smoke_tiny_sd3(tmp_path):
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    path = build_tiny_sd3(tmp_path / "sd3")
    out_dir, summary = _run(tmp_path, "--model", str(path), "--resolution", "32", "--lora-rank", "4",
                            "--num-iterations", "1", *TINY)
    assert (out_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert summary["reward_queries"] == 6 and "reward_mean" in summary["final"]
