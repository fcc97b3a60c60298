"""FDFO: Finite Difference Flow Optimization (McAllister, Aittala, Karras, Hellsten, Kanazawa, Aila, Laine 2026,
arXiv 2603.12893; official code NVlabs/finite-difference-flow-optimization).

Per prompt, ONE initial noise and TWO sampling trajectories with a tiny, independent EDM-style churn, so the two
final images are near-identical counterfactuals. The reward difference times the normalised difference of the
final latents is a finite-difference estimate of the reward gradient in latent space; it is copied, without
backpropagating through the sampler, to every visited state of both trajectories as a velocity target
u = v_old - dbar, trained with an FPO-style likelihood-free ratio inside the SPO surrogate (a soft trust
region), over --num-minibatches shuffled optimizer steps per iteration. Docs: docs/fdfo.md.

    python fdfo.py                                       # embedded shapes world, 2 CPU cores, ~10 min
    python fdfo.py --churn 0.0025 --eps-clip 0.03        # the paper's churn and trust region
"""

import math
import os
import time
from dataclasses import dataclass

import torch

from common import run, sampling, utils
from common import reward_models, world  # noqa: F401 (they register the real rewards and the embedded world)
from common.tools import hub  # noqa: F401 (registers --upload-model)
from common.run import RunArgs


