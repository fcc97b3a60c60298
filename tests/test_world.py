"""common/world/: the shapes grammar, splits, renderer and mini-GenEval scorer; the embedded base model (its
forward, its weights missing or corrupt, the committed weights drawing shapes); pretraining that resumes exactly."""

import json
import os
import random
from pathlib import Path

import pytest
import torch

from common import models, sampling
from common.evaluate import evaluate_model
from common.world import model as world_model
from common.world import shapes
from tests.helpers import prewarmed

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------------- grammar, renderer, scorer
def test_scorer_on_ground_truth_renders():
    specs = shapes.split_specs("all") * 5
    partial, strict, res = shapes.score(shapes.render_batch(specs, seed=123), specs)
    assert strict.all() and (partial == 1).all()
    assert all(r["stray"] == 0 and not r["extra"] for r in res)


def _with_extra_object(spec, seed):
    """A ground-truth render of `spec` plus one more object placed where it touches nothing."""
    img = shapes.render_batch([spec], seed)[0]
    rng = random.Random(seed)
    for _ in range(1000):
        shape, cx, cy = rng.choice(shapes.SHAPES), rng.uniform(6, 26), rng.uniform(6, 26)
        m = torch.from_numpy(shapes._mask(shape, cx, cy, 5.0))
        grown = torch.from_numpy(shapes._mask(shape, cx, cy, 8.0))
        if not (img.max(0).values[grown] > 0).any():
            img[:, m] = torch.tensor(shapes.COLORS[rng.choice(list(shapes.COLORS))])[:, None]
            return img
    raise AssertionError("no room for an extra object")


def test_scorer_penalises_an_extra_object():
    specs = [s for s in shapes.split_specs("all") if sum(o["count"] for o in s["objects"]) <= 2]
    clean = shapes.render_batch(specs, seed=7)
    extra = torch.stack([_with_extra_object(s, 7 + i) for i, s in enumerate(specs)])
    p0, s0, _ = shapes.score(clean, specs)
    p1, s1, res = shapes.score(extra, specs)
    assert s0.all() and not s1.any()
    assert all(r["extra"] for r in res)
    assert (p1 < p0 - 0.15).all()  # F1 with one unexplained object: 2k / (2k + 1) <= 0.8


def _adversarial_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = {"uniform noise": torch.rand(n, 3, 32, 32, generator=g),
           "sparse noise": torch.rand(n, 3, 32, 32, generator=g) * (torch.rand(n, 1, 32, 32, generator=g) < 0.15),
           "all black": torch.zeros(n, 3, 32, 32),
           "one colour": torch.stack([torch.tensor(shapes.COLORS[c]).view(3, 1, 1).expand(3, 32, 32)
                                      for c in list(shapes.COLORS) * n][:n])}
    # random blobs: smoothed noise thresholded into ragged regions of one colour each
    blob = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 32, 32, generator=g), 7, 1, 3) > 0.55
    colors = torch.tensor(list(shapes.COLORS.values()))[torch.randint(0, 4, (n,), generator=g)]
    out["random blobs"] = blob.float() * colors.view(n, 3, 1, 1)
    # a canvas tiled with small fragments: 3x3 blocks of random colours on a 6-px grid
    frag = torch.zeros(n, 3, 32, 32)
    for i in range(n):
        for y in range(1, 30, 6):
            for x in range(1, 30, 6):
                frag[i, :, y:y + 3, x:x + 3] = colors[torch.randint(0, n, (1,), generator=g)].view(3, 1, 1)
    out["fragments"] = frag
    # 4x4-pixel blocks scattered around (what the v1 base drew)
    blocks = torch.zeros(n, 3, 32, 32)
    for i in range(n):
        for _ in range(8):
            y, x = torch.randint(0, 28, (2,), generator=g).tolist()
            blocks[i, :, y:y + 4, x:x + 4] = colors[torch.randint(0, n, (1,), generator=g)].view(3, 1, 1)
    out["scattered blocks"] = blocks
    return out


