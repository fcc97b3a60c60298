"""AC-Flow: actor-critic fine-tuning of flow-matching models with intermediate feedback (Fan, Cheng, Shen, Zhou,
Liu 2025, arXiv 2510.18072), with ORW-CFM-W2 (Fan et al., ICLR 2025, arXiv 2502.06061) as `--no-critic`.

A lagged copy of the actor samples images with a CFG-free ODE; rewards are shaped (batch z-score); a small
critic V_phi(x_t, sigma, c) regresses the shaped reward at the noised points where the actor loss is evaluated,
so each (image, sigma) pair gets its own advantage A = r~ - V (step-level credit). The actor minimises the
critic-weighted flow-matching loss  w ||v - (eps - x0)||^2 + alpha ||v - v_ref||^2,  w = exp(beta clip(A, +-c_A)),
after a critic warm-up during which V is treated as 0 (the ORW-CFM-W2 special case).
Spec: shared/methods/acflow.md; docs: docs/acflow.md.

    python acflow.py                             # embedded shapes world, 2 CPU cores, ~10 min
    python acflow.py --no-critic --adv-clip 0    # ORW-CFM-W2 (w = exp(beta * shaped reward))
    python acflow.py --critic-warmup 0           # ablation: critic drives the actor from the first iteration
"""

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import tyro
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
    output_dir: str | None = None
    """run directory (default runs/{task}__{exp_name}__{seed}__{time})"""
    save_model: bool = True
    """save lora/ (or transformer/) in diffusers format at the end"""
    resume: str | None = None
    """a run directory or checkpoint.pt to continue from"""
    checkpoint_every: int = 20
    """iterations between resumable checkpoints"""
    eval_every: int = 20
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
    """no | bf16 | fp16: frozen weights in this dtype, forward under autocast, trained weights in fp32
    (default: bf16 on CUDA, no on CPU)"""
    gradient_checkpointing: bool = False
    """recompute the transformer's activations in the backward pass (less memory, ~30 % slower; SD3.5)"""
    decode_batch_size: int = 16
    """images the VAE decodes and a reward model scores at once"""
    reward_device: str | None = None
    """device of the reward models (default: the training device), e.g. cuda:1"""
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
    """ODE steps of the rollout sampler"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (default: --num-steps; SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of evaluation; AC-Flow rolls out CFG-free (issue; spec §7.11 would sample with CFG)"""

    # algorithm
    num_iterations: int = 100
    prompts_per_iter: int = 16
    """prompts per iteration (SD3.5-M: 8)"""
    group_size: int = 4
    """images per prompt (SD3.5-M: 4)"""
    train_batch_size: int = 64
    """micro-batch of the update; gradients are accumulated into one optimizer step per iteration"""
    lr: float = 1e-5
    """actor AdamW learning rate (embedded full fine-tuning: 1e-4 degraded the base; SD3.5-M LoRA: 1e-4, spec §5)"""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    alpha: float = 1.0
    """W2 coefficient: alpha ||v - v_ref||^2 (spec §3.2; ORW README alpha = 1)"""
    beta: float = 1.0
    """weight temperature: w = exp(beta * A^) (spec §3.1; ORW-CFM-W2's tau)"""
    adv_clip: float = 1.0
    """c_A: A^ = clip(A, -c_A, c_A) in shaped-reward units (spec §3.7); 0 = no clipping"""
    weight_fn: str = "exp"
    """exp: w = exp(beta A^) (spec §3.1 [R]) | adrpo: A^ ||v-u||^2 + (alpha - A^) ||v-v_ref||^2 (spec §3.1 alt.)"""
    weight_norm: bool = False
    """divide the exp weights by their batch mean (spec §3.1 option)"""
    shaping: str = "batch"
    """reward shaping (spec §3.5): batch z-score | group (per-prompt z-score) | running (EMA statistics) | none"""
    shaping_momentum: float = 0.99
    """EMA momentum of --shaping running"""
    shaping_clamp: float = 0.0
    """clamp shaped rewards to [-c, c] (0 = off; spec §3.5 suggests 3)"""
    critic: bool = True
    """use the critic; --no-critic gives V = 0, i.e. ORW-CFM-W2 on shaped rewards (spec §6)"""
    critic_lr: float = 1e-3
    """critic AdamW learning rate (spec §5 [R] 1e-4 for SD3)"""
    critic_weight_decay: float = 1e-4
    critic_width: int = 32
    """base channels c of the critic (conv c,2c,4c,4c; MLP 8c); spec §5 design is c = 64"""
    critic_steps: int = 1
    """critic updates per iteration on the same batch (spec §3 n_V)"""
    critic_loss: str = "mse"
    """mse | huber (delta = 1), spec §3.4"""
    critic_on_trajectory: bool = False
    """also regress V on one real ODE state per rollout (spec §3.4 optional extra)"""
    critic_warmup: int = -1
    """K: iterations in which the critic trains but V is not used by the actor (spec §3.8); -1 = 10% of the run"""
    warmup_mode: str = "orw"
    """during the warm-up the actor trains with V = 0 (orw) | is frozen (freeze), spec §3.8"""
    warmup_ev: float = 0.0
    """also end the warm-up once the critic's explained variance exceeds this (0 = off; spec §3.8 suggests 0.3)"""
    timestep_sampling: str = "uniform"
    """sigma of the noised points: uniform U(0,1) (ORW) | logit-normal (SD3 pretraining) | grid (rollout sigmas)"""
    timesteps_per_image: int = 1
    """M noised points per image per iteration (spec §4 step 5)"""
    sync_every: int = 1
    """iterations between copies actor -> sampling copy (ORW's lagged 'last_policy', spec §3.9; 1 = on-policy)"""


