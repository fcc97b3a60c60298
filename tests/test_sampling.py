"""common/sampling.py: the velocity prediction with CFG and the Euler ODE sampler against diffusers' scheduler
(Flow-GRPO's SDE step and its log-probability are tested in test_flow_grpo.py)."""


import torch

from common import sampling
from tests.helpers.embedded import random_inputs, tiny_transformer


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

def test_heun_sampler_matches_diffusers_heun_scheduler():
    """--solver heun against diffusers' FlowMatchHeunDiscreteScheduler (an independent implementation): same final
    latents, 2 evaluations per step except the last one to sigma = 0 (Euler), and closer to a fine Euler reference
    than Euler with the same number of steps."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    transformer = tiny_transformer()
    latents, pe, pooled = random_inputs()
    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    x = latents.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v = transformer(hidden_states=x, timestep=t.expand(3), encoder_hidden_states=pe, pooled_projections=pooled).sample
            x = sched.step(v, t, x).prev_sample
    sigmas = torch.unique_consecutive(sched.sigmas)  # (6,): 1 -> 0, each sigma once
    calls = []
    counting = lambda **kw: calls.append(1) or transformer(**kw)  # noqa: E731
    ours = sampling.sample(counting, pe, pooled, sigmas, latents, solver="heun")["latents"]
    assert torch.allclose(ours, x, atol=1e-5) and len(calls) == 2 * 5 - 1 == len(sched.timesteps)
    fine = sampling.sample(transformer, pe, pooled, torch.linspace(1, 0, 101), latents)["latents"]
    euler = sampling.sample(transformer, pe, pooled, sigmas, latents)["latents"]
    assert (ours - fine).abs().mean() < (euler - fine).abs().mean() / 2
