"""The real reward models (transformers weights, hub downloads, checkpoint conversions) and the reward-server
client, behind common/rewards.py's interface. Importing this package registers them with the core (`REAL_REWARDS`,
`rewards.register`); `rewards.build_reward("pickscore", ...)` then imports the class it needs from here. Each is a
callable `(images, prompts, metadata) -> (N,)` built as `Class(device, model_path=None, processor_path=None,
batch_size=..., dtype=...)`; `remote:<url>` builds a RemoteReward.

    clip.py         PickScore (+ Flow-GRPO's / 26), CLIPScore (cos; torchmetrics' 100 x, CLIP-S 2.5 x max(cos, 0)),
                    HPSv2 (OpenCLIP -> transformers CLIPModel), Aesthetic (LAION head)
    imagereward.py  ImageReward (BLIP checkpoint -> transformers BlipVisionModel + BlipTextModel)
    ocr.py          OCR (TrOCR) and Flow-GRPO's edit-distance OCR reward
    vlm.py          VLMYesNo (a VLM's yes/no logits)
    remote.py       RemoteReward (a Flow-GRPO reward server over HTTP)
    weights.py      default hub ids (REAL_DEFAULT_PATHS), one checkpoint file from a path or hub repo
"""

import importlib
import types

from common import rewards
from common.reward_models import remote  # URL checks only: no transformers

# name -> module; imported on first use (PEP 562), so that importing this package (URL checks before any
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


# name -> "module.Class" here, imported when the reward is built
REAL_REWARDS = {"pickscore": "clip.PickScore", "pickscore_flowgrpo": "clip.PickScoreFlowGRPO",
                "clipscore": "clip.CLIPScore", "clipscore_cosine": "clip.CLIPScore",
                "clipscore_torchmetrics": "clip.CLIPScoreTorchmetrics", "clipscore_hessel": "clip.CLIPScoreHessel",
                "hpsv2": "clip.HPSv2", "imagereward": "imagereward.ImageReward", "aesthetic": "clip.Aesthetic",
                "ocr": "ocr.OCR", "vlm": "vlm.VLMYesNo"}
# a rescaled variant -> the reward whose model it runs: the same default weights, and that reward's --reward-paths
# entry when the variant has none of its own
SAME_WEIGHTS = {"pickscore_flowgrpo": "pickscore", "clipscore_cosine": "clipscore",
                "clipscore_torchmetrics": "clipscore", "clipscore_hessel": "clipscore"}
AESTHETIC_HINT = ("its MLP head: --reward-paths aesthetic=sac+logos+ava1-l14-linearMSE.pth "
                  "(christophschuhmann/improved-aesthetic-predictor)")


def real_reward(name):
    """The class of real reward `name` ("remote": the reward server client)."""
    module, _, cls = ("remote.RemoteReward" if name == "remote" else REAL_REWARDS[name]).partition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def _builder(name):
    return lambda device, model_path, processor_path, dtype, **kw: real_reward(name)(
        device, model_path, processor_path, dtype=dtype, **kw)


def _remote(name, **kw):
    url, options = remote.remote_server(name)
    return real_reward("remote")(url, **options, **kw)


for _name in REAL_REWARDS:
    rewards.register(_name, build=_builder(_name), weights_of=SAME_WEIGHTS.get(_name, _name),
                     needs_path=AESTHETIC_HINT if _name == "aesthetic" else None)
rewards.SCHEMES["remote:"] = types.SimpleNamespace(
    parse=remote.remote_server, check=lambda name: remote.check_server(name.removeprefix("remote:")), build=_remote)
