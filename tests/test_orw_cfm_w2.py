"""Tests of orw_cfm_w2.py: the weights and the loss against hand computations, the two special cases named by the
paper (tau = 0, alpha = 0 is plain flow matching on the model's own samples; the W2 term vanishes while the learner
equals the reference), flag checks, smoke runs on the embedded and the tiny SD3 model, and two learning tests."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import orw_cfm_w2 as orw
from common import models, sampling
from tests.helpers import prewarmed
from tests.helpers.cli_check import check_flags
from tests.helpers.learning import gains, train_eval_flags
from tests.helpers.embedded import random_inputs, tiny_transformer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SCRIPT = str(ROOT / "orw_cfm_w2.py")


# ----------------------------------------------------------------------------------- weights and loss
def test_weights_match_hand_values():
    r = torch.tensor([0.0, 0.5, 1.0])
    w = orw.orw_weights(r, tau=2.0)
    assert torch.allclose(w, torch.tensor([1.0, math.e, math.e ** 2]))
    wn = orw.orw_weights(r, tau=2.0, norm="pool")  # w / mean(w)
    s = 1 + math.e + math.e ** 2
    assert torch.allclose(wn, torch.tensor([3 / s, 3 * math.e / s, 3 * math.e ** 2 / s]))
    assert torch.allclose(orw.orw_weights(r, tau=0.0), torch.ones(3))  # tau = 0: unweighted
    # raw weights clamp the exponent; normalised ones are exact (softmax) even for huge tau * r
    assert torch.allclose(orw.orw_weights(torch.tensor([100.0]), tau=1.0, max_exponent=20.0), torch.tensor([math.exp(20)]))
    big = orw.orw_weights(torch.tensor([1000.0, 999.0]), tau=1.0, norm="pool")
    assert torch.allclose(big, torch.tensor([2 / (1 + math.exp(-1)), 2 * math.exp(-1) / (1 + math.exp(-1))]))
    assert not orw.orw_weights(torch.tensor([0.3], requires_grad=True), 1.0).requires_grad


def test_prompt_normalised_weights_match_hand_values():
    """--weight-norm prompt: w / mean(w) over the images of the same prompt; --weights centered subtracts 1."""
    r, groups = torch.tensor([0.0, 0.5, 1.0, 0.2]), torch.tensor([7, 3, 7, 3])
    w = orw.orw_weights(r, tau=2.0, norm="prompt", groups=groups)
    e = [1.0, math.e, math.e ** 2, math.exp(0.4)]
    hand = torch.tensor([2 * e[0] / (e[0] + e[2]), 2 * e[1] / (e[1] + e[3]), 2 * e[2] / (e[0] + e[2]),
                         2 * e[3] / (e[1] + e[3])])
    assert torch.allclose(w, hand)
    assert torch.allclose(orw.orw_weights(r, 2.0, "prompt", torch.zeros(4, dtype=torch.long)), orw.orw_weights(r, 2.0, "pool"))
    huge = orw.orw_weights(torch.tensor([1000.0, 0.0, 999.0]), 1.0, "prompt", torch.tensor([0, 1, 0]))
    assert torch.isfinite(huge).all() and torch.allclose(huge[1], torch.tensor(1.0))  # a prompt seen once: w = 1
    centered = orw.orw_weights(r, 2.0, "prompt", groups, centered=True)
    assert torch.allclose(centered, hand - 1) and abs(centered.sum().item()) < 1e-6  # mean 0 within each prompt


def test_loss_equals_hand_computation():
    # two samples with two latent elements each, shaped (B, C, H, W) = (2, 1, 1, 2)
    v = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 1, 1, 2)
    v_ref = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    noise = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).view(2, 1, 1, 2)
    x0 = torch.tensor([[0.5, -1.5], [0.0, 1.0]]).view(2, 1, 1, 2)
    w = torch.tensor([2.0, 0.5])
    # targets noise - x0: [0, 2] and [1, -1]; fm = mean sq error: [(1+0)/2, (1+0)/2] = [0.5, 0.5]
    # w2 = mean (v - v_ref)^2: [(0+1)/2, (1+4)/2] = [0.5, 2.5]
    per, fm, w2 = orw.orw_loss(v, v_ref, noise - x0, w, alpha=0.3)
    assert torch.allclose(fm, torch.tensor([0.5, 0.5])) and torch.allclose(w2, torch.tensor([0.5, 2.5]))
    assert torch.allclose(per, torch.tensor([2.0 * 0.5 + 0.3 * 0.5, 0.5 * 0.5 + 0.3 * 2.5]))
    assert abs(per.mean().item() - (1.15 + 1.0) / 2) < 1e-6


def test_tau0_alpha0_is_plain_flow_matching_on_own_samples():
    """With w = exp(0 * r) = 1 and alpha = 0 the gradient is the standard (diffusers) flow-matching gradient on the
    model's own ODE samples, whatever the rewards and whatever v_ref is."""
    transformer = tiny_transformer()
    z, pe, pooled = random_inputs(4)
    x0 = sampling.sample(transformer, pe, pooled, torch.linspace(1, 0, 4), z)["latents"]  # the model's own samples
    g = torch.Generator().manual_seed(1)
    sigma, eps = torch.rand(4, generator=g), torch.randn(x0.shape, generator=g)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps

    def grads(loss):
        transformer.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in transformer.parameters() if p.grad is not None]

    v = sampling.predict(transformer, x_t, sigma, pe, pooled)
    w = orw.orw_weights(torch.tensor([0.1, 0.9, 0.4, 0.7]), tau=0.0)
    per, _, _ = orw.orw_loss(v, torch.randn_like(v), eps - x0, w, alpha=0.0)
    g_orw = grads(per.mean())
    model_pred = sampling.predict(transformer, x_t, sigma, pe, pooled)
    g_fm = grads(torch.nn.functional.mse_loss(model_pred, eps - x0))  # train_dreambooth_sd3 loss, uniform sigma
    assert len(g_orw) == len(g_fm) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_orw, g_fm))