# ----------------------------------------------------------------------------------- critic (spec §3.3, §5)
class Critic(nn.Module):
    """V_phi(x_t, sigma, c): conv tower on the latent + sinusoidal sigma embedding + projected pooled prompt
    embedding, concatenated into an MLP with LayerNorm (spec §5 [R]). The head is zero-initialised, so V = 0
    at the start and AC-Flow starts as ORW-CFM-W2."""

    def __init__(self, in_channels, pooled_dim, width=32):
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
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

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
    """Spec §3.5 [R]: r~ = (r - mean) / (std + 1e-6) with population statistics of the batch (batch), of each
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


def actor_weights(iteration, shaped, values, beta, adv_clip, warmup_iterations, weight_fn="exp", normalize=False):
    """Spec §3.6-3.8 / §4 steps 7-8: A = r~ - V, with V treated as 0 while iteration < warmup_iterations (the
    ORW-CFM-W2 special case); A^ = clip(A, -c_A, c_A) (c_A = 0: no clipping). Returns (w, A^), w detached:
    exp: w = exp(beta A^) (exponent capped at 30 against overflow; optionally / mean) | adrpo: w = A^."""
    adv = shaped - values.detach() if iteration >= warmup_iterations else shaped.clone()
    if adv_clip > 0:
        adv = adv.clamp(-adv_clip, adv_clip)
    if weight_fn == "adrpo":
        return adv, adv
    w = torch.exp((beta * adv).clamp(max=30.0))
    return (w / utils.all_gather_cat(w).mean() if normalize else w), adv  # mean over every rank's batch


def acflow_loss(v, v_ref, target, w, alpha, weight_fn="exp"):
    """Per sample (B,): w * mean(v - (eps - x0))^2 + alpha * mean(v - v_ref)^2 (ORW-CFM-W2 loss with the critic
    weight, spec §3.1-3.2; diffusers v = eps - x0 equals the paper's u = x1 - x0 up to a sign that cancels);
    adrpo: A^ * fm + (alpha - A^) * w2. Returns (per-sample loss, fm, w2)."""
    fm = ((v.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    w2 = ((v.float() - v_ref.float()) ** 2).mean(dim=(1, 2, 3))
    coef = alpha - w if weight_fn == "adrpo" else alpha
    return w * fm + coef * w2, fm, w2


def critic_loss_fn(values, shaped, kind="mse"):
    """Spec §3.4 [R]: regress V on the shaped terminal reward (Monte-Carlo target, gamma = 1)."""
    if kind == "huber":
        return nn.functional.huber_loss(values, shaped, delta=1.0)
    return ((values - shaped) ** 2).mean()


def explained_variance(pred, target):
    """1 - Var(target - pred) / Var(target) (CleanRL's diagnostic); nan if the targets are constant."""
    var = target.var(unbiased=False)
    return float("nan") if var == 0 else float(1 - (target - pred).var(unbiased=False) / var)


def draw_sigmas(n, mode, sigmas, gen):
    if mode == "grid":  # one sigma of the rollout grid (excluding 0)
        return sigmas[torch.randint(0, len(sigmas) - 1, (n,), generator=gen)]
    if mode == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    return torch.rand(n, generator=gen)


def check_method_args(a):
    if a.eval_num_steps is not None and a.eval_num_steps < 1:
        utils.fail(f"--eval-num-steps {a.eval_num_steps} must be >= 1")
    choices = dict(weight_fn=("exp", "adrpo"), shaping=("batch", "group", "running", "none"),
                   critic_loss=("mse", "huber"), warmup_mode=("orw", "freeze"),
                   timestep_sampling=("uniform", "logit-normal", "grid"))
    for name, allowed in choices.items():
        if getattr(a, name) not in allowed:
            utils.fail(f"unknown --{name.replace('_', '-')} {getattr(a, name)!r}; choose from: {', '.join(allowed)}")
    if a.adv_clip < 0 or a.alpha < 0 or a.critic_lr < 0 or a.shaping_clamp < 0:
        utils.fail("--adv-clip, --alpha, --critic-lr and --shaping-clamp must be >= 0")
    if a.critic_width < 4 or a.critic_steps < 1 or a.timesteps_per_image < 1 or a.sync_every < 1:
        utils.fail("--critic-width must be >= 4; --critic-steps, --timesteps-per-image, --sync-every >= 1")
    if a.critic_warmup < -1:
        utils.fail(f"--critic-warmup {a.critic_warmup} must be >= 0, or -1 (10% of --num-iterations)")
    if not 0 <= a.shaping_momentum < 1:
        utils.fail(f"--shaping-momentum {a.shaping_momentum} must be in [0, 1)")
    if a.shaping == "group" and a.group_size < 2:
        utils.fail("--shaping group needs --group-size >= 2 (a z-score within each prompt's images)")
    if a.weight_fn == "adrpo" and (a.adv_clip == 0 or a.alpha <= a.adv_clip):
        utils.fail(f"--weight-fn adrpo needs 0 < --adv-clip < --alpha (W2 coefficient alpha - A^ must stay > 0); "
                   f"got adv_clip {a.adv_clip}, alpha {a.alpha}")


if __name__ == "__main__":
    args = tyro.cli(Args)
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

    # ---- setup: model, actor / sampling ("old") / reference views, critic, optimizers, prompts, reward
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size,
                              gradient_checkpointing=args.gradient_checkpointing)
    policy = models.Policy(model.transformer, args.lora_rank, args.lora_alpha, with_old=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    with torch.random.fork_rng():  # same critic init on every rank
        torch.manual_seed(args.seed)
        critic = Critic(model.latent_shape[0], model.transformer.config.pooled_projection_dim, args.critic_width).to(device)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.critic_weight_decay)
    reward_fn = rewards.build_reward(args.reward, args.reward_device or device, dtype=model.dtype,
                                     batch_size=args.decode_batch_size, paths=args.reward_paths)
    grid = utils.SampleGrid(args.eval_samples_per_prompt)  # base beside current on the same noise
    sampler = utils.PromptSampler(prompts, metadata, args.prompts_per_iter, args.group_size, args.seed, rank, world)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    warmup_end = args.critic_warmup if args.critic_warmup >= 0 else args.num_iterations // 10

    def evaluate(step):  # every rank its slice of the held-out prompts (results gathered)
        res, images, caps, values = evaluate_model(
            model, model.transformer, eval_meta, args.eval_samples_per_prompt, args.seed, args.guidance_scale,
            args.eval_num_steps or args.num_steps, reward_fn, eval_prompts, grid.pick(len(eval_prompts)),
            args.eval_batch_size, rank, world)
        if rank == 0:
            grid.add(writer, step, images, caps, values, picked=True)  # TensorBoard eval/samples
        return res

    start_it, reward_queries, wall_before, summary, shaping_stats = 0, 0, 0.0, {}, None
    if args.resume:
        ckpt = utils.load_checkpoint(args.resume)
        policy.load_trainable_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        critic.load_state_dict(ckpt["critic"])
        critic_opt.load_state_dict(ckpt["critic_optimizer"])
        shaping_stats, warmup_end = ckpt["shaping_stats"], ckpt["warmup_end"]
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
                critic=critic.state_dict(), critic_optimizer=critic_opt.state_dict(), shaping_stats=shaping_stats,
                warmup_end=warmup_end, reward_queries=reward_queries, wall_time_s=wall_before + time.time() - t0,
                summary=summary, rng=utils.rng_state(), args=vars(args), grid=grid.state_dict()))

    guard, stop = utils.NonFiniteGuard(), utils.StopSignal(device)
    t0 = time.time()
    bar = tqdm(range(start_it, args.num_iterations), disable=rank != 0, desc="acflow")
    for it in bar:
        t_iter = time.time()
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
        # ---- sample: CFG-free Euler ODE rollouts of the lagged sampling copy (spec §3.9, §4 step 2)
        captions, meta, prompt_idx = sampler.sample(it)
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        noise = torch.randn(n * world, *model.latent_shape, generator=gen)[local].to(device, model.dtype)
        with policy.old() as old:
            out = sampling.sample(old, prompt_embeds, pooled, sigmas, noise, return_trajectory=args.critic_on_trajectory)
        x0 = out["latents"]  # (B, C, H, W), the paper's x_1
        t_sample = time.time()
        # ---- reward (gathered over ranks so batch statistics are global), shaping (spec §3.5)
        reward, parts = reward_fn(model.decode(x0), captions, meta)
        reward_queries += n * world
        all_rewards = utils.all_gather_cat(reward.to(device)).cpu()
        groups = utils.all_gather_cat(prompt_idx.to(device)).cpu()
        shaped_all, shaping_stats = shape_rewards(all_rewards.float(), args.shaping, groups, shaping_stats,
                                                  args.shaping_momentum, args.shaping_clamp)
        shaped = shaped_all[local].to(device)
        t_reward = time.time()
        # ---- noised points (spec §4 step 5): x_t = (1 - sigma) x0 + sigma eps (paper t = 1 - sigma); the
        # critic baseline V(x_t, sigma, c) is read before this iteration's critic step (out-of-sample)
        points = []
        for _ in range(args.timesteps_per_image):
            sigma_all = draw_sigmas(n * world, args.timestep_sampling, sigmas, gen)[local].to(device)
            eps_all = torch.randn(n * world, *model.latent_shape, generator=gen)[local].to(device, model.dtype)
            points += [(mb, sigma_all[mb], eps_all[mb]) for mb in torch.arange(n).split(args.train_batch_size)]
        with torch.no_grad():
            values = torch.cat([critic((1 - s.view(-1, 1, 1, 1)) * x0[mb] + s.view(-1, 1, 1, 1) * e, s, pooled[mb])
                                if args.critic else torch.zeros(len(mb), device=device) for mb, s, e in points])
        targets = torch.cat([shaped[mb] for mb, _, _ in points])  # r~ of each noised point's image
        warm = it < warmup_end
        w_all, adv = actor_weights(it, targets, values, args.beta, args.adv_clip, warmup_end, args.weight_fn,
                                   args.weight_norm)
        # ---- actor update: critic-weighted CFM + W2 (spec §3.1-3.2, §4 step 9), one optimizer step
        optimizer.zero_grad(set_to_none=True)
        train_actor = not (warm and args.warmup_mode == "freeze")
        losses, fms, w2s, start = [], [], [], 0
        for mb, sigma, eps in points if train_actor else []:
            s = sigma.view(-1, 1, 1, 1)
            x_t = (1 - s) * x0[mb] + s * eps
            pe, pp = prompt_embeds[mb], pooled[mb]
            with torch.no_grad(), policy.ref() as ref:
                v_ref = sampling.predict(ref, x_t, sigma, pe, pp)
            v = sampling.predict(policy.transformer, x_t, sigma, pe, pp)
            per, fm, w2 = acflow_loss(v, v_ref, eps - x0[mb], w_all[start:start + len(mb)], args.alpha, args.weight_fn)
            start += len(mb)
            (per.mean() / len(points)).backward()
            losses.append(per.mean().detach()), fms.append(fm.mean().detach()), w2s.append(w2.mean().detach())
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        utils.sync_gradients(policy.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm) if losses else torch.zeros(())
        if guard.ok(loss, grad_norm, all_rewards, iteration=it) and train_actor:
            optimizer.step()
        # ---- critic update(s) on the shaped rewards at the same noised points (spec §3.4, §4 step 6)
        critic_losses = []
        for _ in range(args.critic_steps if args.critic else 0):
            critic_opt.zero_grad(set_to_none=True)
            for mb, sigma, eps in points:
                s = sigma.view(-1, 1, 1, 1)
                c_loss = critic_loss_fn(critic((1 - s) * x0[mb] + s * eps, sigma, pooled[mb]), shaped[mb], args.critic_loss)
                (c_loss / len(points)).backward()
                critic_losses.append(c_loss.detach())
            if args.critic_on_trajectory:  # one real ODE state x_{sigma_k} per rollout (spec §3.4 optional)
                k = torch.randint(0, args.num_steps, (n * world,), generator=gen)[local]
                states = out["trajectory"][torch.arange(n), k]
                critic_loss_fn(critic(states, sigmas[k].to(device), pooled), shaped, args.critic_loss).backward()
            utils.sync_gradients(critic.parameters())
            critic_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            if torch.isfinite(critic_grad_norm):
                critic_opt.step()
        # ---- sampling copy: old <- actor every sync_every iterations (ORW's lagged last_policy, spec §3.9)
        if (it + 1) % args.sync_every == 0:
            policy.update_old(0.0)
        all_values, all_targets = utils.all_gather_cat(values), utils.all_gather_cat(targets)  # global diagnostics
        ev = explained_variance(all_values.cpu(), all_targets.cpu())
        if warm and args.warmup_ev > 0 and args.critic and ev > args.warmup_ev:
            warmup_end = it + 1  # spec §3.8: end the warm-up early once the critic explains the rewards

        t_train = time.time()
        # ---- log
        if rank == 0:
            metrics = {
                "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
                "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
                "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample,
                "perf/train_s": t_train - t_reward,
                "charts/lr": optimizer.param_groups[0]["lr"], "charts/reward_queries": reward_queries,
                "charts/critic_warmup": float(warm), "losses/loss": loss.item(), "losses/grad_norm": grad_norm.item(),
                "losses/fm_loss": torch.stack(fms).mean().item() if fms else 0.0,
                "losses/w2_loss": torch.stack(w2s).mean().item() if w2s else 0.0,
                "losses/value_mean": all_values.mean().item(), "losses/critic_explained_variance": ev,
                "losses/adv_mean": adv.mean().item(), "losses/adv_std": adv.std().item(),
                "losses/adv_abs_mean": adv.abs().mean().item(),
                "losses/adv_clip_frac": (adv.abs() >= args.adv_clip - 1e-6).float().mean().item() if args.adv_clip > 0 else 0.0,
                **{f"losses/weight_{k}": getattr(w_all, k)().item() for k in ("mean", "min", "max", "std")},
                "losses/skipped_updates": guard.total,
            }
            if critic_losses:
                metrics.update({"losses/critic_loss": torch.stack(critic_losses).mean().item(),
                                "losses/critic_grad_norm": critic_grad_norm.item()})
            metrics.update({f"charts/reward_{k}": v.mean().item() for k, v in parts.items()})
            utils.log_metrics(writer, metrics, it + 1)
            bar.set_postfix(reward=f"{metrics['charts/reward_mean']:.3f}", loss=f"{loss.item():.4f}", ev=f"{ev:.2f}")
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
    utils.cleanup_distributed()
