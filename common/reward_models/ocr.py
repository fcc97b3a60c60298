"""Text rendering: the OCR reward (Flow-GRPO's) of what TrOCR reads in the image."""

import torch

from common.reward_models.weights import REAL_DEFAULT_PATHS
from common.rewards import to_uint8


def edit_distance(a, b):
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    row = list(range(len(b) + 1))  # distances of a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def ocr_target(prompt, metadata=None):
    """The text the image should show: metadata["text"], else the prompt's first "quoted" span (Flow-GRPO)."""
    if isinstance(metadata, dict) and isinstance(metadata.get("text"), str):
        return metadata["text"]
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f'the OCR reward needs the text to render in "double quotes" in the prompt: {prompt!r}')
    return parts[1]


def ocr_reward(recognised, target):
    """Flow-GRPO's OCR reward: 1 - d / len(target) on lower-case text without spaces, where d = 0 if the target
    occurs in the recognised text, else their edit distance capped at len(target); in [0, 1]."""
    rec, tgt = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not tgt:
        raise ValueError(f"the OCR reward's target text {target!r} is empty")
    return 1 - (0 if tgt in rec else min(edit_distance(rec, tgt), len(tgt))) / len(tgt)


class OCR:
    """Text rendering (Flow-GRPO's OCR task): `ocr_reward` of the text a transformers VisionEncoderDecoderModel reads
    in the whole image (TrOCR, greedy decoding). Flow-GRPO reads with PaddleOCR, which detects and reads every line;
    TrOCR reads one line, so multi-line text scores lower here."""

    def __init__(self, device, model_path=None, processor_path=None, batch_size=16, dtype=torch.float32,
                 max_new_tokens=48):
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        model_path = model_path or REAL_DEFAULT_PATHS["ocr"][0]
        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.model = VisionEncoderDecoderModel.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
        self.model.to(device)
        self.device, self.batch_size, self.max_new_tokens = device, batch_size, max_new_tokens

    @torch.no_grad()
    def recognise(self, images):
        texts = []
        for i in range(0, len(images), self.batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + self.batch_size])), return_tensors="pt")
            ids = self.model.generate(pix["pixel_values"].to(self.device, self.model.dtype), do_sample=False,
                                      num_beams=1, max_new_tokens=self.max_new_tokens)
            texts += self.processor.batch_decode(ids, skip_special_tokens=True)
        return texts

    def __call__(self, images, prompts, metadata=None):
        targets = [ocr_target(p, m) for p, m in zip(prompts, metadata or [None] * len(prompts))]
        return torch.tensor([ocr_reward(r, t) for r, t in zip(self.recognise(images), targets)], dtype=torch.float32)
