"""Flow-GRPO: online policy-gradient RL for flow-matching models through an ODE-to-SDE conversion
(Liu et al. 2025, arXiv 2505.05470; official code yifan123/flow_grpo).

The learner samples `group_size` images per prompt with Flow-GRPO's SDE sampler, which turns every denoising
step into a Gaussian policy with a closed-form log-probability; rewards become group-relative advantages
A = (r - group mean) / (std + 1e-4); the learner then maximises the PPO-clipped ratio objective over the
trained steps, optionally minus beta * KL to the frozen base. An EMA of the trained weights is evaluated and
saved. Docs: docs/flow_grpo.md.

    python flow_grpo.py                                  # embedded shapes world, 2 CPU cores, ~10 min
    python flow_grpo.py --global-std --beta 0.04         # std over the whole batch, KL to the base model
"""

import contextlib
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
    eval_every: int = 25
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
    """weighted rewards, e.g. shapes=1.0,jpeg_compressibility=0.1 (choices in common/rewards.py)"""
    reward_paths: str | None = None
    """local weights of real rewards: name=path[|processor],... e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth"""
    prompts_file: str | None = None
    """training prompts, one per line (default: the shapes grammar's train split)"""
    eval_prompts_file: str | None = None
    """held-out prompts (default: the shapes test split)"""
    eval_samples_per_prompt: int = 8
    num_steps: int = 10
    """SDE steps of the rollouts (paper's Denoising Reduction: 10)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (default: --num-steps; paper / official SD3.5-M configs: 40)"""
    guidance_scale: float = 1.0
    """CFG of rollouts, training log-probs and evaluation (negative = empty prompt; SD3.5-M: 4.5)"""

    # algorithm
    num_iterations: int = 100
    prompts_per_iter: int = 4
    """prompts per iteration (SD3.5-M: 48)"""
    group_size: int = 8
    """G images per prompt (SD3.5-M: 24)"""
    train_batch_size: int = 8
    """micro-batch of rollouts and of the update (the same, so recomputed log-probs match, STYLE §4)"""
    lr: float = 1e-4
    """AdamW learning rate (SD3.5-M LoRA: 3e-4)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    noise_level: float = 0.7
    """a in the SDE's std sigma_t = a * sqrt(t / (1 - t)) (paper, ODE-to-SDE conversion); with --sde-type cps the
    step std is sigma_next * sin(a pi / 2)"""
    sde_type: str = "sde"
    """sde: the paper's ODE-to-SDE step | cps: Coefficients-Preserving Sampling (official `sample.sde_type`, used by
    its Flow-GRPO-Fast configs): no excess noise at small sigma; the last step (to sigma 0) is then deterministic
    and never trained"""
    timestep_fraction: float = 0.3
    """trains int(num_steps * fraction) steps of each trajectory (SD3.5-M: 0.99, i.e. 9 of 10)"""
    timestep_sampling: str = "random"
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
    beta: float = 0.5
    """weight of the KL to the reference (base) model (SD3.5-M GenEval / OCR: 0.04, PickScore: 0.01; embedded world
    v2: 0.5 keeps the images from growing a speckle texture, docs/flow_grpo.md)"""
    ema: bool = True
    """keep an EMA of the trained weights; evaluate and save it (official code)"""
    ema_decay: float = 0.9
    """EMA decay, warmed up as min((1 + step) / (10 + step), ema_decay) over optimizer steps (official code)"""
    ema_every: int = 1
    """optimizer steps between EMA updates (official code: 8)"""
    ema_repeat: int = 1
    """EMA updates applied at each update event (official code: one per micro-batch per GPU, e.g. 8 with the
    GenEval config on 8 GPUs, i.e. 0.9^8 = 0.43 of the EMA kept per event)"""


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
    detached (official `compute_log_prob` since 2025-07; docs/flow_grpo.md)."""
    s = sigma.expand(latents.shape[0])
    x_in = latents.to(prompt_embeds.dtype)
    if guidance_scale > 1:
        v_u, v_c = sampling.predict(transformer, torch.cat([x_in, x_in]), torch.cat([s, s]),
                                    torch.cat([neg_embeds, prompt_embeds]), torch.cat([neg_pooled, pooled])).chunk(2)
        v = v_u.detach() + guidance_scale * (v_c - v_u.detach())
    else:
        v = sampling.predict(transformer, x_in, s, prompt_embeds, pooled)
    _, log_prob, mean, std = sampling.sde_step_with_logprob(v, sigma, sigma_next, latents, noise_level,
                                                            prev_sample=next_latents, sigma_max=sigma_max,
                                                            sde_type=sde_type)
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


