"""Rewards: one interface, a registry, weighted combinations from the command line.

A reward is a callable `(images, prompts, metadata) -> torch.Tensor (N,)` where images are float
(N, 3, H, W) in [0, 1] on any device, prompts a list of str, metadata a list of dicts (for the embedded
world: the prompt's shapes spec) or None.

    reward_fn = build_reward("shapes=1.0,jpeg_compressibility=0.1", device)
    rewards, parts = reward_fn(images, prompts, metadata)      # parts: {name: (N,)} for logging

The core's own rewards are the JPEG sizes: jpeg_compressibility (DDPO's scale), jpeg_compressibility_flowgrpo
(Flow-GRPO's), jpeg_incompressibility. The others are registered (`register`) by the packages that hold them, when
imported (the method scripts import them): common/world the mini-GenEval scorer (shapes, shapes_strict, and
SCORER, the scene scorer); common/reward_models the real reward models (imported when a reward is built; a hub id
in the local cache by default, or local weights via --reward-paths name=path[|processor],...) and `remote:<url>`,
a Flow-GRPO reward server over HTTP, options in the URL's query, e.g.
`remote:http://127.0.0.1:18085?retries=5&timeout=60`.
"""

import io
import os

import numpy as np
import torch
from PIL import Image

# name -> build(device, model_path, processor_path, dtype, **kw) -> a reward callable
REWARDS = {}
WEIGHTED = {}  # a reward that loads model weights (the names --reward-paths takes) -> the reward whose weights
NEEDS_PATH = {}  # a reward whose weights have no default -> the --reward-paths entry it needs
SCHEMES = {}  # a URL prefix ("remote:") -> namespace(parse(name) -> ValueError, check(name) -> ConnectionError, build)
# the scene scorer (common/world/shapes.py: is_spec, parse_caption, split_specs, score, texture, CATEGORIES): the
# default prompts, the metadata a prompt parses to, and what evaluation's strict accuracy is
SCORER = None


def register(name, reward=None, build=None, weights_of=None, needs_path=None):
    """Add reward `name`: a callable `reward` (no weights, no options), or `build` (the signature above);
    `weights_of`: it loads model weights - its own name, or the reward whose weights and --reward-paths entry a
    rescaled variant shares (e.g. pickscore_flowgrpo -> pickscore); `needs_path`: the --reward-paths entry it
    cannot run without (weights with no default)."""
    REWARDS[name] = build or (lambda *args, **kw: reward)
    if weights_of:
        WEIGHTED[name] = weights_of
    if needs_path:
        NEEDS_PATH[name] = needs_path


def choices():
    return ", ".join([*sorted(REWARDS), *(f"{prefix}<url>" for prefix in SCHEMES)])


def uint8_images(images):
    """(N, 3, H, W) floats in [0, 1] -> uint8 (N, 3, H, W), rounded; uint8 images as they are."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(images):
    """(N, 3, H, W) in [0, 1] (or uint8) -> a uint8 (N, H, W, 3) numpy array."""
    return uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()


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


for _name, _fn in (("jpeg_compressibility", jpeg_compressibility),
                  ("jpeg_compressibility_flowgrpo", jpeg_compressibility_flowgrpo),
                  ("jpeg_incompressibility", jpeg_incompressibility)):
    register(_name, _fn)


def _name_and_weight(part):
    """'name=w' -> (name, w). A reward server URL keeps its query options; its weight follows the last option's
    value: 'remote:http://h:18085?retries=5&timeout=60=0.5' -> ('remote:http://h:18085?retries=5&timeout=60', '0.5')."""
    if not (part.startswith(tuple(SCHEMES)) and "?" in part):
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
        scheme = next((v for k, v in SCHEMES.items() if name.startswith(k)), None)
        if scheme:
            scheme.parse(name)
        elif name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from: {choices()}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"malformed reward weight {w!r} for {name!r} in --reward {spec!r}; "
                             "use name=float pairs, e.g. shapes=1.0,jpeg_compressibility=0.1") from None
        if not np.isfinite(weights[name]):
            raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
    if not weights:
        raise ValueError(f"empty --reward {spec!r}; choose from: {choices()}")
    return weights


def parse_reward_paths(text, spec=None):
    """--reward-paths 'aesthetic=head.pth,hpsv2=/ckpt/HPS_v2.1_compressed.pt,pickscore=MODEL|PROCESSOR' -> {name: path}.
    Checks the names, that a local-looking path (/, ., ~ or a .pt/.pth/.bin/.safetensors file) exists, and, given the
    --reward `spec`, that a reward without a default (aesthetic) has its path. Raises ValueError with one line."""
    paths = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, eq, path = (x.strip() for x in part.partition("="))
        if name not in WEIGHTED:
            raise ValueError(f"unknown reward {name!r} in --reward-paths {text!r}; "
                             f"choose from: {', '.join(WEIGHTED)}")
        if not path:
            raise ValueError(f"--reward-paths {text!r} gives no path for {name!r}; use name=path pairs, e.g. "
                             "aesthetic=sac+logos+ava1-l14-linearMSE.pth")
        for p in path.split("|"):
            if (p.startswith(("/", ".", "~")) or p.endswith((".pt", ".pth", ".bin", ".safetensors"))) \
                    and not os.path.exists(os.path.expanduser(p)):
                raise ValueError(f"--reward-paths {name}={path}: {p!r} does not exist")
        paths[name] = os.path.expanduser(path)
    for name in parse_reward_spec(spec) if spec else []:
        if name in NEEDS_PATH and name not in paths:
            raise ValueError(f"reward {name!r} needs {NEEDS_PATH[name]}")
    return paths


# --reward-dtype: the official Flow-GRPO code scores PickScore, ImageReward and the aesthetic predictor in fp32 (in
# bf16, PickScore's logit scale exp(ln 100) is 99.0: scores ~1 % low); bf16 / fp16 save memory (e.g. the 7B VLM)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
            m, _, p = paths.get(name, paths.get(WEIGHTED.get(name), "")).partition("|")
            scheme = next((v for k, v in SCHEMES.items() if name.startswith(k)), None)
            try:
                if scheme:
                    self.fns[name] = scheme.build(name, **kw)
                else:
                    self.fns[name] = REWARDS[name](device, m or None, p or None, dtype=dtype, **kw)
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
