"""ORW-CFM-W2: online reward-weighted conditional flow matching with a Wasserstein-2 regulariser (Fan et al.,
ICLR 2025, arXiv 2502.06061; official code github.com/markerthu/orw-cfm, finetune_fm.py).

Epochs as in the official code: a lagged sampling copy theta_old (`last_policy`) is fixed for E iterations and
draws a fresh batch of images with the CFG-free ODE sampler at every iteration, each scored once and weighted
w = exp(tau * r); the learner does weighted flow matching on that batch at fresh noised points x_t, plus
alpha * ||v_theta - v_ref||^2 towards the frozen base at the same (x_t, sigma), whose time integral bounds the
squared W2 distance to the base model (paper Thm. 3); at the end of the epoch theta_old <- theta (eq. 10, official
`training_step` / `update_last_policy`). Docs: docs/orw_cfm_w2.md.

    python orw_cfm_w2.py                             # the paper's algorithm, embedded shapes world, 2 CPU cores
    python orw_cfm_w2.py --alpha 0                   # ORW-CFM without W2 (the paper: collapses to the reward maximiser)
    python orw_cfm_w2.py --tau 0                     # control: uniform weights (self-training + W2 only)
    python orw_cfm_w2.py --offline                   # RW-CFM: every batch sampled from the base model
    python orw_cfm_w2.py --weights centered --weight-norm pool --tau 20 --alpha 3 --pool-reuse 4
                                                     # not the paper's: w / mean(w) - 1 (docs: the controls)
"""

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
    num_iterations: int = 200
    """gradient steps (official code: epochs x steps_per_epoch)"""
    prompts_per_iter: int = 32
    """prompts per gradient step (the minibatch; SD3.5-M: 32)"""
    group_size: int = 1
    """images per prompt (the paper's weights are per image: no groups needed)"""
    train_batch_size: int = 32
    """micro-batch of the update; gradients are accumulated into one optimizer step per iteration"""
    epoch_iters: int = 20
    """E: iterations per epoch; theta_old is fixed for an epoch, then old <- learner (official `update_last_policy`)"""
    pool_reuse: int = 1
    """R: iterations that train on each sampled batch (1: a fresh batch from theta_old every iteration, official)"""
    lr: float = 3e-5
    """AdamW learning rate after the warm-up"""
    warmup_iters: int = 10
    """linear learning-rate warm-up (official code: 5,000 of 100,000 steps, 5 %); 0 = off"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """ODE steps of the rollout sampler"""
    solver: Literal["euler", "heun"] = "euler"
    """ODE solver of the rollouts (evaluation: Euler)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps; SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of evaluation; rollouts are CFG-free (the paper does not state its SD3 CFG)"""
    tau: float = 1.0
    """inverse temperature of w = exp(tau * r); official code 0.5 for a reward in [-1, 1], i.e. tau x range = 1"""
    alpha: float = 1.0
    """W2 coefficient: weight of ||v_theta - v_ref||^2 (official code 1.0; 0 = ORW-CFM without W2)"""
    weight_norm: Literal["none", "pool", "prompt"] = "none"
    """none: raw exp(tau r) (official) | pool: w / mean(w) over the epoch | prompt: over each prompt's images"""
    weights: Literal["paper", "centered"] = "paper"
    """paper: w (eq. 10) | centered: w / mean(w) - 1 (AdvantageFlow eq. 12; not the paper's; alpha >= 1)"""
    max_exponent: float = 20.0
    """clamp tau * r at this value before exp (raw weights only; a guard against overflow)"""
    offline: bool = False
    """RW-CFM, the paper's offline baseline: every batch is sampled from the base model"""
    timesteps_per_image: int = 1
    """noised points per image per iteration (official code: 1)"""
    sigma_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """training noise levels: uniform (paper, official code) | logit_normal (the embedded base and SD3 pretraining)"""
    w2_eval_samples: int = 32
    """held-out samples on which the W2 bound to the base model is estimated at each evaluation"""


