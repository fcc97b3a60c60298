"""The real reward models (transformers weights, hub downloads, checkpoint conversions) and the reward-server
client, behind common/rewards.py's interface: `rewards.build_reward("pickscore", ...)` imports the class it needs
from here (`rewards.real_reward`). Each is a callable `(images, prompts, metadata) -> (N,)` built as
`Class(device, model_path=None, processor_path=None, batch_size=..., dtype=...)`.

    clip.py         PickScore (+ Flow-GRPO's / 26), CLIPScore (cos; torchmetrics' 100 x, CLIP-S 2.5 x max(cos, 0)),
                    HPSv2 (OpenCLIP -> transformers CLIPModel), Aesthetic (LAION head)
    imagereward.py  ImageReward (BLIP checkpoint -> transformers BlipVisionModel + BlipTextModel)
    ocr.py          OCR (TrOCR) and Flow-GRPO's edit-distance OCR reward
    vlm.py          VLMYesNo (a VLM's yes/no logits)
    remote.py       RemoteReward (a Flow-GRPO reward server over HTTP)
    weights.py      default hub ids (REAL_DEFAULT_PATHS), one checkpoint file from a path or hub repo
"""

import importlib

# name -> module; imported on first use (PEP 562), so that `common.reward_models.remote` (URL checks before any
# model loads) does not import transformers
_WHERE = {**dict.fromkeys(["Aesthetic", "CLIPScore", "CLIPScoreHessel", "CLIPScoreTorchmetrics", "HPSv2", "PickScore",
                           "PickScoreFlowGRPO", "openclip_to_transformers"], "clip"),
          "ImageReward": "imagereward", **dict.fromkeys(["OCR", "edit_distance", "ocr_reward", "ocr_target"], "ocr"),
          "RemoteReward": "remote", "VLMYesNo": "vlm", "REAL_DEFAULT_PATHS": "weights", "hub_file": "weights"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE.values():  # a submodule, e.g. common.reward_models.clip
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
