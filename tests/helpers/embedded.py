"""A randomly initialised embedded transformer and random inputs of its shapes, for tests of the samplers and
policies (no weights loaded)."""

import torch

from common.world.model import build_embedded


def tiny_transformer(seed=0):
    """The embedded base architecture with a random init (seeded), in eval mode."""
    torch.manual_seed(seed)
    t, _ = build_embedded()
    return t.eval()


def random_inputs(b=3, seed=0):
    """(latents (b, 3, 32, 32), prompt_embeds (b, 10, 64), pooled_prompt_embeds (b, 64)), standard normal."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 10, 64, generator=g), torch.randn(b, 64, generator=g))