@pytest.mark.parametrize("rank", [0, 4])
def test_w2_term_is_zero_while_learner_equals_reference(rank):
    """LoRA: the adapter starts at B = 0; full fine-tuning: the learner starts as the reference copy."""
    policy = models.Policy(tiny_transformer(), rank, with_old=True)
    x, pe, pooled = random_inputs(2)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        with policy.ref() as ref:
            v_ref = sampling.predict(ref, x, sigma, pe, pooled)
        v = sampling.predict(policy.transformer, x, sigma, pe, pooled)
    _, _, w2 = orw.orw_loss(v, v_ref, x, torch.ones(2), alpha=1.0)
    assert torch.equal(w2, torch.zeros(2))
    assert orw.w2_bound(policy, pe, pooled, torch.linspace(1, 0, 4), x) == (0.0, 0.0)
    with torch.no_grad():  # move the learner: both the loss term and the bound become positive
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        v = sampling.predict(policy.transformer, x, sigma, pe, pooled)
    _, _, w2 = orw.orw_loss(v, v_ref, x, torch.ones(2), alpha=1.0)
    integral, coupling = orw.w2_bound(policy, pe, pooled, torch.linspace(1, 0, 4), x)
    assert (w2 > 0).all() and integral > 0 and coupling > 0


# ----------------------------------------------------------------------------------- the script
def _run(args, tmp_path, timeout=600):
    return prewarmed.run([SCRIPT, "--threads", "1", *args], env=ENV, cwd=tmp_path, timeout=timeout)


@pytest.mark.parametrize("flag,value,msg", [("--tau", "-1", "--tau -1.0 must be >= 0"),
                                            ("--alpha", "-0.5", "--alpha -0.5 must be >= 0"),
                                            ("--epoch-iters", "0", "--epoch-iters 0 must be >= 1"),
                                            ("--pool-reuse", "0", "--pool-reuse 0 must be >= 1"),
                                            ("--warmup-iters", "-1", "--warmup-iters -1 must be >= 0"),
                                            ("--reward", "shapez", "unknown reward 'shapez'")])
def test_bad_flags_fail_before_loading(flag, value, msg):
    code, err = check_flags("orw_cfm_w2", [flag, value])
    assert code != 0 and len(err) == 1 and msg in err[0], err


