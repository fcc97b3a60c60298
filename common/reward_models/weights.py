"""Where the real reward models' weights come from: default hub ids, and one checkpoint file from a path or hub repo."""

import os

from common.reward_models import SAME_WEIGHTS

REAL_DEFAULT_PATHS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),  # (model, processor)
    "clipscore": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "vlm": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "hpsv2": ("xswu/HPSv2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),  # (repo of HPS_v2.1_compressed.pt, CLIP config)
    "imagereward": ("THUDM/ImageReward", "bert-base-uncased"),  # (repo of ImageReward.pt, tokenizer)
    "aesthetic": (None, "openai/clip-vit-large-patch14"),  # (head .pth: not on the hub, CLIP)
    "ocr": ("microsoft/trocr-base-printed", "microsoft/trocr-base-printed"),
}
# the rescaled variants (pickscore_flowgrpo, clipscore_*) run the weights of the reward they rescale
REAL_DEFAULT_PATHS.update({variant: REAL_DEFAULT_PATHS[base] for variant, base in SAME_WEIGHTS.items()})


def hub_file(path, filename):
    """A checkpoint file: `path` itself, `path`/`filename` for a directory, else `filename` of hub repo `path`."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        return os.path.join(path, filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename)
