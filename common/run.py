"""The run every method script shares: its flags (`RunArgs`, which a method's `Args` extends) and its lifecycle
(`Run`): checks, seeding, devices and processes, run directory + TensorBoard, model / policy / reward / prompts,
the base evaluation or a resume, periodic evaluation and checkpoints, the final evaluation, summary.json, the saved
model and the optional Hub upload. What a method keeps in its checkpoint is the method's: it hands `Run` a function
that returns it."""

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from common import models, rewards, utils
from common.evaluate import evaluate_model


@dataclass
class RunArgs:
    """Every flag common/ reads. A method's Args extends it and re-declares the fields of the iteration (below) with
    its own defaults (a re-declared field keeps its place in --help)."""
    exp_name: str = "cleanflow"
    """the name of this experiment (a method's Args: its file name)"""
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
    """the wandb entity (user or team) of the project (None: your wandb default)"""
    output_dir: str | None = None
    """run directory (None: runs/{task}__{exp_name}__{seed}__{time})"""
    save_model: bool = True
    """save lora/ (or transformer/) in diffusers format at the end"""
    upload_model: bool = False
    """upload the saved model, summary.json and a model card to the Hugging Face Hub at the end"""
    hf_entity: str | None = None
    """user or organisation of the Hub model repo {hf_entity}/{task}-{exp_name}-seed{seed} (None: your account)"""
    resume: str | None = None
    """a run directory or checkpoint.pt to continue (flags not given take its values; README: which may change)"""
    overwrite: bool = False
    """let a new run replace the run in --output-dir (its checkpoint, summary, weights and TensorBoard logs)"""
    checkpoint_every: int = 20
    """iterations between resumable checkpoints"""
    eval_every: int = 40
    """iterations between held-out evaluations (the training reward is logged every iteration)"""
    log_images_every: int = 50

    # the iteration: the method's Args sets its defaults
    num_iterations: int = 100
    prompts_per_iter: int = 8
    """prompts per iteration"""
    group_size: int = 8
    """images per prompt"""
    train_batch_size: int = 64
    """micro-batch of the update"""
    lr: float = 1e-4
    """AdamW learning rate"""
    max_grad_norm: float = 1.0
    num_steps: int = 10
    """ODE steps of the rollout sampler"""
    eval_num_steps: int | None = None
    """ODE steps of evaluation (None: --num-steps)"""
    guidance_scale: float = 1.0
    """classifier-free guidance of evaluation (1 = none)"""

    # model, prompts, reward
    model: str = "embedded"
    """'embedded', or a diffusers SD3 / FLUX.1 id or local path (e.g. stabilityai/stable-diffusion-3.5-medium)"""
    resolution: int = 512
    """SD3 / FLUX image size (the embedded model is 32x32)"""
    use_t5: bool = False
    """SD3: also load the T5 text encoder (FLUX always loads it: its only sequence encoder)"""
    max_t5_length: int = 128
    """T5 prompt tokens, SD3 with --use-t5 and FLUX (official NFT / Flow-GRPO code: 128)"""
    flux_guidance: float | None = None
    """FLUX.1-dev's guidance-embedding value (None: 3.5, as FluxPipeline); refused for other models"""
    mixed_precision: str | None = None
    """no | bf16 autocast with fp32 trained weights (None: bf16 where native: CUDA >= 8.0, AVX512-BF16 / AMX CPUs)"""
    fast_cpu_kernels: bool = True
    """embedded model on a CPU: attention as two matmuls and tanh-GELU via sigmoid, the same functions 1.03-1.15x
    faster per pass (common/world/model.py); False: diffusers' kernels"""
    gradient_checkpointing: bool = False
    """recompute the transformer's activations in the backward pass (less memory, ~30 % slower; SD3.5)"""
    decode_batch_size: int = 16
    """images the VAE decodes and a reward model scores at once"""
    reward_device: str | None = None
    """device of the reward models (None: the training device), e.g. cuda:1"""
    reward_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the reward models (fp32: as the official Flow-GRPO code; bf16 / fp16 save memory)"""
    eval_batch_size: int = 128
    """images generated at once in held-out evaluation"""
    lora_rank: int = 0
    """0 = full fine-tuning (embedded default); SD3.5-M: 32"""
    lora_alpha: int | None = None
    """LoRA alpha (None: 2 * rank)"""
    reward: str = "shapes"
    """weighted rewards, e.g. shapes=1.0,jpeg_compressibility=0.1 (choices in common/rewards.py)"""
    reward_paths: str | None = None
    """local weights of real rewards: name=path[|processor],... e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth"""
    prompts_file: str | None = None
    """training prompts, one per line (None: the shapes grammar's train split)"""
    eval_prompts_file: str | None = None
    """held-out prompts (None: the shapes test split)"""
    eval_samples_per_prompt: int = 8


class Run:
    """Set-up (all checks before anything loads): prompts, processes, seed, run directory, TensorBoard, the model,
    its `Policy` (learner / old / ref views), the reward, the held-out sample grid and the prompt sampler.
    A method then calls `start` (base evaluation or resume), iterates over `iterations()`, ends each iteration with
    `end_iteration` (log, periodic evaluation, checkpoint or stop) and the run with `finish`."""

    def __init__(self, args, script, with_old=False, eval_scalars=()):
        self.args, a = args, args
        utils.exit_on_ctrl_c("loading the models")  # until StopSignal (below) takes Ctrl-C over
        # held-out prompts: --eval-prompts-file, the shapes test split or the first 32 --prompts-file lines
        self.prompts, self.metadata, self.eval_prompts, self.eval_meta = utils.check_args(a, utils.world_size_from_env())
        self.rank, self.world, self.device = utils.setup_distributed(a.device)
        if a.threads:
            torch.set_num_threads(a.threads)
        for seed_fn in (random.seed, np.random.seed, torch.manual_seed):
            seed_fn(a.seed + self.rank)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = a.torch_deterministic, False
        task = "shapes" if a.model == models.EMBEDDED else Path(a.model).name
        resumed = Path(a.resume or ".")
        self.dir = Path(a.output_dir or (a.resume and (resumed if resumed.is_dir() else resumed.parent))
                        or f"runs/{task}__{Path(script).stem}__{a.seed}__{int(time.time())}")
        if self.rank == 0:
            utils.claim_run_dir(self.dir, a)  # no run overwrites another; a live run holds run.lock
        self.writer = utils.make_writer(self.dir, a, self.rank)
        self.model = models.load_model(a.model, self.device, resolution=a.resolution, use_t5=a.use_t5,
                                       max_t5_length=a.max_t5_length, mixed_precision=a.mixed_precision,
                                       decode_batch_size=a.decode_batch_size,
                                       gradient_checkpointing=a.gradient_checkpointing, flux_guidance=a.flux_guidance,
                                       fast_cpu_kernels=a.fast_cpu_kernels)
        self.policy = models.Policy(self.model.transformer, a.lora_rank, a.lora_alpha, self.model.lora_targets,
                                    with_old=with_old)
        self.reward_fn = rewards.build_reward(a.reward, a.reward_device or self.device, batch_size=a.decode_batch_size,
                                              dtype=rewards.DTYPES[a.reward_dtype], paths=a.reward_paths)
        self.grid = utils.SampleGrid(a.eval_samples_per_prompt)  # base beside current on the same noise
        self.sampler = utils.PromptSampler(self.prompts, self.metadata, a.prompts_per_iter, a.group_size, a.seed,
                                           self.rank, self.world)
        self.eval_scalars = eval_scalars  # extra entries of an evaluation's result logged under eval/
        self.reward_queries, self.wall_before, self.summary, self.start_iteration = 0, 0.0, {}, 0
        self.guard, self.stop = utils.NonFiniteGuard(), utils.StopSignal(self.device)

    def evaluate(self, step, transformer=None):
        """Held-out evaluation of `transformer` (default: the learner), every rank its slice of the prompts; the
        picked samples go to TensorBoard's eval/samples."""
        a = self.args
        res, images, caps, values = evaluate_model(
            self.model, transformer or self.model.transformer, self.eval_meta, a.eval_samples_per_prompt, a.seed,
            a.guidance_scale, a.eval_num_steps or a.num_steps, self.reward_fn, self.eval_prompts,
            self.grid.pick(len(self.eval_prompts)), a.eval_batch_size, self.rank, self.world)
        if self.rank == 0:
            self.grid.add(self.writer, step, images, caps, values, picked=True)
        return res

    def log_eval(self, res, step):
        """Held-out metrics under eval/: reward, strict accuracy, diversity, clean fraction, texture (speckled-pixel
        fraction, the scorer's texture), per-category accuracy, and the method's `eval_scalars`."""
        if self.writer is None:
            return
        keys = ("reward_mean", "strict_accuracy", "diversity", "clean_fraction", "texture", *self.eval_scalars)
        scalars = {**{k: res[k] for k in keys if k in res},
                   **{f"accuracy_{c}": v for c, v in res.get("accuracy", {}).items()}}
        for k, v in scalars.items():
            self.writer.add_scalar(f"eval/{k}", v, step)

    def start(self, evaluate, state):
        """`evaluate(step)` -> the method's held-out result; `state()` -> what its checkpoint keeps (every rank calls
        it). With --resume: restore the run's counters, RNG and sample grid and return the checkpoint, from which
        the method restores its own state. Otherwise evaluate the base model and return None."""
        self.evaluate_fn, self.state_fn = evaluate, state
        ckpt = None
        if self.args.resume:
            ckpt = utils.load_checkpoint(self.args.resume, forget=True)
            utils.apply_resume_changes(ckpt, self.args)  # a new --lr into the optimizer's state; summary's "resumes"
            utils.set_rng_state(ckpt["rng"][self.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
            self.start_iteration, self.reward_queries = ckpt["iteration"], ckpt["reward_queries"]
            self.wall_before, self.summary = ckpt["wall_time_s"], ckpt["summary"]
            base = (ckpt.get("grid") or {}).get("base")  # older checkpoints: float images
            self.grid.base = base and (rewards.uint8_images(base[0]), *base[1:])
        else:
            self.summary["base"] = evaluate(0)
            if self.rank == 0:
                self.log_eval(self.summary["base"], 0)
                print("base:", {k: round(v, 4) for k, v in self.summary["base"].items() if isinstance(v, float)})
        self.t0 = time.time()
        return ckpt

    def iterations(self, desc):
        self.bar = tqdm(range(self.start_iteration, self.args.num_iterations), disable=self.rank != 0, desc=desc)
        return self.bar

    def save_checkpoint(self, iteration):
        """Atomic checkpoint.pt: the method's state plus the run's counters, RNG, summary and sample grid."""
        state = self.state_fn()  # every rank: a method may gather its per-rank samples here
        if self.rank == 0:
            utils.save_checkpoint(self.dir / "checkpoint.pt", dict(
                state, iteration=iteration, reward_queries=self.reward_queries,
                wall_time_s=self.wall_before + time.time() - self.t0, summary=self.summary, rng=utils.rng_state(),
                args=vars(self.args), grid={"base": self.grid.base}))

    def end_iteration(self, it, metrics, samples=None, **postfix):
        """Log `metrics` (rank 0 writes them) and, every --log-images-every iterations,
        `samples` = (latents, captions, rewards); every --eval-every iterations evaluate; every --checkpoint-every
        save; on Ctrl-C / SIGTERM save whole iterations and exit 130."""
        a = self.args
        if self.rank == 0:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, it + 1)
            self.bar.set_postfix(**postfix)
            if samples is not None and (it + 1) % a.log_images_every == 0:
                x0, captions, values = samples
                self.writer.add_image("samples", utils.image_grid(self.model.decode(x0[:16]), captions[:16],
                                                                  values[:16]), it + 1, dataformats="HWC")
        if (it + 1) % a.eval_every == 0 and it + 1 < a.num_iterations:
            res = self.evaluate_fn(it + 1)
            if self.rank == 0:
                self.log_eval(res, it + 1)
                tqdm.write(f"iter {it + 1}: eval reward {res['reward_mean']:.4f} strict "
                           f"{res.get('strict_accuracy', 0):.3f}")
        # save every --checkpoint-every iterations and when Ctrl-C / SIGTERM asked to stop (then exit 130); never
        # during a run of non-finite updates, so the last good checkpoint stays
        stopping = self.stop()
        saved = ((it + 1) % a.checkpoint_every == 0 or stopping) and self.guard.in_a_row == 0
        if saved:
            self.save_checkpoint(it + 1)
        if stopping:
            if self.rank == 0:
                print(f"interrupted: checkpoint saved at iteration {it + 1} in {self.dir}" if saved else
                      f"interrupted during non-finite updates: the checkpoint in {self.dir} is the last good one",
                      end="")
                print(f"; continue with --resume {self.dir}")
            raise SystemExit(130)

    def finish(self, save_model=None):
        """Final evaluation, checkpoint, the model (`save_model()`, default the learner's lora/ or transformer/),
        summary.json, samples.png (base beside fine-tuned, same noise), the optional Hub upload."""
        a = self.args
        self.summary["final"] = self.evaluate_fn(a.num_iterations)
        self.save_checkpoint(a.num_iterations)
        if self.rank == 0:
            self.log_eval(self.summary["final"], a.num_iterations)
            if a.save_model:
                save_model() if save_model else self.policy.save_pretrained(self.dir)
            self.summary.update(wall_time_s=self.wall_before + time.time() - self.t0,
                                reward_queries=self.reward_queries, skipped_updates=self.guard.total, args=vars(a))
            utils.write_summary(self.dir, self.summary)
            self.grid.save(self.dir / "samples.png")
            b, f = self.summary["base"], self.summary["final"]
            extra = "".join(f"; {k} {b.get(k, float('nan')):.5f} -> {f[k]:.5f}" for k in self.eval_scalars if k in f)
            print(f"held-out reward {b['reward_mean']:.4f} -> {f['reward_mean']:.4f}; strict accuracy "
                  f"{b.get('strict_accuracy', float('nan')):.3f} -> {f.get('strict_accuracy', float('nan')):.3f}"
                  f"{extra}; {self.summary['wall_time_s'] / 60:.1f} min; run dir {self.dir}")
            self.writer.close()
            if a.upload_model:  # lora/ (or transformer/) + model card to the Hub
                utils.HOOKS["upload"](self.dir, a)
        utils.cleanup_distributed()


class EMA:
    """An EMA of the trained weights, as the official DiffusionNFT and Flow-GRPO code evaluate and save
    (flow_grpo/ema.py): a shadow of `params`, after optimizer step s  ema <- d ema + (1 - d) theta with
    d = min((1 + s) / (10 + s), decay), applied `repeat` times at once; `swapped()` puts the shadow into the model
    (for evaluation and saving) and restores the learner afterwards."""

    def __init__(self, params, decay):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self, s, repeat=1):
        d = min((1 + s) / (10 + s), self.decay) ** repeat
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
