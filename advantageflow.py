"""AdvantageFlow: advantage-weighted least squares with rollout-policy regularisation (Kveton et al. 2026,
arXiv 2605.26013).

A lagging EMA copy of the learner (the rollout policy) samples K images per prompt with a CFG-free ODE; the
rewards become clipped group-centred advantages A in [-1, 1]; the learner regresses, at a fresh noised point
x_t of each image, onto  A*x0 + gamma*f_old + lambda*f_ref  (x0-prediction space), which is convex in the
prediction whenever A + gamma + lambda > 0. DiffusionNFT's loss is its special case gamma = 1 - A, lambda = 0
(AF Prop. 3); DiffusionNFT as its official code runs it is diffusion_nft.py. Docs: docs/advantageflow.md.

    python advantageflow.py                      # embedded shapes world, 2 CPU cores, ~4 min
    python advantageflow.py --lr 1e-4 --gamma-mode one-minus-a
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

from common import run, sampling, utils
from common import reward_models, world  # noqa: F401 (they register the real rewards and the embedded world)
from common.tools import hub  # noqa: F401 (registers --upload-model)
from common.run import RunArgs


@dataclass
class Args(RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    num_iterations: int = 120
    prompts_per_iter: int = 8
    """L prompts per iteration (SD3.5-M: 32)"""
    group_size: int = 8
    """K images per prompt (SD3.5-M: 4)"""
    train_batch_size: int = 64
    """micro-batch of the update; gradients are accumulated into one optimizer step per iteration"""
    lr: float = 1e-4
    """AdamW learning rate (SD3.5-M LoRA: 3e-4)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """ODE steps of the rollout sampler (AF: 10)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps; AF paper on SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of evaluation; AdvantageFlow rolls out CFG-free (AF §4)"""
    gamma: float = 1.1
    """rollout-policy regularisation weight gamma of the constant gamma mode (AF(1.1))"""
    gamma_mode: Literal["constant", "one-minus-a"] = "constant"
    """constant: gamma = --gamma (AF(1.1)) | one-minus-a: gamma = 1 - A (AF(1-A))"""
    lam: float = 1e-3
    """lambda: weight of the reference (base model) term in x0 space (AF: 1e-3)"""
    adv_clip: float = 1.0
    """A = clip(centred reward / Z, -adv_clip, adv_clip), Z = RMS of the centred rewards (AF: 1)"""
    adaptive_weight: Literal["shared", "none"] = "none"
    """shared: each sample's loss / sg(mean|f_theta - x0|), one weight for all terms | none: AF eq. 5"""
    timestep_sampling: Literal["grid", "uniform"] = "grid"
    """grid: distinct sigmas of the rollout grid per image (DiffusionNFT code) | uniform: U(0, 1)"""
    timesteps_per_image: int = 1
    """noised points per image per iteration (AF Algorithm 1: 1)"""
    rollout_ema_rate: float = 0.1
    """rollout policy old <- rho old + (1 - rho) learner, rho_i = min(rate * i, max) (DiffusionNFT code: 0.001)"""
    rollout_ema_max: float = 0.9
    """the cap of rho_i (DiffusionNFT code: 0.5)"""


# ----------------------------------------------------------------------------------- advantages
def af_advantages(rewards_, groups, clip=1.0):
    """A = clip((R - prompt mean) / Z, -clip, clip), Z = sqrt(mean over the batch of the centred rewards^2)."""
    centred = rewards_ - utils.group_mean(rewards_, groups)
    z = centred.pow(2).mean().sqrt().clamp(min=1e-6)
    return (centred / z).clamp(-clip, clip)