def test_scorer_components_match_label_propagation():
    """detect's objects are the 8-connected same-colour components of >= MIN_AREA pixels, in the order of their last
    pixel: checked against an independent computation (labels propagated by 3x3 max-pooling until they settle) on
    renders, blurred and noisy renders and sparse noise, where components touch, split and scatter."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    gt = shapes.render_batch(shapes.split_specs("train")[:24], 0)
    images = torch.cat([gt, F.avg_pool2d(gt, 3, 1, 1), (gt + 0.2 * torch.randn(gt.shape, generator=g)).clamp(0, 1),
                        (torch.rand(24, 3, 32, 32, generator=g) < 0.3).float() * torch.rand(24, 3, 1, 1, generator=g)])
    x = images.clamp(0, 1)
    pix = x.permute(0, 2, 3, 1).reshape(len(x), -1, 3)
    bright = pix.max(-1).values
    d, idx = torch.cdist(pix / bright.clamp_min(1e-6)[..., None], shapes._PROTO[None].expand(len(x), -1, -1)).min(-1)
    colored = (bright > shapes.FG_THRESHOLD) & (d < shapes.COLOR_TOLERANCE)
    n_objects = 0
    for i, det in enumerate(shapes.detect(images)):
        expected = []
        for c, name in enumerate(shapes.COLORS):
            mask = (colored[i] & (idx[i] == c)).reshape(1, 1, 32, 32).float()
            lab = mask * torch.arange(1, 1025, dtype=torch.float32).reshape(1, 1, 32, 32)
            while not torch.equal(new := F.max_pool2d(lab, 3, 1, 1) * mask, lab):
                lab = new
            for v in torch.unique(lab[lab > 0]).tolist():  # a component's label: its last pixel's index + 1
                m = lab[0, 0] == v
                if m.sum() >= shapes.MIN_AREA:
                    expected.append((name, int(m.sum())))
        assert [(o["color"], o["area"]) for o in det["objects"]] == expected, i
        n_objects += len(expected)
    assert n_objects > 150  # the images hold many components


@pytest.mark.parametrize("kind", ["uniform noise", "sparse noise", "all black", "one colour", "random blobs",
                                  "fragments", "scattered blocks"])
def test_scorer_gives_clutter_and_noise_no_credit(kind):
    specs = shapes.split_specs("all")
    images = _adversarial_images(len(specs), seed=3)[kind]
    partial, strict, _ = shapes.score(images, specs)
    assert not strict.any(), kind
    assert partial.max() <= 0.2, (kind, partial.max())


def test_scorer_gives_the_render_of_another_prompt_no_credit():
    specs = shapes.split_specs("all")
    # for each prompt, a prompt that asks for none of its shapes
    shapes_of = [{x["shape"] for x in s["objects"]} for s in specs]
    pairs = [(s, next(o for o, so in zip(specs[::-1], shapes_of[::-1]) if not so & ss))
             for s, ss in zip(specs, shapes_of)]
    partial, strict, _ = shapes.score(shapes.render_batch([o for _, o in pairs], seed=4), [s for s, _ in pairs])
    assert not strict.any() and partial.max() <= 0.2


def test_scorer_checks_colour_count_and_relation():
    spec = shapes.parse_caption("two red circles")
    blue = shapes.render_batch([shapes.parse_caption("two blue circles")], seed=0)
    p, s, r = shapes.score(blue, [spec])
    assert not s.item() and abs(p.item() - 0.5) < 1e-6  # right shape, wrong colour: credit 0.5 each, F1 = 2/4
    three = shapes.render_batch([shapes.parse_caption("three red circles")], seed=0)
    p, s, r = shapes.score(three, [spec])
    assert not s.item() and abs(p.item() - 0.8) < 1e-6  # F1 = 2 * 2 / (2 + 3)
    swapped = shapes.render_batch([shapes.parse_caption("a square left of a circle")], seed=0)
    p, s, r = shapes.score(swapped, [shapes.parse_caption("a square right of a circle")])
    assert not s.item() and not r[0]["relation"] and abs(p.item() - 0.5) < 1e-6


def test_scorer_reads_shapes_not_blobs():
    """Each shape is recognised in every colour, size and position; a square drawn where a circle is asked
    gets no credit; half a shape is an unknown object."""
    for shape in shapes.SHAPES:
        spec = shapes.parse_caption(f"a {shape}")
        imgs = shapes.render_batch([spec] * 40, seed=11)
        det = shapes.detect(imgs)
        assert all([o["shape"] for o in d["objects"]] == [shape] for d in det)
        cut = imgs.clone()
        cut[:, :, :16] = 0  # keep the lower half of the canvas only: shapes in the top half are cut or gone
        for d in shapes.detect(cut):
            assert all(o["shape"] in (shape, "unknown") for o in d["objects"])
    square = shapes.render_batch([shapes.parse_caption("a square")], seed=2)
    p, s, _ = shapes.score(square, [shapes.parse_caption("a circle")])
    assert p.item() == 0 and not s.item()


def _speckle(images, fraction, seed):
    """About `fraction` of the pixels replaced by random colours."""
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(images.shape[0], 1, *images.shape[2:], generator=g) < fraction
    return torch.where(hit, torch.rand(images.shape, generator=g), images)


def _noise_inside_shapes(images, amplitude, seed):
    g = torch.Generator().manual_seed(seed)
    inside = images.max(1, keepdim=True).values > 0
    return (images + amplitude * torch.randn(images.shape, generator=g) * inside).clamp(0, 1)


def _blur(images, sigma):
    """Separable 5-tap Gaussian blur: the soft edges of a few-step sampler, no texture."""
    k = torch.exp(-torch.arange(-2, 3.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 5): one per channel
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (2, 2, 0, 0), mode="replicate"), k, groups=3)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, 2, 2), mode="replicate"),
                                      k.transpose(2, 3), groups=3)


def test_texture_counts_speckle_not_edges():
    """shapes.texture (the fraction of pixels outside their 4 neighbours' range) is exactly 0 on renders and on
    blurred renders (edges are not texture), follows the share of pixels replaced by random colours, and grows with
    the amplitude of noise inside the shapes. Measured on these 333 renders: speckle 0.5 / 1 / 2 / 5 % ->
    0.0051 / 0.0102 / 0.0201 / 0.0488; noise inside shapes of std 0.02 / 0.05 / 0.1 -> 0.033 / 0.069 / 0.079; a
    +-0.05 checkerboard inside shapes -> 0.112 (of 0.139 shape pixels; >= 0.70 of them in every image). The
    committed base: 0.001 (test_committed_base_draws_shapes); Flow-GRPO samples with visible speckle: 0.07-0.37
    (docs/embedded_world.md)."""
    specs = shapes.split_specs("all") * 3
    clean = shapes.render_batch(specs, seed=5)
    assert (shapes.texture(clean) == 0).all()
    for sigma in (0.5, 0.7):
        assert shapes.texture(_blur(clean, sigma)).max() == 0, sigma
    assert shapes.texture(_blur(clean, 1.0)).mean() < 1e-4  # heavier blur: 1 pixel in 333 images (a narrow gap)
    fractions = (0.005, 0.01, 0.02, 0.05)
    speckled = [float(shapes.texture(_speckle(clean, f, 0)).mean()) for f in fractions]
    assert all(0.85 * f <= t <= 1.1 * f for f, t in zip(fractions, speckled)), speckled
    noisy = [float(shapes.texture(_noise_inside_shapes(clean, a, 0)).mean()) for a in (0.02, 0.05, 0.1)]
    assert 0.02 < noisy[0] < noisy[1] < noisy[2], noisy
    inside = clean.max(1, keepdim=True).values > 0
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32)) % 2 * 0.1 - 0.05  # (32, 32), +-0.05
    t = shapes.texture((clean + checker * inside).clamp(0, 1))
    assert (t >= 0.5 * inside.flatten(1).float().mean(1)).all()


def test_grammar_round_trip_and_categories():
    specs = shapes.all_specs()
    assert len({s["caption"] for s in specs}) == len(specs)
    for s in specs:
        assert shapes.parse_caption(s["caption"]) == s
        assert shapes.parse_caption("  " + s["caption"].upper() + " ") == s
    assert set(s["category"] for s in specs) == set(shapes.CATEGORIES)
    with pytest.raises(ValueError, match="cannot parse prompt 'a purple circle'"):
        shapes.parse_caption("a purple circle")


def test_splits_are_deterministic_and_hold_out_compositions():
    train, test = shapes.split_specs("train"), shapes.split_specs("test")
    assert [s["caption"] for s in train] == [s["caption"] for s in shapes.split_specs("train")]
    shared = {s["caption"] for s in train} & {s["caption"] for s in test}
    # only the two categories with 3 captions each are shared; every other test composition is unseen
    assert all(shapes.parse_caption(c)["category"] in ("single_object", "two_object") for c in shared)
    train_keys = {k for s in train for k in shapes._composition_key(s)}
    for s in test:
        if s["category"] not in ("single_object", "two_object"):
            assert any(k in shapes.HELD_OUT and k not in train_keys for k in shapes._composition_key(s)), s
    assert len(test) >= 30 and len(train) >= 80


# ----------------------------------------------------------------------------------- the embedded base model
def test_embedded_model_forward_shapes():
    model = models.load_model("embedded")
    pe, pooled = model.encode_prompt(["a red circle", "two squares", ""])
    assert pe.shape == (3, 10, 64) and pooled.shape == (3, 64)
    v = sampling.predict(model.transformer, torch.randn(3, *model.latent_shape), 0.5, pe, pooled)
    assert v.shape == (3, 3, 32, 32) and model.latent_shape == (3, 32, 32)
    assert model.decode(torch.ones(1, 3, 32, 32)).max() == 1 and model.decode(-torch.ones(1, 3, 32, 32)).min() == 0
    sig = model.sigmas(10)
    assert sig.shape == (11,) and sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fast_cpu_kernels_compute_diffusers_functions(mixed_precision):
    """The fast CPU kernels (the default) give diffusers' kernels' outputs and gradients up to float rounding: fp32
    within 1e-4, bf16 autocast within the difference bf16 itself makes (fp32 vs bf16 with diffusers' kernels); off,
    the model has diffusers' JointAttnProcessor2_0 and GELU."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    torch.manual_seed(0)
    x, t = torch.randn(6, 3, 32, 32), torch.rand(6)
    outs, grads = {}, {}
    for name, mp, fast in (("torch", mixed_precision, False), ("fast", mixed_precision, True), ("fp32", "no", False)):
        model = models.load_model("embedded", mixed_precision=mp, fast_cpu_kernels=fast)
        models.Policy(model.transformer)  # trainable weights in fp32, as in a run
        tr = model.transformer
        procs = {type(p) for p in tr.attn_processors.values()}
        gelus = {type(m) for m in tr.modules() if isinstance(m, GELU)}
        assert procs == {world_model.MatmulJointAttnProcessor if fast else JointAttnProcessor2_0}
        assert gelus == {world_model.SigmoidGELU if fast else GELU}
        pe, pooled = model.encode_prompt(["a red circle above a blue square", "two green triangles"] * 3)
        with torch.no_grad():
            outs[name] = sampling.predict(tr, x, t, pe, pooled)
        sampling.predict(tr, x, t, pe, pooled).pow(2).mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in tr.parameters()])
    if mixed_precision == "no":
        assert (outs["fast"] - outs["torch"]).abs().max() < 1e-4
        assert (grads["fast"] - grads["torch"]).norm() < 1e-4 * grads["torch"].norm()
    else:  # bf16 rounding: the fast kernels are no further from fp32 than diffusers' kernels in bf16 (x1.5)
        assert (outs["fast"] - outs["fp32"]).abs().mean() < 1.5 * (outs["torch"] - outs["fp32"]).abs().mean()
        assert (grads["fast"] - grads["fp32"]).norm() < 1.5 * (grads["torch"] - grads["fp32"]).norm()
        assert (outs["fast"] - outs["torch"]).abs().mean() < 0.02 * outs["torch"].abs().mean()


