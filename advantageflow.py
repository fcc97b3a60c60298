"""AdvantageFlow: advantage-weighted least squares with rollout-policy regularisation (Kveton et al. 2026,
arXiv 2605.26013), with DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) as `--nft`.

A lagging EMA copy of the learner (the rollout policy) samples K images per prompt with a CFG-free ODE; the
rewards become clipped group-centred advantages A in [-1, 1]; the learner regresses, at a fresh noised point
x_t of each image, onto  A*x0 + gamma*f_old + lambda*f_ref  (x0-prediction space), which is convex in the
prediction whenever A + gamma + lambda > 0. Spec: shared/methods/advantageflow.md; docs: docs/advantageflow.md.

    python advantageflow.py                      # embedded shapes world, 2 CPU cores, ~5 min
    python advantageflow.py --lr 1e-4 --gamma-mode one-minus-a
    python advantageflow.py --nft                # DiffusionNFT's loss, timesteps, reward std and eval EMA
"""

import contextlib
import os
import sys
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
    """ODE steps of the rollout sampler (AF, NFT: 10)"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (default: --num-steps; AF / NFT papers on SD3.5-M: 40)"""
    guidance_scale: float = 1.0
    """CFG of evaluation; AdvantageFlow rolls out CFG-free (spec §4)"""

    # algorithm
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
    gamma: float = 1.1
    """rollout-policy regularisation weight for --gamma-mode constant (AF(1.1))"""
    gamma_mode: str = "constant"
    """constant (gamma = --gamma) | one-minus-a (gamma = 1 - A, AF(1-A))"""
    lam: float = 1e-3
    """lambda: weight of the reference (base model) term in x0 space"""
    adv_clip: float = 1.0
    """A = clip(centred reward / Z, -adv_clip, adv_clip), Z = RMS of the centred rewards (spec §3.1)"""
    adaptive_weight: str = "none"
    """none: the literal eq. 5, plain prediction losses (AF paper §4.4) | shared: divide each sample's loss by
    sg(max(mean|f_theta - x0|, 1e-5)) (MFA's weighting, spec §3.5)"""
    timestep_sampling: str = "grid"
    """grid: distinct sigmas of the rollout grid per image (as DiffusionNFT, spec §3.5) | uniform: U(0, 1)"""
    timesteps_per_image: int = 0
    """noised points per image per iteration, each with fresh noise and its own backward pass;
    0 = 1 for AF (Algorithm 1), int(0.99 * num_steps) = 9 of 10 for --nft (official timestep_fraction 0.99)"""
    rollout_ema_rate: float = 0.1
    """rollout policy: old <- rho*old + (1-rho)*learner, rho_i = min(rate*i, max) (NFT's schedule shape, spec §7.3;
    NFT/SD3.5-M: rate 0.001, max 0.5 over ~1000 iterations - a 120-iteration run would stay on-policy, gamma inert)"""
    rollout_ema_max: float = 0.9
    """the spec §7.3 alternative rho = 0.9 (AF-speech): the lag that makes gamma a trust region; with max 0.5 the
    embedded run at lr 1e-4 collapsed on an earlier base (docs/advantageflow.md)"""
    nft: bool = False
    """DiffusionNFT's official loss instead (spec §3.6): implicit +/- policies, reward -> optimality prob."""
    nft_beta: float = 1.0
    """DiffusionNFT beta (1.0 GenEval/PickScore; 0.1 OCR / multi-reward)"""
    nft_adv_clip: float = 5.0
    """DiffusionNFT code: r = clip(z, -c, c)/c/2 + 1/2 with z over the global std; loss multiplied by c"""
    nft_kl: float = 1e-4
    """DiffusionNFT code's velocity-space pull to the base model"""
    nft_weighting: str = "separate"
    """separate adaptive denominators per branch (official code) | shared (one denominator) | none (AF paper eq. 14)"""
    nft_eval_ema: float = 0.9
    """--nft: evaluate and save an EMA of the learner, decay min((1+s)/(10+s), this) at optimizer step s
    (official code); 0 = the learner itself"""


# ----------------------------------------------------------------------------------- advantages (spec §3.1)
def af_advantages(rewards_, groups, clip=1.0):
    """A = clip((R - prompt mean) / Z, -clip, clip), Z = sqrt(mean over the batch of the centred rewards^2)."""
    centred = rewards_ - utils.group_mean(rewards_, groups)
    z = centred.pow(2).mean().sqrt().clamp(min=1e-6)
    return (centred / z).clamp(-clip, clip)