# ----------------------------------------------------------------------------------- losses
def af_loss(v, v_old, v_ref, x0, x_t, sigma, adv, gamma, lam, adaptive_weight="none"):
    """AdvantageFlow eq. 5, per sample (B,), in x0-prediction space f = x_t - sigma*v:
    A ||f - x0||^2 + gamma ||f - f_old||^2 + lam ||f - f_ref||^2. Up to a theta-independent constant this is
    kappa ||f - f*||^2 with kappa = A + gamma + lam and f* = (A x0 + gamma f_old + lam f_ref) / kappa (a test);
    the three-term form is kept because it stays finite when kappa -> 0 (the gamma = 0 ablation)."""
    s, a, g = sigma.view(-1, 1, 1, 1), adv.view(-1, 1, 1, 1), torch.as_tensor(gamma).view(-1, 1, 1, 1)
    f = x_t - s * v
    f_old, f_ref = x_t - s * v_old, x_t - s * v_ref
    per = (a * (f - x0) ** 2 + g * (f - f_old) ** 2 + lam * (f - f_ref) ** 2).mean(dim=(1, 2, 3))
    if adaptive_weight == "shared":  # not AF's: one self-normalising weight for all terms
        per = per / (f - x0).abs().mean(dim=(1, 2, 3)).clamp(min=1e-5).detach()
    return per


