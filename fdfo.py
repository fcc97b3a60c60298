"""FDFO: Finite Difference Flow Optimization (McAllister, Aittala, Karras, Hellsten, Kanazawa, Aila, Laine 2026,
arXiv 2603.12893; official code NVlabs/finite-difference-flow-optimization).

Per prompt, ONE initial noise and TWO sampling trajectories with a tiny, independent EDM-style churn, so the two
final images are near-identical counterfactuals. The reward difference times the normalised difference of the
final latents is a finite-difference estimate of the reward gradient in latent space; it is copied, without
backpropagating through the sampler, to every visited state of both trajectories as a velocity target
u = v_old - dbar, trained with an FPO-style likelihood-free ratio inside the SPO surrogate (a soft trust
region), over K shuffled optimizer steps per iteration. Spec: shared/methods/fdfo.md; docs: docs/fdfo.md.

    python fdfo.py                                       # embedded shapes world, 2 CPU cores, ~10 min
    python fdfo.py --churn 0.0025 --eps-clip 0.03        # the paper's churn and trust region
"""

import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import models, rewards, sampling, utils
from common.evaluate import evaluate_model


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 0
    """seed of the experiment"""
    torch_deterministic: bool = True
    """cudnn.deterministic"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda:N"""
    threads: int = 0
    """torch CPU threads per process (0 = torch default)"""
    track: bool = False
    """also log to Weights & Biases (TensorBoard is always on)"""
    wandb_project_name: str = "cleanflow"
    wandb_entity: str | None = None
    """the wandb entity (user or team) of the project (default: your wandb default)"""
    output_dir: str | None = None
    """run directory (default runs/{task}__{exp_name}__{seed}__{time})"""
    save_model: bool = True
    """save lora/ (or transformer/) in diffusers format at the end"""
    upload_model: bool = False
    """upload the saved model, summary.json and a model card to the Hugging Face Hub at the end"""
    hf_entity: str | None = None
    """user or organisation of the Hub model repo {hf_entity}/{task}-{exp_name}-seed{seed} (default: your account)"""
    resume: str | None = None
    """a run directory or checkpoint.pt to continue from"""
    checkpoint_every: int = 20
    """iterations between resumable checkpoints"""
    eval_every: int = 40
    """iterations between held-out evaluations"""
    log_images_every: int = 50

    # model, prompts, reward
    model: str = "embedded"
    """'embedded' or a diffusers SD3 id / local path (e.g. stabilityai/stable-diffusion-3.5-medium)"""
    resolution: int = 512
    """SD3 image size (the embedded model is 32x32)"""
    use_t5: bool = False
    """SD3: also load the T5 text encoder"""
    max_t5_length: int = 128
    """SD3 with --use-t5: T5 prompt tokens (NFT and Flow-GRPO code: 128; diffusers' default 256)"""
    mixed_precision: str | None = None
    """no | bf16: frozen weights in this dtype, forward under autocast, trained weights in fp32 (default: bf16 on
    CUDA GPUs with native bf16, compute capability >= 8.0, else no; fp16 is refused: training it needs loss scaling)"""
    gradient_checkpointing: bool = False
    """recompute the transformer's activations in the backward pass (less memory, ~30 % slower; SD3.5)"""
    decode_batch_size: int = 16
    """images the VAE decodes and a reward model scores at once"""
    reward_device: str | None = None
    """device of the reward models (default: the training device), e.g. cuda:1"""
    reward_dtype: str = "fp32"
    """fp32 | bf16 | fp16: dtype of the reward models (fp32 as the official Flow-GRPO code scores PickScore,
    ImageReward and the aesthetic predictor; bf16 / fp16 save memory, e.g. for the 7B VLM)"""
    eval_batch_size: int = 128
    """images generated at once in held-out evaluation"""
    lora_rank: int = 0
    """0 = full fine-tuning (embedded default); SD3.5-M: 32"""
    lora_alpha: int | None = None
    """LoRA alpha (default 2 * rank)"""
    reward: str = "shapes"
    """weighted rewards, e.g. shapes=1.0,jpeg_compressibility=0.1 (choices in common/rewards.py; paper: pickscore=1.0,vlm=0.1)"""
    reward_paths: str | None = None
    """local weights of real rewards: name=path[|processor],... e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth"""
    prompts_file: str | None = None
    """training prompts, one per line (default: the shapes grammar's train split)"""
    eval_prompts_file: str | None = None
    """held-out prompts (default: the shapes test split)"""
    eval_samples_per_prompt: int = 8
    num_steps: int = 10
    """churned sampler steps of the rollouts (SD3.5-M: 40, official num_solver_steps)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (default: --num-steps; SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of rollouts, training forward and evaluation (negative = empty prompt; paper default 1.0 = none)"""

    # algorithm
    num_iterations: int = 100
    """3,200 reward queries (= flow_grpo.py's default budget); on world v2 at lr 1e-5 every seed of 3 gains by 100 it.,
    not by 80 (docs/benchmark_defaults.md)"""
    prompts_per_iter: int = 16
    """pairs per iteration, one prompt per pair (SD3.5-M: 432); 16 pairs = flow_grpo.py's 32 reward queries"""
    group_size: int = 2
    """images per prompt: must be 2 (the two branches A, B of a pair)"""
    train_batch_size: int = 16
    """micro-batch of the rollouts (images) and of the update ((image, step) items)"""
    lr: float = 1e-5
    """AdamW learning rate (SD3.5-M LoRA: 3e-5; embedded world v2: 1e-5, docs/fdfo.md)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    churn: float = 0.0025
    """gamma: EDM churn of the prior and of every step but the last (spec §3.1)"""
    eps_clip: float = 0.03
    """SPO trust region epsilon (spec §3.3)"""
    num_minibatches: int = 4
    """K optimizer steps per iteration over the shuffled (image, step) items (official gradient_steps_per_epoch)"""
    kl_weight: float = 0.0
    """weight of mean((v - v_base)^2), velocity-space pull to the base model (spec §3.5; paper 0)"""


# ----------------------------------------------------------------------------------- churned paired sampler (spec §3.1)
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
    1 + g r and add r sqrt((1+g)^2 - 1) / (1 + g r) fresh noise; lands exactly at noise level s (spec §3.1)."""
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


