"""How much of a reward's variance is the prompt's, and how much the noise's? The ceiling on what a critic that
knows only the prompt can explain, and the floor of what it must learn from the image.

Draws --samples-per-prompt base-model images (CFG-free 10-step Euler, as the rollouts of the method files) for every
train prompt of the embedded world, scores them, and prints: the between-prompt share of the reward variance (the
variance of the per-prompt means, corrected for their sampling noise, over the total), the share of the prompt's
category (counting, position, ...), and the out-of-sample explained variance of a per-prompt mean estimated from
k images when it predicts the other half of each prompt's images (what a tabular per-prompt baseline achieves).

    python benchmark/reward_variance.py --threads 1                          # shapes partial credit, ~1 min
    python benchmark/reward_variance.py --threads 1 --reward jpeg_compressibility
"""

import collections
from dataclasses import dataclass

import torch
import tyro

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import models, rewards, sampling, utils  # noqa: E402
from common import reward_models, world  # noqa: E402,F401 (they register the real rewards and the embedded world)


@dataclass
class Args:
    reward: str = "shapes"
    """an embedded reward (shapes, shapes_strict, jpeg_compressibility, ...)"""
    samples_per_prompt: int = 16
    num_steps: int = 10
    seed: int = 0
    threads: int = 1


def main(a):
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded", "cpu")
    prompts, meta = utils.load_prompts(None)
    reward_fn = rewards.build_reward(a.reward, "cpu")
    sigmas = model.sigmas(a.num_steps)
    prompt_embeds, pooled = model.encode_prompt(prompts)
    r = []
    for rep in range(a.samples_per_prompt):
        noise = torch.randn(len(prompts), *model.latent_shape, generator=torch.Generator().manual_seed(a.seed + rep))
        with torch.no_grad():
            latents = sampling.sample(model.transformer, prompt_embeds, pooled, sigmas, noise)["latents"]
        r.append(reward_fn(model.decode(latents), prompts, meta)[0].float())
    r = torch.stack(r, 1)  # (prompts, samples)
    n = a.samples_per_prompt
    total = r.flatten().var()
    within = r.var(1).mean()
    between = r.mean(1).var() - within / n  # variance of the true per-prompt means (sampling noise removed)
    by_cat = collections.defaultdict(list)
    for i, m in enumerate(meta):
        by_cat[m["category"]].append(i)
    cat_mean = torch.empty(len(prompts))
    for idx in by_cat.values():
        cat_mean[idx] = r[idx].mean()
    print(f"reward {a.reward}: {len(prompts)} prompts x {n} images, mean {r.mean():.4f}, std {total.sqrt():.4f}")
    print(f"between-prompt share of the variance {between / total:.3f}; category share "
          f"{((cat_mean[:, None] - r.mean()) ** 2).mean() / total:.3f}")
    held = r[:, n // 2:]
    for k in (2, 4, 8):
        if k <= n // 2:
            est = r[:, :k].mean(1, keepdim=True)
            ev = 1 - ((held - est) ** 2).mean() / ((held - held.mean()) ** 2).mean()
            print(f"per-prompt mean of {k} images -> explained variance on unseen images of the prompt {ev:+.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
