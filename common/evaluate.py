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
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common import rewards, shapes
from common.sampling import sample


def eval_noise(shape, seed, total, offset, n, chunk=256):
    """Samples offset..offset+n of `total` standard normal latents drawn at once from `seed` (the noise one process
    gives them, however many processes share the evaluation), without holding all `total`: drawn in chunks of whole
    samples up to the last one needed, which gives the same numbers as one draw when a sample has a multiple of 16
    elements (torch's CPU sampler fills blocks of 16 values; other shapes: one draw)."""
    gen = torch.Generator().manual_seed(seed)
    if math.prod(shape) % 16:
        return torch.randn(total, *shape, generator=gen)[offset:offset + n].clone()
    parts = []
    for start in range(0, offset + n, chunk):
        x = torch.randn(min(chunk, total - start), *shape, generator=gen)
        if start + len(x) > offset:
            parts.append(x[max(0, offset - start):offset + n - start])
    return torch.cat(parts)


@torch.no_grad()
def generate_batches(model, transformer, captions, seed=0, guidance_scale=1.0, num_steps=10, batch_size=128, offset=0,
                     total=None):
    """CFG-optional Euler ODE samples for a list of captions, noise fixed by `seed` (same noise for every
    model, so base and fine-tuned are compared on paired noise), `batch_size` at a time. The captions are samples
    offset..offset+N of a list of `total` (default N): a rank's slice gets the noise one process would give it.
    Yields images (B, 3, H, W) in [0, 1] on the CPU."""
    noise = eval_noise(model.latent_shape, seed, total or len(captions), offset, len(captions))
    sigmas = model.sigmas(num_steps)
    neg = model.encode_prompt([""]) if guidance_scale > 1 else (None, None)
    for i in range(0, len(captions), batch_size):
        pe, pooled = model.encode_prompt(captions[i:i + batch_size])
        n = pe.shape[0]
        negs = (neg[0].expand(n, -1, -1), neg[1].expand(n, -1)) if guidance_scale > 1 else (None, None)
        out = sample(transformer, pe, pooled, sigmas, noise[i:i + n].to(model.device, model.dtype),
                     guidance_scale, *negs)
        yield model.decode(out["latents"]).cpu()


