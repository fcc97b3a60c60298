"""The embedded base model: a tiny SD3 transformer in pixel space (32 x 32 RGB, no VAE) and a word-level text
encoder over the shapes grammar, with its committed weights (common/world/assets/, written by
`python -m common.world.pretrain`). `common.models.load_model("embedded")` loads it through `load_embedded`.
"""

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from common.models import EMBEDDED, Model
from common.world import shapes

ASSETS = Path(__file__).parent / "assets"  # the committed base weights (fp16) and config.json
EMBEDDED_CONFIG = {
    "transformer": dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=6,
                        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                        caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=8),
    "text_encoder": dict(dim=64, num_layers=2, num_heads=4, max_length=10),
    "scheduler": dict(num_train_timesteps=1000, shift=1.0),
}


class TextEncoder(nn.Module):
    """Word-level tokenizer over the shapes grammar's vocabulary + a small transformer encoder.
    Gives SD3-shaped outputs: prompt_embeds (B, L, dim) and pooled_prompt_embeds (B, dim) (the <bos> output)."""

    def __init__(self, dim=64, num_layers=2, num_heads=4, max_length=10):
        super().__init__()
        self.max_length = max_length
        self.vocab = {w: i for i, w in enumerate(shapes.VOCAB)}
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts):
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [1] + [self.vocab.get(w, 2) for w in p.lower().split()][: self.max_length - 1]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids

    def forward(self, prompts):
        ids = self.tokenize(prompts).to(self.pos.device)
        h = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=ids == 0)
        h = self.norm(h)
        return h, h[:, 0]


def build_embedded(config=EMBEDDED_CONFIG):
    return SD3Transformer2DModel(**config["transformer"]), TextEncoder(**config["text_encoder"])


def check_weights(path=ASSETS):
    """Fail with one line before any loading if a weight file is missing."""
    for f in ("config.json", "transformer.safetensors", "text_encoder.safetensors"):
        if not (Path(path) / f).is_file():
            raise SystemExit(f"error: embedded base weights missing: {Path(path) / f}; "
                             "restore common/world/assets from git or run `python -m common.world.pretrain`")


def load_embedded(device="cpu", dtype=torch.float32, path=ASSETS):
    from safetensors.torch import load_file


    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        transformer, text_encoder = build_embedded(config)
        transformer.load_state_dict({k: v.float() for k, v in load_file(path / "transformer.safetensors").items()})
        text_encoder.load_state_dict({k: v.float() for k, v in load_file(path / "text_encoder.safetensors").items()})
    except Exception as e:  # missing file, bad header, wrong shapes ...
        raise SystemExit(f"error: embedded base weights in {path} are missing or corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); restore them from git or run `python -m common.world.pretrain`")
    text_encoder.requires_grad_(False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    c = config["transformer"]
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules, which this transformer has none of
    transformer = nn.Module.to(transformer, device=device, dtype=dtype)
    return Model(EMBEDDED, transformer, [text_encoder.to(device)], [], None, scheduler,
                 (c["in_channels"], c["sample_size"], c["sample_size"]), torch.device(device), dtype)


def save_embedded(transformer, text_encoder, path=ASSETS, config=EMBEDDED_CONFIG):
    """Weights stored in fp16 (keeps the committed files small); loaded back in fp32."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, m in (("transformer", transformer), ("text_encoder", text_encoder)):
        sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in m.state_dict().items()}
        save_file(sd, path / f"{name}.safetensors.tmp")
        os.replace(path / f"{name}.safetensors.tmp", path / f"{name}.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=1))
