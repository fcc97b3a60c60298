"""Read what a method script logged, and rebuild its first iteration's inputs, for the one-iteration tests."""

from pathlib import Path


def scalars(run_dir, tag):
    """{step: value} of a TensorBoard scalar written under run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def first_iteration(prompts_per_iter, group_size, seed=0):
    """What every script builds before its first iteration (embedded world, one process): the model, the
    prompt batch of iteration 0 with its embeddings, and the iteration's random generator."""
    import torch

    from common import models, utils

    model = models.load_model("embedded")
    prompts, meta = utils.load_prompts(None, split="train")
    captions, metadata, idx = utils.PromptSampler(prompts, meta, prompts_per_iter, group_size, seed).sample(0)
    pe, pooled = model.encode_prompt(captions)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 0)
    return model, captions, metadata, idx, pe, pooled, gen