def generate(model, transformer, captions, seed=0, guidance_scale=1.0, num_steps=10, batch_size=128, offset=0,
             total=None):
    """All of `generate_batches` at once: images (N, 3, H, W) in [0, 1]."""
    return torch.cat(list(generate_batches(model, transformer, captions, seed, guidance_scale, num_steps, batch_size,
                                           offset, total)))


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
    process); a list of global sample indices -> those samples only, gathered on every rank (for sample grids).
    Images are returned as uint8 (N, 3, H, W); every score is taken on the float images."""
    captions = captions or [s["caption"] for s in specs]
    k, n_prompts = samples_per_prompt, len(captions)
    per = -(-n_prompts // world)
    lo, hi = min(rank * per, n_prompts), min((rank + 1) * per, n_prompts)  # this rank's prompts
    rep = [i for i in range(lo, hi) for _ in range(k)]
    rep_caps, rep_specs = [captions[i] for i in rep], [specs[i] for i in rep]
    local = dict(div=[], values=[], train=[], strict=[], extra=[], cat=[])
    weights = getattr(reward_fn, "weights", {})  # a RewardFn's named rewards: {name: weight}
    local.update({f"reward/{name}": [] for name in weights})
    images = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    if rep:  # scored batch by batch; kept as uint8 (4x less host memory than fp32 for a large held-out set)
        by_spec = all(shapes.is_spec(s) for s in rep_specs)
        if not by_spec and reward_fn is None:
            raise ValueError("prompts without a shapes spec need a reward_fn to be evaluated")
        was_training = transformer.training
        transformer.eval()
        kept, carry, train = [], torch.zeros(0), []
        for batch in generate_batches(model, transformer, rep_caps, seed, guidance_scale, num_steps, batch_size,
                                      lo * k, n_prompts * k):
            i = sum(len(b) for b in kept)
            caps, specs_ = rep_caps[i:i + len(batch)], rep_specs[i:i + len(batch)]
            if reward_fn is not None:
                total, parts = reward_fn(batch, caps, specs_)
                train += total.tolist()
                for name in weights:
                    local[f"reward/{name}"] += parts[name].tolist()
            if by_spec:
                values, strict, checks = shapes.score(batch, specs_)
                local["values"] += values.tolist()
                local["strict"] += strict.float().tolist()
                local["extra"] += [c["extra"] for c in checks]
                local["cat"] += [s["category"] for s in specs_]
            carry = torch.cat([carry, batch])  # diversity: the k float samples of each prompt
            whole = len(carry) // k * k
            local["div"] += [diversity(carry, [list(range(j, j + k))]) for j in range(0, whole, k)] if k > 1 else []
            carry = carry[whole:]
            kept.append(rewards.uint8_images(batch))
        transformer.train(was_training)
        images = torch.cat(kept)
        local["train"] = train
        local["values"] = local["values"] if by_spec else train
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
        for j, img in enumerate(rewards.to_uint8(images[k * samples_per_prompt:(k + 1) * samples_per_prompt])):
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
    """no | bf16 | fp16 (default: bf16 on CUDA GPUs with native bf16, else no): weights in this dtype, forward under
    autocast"""
    batch_size: int = 128
    """images generated at once"""
    decode_batch_size: int = 16
    """images the VAE decodes and a reward model scores at once"""
    reward_device: str | None = None
    """device of the reward models (default: the model's device)"""
    reward_dtype: str = "fp32"
    """fp32 | bf16 | fp16: dtype of the reward models (fp32 as the official Flow-GRPO code scores)"""
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
    """auto (cuda if available, else cpu), cpu or cuda:N"""


def check_args(a):
    """Every flag, before any model loads (one line and exit 2 on a bad one). Returns (captions, specs)."""
    from common import models, utils

    if a.split not in ("train", "test"):
        utils.fail(f"unknown --split {a.split!r}; choose from: train, test")
    if a.mixed_precision not in (None, *models.PRECISIONS):  # fp16 too: evaluation takes no gradients
        utils.fail(f"unknown --mixed-precision {a.mixed_precision!r}; choose from: {', '.join(models.PRECISIONS)}")
    for name in ("samples_per_prompt", "num_steps", "batch_size", "decode_batch_size"):
        if getattr(a, name) < 1:
            utils.fail(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    utils.check_shared(a)
    if a.reward:
        try:
            rewards.parse_reward_spec(a.reward)
            rewards.parse_reward_paths(a.reward_paths, a.reward)
        except ValueError as e:
            utils.fail(str(e))
        utils.check_reward_servers(a.reward)
    if a.checkpoint and not os.path.exists(a.checkpoint):
        utils.fail(f"--checkpoint {a.checkpoint!r} does not exist")
    if a.checkpoint and models.finetuned_weights(a.checkpoint) is None:
        utils.fail(f"--checkpoint {a.checkpoint!r} holds no LoRA (pytorch_lora_weights.safetensors) and no "
                   "transformer/ weights; pass a run directory, its lora/ or its transformer/ directory")
    for flag, path in (("--json", a.json), ("--grid", a.grid)):
        if path and os.path.isdir(path):
            utils.fail(f"{flag} {path!r} is a directory; give a file name")
        if path:
            utils.check_writable_dir(flag, Path(path).absolute().parent)
    if a.save_images:
        utils.check_writable_dir("--save-images", a.save_images)
    try:
        models.check_model_available(a.model)
    except SystemExit as e:
        utils.fail(str(e).removeprefix("error: "))
    captions, specs = utils.load_prompts(a.prompts_file, a.model, a.split)
    if not all(shapes.is_spec(s) for s in specs) and not a.reward:
        utils.fail("prompts outside the shapes grammar need --reward (e.g. --reward pickscore)")
    return captions, specs


def main(args: Args):
    from common import models, utils

    captions, specs = check_args(args)
    rank, world, device = utils.setup_distributed(args.device)  # torchrun: each rank evaluates a slice
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size)
    transformer = models.load_finetuned(model, args.checkpoint) if args.checkpoint else model.transformer
    reward_fn = None if not args.reward else rewards.build_reward(
        args.reward, args.reward_device or device, args.reward_paths, rewards.DTYPES[args.reward_dtype],
        args.decode_batch_size)
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
    from common import utils

    main(utils.parse_args(Args))
