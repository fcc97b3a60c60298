"""Held-out evaluation: `evaluate_model` generates samples on fixed noise and scores them (the mini-GenEval scorer
for shapes prompts, a reward function for any other); the method scripts call it every --eval-every iterations and at
the end. The command line around it: `python -m common.tools.evaluate` (common/tools/evaluate.py).
"""

import math

import torch

from common import rewards
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
    """Generate `samples_per_prompt` samples per prompt. Shapes specs are scored with the scene scorer
    (rewards.SCORER, the mini-GenEval one; reward_mean = partial credit); prompts without a spec (None or other
    metadata) need `reward_fn`, whose mean is then `reward_mean`. With both, the training reward is reported as
    `train_reward_mean` as well. Shapes specs also give strict accuracy and partial credit (overall, per category),
    `clean_fraction` (images with no extra object) and `texture` (the mean fraction of speckled pixels, the scorer's
    `texture`). A weighted reward (common.rewards.RewardFn) also reports each of its rewards: `rewards` = {name:
    {weight, mean, std}}.

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
    local = dict(div=[], values=[], train=[], strict=[], extra=[], texture=[], cat=[])
    weights = getattr(reward_fn, "weights", {})  # a RewardFn's named rewards: {name: weight}
    local.update({f"reward/{name}": [] for name in weights})
    images = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    if rep:  # scored batch by batch; kept as uint8 (4x less host memory than fp32 for a large held-out set)
        scorer = rewards.SCORER
        by_spec = scorer is not None and all(scorer.is_spec(s) for s in rep_specs)
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
                values, strict, checks = scorer.score(batch, specs_)
                local["values"] += values.tolist()
                local["strict"] += strict.float().tolist()
                local["extra"] += [c["extra"] for c in checks]
                local["texture"] += scorer.texture(batch).tolist()
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
        cats = [c for c in rewards.SCORER.CATEGORIES if c in cat]
        mask = {c: torch.tensor([x == c for x in cat]) for c in cats}
        res.update(strict_accuracy=float(strict.mean()), clean_fraction=sum(not e for e in gathered["extra"]) / len(cat),
                   texture=float(torch.tensor(gathered["texture"]).mean()),
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