def test_sigmoid_gelu_is_tanh_gelu():
    gelu = world_model.SigmoidGELU(4, 4, approximate="tanh")
    x = torch.linspace(-8, 8, 10001)
    with torch.no_grad():
        assert torch.allclose(gelu.gelu(x.clone()), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6)
    y = gelu.gelu(x.clone().requires_grad_())  # with gradients: F.gelu itself
    assert torch.equal(y, torch.nn.functional.gelu(x, approximate="tanh"))


def test_committed_base_draws_shapes():
    """The committed v2 base on the train split (1 fixed-noise sample per prompt, default sampler): measured
    strict 0.64, extra-object rate 0.07 (4 samples per prompt: 0.51 / 0.085, the world's target >= 0.5), texture 0.0011
    (renders 0, 1 % of pixels speckled ~0.01); a random init draws nothing the scorer accepts (texture 0.66)."""
    torch.manual_seed(0)
    specs = shapes.split_specs("train")
    base = models.load_model("embedded")
    res = evaluate_model(base, base.transformer, specs, samples_per_prompt=1)
    assert res["strict_accuracy"] >= 0.5 and 1 - res["clean_fraction"] <= 0.15 and res["texture"] <= 0.004, res
    rand = models.load_model("embedded")
    rand.transformer = world_model.build_embedded()[0]
    res_rand = evaluate_model(rand, rand.transformer, specs, samples_per_prompt=1)
    assert res_rand["strict_accuracy"] == 0 and res_rand["reward_mean"] < 0.02 and res_rand["texture"] > 0.3, res_rand


