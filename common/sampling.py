"""Samplers written against an explicit sigma list (sigma = 1 noise, 0 data; timestep = 1000 * sigma;
the transformer predicts v = noise - x0).

- `predict`: one (optionally classifier-free-guided) velocity prediction.
- `sde_step_with_logprob`: Flow-GRPO's SDE step and the Gaussian log-probability of the step taken
  (fp32 math, noise level a, log-prob averaged over latent elements). noise_level = 0 is the Euler step.
- `sample`: ODE (noise_level = 0) or SDE rollouts, optionally returning the whole trajectory.
"""

import math

import torch


def predict(transformer, latents, sigma, prompt_embeds, pooled_prompt_embeds, guidance_scale=1.0,
            negative_prompt_embeds=None, negative_pooled_prompt_embeds=None):
    """v = noise - x0 at (latents, sigma). sigma: float or (B,). CFG when guidance_scale > 1."""
    b = latents.shape[0]
    sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b) if not torch.is_tensor(
        sigma) or sigma.dim() == 0 else sigma.to(latents.device)
    if guidance_scale > 1.0:
        pred_uncond, pred_text = transformer(
            hidden_states=torch.cat([latents, latents]), timestep=torch.cat([sigma, sigma]) * 1000,
            encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
            pooled_projections=torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds]),
            return_dict=False)[0].chunk(2)
        return pred_uncond + guidance_scale * (pred_text - pred_uncond)
    return transformer(hidden_states=latents, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled_prompt_embeds, return_dict=False)[0]


def sde_step_with_logprob(model_pred, sigma, sigma_next, latents, noise_level=0.7, prev_sample=None,
                          generator=None, sigma_max=None, sde_type="sde"):
    """One stochastic step and its log-prob, as in the official Flow-GRPO `sde_step_with_logprob`.

    sde_type "sde" (Liu et al. 2025, eq. 9): std_t = a * sqrt(sigma / (1 - sigma)) (sigma = 1 replaced by
    sigma_max, the schedule's second value);
    mean  = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt   (dt = sigma_next - sigma < 0), i.e.
          = x * (1 + std_t^2 dt / (2 sigma)) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt;
    x_next = mean + std * eps with step std = std_t * sqrt(-dt); log_prob the Gaussian's.
    sde_type "cps" (Coefficients-Preserving Sampling, Wang et al. 2025, arXiv 2509.05952; official `sde_type="cps"`):
    std = sigma_next * sin(a pi / 2), mean = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2) with
    x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v, so x_next keeps exactly the noise level sigma_next (the CPS
    paper: the "sde" step over-noises at small sigma, which shows as grainy samples); log_prob is the
    official surrogate -(x_next - mean)^2 without the 1 / (2 std^2) scale and the constants (0 at sigma_next = 0).
    eps is drawn from `generator` (one CPU generator, or a list with one per sample). Returns (x_next in fp32 -
    the sample whose log-prob was taken, as the official code keeps it -, log_prob (B,), mean, step std)."""
    v, x = model_pred.float(), latents.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    if sde_type == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * torch.sqrt(sigma_next**2 - std**2)
    else:
        sigma_max = sigma_max if sigma_max is not None else 0.99
        dt = sigma_next - sigma
        std_t = torch.sqrt(sigma / (1 - torch.where(sigma >= 1, torch.as_tensor(sigma_max, device=x.device), sigma))) * noise_level
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        if isinstance(generator, (list, tuple)):  # one CPU stream per sample: independent of batching and ranks
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device)
        else:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        prev_sample = mean + std * eps
    prev = prev_sample.float()
    if noise_level == 0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    elif sde_type == "cps":
        log_prob = -((prev - mean) ** 2).mean(dim=tuple(range(1, x.ndim)))
    else:
        log_prob = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        log_prob = log_prob.mean(dim=tuple(range(1, x.ndim)))
    return prev, log_prob, mean, std


@torch.no_grad()
def sample(transformer, prompt_embeds, pooled_prompt_embeds, sigmas, latents, guidance_scale=1.0,
           negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, noise_level=0.0, generator=None,
           return_trajectory=False, sde_type="sde"):
    """Integrate from latents (pure noise at sigmas[0]) to sigmas[-1].

    Returns dict: latents (B, C, H, W) and, with return_trajectory, trajectory (B, T+1, C, H, W),
    log_probs (B, T), sigmas (T+1,). noise_level = 0 is the deterministic Euler ODE sampler; SDE noise comes
    from `generator` (a CPU generator, or a list of B, one per sample, which makes each rollout independent of
    how the batch is split into micro-batches and processes). sde_type "sde" | "cps" picks the stochastic step (see
    sde_step_with_logprob). SDE states stay in fp32 (the trajectory and the
    log-probs refer to the same numbers under a bf16 model, as in the official Flow-GRPO code)."""
    sigmas, dtype = sigmas.float(), latents.dtype
    latents = latents.float() if noise_level != 0 else latents
    traj, log_probs = [latents], []
    for i in range(len(sigmas) - 1):
        v = predict(transformer, latents.to(dtype), sigmas[i], prompt_embeds, pooled_prompt_embeds, guidance_scale,
                    negative_prompt_embeds, negative_pooled_prompt_embeds)
        if noise_level == 0:
            latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(latents.dtype)  # Euler
            log_probs.append(torch.zeros(latents.shape[0], device=latents.device))
        else:
            latents, lp, _, _ = sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], latents, noise_level,
                                                      generator=generator, sigma_max=sigmas[1].item(),
                                                      sde_type=sde_type)
            log_probs.append(lp)
        if return_trajectory:
            traj.append(latents)
    out = {"latents": latents}
    if return_trajectory:
        out.update(trajectory=torch.stack(traj, 1), log_probs=torch.stack(log_probs, 1), sigmas=sigmas)
    return out
