"""The embedded world: a procedural "shapes" image world small enough for a CPU, in which every method trains and is
scored by default. Importing it registers it with the core: the base model `embedded` (models.BASES), the rewards
`shapes` and `shapes_strict` (rewards.register) and the scene scorer (rewards.SCORER: the default prompts, their
metadata, strict accuracy in evaluation).

    shapes.py    the prompt grammar (train/test splits), the renderer and the mini-GenEval scorer (detect, check, score)
    model.py     the embedded base model (tiny SD3 transformer in pixel space + word-level text encoder), load/save,
                 its fast CPU kernels (the same attention and GELU, computed faster for its shapes)
    pretrain.py  `python -m common.world.pretrain`: rectified-flow pretraining on rendered scenes -> assets/
    assets/      the committed base weights (fp16 safetensors, config.json, pretrain_info.json)
"""

import types

from common import models, rewards
from common.world import model, shapes

models.BASES[models.EMBEDDED] = types.SimpleNamespace(check=model.check_weights, load=model.load_embedded)
rewards.register("shapes", shapes.reward_partial)
rewards.register("shapes_strict", shapes.reward_strict)
rewards.SCORER = shapes
