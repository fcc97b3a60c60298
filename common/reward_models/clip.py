"""CLIP-based rewards: PickScore (raw and Flow-GRPO's scale), CLIPScore (cosine, torchmetrics' and Hessel et al.'s
scales), HPS v2.1 (an OpenCLIP checkpoint converted to a transformers
CLIPModel) and the LAION aesthetic predictor (an MLP head on the CLIP image embedding).
"""

import os

import torch

from common.reward_models.weights import REAL_DEFAULT_PATHS, hub_file
from common.reward_models import AESTHETIC_HINT
from common.rewards import to_uint8


class PickScore:
    """PickScore (Kirstain et al. 2023) on its own, raw scale: exp(logit_scale) * cos(image, text) of a CLIP-H model
    fine-tuned on Pick-a-Pic (exp(logit_scale) = 100), ~20-23 for SD images, as the PickScore authors' example
    (yuvalkirstain/PickScore README) computes it. Flow-GRPO's scale: `PickScoreFlowGRPO`."""

    name = "pickscore"

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoProcessor

        default_model, default_processor = REAL_DEFAULT_PATHS[self.name]
        model_path, processor_path = model_path or default_model, processor_path or default_processor
        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.model = self.load(model_path, processor_path, dtype).eval().requires_grad_(False).to(device)
        self.device, self.batch_size = device, batch_size

    def load(self, model_path, processor_path, dtype):
        from transformers import AutoModel

        return AutoModel.from_pretrained(model_path, dtype=dtype)

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


class PickScoreFlowGRPO(PickScore):
    """PickScore / 26: Flow-GRPO's scale (yifan123/flow_grpo pickscore_scorer.py `PickScoreScorer`, used by its
    `pickscore_score` reward; "norm to 0-1"), ~0.77-0.88; the same model and weights as `PickScore`."""

    def __call__(self, images, prompts, metadata=None):
        return super().__call__(images, prompts, metadata) / 26


class CLIPScore(PickScore):
    """The plain cosine similarity of CLIP image and text embeddings (ViT-L/14 by default), in [-1, 1], no rescaling
    (`--reward clipscore_cosine`; `clipscore` is the same, its name before the variants below)."""

    name = "clipscore"

    def __call__(self, images, prompts, metadata=None):
        return super().__call__(images, prompts, metadata) / self.model.logit_scale.exp().float().cpu()


class CLIPScoreTorchmetrics(CLIPScore):
    """100 x max(cos, 0), in [0, 100]: torchmetrics' CLIPScore (torchmetrics.functional.multimodal `clip_score`, whose
    documented formula this is) of each image with its prompt alone. torchmetrics clamps the mean over a batch
    instead, so its number for a batch is this reward's mean only when no cosine is negative; its default model is
    ViT-L/14 too, its text is not truncated at 77 tokens."""

    def __call__(self, images, prompts, metadata=None):
        return 100 * super().__call__(images, prompts, metadata).clamp(min=0)


class CLIPScoreHessel(CLIPScore):
    """2.5 x max(cos, 0), in [0, 2.5]: CLIP-S of Hessel et al. 2021 (CLIPScore, EMNLP; jmhessel/clipscore
    `get_clip_score`, w = 2.5). Their code scores with ViT-B/32 (`--reward-paths clipscore_hessel=
    openai/clip-vit-base-patch32`) and prefixes each caption with "A photo depicts "; here the prompt is scored as
    is."""

    def __call__(self, images, prompts, metadata=None):
        return 2.5 * super().__call__(images, prompts, metadata).clamp(min=0)


