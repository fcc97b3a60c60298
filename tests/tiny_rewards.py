"""Tiny random reward models built in code (no download): offline stand-ins for the real reward models in
common/rewards.py. Same classes and loading code path (save_pretrained -> from_pretrained), toy sizes.

    build_tiny_clip(dir)   -> CLIPModel + CLIPProcessor     (PickScore(dev, dir, dir), CLIPScore(dev, dir, dir))
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


def build_tiny_clip(path, seed=0):
    """Write a tiny random CLIPModel (32x32 images, patch 8, 32-wide towers, 16-d projection) and its CLIPProcessor."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer(path)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, **tower),
                     vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(path))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(path))
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