def nft_optimality(rewards_, groups, clip=5.0):
    """DiffusionNFT code: z = (R - group mean) / (std of all rewards + 1e-4), the population std (numpy's ddof 0 in
    the official stat_tracking.py); r = clip(clip(z,-c,c)/c/2 + 1/2, 0, 1)."""
    z = (rewards_ - utils.group_mean(rewards_, groups)) / (rewards_.std(unbiased=False) + 1e-4)
    return (z.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------- losses
def af_loss(v, v_old, v_ref, x0, x_t, sigma, adv, gamma, lam, adaptive_weight="none"):
    """AdvantageFlow eq. 5 (spec §3.3), per sample (B,), in x0-prediction space f = x_t - sigma*v:
    A ||f - x0||^2 + gamma ||f - f_old||^2 + lam ||f - f_ref||^2. Up to a theta-independent constant this is
    kappa ||f - f*||^2 with kappa = A + gamma + lam and f* = (A x0 + gamma f_old + lam f_ref) / kappa (a test);
    the three-term form is kept because it stays finite when kappa -> 0 (the gamma = 0 ablation)."""
    s, a, g = sigma.view(-1, 1, 1, 1), adv.view(-1, 1, 1, 1), torch.as_tensor(gamma).view(-1, 1, 1, 1)
    f = x_t - s * v
    f_old, f_ref = x_t - s * v_old, x_t - s * v_ref
    per = (a * (f - x0) ** 2 + g * (f - f_old) ** 2 + lam * (f - f_ref) ** 2).mean(dim=(1, 2, 3))
    if adaptive_weight == "shared":  # MFA's weighting (spec §3.5), not AF's: one self-normalising weight for all terms
        per = per / (f - x0).abs().mean(dim=(1, 2, 3)).clamp(min=1e-5).detach()
    return per


def nft_loss(v, v_old, x0, x_t, sigma, r, beta, weighting="separate"):
    """DiffusionNFT (spec §3.6): v+ = beta v + (1-beta) v_old, v- = (1+beta) v_old - beta v;
    per sample (r P + (1-r) N) / beta with x0-space errors P, N divided by adaptive weights (float64),
    one per branch (official code), one shared weight sg(max(mean|f_theta - x0|, 1e-5)), or none (AF eq. 14)."""
    s = sigma.view(-1, 1, 1, 1)
    x_pos = x_t - s * (beta * v + (1 - beta) * v_old)
    x_neg = x_t - s * ((1 + beta) * v_old - beta * v)
    dims = (1, 2, 3)
    if weighting == "shared":
        w_pos = w_neg = (x_t - s * v - x0).double().abs().mean(dims).clamp(min=1e-5).detach()
    elif weighting == "none":
        w_pos = w_neg = 1.0
    else:
        w_pos = (x_pos - x0).double().abs().mean(dims).clamp(min=1e-5).detach()
        w_neg = (x_neg - x0).double().abs().mean(dims).clamp(min=1e-5).detach()
    pos = ((x_pos - x0).double() ** 2).mean(dims) / w_pos
    neg = ((x_neg - x0).double() ** 2).mean(dims) / w_neg
    return ((r * pos + (1 - r) * neg) / beta).float()


class EvalEMA:
    """DiffusionNFT's evaluation copy (official flow_grpo/ema.py, used by --nft): a shadow of the trainable tensors,
    ema <- d ema + (1 - d) theta after optimizer step s, d = min((1 + s) / (10 + s), decay); `swapped()` puts the
    shadow into the model (for evaluation and saving) and restores the learner afterwards."""

    def __init__(self, params, decay):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self, s):
        d = min((1 + s) / (10 + s), self.decay)
        for e, p in zip(self.shadow, self.params):
            e.lerp_(p, 1 - d)

    @contextlib.contextmanager
    def swapped(self):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, q in zip(self.params, saved):
                    p.copy_(q)


