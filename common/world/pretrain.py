"""Pretrain the embedded base model: rectified flow on procedurally rendered shapes scenes.

    python -m common.world.pretrain --max-steps 7000     # writes common/world/assets/
    python -m common.world.pretrain --max-steps 7000     # run again: resumes from runs/pretrain/checkpoint.pt
    python -m common.world.pretrain --init-from common/world/assets --max-steps 6000 --log-dir runs/pretrain_2
                                                         # a second phase, warm-started from the committed base

Only the *train* split's prompts are rendered, so the test split's compositions stay unseen.
Loss: || v_theta(x_t, sigma) - (noise - x0) ||^2 with x_t = (1 - sigma) x0 + sigma noise, sigma ~ logit-normal
(SD3) or uniform; caption dropout (empty prompt) so classifier-free guidance works; EMA weights are saved.
Learning rate: linear warm-up, constant, then cosine decay to `--final-lr-fraction` over the last `--decay-fraction`
of `--max-steps`. Every `--save-every` steps a checkpoint (weights, EMA, optimizer, scheduler, step, RNG states)
goes to `<log-dir>/checkpoint.pt`; a rerun with the same arguments continues it exactly (a killed run loses at most
`--save-every` steps) and gives the same weights as an uninterrupted run.
"""

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.world import model as world_model, shapes


@dataclass
class Args:
    output_dir: str = str(world_model.ASSETS)
    """where the weights (fp16 safetensors) and config.json go"""
    seed: int = 0
    init_from: str | None = None
    """start from saved weights (a directory like common/world/assets) instead of a random init; the EMA starts
    there too (a warm start with a fresh optimizer and schedule, e.g. to continue a finished run for longer)"""
    minutes: float = 1e9
    """wall-clock budget of this invocation (a checkpoint is saved when it runs out; rerun to continue)"""
    stop_after: int = 0
    """stop this invocation after this many steps (0: no limit); a checkpoint is saved, rerun to continue"""
    max_steps: int = 12_000
    """length of the learning-rate schedule and of the run"""
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_fraction: float = 0.4
    """cosine decay over the last fraction of --max-steps"""
    final_lr_fraction: float = 0.02
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    """probability of training on the empty prompt (enables classifier-free guidance)"""
    sigma_sampling: str = "logit_normal"
    """logit_normal (SD3, mean 0 std 1) or uniform"""
    save_every: int = 250
    eval_every: int = 2000
    threads: int = 0
    """torch CPU threads (0 = torch default)"""
    log_dir: str = "runs/pretrain"


def sample_sigmas(n, mode, generator):
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise SystemExit(f"error: unknown --sigma-sampling {mode!r}; choose from: logit_normal, uniform")


_PER_INVOCATION = ("minutes", "stop_after", "threads")  # may differ between the invocations of one run


def lr_factor(step, args):
    """warm-up -> constant -> cosine decay to final_lr_fraction over the last decay_fraction of max_steps"""
    decay_start = int(args.max_steps * (1 - args.decay_fraction))
    if step < decay_start:
        return min(1.0, (step + 1) / args.warmup_steps)
    t = min(1.0, (step - decay_start) / max(1, args.max_steps - decay_start))
    return args.final_lr_fraction + (1 - args.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))