# ----------------------------------------------------------------------------------- finite difference (spec §3.2)
def finite_difference(rewards_, final_latents):
    """Pairs are adjacent (A = even, B = odd index). a_A = (R_A - R_B)/2, a_B = -a_A; d_A = (z_A - z_B)/2, d_B = -d_A;
    dbar = d / (mean(d^2) + 1e-6), the mean over latent elements (divide by the mean square, not the RMS)."""
    r_a, r_b = rewards_[0::2].float(), rewards_[1::2].float()
    adv = torch.stack([(r_a - r_b) / 2, (r_b - r_a) / 2], 1).reshape(-1)  # (B,)
    z_a, z_b = final_latents[0::2].float(), final_latents[1::2].float()
    d = torch.stack([(z_a - z_b) / 2, (z_b - z_a) / 2], 1).flatten(0, 1)  # (B, C, H, W)
    ms = d.pow(2).mean(dim=tuple(range(1, d.ndim)), keepdim=True)
    return adv, d / (ms + 1e-6)


# ----------------------------------------------------------------------------------- loss (spec §3.3)
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
    if a.eps_clip <= 0 or a.kl_weight < 0:
        utils.fail("--eps-clip must be > 0 and --kl-weight >= 0")
    if a.num_minibatches < 1:
        utils.fail(f"--num-minibatches {a.num_minibatches} must be >= 1")
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")


