"""Stable Diffusion 3 / 3.5 (diffusers `StableDiffusion3Pipeline`, hub id in the local cache or a local directory):
loading and prompt encoding."""

import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from common.models import Model, default_dtype


def load(name, device="cpu", dtype=None, resolution=512, use_t5=False, max_t5_length=128):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    dtype = dtype or default_dtype(device)
    kw = dict(torch_dtype=dtype)
    transformer = SD3Transformer2DModel.from_pretrained(name, subfolder="transformer", **kw)
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=torch.float32)  # decode in fp32
    encoders = [CLIPTextModelWithProjection.from_pretrained(name, subfolder=s, **kw) for s in ("text_encoder", "text_encoder_2")]
    tokenizers = [CLIPTokenizer.from_pretrained(name, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    if use_t5:  # diffusers documents dropping T5 (text_encoder_3=None) as a memory/quality trade-off
        encoders.append(T5EncoderModel.from_pretrained(name, subfolder="text_encoder_3", **kw))
        tokenizers.append(T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_3"))
    for m in [vae, *encoders]:
        m.requires_grad_(False).eval().to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (transformer.config.in_channels, resolution // factor, resolution // factor)
    return Model(name, transformer.to(device), encoders, tokenizers, vae, scheduler, shape, torch.device(device), dtype,
                 max_t5_length, encode_fn=encode_prompt)


def encode_prompt(model, prompts):
    """SD3 prompt encoding as in diffusers' StableDiffusion3Pipeline: penultimate hidden states of CLIP-L and
    CLIP-G concatenated on the feature axis and zero-padded to the T5 width, then T5 tokens (or zeros when T5
    is dropped) appended on the sequence axis; pooled = both CLIP projections concatenated."""
    encoders, tokenizers, device = model.text_encoders, model.tokenizers, model.device
    joint_dim, max_t5_length = model.transformer.config.joint_attention_dim, model.max_t5_length
    clip_embeds, pooled = [], []
    for enc, tok in zip(encoders[:2], tokenizers[:2]):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        clip_embeds.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(clip_embeds, -1)
    clip = nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    if len(encoders) > 2:
        ids = tokenizers[2](prompts, padding="max_length", max_length=max_t5_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
        t5 = encoders[2](ids)[0]
    else:
        t5 = torch.zeros(len(prompts), max_t5_length, joint_dim, device=device)
    return torch.cat([clip, t5.to(clip.dtype)], -2).to(model.dtype), torch.cat(pooled, -1).to(model.dtype)
