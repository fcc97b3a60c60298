"""Pretrain the embedded base model: rectified flow on procedurally rendered shapes scenes.

    python -m common.pretrain --minutes 60            # writes common/assets/embedded/

Only the *train* split's prompts are rendered, so the test split's compositions stay unseen.
Loss: || v_theta(x_t, sigma) - (noise - x0) ||^2 with x_t = (1 - sigma) x0 + sigma noise, sigma ~ logit-normal
(SD3) or uniform; caption dropout (empty prompt) so classifier-free guidance works; EMA weights are saved.
"""

import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import models, shapes


@dataclass
class Args:
    output_dir: str = str(models.ASSETS)
    """where the weights (fp16 safetensors) and config.json go"""
    seed: int = 0
    minutes: float = 60.0
    """wall-clock budget; training stops at whichever of --minutes / --max-steps comes first"""
    max_steps: int = 1_000_000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    """probability of training on the empty prompt (enables classifier-free guidance)"""
    sigma_sampling: str = "logit_normal"
    """logit_normal (SD3, mean 0 std 1) or uniform"""
    save_every: int = 500
    eval_every: int = 1000
    threads: int = 0
    """torch CPU threads (0 = torch default)"""
    log_dir: str = "runs/pretrain"


def sample_sigmas(n, mode, generator):
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise SystemExit(f"error: unknown --sigma-sampling {mode!r}; choose from: logit_normal, uniform")


def main(args: Args):
    if args.sigma_sampling not in ("logit_normal", "uniform"):
        raise SystemExit(f"error: unknown --sigma-sampling {args.sigma_sampling!r}; choose from: logit_normal, uniform")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    transformer, text_encoder = models.build_embedded()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    specs = shapes.split_specs("train")
    writer = SummaryWriter(args.log_dir)
    print(f"pretraining {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M-param transformer on "
          f"{len(specs)} train prompts for {args.minutes} min")
    t0, step = time.time(), 0
    bar = tqdm(total=args.max_steps if args.max_steps < 1_000_000 else None)
    while step < args.max_steps and time.time() - t0 < args.minutes * 60:
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
        if step % args.save_every == 0:
            models.save_embedded(ema, ema_te, args.output_dir)
        if step % args.eval_every == 0:
            from common.evaluate import evaluate_model

            models.save_embedded(ema, ema_te, Path(args.log_dir) / f"step_{step}")  # snapshots to choose from
            model = models.load_embedded(path=Path(args.log_dir) / f"step_{step}")
            res = evaluate_model(model, model.transformer, shapes.split_specs("test"), samples_per_prompt=2)
            tqdm.write(f"step {step} ({(time.time() - t0) / 60:.1f} min): test partial {res['reward_mean']:.3f} "
                       f"strict {res['strict_accuracy']:.3f} {json.dumps(res['accuracy'])}")
            writer.add_scalar("eval/reward_mean", res["reward_mean"], step)
            writer.add_scalar("eval/strict_accuracy", res["strict_accuracy"], step)
    models.save_embedded(ema, ema_te, args.output_dir)
    meta = {"steps": step, "minutes": (time.time() - t0) / 60, "args": vars(args)}
    (Path(args.output_dir) / "pretrain_info.json").write_text(json.dumps(meta, indent=1))
    print(f"saved EMA weights after {step} steps ({meta['minutes']:.1f} min) to {args.output_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
