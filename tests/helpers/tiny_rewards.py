"""Tiny random reward models built in code (no download): offline stand-ins for the real reward models in
common/reward_models/. Same classes and loading code path (save_pretrained -> from_pretrained, torch.save -> the
converters), toy sizes.

    build_tiny_clip(dir)   -> CLIPModel + CLIPProcessor     (PickScore(dev, dir, dir), CLIPScore(dev, dir, dir))
    build_tiny_hps(dir, clip_dir) -> an OpenCLIP-layout checkpoint of clip_dir's config  (HPSv2(dev, file, clip_dir))
    AestheticHead(in_features)    -> the improved aesthetic predictor's head (a .pth)  (Aesthetic(dev, .pth, clip_dir))
    build_tiny_imagereward(dir) -> ImageReward.pt in BLIP layout + a BERT tokenizer      (ImageReward(dev, dir, dir))
    build_tiny_trocr(dir)  -> VisionEncoderDecoderModel (ViT + TrOCR decoder) + TrOCRProcessor        (OCR(dev, dir))
    build_tiny_llava(dir)  -> LlavaForConditionalGeneration + LlavaProcessor            (VLMYesNo(dev, dir))
    build_tiny_qwen_vl(dir)-> Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor  (VLMYesNo(dev, dir))

The Qwen2.5-VL processor can only be built and loaded with torchvision installed: transformers' Qwen2_5_VLProcessor
requires a video processor, and Qwen2VLVideoProcessor is torchvision-only. Without torchvision build_tiny_qwen_vl
writes the model, tokenizer, image processor and chat template only (AutoProcessor then fails, as it would for the
real Qwen/Qwen2.5-VL-7B-Instruct), and the VLM reward is exercised through the tiny Llava instead.
"""

import importlib.util
import json
from pathlib import Path

import torch

# a minimal chat template in the Qwen/ChatML style; `image_token` is what one image expands to before the processor
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _clip_tokenizer(path):
    """CLIPTokenizer from a toy BPE vocab written to `path` (single characters + end-of-word forms + a few merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2", "r e", "o n", "c i"]
    for m in merges[1:]:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def build_tiny_clip(path, seed=0, hidden_act="quick_gelu"):
    """Write a tiny random CLIPModel (32x32 images, patch 8, 32-wide towers, 16-d projection) and its CLIPProcessor.
    hidden_act: quick_gelu as OpenAI's CLIP, gelu as OpenCLIP's ViT-H-14 (HPSv2, PickScore)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer(path)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act=hidden_act)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, **tower),
                     vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(path))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(path))
    return path


def _randn(generator, scale=0.2):
    return lambda *shape: torch.randn(*shape, generator=generator) * scale


def build_tiny_hps(path, clip_dir, seed=0):
    """Write a random checkpoint in OpenCLIP's ViT layout ({"state_dict": ...}, as HPS_v2.1_compressed.pt) whose
    sizes are those of the CLIP config in `clip_dir`; returns the file."""
    from transformers import CLIPConfig

    cfg = CLIPConfig.from_pretrained(str(clip_dir))
    t, v, r = cfg.text_config, cfg.vision_config, _randn(torch.Generator().manual_seed(seed))
    sd = {"token_embedding.weight": r(t.vocab_size, t.hidden_size), "positional_embedding": r(77, t.hidden_size),
          "text_projection": r(t.hidden_size, cfg.projection_dim), "logit_scale": torch.tensor(4.6052),
          "visual.class_embedding": r(v.hidden_size),
          "visual.conv1.weight": r(v.hidden_size, 3, v.patch_size, v.patch_size),
          "visual.positional_embedding": r((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size),
          "visual.proj": r(v.hidden_size, cfg.projection_dim), "attn_mask": torch.full((77, 77), -torch.inf).triu(1)}
    norms = [("ln_final", t.hidden_size), ("visual.ln_pre", v.hidden_size), ("visual.ln_post", v.hidden_size)]
    for prefix, c in (("transformer", t), ("visual.transformer", v)):
        d, m = c.hidden_size, c.intermediate_size
        for i in range(c.num_hidden_layers):
            b = f"{prefix}.resblocks.{i}."
            norms += [(b + "ln_1", d), (b + "ln_2", d)]
            sd.update({b + "attn.in_proj_weight": r(3 * d, d), b + "attn.in_proj_bias": r(3 * d),
                       b + "attn.out_proj.weight": r(d, d), b + "attn.out_proj.bias": r(d),
                       b + "mlp.c_fc.weight": r(m, d), b + "mlp.c_fc.bias": r(m),
                       b + "mlp.c_proj.weight": r(d, m), b + "mlp.c_proj.bias": r(d)})
    for name, d in norms:
        sd.update({f"{name}.weight": 1 + r(d), f"{name}.bias": r(d)})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "state_dict": sd}, path / "HPS_tiny.pt")
    return path / "HPS_tiny.pt"


class AestheticHead(torch.nn.Module):
    """The improved aesthetic predictor's head (christophschuhmann/improved-aesthetic-predictor) with random weights:
    Linear in-1024, Dropout .2, 1024-128, Dropout .2, 128-64, Dropout .1, 64-16, 16-1 in `.layers`, so that its
    state dict has the keys of sac+logos+ava1-l14-linearMSE.pth ('layers.0.weight', ...)."""

    def __init__(self, in_features=768, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn
        self.layers = nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def _bert_tokenizer(path):
    """BertTokenizer from a toy WordPiece vocab (specials, characters, ##characters, a few words, punctuation)."""
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars], *',."!',
             "red", "blue", "circle", "two", "squares", "of"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path / "vocab.txt"))


