"""Flow-GRPO: online policy-gradient RL for flow-matching models through an ODE-to-SDE conversion
(Liu et al. 2025, arXiv 2505.05470; official code yifan123/flow_grpo).

The learner samples `group_size` images per prompt with Flow-GRPO's SDE sampler, which turns every denoising
step into a Gaussian policy with a closed-form log-probability; rewards become group-relative advantages
A = (r - group mean) / (std + 1e-4); the learner then maximises the PPO-clipped ratio objective over the
trained steps, optionally minus kl_coef * KL to the frozen base. An EMA of the trained weights is evaluated and
saved. Docs: docs/flow_grpo.md.

    python flow_grpo.py                                  # embedded shapes world, 2 CPU cores, ~10 min
    python flow_grpo.py --global-std --kl-coef 0.04         # std over the whole batch, KL to the base model
"""

import contextlib
import math
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
    eval_every: int = 25
    """iterations between held-out evaluations"""
    num_iterations: int = 100
    prompts_per_iter: int = 4
    """prompts per iteration (SD3.5-M: 48)"""
    group_size: int = 8
    """K images per prompt (SD3.5-M: 24)"""
    train_batch_size: int = 8
    """micro-batch of rollouts and of the update (the same, so recomputed log-probs match, as the official code)"""
    lr: float = 1e-4
    """AdamW learning rate (SD3.5-M LoRA: 3e-4)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """SDE steps of the rollouts (paper's Denoising Reduction: 10)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps; paper / official SD3.5-M configs: 40)"""
    guidance_scale: float = 1.0
    """CFG of rollouts, training log-probs and evaluation (negative = empty prompt; SD3.5-M: 4.5)"""
    noise_level: float = 0.7
    """a in the SDE's std sigma_t = a sqrt(t / (1 - t)) (paper); --sde-type cps: step std sigma_next sin(a pi / 2)"""
    sde_type: Literal["sde", "cps"] = "sde"
    """sde: the paper's ODE-to-SDE step | cps: Coefficients-Preserving Sampling (official; last step not trained)"""
    timestep_fraction: float = 0.3
    """trains int(num_steps * fraction) steps of each trajectory (SD3.5-M: 0.99, i.e. 9 of 10)"""
    timestep_sampling: Literal["random", "first"] = "random"
    """random: a fresh subset of steps per minibatch | first: the first steps in order (official code)"""
    num_inner_epochs: int = 1
    """passes over each iteration's samples"""
    num_minibatches: int = 2
    """optimizer steps per inner epoch: the shuffled batch is split into this many minibatches (SD3.5-M: 2)"""
    clip_range: float = 1e-3
    """PPO clip range epsilon of the ratio (SD3.5-M LoRA: 1e-4)"""
    adv_clip_max: float = 5.0
    """advantages clipped to [-adv_clip_max, adv_clip_max] (official code)"""
    global_std: bool = False
    """divide by the std of the whole gathered batch instead of each group's (official SD3.5-M configs: on)"""
    kl_coef: float = 0.5
    """weight of the KL to the reference (base) model (SD3.5-M GenEval / OCR: 0.04, PickScore: 0.01)"""
    ema: bool = True
    """keep an EMA of the trained weights; evaluate and save it (official code)"""
    ema_decay: float = 0.9
    """EMA decay, warmed up as min((1 + step) / (10 + step), ema_decay) over optimizer steps (official code)"""
    ema_every: int = 1
    """optimizer steps between EMA updates (official code: 8)"""
    ema_repeat: int = 1
    """EMA updates per update event (official: one per micro-batch per GPU, e.g. 8 on 8 GPUs)"""


# ----------------------------------------------------------------------------------- SDE sampler (paper's ODE-to-SDE)
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
def sde_sample(transformer, prompt_embeds, pooled, sigmas, latents, guidance_scale=1.0, neg_embeds=None,
               neg_pooled=None, noise_level=0.7, generator=None, sde_type="sde"):
    """SDE rollouts from latents (pure noise at sigmas[0]) with the log-prob of every step taken. SDE noise from
    `generator` (a CPU generator, or a list of B, one per sample, which makes each rollout independent of how the
    batch is split into micro-batches and processes). States stay in fp32 (the trajectory and the log-probs refer to
    the same numbers under a bf16 model, as in the official code). Returns dict: latents (B, C, H, W), trajectory
    (B, T+1, C, H, W), log_probs (B, T), sigmas (T+1,)."""
    sigmas, dtype = sigmas.float(), latents.dtype
    latents = latents.float()
    traj, log_probs = [latents], []
    for i in range(len(sigmas) - 1):
        v = sampling.predict(transformer, latents.to(dtype), sigmas[i], prompt_embeds, pooled, guidance_scale,
                             neg_embeds, neg_pooled)
        latents, lp, _, _ = sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], latents, noise_level,
                                                  generator=generator, sigma_max=sigmas[1].item(), sde_type=sde_type)
        traj.append(latents), log_probs.append(lp)
    return dict(latents=latents, trajectory=torch.stack(traj, 1), log_probs=torch.stack(log_probs, 1), sigmas=sigmas)


