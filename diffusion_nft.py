"""DiffusionNFT: online diffusion reinforcement with forward-process negative-aware fine-tuning (Zheng et al. 2025,
arXiv 2509.16117), as its official code runs it (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py).

A lagging EMA copy of the learner (the rollout policy) samples K images per prompt with a CFG-free ODE; each
reward becomes an optimality probability r in [0, 1]; at noised points x_t of each image the learner defines an
implicit positive policy v+ = beta v + (1 - beta) v_old and a negative one v- = (1 + beta) v_old - beta v, and
regresses v+ onto the image with weight r and v- with weight 1 - r (paper eq. 8). Evaluation and the saved weights
are an EMA of the learner. AdvantageFlow (advantageflow.py) contains this loss as a special case (AF Prop. 3).
Docs: docs/diffusion_nft.md.

    python diffusion_nft.py                      # embedded shapes world, 2 CPU cores, ~10 min
    python diffusion_nft.py --beta 0.1           # the paper's multi-reward / OCR value
"""

import contextlib
import os
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
    """L prompts per iteration (official SD3.5-M: 48)"""
    group_size: int = 8
    """K images per prompt (official SD3.5-M: 8)"""
    train_batch_size: int = 64
    """micro-batch of the update; gradients are accumulated into one optimizer step per iteration"""
    lr: float = 1e-4
    """AdamW learning rate (official SD3.5-M LoRA: 3e-4)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """ODE steps of the rollout sampler (official: 10)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps; official SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of evaluation; DiffusionNFT rolls out CFG-free"""
    beta: float = 1.0
    """beta of the implicit policies v+- (official: 1.0 GenEval / PickScore, 0.1 OCR / multi-reward)"""
    adv_clip: float = 5.0
    """c: r = clip(z, -c, c) / 2c + 1/2, z = centred reward / batch std; the loss is x c (official adv_clip_max)"""
    kl_coef: float = 1e-4
    """weight of the velocity MSE to the base model (official kl_beta)"""
    adaptive_weight: Literal["separate", "shared", "none"] = "separate"
    """x0-error denominators: one per branch (official) | one shared | none (AF eq. 14's plain losses)"""
    timestep_fraction: float = 0.99
    """each image is trained at int(fraction * num_steps) distinct grid sigmas per iteration (official: 0.99)"""
    rollout_ema_rate: float = 0.1
    """rollout policy old <- rho old + (1 - rho) learner, rho_i = min(rate * i, max) (official: 0.001)"""
    rollout_ema_max: float = 0.9
    """the cap of rho_i (official: 0.5)"""
    eval_ema: float = 0.9
    """evaluate and save an EMA of the learner, decay min((1 + s) / (10 + s), this) at step s (official); 0 = off"""


# ----------------------------------------------------------------------------------- optimality probability
def nft_optimality(rewards_, groups, clip=5.0):
    """Official code: z = (R - group mean) / (std of all rewards + 1e-4), the population std (numpy's ddof 0 in the
    official stat_tracking.py); r = clip(clip(z,-c,c)/c/2 + 1/2, 0, 1)."""
    z = (rewards_ - utils.group_mean(rewards_, groups)) / (rewards_.std(unbiased=False) + 1e-4)
    return (z.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------- loss
def nft_loss(v, v_old, x0, x_t, sigma, r, beta, adaptive_weight="separate"):
    """Official train_nft_sd3.py: v+ = beta v + (1-beta) v_old, v- = (1+beta) v_old - beta v; per sample
    (r P + (1-r) N) / beta with x0-space errors P, N divided by adaptive weights (float64), one per branch (official),
    one shared weight sg(max(mean|f_theta - x0|, 1e-5)), or none (AF eq. 14)."""
    s = sigma.view(-1, 1, 1, 1)
    x_pos = x_t - s * (beta * v + (1 - beta) * v_old)
    x_neg = x_t - s * ((1 + beta) * v_old - beta * v)
    dims = (1, 2, 3)
    if adaptive_weight == "shared":
        w_pos = w_neg = (x_t - s * v - x0).double().abs().mean(dims).clamp(min=1e-5).detach()
    elif adaptive_weight == "none":
        w_pos = w_neg = 1.0
    else:
        w_pos = (x_pos - x0).double().abs().mean(dims).clamp(min=1e-5).detach()
        w_neg = (x_neg - x0).double().abs().mean(dims).clamp(min=1e-5).detach()
    pos = ((x_pos - x0).double() ** 2).mean(dims) / w_pos
    neg = ((x_neg - x0).double() ** 2).mean(dims) / w_neg
    return ((r * pos + (1 - r) * neg) / beta).float()


def timesteps_per_image(a):
    return int(a.num_steps * a.timestep_fraction)


def check_method_args(a):
    utils.check_shared(a)
    if a.group_size < 2:  # r is relative to each prompt's images: 1/2 for a prompt's only image
        utils.fail(f"--group-size {a.group_size} must be >= 2: r is relative to each prompt's images, so one image "
                   "per prompt makes every r 1/2")
    if a.kl_coef < 0 or a.rollout_ema_rate < 0:
        utils.fail(f"--kl-coef {a.kl_coef} and --rollout-ema-rate {a.rollout_ema_rate} must be >= 0")
    if a.beta <= 0 or a.adv_clip <= 0:
        utils.fail(f"--beta {a.beta} and --adv-clip {a.adv_clip} must be > 0")
    if not 0 <= a.rollout_ema_max < 1 or not 0 <= a.eval_ema < 1:
        utils.fail(f"--rollout-ema-max {a.rollout_ema_max} and --eval-ema {a.eval_ema} must be in [0, 1)")
    if not 0 < a.timestep_fraction <= 1 or timesteps_per_image(a) < 1:
        utils.fail(f"--timestep-fraction {a.timestep_fraction} must be in (0, 1] with int(fraction * --num-steps "
                   f"{a.num_steps}) >= 1 (distinct grid sigmas per image)")
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    r = run.Run(args, __file__, with_old=True)  # checks, seed, run dir, model, learner / rollout ("old") / ref, reward
    model, policy, rank, world, device = r.model, r.policy, r.rank, r.world, r.device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    n_t = timesteps_per_image(args)  # official: int(0.99 * 10) = 9 of the 10 grid sigmas per image
    ema = run.EMA(policy.parameters(), args.eval_ema) if args.eval_ema > 0 else None

    # copy: evaluation EMA (diffusion_nft.py, flow_grpo.py)
    def evaluate(step):  # the evaluation EMA (official code), or the learner where it is off
        with ema.swapped() if ema else contextlib.nullcontext():
            return r.evaluate(step)
    # end copy: evaluation EMA

    def state():  # what a DiffusionNFT checkpoint keeps (besides the run's counters)
        return dict(policy=policy.trainable_state(), optimizer=optimizer.state_dict(),
                    eval_ema=ema.shadow if ema else None)

    ckpt = r.start(evaluate, state)  # --resume: the checkpoint; else the base evaluation
    if ckpt:
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema and ckpt.get("eval_ema") is not None:
            ema.shadow = utils.to_device(ckpt["eval_ema"], device)

    for it in r.iterations("diffusion_nft"):
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # one stream per (seed, iteration)
        # ---- sample: CFG-free ODE rollouts of the rollout policy; only final samples are kept
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
        # ---- optimality probability r (its advantage form A = 2r - 1 is logged)
        r_opt = nft_optimality(all_rewards, groups, args.adv_clip)
        adv = 2 * r_opt - 1
        # ---- loss + update: one optimizer step on the mean over images x timesteps, in micro-batches; each image
        # gets n_t distinct sigmas of its rollout grid (a random permutation, the first n_t), each with fresh noise
        optimizer.zero_grad(set_to_none=True)
        n_mb = n // args.train_batch_size
        stats, losses = [], []
        grid_idx = torch.rand(n * world, args.num_steps, generator=gen).argsort(1)[:, :n_t]  # (B_global, n_t)
        for j in range(n_t):
            sigma_all = sigmas[grid_idx[:, j]][local]
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
                    if args.kl_coef > 0:
                        with policy.ref() as ref:
                            v_ref = sampling.predict(ref, x_t, sigma, pe, pp)
                v = sampling.predict(policy.transformer, x_t, sigma, pe, pp)
                per = nft_loss(v, v_old, x0[mb], x_t, sigma, r_opt[local][mb].to(device), args.beta,
                               args.adaptive_weight)
                kl = ((v - v_ref) ** 2).mean(dim=(1, 2, 3))
                loss = args.adv_clip * per.mean() + args.kl_coef * kl.mean()
                (loss / (n_mb * n_t)).backward()  # equal micro-batches: the mean over all n x n_t items
                losses.append(loss.detach())
                with torch.no_grad():  # diagnostics: drift of the learner from the rollout / reference model
                    stats.append(torch.stack([((v - v_old) ** 2).mean(), kl.mean()]))
        loss = torch.stack(losses).mean()
        utils.sync_gradients(policy.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if r.guard.ok(loss, grad_norm, all_rewards, iteration=it):
            optimizer.step()
        if ema:  # one optimizer step per iteration: step count s = it + 1
            ema.step(it + 1)
        # ---- rollout policy: EMA of the learner, rho_i = min(rate * i, max) (official eta_i schedule)
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
            "losses/adv_clip_frac": (adv.abs() >= 1 - 1e-6).float().mean().item(),
            "losses/zero_std_group_frac": (utils.group_mean((all_rewards - utils.group_mean(all_rewards, groups)) ** 2,
                                                            groups) == 0).float().mean().item(),
            "losses/v_minus_v_old_sq": drift_old,
            **({"losses/v_minus_v_ref_sq": drift_ref} if args.kl_coef > 0 else {}),
            "losses/skipped_updates": r.guard.total,
            **{f"charts/reward_{k}": v.mean().item() for k, v in parts.items()},
        }
        r.end_iteration(it, metrics, (x0, captions, reward), reward=f"{metrics['charts/reward_mean']:.3f}",
                        loss=f"{loss.item():.4f}")

    # copy: saved EMA (diffusion_nft.py, flow_grpo.py)
    def save_model():  # the evaluation EMA, as the official code saves it, or the learner where it is off
        with ema.swapped() if ema else contextlib.nullcontext():
            policy.save_pretrained(r.dir)
    # end copy: saved EMA

    r.finish(save_model)
