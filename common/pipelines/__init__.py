"""The real model families behind `common.models.Model`, one module each, chosen by the `_class_name` of a
--model folder's model_index.json. Each module has `load(name, device, dtype, resolution, use_t5, max_t5_length,
**options)` -> Model and `encode_prompt(model, prompts)` -> (prompt_embeds, pooled_prompt_embeds); optionally
`check_flags(name, guidance_scale, flux_guidance)` (its flag rules, run before any loading) and `sigmas(model,
num_steps)` (a schedule that `scheduler.set_timesteps(num_steps)` does not give, set as `Model.sigmas_fn`)."""

import json
import os
from pathlib import Path

PIPELINES = {"StableDiffusion3Pipeline": "common.pipelines.sd3", "FluxPipeline": "common.pipelines.flux"}


def check_available(name):
    """--model `name` (hub id or local directory) is a pipeline of a family here, readable without a network: its
    model_index.json `_class_name` (SD3 for a folder without model_index.json), else SystemExit with one line."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")) and not os.path.isdir(os.path.join(name, "transformer")):
            raise SystemExit(f"error: --model {name!r} is a directory but not a diffusers pipeline "
                             "(no model_index.json / transformer/)")
        index = os.path.join(name, "model_index.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(name, "model_index.json")
        if not isinstance(index, str):
            raise SystemExit(f"error: --model {name!r} is neither 'embedded', a local directory, nor in the local "
                             "Hugging Face cache, and no network/hub is reachable; download it elsewhere and pass "
                             "its local path (e.g. --model /path/to/stable-diffusion-3.5-medium)")
    if not os.path.isfile(index):
        return next(iter(PIPELINES))
    try:  # another pipeline's folder would fail deep inside from_pretrained
        kind = json.loads(Path(index).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: --model {name!r}: unreadable model_index.json ({type(e).__name__})")
    if kind not in PIPELINES:
        raise SystemExit(f"error: --model {name!r} holds a {kind} pipeline; choose a {' or '.join(PIPELINES)} "
                         "(e.g. stabilityai/stable-diffusion-3.5-medium) or 'embedded'")
    return kind


