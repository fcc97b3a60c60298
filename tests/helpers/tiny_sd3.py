"""Tiny random SD3 pipeline built in code (no download): the offline stand-in for
stabilityai/stable-diffusion-3.5-medium. Same classes, same code path, toy sizes; T5 optional (`t5=True`)."""

import json
from pathlib import Path

import torch


def build_tiny_sd3(path, seed=0, t5=False, pos_embed_max_size=16):
    """Write a diffusers SD3 pipeline directory (model_index.json + subfolders) to `path` and return it.
    32x32 images, 4-channel latents at 16x16 (VAE factor 2), two 32-wide CLIP text encoders; with `t5` also a
    64-wide T5 encoder (text_encoder_3) and a character-level T5 tokenizer, as SD3.5 with --use-t5.
    `pos_embed_max_size` >= resolution / 4 (patches per side) for images larger than 64 px."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64,
                                        pos_embed_max_size=pos_embed_max_size)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.5, shift_factor=0.06)
    chars, vocab, tokenizer = toy_clip_tokenizer(path)
    tokenizers = [tokenizer, tokenizer]
    cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**cfg)) for _ in range(2)]
    t5_encoder, t5_tokenizer = _tiny_t5(chars) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                    text_encoder_3=t5_encoder, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(str(path))
    return path


def toy_clip_tokenizer(path):
    """A byte-level-free toy BPE CLIPTokenizer written under path/_tok: single characters (+ end-of-word forms) and a
    few merges. Returns (chars, vocab, tokenizer)."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2", "r e", "o n", "c i"]
    for m in merges[1:]:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    tok_dir = path / "_tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    return chars, vocab, CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                                       pad_token="<|endoftext|>")


def _tiny_t5(chars):
    """A 2-layer, 64-wide T5 encoder (the tiny transformer's joint_attention_dim) and a unigram tokenizer over
    single characters (built in code with `tokenizers`; no sentencepiece file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=256)
    config = T5Config(vocab_size=len(pieces), d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config), tokenizer