# ----------------------------------------------------------------------------------- weights and loss
def orw_weights(rewards_, tau, norm="none", groups=None, max_exponent=20.0, centered=False):
    """w = exp(tau * r) (eq. 10, official code), no gradient. norm: "pool" w / mean(w) over all rewards, "prompt"
    w / mean(w) over the rewards that share a group id (a softmax of tau * r per group times its size, so it cannot
    overflow), "none": raw, tau * r clamped at max_exponent. centered: w - 1 (mean 0 for normalised w)."""
    z = tau * rewards_.detach().double()
    if norm == "none":
        w = torch.exp(z.clamp(max=max_exponent))
    else:
        groups = torch.zeros_like(z, dtype=torch.long) if norm == "pool" else groups
        _, inv = torch.unique(groups, return_inverse=True)
        z_max = torch.full((int(inv.max()) + 1,), -torch.inf, dtype=z.dtype).scatter_reduce(0, inv, z, "amax")
        e = torch.exp(z - z_max[inv])  # shifted by each group's max: no overflow
        w = e / utils.group_mean(e, groups)
    return (w - 1 if centered else w).to(rewards_.dtype)


def orw_loss(v, v_ref, target, w, alpha):
    """ORW-CFM-W2 eq. 10 per sample (B,): w * ||v - target||^2 + alpha * ||v - v_ref||^2, with
    target = noise - x0 (diffusers; the paper's u = x1 - x0 is its negative and the sign cancels in both terms),
    v, v_ref the learner's and the base model's predictions at the same (x_t, sigma), and ||.||^2 the
    mean over latent elements (official code). Returns (loss, fm, w2).
    acflow.py's acflow_loss is a deliberate copy (each method file stands alone)."""
    dims = tuple(range(1, v.ndim))
    fm = ((v - target) ** 2).mean(dims)
    w2 = ((v - v_ref) ** 2).mean(dims)
    return w * fm + alpha * w2, fm, w2


@torch.no_grad()
def w2_bound(policy, prompt_embeds, pooled, sigmas, noise):
    """Paper Thm. 3 without its e^{2L} factor: sum_i (sigma_i - sigma_i+1) * E||v_ft - v_ref||^2 along
    the learner's own ODE path, and the paired-noise distance E||x_ft(z) - x_ref(z)||^2 (a coupling, so an upper
    bound on W2^2 itself). Both per latent element."""
    x, y, integral = noise, noise, 0.0
    for i in range(len(sigmas) - 1):
        dt = sigmas[i + 1] - sigmas[i]
        v = sampling.predict(policy.transformer, x, sigmas[i], prompt_embeds, pooled)
        with policy.ref() as ref:  # a separate context: under LoRA the reference is the same module, adapters off
            v_ref = sampling.predict(ref, x, sigmas[i], prompt_embeds, pooled)
            y = y + dt * sampling.predict(ref, y, sigmas[i], prompt_embeds, pooled)
        integral += -float(dt) * ((v - v_ref) ** 2).mean().item()
        x = x + dt * v
    return integral, ((x - y) ** 2).mean().item()


