"""A vision-language model as a yes/no judge of prompt-image agreement (FDFO's reward)."""

import torch
from PIL import Image

from common.reward_models.weights import REAL_DEFAULT_PATHS
from common.rewards import to_uint8


class VLMYesNo:
    """A VLM asked whether the image matches the prompt, as FDFO does (spec fdfo.md 6.1): Qwen2.5-VL chat template
    with a system turn, the image bilinearly resized to 504x504, one forward pass, and
    reward = 100 * sigmoid(logit["Yes"] - logit["No"]) at the last position, in [0, 100]. Works with any
    AutoModelForImageTextToText whose processor has a chat template and whose tokenizer has "Yes"/"No" tokens.
    (transformers' Qwen2.5-VL processor needs torchvision for its video processor.)"""

    system = "You are a helpful assistant."
    question = 'Does this image match the caption "{prompt}"? Answer Yes or No.'
    answers = ("Yes", "No")

    def __init__(self, device, model_path=None, processor_path=None, batch_size=8, dtype=torch.float32, image_size=504):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_path = model_path or REAL_DEFAULT_PATHS["vlm"][0]
        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.processor.tokenizer.padding_side = "left"  # the next-token logits sit at the last position
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False).to(device)
        ids = [self.processor.tokenizer.encode(w, add_special_tokens=False) for w in self.answers]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the tokenizer of VLM {model_path} splits the answers {self.answers} into {ids}; "
                             "need one token each")
        self.yes, self.no = ids[0][0], ids[1][0]
        self.device, self.batch_size, self.image_size = device, batch_size, image_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        if self.image_size:
            images = torch.nn.functional.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear")
        for i in range(0, len(prompts), self.batch_size):
            imgs = [Image.fromarray(a) for a in to_uint8(images[i:i + self.batch_size])]
            msgs = [[{"role": "system", "content": [{"type": "text", "text": self.system}]},
                     {"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": self.question.format(prompt=p)}]}]
                    for p in prompts[i:i + self.batch_size]]
            text = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
            inputs = self.processor(text=text, images=imgs, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts only the floating tensors (pixels)
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # vocab logits of the answer token
            out.append(100 * torch.sigmoid(logits[:, self.yes] - logits[:, self.no]))
        return torch.cat(out).cpu()
