"""common/sampling.py: the velocity prediction with CFG, the SDE step and its log-probability, the Euler ODE sampler
against diffusers' scheduler, per-sample generators."""

import math

import torch

from common import sampling
from tests.helpers.embedded import random_inputs, tiny_transformer


def test_sde_step_noise_level_zero_is_euler():
    x, v, _ = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), None
    out, lp, mean, std = sampling.sde_step_with_logprob(v, 0.6, 0.4, x, noise_level=0.0)
    assert torch.allclose(out, x + (0.4 - 0.6) * v, atol=1e-6) and torch.allclose(mean, out)


def test_sde_logprob_matches_gaussian_density():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    sigma, sigma_next, a = 0.7, 0.55, 0.7
    prev, lp, mean, std = sampling.sde_step_with_logprob(v, sigma, sigma_next, x, a, generator=g)
    # independent computation of Flow-GRPO eq. 9 with torch.distributions
    dt = sigma_next - sigma
    std_t = math.sqrt(sigma / (1 - sigma)) * a
    mu = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    ref = torch.distributions.Normal(mu, std_t * math.sqrt(-dt)).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(lp, ref, atol=1e-5)
    assert torch.allclose(mean, mu, atol=1e-6)


def test_ode_sampler_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_transformer()
    latents, pe, pooled = random_inputs()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    sigmas = sched.sigmas.clone()
    ours = sampling.sample(transformer, pe, pooled, sigmas, latents, return_trajectory=True)["trajectory"]
    x = latents.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = transformer(hidden_states=x, timestep=t.expand(3), encoder_hidden_states=pe, pooled_projections=pooled).sample
            x = sched.step(v, t, x).prev_sample
            assert torch.allclose(ours[:, i + 1], x, atol=1e-5), f"step {i}"


def test_cfg_combines_conditional_and_unconditional():
    transformer = tiny_transformer()
    x, pe, pooled = random_inputs(2)
    npe, npool = torch.zeros_like(pe), torch.zeros_like(pooled)
    with torch.no_grad():
        c = sampling.predict(transformer, x, 0.5, pe, pooled)
        u = sampling.predict(transformer, x, 0.5, npe, npool)
        g = sampling.predict(transformer, x, 0.5, pe, pooled, 4.5, npe, npool)
    assert torch.allclose(g, u + 4.5 * (c - u), atol=1e-4)


def test_on_policy_logprob_recomputation_ratio_is_one():
    transformer = tiny_transformer()
    latents, pe, pooled = random_inputs()
    sigmas = torch.linspace(1, 0, 5)
    out = sampling.sample(transformer, pe, pooled, sigmas, latents, noise_level=0.7,
                          generator=torch.Generator().manual_seed(0), return_trajectory=True)
    traj, lps = out["trajectory"], out["log_probs"]
    for i in range(4):
        with torch.no_grad():
            v = sampling.predict(transformer, traj[:, i], sigmas[i], pe, pooled)
        _, lp, _, _ = sampling.sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], traj[:, i], 0.7,
                                                     prev_sample=traj[:, i + 1], sigma_max=sigmas[1].item())
        assert torch.equal(torch.exp(lp - lps[:, i]), torch.ones(3))


def test_per_sample_generators_make_sde_rollouts_independent_of_batch_split():
    """With one generator per sample, a batch of 3 equals a batch of 2 plus a batch of 1 (micro-batches, ranks);
    different seeds give different rollouts."""
    transformer = tiny_transformer()
    latents, pe, pooled = random_inputs()
    sigmas = torch.linspace(1, 0, 5)

    def run(idx, seeds=(11, 12, 13)):
        return sampling.sample(transformer, pe[idx], pooled[idx], sigmas, latents[idx], noise_level=0.7,
                               generator=[torch.Generator().manual_seed(seeds[i]) for i in idx],
                               return_trajectory=True)

    whole, parts = run([0, 1, 2]), [run([0, 1]), run([2])]
    for key in ("trajectory", "log_probs"):
        split = torch.cat([p[key] for p in parts])
        assert torch.allclose(whole[key], split, atol=1e-5), key
    assert (whole["latents"][0] - run([0], seeds=(99,))["latents"][0]).abs().mean() > 0.01
