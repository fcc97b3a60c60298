"""Rewards: one interface, a registry, weighted combinations from the command line.

A reward is a callable `(images, prompts, metadata) -> torch.Tensor (N,)` where images are float
(N, 3, H, W) in [0, 1] on any device, prompts a list of str, metadata a list of dicts (for the embedded
world: the prompt's shapes spec) or None.

    reward_fn = build_reward("shapes=1.0,jpeg_compressibility=0.1", device)
    rewards, parts = reward_fn(images, prompts, metadata)      # parts: {name: (N,)} for logging

Embedded (no weights): shapes, shapes_strict, jpeg_compressibility (DDPO's scale), jpeg_compressibility_flowgrpo
(Flow-GRPO's), jpeg_incompressibility. Real (REAL_REWARDS: classes in common/reward_models/, imported when a reward is
built; a hub id in the local cache by default, or local weights via --reward-paths name=path[|processor],...); each
class's docstring says whose scale it is, and a rescaled variant loads the weights of the reward it rescales
(SAME_WEIGHTS). `remote:<url>`: a Flow-GRPO reward server (GenEval, DeQA, UnifiedReward) over HTTP, options in the
URL's query, e.g. `remote:http://127.0.0.1:18085?retries=5&timeout=60` (`reward_models.remote.remote_server`).
"""

import importlib
import io
import os

import numpy as np
import torch
from PIL import Image

from common.world import shapes


def uint8_images(images):
    """(N, 3, H, W) floats in [0, 1] -> uint8 (N, 3, H, W), rounded; uint8 images as they are."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(images):
    """(N, 3, H, W) in [0, 1] (or uint8) -> a uint8 (N, H, W, 3) numpy array."""
    return uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()


def _specs(prompts, metadata):
    metadata = metadata or [None] * len(prompts)
    return [m if shapes.is_spec(m) else shapes.parse_caption(p) for p, m in zip(prompts, metadata)]


def shapes_partial(images, prompts, metadata=None):
    """Mini-GenEval partial credit in [0, 1] (common/world/shapes.py `score`)."""
    return shapes.score(images, _specs(prompts, metadata))[0]


def shapes_strict(images, prompts, metadata=None):
    """Mini-GenEval strict pass/fail as 0/1."""
    return shapes.score(images, _specs(prompts, metadata))[1].float()


def jpeg_size_kb(images, quality=95):
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


def jpeg_compressibility(images, prompts=None, metadata=None):
    """-(JPEG size in kB at quality 95): DDPO's scale (kvablack/ddpo-pytorch rewards.py `jpeg_compressibility`).
    Flow-GRPO's `jpeg_compressibility` divides this by 500: `jpeg_compressibility_flowgrpo`."""
    return -jpeg_size_kb(images)


def jpeg_compressibility_flowgrpo(images, prompts=None, metadata=None):
    """-(JPEG size in kB at quality 95) / 500: Flow-GRPO's scale (yifan123/flow_grpo rewards.py
    `jpeg_compressibility`)."""
    return -jpeg_size_kb(images) / 500


def jpeg_incompressibility(images, prompts=None, metadata=None):
    """+(JPEG size in kB at quality 95): DDPO's and Flow-GRPO's `jpeg_incompressibility` (the same scale in both)."""
    return jpeg_size_kb(images)


EMBEDDED_REWARDS = {"shapes": shapes_partial, "shapes_strict": shapes_strict,
                    "jpeg_compressibility": jpeg_compressibility,
                    "jpeg_compressibility_flowgrpo": jpeg_compressibility_flowgrpo,
                    "jpeg_incompressibility": jpeg_incompressibility}
# name -> "module.Class" in common/reward_models/, imported by `real_reward` when the reward is built
REAL_REWARDS = {"pickscore": "clip.PickScore", "pickscore_flowgrpo": "clip.PickScoreFlowGRPO",
                "clipscore": "clip.CLIPScore", "clipscore_cosine": "clip.CLIPScore",
                "clipscore_torchmetrics": "clip.CLIPScoreTorchmetrics", "clipscore_hessel": "clip.CLIPScoreHessel",
                "hpsv2": "clip.HPSv2", "imagereward": "imagereward.ImageReward", "aesthetic": "clip.Aesthetic",
                "ocr": "ocr.OCR", "vlm": "vlm.VLMYesNo"}
# a rescaled variant -> the reward whose model it runs: the same default weights, and that reward's --reward-paths
# entry when the variant has none of its own
SAME_WEIGHTS = {"pickscore_flowgrpo": "pickscore", "clipscore_cosine": "clipscore",
                "clipscore_torchmetrics": "clipscore", "clipscore_hessel": "clipscore"}
REWARDS = sorted([*EMBEDDED_REWARDS, *REAL_REWARDS])
CHOICES = ", ".join([*REWARDS, "remote:<url>"])
AESTHETIC_HINT = ("--reward-paths aesthetic=sac+logos+ava1-l14-linearMSE.pth "
                  "(christophschuhmann/improved-aesthetic-predictor)")


def _name_and_weight(part):
    """'name=w' -> (name, w). A reward server URL keeps its query options; its weight follows the last option's
    value: 'remote:http://h:18085?retries=5&timeout=60=0.5' -> ('remote:http://h:18085?retries=5&timeout=60', '0.5')."""
    if not (part.startswith("remote:") and "?" in part):
        name, _, w = part.partition("=")
        return name.strip(), w
    head, _, query = part.partition("?")
    *options, last = query.split("&")
    key, eq, rest = last.partition("=")
    value, _, w = rest.partition("=")
    return "?".join([head, "&".join([*options, key + eq + value])]).strip(), w


