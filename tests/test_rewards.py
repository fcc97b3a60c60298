"""common/rewards.py: registry and spec errors, weighted sums, the embedded rewards; common/reward_models/: the real
transformers rewards (PickScore, CLIPScore, HPSv2, aesthetic, ImageReward, OCR, VLM yes/no) on tiny random models built offline by
tests/helpers/tiny_rewards.py - HPSv2 and ImageReward checked against forwards written here from the original layouts -, and
`remote:<url>` (batches, retries with backoff, URL options) against a fake reward server on 127.0.0.1
(tests/helpers/reward_server.py); each scale variant (pickscore_flowgrpo, clipscore_*, jpeg_compressibility_flowgrpo)
against the formula computed here."""

import importlib.util
import io
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import reward_models, rewards
from common.reward_models import remote
from common.world import shapes
from tests.helpers import prewarmed
from tests.helpers import tiny_rewards
from tests.helpers.reward_server import FakeRewardServer

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
    assert all(name in str(e.value) for name in rewards.REWARDS) and "remote:<url>" in str(e.value)
    assert set(rewards.REWARDS) == {"shapes", "shapes_strict", "jpeg_compressibility", "jpeg_compressibility_flowgrpo",
                                    "jpeg_incompressibility", "pickscore", "pickscore_flowgrpo", "clipscore",
                                    "clipscore_cosine", "clipscore_torchmetrics", "clipscore_hessel", "hpsv2",
                                    "imagereward", "aesthetic", "ocr", "vlm"}


@pytest.mark.parametrize("spec,msg", [("shapes=abc", "malformed reward weight 'abc'"), ("shapes=1=2", "malformed"),
                                      ("shapes=nan", "must be finite"), ("shapes=inf", "must be finite"),
                                      ("", "empty"), (" , ", "empty"), ("remote:", "needs the http"),
                                      ("remote:127.0.0.1:18085", "needs the http"),
                                      ("remote:ftp://host/x", "needs the http"),
                                      ("remote:http://host:port", "needs the http"),
                                      ("remote:http://h:1=x", "malformed reward weight 'x'"),
                                      ("remote:http://h:1?retry=3", "unknown option 'retry'; choose from: "
                                                                    "retries, timeout, backoff"),
                                      ("remote:http://h:1?retries=-1", "retries='-1' must be a whole number >= 0"),
                                      ("remote:http://h:1?retries=1.5", "retries='1.5' must be a whole number >= 0"),
                                      ("remote:http://h:1?timeout=0", "timeout='0' must be a number > 0"),
                                      ("remote:http://h:1?backoff=x", "backoff='x' must be a number >= 0"),
                                      ("remote:http://h:1?timeout=inf", "timeout='inf' must be a number > 0"),
                                      ("remote:http://h:1?retries=2=x", "malformed reward weight 'x'")])
def test_malformed_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        rewards.parse_reward_spec(spec)


def test_parse_defaults_and_spaces():
    assert rewards.parse_reward_spec("shapes") == rewards.parse_reward_spec("shapes=") == {"shapes": 1.0}
    assert rewards.parse_reward_spec(" shapes = 2 , jpeg_compressibility=-0.5 ") == {"shapes": 2.0,
                                                                                     "jpeg_compressibility": -0.5}
    assert rewards.parse_reward_spec("remote:http://10.0.0.1:18085/x=0.5,remote:https://h") == {
        "remote:http://10.0.0.1:18085/x": 0.5, "remote:https://h": 1.0}
    # a server URL's query options stay in its name; the weight follows the last option's value
    assert rewards.parse_reward_spec("remote:http://h:1/x?retries=3&backoff=0.5=2,shapes,remote:http://h:2?timeout=9"
                                     ) == {"remote:http://h:1/x?retries=3&backoff=0.5": 2.0, "shapes": 1.0,
                                           "remote:http://h:2?timeout=9": 1.0}
    assert remote.remote_server("remote:http://h:1/x?retries=3&timeout=60&backoff=0") == (
        "http://h:1/x", {"retries": 3, "timeout": 60.0, "backoff": 0.0})
    assert remote.remote_server("https://h") == ("https://h", {})


