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