@dataclass
class Args(RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    eval_every: int = 40
    """iterations between held-out evaluations"""
    num_iterations: int = 100
    """iterations of 2 x --prompts-per-iter reward queries each"""
    prompts_per_iter: int = 16
    """pairs per iteration, one prompt per pair (SD3.5-M: 432)"""
    group_size: int = 2
    """images per prompt: must be 2 (the two branches A, B of a pair)"""
    train_batch_size: int = 16
    """micro-batch of the rollouts (images) and of the update ((image, step) items)"""
    lr: float = 1e-5
    """AdamW learning rate (SD3.5-M LoRA: 3e-5)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """churned sampler steps of the rollouts (SD3.5-M: 40, official num_solver_steps)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps; SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of rollouts, training forward and evaluation (negative = empty prompt; paper: 1.0 = none)"""
    churn: float = 0.0025
    """gamma: EDM churn of the prior and of every step but the last (paper: 0.0025)"""
    eps_clip: float = 0.03
    """SPO trust region epsilon (paper: 0.03)"""
    num_minibatches: int = 4
    """optimizer steps per iteration over the shuffled (image, step) items (official gradient_steps_per_epoch)"""
    kl_coef: float = 0.0
    """weight of mean((v - v_base)^2), a velocity-space pull to the base model (paper: 0)"""


# ----------------------------------------------------------------------------------- churned paired sampler
def churn_gammas(num_steps, gamma):
    """(T+1,) [prior, step 0, ..., step T-1] = [g, ..., g, 0]: no churn on the last step to sigma = 0 (official code)."""
    g = torch.full((num_steps + 1,), float(gamma))
    g[-1] = 0.0
    return g


def churn_prior(noise, gamma, xi):
    """Variance-preserving churn of the initial noise: (eps + sqrt((1+g)^2 - 1) xi) / (1+g)."""
    return (noise + math.sqrt((1 + gamma) ** 2 - 1) * xi) / (1 + gamma)


def churn_step(latents, v, sigma, sigma_next, gamma, xi):
    """EDM churn in RF units: Euler to r = s / (1 + g(1 - s)) (overshoot below the target level s), shrink by
    1 + g r and add r sqrt((1+g)^2 - 1) / (1 + g r) fresh noise; lands exactly at noise level s (official code)."""
    r = sigma_next / (1 + gamma * (1 - sigma_next))
    overshoot = latents + (r - sigma) * v
    return (overshoot + r * math.sqrt((1 + gamma) ** 2 - 1) * xi) / (1 + gamma * r)


@torch.no_grad()
def churn_sample(transformer, prompt_embeds, pooled, sigmas, noise, gammas, generators, guidance_scale=1.0,
                 neg_embeds=None, neg_pooled=None):
    """Churned rollouts from `noise` (already shared within each pair); `generators` (one per image) draw each
    image's independent churn noise xi. Returns the visited states (B, T, C, H, W), the velocities used there
    (B, T, C, H, W) and the final latents (B, C, H, W) in fp32: the two branches differ by a small churn, and their
    finite difference must not pass through a bf16 cast (official code); churn math in fp32."""
    dtype = noise.dtype
    randn = lambda: torch.stack([torch.randn(noise.shape[1:], generator=g) for g in generators]).to(noise.device)  # noqa: E731
    x = churn_prior(noise.float(), gammas[0].item(), randn())  # independent xi per branch
    states, velocities = [], []
    for i in range(len(sigmas) - 1):
        v = sampling.predict(transformer, x.to(dtype), sigmas[i], prompt_embeds, pooled, guidance_scale,
                             neg_embeds, neg_pooled)
        states.append(x.to(dtype))
        velocities.append(v)
        x = churn_step(x, v.float(), sigmas[i].item(), sigmas[i + 1].item(), gammas[i + 1].item(), randn())
    return torch.stack(states, 1), torch.stack(velocities, 1), x


# ----------------------------------------------------------------------------------- finite difference
def finite_difference(rewards_, final_latents):
    """Pairs are adjacent (A = even, B = odd index). a_A = (R_A - R_B)/2, a_B = -a_A; d_A = (z_A - z_B)/2, d_B = -d_A;
    dbar = d / (mean(d^2) + 1e-6), the mean over latent elements (divide by the mean square, not the RMS)."""
    r_a, r_b = rewards_[0::2].float(), rewards_[1::2].float()
    adv = torch.stack([(r_a - r_b) / 2, (r_b - r_a) / 2], 1).reshape(-1)  # (B,)
    z_a, z_b = final_latents[0::2].float(), final_latents[1::2].float()
    d = torch.stack([(z_a - z_b) / 2, (z_b - z_a) / 2], 1).flatten(0, 1)  # (B, C, H, W)
    ms = d.pow(2).mean(dim=tuple(range(1, d.ndim)), keepdim=True)
    return adv, d / (ms + 1e-6)


# ----------------------------------------------------------------------------------- loss
def spo_loss(v, v_old, dbar, adv, eps_clip):
    """Per item (B,): rho = exp(ell_old - ell), ell = mean((v - u)^2), u = v_old - dbar, ell_old = mean(dbar^2);
    L = -a rho + |a| / (2 eps_clip) (rho - 1)^2 (SPO surrogate). ell - ell_old is computed as
    mean(delta^2 + 2 delta dbar), delta = v - v_old (the same quantity, without cancelling two large numbers)."""
    delta = v.float() - v_old.float()
    dims = tuple(range(1, delta.ndim))
    rho = torch.exp(-(delta.pow(2) + 2 * delta * dbar.float()).mean(dims))
    return -adv * rho + adv.abs() / (2 * eps_clip) * (rho - 1) ** 2, rho


def check_method_args(a):
    if a.group_size != 2:
        utils.fail(f"--group-size {a.group_size} must be 2 for FDFO (the two branches of a pair; "
                   "--prompts-per-iter counts pairs)")
    world = utils.world_size_from_env()
    if a.prompts_per_iter % world:
        utils.fail(f"--prompts-per-iter {a.prompts_per_iter} (pairs) is not divisible by the world size {world}: "
                   "each process must hold whole pairs")
    if a.churn <= 0:
        utils.fail(f"--churn {a.churn} must be > 0 (0 gives identical branches and no finite difference)")
    if a.eps_clip <= 0 or a.kl_coef < 0:
        utils.fail("--eps-clip must be > 0 and --kl-coef >= 0")
    if a.num_minibatches < 1:
        utils.fail(f"--num-minibatches {a.num_minibatches} must be >= 1")
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    r = run.Run(args, __file__)  # checks, seed, run dir, model, learner / ref (v_old = the stored rollout velocities)
    model, policy, rank, world, device = r.model, r.policy, r.rank, r.world, r.device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    gammas = churn_gammas(args.num_steps, args.churn)  # (T+1,)
    neg = model.encode_prompt([""]) if args.guidance_scale > 1 else None  # CFG negative = empty prompt

    # copy: CFG negatives (fdfo.py, flow_grpo.py)
    def negs(b):
        return (neg[0].expand(b, -1, -1), neg[1].expand(b, -1)) if neg is not None else (None, None)
    # end copy: CFG negatives

    def state():  # what an FDFO checkpoint keeps
        return dict(policy=policy.trainable_state(), optimizer=optimizer.state_dict())

    ckpt = r.start(r.evaluate, state)  # --resume: the checkpoint; else the base evaluation
    if ckpt:
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])

    for it in r.iterations("fdfo"):
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # one stream per (seed, iteration)
        # ---- sample: one shared noise per pair, two branches with independent churn (paper §3), in micro-batches
        captions, meta, prompt_idx = r.sampler.sample(it)  # each prompt twice, pairs adjacent, never split over ranks
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        pairs = slice(rank * n // 2, (rank + 1) * n // 2)  # this rank's pairs (its images are whole pairs)
        noise = utils.randn_for_rank(gen, n * world // 2, model.latent_shape, pairs, device, model.dtype)
        noise = noise.repeat_interleave(2, 0)
        seeds = torch.randint(2**62, (n * world,), generator=gen)[local].tolist()
        churn_gens = [torch.Generator().manual_seed(x) for x in seeds]  # one churn-noise stream per image
        outs = [churn_sample(policy.transformer, prompt_embeds[j:j + bs], pooled[j:j + bs], sigmas, noise[j:j + bs],
                             gammas, churn_gens[j:j + bs], args.guidance_scale, *negs(len(seeds[j:j + bs])))
                for j, bs in ((j, args.train_batch_size) for j in range(0, n, args.train_batch_size))]
        states, v_old, x0 = (torch.cat(t) for t in zip(*outs))  # (B, T, C, H, W) x2, (B, C, H, W) fp32
        del outs  # the micro-batch pieces: a second copy of every visited state and velocity otherwise
        t_sample = utils.now(device)
        # ---- reward (gathered over ranks for logging; pairs never cross ranks)
        reward, parts = r.reward_fn(model.decode(x0), captions, meta)
        r.reward_queries += n * world
        all_rewards = utils.all_gather_cat(reward.to(device)).cpu()
        t_reward = utils.now(device)
        # ---- finite difference: half reward differences and normalised endpoint directions
        adv, dbar = finite_difference(reward.to(device), x0)
        pair_adv = utils.all_gather_cat(adv)[0::2].cpu()  # (R_A - R_B) / 2 of every pair, for logging
        # ---- loss + update: --num-minibatches optimizer steps over the globally shuffled (image, step) items, uniform weights
        # (official code); each rank takes its own items of a chunk, scaled so the rank average is the chunk mean
        T = args.num_steps
        perm = torch.randperm(n * world * T, generator=gen)  # global item index = global image * T + step
        stats, losses, onpolicy_err = [], [], 0.0
        for k, chunk in enumerate(perm.chunk(args.num_minibatches)):
            optimizer.zero_grad(set_to_none=True)
            mine = chunk[(chunk >= rank * n * T) & (chunk < (rank + 1) * n * T)] - rank * n * T
            # items with a = 0 (equal rewards) contribute exactly zero to the SPO loss: skip their forward pass
            active = mine if args.kl_coef > 0 else mine[adv[mine // T].cpu() != 0]
            chunk_losses = []
            for mb in active.split(args.train_batch_size) if len(active) else []:
                b, i = mb // T, mb % T  # local image index, step index
                pe, pp = prompt_embeds[b], pooled[b]
                v = sampling.predict(policy.transformer, states[b, i], sigmas[i].to(device), pe, pp,
                                     args.guidance_scale, *negs(len(mb)))
                per, rho = spo_loss(v, v_old[b, i], dbar[b], adv[b], args.eps_clip)
                kl = torch.zeros((), device=device)
                if args.kl_coef > 0:  # velocity-space pull to the base model
                    with torch.no_grad(), policy.ref() as ref:
                        v_base = sampling.predict(ref, states[b, i], sigmas[i].to(device), pe, pp,
                                                  args.guidance_scale, *negs(len(mb)))
                    kl = ((v - v_base) ** 2).mean(dim=tuple(range(1, v.ndim)))
                loss = (per + args.kl_coef * kl).sum() * world / len(chunk)  # the mean over the chunk
                loss.backward()
                chunk_losses.append((per + args.kl_coef * kl).mean().detach())
                with torch.no_grad():  # SPO / ratio diagnostics
                    d = rho - 1
                    stats.append(torch.stack([per.mean(), kl.mean(), rho.mean(),
                                              (d.abs() > args.eps_clip).float().mean(), (-rho.log()).mean()]))
                    if k == 0:  # before the first update of an iteration the ratio must be exactly 1
                        onpolicy_err = max(onpolicy_err, d.abs().max().item())
            for p in policy.parameters():  # a rank without active items in this chunk still joins the all-reduce
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            utils.sync_gradients(policy.parameters())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            losses += chunk_losses
            if r.guard.ok(torch.stack(chunk_losses or [torch.zeros(())]), grad_norm, all_rewards, iteration=it,
                        empty=grad_norm.item() == 0):  # zero on every rank: no item of the chunk was active
                optimizer.step()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())

        t_train = utils.now(device)
        # ---- log
        s = torch.stack(stats).mean(0).tolist() if stats else [0.0, 0.0, 1.0, 0.0, 0.0]
        endpoint_rms = (2 * dbar.pow(2).mean(dim=(1, 2, 3)).rsqrt()).mean()  # ~= rms(z_A - z_B) when >> 1e-6
        metrics = {
            "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
            "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
            "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample, "perf/train_s": t_train - t_reward,
            "charts/lr": optimizer.param_groups[0]["lr"], "charts/reward_queries": r.reward_queries,
            "losses/loss": loss.item(), "losses/policy_loss": s[0], "losses/kl_loss": s[1],
            "losses/ratio_mean": s[2], "losses/clipfrac": s[3], "losses/ell_increase": s[4],
            "losses/onpolicy_ratio_err": onpolicy_err, "losses/grad_norm": grad_norm.item(),
            "losses/reward_diff_abs": (2 * pair_adv).abs().mean().item(),
            "losses/zero_diff_pair_frac": (pair_adv == 0).float().mean().item(),
            "losses/endpoint_diff_rms": endpoint_rms.item(),
            "losses/skipped_updates": r.guard.total,
            **{f"charts/reward_{k}": v.mean().item() for k, v in parts.items()},
        }
        r.end_iteration(it, metrics, (x0, captions, reward), reward=f"{metrics['charts/reward_mean']:.3f}",
                        clipfrac=f"{s[3]:.2f}")

    r.finish()