def main(args: Args):
    if args.sigma_sampling not in ("logit_normal", "uniform"):
        raise SystemExit(f"error: unknown --sigma-sampling {args.sigma_sampling!r}; choose from: logit_normal, uniform")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    transformer, text_encoder = world_model.build_embedded()
    if args.init_from:
        warm = world_model.load_embedded(path=args.init_from)
        transformer.load_state_dict(warm.transformer.state_dict())
        text_encoder.load_state_dict(warm.text_encoders[0].state_dict())
    ema = copy.deepcopy(transformer).requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    specs = shapes.split_specs("train")
    ckpt_path = Path(args.log_dir) / "checkpoint.pt"
    step, elapsed = 0, 0.0
    if ckpt_path.is_file():  # resume exactly: weights, EMA, optimizer, schedule, step and every RNG
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["args"] != {k: v for k, v in vars(args).items() if k not in _PER_INVOCATION}:
            raise SystemExit(f"error: {ckpt_path} was written with other arguments ({ck['args']}); "
                             "pass the same ones or another --log-dir")
        for m, k in ((transformer, "transformer"), (text_encoder, "text_encoder"), (ema, "ema"),
                     (ema_te, "ema_te"), (opt, "opt"), (sched, "sched")):
            m.load_state_dict(ck[k])
        step, elapsed = ck["step"], ck["elapsed"]
        rng.setstate(ck["rng"])
        gen.set_state(ck["gen"])
        print(f"resumed from {ckpt_path} at step {step}")

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "ema": ema.state_dict(), "ema_te": ema_te.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "step": step, "elapsed": elapsed + time.time() - t0,
                    "rng": rng.getstate(), "gen": gen.get_state(),
                    "args": {k: v for k, v in vars(args).items() if k not in _PER_INVOCATION}}, tmp)
        os.replace(tmp, ckpt_path)  # atomic: a kill during the save keeps the previous checkpoint

    writer = SummaryWriter(args.log_dir)
    print(f"pretraining {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M-param transformer on "
          f"{len(specs)} train prompts to step {args.max_steps}")
    t0 = time.time()
    bar = tqdm(total=args.max_steps, initial=step)
    start = step
    while step < args.max_steps and time.time() - t0 < args.minutes * 60 and not (
            args.stop_after and step - start >= args.stop_after):
        batch = [rng.choice(specs) for _ in range(args.batch_size)]
        x0 = shapes.render_batch(batch, rng.getrandbits(32)) * 2 - 1  # pixels as latents in [-1, 1]
        captions = [s["caption"] if rng.random() >= args.caption_dropout else "" for s in batch]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(batch), args.sigma_sampling, gen)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise  # rectified flow
        pe, pooled = text_encoder(captions)
        pred = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=pe,
                           pooled_projections=pooled, return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            for m, e in ((transformer, ema), (text_encoder, ema_te)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - min(args.ema_decay, (1 + step) / (10 + step)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        writer.add_scalar("losses/loss", loss.item(), step)
        writer.add_scalar("losses/grad_norm", grad_norm.item(), step)
        writer.add_scalar("charts/lr", sched.get_last_lr()[0], step)
        if step % args.save_every == 0:
            save_checkpoint()
            world_model.save_embedded(ema, ema_te, args.output_dir)
        if step % args.eval_every == 0:
            from common.evaluate import evaluate_model

            world_model.save_embedded(ema, ema_te, Path(args.log_dir) / f"step_{step}")  # snapshots to choose from
            model = world_model.load_embedded(path=Path(args.log_dir) / f"step_{step}")
            res = evaluate_model(model, model.transformer, shapes.split_specs("test"), samples_per_prompt=2)
            tqdm.write(f"step {step} ({(time.time() - t0) / 60:.1f} min): test partial {res['reward_mean']:.3f} "
                       f"strict {res['strict_accuracy']:.3f} {json.dumps(res['accuracy'])}")
            writer.add_scalar("eval/reward_mean", res["reward_mean"], step)
            writer.add_scalar("eval/strict_accuracy", res["strict_accuracy"], step)
    save_checkpoint()
    world_model.save_embedded(ema, ema_te, args.output_dir)
    if step < args.max_steps:
        print(f"stopped at step {step} (--minutes / --stop-after); rerun the same command to continue")
        return
    meta = {"steps": step, "minutes": (elapsed + time.time() - t0) / 60, "args": vars(args)}
    (Path(args.output_dir) / "pretrain_info.json").write_text(json.dumps(meta, indent=1))
    print(f"saved EMA weights after {step} steps ({meta['minutes']:.1f} min) to {args.output_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
