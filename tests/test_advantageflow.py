"""AdvantageFlow: advantage and loss math against hand computations, the DiffusionNFT loss against a transcription
of the official code, the DiffusionNFT identities, the direction of one update, one iteration of the real loop
against a one-batch computation, smoke runs on the embedded and tiny SD3 models, and a learning test."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import advantageflow as af
from common import models, rewards, run, sampling
from tests.helpers.cli_check import check_flags
from tests.helpers.run_logs import first_iteration, scalars

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--threads", "1", "--prompts-per-iter", "2", "--group-size", "3", "--train-batch-size", "3",
        "--eval-samples-per-prompt", "1", "--num-steps", "3"]


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, 3, 4, 4, generator=g)  # noqa: E731
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    return dict(v=r().requires_grad_(), v_old=r(), v_ref=r(), x0=r(), x_t=r(), sigma=sigma,
                adv=torch.rand(b, generator=g) * 2 - 1)


def test_af_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    groups = torch.tensor([7, 7, 7, 2, 2, 2])
    # centred: [-1, 0, 1, -4/3, -4/3, 8/3]; Z = sqrt(mean of squares)
    centred = torch.tensor([-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3])
    z = (centred.pow(2).sum() / 6).sqrt()
    expected = (centred / z).clamp(-1, 1)
    assert torch.allclose(af.af_advantages(rewards, groups), expected)
    assert af.af_advantages(rewards, groups)[5] == 1.0  # clipped


def test_nft_optimality_hand_computed():
    """Official stat_tracking.py: z = (R - group mean) / (np.std of all rewards + 1e-4); np.std is the population
    std (ddof 0): here sqrt(mean((R - 0.6)^2)) = sqrt(0.14)."""
    rewards_ = [0.0, 1.0, 0.5, 0.5, 1.0]
    groups = torch.tensor([0, 0, 1, 1, 1])
    std = statistics.pstdev(rewards_)
    assert std == pytest.approx(math.sqrt(0.14))
    z = torch.tensor([-0.5, 0.5, -1 / 6, -1 / 6, 1 / 3]) / (std + 1e-4)
    r = af.nft_optimality(torch.tensor(rewards_), groups, 5.0)
    assert torch.allclose(r, (z.clamp(-5, 5) / 5 / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert r[1].item() == pytest.approx(0.5 + 0.5 / (math.sqrt(0.14) + 1e-4) / 10, abs=1e-6)


def _grad(loss_fn, batch):
    v = batch["v"].detach().clone().requires_grad_()
    loss_fn(v).sum().backward()
    return v.grad


def test_completed_square_equals_three_term_loss():
    """AF §3 (the completed square): the loss and kappa||f - f*||^2 (f* = (A x0 + gamma f_old + lam f_ref)/kappa) differ by a
    theta-independent constant, so their gradients are equal."""
    b = _batch()
    gamma, lam = 1.1, 1e-3
    s = b["sigma"].view(-1, 1, 1, 1)
    a = b["adv"].view(-1, 1, 1, 1)

    def completed(v):
        f, f_old, f_ref = b["x_t"] - s * v, b["x_t"] - s * b["v_old"], b["x_t"] - s * b["v_ref"]
        kappa = a + gamma + lam
        f_star = (a * b["x0"] + gamma * f_old + lam * f_ref) / kappa
        return (kappa * (f - f_star) ** 2).mean(dim=(1, 2, 3))

    def loss(v):
        return af.af_loss(v, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["sigma"], b["adv"], gamma, lam, "none")

    assert torch.allclose(_grad(completed, b), _grad(loss, b), atol=1e-6)
    other = b["v"].detach() + 0.3
    d1 = completed(b["v"].detach()) - loss(b["v"].detach())
    d2 = completed(other) - loss(other)
    assert torch.allclose(d1, d2, atol=1e-5)  # the difference does not depend on theta


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
        return af.nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, 1.0, weighting)

    g_af, g_nft = _grad(af_fn, b), _grad(nft_fn, b)
    assert torch.allclose(g_af, g_nft, atol=1e-6)
    assert g_af.abs().max() > 1e-3


def test_nft_run_is_af_with_clip5_advantage_and_kappa5():
    """What a --nft run optimises (plain prediction losses): 5 * NFT(beta = 1, r = clip(z, -5, 5)/10 + 1/2) has the
    gradient of AF with A = clip(z, -5, 5), gamma = 5 - A, lambda = 0, i.e. curvature kappa = 5 for every sample
    (docs/advantageflow.md); z is the reward z-score over the global population std."""
    b = _batch(seed=4)
    rewards_ = torch.zeros(120)  # 60 pairs; one outlier pair gives |z| ~ 5.5 (clipped), another |z| < 5
    rewards_[0], rewards_[2] = 1.0, 0.3
    groups = torch.arange(120) // 2
    r = af.nft_optimality(rewards_, groups, 5.0)[:6]
    z = (rewards_ - utils_group_mean(rewards_, groups)) / (rewards_.std(unbiased=False) + 1e-4)
    a = z.clamp(-5, 5)[:6]
    assert (a.abs() == 5).any() and (a.abs() < 5).any()  # both regimes occur
    g_nft = _grad(lambda v: 5 * af.nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, 1.0, "none"), b)
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
    mine = af.nft_loss(b["v"], b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta, "separate")
    ref = official_nft_loss(b["v"], b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta)
    assert torch.allclose(mine, ref.float(), rtol=1e-5)
    g_mine = _grad(lambda v: af.nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta, "separate"), b)
    g_ref = _grad(lambda v: official_nft_loss(v, b["v_old"], b["x0"], b["x_t"], b["sigma"], r, beta), b)
    assert torch.allclose(g_mine, g_ref.float(), rtol=1e-4, atol=1e-7)


def test_af_gradient_hand_computed():
    """d/dv of mean_dims[A (f - x0)^2 + gamma (f - f_old)^2 + lam (f - f_ref)^2], f = x_t - sigma v, is
    -2 sigma [A (f - x0) + gamma (f - f_old) + lam (f - f_ref)] / N (N latent elements), away from the rollout
    policy (where the gamma term matters) and at it (where its gradient vanishes, whatever gamma)."""
    b = _batch(seed=5)
    n_el = b["x0"][0].numel()
    s, a = b["sigma"].view(-1, 1, 1, 1), b["adv"].view(-1, 1, 1, 1)
    for gamma, lam in ((1.1, 1e-3), (0.3, 0.5)):
        f = b["x_t"] - s * b["v"].detach()
        f_old, f_ref = b["x_t"] - s * b["v_old"], b["x_t"] - s * b["v_ref"]
        hand = -2 * s * (a * (f - b["x0"]) + gamma * (f - f_old) + lam * (f - f_ref)) / n_el
        g = _grad(lambda v: af.af_loss(v, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["sigma"], b["adv"], gamma, lam), b)
        assert torch.allclose(g, hand, atol=1e-6)
        assert (gamma * (f - f_old)).abs().max() > 0.1  # the gamma term is a visible part of it
    on_policy = dict(b, v=b["v_old"].clone())
    g1 = _grad(lambda v: af.af_loss(v, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["sigma"], b["adv"], 1.1, 1e-3), on_policy)
    g2 = _grad(lambda v: af.af_loss(v, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["sigma"], b["adv"], 3.0, 1e-3), on_policy)
    assert torch.allclose(g1, g2, atol=1e-7)


@pytest.mark.parametrize("adv", [0.8, -0.8])
def test_af_update_direction_and_gamma_bound(adv):
    """One sample, the prediction f = x_t - sigma v as a free tensor starting at the rollout prediction: a small
    gradient step moves f toward x0 for A > 0 and away for A < 0 (AF §3.1); run to convergence with gamma = 1.1
    it stops at f* = (A x0 + gamma f_old) / (A + gamma) (eq. 7: convex), with gamma = 0 and A < 0 it runs away."""
    g = torch.Generator().manual_seed(11)
    x0, x_t, v_old = (torch.randn(1, 2, 3, 3, generator=g) for _ in range(3))
    sigma, a = torch.tensor([0.6]), torch.tensor([adv])
    f_old = x_t - 0.6 * v_old

    def dist_to_x0(v):
        return (x_t - 0.6 * v - x0).norm().item()

    def descend(gamma, steps, lr=5.0):
        v = v_old.clone().requires_grad_()
        for _ in range(steps):
            loss = af.af_loss(v, v_old, v_old, x0, x_t, sigma, a, gamma, 0.0).sum()
            (grad,) = torch.autograd.grad(loss, v)
            v = (v - lr * grad).detach().requires_grad_()
        return v.detach()

    start, one = dist_to_x0(v_old), dist_to_x0(descend(1.1, 1))
    assert (one < start) if adv > 0 else (one > start)
    f_star = (adv * x0 + 1.1 * f_old) / (adv + 1.1)
    assert torch.allclose(x_t - 0.6 * descend(1.1, 3000), f_star, atol=1e-4)  # bounded by gamma
    if adv < 0:  # no rollout regularisation: the concave loss pushes f without bound
        far = (x_t - 0.6 * descend(0.0, 100) - f_old).norm() / (x0 - f_old).norm()
        assert far > 100


def test_bad_flags_fail_before_loading():
    code, err = check_flags("advantageflow", ["--gamma-mode", "big"])
    assert code != 0 and err == ["error: unknown --gamma-mode 'big'; choose from: constant, one-minus-a"]
    code, err = check_flags("advantageflow", ["--eval-num-steps", "0"])
    assert code != 0 and err == ["error: --eval-num-steps 0 must be >= 1"]
    code, err = check_flags("advantageflow", ["--num-steps", "3", "--timesteps-per-image", "4"])
    assert code != 0 and "distinct grid sigmas per image" in err[0]


def _run(tmp_path, *extra, name="run"):
    out_dir = tmp_path / name
    out = subprocess.run([sys.executable, "advantageflow.py", "--output-dir", str(out_dir), *extra],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out_dir, json.loads((out_dir / "summary.json").read_text())


@pytest.mark.parametrize("flags", [[], ["--nft"], ["--gamma-mode", "one-minus-a", "--lora-rank", "4"]])
def test_smoke_embedded(tmp_path, flags):
    out_dir, summary = _run(tmp_path, "--num-iterations", "2", *TINY, *flags)
    assert summary["reward_queries"] == 2 * 6
    for k in ("base", "final"):
        assert 0 <= summary[k]["reward_mean"] <= 1 and "strict_accuracy" in summary[k] and "accuracy" in summary[k]
    assert (out_dir / "checkpoint.pt").is_file()
    assert (out_dir / ("lora" if "--lora-rank" in flags else "transformer")).is_dir()


def test_smoke_tiny_sd3(tmp_path):
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    path = build_tiny_sd3(tmp_path / "sd3")
    out_dir, summary = _run(tmp_path, "--model", str(path), "--resolution", "32", "--lora-rank", "4",
                            "--num-iterations", "1", *TINY)
    assert (out_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert summary["reward_queries"] == 6 and "reward_mean" in summary["final"]


@pytest.mark.parametrize("nft", [False, True])
def test_one_iteration_loss_is_the_mean_over_images_and_timesteps(tmp_path, nft):
    """The gradient the script accumulates over 2 micro-batches x 2 timesteps (AF) or x int(0.99 * 3) = 2 distinct
    grid timesteps (--nft) must be that of ONE mean over all 6 x 2 (image, timestep) items (Algorithm 1 line 9;
    NFT: loss / (grad-accumulation x timesteps)): the logged pre-clip gradient norm against this computation."""
    flags = ["--num-iterations", "1", "--threads", "1", "--prompts-per-iter", "2", "--group-size", "3",
             "--train-batch-size", "3", "--num-steps", "3", "--eval-samples-per-prompt", "1", "--no-save-model",
             "--reward", "jpeg_compressibility"] + (["--nft"] if nft else ["--timesteps-per-image", "2"])
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
    if nft:  # official: 5 * mean[(r P + (1 - r) N) / beta] + 1e-4 * mean (v - v_ref)^2
        r = af.nft_optimality(reward, groups, 5.0).repeat(n_t)
        loss = 5 * af.nft_loss(v, v_old, x0, x_t, sigma, r, 1.0).mean() + 1e-4 * ((v - v_ref) ** 2).mean()
    else:
        a = af.af_advantages(reward, groups).repeat(n_t)
        loss = af.af_loss(v, v_old, v_ref, x0, x_t, sigma, a, 1.1, 1e-3).mean()
    loss.backward()
    expected = torch.stack([p.grad.norm() for p in policy.parameters()]).norm().item()
    assert expected > 1e-4
    assert logged == pytest.approx(expected, rel=1e-3)


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


@pytest.mark.slow
def test_learning_beats_lr_zero(tmp_path):
    """80 default iterations must raise held-out strict accuracy and partial credit over the identical run with
    --lr 0. With lr 0 the weights never move, so its final evaluation is the base's on the same noise (asserted) and
    one iteration of it suffices. One thread pins the trajectory (the thread count changes float rounding; two
    threads beside another pytest worker also ran 5x slower). Measured with these flags (4 samples per prompt),
    strict / partial gain: seed 0 (the test) +0.055 / +0.066, seed 1 +0.016 / +0.023, seed 2 +0.086 / +0.060; the
    0.03 margins catch a broken update (no gain, or a loss), they are not below every seed's gain."""
    flags = ["--threads", "1", "--eval-every", "1000", "--eval-samples-per-prompt", "4", "--no-save-model"]
    _, learn = _run(tmp_path, *flags, "--num-iterations", "80", name="learn")
    _, frozen = _run(tmp_path, *flags, "--num-iterations", "1", "--lr", "0", name="frozen")
    assert frozen["final"]["reward_mean"] == frozen["base"]["reward_mean"] == learn["base"]["reward_mean"]
    assert learn["final"]["strict_accuracy"] > frozen["final"]["strict_accuracy"] + 0.03, (learn["final"], frozen["final"])
    assert learn["final"]["reward_mean"] > frozen["final"]["reward_mean"] + 0.03, (learn["final"], frozen["final"])