# ----------------------------------------------------------------------------------- pretraining
@pytest.mark.slow  # ~20-50 s: in the full suite, not the fast tier
def test_pretrain_resumes_exactly(tmp_path):
    """4 steps in one go == 2 steps, stop, 2 more from the checkpoint: same EMA weights, bit for bit."""
    def run(tag, *extra):
        out = prewarmed.run(["-m", "common.world.pretrain", "--max-steps", "4", "--batch-size", "4",
                             "--warmup-steps", "2", "--save-every", "2", "--output-dir", str(tmp_path / tag / "w"),
                             "--log-dir", str(tmp_path / tag / "log"), "--threads", "1", *extra],
                            env=ENV, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    run("a")
    assert "stopped at step 2" in run("b", "--stop-after", "2")
    assert "resumed from" in run("b")
    a, b = (world_model.load_embedded(path=tmp_path / t / "w") for t in "ab")
    for (n, p), q in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(p, q), n
    assert json.loads((tmp_path / "b" / "w" / "pretrain_info.json").read_text())["steps"] == 4
    assert a.transformer.config.patch_size == world_model.EMBEDDED_CONFIG["transformer"]["patch_size"]
    bad = prewarmed.run(["-m", "common.world.pretrain", "--max-steps", "5", "--batch-size", "4",
                         "--log-dir", str(tmp_path / "b" / "log"), "--output-dir", str(tmp_path / "c")],
                        env=ENV, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "was written with other arguments" in bad.stderr
