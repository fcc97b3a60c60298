"""Held-out evaluation of the base model or a fine-tuned checkpoint.

    python -m common.evaluate                                  # embedded base, test split
    python -m common.evaluate --checkpoint runs/<run>          # a method's run dir (or its lora/ dir)
    python -m common.evaluate --prompts-file my_prompts.txt --samples-per-prompt 8 --json out.json
    python -m common.evaluate --save-images samples/ --samples-per-prompt 4   # GenEval's folder layout

    python -m common.evaluate --reward shapes,shapes_strict,jpeg_compressibility   # one row per reward

Prints a per-category table and, with --reward, one row (mean, std) per named reward, so a held-out "gold" reward
beside the trained one shows reward hacking; --json writes {reward_mean, strict_accuracy, accuracy (per category),
partial (per category), diversity, n, rewards ({name: {weight, mean, std}})}; --grid saves a PNG of samples with
their prompts.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from common import shapes
from common.sampling import sample


@torch.no_grad()
def generate(model, transformer, captions, seed=0, guidance_scale=1.0, num_steps=10, batch_size=128, offset=0,
             total=None):
    """CFG-optional Euler ODE samples for a list of captions, noise fixed by `seed` (same noise for every
    model, so base and fine-tuned are compared on paired noise). The captions are samples offset..offset+N of a list
    of `total` (default N) whose noise is drawn at once, so a rank's slice gets the noise one process would give it.
    Returns images (N, 3, H, W) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(total or len(captions), *model.latent_shape, generator=gen)[offset:offset + len(captions)]
    sigmas = model.sigmas(num_steps)
    neg = model.encode_prompt([""]) if guidance_scale > 1 else (None, None)
    images = []
    for i in range(0, len(captions), batch_size):
        pe, pooled = model.encode_prompt(captions[i:i + batch_size])
        n = pe.shape[0]
        negs = (neg[0].expand(n, -1, -1), neg[1].expand(n, -1)) if guidance_scale > 1 else (None, None)
        out = sample(transformer, pe, pooled, sigmas, noise[i:i + n].to(model.device, model.dtype),
                     guidance_scale, *negs)
        images.append(model.decode(out["latents"]).cpu())
    return torch.cat(images)


def diversity(images, groups):
    """Mean pairwise RMS pixel distance between samples that share a prompt (groups: list of index lists)."""
    d = []
    for idx in groups:
        x = images[idx].flatten(1)
        if len(idx) > 1:
            dist = torch.cdist(x, x) / x.shape[1] ** 0.5
            d.append(dist[torch.triu_indices(len(idx), len(idx), 1).unbind()].mean())
    return float(torch.stack(d).mean()) if d else 0.0


