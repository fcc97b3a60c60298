"""The embedded world: a procedural "shapes" image world small enough for a CPU, in which every method trains and is
scored by default.

    shapes.py    the prompt grammar (train/test splits), the renderer and the mini-GenEval scorer (detect, check, score)
    model.py     the embedded base model (tiny SD3 transformer in pixel space + word-level text encoder), load/save
    pretrain.py  `python -m common.world.pretrain`: rectified-flow pretraining on rendered scenes -> assets/
    assets/      the committed base weights (fp16 safetensors, config.json, pretrain_info.json)
"""
