"""Samplers written against an explicit sigma list (sigma = 1 noise, 0 data; timestep = 1000 * sigma;
the transformer predicts v = noise - x0).

- `predict`: one (optionally classifier-free-guided) velocity prediction.
- `sample`: Euler (or Heun) ODE rollouts, optionally returning the whole trajectory (Flow-GRPO's SDE sampler lives
  in flow_grpo.py, the only method that uses it).
"""

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


@torch.no_grad()
def sample(transformer, prompt_embeds, pooled_prompt_embeds, sigmas, latents, guidance_scale=1.0,
           negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, return_trajectory=False, solver="euler"):
    """ODE from latents (pure noise at sigmas[0]) to sigmas[-1]. solver "euler": x <- x + (sigma_next - sigma) v
    (1 evaluation per step); "heun": Heun's second-order step (Karras et al. 2022, Alg. 1 without churn; 2 evaluations
    per step, Euler for the last step to sigma = 0): x' = x + dt v(x, sigma),
    x <- x + dt (v(x, sigma) + v(x', sigma_next)) / 2.
    Returns dict: latents (B, C, H, W) and, with return_trajectory, trajectory (B, T+1, C, H, W), sigmas (T+1,)."""
    sigmas, traj = sigmas.float(), [latents]
    cond = (prompt_embeds, pooled_prompt_embeds, guidance_scale, negative_prompt_embeds, negative_pooled_prompt_embeds)
    for i in range(len(sigmas) - 1):
        dt = sigmas[i + 1] - sigmas[i]
        v = predict(transformer, latents, sigmas[i], *cond).float()
        if solver == "heun" and sigmas[i + 1] > 0:
            v_next = predict(transformer, (latents.float() + dt * v).to(latents.dtype), sigmas[i + 1], *cond)
            v = (v + v_next.float()) / 2
        latents = (latents.float() + dt * v).to(latents.dtype)
        if return_trajectory:
            traj.append(latents)
    out = {"latents": latents}
    if return_trajectory:
        out.update(trajectory=torch.stack(traj, 1), sigmas=sigmas)
    return out