def test_centered_weights_need_alpha_at_least_1():
    """--weights centered: per noised point the quadratic coefficient is E[w - 1 | x_t] + alpha and w - 1 reaches -1,
    so alpha < 1 leaves the objective unbounded below (refused); alpha 1 and raw weights are checked too."""
    code, err = check_flags("orw_cfm_w2", ["--weights", "centered", "--weight-norm", "pool", "--alpha", "0.5"])
    assert code != 0 and len(err) == 1 and "--weights centered needs --alpha >= 1 (got 0.5)" in err[0], err
    code, err = check_flags("orw_cfm_w2", ["--weights", "centered", "--alpha", "3"])  # raw weights: no mean 0
    assert code != 0 and len(err) == 1 and "--weight-norm pool or prompt" in err[0], err
    code, err = check_flags("orw_cfm_w2", ["--weights", "centered", "--weight-norm", "pool", "--alpha", "1"])
    assert code == 0, err


TINY = ["--num-iterations", "2", "--prompts-per-iter", "2", "--group-size", "2", "--train-batch-size", "2",
        "--eval-samples-per-prompt", "2", "--w2-eval-samples", "4", "--checkpoint-every", "1", "--epoch-iters", "1",
        "--pool-reuse", "1", "--warmup-iters", "2"]


def _check_run(run, weights_dir):
    s = json.loads((run / "summary.json").read_text())
    for k in ("base", "final"):
        assert {"reward_mean", "strict_accuracy", "accuracy", "diversity", "w2_integral", "w2_coupling"} <= set(s[k])
    assert s["base"]["w2_integral"] == 0.0 and s["final"]["w2_integral"] > 0  # the learner moved away from the base
    assert s["reward_queries"] == 2 * 4 and s["wall_time_s"] > 0
    assert (run / weights_dir).is_dir() and (run / "checkpoint.pt").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    return s