def check_method_args(a):
    utils.check_shared(a)  # finite floats before the convexity warning below
    if a.group_size < 2:  # A = R - prompt mean: 0 for a prompt's only image
        utils.fail(f"--group-size {a.group_size} must be >= 2: advantages are relative to each prompt's images, so "
                   "one image per prompt makes every advantage 0")
    if a.lam < 0 or a.rollout_ema_rate < 0:
        utils.fail(f"--lam {a.lam} and --rollout-ema-rate {a.rollout_ema_rate} must be >= 0")
    if a.gamma_mode == "constant" and a.gamma + a.lam - a.adv_clip <= 0:  # allowed: the ablation
        print(f"warning: --gamma {a.gamma}: kappa = A + gamma + lam reaches {a.gamma + a.lam - a.adv_clip:.3g} <= 0, "
              "the per-sample loss is not convex (AF §3)", file=sys.stderr)
    if a.adv_clip <= 0:
        utils.fail(f"--adv-clip {a.adv_clip} must be > 0")
    if not 0 <= a.rollout_ema_max < 1:
        utils.fail(f"--rollout-ema-max {a.rollout_ema_max} must be in [0, 1)")
    if a.timesteps_per_image < 1 or (a.timestep_sampling == "grid" and a.timesteps_per_image > a.num_steps):
        utils.fail(f"--timesteps-per-image {a.timesteps_per_image} must be in [1, --num-steps {a.num_steps}] "
                   "(distinct grid sigmas per image)")
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    r = run.Run(args, __file__, with_old=True)  # checks, seed, run dir, model, learner / rollout ("old") / ref, reward
    model, policy, rank, world, device = r.model, r.policy, r.rank, r.world, r.device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    n_t = args.timesteps_per_image  # AF draws one fresh (t, eps) per image (Algorithm 1 line 8)

    def state():  # what an AdvantageFlow checkpoint keeps (besides the run's counters)
        return dict(policy=policy.trainable_state(), optimizer=optimizer.state_dict())

    ckpt = r.start(r.evaluate, state)  # --resume: the checkpoint; else the base evaluation (of the learner)
    if ckpt:
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])

    for it in r.iterations("advantageflow"):
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # one stream per (seed, iteration)
        # ---- sample: CFG-free ODE rollouts of the rollout policy (AF Algorithm 1); only final samples are kept
        captions, meta, prompt_idx = r.sampler.sample(it)
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        noise = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
        with policy.old() as old:
            x0 = sampling.sample(old, prompt_embeds, pooled, sigmas, noise)["latents"]  # (B, C, H, W)
        # ---- reward (gathered over ranks so groups and batch statistics are global)
        t_sample = utils.now(device)
        reward, parts = r.reward_fn(model.decode(x0), captions, meta)
        t_reward = utils.now(device)
        r.reward_queries += n * world
        all_rewards = utils.all_gather_cat(reward.to(device)).cpu()
        groups = utils.all_gather_cat(prompt_idx.to(device)).cpu()
        # ---- advantages: clipped, group-centred, over the batch's centred RMS
        adv = af_advantages(all_rewards, groups, args.adv_clip)
        adv_local = adv[local].to(device)
        # ---- loss + update: one optimizer step on the mean over images x timesteps (AF Algorithm 1 line 9), in
        # micro-batches; grid: each image gets n_t distinct sigmas of its rollout grid (a random permutation of the
        # grid points, the first n_t), every one with fresh noise
        optimizer.zero_grad(set_to_none=True)
        n_mb = n // args.train_batch_size
        stats, losses = [], []
        grid_idx = torch.rand(n * world, args.num_steps, generator=gen).argsort(1)[:, :n_t]  # (B_global, n_t)
        for j in range(n_t):
            if args.timestep_sampling == "grid":
                sigma_all = sigmas[grid_idx[:, j]][local]
            else:
                sigma_all = torch.rand(n * world, generator=gen)[local]
            eps_all = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
            for mb in torch.arange(n).split(args.train_batch_size):
                sigma, eps = sigma_all[mb].to(device), eps_all[mb]
                s = sigma.view(-1, 1, 1, 1)
                x_t = (1 - s) * x0[mb] + s * eps  # forward process, same x_t for all three models
                pe, pp = prompt_embeds[mb], pooled[mb]
                with torch.no_grad():
                    with policy.old() as old:
                        v_old = sampling.predict(old, x_t, sigma, pe, pp)
                    v_ref = torch.zeros_like(v_old)
                    if args.lam > 0:
                        with policy.ref() as ref:
                            v_ref = sampling.predict(ref, x_t, sigma, pe, pp)
                v = sampling.predict(policy.transformer, x_t, sigma, pe, pp)
                a = adv_local[mb]
                gamma = (1 - a) if args.gamma_mode == "one-minus-a" else torch.full_like(a, args.gamma)
                per = af_loss(v, v_old, v_ref, x0[mb], x_t, sigma, a, gamma, args.lam, args.adaptive_weight)
                loss = per.mean()
                (loss / (n_mb * n_t)).backward()  # equal micro-batches: the mean over all n x n_t items
                losses.append(loss.detach())
                with torch.no_grad():  # diagnostics: drift of the learner from the rollout / reference model
                    stats.append(torch.stack([((v - v_old) ** 2).mean(), ((v - v_ref) ** 2).mean()]))
        loss = torch.stack(losses).mean()
        utils.sync_gradients(policy.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if r.guard.ok(loss, grad_norm, all_rewards, iteration=it):
            optimizer.step()
        # ---- rollout policy: EMA of the learner, rho_i = min(rate * i, max) (DiffusionNFT's eta_i schedule)
        rho = min(args.rollout_ema_rate * (it + 1), args.rollout_ema_max)
        policy.update_old(rho)
        t_train = utils.now(device)

        # ---- log
        drift_old, drift_ref = torch.stack(stats).mean(0).tolist()
        metrics = {
            "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
            "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
            "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample, "perf/train_s": t_train - t_reward,
            "charts/lr": optimizer.param_groups[0]["lr"], "charts/rollout_ema": rho,
            "charts/reward_queries": r.reward_queries,
            "losses/loss": loss.item(), "losses/grad_norm": grad_norm.item(),
            "losses/adv_abs_mean": adv.abs().mean().item(),
            "losses/adv_clip_frac": (adv.abs() >= args.adv_clip - 1e-6).float().mean().item(),
            "losses/zero_std_group_frac": (utils.group_mean((all_rewards - utils.group_mean(all_rewards, groups)) ** 2,
                                                            groups) == 0).float().mean().item(),
            "losses/v_minus_v_old_sq": drift_old,
            **({"losses/v_minus_v_ref_sq": drift_ref} if args.lam > 0 else {}),
            "losses/skipped_updates": r.guard.total,
            **{f"charts/reward_{k}": v.mean().item() for k, v in parts.items()},
        }
        r.end_iteration(it, metrics, (x0, captions, reward), reward=f"{metrics['charts/reward_mean']:.3f}",
                        loss=f"{loss.item():.4f}")

    r.finish(lambda: policy.save_pretrained(r.dir))