def build_tiny_imagereward(path, seed=0, vision=128, text=128, layers=2):
    """Write a random ImageReward.pt in BLIP's layout (blip.visual_encoder.* ViT: 32x32 images, patch 8, `vision`
    wide; blip.text_encoder.* BERT with cross-attention, `text` wide; mlp.layers.* head text-32-16-8-4-1; 64-channel
    heads) and a BERT tokenizer in `path`; ImageReward(dev, path, path) loads both."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _bert_tokenizer(path)
    tok.save_pretrained(str(path))
    r = _randn(torch.Generator().manual_seed(seed))
    ln = lambda p, d: {f"{p}.weight": 1 + r(d), f"{p}.bias": r(d)}  # noqa: E731
    lin = lambda p, i, o: {f"{p}.weight": r(o, i), f"{p}.bias": r(o)}  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": r(1, 1, vision), v + "pos_embed": r(1, 17, vision), **ln(v + "norm", vision),
          v + "patch_embed.proj.weight": r(vision, 3, 8, 8), v + "patch_embed.proj.bias": r(vision),
          t + "embeddings.word_embeddings.weight": r(len(tok), text), **ln(t + "embeddings.LayerNorm", text),
          t + "embeddings.position_embeddings.weight": r(40, text),
          t + "embeddings.position_ids": torch.arange(40)[None],
          **lin("blip.vision_proj", vision, 16), **lin("blip.text_proj", text, 16)}  # (unused by ImageReward)
    for i in range(layers):
        b = f"{v}blocks.{i}."
        sd.update({**ln(b + "norm1", vision), **lin(b + "attn.qkv", vision, 3 * vision),
                   **lin(b + "attn.proj", vision, vision), **ln(b + "norm2", vision),
                   **lin(b + "mlp.fc1", vision, 2 * vision), **lin(b + "mlp.fc2", 2 * vision, vision)})
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", text), ("crossattention", vision)):
            sd.update({**lin(b + att + ".self.query", text, text), **lin(b + att + ".self.key", kv, text),
                       **lin(b + att + ".self.value", kv, text), **lin(b + att + ".output.dense", text, text),
                       **ln(b + att + ".output.LayerNorm", text)})
        sd.update({**lin(b + "intermediate.dense", text, 2 * text), **lin(b + "output.dense", 2 * text, text),
                   **ln(b + "output.LayerNorm", text)})
    for i, (a, b) in zip((0, 2, 4, 6, 7), [(text, 32), (32, 16), (16, 8), (8, 4), (4, 1)]):
        sd.update(lin(f"mlp.layers.{i}", a, b))
    torch.save(sd, path / "ImageReward.pt")
    return path


def build_tiny_trocr(path, seed=0):
    """Write a tiny random VisionEncoderDecoderModel as TrOCR is built (ViT encoder 32x32 / patch 8, TrOCR decoder,
    byte-level BPE tokenizer) and its TrOCRProcessor."""
    from transformers import (TrOCRConfig, TrOCRProcessor, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _bpe_tokenizer(["</s>", "<s>", "<pad>"])
    tok.pad_token = "<pad>"
    eos, bos, pad = tok.convert_tokens_to_ids(["</s>", "<s>", "<pad>"])
    enc = ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8)
    dec = TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=37,
                      max_position_embeddings=64, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                      decoder_start_token_id=bos)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = bos, pad, eos
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(cfg)
    model.generation_config.update(decoder_start_token_id=bos, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos)
    model.save_pretrained(str(path))
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    TrOCRProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(path))
    return path


def _bpe_tokenizer(special):
    """Byte-level BPE (Qwen2Tokenizer): the 256 byte symbols, merges that make 'yes', 'no', 'Yes', 'No' single tokens,
    and `special` as added special tokens (special[0] is bos/eos/pad/unk)."""
    from transformers import Qwen2Tokenizer

    # GPT-2's byte -> printable-unicode table: printable latin-1 bytes map to themselves, the rest to 256 + k
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    vocab = {chr(c): i for i, c in enumerate(keep + [256 + k for k in range(len(rest))])}
    merges = []
    for word in ("yes", "no", "Yes", "No"):
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[:k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=special[0], eos_token=special[0],
                          pad_token=special[0], extra_special_tokens=special[1:])


def build_tiny_llava(path, seed=0):
    """Write a tiny random LlavaForConditionalGeneration (CLIP vision tower 32x32 / patch 8 -> 16 image tokens,
    2-layer Llama text model) and its LlavaProcessor with a chat template."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
    eos, image_id = tok.convert_tokens_to_ids(["<|endoftext|>", "<image>"])
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=eos, eos_token_id=eos, pad_token_id=eos),
        image_token_id=image_id, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(str(path))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,  # + CLS
                   chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>")).save_pretrained(str(path))
    return path


def build_tiny_qwen_vl(path, seed=0):
    """Write a tiny random Qwen2_5_VLForConditionalGeneration (vision: patch 4, merge 2 -> a 32x32 image is 16 tokens;
    2-layer 32-wide text model with M-RoPE sections [2, 1, 1]) and its processor (see the module docstring)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    tok = _bpe_tokenizer(special)
    ids = dict(zip(special, tok.convert_tokens_to_ids(special)))
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=37, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=32,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(str(path))
    template = CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    pix = dict(patch_size=4, merge_size=2, temporal_patch_size=2,
               size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})  # min / max pixels
    image_processor = Qwen2VLImageProcessorPil(**pix)
    if importlib.util.find_spec("torchvision") is None:  # no processor possible: save its parts
        tok.chat_template = template
        tok.save_pretrained(str(path))
        image_processor.save_pretrained(str(path))
        (path / "chat_template.jinja").write_text(template)
    else:  # pragma: no cover - untested here (no torchvision on the dev machines)
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                        video_processor=Qwen2VLVideoProcessor(**pix), chat_template=template)
        processor.save_pretrained(str(path))
    return path
