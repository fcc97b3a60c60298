"""AC-Flow: actor-critic fine-tuning of flow-matching models with intermediate feedback (Fan, Cheng, Shen, Zhou,
Liu 2025, arXiv 2510.18072), the successor of ORW-CFM-W2 (Fan et al., ICLR 2025, arXiv 2502.06061; orw_cfm_w2.py).

Each epoch a lagged copy of the actor samples a pool of images (CFG-free ODE); rewards are shaped (z-score); a
small critic V_phi(x_t, sigma, c) regresses the shaped reward at noised points of recent pools, so each (image,
sigma) gets its own advantage A = r~ - V. The actor minimises  w ||v - (eps - x0)||^2 + alpha ||v - v_ref||^2,
w = exp(tau clip(A, +-c_A)) / mean, with V treated as 0 until the critic explains fresh rollouts (warm-up).
Only AC-Flow's abstract could be read: the weight function, shaping, critic and warm-up gate are reconstructed from
it and from ORW-CFM-W2's code (what is whose: docs/acflow.md).

    python acflow.py                             # reconstructed AC-Flow, embedded shapes world, 2 CPU cores
    python acflow.py --no-critic --adv-clip 0    # ablation V = 0: exp weights of z-scored rewards (not orw_cfm_w2.py)
    python acflow.py --critic-warmup 0 --warmup-ev 0   # ablation: the critic drives the actor from iteration 1
    python acflow.py --weights centered          # not AC-Flow's: w / mean(w) - 1 (docs: the controls)
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from common import run, sampling, utils
from common import reward_models, world  # noqa: F401 (they register the real rewards and the embedded world)
from common.tools import hub  # noqa: F401 (registers --upload-model)
from common.run import RunArgs


@dataclass
class Args(RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    num_iterations: int = 200
    """actor gradient steps"""
    prompts_per_iter: int = 32
    """prompts per actor minibatch (SD3.5-M: 8)"""
    group_size: int = 1
    """images per prompt; the weights are per image, as in ORW-CFM-W2 (SD3.5-M: 4)"""
    train_batch_size: int = 32
    """micro-batch of the update; gradients are accumulated into one optimizer step per iteration"""
    epoch_iters: int = 20
    """E: iterations per epoch; the sampling copy is fixed for an epoch, then old <- actor (ORW `last_policy`)"""
    pool_reuse: int = 1
    """R: iterations that train on each sampled batch (1: a fresh batch every iteration, ORW official code)"""
    lr: float = 3e-5
    """actor AdamW learning rate after the warm-up"""
    warmup_iters: int = 10
    """linear actor learning-rate warm-up (ORW-CFM-W2 official code: LambdaLR over 5000 steps); 0 = off"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """ODE steps of the rollout sampler"""
    solver: Literal["euler", "heun"] = "euler"
    """ODE solver of the rollouts (evaluation: Euler)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps; SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of evaluation; rollouts are CFG-free"""
    alpha: float = 1.0
    """W2 coefficient: alpha ||v - v_ref||^2 (AC-Flow's value is not public; ORW-CFM-W2 code: 1.0)"""
    tau: float = 1.0
    """weight temperature: w = exp(tau * A^) on shaped advantages (reconstructed from ORW-CFM-W2's exp(tau r))"""
    adv_clip: float = 1.0
    """c_A: A^ = clip(A, -c_A, c_A) in shaped-reward units (AC-Flow's advantage clipping); 0 = no clipping"""
    weight_norm: Literal["minibatch", "none"] = "minibatch"
    """minibatch: w / mean(w) over the minibatch (mean w = 1) | none: raw weights (ORW-CFM-W2 code)"""
    weights: Literal["exp", "centered"] = "exp"
    """exp: w = exp(tau A^) | centered: w / mean(w) - 1 (AdvantageFlow eq. 12; not AC-Flow's; alpha >= 1)"""
    shaping: Literal["batch", "group", "running", "none"] = "batch"
    """reward shaping over the epoch's pool: batch z-score | group (per prompt) | running (EMA) | none"""
    shaping_momentum: float = 0.99
    """EMA momentum of --shaping running"""
    shaping_clamp: float = 0.0
    """clamp shaped rewards to [-c, c] (0 = off)"""
    critic: bool = True
    """use the critic; --no-critic: the ablation V = 0 (exp weights of shaped rewards; not orw_cfm_w2.py)"""
    critic_lr: float = 1e-3
    """critic AdamW learning rate (not public; ours, SD3 commands: 1e-4)"""
    critic_weight_decay: float = 1e-4
    critic_width: int = 32
    """base channels c of the critic (conv c, 2c, 4c, 4c; MLP 8c); SD3: 64"""
    critic_zero_init: bool = False
    """zero-initialise the critic's last layer (V = 0 at the start); off: PyTorch's init"""
    critic_steps: int = 8
    """critic minibatch steps per iteration on the buffer (AC-Flow's value is not public; ours)"""
    critic_buffer: int = 2
    """epochs' pools kept for the critic (the current one and the previous ones): a small replay buffer"""
    critic_loss: Literal["mse", "huber"] = "mse"
    """critic regression loss: mse | huber (delta = 1)"""
    critic_warmup: int | None = None
    """minimum iterations in which the critic trains but does not drive the actor (None: a tenth of the iterations)"""
    warmup_ev: float = 0.3
    """warm-up ends at an epoch whose fresh pool the critic explains with EV > this; 0: after --critic-warmup"""
    timesteps_per_image: int = 1
    """noised points per image per iteration"""


# ----------------------------------------------------------------------------------- critic
class Critic(nn.Module):
    """V_phi(x_t, sigma, c): conv tower on the latent + sinusoidal sigma embedding + projected pooled prompt
    embedding, concatenated into an MLP with LayerNorm. zero_init: last layer 0, so V = 0 at the
    start and AC-Flow starts as ORW-CFM-W2."""

    def __init__(self, in_channels, pooled_dim, width=32, zero_init=False):
        super().__init__()
        c = width

        def down(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.GroupNorm(min(32, o // 4), o), nn.SiLU())

        self.conv = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), down(c, 2 * c), down(2 * c, 4 * c),
                                  down(4 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.t_dim = 4 * c
        self.t_mlp = nn.Sequential(nn.Linear(4 * c, 4 * c), nn.SiLU())
        self.c_proj = nn.Linear(pooled_dim, 4 * c)
        self.head = nn.Sequential(nn.Linear(12 * c, 8 * c), nn.LayerNorm(8 * c), nn.SiLU(),
                                  nn.Linear(8 * c, 8 * c), nn.LayerNorm(8 * c), nn.SiLU(), nn.Linear(8 * c, 1))
        if zero_init:
            nn.init.zeros_(self.head[-1].weight), nn.init.zeros_(self.head[-1].bias)

    def forward(self, latents, sigma, pooled_prompt_embeds):
        """latents (B, C, H, W), sigma (B,) in [0, 1] (same convention as the transformer), pooled (B, P) -> (B,)."""
        half = self.t_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=latents.device) / half)
        ang = (1000 * sigma.float().to(latents.device))[:, None] * freqs  # timestep = 1000 sigma, as in SD3
        t_emb = self.t_mlp(torch.cat([ang.cos(), ang.sin()], -1))
        h = torch.cat([self.conv(latents.float()), t_emb, self.c_proj(pooled_prompt_embeds.float())], -1)
        return self.head(h).squeeze(-1)


# ----------------------------------------------------------------------------------- shaping, advantages, weights
def shape_rewards(r, mode="batch", groups=None, stats=None, momentum=0.99, clamp=0.0):
    """r~ = (r - mean) / (std + 1e-6) with population statistics of the batch (batch), of each
    prompt's group (group), or EMA statistics (running; stats = (mean, var), first batch initialises);
    none = raw reward. Optional clamp to [-clamp, clamp]. Returns (r~, stats)."""
    if mode == "batch":
        z = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    elif mode == "group":
        mu = utils.group_mean(r, groups)
        z = (r - mu) / (utils.group_mean((r - mu) ** 2, groups).sqrt() + 1e-6)
    elif mode == "running":
        m, v = r.mean(), r.var(unbiased=False)
        stats = (m, v) if stats is None else (momentum * stats[0] + (1 - momentum) * m,
                                              momentum * stats[1] + (1 - momentum) * v)
        z = (r - stats[0]) / (stats[1].sqrt() + 1e-6)
    else:
        z = r.clone()
    return (z.clamp(-clamp, clamp) if clamp > 0 else z), stats


def actor_weights(iteration, shaped, values, tau, adv_clip, warmup_iterations, normalize=False, centered=False):
    """A = r~ - V (AC-Flow's advantage), with V treated as 0 while iteration < warmup_iterations (the
    ORW-CFM-W2 special case); A^ = clip(A, -c_A, c_A) (c_A = 0: no clipping). Returns (w, A^), w detached:
    w = exp(tau A^) (exponent capped at 30 against overflow; optionally / mean; centered: w - 1)."""
    adv = shaped - values.detach() if iteration >= warmup_iterations else shaped.clone()
    if adv_clip > 0:
        adv = adv.clamp(-adv_clip, adv_clip)
    w = torch.exp((tau * adv).clamp(max=30.0))
    w = w / utils.all_gather_cat(w).mean() if normalize else w  # mean over every rank's batch
    return (w - 1 if centered else w), adv


def acflow_loss(v, v_ref, target, w, alpha):
    """Per sample (B,): w * mean(v - (eps - x0))^2 + alpha * mean(v - v_ref)^2 (ORW-CFM-W2 loss with the critic
    weight; diffusers v = eps - x0 equals the paper's u = x1 - x0 up to a sign that cancels).
    Returns (per-sample loss, fm, w2). A deliberate copy of orw_cfm_w2.py's orw_loss (each method file stands alone)."""
    fm = ((v.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    w2 = ((v.float() - v_ref.float()) ** 2).mean(dim=(1, 2, 3))
    return w * fm + alpha * w2, fm, w2


def critic_loss_fn(values, shaped, kind="mse"):
    """Regress V on the shaped terminal reward (Monte-Carlo target, gamma = 1); MSE or Huber(1)."""
    return nn.functional.huber_loss(values, shaped, delta=1.0) if kind == "huber" else ((values - shaped) ** 2).mean()


def explained_variance(pred, target):
    """1 - Var(target - pred) / Var(target) (CleanRL's diagnostic); nan if the targets are constant."""
    var = target.var(unbiased=False)
    return float("nan") if var == 0 else float(1 - (target - pred).var(unbiased=False) / var)


def check_method_args(a):
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")
    if a.adv_clip < 0 or a.alpha < 0 or a.critic_lr < 0 or a.shaping_clamp < 0:
        utils.fail("--adv-clip, --alpha, --critic-lr and --shaping-clamp must be >= 0")
    if a.tau < 0 or a.critic_weight_decay < 0:
        utils.fail(f"--tau {a.tau} and --critic-weight-decay {a.critic_weight_decay} must be >= 0")
    if a.critic_width < 4 or min(a.critic_steps, a.critic_buffer, a.timesteps_per_image, a.epoch_iters, a.pool_reuse) < 1:
        utils.fail("--critic-width must be >= 4; --critic-steps, --critic-buffer, --timesteps-per-image, "
                   "--epoch-iters, --pool-reuse >= 1")
    if a.warmup_iters < 0 or a.warmup_ev < 0 or (a.critic_warmup is not None and a.critic_warmup < 0):
        utils.fail(f"--warmup-iters {a.warmup_iters}, --warmup-ev {a.warmup_ev} and --critic-warmup {a.critic_warmup} "
                   "must be >= 0")
    if not 0 <= a.shaping_momentum < 1:
        utils.fail(f"--shaping-momentum {a.shaping_momentum} must be in [0, 1)")
    if a.weights == "centered" and a.alpha < 1:
        # per noised point the quadratic coefficient is E[w - 1 | x_t] + alpha, and w - 1 reaches -1 (see orw_cfm_w2.py)
        utils.fail(f"--weights centered needs --alpha >= 1 (got {a.alpha}): below it the objective is unbounded below")
    if a.weights == "centered" and a.weight_norm == "none":
        utils.fail("--weights centered needs --weight-norm minibatch (w - 1 has mean 0 only for normalised w)")
    if a.shaping == "group" and a.group_size < 2:
        utils.fail("--shaping group needs --group-size >= 2 (a z-score within each prompt's images)")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    r = run.Run(args, __file__, with_old=True)  # checks, seed, run dir, model, actor / sampling ("old") / ref, reward
    model, policy, rank, world, device = r.model, r.policy, r.rank, r.world, r.device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # linear warm-up (ORW-CFM-W2 official code: LambdaLR(min(step, 5000) / 5000), first step lr 0; ours lr / W)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_iters)))
    with torch.random.fork_rng():  # same critic init on every rank
        torch.manual_seed(args.seed)
        critic = Critic(model.latent_shape[0], model.transformer.config.pooled_projection_dim, args.critic_width,
                        args.critic_zero_init).to(device)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.critic_weight_decay)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    pool_batches = math.ceil(args.epoch_iters / args.pool_reuse)  # batches sampled per epoch (E with no reuse)
    warmup_min = args.critic_warmup if args.critic_warmup is not None else args.num_iterations // 10

    def noised(x0, n, local, gen):  # global draws sliced per rank: sigma ~ U(0, 1) (ORW code), x_t (paper t = 1 - sigma)
        sigma = torch.rand(n * world, generator=gen)[local].to(device)
        eps = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
        return sigma, eps, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps

    shaping_stats, buffer, warmup_end = None, [], None
    pool_keys = ("latents", "pooled", "prompt_idx")  # the per-rank entries of a pool (this rank's part of a batch)

    def state():  # what an AC-Flow checkpoint keeps; every rank gathers its part of the pools' samples
        return dict(policy=policy.trainable_state(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    critic=critic.state_dict(), critic_optimizer=critic_opt.state_dict(), shaping_stats=shaping_stats,
                    buffer=[utils.gather_pool(p, pool_keys, device) for p in buffer], warmup_end=warmup_end)

    ckpt = r.start(r.evaluate, state)  # --resume: the checkpoint; else the base evaluation
    if ckpt:
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"]), scheduler.load_state_dict(ckpt["scheduler"])
        critic.load_state_dict(ckpt["critic"]), critic_opt.load_state_dict(ckpt["critic_optimizer"])
        shaping_stats, warmup_end = ckpt["shaping_stats"], ckpt["warmup_end"]  # CPU statistics, as in a run
        buffer = [utils.rank_pool(p, pool_keys, rank, world, device) for p in ckpt["buffer"]]  # this rank's part

    pool_ev = float("nan")
    for it in r.iterations("acflow"):
        t_iter = utils.now(device)
        epoch, j = divmod(it, args.epoch_iters)
        if j == 0 or not buffer:
            # ---- new epoch: E / R batches of CFG-free ODE rollouts of the fixed sampling copy (ORW-CFM-W2's
            # `last_policy`), scored once; noise for the global batch from (seed, epoch, batch), sliced per rank
            # copy: pool sampler (orw_cfm_w2.py, acflow.py; tests/test_copies.py keeps them identical)
            pool = dict(epoch=epoch, latents=[], pooled=[], prompt_idx=[], rewards=[], parts={})
            for b in range(pool_batches):
                captions, meta, prompt_idx = r.sampler.sample(epoch * pool_batches + b)
                n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
                # one stream per (seed, epoch, batch): the primes 1,000,003 and 1,009 exceed any epoch / batch count
                gen = torch.Generator().manual_seed((args.seed * 1_000_003 + epoch) * 1_009 + b)
                noise = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
                prompt_embeds, pooled = model.encode_prompt(captions)
                with policy.old() as old:  # x0: (B, C, H, W), AC-Flow's x_1
                    x0 = sampling.sample(old, prompt_embeds, pooled, sigmas, noise, solver=args.solver)["latents"]
                reward, parts = r.reward_fn(model.decode(x0), captions, meta)
                r.reward_queries += n * world
                pool["latents"].append(x0), pool["pooled"].append(pooled), pool["prompt_idx"].append(prompt_idx)
                pool["rewards"].append(utils.all_gather_cat(reward.to(device)).cpu())  # (B_global,)
                for k, v in parts.items():
                    pool["parts"].setdefault(k, []).append(v.float().mean().item())
            # end copy: pool sampler
            # shaping over the whole pool; prompt ids gathered so group statistics are global
            groups = torch.cat([utils.all_gather_cat(p.to(device)).cpu() for p in pool["prompt_idx"]])
            shaped, shaping_stats = shape_rewards(torch.cat(pool["rewards"]).float(), args.shaping, groups,
                                                  shaping_stats, args.shaping_momentum, args.shaping_clamp)
            pool["shaped"] = list(shaped.view(pool_batches, -1))
            # out-of-sample explained variance: the critic has not trained on this pool yet (the warm-up gate)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            pv = []  # (V, r~) of each pool batch at fresh noised points
            with torch.no_grad():
                for b in range(pool_batches):
                    s, _, xt = noised(pool["latents"][b], n, local, gen)
                    pv.append((critic(xt, s, pool["pooled"][b]), pool["shaped"][b][local].to(device)))
            pool_ev = explained_variance(*(utils.all_gather_cat(torch.cat(t)).cpu() for t in zip(*pv)))
            if warmup_end is None and it >= warmup_min and (args.warmup_ev == 0 or (args.critic and pool_ev > args.warmup_ev)):
                warmup_end = it  # the critic drives the actor once it explains fresh rollouts
            pool["order"] = torch.cat([torch.randperm(pool_batches, generator=gen) for _ in range(args.pool_reuse)])
            buffer = (buffer + [pool])[-args.critic_buffer:]  # the critic's replay buffer of recent pools
        pool = buffer[-1]
        t_sample = utils.now(device)
        # ---- this iteration's actor minibatch from the pool and its noised points
        b = int(pool["order"][j])
        x0, pooled, prompt_idx = pool["latents"][b], pool["pooled"][b], pool["prompt_idx"][b]
        captions = [r.prompts[i] for i in prompt_idx]
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, _ = model.encode_prompt(captions)
        shaped, all_rewards = pool["shaped"][b][local].to(device), torch.cat(pool["rewards"])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # one stream per (seed, iteration)
        points = []  # (micro-batch indices, sigma, eps, x_t)
        for _ in range(args.timesteps_per_image):
            pts = noised(x0, n, local, gen)
            points += [(mb, *(t[mb] for t in pts)) for mb in torch.arange(n).split(args.train_batch_size)]
        with torch.no_grad():  # the critic baseline V(x_t, sigma, c), read before this iteration's critic steps
            values = torch.cat([critic(xt, s, pooled[mb]) if args.critic else torch.zeros(len(mb), device=device)
                                for mb, s, _, xt in points])
        targets = torch.cat([shaped[mb] for mb, _, _, _ in points])  # r~ of each noised point's image
        warm = warmup_end is None
        w_all, adv = actor_weights(it, targets, values, args.tau, args.adv_clip, it + 1 if warm else warmup_end,
                                   args.weight_norm == "minibatch", args.weights == "centered")
        w_v0, _ = actor_weights(it, targets, values, args.tau, args.adv_clip, it + 1, args.weight_norm == "minibatch",
                                args.weights == "centered")  # the same weights with V = 0 (the ORW special case)
        critic_effect = ((w_all - w_v0).abs().mean() / w_v0.abs().mean().clamp_min(1e-12)).item()
        t_reward = utils.now(device)
        # ---- actor update: critic-weighted CFM + W2 (AC-Flow's actor loss), one optimizer step
        optimizer.zero_grad(set_to_none=True)
        losses, fms, w2s, start = [], [], [], 0
        for mb, sigma, eps, x_t in points:
            pe, pp = prompt_embeds[mb], pooled[mb]
            with torch.no_grad(), policy.ref() as ref:
                v_ref = sampling.predict(ref, x_t, sigma, pe, pp)
            v = sampling.predict(policy.transformer, x_t, sigma, pe, pp)
            per, fm, w2 = acflow_loss(v, v_ref, eps - x0[mb], w_all[start:start + len(mb)], args.alpha)
            start += len(mb)
            (per.mean() / len(points)).backward()
            losses.append(per.mean().detach()), fms.append(fm.mean().detach()), w2s.append(w2.mean().detach())
        loss = torch.stack(losses).mean()
        utils.sync_gradients(policy.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        lr_now = optimizer.param_groups[0]["lr"]
        if r.guard.ok(loss, grad_norm, all_rewards, iteration=it):
            optimizer.step()
        scheduler.step()  # the warm-up counts iterations, skipped updates included (as orw_cfm_w2.py)
        # ---- critic steps on minibatches of the replay buffer, fresh noised points
        critic_losses = []
        for _ in range(args.critic_steps if args.critic else 0):
            p = buffer[int(torch.randint(len(buffer), (1,), generator=gen))]
            cb = int(torch.randint(len(p["latents"]), (1,), generator=gen))
            s, _, xt = noised(p["latents"][cb], n, local, gen)
            critic_opt.zero_grad(set_to_none=True)
            c_loss = critic_loss_fn(critic(xt, s, p["pooled"][cb]), p["shaped"][cb][local].to(device), args.critic_loss)
            c_loss.backward()
            utils.sync_gradients(critic.parameters())
            critic_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            if torch.isfinite(critic_grad_norm):
                critic_opt.step()
            critic_losses.append(c_loss.detach())
        # ---- end of epoch: sampling copy <- actor (ORW-CFM-W2's lagged `last_policy`)
        if j == args.epoch_iters - 1:
            policy.update_old(0.0)
        all_values, all_targets = utils.all_gather_cat(values), utils.all_gather_cat(targets)  # global diagnostics

        t_train = utils.now(device)
        # ---- log
        metrics = {
            # this iteration's training images, as in every method file; the epoch's pool separately
            "charts/reward_mean": pool["rewards"][b].mean().item(), "charts/reward_std": pool["rewards"][b].std().item(),
            "charts/pool_reward_mean": all_rewards.mean().item(),
            "charts/images_per_sec": n * world / (time.time() - t_iter),
            "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample,
            "perf/train_s": t_train - t_reward, "charts/lr": lr_now, "charts/reward_queries": r.reward_queries,
            "charts/critic_warmup": float(warm), "losses/loss": loss.item(), "losses/grad_norm": grad_norm.item(),
            "losses/fm_loss": torch.stack(fms).mean().item(), "losses/w2_loss": torch.stack(w2s).mean().item(),
            "losses/value_mean": all_values.mean().item(), "losses/critic_explained_variance": pool_ev,
            "losses/critic_ev_minibatch": explained_variance(all_values.cpu(), all_targets.cpu()),
            "losses/critic_weight_change": critic_effect,
            "losses/adv_mean": adv.mean().item(), "losses/adv_std": adv.std().item(), "losses/adv_clip_frac":
            (adv.abs() >= args.adv_clip - 1e-6).float().mean().item() if args.adv_clip > 0 else 0.0,
            **{f"losses/weight_{k}": getattr(w_all, k)().item() for k in ("mean", "min", "max", "std")},
            "losses/skipped_updates": r.guard.total,
            **{f"charts/reward_{k}": sum(v) / len(v) for k, v in pool["parts"].items()},
            **({"losses/critic_loss": torch.stack(critic_losses).mean().item()} if critic_losses else {}),
        }
        r.end_iteration(it, metrics, (x0, captions, pool["rewards"][b][local]),
                        reward=f"{metrics['charts/reward_mean']:.3f}", loss=f"{loss.item():.4f}", ev=f"{pool_ev:.2f}")

    r.finish()