def evaluate_model(model, transformer, specs, samples_per_prompt=4, seed=0, guidance_scale=1.0, num_steps=10,
                   reward_fn=None, captions=None, return_images=False, batch_size=128, rank=0, world=1):
    """Generate `samples_per_prompt` samples per prompt. Shapes specs are scored with the mini-GenEval scorer
    (reward_mean = partial credit); prompts without a spec (None or other metadata) need `reward_fn`, whose mean is
    then `reward_mean`. With both, the training reward is reported as `train_reward_mean` as well. A weighted
    reward (common.rewards.RewardFn) also reports each of its rewards: `rewards` = {name: {weight, mean, std}}.

    Sharded (world > 1, every rank calls it): each rank generates and scores its contiguous slice of the prompts on
    the noise one process would use, the per-sample results are gathered, and every rank returns the metrics of the
    whole list. `return_images`: True -> (res, images, captions, values) of this rank's slice (all samples in one
    process); a list of global sample indices -> those samples only, gathered on every rank (for sample grids)."""
    captions = captions or [s["caption"] for s in specs]
    k, n_prompts = samples_per_prompt, len(captions)
    per = -(-n_prompts // world)
    lo, hi = min(rank * per, n_prompts), min((rank + 1) * per, n_prompts)  # this rank's prompts
    rep = [i for i in range(lo, hi) for _ in range(k)]
    rep_caps, rep_specs = [captions[i] for i in rep], [specs[i] for i in rep]
    local = dict(div=[], values=[], train=[], strict=[], extra=[], cat=[])
    weights = getattr(reward_fn, "weights", {})  # a RewardFn's named rewards: {name: weight}
    local.update({f"reward/{name}": [] for name in weights})
    images = torch.zeros(0)
    if rep:
        was_training = transformer.training
        transformer.eval()
        images = generate(model, transformer, rep_caps, seed, guidance_scale, num_steps, batch_size, lo * k,
                          n_prompts * k)
        transformer.train(was_training)
        local["div"] = [diversity(images, [list(range(i, i + k))]) for i in range(0, len(rep), k)] if k > 1 else []
        if reward_fn is not None:
            total, parts = reward_fn(images, rep_caps, rep_specs)
            local["values"] = local["train"] = total.tolist()
            for name in weights:
                local[f"reward/{name}"] = parts[name].tolist()
        if all(shapes.is_spec(s) for s in rep_specs):
            values, strict, checks = shapes.score(images, rep_specs)
            local.update(values=values.tolist(), strict=strict.float().tolist(), extra=[c["extra"] for c in checks],
                         cat=[s["category"] for s in rep_specs])
    if not local["values"] and rep:
        raise ValueError("prompts without a shapes spec need a reward_fn to be evaluated")
    gathered = _gather(local, world)
    values = torch.tensor(gathered["values"])
    res = {"n": n_prompts * k, "diversity": float(torch.tensor(gathered["div"]).mean()) if gathered["div"] else 0.0}
    if reward_fn is not None:
        res["train_reward_mean"] = float(torch.tensor(gathered["train"]).mean())
    if weights:
        parts = {name: torch.tensor(gathered[f"reward/{name}"]) for name in weights}
        res["rewards"] = {name: {"weight": w, "mean": float(parts[name].mean()),
                                 "std": float(parts[name].std()) if len(parts[name]) > 1 else 0.0}
                          for name, w in weights.items()}
    if gathered["strict"] and len(gathered["strict"]) == len(values):  # every prompt has a shapes spec
        strict, cat = torch.tensor(gathered["strict"]), gathered["cat"]
        cats = [c for c in shapes.CATEGORIES if c in cat]
        mask = {c: torch.tensor([x == c for x in cat]) for c in cats}
        res.update(strict_accuracy=float(strict.mean()), clean_fraction=sum(not e for e in gathered["extra"]) / len(cat),
                   accuracy={c: float(strict[m].mean()) for c, m in mask.items()},
                   partial={c: float(values[m].mean()) for c, m in mask.items()})
    res["reward_mean"] = float(values.mean())
    if return_images is True:
        return res, images, rep_caps, values[lo * k:hi * k]
    if return_images:  # selected samples, gathered
        mine = {i: images[i - lo * k] for i in return_images if lo * k <= i < hi * k}
        picked = _gather({"images": [mine]}, world)["images"]
        picked = {i: im for d in picked for i, im in d.items()}
        return (res, torch.stack([picked[i] for i in return_images]),
                [captions[i // k] for i in return_images], values[list(return_images)])
    return res


def _gather(local, world):
    """Concatenate each list of `local` over ranks, in rank order (all_gather_object; one process: unchanged)."""
    if world == 1:
        return local
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, local)
    return {key: [x for part in out for x in part[key]] for key in local}


def save_geneval_layout(out_dir, images, captions, specs, samples_per_prompt, start=0):
    """GenEval's layout: <out_dir>/<5-digit prompt index>/metadata.jsonl (one JSON line: prompt, tag (the
    category) and, for shapes prompts, the spec's fields; a prompts file's own JSON line as it was) and
    <index>/samples/<4-digit sample>.png at the model's resolution. `images` holds samples_per_prompt consecutive
    samples per caption; the first caption is prompt `start` (a rank's slice)."""
    from PIL import Image

    out_dir = Path(out_dir)
    for k, (caption, spec) in enumerate(zip(captions, specs)):
        d = out_dir / f"{k + start:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        if shapes.is_spec(spec):
            meta = {"prompt": caption, "tag": spec["category"], **{f: spec[f] for f in ("objects", "relation")}}
        else:
            meta = spec or {"prompt": caption, "tag": None}
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j in range(samples_per_prompt):
            img = images[k * samples_per_prompt + j].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()
            Image.fromarray(img).save(d / "samples" / f"{j:04d}.png")


def format_table(res):
    lines = [f"{'category':<15}{'strict acc':>12}{'partial':>10}"]
    for c in res.get("accuracy", {}):
        lines.append(f"{c:<15}{res['accuracy'][c]:>12.3f}{res['partial'][c]:>10.3f}")
    lines.append(f"{'overall':<15}{res.get('strict_accuracy', float('nan')):>12.3f}{res['reward_mean']:>10.3f}")
    lines.append(f"diversity {res['diversity']:.4f}   clean scenes {res.get('clean_fraction', float('nan')):.3f}   "
                 f"n = {res['n']}")
    return "\n".join(lines)


def format_rewards(res):
    """One row per named reward of --reward (mean, std over every sample); the weighted sum below when several."""
    rows = res.get("rewards", {})
    lines = [f"{'reward':<26}{'weight':>8}{'mean':>12}{'std':>12}"]
    lines += [f"{name:<26}{r['weight']:>8.3g}{r['mean']:>12.4f}{r['std']:>12.4f}" for name, r in rows.items()]
    if len(rows) > 1:
        lines.append(f"{'weighted sum':<26}{'':>8}{res['train_reward_mean']:>12.4f}")
    return "\n".join(lines)


@dataclass
class Args:
    checkpoint: str | None = None
    """a method's run directory, its lora/ or transformer/ directory (default: the base model)"""
    model: str = "embedded"
    """'embedded' or a diffusers SD3 id / local path"""
    resolution: int = 512
    """SD3 image size"""
    use_t5: bool = False
    """SD3: also load the T5 text encoder (as the run did)"""
    max_t5_length: int = 128
    mixed_precision: str | None = None
    """no | bf16 | fp16 (default: bf16 on CUDA, no on CPU): weights in this dtype, forward under autocast"""
    batch_size: int = 128
    """images generated at once"""
    decode_batch_size: int = 16
    """images the VAE decodes and a reward model scores at once"""
    reward_device: str | None = None
    """device of the reward models (default: the model's device)"""
    reward_paths: str | None = None
    """local weights of real rewards: name=path[|processor],... e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth"""
    split: str = "test"
    """train | test (shapes grammar prompts), ignored with --prompts-file"""
    prompts_file: str | None = None
    """one prompt per line, or GenEval's JSON-lines metadata ({"prompt": ..., "tag": ...} per line)"""
    samples_per_prompt: int = 4
    seed: int = 0
    guidance_scale: float = 1.0
    num_steps: int = 10
    reward: str | None = None
    """also score with these rewards, e.g. shapes,jpeg_compressibility (a row each; needed for prompts outside the
    shapes grammar, where the weighted sum is reward_mean)"""
    json: str | None = None
    """write the metrics here"""
    grid: str | None = None
    """save a PNG grid of samples with prompts and scores here"""
    save_images: str | None = None
    """write every sample in GenEval's layout: DIR/<5-digit prompt>/metadata.jsonl and samples/<4-digit>.png"""
    device: str = "auto"


def main(args: Args):
    from common import models, rewards, utils

    if args.split not in ("train", "test"):
        utils.fail(f"unknown --split {args.split!r}; choose from: train, test")
    if args.mixed_precision not in (None, "no", "bf16", "fp16"):
        utils.fail(f"unknown --mixed-precision {args.mixed_precision!r}; choose from: no, bf16, fp16")
    for name in ("samples_per_prompt", "num_steps", "batch_size", "decode_batch_size"):
        if getattr(args, name) < 1:
            utils.fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.guidance_scale < 1:
        utils.fail(f"--guidance-scale {args.guidance_scale} must be >= 1")
    if args.reward:
        try:
            rewards.parse_reward_spec(args.reward)
            rewards.parse_reward_paths(args.reward_paths, args.reward)
        except ValueError as e:
            utils.fail(str(e))
    if args.checkpoint and not os.path.exists(args.checkpoint):
        utils.fail(f"--checkpoint {args.checkpoint!r} does not exist")
    captions, specs = utils.load_prompts(args.prompts_file, args.model, args.split)
    if not all(shapes.is_spec(s) for s in specs) and not args.reward:
        utils.fail("prompts outside the shapes grammar need --reward (e.g. --reward pickscore)")
    rank, world, device = utils.setup_distributed(args.device)  # torchrun: each rank evaluates a slice
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size)
    transformer = models.load_finetuned(model, args.checkpoint) if args.checkpoint else model.transformer
    reward_fn = rewards.build_reward(args.reward, args.reward_device or device, dtype=model.dtype,
                                     batch_size=args.decode_batch_size, paths=args.reward_paths) if args.reward else None
    res, images, caps, values = evaluate_model(model, transformer, specs, args.samples_per_prompt, args.seed,
                                               args.guidance_scale, args.num_steps, reward_fn, captions, True,
                                               args.batch_size, rank, world)
    if args.save_images:  # every rank writes its own prompts
        lo = min(rank * -(-len(captions) // world), len(captions))
        hi = lo + len(caps) // args.samples_per_prompt
        save_geneval_layout(args.save_images, images, captions[lo:hi], specs[lo:hi], args.samples_per_prompt, lo)
    if rank == 0:
        print(f"{args.checkpoint or args.model}: {len(captions)} prompts x {args.samples_per_prompt} samples"
              f"{f' on {world} processes' if world > 1 else ''}")
        print(format_table(res))
        if args.reward:
            print(format_rewards(res))
        if args.save_images:
            print(f"wrote {res['n']} samples of {len(captions)} prompts to {args.save_images}")
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.grid and rank == 0:
        from PIL import Image

        Image.fromarray(utils.image_grid(images[:64], caps[:64], values[:64])).save(args.grid)
    utils.cleanup_distributed()


if __name__ == "__main__":
    main(tyro.cli(Args))
