"""The real model families behind `common.models.Model`, one module each, chosen by the `_class_name` of a
--model folder's model_index.json. Each module has `load(name, device, dtype, resolution, use_t5, max_t5_length)`
-> Model and `encode_prompt(model, prompts)` -> (prompt_embeds, pooled_prompt_embeds)."""

PIPELINES = {"StableDiffusion3Pipeline": "common.pipelines.sd3"}
