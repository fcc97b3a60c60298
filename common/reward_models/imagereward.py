"""ImageReward v1.0 on transformers' BLIP vision and text models (the BLIP checkpoint converted on load)."""

import numpy as np
import torch
from PIL import Image

from common.reward_models.clip import _linear_head
from common.reward_models.weights import REAL_DEFAULT_PATHS, hub_file
from common.rewards import to_uint8


def _pil_pixels(images, size, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)):
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) as torchvision's Resize(size, bicubic) + CenterCrop + ToTensor +
    Normalize do it on PIL images (BLIP's / ImageReward's preprocessing; CLIP's mean and std)."""
    out = []
    for a in to_uint8(images):
        img = Image.fromarray(a)
        w, h = img.size
        img = img.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BICUBIC)
        left, top = round((img.size[0] - size) / 2), round((img.size[1] - size) / 2)
        out.append(torch.from_numpy(np.array(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1))
    return (torch.stack(out).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class ImageReward:
    """ImageReward v1.0 (Xu et al. 2023): BLIP's ViT-L/16 encodes the image (224 px); a BERT-base text encoder reads
    the prompt (35 tokens) cross-attending to the image patches; its [CLS] feature -> MLP head (768-1024-128-64-16-1)
    -> standardised with the training mean and std: the ImageReward package's `score` scale, which Flow-GRPO's
    `imagereward_score` reports as is. Runs on transformers' BlipVisionModel + BlipTextModel, whose layers match
    BLIP's one to one: ImageReward.pt (hub repo THUDM/ImageReward, BLIP layout) is converted on load and every size is
    read from its tensor shapes (heads: 64 channels each, as in BLIP). Tokenizer: bert-base-uncased."""

    mean, std = 0.16717362830052426, 1.0333394966054072  # of the head's outputs on ImageReward's training set
    vision_keys = [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                   ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."),
                   (".norm1", ".layer_norm1"), (".norm2", ".layer_norm2"), (".attn.qkv", ".self_attn.qkv"),
                   (".attn.proj", ".self_attn.projection")]

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        path = hub_file(model_path or REAL_DEFAULT_PATHS["imagereward"][0], "ImageReward.pt")
        from common.utils import load_weights

        sd = load_weights(path)
        vis, txt = ({k.removeprefix(p): v for k, v in sd.items() if k.startswith(p)}
                    for p in ("blip.visual_encoder.", "blip.text_encoder."))
        vis = {("post_layernorm." + k[5:] if k.startswith("norm.") else _renamed(k, self.vision_keys)): v
               for k, v in vis.items()}
        txt.pop("embeddings.position_ids", None)
        width, _, patch, _ = vis["embeddings.patch_embedding.weight"].shape
        vocab, hidden = txt["embeddings.word_embeddings.weight"].shape
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=len(vis["encoder.layers.0.mlp.fc1.bias"]),
            num_hidden_layers=_count(vis, "encoder.layers."), num_attention_heads=width // 64, patch_size=patch,
            image_size=patch * round((vis["embeddings.position_embedding"].shape[1] - 1) ** 0.5), layer_norm_eps=1e-6))
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width, num_attention_heads=hidden // 64,
            intermediate_size=len(txt["encoder.layer.0.intermediate.dense.bias"]),
            num_hidden_layers=_count(txt, "encoder.layer."), layer_norm_eps=1e-12, bos_token_id=None,
            max_position_embeddings=len(txt["embeddings.position_embeddings.weight"]), sep_token_id=None,
            pad_token_id=0), add_pooling_layer=False)
        for module, weights in ((self.vision, vis), (self.text, txt)):
            module.load_state_dict(weights)  # strict: every BLIP tensor has its place
            module.eval().requires_grad_(False).to(device, dtype)
        self.head = _linear_head({k.removeprefix("mlp."): v for k, v in sd.items() if k.startswith("mlp.")}).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path or REAL_DEFAULT_PATHS["imagereward"][1])
        self.device, self.batch_size, self.dtype = device, batch_size, dtype

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        for i in range(0, len(prompts), self.batch_size):
            pix = _pil_pixels(images[i:i + self.batch_size], self.vision.config.image_size)
            img = self.vision(pixel_values=pix.to(self.device, self.dtype)).last_hidden_state  # (B, 1 + patches, W)
            tok = self.tokenizer(prompts[i:i + self.batch_size], padding="max_length", truncation=True, max_length=35,
                                 return_tensors="pt")
            feats = self.text(input_ids=tok["input_ids"].to(self.device),
                              attention_mask=tok["attention_mask"].to(self.device), encoder_hidden_states=img,
                              encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=self.device),
                              ).last_hidden_state[:, 0]  # [CLS]
            out.append((self.head(feats.float()).squeeze(-1) - self.mean) / self.std)
        return torch.cat(out).cpu()


def _renamed(key, pairs):
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def _count(sd, prefix):
    return 1 + max(int(k.removeprefix(prefix).split(".")[0]) for k in sd if k.startswith(prefix))
