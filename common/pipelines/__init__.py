"""The real model families behind `common.models.Model`, one module each, chosen by the `_class_name` of a
--model folder's model_index.json. Each module has `load(name, device, dtype, resolution, use_t5, max_t5_length,
**options)` -> Model and `encode_prompt(model, prompts)` -> (prompt_embeds, pooled_prompt_embeds); optionally
`check_flags(name, guidance_scale, flux_guidance)` (its flag rules, run before any loading) and `sigmas(model,
num_steps)` (a schedule that `scheduler.set_timesteps(num_steps)` does not give, set as `Model.sigmas_fn`)."""

PIPELINES = {"StableDiffusion3Pipeline": "common.pipelines.sd3", "FluxPipeline": "common.pipelines.flux"}