def openclip_to_transformers(sd):
    """An OpenCLIP ViT CLIP state dict (HPSv2's checkpoints) -> transformers CLIPModel keys. OpenCLIP fuses q, k, v
    into one in_proj and multiplies by its projections (x @ proj) where transformers has Linear layers (x @ W.T)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k != "attn_mask"}
    out = {"logit_scale": sd.pop("logit_scale"), "text_projection.weight": sd.pop("text_projection").T,
           "visual_projection.weight": sd.pop("visual.proj").T,
           "text_model.embeddings.token_embedding.weight": sd.pop("token_embedding.weight"),
           "text_model.embeddings.position_embedding.weight": sd.pop("positional_embedding"),
           "vision_model.embeddings.class_embedding": sd.pop("visual.class_embedding"),
           "vision_model.embeddings.position_embedding.weight": sd.pop("visual.positional_embedding"),
           "vision_model.embeddings.patch_embedding.weight": sd.pop("visual.conv1.weight")}
    for src, dst in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                     ("visual.ln_post", "vision_model.post_layernorm")):
        out.update({f"{dst}.{p}": sd.pop(f"{src}.{p}") for p in ("weight", "bias")})
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for k in list(sd):
        for src, dst in (("transformer.resblocks.", "text_model.encoder.layers."),
                         ("visual.transformer.resblocks.", "vision_model.encoder.layers.")):
            if not k.startswith(src):
                continue
            i, _, rest = k.removeprefix(src).partition(".")
            module, _, p = rest.rpartition(".")
            if module == "attn" and p in ("in_proj_weight", "in_proj_bias"):  # (3D, ...) -> q, k, v
                for name, t in zip("qkv", sd.pop(k).chunk(3)):
                    out[f"{dst}{i}.self_attn.{name}_proj.{p.removeprefix('in_proj_')}"] = t
            elif module in block:
                out[f"{dst}{i}.{block[module]}.{p}"] = sd.pop(k)
    if sd:
        raise ValueError(f"OpenCLIP keys with no place in a transformers CLIPModel: {sorted(sd)[:5]}")
    return out


class HPSv2(CLIPScore):
    """HPS v2.1 (Wu et al. 2023): cos(image, text) of an OpenCLIP ViT-H-14 fine-tuned on human preferences (HPD v2),
    ~0.2-0.35, the hpsv2 package's scale (its `score`: image_features @ text_features.T, no logit scale).
    HPS_v2.1_compressed.pt (hub repo xswu/HPSv2, OpenCLIP layout; or v2.0's HPS_v2_compressed.pt) is
    converted on load into a transformers CLIPModel with the config and processor of `processor_path` (default
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the model it was fine-tuned from); a converted CLIPModel directory (with
    config.json) loads as is. HPSv2 resizes a tensor, the CLIP processor a PIL image: pixels differ by rounding."""

    name = "hpsv2"

    def load(self, model_path, processor_path, dtype):
        from transformers import CLIPConfig, CLIPModel

        if os.path.isfile(os.path.join(model_path, "config.json")):
            return CLIPModel.from_pretrained(model_path, dtype=dtype)
        from common.utils import load_weights

        ckpt = load_weights(hub_file(model_path, "HPS_v2.1_compressed.pt"))
        model = CLIPModel(CLIPConfig.from_pretrained(processor_path))
        try:
            missing, unexpected = model.load_state_dict(openclip_to_transformers(ckpt.get("state_dict", ckpt)),
                                                        strict=False)
        except RuntimeError as e:  # sizes differ
            missing, unexpected = [str(e).splitlines()[1].strip()], []
        if [k for k in missing if not k.endswith("position_ids")] or unexpected:
            raise ValueError(f"HPS checkpoint {model_path} does not fit the CLIP config of {processor_path}: "
                             f"{(missing + unexpected)[:3]}")
        return model.to(dtype)


def _linear_head(sd):
    """The MLP head of the LAION aesthetic predictor and of ImageReward from its state dict ('layers.{i}.weight'):
    its Linear layers in index order. The Dropouts between them are identity at inference, and it has no
    activations (they are commented out in both originals): the head is affine."""
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
    if not idx:
        raise ValueError(f"not an MLP head: no 'layers.<i>.weight' tensors among {list(sd)[:4]}")
    head = torch.nn.Sequential(*[torch.nn.Linear(*sd[f"layers.{i}.weight"].shape[::-1]) for i in idx])
    head.load_state_dict({f"{n}.{p}": sd[f"layers.{i}.{p}"] for n, i in enumerate(idx) for p in ("weight", "bias")})
    return head.eval().requires_grad_(False)


class Aesthetic:
    """LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor; DDPO's and Flow-GRPO's
    aesthetic reward), ~1-10: its MLP head on the L2-normalised CLIP ViT-L/14 image embedding. The head weights
    (sac+logos+ava1-l14-linearMSE.pth, from that repository, not on the hub) must be given: model_path."""

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoProcessor, CLIPModel

        if not model_path:
            raise ValueError(f"reward 'aesthetic' needs {AESTHETIC_HINT}")
        clip = processor_path or REAL_DEFAULT_PATHS["aesthetic"][1]
        self.processor = AutoProcessor.from_pretrained(clip)
        self.model = CLIPModel.from_pretrained(clip, dtype=dtype).eval().requires_grad_(False).to(device)
        from common.utils import load_weights

        self.head = _linear_head(load_weights(model_path)).to(device)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images, prompts=None, metadata=None):
        out = []
        for i in range(0, len(images), self.batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + self.batch_size])), return_tensors="pt")
            emb = _features(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device,
                                                                                                self.model.dtype)))
            emb = emb.float()
            out.append(self.head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1))
        return torch.cat(out).cpu()
