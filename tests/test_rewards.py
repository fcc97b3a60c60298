"""common/rewards.py: registry and spec errors, weighted sums, the embedded rewards, and the real transformers
rewards (PickScore, CLIPScore, VLM yes/no) on tiny random models built offline by tests/tiny_rewards.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_rewards  # noqa: E402
from common import rewards, shapes  # noqa: E402

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
PROMPTS = ["a red circle", "two blue squares", "a triangle left of a circle", "three circles",
           "a yellow circle and a green triangle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(tiny_rewards.build_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(tiny_rewards.build_tiny_llava(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return str(tiny_rewards.build_tiny_qwen_vl(tmp_path_factory.mktemp("qwen")))


def images(n=5, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- registry and specs
def test_unknown_reward_lists_choices():
    with pytest.raises(ValueError, match="unknown reward 'nope'") as e:
        rewards.build_reward("shapes=1.0,nope=2")
    assert all(name in str(e.value) for name in rewards.REWARDS)
    assert set(rewards.REWARDS) == {"shapes", "shapes_strict", "jpeg_compressibility", "jpeg_incompressibility",
                                    "pickscore", "clipscore", "vlm"}


@pytest.mark.parametrize("spec,msg", [("shapes=abc", "malformed reward weight 'abc'"), ("shapes=1=2", "malformed"),
                                      ("shapes=nan", "must be finite"), ("shapes=inf", "must be finite"),
                                      ("", "empty"), (" , ", "empty")])
def test_malformed_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        rewards.parse_reward_spec(spec)


def test_parse_defaults_and_spaces():
    assert rewards.parse_reward_spec("shapes") == rewards.parse_reward_spec("shapes=") == {"shapes": 1.0}
    assert rewards.parse_reward_spec(" shapes = 2 , jpeg_compressibility=-0.5 ") == {"shapes": 2.0,
                                                                                     "jpeg_compressibility": -0.5}


def test_weighted_combination_equals_hand_sum():
    specs = shapes.all_specs()[:6]
    x = shapes.render_batch(specs, seed=1)
    x[::2] = torch.rand_like(x[::2])  # half of them wrong, so the shapes part is not constant
    prompts = [s["caption"] for s in specs]
    total, parts = rewards.build_reward("shapes=1.0,jpeg_compressibility=0.1,shapes_strict=-2")(x, prompts, specs)
    hand = (rewards.shapes_partial(x, prompts, specs) + 0.1 * -rewards.jpeg_size_kb(x)
            - 2 * rewards.shapes_strict(x, prompts, specs))
    assert set(parts) == {"shapes", "jpeg_compressibility", "shapes_strict"}
    assert total.shape == (6,) and total.dtype == torch.float32
    torch.testing.assert_close(total, hand)
    by_parts = parts["shapes"] + 0.1 * parts["jpeg_compressibility"] - 2 * parts["shapes_strict"]
    torch.testing.assert_close(total, by_parts)


def test_failing_reward_names_itself():
    with pytest.raises(RuntimeError, match="reward 'shapes' failed.*cannot parse prompt"):
        rewards.build_reward("shapes")(images(2), ["not a caption", "a red circle"], None)


# ----------------------------------------------------------------------------------- embedded rewards
def test_shapes_on_ground_truth_renders():
    specs = shapes.all_specs()
    x = shapes.render_batch(specs, seed=0)
    prompts = [s["caption"] for s in specs]
    partial = rewards.shapes_partial(x, prompts, specs)
    assert partial.shape == (len(specs),) and partial.mean() > 0.97
    torch.testing.assert_close(rewards.shapes_partial(x, prompts, None), partial)  # metadata parsed from captions
    assert rewards.shapes_strict(x, prompts).mean() > 0.95
    noise = rewards.shapes_partial(images(len(specs)), prompts, specs)
    assert noise.mean() < partial.mean() - 0.3


def test_jpeg_flat_is_more_compressible_than_noise():
    flat, noise = torch.full((2, 3, 64, 64), 0.5), images(2, size=64)
    assert (rewards.jpeg_compressibility(flat) > rewards.jpeg_compressibility(noise)).all()
    assert (rewards.jpeg_incompressibility(flat) < rewards.jpeg_incompressibility(noise)).all()
    torch.testing.assert_close(rewards.jpeg_compressibility(noise), -rewards.jpeg_incompressibility(noise))
    assert rewards.jpeg_size_kb(flat).dtype == torch.float32


# ----------------------------------------------------------------------------------- real rewards, tiny models
def check_reward(fn, n=5):
    """shape (N,), float32, finite; a batch size smaller than N gives the same values as one batch."""
    x = images(n)
    full = fn(x, PROMPTS[:n])
    assert full.shape == (n,) and full.dtype == torch.float32 and torch.isfinite(full).all()
    fn.batch_size = 2
    torch.testing.assert_close(fn(x, tuple(PROMPTS[:n])), full, atol=1e-4, rtol=1e-4)  # tuples of prompts work too
    return full


def test_pickscore_and_clipscore(clip_dir):
    pick = rewards.PickScore("cpu", model_path=clip_dir, processor_path=clip_dir)
    clip = rewards.CLIPScore("cpu", model_path=clip_dir, processor_path=clip_dir)
    p, c = check_reward(pick), check_reward(clip)
    assert (c.abs() <= 1 + 1e-5).all()  # a cosine
    torch.testing.assert_close(p, c * pick.model.logit_scale.exp().item())  # PickScore = exp(logit_scale) * cos
    # the score depends on both the text and the image
    x = images(1).expand(2, -1, -1, -1)
    assert (pick(x, ["a red circle", "three blue squares"]).diff().abs() > 1e-4).all()
    assert (pick(images(2, seed=3), ["a red circle"] * 2).diff().abs() > 1e-4).all()


def test_vlm_yes_no_llava(llava_dir):
    vlm = rewards.VLMYesNo("cpu", model_path=llava_dir)
    r = check_reward(vlm)
    assert ((r >= 0) & (r <= 100)).all()
    # reward = 100 * sigmoid(logit_Yes - logit_No) of the next token after the chat template's assistant turn
    tok = vlm.processor.tokenizer
    assert (tok.convert_ids_to_tokens(vlm.yes), tok.convert_ids_to_tokens(vlm.no)) == ("Yes", "No")
    x = images(1)
    msgs = [{"role": "system", "content": [{"type": "text", "text": vlm.system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.question.format(prompt="x")}]}]
    text = vlm.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("assistant\n") and 'match the caption "x"' in text
    big = torch.nn.functional.interpolate(x, size=(504, 504), mode="bilinear")
    inputs = vlm.processor(text=[text], images=list(rewards.to_uint8(big)), return_tensors="pt")
    logits = vlm.model(**inputs).logits[0, -1]
    torch.testing.assert_close(vlm(x, ["x"]), 100 * torch.sigmoid(logits[vlm.yes] - logits[vlm.no])[None])
    assert (vlm(images(1).expand(2, -1, -1, -1), ["a red circle", "three blue squares"]).diff().abs() > 1e-5).all()


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' Qwen2.5-VL processor needs torchvision")
def test_vlm_yes_no_qwen(qwen_dir):
    vlm = rewards.VLMYesNo("cpu", model_path=qwen_dir)
    r = check_reward(vlm)
    assert ((r >= 0) & (r <= 100)).all()


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the error without torchvision")
def test_vlm_qwen_without_torchvision_says_why(qwen_dir):
    from transformers import AutoModelForImageTextToText

    assert type(AutoModelForImageTextToText.from_pretrained(qwen_dir)).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with pytest.raises(ImportError, match="(?i)torchvision"):
        rewards.VLMYesNo("cpu", model_path=qwen_dir)


def test_build_reward_with_paths(clip_dir, llava_dir):
    fn = rewards.build_reward("pickscore=1.0,vlm=0.1,shapes", "cpu",
                              paths={"pickscore": f"{clip_dir}|{clip_dir}", "vlm": llava_dir})
    x, prompts = images(3), PROMPTS[:3]
    total, parts = fn(x, prompts, [shapes.parse_caption(p) for p in prompts])
    assert set(parts) == {"pickscore", "vlm", "shapes"} and all(v.shape == (3,) for v in parts.values())
    torch.testing.assert_close(total, parts["pickscore"] + 0.1 * parts["vlm"] + parts["shapes"])
    torch.testing.assert_close(parts["pickscore"], rewards.PickScore("cpu", clip_dir, clip_dir)(x, prompts))