if __name__ == "__main__":
    args = utils.parse_args(Args)
    check_method_args(args)
    # all checks before any loading; held-out: --eval-prompts-file, the shapes test split or 32 --prompts-file lines
    prompts, metadata, eval_prompts, eval_meta = utils.check_args(args, utils.world_size_from_env())
    rank, world, device = utils.setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed + rank, args.torch_deterministic)
    run_dir = utils.run_dir_for(args, __file__)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = utils.make_writer(run_dir, args, rank)

    # ---- setup: model, learner / reference views (v_old = the stored rollout velocities), optimizer, prompts, reward
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size,
                              gradient_checkpointing=args.gradient_checkpointing)
    policy = models.Policy(model.transformer, args.lora_rank, args.lora_alpha, with_old=False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = rewards.build_reward(args.reward, args.reward_device or device, batch_size=args.decode_batch_size,
                                     dtype=rewards.DTYPES[args.reward_dtype], paths=args.reward_paths)
    grid = utils.SampleGrid(args.eval_samples_per_prompt)  # base beside current on the same noise
    sampler = utils.PromptSampler(prompts, metadata, args.prompts_per_iter, args.group_size, args.seed, rank, world)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    gammas = churn_gammas(args.num_steps, args.churn)  # (T+1,) spec §3.1
    neg = model.encode_prompt([""]) if args.guidance_scale > 1 else None  # CFG negative = empty prompt (spec §3.6)

    def negs(b):
        return (neg[0].expand(b, -1, -1), neg[1].expand(b, -1)) if neg is not None else (None, None)

    def evaluate(step):  # every rank its slice of the held-out prompts (results gathered)
        res, images, caps, values = evaluate_model(
            model, model.transformer, eval_meta, args.eval_samples_per_prompt, args.seed, args.guidance_scale,
            args.eval_num_steps or args.num_steps, reward_fn, eval_prompts, grid.pick(len(eval_prompts)),
            args.eval_batch_size, rank, world)
        if rank == 0:
            grid.add(writer, step, images, caps, values, picked=True)  # TensorBoard eval/samples
        return res

    start_it, reward_queries, wall_before, summary = 0, 0, 0.0, {}
    if args.resume:
        ckpt = utils.load_checkpoint(args.resume)
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        utils.set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        start_it, reward_queries, wall_before, summary = ckpt["iteration"], ckpt["reward_queries"], ckpt["wall_time_s"], ckpt["summary"]
        grid.load_state_dict(ckpt.get("grid"))
    else:
        summary["base"] = evaluate(0)
        if rank == 0:
            utils.log_eval(writer, summary["base"], 0)
            print("base:", {k: round(v, 4) for k, v in summary["base"].items() if isinstance(v, float)})

    def save_checkpoint(iteration):
        if rank == 0:
            utils.save_checkpoint(run_dir / "checkpoint.pt", dict(
                policy=policy.trainable_state(), optimizer=optimizer.state_dict(), iteration=iteration,
                reward_queries=reward_queries, wall_time_s=wall_before + time.time() - t0, summary=summary,
                rng=utils.rng_state(), args=vars(args), grid=grid.state_dict()))

    guard, stop = utils.NonFiniteGuard(), utils.StopSignal(device)
    t0 = time.time()
    bar = tqdm(range(start_it, args.num_iterations), disable=rank != 0, desc="fdfo")
    for it in bar:
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
        # ---- sample: one shared noise per pair, two branches with independent churn (spec §3.1), in micro-batches
        captions, meta, prompt_idx = sampler.sample(it)  # each prompt twice, pairs adjacent, never split over ranks
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
        reward, parts = reward_fn(model.decode(x0), captions, meta)
        reward_queries += n * world
        all_rewards = utils.all_gather_cat(reward.to(device)).cpu()
        t_reward = utils.now(device)
        # ---- finite difference: half reward differences and normalised endpoint directions (spec §3.2)
        adv, dbar = finite_difference(reward.to(device), x0)
        pair_adv = utils.all_gather_cat(adv)[0::2].cpu()  # (R_A - R_B) / 2 of every pair, for logging
        # ---- loss + update: K optimizer steps over the globally shuffled (image, step) items, uniform weights
        # (spec §3.4); each rank takes its own items of a chunk, scaled so the rank average is the chunk mean
        T = args.num_steps
        perm = torch.randperm(n * world * T, generator=gen)  # global item index = global image * T + step
        stats, losses, onpolicy_err = [], [], 0.0
        for k, chunk in enumerate(perm.chunk(args.num_minibatches)):
            optimizer.zero_grad(set_to_none=True)
            mine = chunk[(chunk >= rank * n * T) & (chunk < (rank + 1) * n * T)] - rank * n * T
            # items with a = 0 (equal rewards) contribute exactly zero to the SPO loss: skip their forward pass
            active = mine if args.kl_weight > 0 else mine[adv[mine // T].cpu() != 0]
            chunk_losses = []
            for mb in active.split(args.train_batch_size) if len(active) else []:
                b, i = mb // T, mb % T  # local image index, step index
                pe, pp = prompt_embeds[b], pooled[b]
                v = sampling.predict(policy.transformer, states[b, i], sigmas[i].to(device), pe, pp,
                                     args.guidance_scale, *negs(len(mb)))
                per, rho = spo_loss(v, v_old[b, i], dbar[b], adv[b], args.eps_clip)
                kl = torch.zeros((), device=device)
                if args.kl_weight > 0:  # velocity-space pull to the base model (spec §3.5)
                    with torch.no_grad(), policy.ref() as ref:
                        v_base = sampling.predict(ref, states[b, i], sigmas[i].to(device), pe, pp,
                                                  args.guidance_scale, *negs(len(mb)))
                    kl = ((v - v_base) ** 2).mean(dim=tuple(range(1, v.ndim)))
                loss = (per + args.kl_weight * kl).sum() * world / len(chunk)  # spec §4: mean over the chunk
                loss.backward()
                chunk_losses.append((per + args.kl_weight * kl).mean().detach())
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
            if guard.ok(torch.stack(chunk_losses or [torch.zeros(())]), grad_norm, all_rewards, iteration=it,
                        empty=grad_norm.item() == 0):  # zero on every rank: no item of the chunk was active
                optimizer.step()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())

        t_train = utils.now(device)
        # ---- log
        if rank == 0:
            s = torch.stack(stats).mean(0).tolist() if stats else [0.0, 0.0, 1.0, 0.0, 0.0]
            endpoint_rms = (2 * dbar.pow(2).mean(dim=(1, 2, 3)).rsqrt()).mean()  # ~= rms(z_A - z_B) when >> 1e-6
            metrics = {
                "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
                "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
                "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample,
                "perf/train_s": t_train - t_reward,
                "charts/lr": optimizer.param_groups[0]["lr"], "charts/reward_queries": reward_queries,
                "losses/loss": loss.item(), "losses/policy_loss": s[0], "losses/kl_loss": s[1],
                "losses/ratio_mean": s[2], "losses/clipfrac": s[3], "losses/ell_increase": s[4],
                "losses/onpolicy_ratio_err": onpolicy_err, "losses/grad_norm": grad_norm.item(),
                "losses/reward_diff_abs": (2 * pair_adv).abs().mean().item(),
                "losses/zero_diff_pair_frac": (pair_adv == 0).float().mean().item(),
                "losses/endpoint_diff_rms": endpoint_rms.item(),
                "losses/skipped_updates": guard.total,
            }
            metrics.update({f"charts/reward_{k}": v.mean().item() for k, v in parts.items()})
            utils.log_metrics(writer, metrics, it + 1)
            bar.set_postfix(reward=f"{metrics['charts/reward_mean']:.3f}", clipfrac=f"{s[3]:.2f}")
            if (it + 1) % args.log_images_every == 0:
                writer.add_image("samples", utils.image_grid(model.decode(x0[:16]), captions[:16], reward[:16]),
                                 it + 1, dataformats="HWC")
        if (it + 1) % args.eval_every == 0 and it + 1 < args.num_iterations:
            res = evaluate(it + 1)
            if rank == 0:
                utils.log_eval(writer, res, it + 1)
                tqdm.write(f"iter {it + 1}: eval reward {res['reward_mean']:.4f} strict {res.get('strict_accuracy', 0):.3f}")
        # checkpoint every --checkpoint-every iterations; Ctrl-C / SIGTERM: save whole iterations, then exit 130
        utils.checkpoint_or_stop(it + 1, args.checkpoint_every, stop, guard, save_checkpoint, run_dir, rank)

    # ---- final evaluation, model, checkpoint, summary
    summary["final"] = evaluate(args.num_iterations)
    if rank == 0:
        utils.log_eval(writer, summary["final"], args.num_iterations)
        if args.save_model:
            policy.save_pretrained(run_dir)
        save_checkpoint(args.num_iterations)
        summary.update(wall_time_s=wall_before + time.time() - t0, reward_queries=reward_queries,
                       skipped_updates=guard.total, args=vars(args))
        utils.write_summary(run_dir, summary)
        grid.save(run_dir / "samples.png")  # final evaluation: base beside fine-tuned, same noise
        b, f = summary["base"], summary["final"]
        print(f"held-out reward {b['reward_mean']:.4f} -> {f['reward_mean']:.4f}; strict accuracy "
              f"{b.get('strict_accuracy', float('nan')):.3f} -> {f.get('strict_accuracy', float('nan')):.3f}; "
              f"{summary['wall_time_s'] / 60:.1f} min; run dir {run_dir}")
        writer.close()
        utils.upload_to_hub(run_dir, args)  # --upload-model: lora/ (or transformer/) + model card to the Hub
    utils.cleanup_distributed()