# ----------------------------------------------------------------------------------- advantages (paper)
def grpo_advantages(rewards_, groups, global_std=False, clip_max=5.0):
    """A = (r - group mean) / (std + 1e-4), std = population std of the group (paper) or of all rewards
    (--global-std, official `stat_tracking.py`), then clipped to +-clip_max (official code)."""
    centred = rewards_ - utils.group_mean(rewards_, groups)
    std = rewards_.std(unbiased=False) if global_std else utils.group_mean(centred**2, groups).sqrt()
    return (centred / (std + 1e-4)).clamp(-clip_max, clip_max)


def zero_std_fraction(rewards_, groups):
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    _, inv = torch.unique(groups, return_inverse=True)
    g = int(inv.max()) + 1
    hi = torch.zeros(g, dtype=rewards_.dtype).scatter_reduce(0, inv, rewards_, "amax", include_self=False)
    lo = torch.zeros(g, dtype=rewards_.dtype).scatter_reduce(0, inv, rewards_, "amin", include_self=False)
    return (hi == lo).float().mean()


# ----------------------------------------------------------------------------------- losses (paper)
def step_log_prob(transformer, latents, next_latents, sigma, sigma_next, prompt_embeds, pooled, noise_level,
                  sigma_max, guidance_scale=1.0, neg_embeds=None, neg_pooled=None, sde_type="sde"):
    """log pi(next_latents | latents) of one SDE step (B,), its mean and sigma_t (paper, ODE-to-SDE conversion).
    latents / next_latents are the fp32 trajectory; the transformer sees latents in its own dtype (that of the
    prompt embeddings), the step math is fp32. With CFG, one batched pass as in the sampler, the unconditional branch
    detached (official `compute_log_prob`)."""
    s = sigma.expand(latents.shape[0])
    x_in = latents.to(prompt_embeds.dtype)
    if guidance_scale > 1:
        v_u, v_c = sampling.predict(transformer, torch.cat([x_in, x_in]), torch.cat([s, s]),
                                    torch.cat([neg_embeds, prompt_embeds]), torch.cat([neg_pooled, pooled])).chunk(2)
        v = v_u.detach() + guidance_scale * (v_c - v_u.detach())
    else:
        v = sampling.predict(transformer, x_in, s, prompt_embeds, pooled)
    _, log_prob, mean, std = sde_step_with_logprob(v, sigma, sigma_next, latents, noise_level,
                                                   prev_sample=next_latents, sigma_max=sigma_max, sde_type=sde_type)
    if sde_type == "cps":  # the KL's scale is the step std itself (official code)
        return log_prob, mean, std
    return log_prob, mean, std / (sigma - sigma_next).sqrt()  # step std = sigma_t * sqrt(-dt)


