"""The embedded base model: a tiny SD3 transformer in pixel space (32 x 32 RGB, no VAE) and a word-level text
encoder over the shapes grammar, with its committed weights (common/world/assets/, written by
`python -m common.world.pretrain`). `common.models.load_model("embedded")` loads it through `load_embedded`.
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.activations import GELU

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


# ----------------------------------------------------------------------------------- CPU kernels
# The same functions as diffusers' defaults, computed faster for this model's shapes on a CPU (torch 2.13, 2 threads,
# batch 64, `python benchmark/compute.py`); `--no-fast-cpu-kernels` keeps diffusers' own.
def matmul_attention(query, key, value):
    """softmax(q k^T / sqrt(d)) v as two fp32 matmuls (outside autocast, so the logits are not rounded to bf16). For
    74 tokens of dim 32, F.scaled_dot_product_attention's CPU kernels take 1.5-1.8x as long (flash; math: longer)."""
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float() * query.shape[-1] ** -0.5, key.float(), value.float()
        return (torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v).to(query.dtype)


class MatmulJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3's joint attention: image and text tokens attend together, then split
    back into the two streams) with `matmul_attention` in place of F.scaled_dot_product_attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_image, heads = hidden_states.shape[0], hidden_states.shape[1], attn.heads

        def split_heads(x, norm=None):  # (B, L, heads * d) -> (B, heads, L, d)
            x = x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = split_heads(attn.to_q(hidden_states), attn.norm_q)
        k = split_heads(attn.to_k(hidden_states), attn.norm_k)
        v = split_heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:  # the text tokens join the image tokens
            q = torch.cat([q, split_heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
            k = torch.cat([k, split_heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
            v = torch.cat([v, split_heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        out = matmul_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return hidden_states
        context = out[:, n_image:]
        return hidden_states, (context if attn.context_pre_only else attn.to_add_out(context))


class SigmoidGELU(GELU):
    """diffusers' GELU(approximate="tanh"), 0.5 x (1 + tanh u) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as
    x sigmoid(2u) (the same function: 1 + tanh u = 2 sigmoid(2u)), in place, for fp32 inputs in passes without
    gradients: torch's CPU tanh is ~6x slower than its sigmoid (2.6 -> 1.0 ms on 4096 x 512). Passes with gradients
    keep F.gelu (its fused backward), and bf16 inputs too (in fp32 the casts cost more than they save)."""

    def gelu(self, gate):
        if torch.is_grad_enabled() or gate.dtype != torch.float32 or self.approximate != "tanh":
            return super().gelu(gate)
        c = 2 * math.sqrt(2 / math.pi)
        return (gate * gate).mul_(0.044715 * c).add_(c).mul_(gate).sigmoid_().mul_(gate)


def use_fast_cpu_kernels(transformer):
    """Swap in `MatmulJointAttnProcessor` and `SigmoidGELU` (same outputs up to float rounding: a test)."""
    transformer.set_attn_processor(MatmulJointAttnProcessor())
    for m in transformer.modules():
        if type(m) is GELU and m.approximate == "tanh":
            m.__class__ = SigmoidGELU
    return transformer


def build_embedded(config=EMBEDDED_CONFIG):
    return SD3Transformer2DModel(**config["transformer"]), TextEncoder(**config["text_encoder"])


def check_weights(path=ASSETS):
    """Fail with one line before any loading if a weight file is missing."""
    for f in ("config.json", "transformer.safetensors", "text_encoder.safetensors"):
        if not (Path(path) / f).is_file():
            raise SystemExit(f"error: embedded base weights missing: {Path(path) / f}; "
                             "restore common/world/assets from git or run `python -m common.world.pretrain`")


def load_embedded(device="cpu", dtype=torch.float32, path=ASSETS, fast_cpu_kernels=True):
    """`fast_cpu_kernels` (on a CPU): `use_fast_cpu_kernels`."""
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
    if fast_cpu_kernels and torch.device(device).type == "cpu":
        use_fast_cpu_kernels(transformer)
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