def test_reward_paths(tmp_path):
    head = tmp_path / "head.pth"
    head.write_bytes(b"")
    assert rewards.parse_reward_paths(None) == rewards.parse_reward_paths(" , ") == {}
    assert rewards.parse_reward_paths(f"aesthetic={head}, pickscore = org/model|org/proc", "aesthetic=2") == {
        "aesthetic": str(head), "pickscore": "org/model|org/proc"}  # hub ids are not checked on disk
    bad = [("pikscore=/x", None, "unknown reward 'pikscore' in --reward-paths 'pikscore=/x'; choose from: pickscore"),
           ("shapes=/x", None, "unknown reward 'shapes'"), ("aesthetic", None, "gives no path for 'aesthetic'"),
           ("aesthetic=", None, "gives no path"), ("aesthetic=/nonexistent/head.pth", None, "'/nonexistent/head.pth' "
                                                  "does not exist"),
           ("hpsv2=HPS_v2.1_compressed.pt", None, "does not exist"), (f"hpsv2=org/x|{tmp_path}/nope", None, "nope"),
           (None, "shapes,aesthetic", "reward 'aesthetic' needs its MLP head: --reward-paths aesthetic=")]
    for text, spec, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("|", r"\|")) as e:
            rewards.parse_reward_paths(text, spec)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv,expected", [
    (["--reward-paths", "aestetic=head.pth"], "unknown reward 'aestetic' in --reward-paths"),
    (["--reward", "aesthetic"], "reward 'aesthetic' needs its MLP head"),
    (["--reward", "remote:localhost:1"], "needs the http(s) URL of a reward server")])
def test_bad_reward_flags_one_line_before_loading(argv, expected, capsys):
    """Method scripts (all five: test_reliability) and common.tools.evaluate: one line, exit 2, no model loaded."""
    from tests.helpers import cli_check
    from common.tools import evaluate

    code, err = cli_check.check_flags("flow_grpo", argv)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    flags = {a.removeprefix("--").replace("-", "_"): b for a, b in zip(argv[::2], argv[1::2])}
    with pytest.raises(SystemExit) as e:
        evaluate.main(evaluate.Args(**{"reward": "shapes", **flags}))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_weighted_combination_equals_hand_sum():
    specs = shapes.all_specs()[:6]
    x = shapes.render_batch(specs, seed=1)
    x[::2] = torch.rand_like(x[::2])  # half of them wrong, so the shapes part is not constant
    prompts = [s["caption"] for s in specs]
    total, parts = rewards.build_reward("shapes=1.0,jpeg_compressibility=0.1,shapes_strict=-2")(x, prompts, specs)
    hand = (shapes.reward_partial(x, prompts, specs) + 0.1 * -rewards.jpeg_size_kb(x)
            - 2 * shapes.reward_strict(x, prompts, specs))
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
    partial = shapes.reward_partial(x, prompts, specs)
    assert partial.shape == (len(specs),) and partial.mean() > 0.97
    torch.testing.assert_close(shapes.reward_partial(x, prompts, None), partial)  # metadata parsed from captions
    assert shapes.reward_strict(x, prompts).mean() > 0.95
    noise = shapes.reward_partial(images(len(specs)), prompts, specs)
    assert noise.mean() < partial.mean() - 0.3


def test_jpeg_flat_is_more_compressible_than_noise():
    flat, noise = torch.full((2, 3, 64, 64), 0.5), images(2, size=64)
    assert (rewards.jpeg_compressibility(flat) > rewards.jpeg_compressibility(noise)).all()
    assert (rewards.jpeg_incompressibility(flat) < rewards.jpeg_incompressibility(noise)).all()
    torch.testing.assert_close(rewards.jpeg_compressibility(noise), -rewards.jpeg_incompressibility(noise))
    assert rewards.jpeg_size_kb(flat).dtype == torch.float32


def test_jpeg_scales_ddpo_and_flowgrpo():
    """jpeg_compressibility = -kB (DDPO), jpeg_compressibility_flowgrpo = -kB / 500 (Flow-GRPO), kB of a quality-95
    JPEG of the rounded uint8 image, computed here with PIL."""
    x = images(3, size=64)
    x[0] = 0.5  # flat: small file
    kb = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
        kb.append(len(buf.getvalue()) / 1000)
    kb = torch.tensor(kb)
    assert kb[0] < kb[1] / 3
    torch.testing.assert_close(rewards.jpeg_compressibility(x), -kb)
    torch.testing.assert_close(rewards.jpeg_compressibility_flowgrpo(x), -kb / 500)
    total, parts = rewards.build_reward("jpeg_compressibility_flowgrpo=2,jpeg_compressibility")(x, ["a red circle"] * 3)
    torch.testing.assert_close(total, -kb - 2 * kb / 500)


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
    pick = reward_models.PickScore("cpu", model_path=clip_dir, processor_path=clip_dir)
    clip = reward_models.CLIPScore("cpu", model_path=clip_dir, processor_path=clip_dir)
    p, c = check_reward(pick), check_reward(clip)
    assert (c.abs() <= 1 + 1e-5).all()  # a cosine
    torch.testing.assert_close(p, c * pick.model.logit_scale.exp().item())  # PickScore = exp(logit_scale) * cos
    # the score depends on both the text and the image
    x = images(1).expand(2, -1, -1, -1)
    assert (pick(x, ["a red circle", "three blue squares"]).diff().abs() > 1e-4).all()
    assert (pick(images(2, seed=3), ["a red circle"] * 2).diff().abs() > 1e-4).all()