def ema_as_learner(state, lora_rank):
    """A trainable_state() whose learner weights are replaced by the EMA ("old") weights, for saving."""
    if lora_rank > 0:
        return {k: state[k.replace(".default.", ".old.")] if ".default." in k else v for k, v in state.items()}
    return {**state, **{"learner." + k[4:]: v for k, v in state.items() if k.startswith("old.")}}


def check_method_args(a):
    if a.group_size < 2:  # A = (r - group mean) / std (paper): 0 for a prompt's only image, also with --global-std
        utils.fail(f"--group-size {a.group_size} must be >= 2: advantages are relative to each prompt's group, so "
                   "one image per prompt makes every advantage 0")
    if not 0 < a.timestep_fraction <= 1 or int(a.num_steps * a.timestep_fraction) < 1:
        utils.fail(f"--timestep-fraction {a.timestep_fraction} must be in (0, 1] and train at least one of the "
                   f"{a.num_steps} steps")
    if a.timestep_sampling not in ("random", "first"):
        utils.fail(f"unknown --timestep-sampling {a.timestep_sampling!r}; choose from: random, first")
    if a.sde_type not in ("sde", "cps"):
        utils.fail(f"unknown --sde-type {a.sde_type!r}; choose from: sde, cps")
    if a.sde_type == "cps" and a.noise_level > 1:
        utils.fail(f"--noise-level {a.noise_level} must be <= 1 with --sde-type cps (std = sigma_next sin(a pi / 2))")
    if a.sde_type == "cps" and int(a.num_steps * a.timestep_fraction) > a.num_steps - 1:
        utils.fail(f"--timestep-fraction {a.timestep_fraction} trains all {a.num_steps} steps, but with --sde-type "
                   "cps the last one is deterministic: use a fraction that leaves it out")
    if a.noise_level <= 0:
        utils.fail(f"--noise-level {a.noise_level} must be > 0 (0 is the deterministic ODE: no log-probabilities)")
    if a.clip_range <= 0 or a.adv_clip_max <= 0 or a.beta < 0:
        utils.fail("--clip-range and --adv-clip-max must be > 0 and --beta >= 0")
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
    # all checks before any loading; held-out: --eval-prompts-file, the shapes test split or 32 --prompts-file lines
    prompts, metadata, eval_prompts, eval_meta = utils.check_args(args, utils.world_size_from_env())
    rank, world, device = utils.setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed + rank, args.torch_deterministic)
    run_dir = utils.run_dir_for(args, __file__)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = utils.make_writer(run_dir, args, rank)

    # ---- setup: model, learner / EMA ("old") / reference views, optimizer, prompts, reward
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size,
                              gradient_checkpointing=args.gradient_checkpointing)
    policy = models.Policy(model.transformer, args.lora_rank, args.lora_alpha, with_old=args.ema)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = rewards.build_reward(args.reward, args.reward_device or device, batch_size=args.decode_batch_size,
                                     dtype=rewards.DTYPES[args.reward_dtype], paths=args.reward_paths)
    grid = utils.SampleGrid(args.eval_samples_per_prompt)  # base beside current on the same noise
    sampler = utils.PromptSampler(prompts, metadata, args.prompts_per_iter, args.group_size, args.seed, rank, world)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    sigma_max = sigmas[1].item()  # replaces sigma = 1 in sigma_t, as in the sampler
    neg = model.encode_prompt([""]) if args.guidance_scale > 1 else None  # CFG negative = empty prompt

    def negs(b):
        return (neg[0].expand(b, -1, -1), neg[1].expand(b, -1)) if neg is not None else (None, None)

    def evaluate(step):  # every rank its slice of the held-out prompts; the EMA weights under --ema (official)
        with policy.old() if args.ema else contextlib.nullcontext(model.transformer) as eval_model:
            res, images, caps, values = evaluate_model(
                model, eval_model, eval_meta, args.eval_samples_per_prompt, args.seed, args.guidance_scale,
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
    n_train = int(args.num_steps * args.timestep_fraction)  # official: int(num_steps * timestep_fraction)
    t0 = time.time()
    bar = tqdm(range(start_it, args.num_iterations), disable=rank != 0, desc="flow_grpo")
    for it in bar:
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
        # ---- sample: SDE rollouts of the learner with per-step log-probs (paper's ODE-to-SDE), in micro-batches
        captions, meta, prompt_idx = sampler.sample(it)
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        noise = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
        seeds = torch.randint(2**62, (n * world,), generator=gen)[local].tolist()
        sde_gens = [torch.Generator().manual_seed(x) for x in seeds]  # one SDE-noise stream per image
        trajs, old_lps = [], []
        for mb in torch.arange(n).split(args.train_batch_size):
            out = sampling.sample(policy.transformer, prompt_embeds[mb], pooled[mb], sigmas, noise[mb],
                                  args.guidance_scale, *negs(len(mb)), noise_level=args.noise_level,
                                  generator=[sde_gens[j] for j in mb.tolist()], return_trajectory=True,
                                  sde_type=args.sde_type)
            trajs.append(out["trajectory"])
            old_lps.append(out["log_probs"])
        traj, old_log_probs = torch.cat(trajs), torch.cat(old_lps)  # (B, T+1, C, H, W) fp32, (B, T) fp32
        del trajs, old_lps, out  # the micro-batch pieces: a second copy of every trajectory otherwise
        x0 = traj[:, -1]
        t_sample = utils.now(device)
        # ---- reward (gathered over ranks so groups and batch statistics are global)
        reward, parts = reward_fn(model.decode(x0), captions, meta)
        reward_queries += n * world
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
                        if args.beta > 0:  # KL to the frozen base (paper's KL term in the official code's form)
                            with torch.no_grad(), policy.ref() as ref:
                                _, mean_ref, _ = step_log_prob(ref, x, x_next, sigmas[j], sigmas[j + 1], pe, pp,
                                                               args.noise_level, sigma_max, args.guidance_scale,
                                                               *negs(len(mb)), sde_type=args.sde_type)
                            kl = kl_loss(mean, mean_ref, sigma_t)
                        loss = policy_loss + args.beta * kl
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
                if guard.ok(torch.stack(losses[-n_micro * n_train:]), grad_norm, all_rewards, iteration=it):
                    optimizer.step()
                # ---- EMA of the trained weights, decay warmed up over optimizer steps (official `ema.py`); the
                # official loop applies it once per micro-batch, i.e. --ema-repeat times at unchanged weights
                n_opt += 1
                ema_decay = min((1 + n_opt) / (10 + n_opt), args.ema_decay)
                if args.ema and n_opt % args.ema_every == 0:
                    policy.update_old(ema_decay**args.ema_repeat)
        loss = torch.stack(losses).mean()

        t_train = utils.now(device)
        # ---- log
        if rank == 0:
            s = torch.stack(stats).mean(0).tolist()
            metrics = {
                "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
                "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
                "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample,
                "perf/train_s": t_train - t_reward,
                "charts/lr": optimizer.param_groups[0]["lr"], "charts/ema_decay": ema_decay,
                "charts/reward_queries": reward_queries,
                "losses/loss": loss.item(), "losses/policy_loss": s[0], "losses/kl_loss": s[1],
                "losses/ratio_mean": s[2], "losses/clipfrac": s[3], "losses/clipfrac_gt_one": s[4],
                "losses/clipfrac_lt_one": s[5], "losses/approx_kl": s[6],
                "losses/onpolicy_ratio_err": onpolicy_err, "losses/grad_norm": grad_norm.item(),
                "losses/adv_abs_mean": adv.abs().mean().item(),
                "losses/adv_clip_frac": (adv.abs() >= args.adv_clip_max).float().mean().item(),
                "losses/zero_std_group_frac": zero_std_fraction(all_rewards, groups).item(),
                "losses/group_reward_std":
                    utils.group_mean((all_rewards - utils.group_mean(all_rewards, groups)) ** 2, groups).sqrt().mean().item(),
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

    # ---- final evaluation, checkpoint, model (the EMA weights when --ema, as the official code saves), summary
    summary["final"] = evaluate(args.num_iterations)
    if rank == 0:
        utils.log_eval(writer, summary["final"], args.num_iterations)
        save_checkpoint(args.num_iterations)
        if args.save_model:
            if args.ema:
                policy.load_trainable_state(ema_as_learner(policy.trainable_state(), args.lora_rank))
            policy.save_pretrained(run_dir)
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