def _old_and_learner(run):
    sd = torch.load(run / "checkpoint.pt", weights_only=False)["policy"]
    return ({k[4:]: v for k, v in sd.items() if k.startswith("old.")},
            {k[8:]: v for k, v in sd.items() if k.startswith("learner.")})


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_smoke_embedded_and_resume(tmp_path):
    run = tmp_path / "run"
    out = _run([*TINY, "--output-dir", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_run(run, "transformer")
    out = _run([*TINY, "--num-iterations", "3", "--resume", str(run)], tmp_path)  # continue for one iteration
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["reward_queries"] == 3 * 4


@pytest.mark.slow  # ~20-50 s: in the full suite, not the fast tier
def test_epochs_fixed_sampler_pool_and_exact_resume(tmp_path):
    """Epoch of K = 3 iterations on a pool of M = 2 minibatches: the sampling copy stays the base model during the
    epoch and equals the learner after it; the pool is scored once (8 queries, not 12); resuming in the middle of
    the epoch (pool from the checkpoint) gives the same weights as the straight run; --offline never refreshes."""
    flags = [*TINY, "--epoch-iters", "3", "--pool-reuse", "2", "--w2-eval-samples", "0", "--lr", "1e-3"]
    a, b, off = tmp_path / "a", tmp_path / "b", tmp_path / "off"
    for run, extra in ((a, ["--num-iterations", "3"]), (b, ["--num-iterations", "2"]), (off, ["--offline", "--num-iterations", "3"])):
        out = _run([*flags, *extra, "--output-dir", str(run)], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    old_b, learner_b = _old_and_learner(b)  # mid-epoch: old is still the base, the learner moved
    old_off, learner_off = _old_and_learner(off)
    assert _same(old_b, old_off) and not _same(old_b, learner_b)  # offline: old is the base after the epoch too
    assert json.loads((b / "summary.json").read_text())["reward_queries"] == 2 * 4
    out = _run([*flags, "--num-iterations", "3", "--resume", str(b)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    old_a, learner_a = _old_and_learner(a)
    assert _same(old_a, learner_a) and not _same(old_a, old_b)  # end of epoch: old <- learner
    old_r, learner_r = _old_and_learner(b)
    assert all(torch.allclose(learner_a[k], learner_r[k], atol=1e-6) for k in learner_a) and _same(old_r, learner_r)
    assert json.loads((a / "summary.json").read_text())["reward_queries"] == 2 * 4


def test_smoke_tiny_sd3_lora(tmp_path):
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    path = build_tiny_sd3(tmp_path / "sd3")
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    run = tmp_path / "run"
    out = _run([*TINY, "--model", str(path), "--resolution", "32", "--lora-rank", "4", "--lr", "1e-2",
                "--prompts-file", str(tmp_path / "p.txt"), "--reward", "shapes=1.0,jpeg_compressibility=0.1",
                "--weights", "paper", "--weight-norm", "none", "--output-dir", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    s = _check_run(run, "lora")
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and "train_reward_mean" in s["final"]


# ----------------------------------------------------------------------------------- learning
# World v2 (docs/orw_cfm_w2.md, Results). The paper's positive weights, pool-normalised, each batch used 4 times:
# self-training on the model's own samples (tau = 0) loses reward (held-out partial 0.353 -> 0.264, strict
# 0.270 -> 0.219 in 100 iterations at alpha 1) and the reward weighting (tau 20) only cancels that drift
# (0.357 / 0.289); a broken or inverted weighting fails this.
LEARN = ["--num-iterations", "30", "--alpha", "1", "--w2-eval-samples", "0", "--weights", "paper", "--weight-norm",
         "pool", "--pool-reuse", "4"]


@pytest.mark.slow
def test_weighting_beats_uniform_weights(tmp_path):
    """tau 20 against tau 0 (uniform weights), 30 iterations each, evaluated on the train prompts (85 x 4 samples,
    the same noise: tests/helpers/learning.py). Measured, tau 20 - tau 0 strict / partial at 30 iterations: seed 0
    (the test) +0.076 / +0.069, seed 1 +0.076 / +0.060, seed 2 +0.053 / +0.047 (at 20 seed 2: +0.018 / +0.018; at
    40: +0.056 to +0.097 strict; both lose reward against the base on these prompts, tau 0 more: -0.109 to -0.153
    strict at 60); the margins hold for every seed."""
    res = {}
    for name, extra in (("learn", ["--tau", "20"]), ("tau0", ["--tau", "0"])):
        out = _run([*LEARN, *train_eval_flags(tmp_path), *extra, "--output-dir", str(tmp_path / name)], tmp_path,
                   timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        res[name] = json.loads((tmp_path / name / "summary.json").read_text())
        gains(res[name])  # evaluated on the train split
    learn, tau0 = res["learn"]["final"], res["tau0"]["final"]
    assert learn["strict_accuracy"] > tau0["strict_accuracy"] + 0.03, (learn, tau0)
    assert learn["reward_mean"] > tau0["reward_mean"] + 0.03, (learn, tau0)


@pytest.mark.slow
def test_centered_variant_beats_lr_zero(tmp_path):
    """The named variant (`--weights centered`, pool-normalised, tau 20, alpha 3, each batch used 4 times), 100
    iterations (800 reward queries), must raise strict accuracy and partial credit on the train prompts (85 x 4
    samples, the same noise before and after: tests/helpers/learning.py) by 0.03 over the run's base evaluation, where
    the same run with --lr 0 ends. The paper's default does not learn on this world (docs/orw_cfm_w2.md), so the test
    pins the variant that does. One thread pins the trajectory (the thread count changes float rounding). Measured
    with exactly these flags, strict / partial gain at 100 iterations: seed 0 (the test) +0.038 / +0.036, seed 1
    +0.056 / +0.035, seed 2 +0.071 / +0.048 (at 75: +0.023 partial on seed 1; at the default 200 seed 2 keeps only
    +0.026 / +0.007); the margins hold for every seed, and weights ignored (w - 1 = 0: only the W2 pull, the model
    stays at its base) fail them."""
    out = _run(["--weights", "centered", "--weight-norm", "pool", "--tau", "20", "--alpha", "3", "--pool-reuse", "4",
                "--w2-eval-samples", "0", "--num-iterations", "100", *train_eval_flags(tmp_path),
                "--output-dir", str(tmp_path / "run")], tmp_path, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    strict, partial = gains(s)
    assert strict > 0.03 and partial > 0.03, (strict, partial, s["base"], s["final"])