def ppo_clip_loss(log_prob, old_log_prob, adv, clip_range):
    """Paper (clipped GRPO objective) / official code: mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = pi_theta / pi_old."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def kl_loss(mean, mean_ref, sigma_t):
    """KL of two Gaussian steps as in the official code: ||mu_theta - mu_ref||^2 (element mean) / (2 sigma_t^2),
    averaged over the batch (the paper's closed form divides by 2 sigma_t^2 dt instead)."""
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))).div(2 * sigma_t**2).mean()


def check_method_args(a):
    if a.group_size < 2:  # A = (r - group mean) / std (paper): 0 for a prompt's only image, also with --global-std
        utils.fail(f"--group-size {a.group_size} must be >= 2: advantages are relative to each prompt's group, so "
                   "one image per prompt makes every advantage 0")
    if not 0 < a.timestep_fraction <= 1 or int(a.num_steps * a.timestep_fraction) < 1:
        utils.fail(f"--timestep-fraction {a.timestep_fraction} must be in (0, 1] and train at least one of the "
                   f"{a.num_steps} steps")
    if a.sde_type == "cps" and a.noise_level > 1:
        utils.fail(f"--noise-level {a.noise_level} must be <= 1 with --sde-type cps (std = sigma_next sin(a pi / 2))")
    if a.sde_type == "cps" and int(a.num_steps * a.timestep_fraction) > a.num_steps - 1:
        utils.fail(f"--timestep-fraction {a.timestep_fraction} trains all {a.num_steps} steps, but with --sde-type "
                   "cps the last one is deterministic: use a fraction that leaves it out")
    if a.noise_level <= 0:
        utils.fail(f"--noise-level {a.noise_level} must be > 0 (0 is the deterministic ODE: no log-probabilities)")
    if a.clip_range <= 0 or a.adv_clip_max <= 0 or a.kl_coef < 0:
        utils.fail("--clip-range and --adv-clip-max must be > 0 and --kl-coef >= 0")
    if a.num_inner_epochs < 1 or a.num_minibatches < 1 or a.ema_every < 1 or a.ema_repeat < 1:
        utils.fail("--num-inner-epochs, --num-minibatches, --ema-every and --ema-repeat must be >= 1")
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")
    if not 0 <= a.ema_decay < 1:
        utils.fail(f"--ema-decay {a.ema_decay} must be in [0, 1)")
    n = a.prompts_per_iter * a.group_size // utils.world_size_from_env()
    if a.train_batch_size >= 1 and n % (a.num_minibatches * a.train_batch_size):
        utils.fail(f"--num-minibatches {a.num_minibatches} x --train-batch-size {a.train_batch_size} must divide "
                   f"the per-process batch {n} (prompts_per_iter*group_size/world_size)")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    r = run.Run(args, __file__)  # checks, seed, run dir, model, learner / ref views, reward, prompts
    model, policy, rank, world, device = r.model, r.policy, r.rank, r.world, r.device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ema = run.EMA(policy.parameters(), args.ema_decay) if args.ema else None  # evaluated and saved (official code)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    sigma_max = sigmas[1].item()  # replaces sigma = 1 in sigma_t, as in the sampler
    neg = model.encode_prompt([""]) if args.guidance_scale > 1 else None  # CFG negative = empty prompt

    # copy: CFG negatives (fdfo.py, flow_grpo.py)
    def negs(b):
        return (neg[0].expand(b, -1, -1), neg[1].expand(b, -1)) if neg is not None else (None, None)
    # end copy: CFG negatives

    # copy: evaluation EMA (diffusion_nft.py, flow_grpo.py)
    def evaluate(step):  # the evaluation EMA (official code), or the learner where it is off
        with ema.swapped() if ema else contextlib.nullcontext():
            return r.evaluate(step)
    # end copy: evaluation EMA

    def state():  # what a Flow-GRPO checkpoint keeps
        return dict(policy=policy.trainable_state(), optimizer=optimizer.state_dict(),
                    eval_ema=ema.shadow if ema else None)

    ckpt = r.start(evaluate, state)  # --resume: the checkpoint; else the base evaluation
    if ckpt:
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema and ckpt.get("eval_ema") is not None:
            ema.shadow = utils.to_device(ckpt["eval_ema"], device)

    n_train = int(args.num_steps * args.timestep_fraction)  # official: int(num_steps * timestep_fraction)
    for it in r.iterations("flow_grpo"):
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # one stream per (seed, iteration)
        # ---- sample: SDE rollouts of the learner with per-step log-probs (paper's ODE-to-SDE), in micro-batches
        captions, meta, prompt_idx = r.sampler.sample(it)
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        noise = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
        seeds = torch.randint(2**62, (n * world,), generator=gen)[local].tolist()
        sde_gens = [torch.Generator().manual_seed(x) for x in seeds]  # one SDE-noise stream per image
        trajs, old_lps = [], []
        for mb in torch.arange(n).split(args.train_batch_size):
            out = sde_sample(policy.transformer, prompt_embeds[mb], pooled[mb], sigmas, noise[mb], args.guidance_scale,
                             *negs(len(mb)), args.noise_level, [sde_gens[j] for j in mb.tolist()], args.sde_type)
            trajs.append(out["trajectory"])
            old_lps.append(out["log_probs"])
        traj, old_log_probs = torch.cat(trajs), torch.cat(old_lps)  # (B, T+1, C, H, W) fp32, (B, T) fp32
        del trajs, old_lps, out  # the micro-batch pieces: a second copy of every trajectory otherwise
        x0 = traj[:, -1]
        t_sample = utils.now(device)
        # ---- reward (gathered over ranks so groups and batch statistics are global)
        reward, parts = r.reward_fn(model.decode(x0), captions, meta)
        r.reward_queries += n * world
        all_rewards = utils.all_gather_cat(reward.to(device)).cpu()
        groups = utils.all_gather_cat(prompt_idx.to(device)).cpu()
        t_reward = utils.now(device)
        # ---- advantages: group-relative (paper), per-group or global std, clipped
        adv = grpo_advantages(all_rewards, groups, args.global_std, args.adv_clip_max)
        adv_local = adv[local].to(device)
        # ---- loss + update: inner epochs x minibatches, one optimizer step each (paper's clipped objective)
        stats, losses, onpolicy_err = [], [], 0.0
        n_opt = it * args.num_inner_epochs * args.num_minibatches  # optimizer steps so far
        for epoch in range(args.num_inner_epochs):
            perm = torch.randperm(n * world, generator=gen)  # a global shuffle, restricted to this rank's images
            perm = perm[(perm >= rank * n) & (perm < (rank + 1) * n)] - rank * n
            for k, minibatch in enumerate(perm.chunk(args.num_minibatches)):
                stochastic = args.num_steps - (args.sde_type == "cps")  # cps: the last step is deterministic
                steps = (torch.arange(n_train) if args.timestep_sampling == "first"
                         else torch.randperm(stochastic, generator=gen)[:n_train])
                optimizer.zero_grad(set_to_none=True)
                n_micro = len(minibatch) // args.train_batch_size
                for mb in minibatch.split(args.train_batch_size):
                    pe, pp, a = prompt_embeds[mb], pooled[mb], adv_local[mb]
                    for j in steps.tolist():
                        x, x_next = traj[mb, j], traj[mb, j + 1]
                        log_prob, mean, sigma_t = step_log_prob(
                            policy.transformer, x, x_next, sigmas[j], sigmas[j + 1], pe, pp, args.noise_level,
                            sigma_max, args.guidance_scale, *negs(len(mb)), sde_type=args.sde_type)
                        policy_loss, ratio = ppo_clip_loss(log_prob, old_log_probs[mb, j], a, args.clip_range)
                        kl = torch.zeros((), device=device)  # stacked with the step's tensors below
                        if args.kl_coef > 0:  # KL to the frozen base (paper's KL term in the official code's form)
                            with torch.no_grad(), policy.ref() as ref:
                                _, mean_ref, _ = step_log_prob(ref, x, x_next, sigmas[j], sigmas[j + 1], pe, pp,
                                                               args.noise_level, sigma_max, args.guidance_scale,
                                                               *negs(len(mb)), sde_type=args.sde_type)
                            kl = kl_loss(mean, mean_ref, sigma_t)
                        loss = policy_loss + args.kl_coef * kl
                        (loss / (n_micro * n_train)).backward()
                        losses.append(loss.detach())
                        with torch.no_grad():  # PPO diagnostics (official code)
                            d = ratio - 1
                            stats.append(torch.stack([
                                policy_loss, kl, ratio.mean(), (d.abs() > args.clip_range).float().mean(),
                                (d > args.clip_range).float().mean(), (-d > args.clip_range).float().mean(),
                                0.5 * ((log_prob - old_log_probs[mb, j]) ** 2).mean()]))
                            if epoch == 0 and k == 0:  # before any update the ratio must be exactly 1
                                onpolicy_err = max(onpolicy_err, d.abs().max().item())
                utils.sync_gradients(policy.parameters())
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                if r.guard.ok(torch.stack(losses[-n_micro * n_train:]), grad_norm, all_rewards, iteration=it):
                    optimizer.step()
                # ---- EMA of the trained weights, decay warmed up over optimizer steps (official `ema.py`); the
                # official loop applies it once per micro-batch, i.e. --ema-repeat times at unchanged weights
                n_opt += 1
                if ema and n_opt % args.ema_every == 0:
                    ema.step(n_opt, args.ema_repeat)
        loss = torch.stack(losses).mean()

        t_train = utils.now(device)
        # ---- log
        s = torch.stack(stats).mean(0).tolist()
        metrics = {
            "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
            "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
            "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample, "perf/train_s": t_train - t_reward,
            "charts/lr": optimizer.param_groups[0]["lr"],
            "charts/ema_decay": min((1 + n_opt) / (10 + n_opt), args.ema_decay),
            "charts/reward_queries": r.reward_queries,
            "losses/loss": loss.item(), "losses/policy_loss": s[0], "losses/kl_loss": s[1],
            "losses/ratio_mean": s[2], "losses/clipfrac": s[3], "losses/clipfrac_gt_one": s[4],
            "losses/clipfrac_lt_one": s[5], "losses/approx_kl": s[6],
            "losses/onpolicy_ratio_err": onpolicy_err, "losses/grad_norm": grad_norm.item(),
            "losses/adv_abs_mean": adv.abs().mean().item(),
            "losses/adv_clip_frac": (adv.abs() >= args.adv_clip_max).float().mean().item(),
            "losses/zero_std_group_frac": zero_std_fraction(all_rewards, groups).item(),
            "losses/group_reward_std":
                utils.group_mean((all_rewards - utils.group_mean(all_rewards, groups)) ** 2, groups).sqrt().mean().item(),
            "losses/skipped_updates": r.guard.total,
            **{f"charts/reward_{k}": v.mean().item() for k, v in parts.items()},
        }
        r.end_iteration(it, metrics, (x0, captions, reward), reward=f"{metrics['charts/reward_mean']:.3f}",
                        clipfrac=f"{s[3]:.2f}")

    # copy: saved EMA (diffusion_nft.py, flow_grpo.py)
    def save_model():  # the evaluation EMA, as the official code saves it, or the learner where it is off
        with ema.swapped() if ema else contextlib.nullcontext():
            policy.save_pretrained(r.dir)
    # end copy: saved EMA

    r.finish(save_model)