def parse_reward_spec(spec):
    """'shapes=1.0,jpeg_compressibility=0.1' (or 'shapes') -> {'shapes': 1.0, ...}. Raises ValueError with one line."""
    weights = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, w = _name_and_weight(part)
        if name.startswith("remote:"):
            from common.reward_models.remote import remote_server

            remote_server(name)
        elif name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from: {CHOICES}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"malformed reward weight {w!r} for {name!r} in --reward {spec!r}; "
                             "use name=float pairs, e.g. shapes=1.0,jpeg_compressibility=0.1") from None
        if not np.isfinite(weights[name]):
            raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
    if not weights:
        raise ValueError(f"empty --reward {spec!r}; choose from: {CHOICES}")
    return weights


def parse_reward_paths(text, spec=None):
    """--reward-paths 'aesthetic=head.pth,hpsv2=/ckpt/HPS_v2.1_compressed.pt,pickscore=MODEL|PROCESSOR' -> {name: path}.
    Checks the names, that a local-looking path (/, ., ~ or a .pt/.pth/.bin/.safetensors file) exists, and, given the
    --reward `spec`, that a reward without a default (aesthetic) has its path. Raises ValueError with one line."""
    paths = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, eq, path = (x.strip() for x in part.partition("="))
        if name not in REAL_REWARDS:
            raise ValueError(f"unknown reward {name!r} in --reward-paths {text!r}; "
                             f"choose from: {', '.join(REAL_REWARDS)}")
        if not path:
            raise ValueError(f"--reward-paths {text!r} gives no path for {name!r}; use name=path pairs, e.g. "
                             "aesthetic=sac+logos+ava1-l14-linearMSE.pth")
        for p in path.split("|"):
            if (p.startswith(("/", ".", "~")) or p.endswith((".pt", ".pth", ".bin", ".safetensors"))) \
                    and not os.path.exists(os.path.expanduser(p)):
                raise ValueError(f"--reward-paths {name}={path}: {p!r} does not exist")
        paths[name] = os.path.expanduser(path)
    if spec and "aesthetic" in parse_reward_spec(spec) and "aesthetic" not in paths:
        raise ValueError(f"reward 'aesthetic' needs its MLP head: {AESTHETIC_HINT}")
    return paths


# --reward-dtype: the official Flow-GRPO code scores PickScore, ImageReward and the aesthetic predictor in fp32 (in
# bf16, PickScore's logit scale exp(ln 100) is 99.0: scores ~1 % low); bf16 / fp16 save memory (e.g. the 7B VLM)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def real_reward(name):
    """The class of real reward `name` ("remote": the reward server client), imported from common/reward_models/."""
    module, _, cls = ("remote.RemoteReward" if name == "remote" else REAL_REWARDS[name]).partition(".")
    return getattr(importlib.import_module(f"common.reward_models.{module}"), cls)


class RewardFn:
    """Weighted sum of registered rewards. Real reward models load on first construction, in `dtype` (the scripts:
    --reward-dtype, fp32 by default) on `device` (--reward-device, e.g. another GPU), scoring
    `batch_size` images at a time (default: each model's own). `paths` maps a real reward name to a model path (or
    'model_path|processor_path'), as a dict or as --reward-paths text; `remote:<url>` rewards need none."""

    def __init__(self, spec, device="cpu", paths=None, dtype=torch.float32, batch_size=None):
        self.weights = parse_reward_spec(spec)
        paths = parse_reward_paths(paths) if isinstance(paths, str) or paths is None else paths
        self.fns = {}
        for name in self.weights:
            kw = {"batch_size": batch_size} if batch_size else {}
            m, _, p = paths.get(name, paths.get(SAME_WEIGHTS.get(name), "")).partition("|")
            try:
                if name in EMBEDDED_REWARDS:
                    self.fns[name] = EMBEDDED_REWARDS[name]
                elif name.startswith("remote:"):
                    from common.reward_models.remote import remote_server

                    url, options = remote_server(name)
                    self.fns[name] = real_reward("remote")(url, **options, **kw)
                else:
                    self.fns[name] = real_reward(name)(device, m or None, p or None, dtype=dtype, **kw)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]  # the rest is in the chained traceback
                raise RuntimeError(f"reward {name!r} could not be set up: {type(e).__name__}: {first}") from e

    def __call__(self, images, prompts, metadata=None):
        parts = {}
        for name, fn in self.fns.items():
            try:
                parts[name] = fn(images, prompts, metadata).float().cpu()
            except Exception as e:
                raise RuntimeError(f"reward {name!r} failed on prompts {list(prompts)[:4]}"
                                   f"{'...' if len(prompts) > 4 else ''}: {type(e).__name__}: {e}") from e
        total = sum(self.weights[n] * r for n, r in parts.items())
        # an image with NaN/inf pixels (a diverged model) has no reward: NaN, so the scripts' non-finite guard
        # sees it instead of a reward computed from whatever the NaNs were cast to
        broken = ~torch.isfinite(images.float().flatten(1)).all(1).cpu()
        return total.masked_fill(broken, float("nan")), parts


build_reward = RewardFn  # build_reward(spec, device, paths, dtype, batch_size)