def check_method_args(a):
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")
    if a.tau < 0:
        utils.fail(f"--tau {a.tau} must be >= 0 (0 = unweighted self-distillation)")
    if a.alpha < 0:
        utils.fail(f"--alpha {a.alpha} must be >= 0 (0 = ORW-CFM without the W2 term)")
    if a.weights == "centered" and a.weight_norm == "none":
        utils.fail("--weights centered needs --weight-norm pool or prompt (w - 1 has mean 0 only for normalised w)")
    if a.weights == "centered" and a.alpha < 1:
        # per noised point the quadratic coefficient is E[w - 1 | x_t] + alpha; at small sigma x_t fixes the image and
        # w - 1 reaches -1, so the objective is bounded below only for alpha >= 1 (AdvantageFlow eq. 7's condition)
        utils.fail(f"--weights centered needs --alpha >= 1 (got {a.alpha}): below it the objective is unbounded below")
    if a.weight_norm == "prompt" and a.group_size * math.ceil(a.epoch_iters / max(1, a.pool_reuse)) < 2:
        utils.fail(f"--weight-norm prompt needs several images per prompt in the pool: --group-size {a.group_size}")
    if a.max_exponent <= 0:
        utils.fail(f"--max-exponent {a.max_exponent} must be > 0")
    for name in ("epoch_iters", "pool_reuse", "timesteps_per_image"):
        if getattr(a, name) < 1:
            utils.fail(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if a.warmup_iters < 0:
        utils.fail(f"--warmup-iters {a.warmup_iters} must be >= 0 (0 = no learning-rate warm-up)")
    if a.w2_eval_samples < 0:
        utils.fail(f"--w2-eval-samples {a.w2_eval_samples} must be >= 0 (0 = skip the W2 estimate)")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    r = run.Run(args, __file__, with_old=True, eval_scalars=("w2_integral", "w2_coupling", "train_reward_mean"))
    model, policy, rank, world, device = r.model, r.policy, r.rank, r.world, r.device  # learner / sampling copy / ref
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # linear warm-up (official code: LambdaLR(min(step, 5000) / 5000), whose first step has lr 0; ours lr / W)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_iters)))
    sigmas = model.sigmas(args.num_steps)  # (T+1,) sampling grid, shift from the scheduler config
    pool_batches = math.ceil(args.epoch_iters / args.pool_reuse)  # batches sampled per epoch (E with no reuse)
    pool = None

    def evaluate(step):
        res = r.evaluate(step)
        if args.w2_eval_samples:  # W2 bound to the base model on fixed held-out prompts and noise
            w2_caps = [r.eval_prompts[i % len(r.eval_prompts)] for i in range(args.w2_eval_samples)]
            pe, pp = model.encode_prompt(w2_caps)
            z = torch.randn(len(w2_caps), *model.latent_shape, generator=torch.Generator().manual_seed(args.seed + 1))
            was_training = model.transformer.training
            model.transformer.eval()
            res["w2_integral"], res["w2_coupling"] = w2_bound(policy, pe, pp, sigmas, z.to(device, model.dtype))
            model.transformer.train(was_training)
        return res

    def state():  # what an ORW-CFM-W2 checkpoint keeps; every rank gathers its part of the pool's samples
        return dict(policy=policy.trainable_state(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    pool=utils.gather_pool(pool, ("latents", "prompt_idx"), device))

    ckpt = r.start(evaluate, state)  # --resume: the checkpoint; else the base evaluation
    if ckpt:
        policy.load_trainable_state(ckpt["policy"])  # the learner and theta_old
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        pool = utils.rank_pool(ckpt["pool"], ("latents", "prompt_idx"), rank, world, device)  # this epoch's samples

    for it in r.iterations("orw_cfm_w2"):
        t_iter = utils.now(device)
        epoch, j = divmod(it, args.epoch_iters)
        if j == 0 or pool is None:
            # ---- new epoch: the epoch's batches of CFG-free ODE samples of the fixed sampling copy theta_old, each
            # scored once (official `sample_batch` draws them from `last_policy` one per step; theta_old is fixed for
            # the epoch, so drawing them here is the same). Noise for the global batch from (seed, epoch, batch),
            # sliced per rank: resume is exact and 2 processes see the numbers of 1 process.
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
            # weights w = exp(tau * r), detached (eq. 10; official code); --weights centered: w / mean(w) - 1
            all_rewards = torch.stack(pool["rewards"])  # (E / R batches, B_global)
            groups = torch.cat([utils.all_gather_cat(p.to(device)).cpu() for p in pool["prompt_idx"]])
            pool["weights"] = orw_weights(all_rewards.flatten(), args.tau, args.weight_norm, groups, args.max_exponent,
                                          args.weights == "centered").view_as(all_rewards)
            # order in which the epoch visits the pool's minibatches: one permutation per pass
            perm_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            pool["order"] = torch.cat([torch.randperm(pool_batches, generator=perm_gen)
                                       for _ in range(args.pool_reuse)])
        t_sample = utils.now(device)
        # ---- this iteration's minibatch from the pool; fresh (sigma, noise) drawn from (seed, iteration)
        b = int(pool["order"][j])
        x0, prompt_idx = pool["latents"][b], pool["prompt_idx"][b]
        captions = [r.prompts[i] for i in prompt_idx]
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        w_local = pool["weights"][b][local].to(device)
        all_rewards, weights = torch.stack(pool["rewards"]), pool["weights"]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # one stream per (seed, iteration)
        t_reward = utils.now(device)
        # ---- loss + update: weighted CFM + W2 (eq. 10), one optimizer step, micro-batches x timesteps accumulated
        optimizer.zero_grad(set_to_none=True)
        n_mb = n // args.train_batch_size
        stats, losses = [], []
        for _ in range(args.timesteps_per_image):
            if args.sigma_sampling == "uniform":  # t ~ U(0, 1) <=> sigma ~ U(0, 1) (official code)
                sigma_all = torch.rand(n * world, generator=gen)[local]
            else:  # the base model's pretraining density (SD3: logit-normal(0, 1))
                sigma_all = torch.sigmoid(torch.randn(n * world, generator=gen))[local]
            # fresh noise paired independently with the samples (I-CFM): the official code's exact-OT matcher
            # (torchcfm ExactOptimalTransportConditionalFlowMatcher) re-draws (noise, sample) pairs with replacement,
            # so its weights no longer belong to their samples; independent pairs keep each weight on its sample
            eps_all = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
            for mb in torch.arange(n).split(args.train_batch_size):
                sigma, eps = sigma_all[mb].to(device), eps_all[mb]
                s = sigma.view(-1, 1, 1, 1)
                x_t = (1 - s) * x0[mb] + s * eps  # forward process, the same x_t for learner and reference
                pe, pp = prompt_embeds[mb], pooled[mb]
                with torch.no_grad(), policy.ref() as ref:  # frozen base model (also logged when alpha = 0)
                    v_ref = sampling.predict(ref, x_t, sigma, pe, pp)
                v = sampling.predict(policy.transformer, x_t, sigma, pe, pp)
                per, fm, w2 = orw_loss(v, v_ref, eps - x0[mb], w_local[mb], args.alpha)  # target v = noise - x0
                loss = per.mean()
                (loss / (n_mb * args.timesteps_per_image)).backward()
                losses.append(loss.detach())
                stats.append(torch.stack([fm.mean(), (w_local[mb] * fm).mean(), w2.mean()]).detach())
        loss = torch.stack(losses).mean()
        utils.sync_gradients(policy.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        lr_now = optimizer.param_groups[0]["lr"]
        if r.guard.ok(loss, grad_norm, all_rewards, iteration=it):
            optimizer.step()
        scheduler.step()
        # ---- end of epoch: theta_old <- theta (official `update_last_policy`); offline RW-CFM keeps sampling from
        # the base model
        if j == args.epoch_iters - 1 and not args.offline:
            policy.update_old(0.0)
        t_train = utils.now(device)

        # ---- log
        fm_mean, wfm_mean, w2_mean = torch.stack(stats).mean(0).tolist()
        w_pos = weights + 1 if args.weights == "centered" else weights  # the positive weights exp(tau r) / mean
        metrics = {
            # this iteration's training images, as in every method file; the epoch's pool separately
            "charts/reward_mean": all_rewards[b].mean().item(), "charts/reward_std": all_rewards[b].std().item(),
            "charts/pool_reward_mean": all_rewards.mean().item(),
            "charts/images_per_sec": n * world / (time.time() - t_iter),
            "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample, "perf/train_s": t_train - t_reward,
            "charts/lr": lr_now, "charts/reward_queries": r.reward_queries, "charts/epoch": epoch,
            "losses/loss": loss.item(), "losses/grad_norm": grad_norm.item(),
            "losses/fm": fm_mean, "losses/weighted_fm": wfm_mean, "losses/w2": w2_mean,
            "losses/alpha_w2": args.alpha * w2_mean,
            "losses/weight_mean": weights.mean().item(), "losses/weight_max": weights.max().item(),
            "losses/weight_ess": (w_pos.sum() ** 2 / (w_pos ** 2).sum() / w_pos.numel()).item(),
            "losses/skipped_updates": r.guard.total,
            **{f"charts/reward_{k}": sum(v) / len(v) for k, v in pool["parts"].items()},
        }
        r.end_iteration(it, metrics, (x0, captions, all_rewards[b][local]), reward=f"{metrics['charts/reward_mean']:.3f}",
                        w2=f"{w2_mean:.4f}")

    r.finish()
