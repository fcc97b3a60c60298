"""common/models.py: model loading errors, the LoRA and full fine-tuning policy views, a tiny SD3 pipeline that
samples, scores, saves and reloads its LoRA."""

import json

import pytest
import torch

from common import models, sampling
from common.world import model as world_model
from common.tools.evaluate import load_finetuned
from common.world import shapes
from tests.helpers.embedded import random_inputs, tiny_transformer


def test_missing_model_fails_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no network/hub is reachable"):
        models.check_model_available("stabilityai/stable-diffusion-3.5-medium")
    with pytest.raises(SystemExit, match="missing or corrupt"):
        (tmp_path / "config.json").write_text(json.dumps(world_model.EMBEDDED_CONFIG))
        (tmp_path / "transformer.safetensors").write_bytes(b"garbage")
        world_model.load_embedded(path=tmp_path)


@pytest.mark.parametrize("rank", [0, 4])
def test_policy_views(rank, tmp_path):
    transformer = tiny_transformer()
    x, pe, pooled = random_inputs(2)
    with torch.no_grad():
        base = sampling.predict(transformer, x, 0.3, pe, pooled)
    policy = models.Policy(transformer, rank, with_old=True)
    with torch.no_grad():
        for p in policy.parameters():  # move the learner away from the base
            p.add_(0.05 * torch.randn_like(p))
        learner = sampling.predict(policy.transformer, x, 0.3, pe, pooled)
        with policy.ref() as ref:
            assert torch.allclose(sampling.predict(ref, x, 0.3, pe, pooled), base, atol=1e-6)
        with policy.old() as old:  # old was copied from the (then zero-effect) learner
            assert torch.allclose(sampling.predict(old, x, 0.3, pe, pooled), base, atol=1e-5)
        policy.update_old(0.0)
        with policy.old() as old:
            assert torch.allclose(sampling.predict(old, x, 0.3, pe, pooled), learner, atol=1e-5)
    assert not torch.allclose(learner, base, atol=1e-4)
    assert all(p.requires_grad for p in policy.parameters()) and len(policy.parameters()) > 0
    n_lora = sum(p.numel() for p in policy.parameters())
    assert (n_lora < 0.2 * sum(p.numel() for p in transformer.parameters())) == (rank > 0)
    # checkpoint round trip
    state = {k: v.clone() for k, v in policy.trainable_state().items()}
    policy2 = models.Policy(tiny_transformer(), rank, with_old=True)
    policy2.load_trainable_state(state)
    with torch.no_grad():
        assert torch.allclose(sampling.predict(policy2.transformer, x, 0.3, pe, pooled), learner, atol=1e-6)


def test_tiny_sd3_samples_scores_saves_and_reloads_lora(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    path = build_tiny_sd3(tmp_path / "sd3")
    model = models.load_model(str(path), "cpu", resolution=32)
    assert model.latent_shape == (4, 16, 16)
    prompts = ["a red circle", "two squares"]
    pe, pooled = model.encode_prompt(prompts)
    # same prompt encoding as diffusers' own pipeline (T5 dropped)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), text_encoder_3=None, tokenizer_3=None)
    pe2, _, pooled2, _ = pipe.encode_prompt(prompts, prompts, None, do_classifier_free_guidance=False, device="cpu",
                                            max_sequence_length=model.max_t5_length)
    assert model.max_t5_length == 128 and pe.shape[1] == 77 + 128
    assert torch.allclose(pe, pe2) and torch.allclose(pooled, pooled2)
    policy = models.Policy(model.transformer, 4, with_old=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    sigmas = model.sigmas(4)
    images = model.decode(sampling.sample(policy.transformer, pe, pooled, sigmas, noise)["latents"])
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    partial, strict, _ = shapes.score(images, [shapes.parse_caption(p) for p in prompts])
    assert partial.shape == (2,)
    policy.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = models.load_model(str(path), "cpu", resolution=32)
    t = load_finetuned(fresh, tmp_path / "run")
    again = fresh.decode(sampling.sample(t, pe, pooled, sigmas, noise)["latents"])
    assert torch.allclose(images, again, atol=1e-5)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))  # diffusers reads it
