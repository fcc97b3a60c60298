"""Tiny random FLUX.1 pipeline built in code (no download): the offline stand-in for black-forest-labs/FLUX.1-dev
(`guidance=True`: the transformer has a guidance embedding) and FLUX.1-schnell (`guidance=False`). Same classes as
the released pipelines, same code path, toy sizes."""

from pathlib import Path

import torch


def build_tiny_flux(path, guidance=True, seed=0):
    """Write a diffusers FluxPipeline directory (model_index.json + subfolders) to `path` and return it.
    One double-stream and one single-stream block (2 heads x 16, rotary axes 4 + 6 + 6), 16-channel latents at
    1/2 of the image size (a 2-level VAE with FLUX's scaling and shift factors), so 32x32 images are 8x8 = 64 packed
    tokens of 64 channels; a 32-wide CLIPTextModel (pooled: 32) and a 2-layer, 64-wide T5 encoder (the joint
    attention width); the scheduler as FLUX.1-dev's (dynamic shifting, mu from the token count) or schnell's (shift
    1, no dynamic shifting)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.helpers.tiny_sd3 import _tiny_t5, toy_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=16,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    chars, vocab, tokenizer = toy_clip_tokenizer(path)  # the toy BPE of tiny_sd3
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5, t5_tokenizer = _tiny_t5(chars)
    if guidance:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(str(path))
    return path
