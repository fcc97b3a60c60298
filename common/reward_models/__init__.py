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

from common.reward_models.clip import (Aesthetic, CLIPScore, CLIPScoreHessel, CLIPScoreTorchmetrics, HPSv2, PickScore,
                                      PickScoreFlowGRPO, openclip_to_transformers)
from common.reward_models.imagereward import ImageReward
from common.reward_models.ocr import OCR, edit_distance, ocr_reward, ocr_target
from common.reward_models.remote import RemoteReward
from common.reward_models.vlm import VLMYesNo
from common.reward_models.weights import REAL_DEFAULT_PATHS, hub_file

__all__ = ["OCR", "REAL_DEFAULT_PATHS", "Aesthetic", "CLIPScore", "CLIPScoreHessel", "CLIPScoreTorchmetrics", "HPSv2",
           "ImageReward", "PickScore", "PickScoreFlowGRPO", "RemoteReward", "VLMYesNo", "edit_distance", "hub_file",
           "ocr_reward", "ocr_target", "openclip_to_transformers"]