@pytest.fixture(scope="module")
def mixed_clip_dir(tmp_path_factory):
    """The tiny CLIP with a random text projection: its cosines have both signs (the plain tiny CLIP's are ~0.35)."""
    from transformers import CLIPModel

    d = tiny_rewards.build_tiny_clip(tmp_path_factory.mktemp("clip_mixed"))
    model = CLIPModel.from_pretrained(str(d))
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.randn(model.text_projection.weight.shape,
                                                       generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(str(d))
    return str(d)


def test_pickscore_and_clipscore_scales(mixed_clip_dir):
    """Every PickScore / CLIPScore name against its formula on the cosine computed here (CLIPModel's forward, its
    normalised image_embeds . text_embeds): pickscore exp(logit_scale) cos, pickscore_flowgrpo that / 26, clipscore
    and clipscore_cosine cos, clipscore_torchmetrics 100 max(cos, 0), clipscore_hessel 2.5 max(cos, 0). The variants
    load the weights given for the reward they rescale (--reward-paths pickscore=..., clipscore=...)."""
    from transformers import CLIPModel, CLIPProcessor

    d = mixed_clip_dir
    names = ["pickscore", "pickscore_flowgrpo", "clipscore", "clipscore_cosine", "clipscore_torchmetrics",
             "clipscore_hessel"]
    fn = rewards.build_reward(",".join(names), paths=f"pickscore={d}|{d},clipscore={d}|{d}", batch_size=2)
    x, prompts = images(5), PROMPTS
    total, parts = fn(x, prompts)
    model, processor = CLIPModel.from_pretrained(d), CLIPProcessor.from_pretrained(d)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(rewards.to_uint8(x)), return_tensors="pt", padding=True))
    cos, scale = (out.image_embeds * out.text_embeds).sum(-1), model.logit_scale.exp().item()
    assert (cos > 0.01).any() and (cos < -0.01).any() and abs(scale - 26) > 1  # the clamps and scales matter
    expected = {"pickscore": scale * cos, "pickscore_flowgrpo": scale * cos / 26, "clipscore": cos,
                "clipscore_cosine": cos, "clipscore_torchmetrics": 100 * cos.clamp(min=0),
                "clipscore_hessel": 2.5 * cos.clamp(min=0)}
    for name in names:
        torch.testing.assert_close(parts[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(total, sum(expected.values()), atol=1e-4, rtol=1e-4)
    assert type(fn.fns["clipscore_hessel"]) is reward_models.CLIPScoreHessel
    assert all(reward_models.REAL_DEFAULT_PATHS[v] == reward_models.REAL_DEFAULT_PATHS[b]
               for v, b in reward_models.SAME_WEIGHTS.items())  # the same default weights too


def test_vlm_yes_no_llava(llava_dir):
    vlm = reward_models.VLMYesNo("cpu", model_path=llava_dir)
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
    vlm = reward_models.VLMYesNo("cpu", model_path=qwen_dir)
    r = check_reward(vlm)
    assert ((r >= 0) & (r <= 100)).all()


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the error without torchvision")
def test_vlm_qwen_without_torchvision_says_why(qwen_dir):
    from transformers import AutoModelForImageTextToText

    assert type(AutoModelForImageTextToText.from_pretrained(qwen_dir)).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with pytest.raises(ImportError, match="(?i)torchvision"):
        reward_models.VLMYesNo("cpu", model_path=qwen_dir)


def test_build_reward_with_paths(clip_dir, llava_dir):
    fn = rewards.build_reward("pickscore=1.0,vlm=0.1,shapes", "cpu",
                              paths={"pickscore": f"{clip_dir}|{clip_dir}", "vlm": llava_dir})
    x, prompts = images(3), PROMPTS[:3]
    total, parts = fn(x, prompts, [shapes.parse_caption(p) for p in prompts])
    assert set(parts) == {"pickscore", "vlm", "shapes"} and all(v.shape == (3,) for v in parts.values())
    torch.testing.assert_close(total, parts["pickscore"] + 0.1 * parts["vlm"] + parts["shapes"])
    torch.testing.assert_close(parts["pickscore"], reward_models.PickScore("cpu", clip_dir, clip_dir)(x, prompts))


# ----------------------------------------------------------------------------------- HPSv2, aesthetic, ImageReward
# Reference forwards written from the original code's layout (OpenCLIP's and BLIP's modules), not from transformers:
# the converted transformers models must give the same numbers.
F = torch.nn.functional


def _lin(x, sd, p):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _attention(q, k, v, heads, mask=None):
    """(B, L, D), (B, S, D), (B, S, D) -> (B, L, D): softmax(q k^T / sqrt(d) + mask) v per head."""
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    w = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    return ((w if mask is None else w + mask).softmax(-1) @ split(v)).transpose(1, 2).flatten(2)


def _patches(pixels, weight, bias=None):
    x = F.conv2d(pixels, weight, bias, stride=weight.shape[-1])  # (B, D, g, g)
    return x.flatten(2).transpose(1, 2)  # (B, g*g, D)


def openclip_reference(sd, pixels, ids, eos_id, heads):
    """HPSv2's score: cos(encode_image, encode_text) of OpenCLIP's ViT (pre-LN resblocks, fused in_proj, GELU)."""
    def blocks(x, prefix, mask=None):
        n = 1 + max(int(k.removeprefix(prefix).split(".")[0]) for k in sd if k.startswith(prefix))
        for i in range(n):
            p = f"{prefix}{i}."
            q, k, v = (_ln(x, sd, p + "ln_1", 1e-5) @ sd[p + "attn.in_proj_weight"].T
                       + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
            x = x + _lin(_attention(q, k, v, heads, mask), sd, p + "attn.out_proj")
            x = x + _lin(F.gelu(_lin(_ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")
        return x

    x = _patches(pixels, sd["visual.conv1.weight"])
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = blocks(_ln(x, sd, "visual.ln_pre", 1e-5), "visual.transformer.resblocks.")
    img = _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]
    n = ids.shape[1]
    t = blocks(sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n], "transformer.resblocks.",
               torch.full((n, n), -torch.inf).triu(1))
    # OpenCLIP pools at argmax(ids): the end-of-text token, the largest id of its vocab (not of the toy one)
    eos = (ids == eos_id).int().argmax(1)
    txt = _ln(t, sd, "ln_final", 1e-5)[torch.arange(len(ids)), eos] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


def imagereward_reference(sd, pixels, ids, mask, heads):
    """ImageReward.score: BLIP ViT (pre-LN, fused qkv, eps 1e-6) -> BERT (post-LN, eps 1e-12) whose layers
    self-attend, cross-attend to the image tokens and feed forward -> [CLS] -> MLP head -> (r - mean) / std."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = _patches(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"])
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, -1), x], 1) + sd[v + "pos_embed"]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        p = f"{v}blocks.{i}."
        x = x + _lin(_attention(*_lin(_ln(x, sd, p + "norm1", 1e-6), sd, p + "attn.qkv").chunk(3, -1), heads), sd,
                     p + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        i += 1
    img = _ln(x, sd, v + "norm", 1e-6)
    e = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    e = _ln(e, sd, t + "embeddings.LayerNorm", 1e-12)
    pad = (1 - mask[:, None, None, :].float()) * -1e4  # BERT's extended attention mask
    i = 0
    while f"{t}encoder.layer.{i}.output.dense.weight" in sd:
        p = f"{t}encoder.layer.{i}."
        for att, kv, m in (("attention", e, pad), ("crossattention", img, None)):
            a = _attention(_lin(e, sd, f"{p}{att}.self.query"), _lin(kv, sd, f"{p}{att}.self.key"),
                           _lin(kv, sd, f"{p}{att}.self.value"), heads, m)
            e = _ln(_lin(a, sd, f"{p}{att}.output.dense") + e, sd, f"{p}{att}.output.LayerNorm", 1e-12)
        e = _ln(_lin(F.gelu(_lin(e, sd, p + "intermediate.dense")), sd, p + "output.dense") + e, sd,
                p + "output.LayerNorm", 1e-12)
        i += 1
    h = e[:, 0]
    for j in (0, 2, 4, 6, 7):
        h = _lin(h, sd, f"mlp.layers.{j}")
    return (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def gelu_clip_dir(tmp_path_factory):
    return str(tiny_rewards.build_tiny_clip(tmp_path_factory.mktemp("clip_gelu"), hidden_act="gelu"))


def test_hpsv2_openclip_checkpoint_converted(gelu_clip_dir, tmp_path):
    ckpt = tiny_rewards.build_tiny_hps(tmp_path, gelu_clip_dir)
    hps = reward_models.HPSv2("cpu", str(ckpt), gelu_clip_dir)
    r = check_reward(hps)
    assert (r.abs() <= 1 + 1e-5).all()  # a cosine
    x, prompts = images(3), PROMPTS[:3]
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    pix = hps.processor(images=list(rewards.to_uint8(x)), return_tensors="pt")["pixel_values"]
    ids = hps.processor(text=prompts, padding=True, return_tensors="pt")["input_ids"]
    ref = openclip_reference(sd, pix, ids, hps.processor.tokenizer.eos_token_id, heads=4)
    torch.testing.assert_close(hps(x, prompts), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hps.model.logit_scale, sd["logit_scale"])
    # a directory holding HPS_v2.1_compressed.pt works too, and a converted model (save_pretrained) loads as is
    (tmp_path / "hub").mkdir()
    ckpt.rename(tmp_path / "hub" / "HPS_v2.1_compressed.pt")
    hps.model.save_pretrained(str(tmp_path / "converted"))
    for path in ("hub", "converted"):
        torch.testing.assert_close(reward_models.HPSv2("cpu", str(tmp_path / path), gelu_clip_dir)(x, prompts), ref,
                                   atol=1e-5, rtol=1e-5)
    # an OpenCLIP key that has no place in CLIPModel (e.g. a layer scale) is an error, not silently dropped
    with pytest.raises(ValueError, match="no place in a transformers CLIPModel.*ls_1.gamma"):
        reward_models.openclip_to_transformers({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})


def test_aesthetic_is_the_head_on_the_normalised_clip_embedding(clip_dir, tmp_path):
    head = tiny_rewards.AestheticHead(16).eval()  # the tiny CLIP's embeddings are 16-d (ViT-L/14: 768)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    fn = reward_models.Aesthetic("cpu", str(tmp_path / "head.pth"), clip_dir)
    r = check_reward(fn)
    x = images(5)
    pix = fn.processor(images=list(rewards.to_uint8(x)), return_tensors="pt")["pixel_values"]
    emb = reward_models.clip._features(fn.model.get_image_features(pixel_values=pix))
    with torch.no_grad():
        torch.testing.assert_close(r, head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1))
    assert r.diff().abs().max() > 1e-4  # depends on the image
    with pytest.raises(ValueError, match="needs its MLP head"):
        reward_models.Aesthetic("cpu", None, clip_dir)
    torch.save({"weight": torch.ones(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an MLP head"):
        reward_models.Aesthetic("cpu", str(tmp_path / "bad.pth"), clip_dir)


def test_pil_pixels_resize_crop_normalise():
    x = torch.zeros(2, 3, 40, 60)
    x[:, 0] = 1.0  # pure red
    pix = reward_models.imagereward._pil_pixels(x, 32)
    assert pix.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pix[:, :, 5, 5], torch.tensor([(1 - 0.48145466) / 0.26862954,
                                                              -0.4578275 / 0.26130258, -0.40821073 / 0.27577711]
                                                             ).expand(2, 3))
    x = torch.zeros(1, 3, 64, 128)
    x[..., 64:] = 1.0  # left half black, right half white: the centre crop of the 32x64 resize keeps columns 16-47
    col = reward_models.imagereward._pil_pixels(x, 32)[0, 0, 16]
    assert (col[:14] < 0).all() and (col[18:] > 0).all()


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    return str(tiny_rewards.build_tiny_imagereward(tmp_path_factory.mktemp("imagereward")))


def test_imagereward_matches_blip_reference(imagereward_dir):
    fn = reward_models.ImageReward("cpu", imagereward_dir, imagereward_dir)
    r = check_reward(fn)
    x, prompts = images(3), PROMPTS[:3]
    sd = torch.load(Path(imagereward_dir) / "ImageReward.pt", weights_only=True)
    tok = fn.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (tok["input_ids"][:, 0] == fn.tokenizer.cls_token_id).all() and tok["input_ids"].shape == (3, 35)
    ref = imagereward_reference(sd, reward_models.imagereward._pil_pixels(x, 32), tok["input_ids"], tok["attention_mask"], heads=2)
    torch.testing.assert_close(r[:3], ref, atol=1e-4, rtol=1e-4)
    assert fn.vision.config.num_attention_heads == fn.text.config.num_attention_heads == 2  # 128 / 64
    xs = images(1).expand(2, -1, -1, -1)
    assert fn(xs, ["a red circle", "two blue squares"]).diff().abs() > 1e-4  # the prompt matters


# ----------------------------------------------------------------------------------- OCR
def test_edit_distance_by_hand():
    for a, b, d in [("", "", 0), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0), ("kitten", "sitting", 3),
                    ("flaw", "lawn", 2), ("intention", "execution", 5), ("ab", "ba", 2), ("a", "b", 1)]:
        assert reward_models.edit_distance(a, b) == reward_models.edit_distance(b, a) == d, (a, b)


def test_ocr_reward_by_hand():
    assert reward_models.ocr_target('A neon sign that says "Hello World" at night') == "Hello World"
    assert reward_models.ocr_target('a "x" and "y"') == "x"  # the first quoted span, as Flow-GRPO
    assert reward_models.ocr_target("no quotes", {"text": "OPEN 24h"}) == "OPEN 24h"  # a prompts file's "text" first
    with pytest.raises(ValueError, match="double quotes"):
        reward_models.ocr_target("a sign without quotes")
    target = "Hello World"  # compared as "helloworld", 10 characters
    for recognised, reward in [("hello world", 1.0), ("HELLOWORLD", 1.0), ("xx Hello World!! yy", 1.0),  # contained
                               ("hello wrld", 0.9), ("helo wrld", 0.8), ("jello world", 0.9), ("", 0.0),
                               ("completely unrelated text", 0.0)]:  # distance capped at 10
        assert reward_models.ocr_reward(recognised, target) == pytest.approx(reward), recognised


@pytest.fixture(scope="module")
def trocr_dir(tmp_path_factory):
    return str(tiny_rewards.build_tiny_trocr(tmp_path_factory.mktemp("trocr")))


def test_ocr_reward_from_the_recogniser(trocr_dir):
    fn = reward_models.OCR("cpu", trocr_dir)
    x = images(3)
    prompts = ['a sign saying "OPEN"', 'a mug with "Hi Mom" on it', 'graffiti reading "cleanflow 2"']
    pix = fn.processor(images=list(rewards.to_uint8(x)), return_tensors="pt")["pixel_values"]
    texts = fn.processor.batch_decode(fn.model.generate(pix, do_sample=False, num_beams=1, max_new_tokens=48),
                                      skip_special_tokens=True)
    assert fn.recognise(x) == texts
    torch.testing.assert_close(fn(x, prompts), torch.tensor([reward_models.ocr_reward(t, g) for t, g in
                                                             zip(texts, ["OPEN", "Hi Mom", "cleanflow 2"])]))
    fn.recognise = lambda imgs: ["0PEN", "hi mom", "cleanflow"]  # known readings -> hand values
    torch.testing.assert_close(fn(x, prompts), torch.tensor([0.75, 1.0, 0.9]))
    meta = [None, {"text": "mom"}, {"prompt": prompts[2]}]
    torch.testing.assert_close(fn(x, prompts, meta), torch.tensor([0.75, 1.0, 0.9]))


# ----------------------------------------------------------------------------------- remote reward server
@pytest.fixture
def server():
    s = FakeRewardServer()
    yield s
    s.close()


def test_remote_reward_returns_what_the_server_computed(server):
    x, prompts = images(5), PROMPTS[:5]
    meta = [shapes.parse_caption(p) for p in prompts[:4]] + [None]
    fn = rewards.build_reward(f"remote:{server.url}=2.0,shapes", batch_size=2)
    total, parts = fn(x, prompts, meta)
    name = f"remote:{server.url}"
    assert len(server.requests) == 3 and [len(r["images"]) for r in server.requests] == [2, 2, 1]  # batches of 2
    torch.testing.assert_close(parts[name], torch.tensor(server.scores))
    torch.testing.assert_close(total, 2 * parts[name] + parts["shapes"])
    sent = server.requests[0]
    assert sent["prompts"] == prompts[:2] and sent["meta_datas"] == meta[:2] and sent["only_strict"] is True
    assert server.requests[2]["meta_datas"] == [{"prompt": prompts[4]}]  # no metadata: the prompt
    jpeg = np.asarray(Image.open(io.BytesIO(sent["images"][0])))  # JPEG of the uint8 image, lossy
    assert jpeg.shape == (32, 32, 3) and abs(jpeg.mean() / 255 - x[0].mean().item()) < 0.02


def test_remote_reward_outputs_key_and_one_retry(monkeypatch):
    slept = []
    monkeypatch.setattr(remote, "sleep", slept.append)
    s = FakeRewardServer(key="outputs", fail_first=1)  # DeQA / UnifiedReward answer "outputs"
    try:
        r = reward_models.RemoteReward(s.url)(images(3), PROMPTS[:3])
        assert len(s.requests) == 2 and slept == [1.0]  # the failed request and, 1 s later, its one retry
        torch.testing.assert_close(r, torch.tensor(s.scores))
    finally:
        s.close()
    s = FakeRewardServer(fail_first=10)
    try:
        with pytest.raises(ConnectionError, match=rf"reward server {s.url} answered HTTP 500: KeyError: 'tag' \(2 tries"):
            reward_models.RemoteReward(s.url)(images(1), PROMPTS[:1])
        assert len(s.requests) == 2  # retried at most once
    finally:
        s.close()


def test_remote_reward_retries_5xx_with_exponential_backoff(monkeypatch):
    """A 5xx answer is tried again after backoff, 2 x backoff, 4 x backoff, ... seconds (at most 120); when `retries`
    more tries have failed, one line says so; a 4xx answer is not retried."""
    slept = []
    monkeypatch.setattr(remote, "sleep", slept.append)
    s = FakeRewardServer(fail_first=3, fail_code=503)
    try:
        r = reward_models.RemoteReward(s.url, retries=3, backoff=0.5)(images(2), PROMPTS[:2])
        assert len(s.requests) == 4 and slept == [0.5, 1.0, 2.0]
        assert len(s.scores) == 2  # only the 4th try was answered
        torch.testing.assert_close(r, torch.tensor(s.scores))
    finally:
        s.close()
    slept.clear()
    s = FakeRewardServer(fail_first=100)
    try:
        with pytest.raises(ConnectionError) as e:
            reward_models.RemoteReward(s.url, retries=4, backoff=30, timeout=5)(images(1), PROMPTS[:1])
        assert str(e.value) == (f"reward server {s.url} answered HTTP 500: KeyError: 'tag' (5 tries, backoff 30 s "
                                "doubling, timeout 5 s)")
        assert len(s.requests) == 5 and slept == [30, 60, 120, 120]  # doubling, capped at 120 s
    finally:
        s.close()
    slept.clear()
    s = FakeRewardServer(fail_first=100, fail_code=400)
    try:
        with pytest.raises(ConnectionError) as e:
            reward_models.RemoteReward(s.url, retries=4)(images(1), PROMPTS[:1])
        assert str(e.value) == f"reward server {s.url} answered HTTP 400: KeyError: 'tag' (not retried: a client error)"
        assert len(s.requests) == 1 and slept == []
    finally:
        s.close()


def test_remote_reward_url_options(monkeypatch):
    """`remote:<url>?retries=..&timeout=..&backoff=..=weight` reaches RemoteReward; requests go to the URL without
    the query."""
    slept = []
    monkeypatch.setattr(remote, "sleep", slept.append)
    s = FakeRewardServer(fail_first=2)
    try:
        name = f"remote:{s.url}/score?retries=2&timeout=7.5&backoff=0.25"
        fn = rewards.build_reward(f"{name}=3,shapes", batch_size=4)
        r = fn.fns[name]
        assert (r.url, r.retries, r.timeout, r.backoff, r.batch_size) == (f"{s.url}/score", 2, 7.5, 0.25, 4)
        x = images(3)
        total, parts = fn(x, PROMPTS[:3])
        assert s.paths == ["/score"] * 3 and slept == [0.25, 0.5]
        torch.testing.assert_close(parts[name], torch.tensor(s.scores))
        torch.testing.assert_close(total, 3 * torch.tensor(s.scores) + shapes.reward_partial(x, PROMPTS[:3]))
    finally:
        s.close()


def test_remote_reward_timeout():
    s = FakeRewardServer(delay=1.5)
    try:
        fn = reward_models.RemoteReward(s.url, timeout=0.3)
        t0 = time.time()
        with pytest.raises(ConnectionError, match=rf"reward server {s.url} is down or unreachable: .*timed out"):
            fn(images(1), PROMPTS[:1])
        assert time.time() - t0 < 3.5  # two tries of 0.3 s + the 1 s pause, not the server's 3 s
    finally:
        s.close()


def test_remote_reward_server_down():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nobody listens there now
    with pytest.raises(RuntimeError, match=rf"reward 'remote:{url}' could not be set up: ConnectionError: reward "
                                           rf"server {url} is down or unreachable") as e:
        rewards.build_reward(f"remote:{url}")
    assert "\n" not in str(e.value)
    s = FakeRewardServer()  # up at start, gone later: the call names the server
    fn = rewards.build_reward(f"remote:{s.url}")
    s.close()
    with pytest.raises(RuntimeError, match=rf"reward 'remote:{s.url}' failed .* reward server {s.url} is down or "
                                           r"unreachable: .*refused \(2 tries"):
        fn(images(1), PROMPTS[:1])


def test_remote_reward_bad_answer(server):
    server.key = "something_else"
    with pytest.raises(ValueError, match=rf"{server.url} answered dict \['rewards', 'something_else'\]; expected"):
        reward_models.RemoteReward(server.url)(images(2), PROMPTS[:2])


# ----------------------------------------------------------------------------------- --reward-paths end to end
def test_build_reward_with_reward_paths_text(gelu_clip_dir, imagereward_dir, trocr_dir, tmp_path):
    head = tiny_rewards.AestheticHead(16)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    hps = tiny_rewards.build_tiny_hps(tmp_path, gelu_clip_dir)
    text = (f"aesthetic={tmp_path / 'head.pth'}|{gelu_clip_dir},hpsv2={hps}|{gelu_clip_dir},"
            f"imagereward={imagereward_dir}|{imagereward_dir},ocr={trocr_dir}")
    fn = rewards.build_reward("aesthetic=0.5,hpsv2,imagereward,ocr=2", "cpu", paths=text, batch_size=2)
    prompts = ['a sign saying "OPEN"', 'a mug with "Hi Mom" on it', 'graffiti reading "cleanflow 2"']
    total, parts = fn(images(3), prompts)
    assert set(parts) == {"aesthetic", "hpsv2", "imagereward", "ocr"}
    torch.testing.assert_close(total, 0.5 * parts["aesthetic"] + parts["hpsv2"] + parts["imagereward"]
                               + 2 * parts["ocr"])
    with pytest.raises(RuntimeError, match="reward 'hpsv2' could not be set up: .*does not fit the CLIP config"):
        rewards.build_reward("hpsv2", paths={"hpsv2": f"{hps}|{imagereward_dir}"})  # no CLIP config there


ROOT = Path(__file__).resolve().parents[1]
TINY = {m: ["--prompts-per-iter", "2", "--group-size", "2" if m == "fdfo" else "3", "--train-batch-size",
            "2" if m == "fdfo" else "3", "--eval-samples-per-prompt", "1", "--num-steps", "4", "--threads", "1",
            "--num-iterations", "1", *(["--num-minibatches", "1"] if m == "flow_grpo" else [])]
        for m in ("advantageflow", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo")}


@pytest.fixture(scope="module")
def aesthetic_paths(clip_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    torch.save(tiny_rewards.AestheticHead(16).state_dict(), d / "head.pth")
    return f"aesthetic={d / 'head.pth'}|{clip_dir}"


@pytest.mark.parametrize("method", [m if m == "advantageflow" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in TINY])
def test_method_script_takes_reward_paths(method, aesthetic_paths, tmp_path):
    """`--reward-paths` reaches build_reward in every script: one iteration with the aesthetic reward logs it."""
    from tests.helpers.run_logs import scalars

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = prewarmed.run([f"{method}.py", *TINY[method], "--reward", "shapes,aesthetic=0.1",
                         "--reward-paths", aesthetic_paths, "--output-dir", str(tmp_path / "run")],
                        cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(scalars(tmp_path / "run", "charts/reward_aesthetic")) == 1


def test_evaluate_takes_reward_paths(aesthetic_paths, tmp_path):
    from common.tools import evaluate

    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    evaluate.main(evaluate.Args(prompts_file=str(tmp_path / "p.txt"), samples_per_prompt=1, num_steps=2,
                                reward="aesthetic", reward_paths=aesthetic_paths, json=str(tmp_path / "r.json")))
    res = json.loads((tmp_path / "r.json").read_text())
    assert np.isfinite(res["train_reward_mean"]) and res["train_reward_mean"] != res["reward_mean"]


def test_a_registered_reward_of_ones_own(monkeypatch):
    """`rewards.register` (what README's Rewards section tells a fork to call): the new name builds, combines with
    the registered ones by weight, and is listed among the choices."""
    monkeypatch.setitem(rewards.REWARDS, "brightness", None)  # restored after the test
    rewards.register("brightness", lambda x, prompts, metadata=None: x.mean((1, 2, 3)))
    x = images(3)
    total, parts = rewards.build_reward("shapes=1,brightness=0.5")(x, PROMPTS[:3])
    torch.testing.assert_close(parts["brightness"], x.mean((1, 2, 3)))
    torch.testing.assert_close(total, shapes.reward_partial(x, PROMPTS[:3]) + 0.5 * x.mean((1, 2, 3)))
    assert "brightness" in rewards.choices()
