"""Rewards: one interface, a registry, weighted combinations from the command line.

A reward is a callable `(images, prompts, metadata) -> torch.Tensor (N,)` where images are float
(N, 3, H, W) in [0, 1] on any device, prompts a list of str, metadata a list of dicts (for the embedded
world: the prompt's shapes spec) or None.

    reward_fn = build_reward("shapes=1.0,jpeg_compressibility=0.1", device)
    rewards, parts = reward_fn(images, prompts, metadata)      # parts: {name: (N,)} for logging

Embedded (no weights): shapes, shapes_strict, jpeg_compressibility, jpeg_incompressibility.
Real (transformers; a hub id in the local cache by default, or a local path via `paths`, see RewardFn):
pickscore, clipscore, vlm. An aesthetic predictor is not included: it needs bespoke MLP weight files.
"""

import io

import numpy as np
import torch
from PIL import Image

from common import shapes

REAL_DEFAULT_PATHS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),  # (model, processor)
    "clipscore": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "vlm": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
}


def to_uint8(images):
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _specs(prompts, metadata):
    metadata = metadata or [None] * len(prompts)
    return [m if shapes.is_spec(m) else shapes.parse_caption(p) for p, m in zip(prompts, metadata)]


def shapes_partial(images, prompts, metadata=None):
    """Mini-GenEval partial credit in [0, 1] (common/shapes.py `score`)."""
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
    """-(JPEG size in kB at quality 95), as in DDPO / Flow-GRPO's compression task."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images, prompts=None, metadata=None):
    return jpeg_size_kb(images)


class PickScore:
    """PickScore (Kirstain et al. 2023): logit_scale * cos(image, text) of a CLIP-H model fine-tuned on Pick-a-Pic."""

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoModel, AutoProcessor

        model_path, processor_path = model_path or REAL_DEFAULT_PATHS["pickscore"][0], processor_path or REAL_DEFAULT_PATHS["pickscore"][1]
        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.model = AutoModel.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False).to(device)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        for i in range(0, len(prompts), self.batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + self.batch_size])), return_tensors="pt")
            txt = self.processor(text=prompts[i:i + self.batch_size], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
            img_emb = self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device, self.model.dtype))
            txt_emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in txt.items()})
            img_emb, txt_emb = _features(img_emb), _features(txt_emb)
            cos = torch.nn.functional.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
            out.append(self.model.logit_scale.exp().float() * cos)
        return torch.cat(out).cpu()


def _features(x):
    return x if torch.is_tensor(x) else x.pooler_output


class CLIPScore(PickScore):
    """Cosine similarity of CLIP image and text embeddings (ViT-L/14 by default), in [-1, 1]."""

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        super().__init__(device, model_path or REAL_DEFAULT_PATHS["clipscore"][0],
                         processor_path or REAL_DEFAULT_PATHS["clipscore"][1], batch_size, dtype)

    def __call__(self, images, prompts, metadata=None):
        return super().__call__(images, prompts, metadata) / self.model.logit_scale.exp().float().cpu()


class VLMYesNo:
    """A VLM asked whether the image matches the prompt, as FDFO does (spec fdfo.md 6.1): Qwen2.5-VL chat template
    with a system turn, the image bilinearly resized to 504x504, one forward pass, and
    reward = 100 * sigmoid(logit["Yes"] - logit["No"]) at the last position, in [0, 100]. Works with any
    AutoModelForImageTextToText whose processor has a chat template and whose tokenizer has "Yes"/"No" tokens.
    (transformers' Qwen2.5-VL processor needs torchvision for its video processor.)"""

    system = "You are a helpful assistant."
    question = 'Does this image match the caption "{prompt}"? Answer Yes or No.'
    answers = ("Yes", "No")

    def __init__(self, device, model_path=None, processor_path=None, batch_size=8, dtype=torch.float32, image_size=504):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_path = model_path or REAL_DEFAULT_PATHS["vlm"][0]
        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.processor.tokenizer.padding_side = "left"  # the next-token logits sit at the last position
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False).to(device)
        ids = [self.processor.tokenizer.encode(w, add_special_tokens=False) for w in self.answers]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the tokenizer of VLM {model_path} splits the answers {self.answers} into {ids}; "
                             "need one token each")
        self.yes, self.no = ids[0][0], ids[1][0]
        self.device, self.batch_size, self.image_size = device, batch_size, image_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        if self.image_size:
            images = torch.nn.functional.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear")
        for i in range(0, len(prompts), self.batch_size):
            imgs = [Image.fromarray(a) for a in to_uint8(images[i:i + self.batch_size])]
            msgs = [[{"role": "system", "content": [{"type": "text", "text": self.system}]},
                     {"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": self.question.format(prompt=p)}]}]
                    for p in prompts[i:i + self.batch_size]]
            text = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
            inputs = self.processor(text=text, images=imgs, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts only the floating tensors (pixels)
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # vocab logits of the answer token
            out.append(100 * torch.sigmoid(logits[:, self.yes] - logits[:, self.no]))
        return torch.cat(out).cpu()


EMBEDDED_REWARDS = {"shapes": shapes_partial, "shapes_strict": shapes_strict,
                    "jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility}
REAL_REWARDS = {"pickscore": PickScore, "clipscore": CLIPScore, "vlm": VLMYesNo}
REWARDS = sorted([*EMBEDDED_REWARDS, *REAL_REWARDS])


def parse_reward_spec(spec):
    """'shapes=1.0,jpeg_compressibility=0.1' (or 'shapes') -> {'shapes': 1.0, ...}. Raises ValueError with one line."""
    weights = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from: {', '.join(REWARDS)}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"malformed reward weight {w!r} for {name!r} in --reward {spec!r}; "
                             "use name=float pairs, e.g. shapes=1.0,jpeg_compressibility=0.1") from None
        if not np.isfinite(weights[name]):
            raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
    if not weights:
        raise ValueError(f"empty --reward {spec!r}; choose from: {', '.join(REWARDS)}")
    return weights


class RewardFn:
    """Weighted sum of registered rewards. Real reward models load on first construction, in `dtype` (the scripts:
    the --mixed-precision dtype, bf16 on CUDA by default) on `device` (--reward-device, e.g. another GPU), scoring
    `batch_size` images at a time (default: each model's own). `paths` maps a real reward name to a model path (or
    'model_path|processor_path')."""

    def __init__(self, spec, device="cpu", paths=None, dtype=torch.float32, batch_size=None):
        self.weights = parse_reward_spec(spec)
        self.fns = {}
        for name in self.weights:
            if name in EMBEDDED_REWARDS:
                self.fns[name] = EMBEDDED_REWARDS[name]
            else:
                m, _, p = (paths or {}).get(name, "").partition("|")
                kw = {"batch_size": batch_size} if batch_size else {}
                self.fns[name] = REAL_REWARDS[name](device, m or None, p or None, dtype=dtype, **kw)

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


def build_reward(spec, device="cpu", paths=None, dtype=torch.float32, batch_size=None):
    return RewardFn(spec, device, paths, dtype, batch_size)