def check_method_args(a):
    utils.check_finite(a)  # before the convexity warning below
    if a.group_size < 2:  # A = R - prompt mean (spec §3.1; NFT's r likewise): 0 for a prompt's only image
        utils.fail(f"--group-size {a.group_size} must be >= 2: advantages are relative to each prompt's images, so "
                   "one image per prompt makes every advantage 0")
    if a.lam < 0 or a.nft_kl < 0 or a.rollout_ema_rate < 0:
        utils.fail(f"--lam {a.lam}, --nft-kl {a.nft_kl} and --rollout-ema-rate {a.rollout_ema_rate} must be >= 0")
    if a.gamma_mode not in ("constant", "one-minus-a"):
        utils.fail(f"unknown --gamma-mode {a.gamma_mode!r}; choose from: constant, one-minus-a")
    if a.adaptive_weight not in ("shared", "none"):
        utils.fail(f"unknown --adaptive-weight {a.adaptive_weight!r}; choose from: shared, none")
    if a.timestep_sampling not in ("grid", "uniform"):
        utils.fail(f"unknown --timestep-sampling {a.timestep_sampling!r}; choose from: grid, uniform")
    if a.nft_weighting not in ("separate", "shared", "none"):
        utils.fail(f"unknown --nft-weighting {a.nft_weighting!r}; choose from: separate, shared, none")
    if a.gamma_mode == "constant" and a.gamma + a.lam - a.adv_clip <= 0 and not a.nft:  # allowed: the ablation
        print(f"warning: --gamma {a.gamma}: kappa = A + gamma + lam reaches {a.gamma + a.lam - a.adv_clip:.3g} <= 0, "
              "the per-sample loss is not convex (spec §3.2)", file=sys.stderr)
    if a.nft_beta <= 0 or a.adv_clip <= 0 or a.nft_adv_clip <= 0:
        utils.fail("--nft-beta, --adv-clip and --nft-adv-clip must be > 0")
    if not 0 <= a.rollout_ema_max < 1 or not 0 <= a.nft_eval_ema < 1:
        utils.fail("--rollout-ema-max and --nft-eval-ema must be in [0, 1)")
    if a.timesteps_per_image < 0 or (a.timestep_sampling == "grid" and a.timesteps_per_image > a.num_steps):
        utils.fail(f"--timesteps-per-image {a.timesteps_per_image} must be in [0, --num-steps {a.num_steps}] "
                   "(distinct grid sigmas per image)")
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

    # ---- setup: model, learner / rollout ("old") / reference views, optimizer, prompts, reward
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size,
                              gradient_checkpointing=args.gradient_checkpointing)
    policy = models.Policy(model.transformer, args.lora_rank, args.lora_alpha, with_old=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = rewards.build_reward(args.reward, args.reward_device or device, batch_size=args.decode_batch_size,
                                     dtype=rewards.DTYPES[args.reward_dtype], paths=args.reward_paths)
    grid = utils.SampleGrid(args.eval_samples_per_prompt)  # base beside current on the same noise
    sampler = utils.PromptSampler(prompts, metadata, args.prompts_per_iter, args.group_size, args.seed, rank, world)
    sigmas = model.sigmas(args.num_steps)  # (T+1,) rollout grid, shift from the scheduler config
    # noised points per image: AF draws one fresh (t, eps) per image (Algorithm 1 line 8); NFT trains 9 of 10
    n_t = args.timesteps_per_image or (int(args.num_steps * 0.99) if args.nft else 1)
    ema = EvalEMA(policy.parameters(), args.nft_eval_ema) if args.nft and args.nft_eval_ema > 0 else None

    def evaluate(step):  # every rank its slice of the held-out prompts; the learner, or under --nft its eval EMA
        with ema.swapped() if ema else contextlib.nullcontext():
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
        if ema and ckpt.get("eval_ema") is not None:
            ema.shadow = utils.to_device(ckpt["eval_ema"], device)
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
                rng=utils.rng_state(), args=vars(args), eval_ema=ema.shadow if ema else None, grid=grid.state_dict()))

    guard, stop = utils.NonFiniteGuard(), utils.StopSignal(device)
    t0 = time.time()
    bar = tqdm(range(start_it, args.num_iterations), disable=rank != 0, desc="advantageflow")
    for it in bar:
        t_iter = utils.now(device)
        # noise is drawn for the global batch from (seed, iteration) and sliced per rank: resume is exact and
        # a 2-process run sees the same numbers as a 1-process run with the same global batch
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
        # ---- sample: CFG-free ODE rollouts of the rollout policy (spec §4); only final samples are kept
        captions, meta, prompt_idx = sampler.sample(it)
        n, local = len(captions), slice(rank * len(captions), (rank + 1) * len(captions))
        prompt_embeds, pooled = model.encode_prompt(captions)
        noise = utils.randn_for_rank(gen, n * world, model.latent_shape, local, device, model.dtype)
        with policy.old() as old:
            x0 = sampling.sample(old, prompt_embeds, pooled, sigmas, noise)["latents"]  # (B, C, H, W)
        # ---- reward (gathered over ranks so groups and batch statistics are global)
        t_sample = utils.now(device)
        reward, parts = reward_fn(model.decode(x0), captions, meta)
        t_reward = utils.now(device)
        reward_queries += n * world
        all_rewards = utils.all_gather_cat(reward.to(device)).cpu()
        groups = utils.all_gather_cat(prompt_idx.to(device)).cpu()
        # ---- advantages: AF spec §3.1, or DiffusionNFT's optimality probability r (spec §3.1, NFT code)
        if args.nft:
            r = nft_optimality(all_rewards, groups, args.nft_adv_clip)
            adv = 2 * r - 1
        else:
            adv = af_advantages(all_rewards, groups, args.adv_clip)
        adv_local = adv[local].to(device)
        # ---- loss + update: one optimizer step on the mean over images x timesteps (Algorithm 1 line 9), in
        # micro-batches; grid: each image gets n_t distinct sigmas of its rollout grid (NFT: a random permutation of
        # the 10 grid points, the first 9), every one with fresh noise
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
                    if (args.nft and args.nft_kl > 0) or (not args.nft and args.lam > 0):
                        with policy.ref() as ref:
                            v_ref = sampling.predict(ref, x_t, sigma, pe, pp)
                v = sampling.predict(policy.transformer, x_t, sigma, pe, pp)
                if args.nft:
                    per = nft_loss(v, v_old, x0[mb], x_t, sigma, r[local][mb].to(device), args.nft_beta,
                                   args.nft_weighting)
                    kl = ((v - v_ref) ** 2).mean(dim=(1, 2, 3))
                    loss = args.nft_adv_clip * per.mean() + args.nft_kl * kl.mean()
                else:
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
        if guard.ok(loss, grad_norm, all_rewards, iteration=it):
            optimizer.step()
        if ema:  # one optimizer step per iteration: step count s = it + 1
            ema.step(it + 1)
        # ---- rollout policy: EMA of the learner, rho_i = min(rate * i, max) (spec §7.3 / NFT eta_i)
        rho = min(args.rollout_ema_rate * (it + 1), args.rollout_ema_max)
        policy.update_old(rho)
        t_train = utils.now(device)

        # ---- log
        if rank == 0:
            drift_old, drift_ref = torch.stack(stats).mean(0).tolist()
            metrics = {
                "charts/reward_mean": all_rewards.mean().item(), "charts/reward_std": all_rewards.std().item(),
                "charts/images_per_sec": len(all_rewards) / (time.time() - t_iter),
                "perf/sample_s": t_sample - t_iter, "perf/reward_s": t_reward - t_sample,
                "perf/train_s": t_train - t_reward,
                "charts/lr": optimizer.param_groups[0]["lr"], "charts/rollout_ema": rho,
                "charts/reward_queries": reward_queries,
                "losses/loss": loss.item(), "losses/grad_norm": grad_norm.item(),
                "losses/adv_abs_mean": adv.abs().mean().item(),
                "losses/adv_clip_frac": (adv.abs() >= (1 if args.nft else args.adv_clip) - 1e-6).float().mean().item(),
                "losses/zero_std_group_frac": (utils.group_mean((all_rewards - utils.group_mean(all_rewards, groups)) ** 2, groups) == 0).float().mean().item(),
                "losses/v_minus_v_old_sq": drift_old, "losses/v_minus_v_ref_sq": drift_ref,
                "losses/skipped_updates": guard.total,
            }
            metrics.update({f"charts/reward_{k}": v.mean().item() for k, v in parts.items()})
            utils.log_metrics(writer, metrics, it + 1)
            bar.set_postfix(reward=f"{metrics['charts/reward_mean']:.3f}", loss=f"{loss.item():.4f}")
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
        if args.save_model:  # under --nft the evaluation EMA, as the official code saves it
            with ema.swapped() if ema else contextlib.nullcontext():
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
