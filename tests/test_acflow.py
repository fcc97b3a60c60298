"""AC-Flow: the math against hand computations, smoke runs of the real script (embedded + tiny SD3, resume),
and one learning test (the default run beats its base on the same noise)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import acflow
from tests.helpers import prewarmed
from tests.helpers.cli_check import check_flags
from tests.helpers.learning import gains, train_eval_flags

ROOT = Path(__file__).resolve().parents[1]


def _tensors(b=5, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *shape, generator=g) for _ in range(4)] + [torch.rand(b, generator=g)]


def _orw_by_hand(v, v_ref, x0, eps, r, tau, alpha):
    """ORW-CFM-W2 (the official ORW-CFM-W2 trainer's loss): mean_i[exp(tau r_i) mean_d(v - (eps - x0))^2 + alpha mean_d(v - v_ref)^2]."""
    total = 0.0
    for i in range(len(r)):
        d = v[i].numel()
        fm = sum(float(a - (e - x)) ** 2 for a, e, x in zip(v[i].flatten(), eps[i].flatten(), x0[i].flatten())) / d
        w2 = sum(float(a - b) ** 2 for a, b in zip(v[i].flatten(), v_ref[i].flatten())) / d
        total += math.exp(tau * float(r[i])) * fm + alpha * w2
    return total / len(r)


@pytest.mark.parametrize("it,warmup", [(0, 0), (7, 3), (2, 5)])
def test_zero_critic_is_orw_cfm_w2(it, warmup):
    v, v_ref, x0, eps, r = _tensors()
    critic = acflow.Critic(3, 6, width=8, zero_init=True)  # zero-initialised head: V == 0 at init
    x_t, sigma, pooled = torch.randn(5, 3, 4, 4), torch.rand(5), torch.randn(5, 6)
    values = critic(x_t, sigma, pooled)
    assert torch.equal(values, torch.zeros(5))
    for tau, alpha in [(0.5, 1.0), (2.0, 0.3)]:
        w, _ = acflow.actor_weights(it, r, values, tau, 0.0, warmup)  # no clipping, no normalisation
        per, _, _ = acflow.acflow_loss(v, v_ref, eps - x0, w, alpha)
        assert per.mean().item() == pytest.approx(_orw_by_hand(v, v_ref, x0, eps, r, tau, alpha), rel=1e-5)


def test_zero_critic_with_clip_is_orw_on_clipped_rewards():
    r = torch.tensor([-3.0, -0.2, 0.0, 0.7, 2.5])
    w, adv = acflow.actor_weights(10, r, torch.zeros(5), 0.5, 1.0, 0)
    assert adv.tolist() == pytest.approx([-1.0, -0.2, 0.0, 0.7, 1.0])
    assert w.tolist() == pytest.approx([math.exp(0.5 * a) for a in [-1.0, -0.2, 0.0, 0.7, 1.0]])


def test_clipping_bounds_weights():
    g = torch.Generator().manual_seed(1)
    shaped, values = 10 * torch.randn(1000, generator=g), 10 * torch.randn(1000, generator=g)
    for tau, c in [(1.0, 1.0), (0.5, 2.0), (3.0, 0.25)]:
        w, adv = acflow.actor_weights(5, shaped, values, tau, c, 0)
        lo, hi = math.exp(-tau * c), math.exp(tau * c)
        assert w.min().item() >= lo * (1 - 1e-6) and w.max().item() <= hi * (1 + 1e-6)
        assert w.min().item() == pytest.approx(lo) and w.max().item() == pytest.approx(hi)  # bounds are attained
        assert adv.abs().max().item() == pytest.approx(c)
    w, _ = acflow.actor_weights(5, shaped, values, 1.0, 0.0, 0)  # c_A = 0: no clipping
    assert w.max().item() > math.exp(5)


def test_warmup_switch_at_configured_iteration():
    shaped, values = torch.tensor([0.5, -0.5, 1.5]), torch.tensor([0.4, -1.0, 2.0])
    K, tau, c = 4, 1.0, 1.0
    for it in range(8):
        w, adv = acflow.actor_weights(it, shaped, values, tau, c, K)
        expected_adv = [0.5, -0.5, 1.0] if it < K else [0.1, 0.5, -0.5]  # r~ (V treated as 0) before K, r~ - V after
        assert adv.tolist() == pytest.approx(expected_adv), it
        assert w.tolist() == pytest.approx([math.exp(tau * a) for a in expected_adv])


def test_weight_norm():
    shaped, values = torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.zeros(4)
    w, _ = acflow.actor_weights(0, shaped, values, 1.0, 0.0, 0, normalize=True)
    e = [math.exp(x) for x in shaped.tolist()]
    assert w.tolist() == pytest.approx([x / (sum(e) / 4) for x in e])
    assert w.mean().item() == pytest.approx(1.0)
    ws, _ = acflow.actor_weights(0, shaped, values, 1.0, 0.0, 0, normalize=True, centered=True)  # --weights centered
    assert ws.tolist() == pytest.approx([x / (sum(e) / 4) - 1 for x in e]) and abs(ws.sum().item()) < 1e-6


def test_reward_shaping_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    z, _ = acflow.shape_rewards(r, "batch")
    m, sd = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 9) / 4)
    assert z.tolist() == pytest.approx([(x - m) / (sd + 1e-6) for x in r.tolist()], rel=1e-5)
    z, _ = acflow.shape_rewards(r, "group", groups=torch.tensor([7, 7, 3, 3]))  # groups (1, 2) and (3, 6)
    assert z.tolist() == pytest.approx([-1, 1, -1, 1], rel=1e-5)
    z, stats = acflow.shape_rewards(r, "running", momentum=0.9)  # first batch initialises the statistics
    assert stats[0].item() == pytest.approx(3.0) and stats[1].item() == pytest.approx(sd ** 2)
    r2 = torch.tensor([0.0, 4.0])
    z2, stats2 = acflow.shape_rewards(r2, "running", stats=stats, momentum=0.9)
    m2, v2 = 0.9 * 3.0 + 0.1 * 2.0, 0.9 * sd ** 2 + 0.1 * 4.0
    assert stats2[0].item() == pytest.approx(m2) and stats2[1].item() == pytest.approx(v2)
    assert z2.tolist() == pytest.approx([(x - m2) / (math.sqrt(v2) + 1e-6) for x in [0.0, 4.0]], rel=1e-5)
    z, _ = acflow.shape_rewards(r, "batch", clamp=1.0)
    assert z.abs().max().item() == pytest.approx(1.0)
    assert acflow.shape_rewards(r, "none")[0].tolist() == r.tolist()


def test_explained_variance_and_critic_loss():
    t = torch.tensor([1.0, 2.0, 4.0])
    assert acflow.explained_variance(t, t) == pytest.approx(1.0)
    assert acflow.explained_variance(torch.full((3,), 9.0), t) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([1.0, 3.0, 3.0])  # residuals (0, -1, 1), var 2/3; var(t) = 14/9
    assert acflow.explained_variance(p, t) == pytest.approx(1 - (2 / 3) / (14 / 9), rel=1e-5)
    assert acflow.critic_loss_fn(p, t).item() == pytest.approx(2 / 3)
    assert acflow.critic_loss_fn(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 3.0]), "huber").item() == pytest.approx(
        (0.5 * 0.25 + (3.0 - 0.5)) / 2)


def test_critic_learns_sigma_and_prompt_dependence():
    torch.manual_seed(0)
    critic = acflow.Critic(3, 4, width=8, zero_init=True)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    pooled = torch.eye(4)
    for _ in range(300):
        x, sigma, c = torch.randn(32, 3, 8, 8), torch.rand(32), torch.randint(0, 4, (32,))
        target = (1 - sigma) * (c.float() - 1.5)  # depends on both sigma and the prompt
        loss = acflow.critic_loss_fn(critic(x, sigma, pooled[c]), target)
        opt.zero_grad(), loss.backward(), opt.step()
    x, sigma, c = torch.randn(256, 3, 8, 8), torch.rand(256), torch.randint(0, 4, (256,))
    with torch.no_grad():
        assert acflow.explained_variance(critic(x, sigma, pooled[c]), (1 - sigma) * (c.float() - 1.5)) > 0.8


# ----------------------------------------------------------------------------------- script runs
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = ["--threads", "1", "--prompts-per-iter", "2", "--group-size", "2", "--train-batch-size", "2",
        "--eval-samples-per-prompt", "1", "--num-steps", "2"]


def _run(*extra, check=True):
    p = prewarmed.run([ROOT / "acflow.py", *TINY, *extra], cwd=ROOT, env=ENV, timeout=900)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_bad_flags_fail_before_loading():
    for flags, word in [(["--shaping", "zscore"], "shaping"), (["--critic-loss", "l1"], "critic-loss"),
                        (["--epoch-iters", "0"], "epoch-iters"), (["--warmup-ev", "-1"], "warmup-ev"),
                        (["--adv-clip", "-1"], "adv-clip")]:
        code, err = check_flags("acflow", [*TINY, *flags])
        assert code != 0 and len(err) == 1 and word in err[0], err


EPOCH = ["--epoch-iters", "2", "--pool-reuse", "1", "--warmup-ev", "0", "--critic-steps", "2", "--critic-zero-init"]


def test_smoke_embedded_and_resume(tmp_path):
    a = tmp_path / "a"
    _run("--num-iterations", "2", "--critic-warmup", "1", *EPOCH, "--output-dir", str(a))
    s = json.loads((a / "summary.json").read_text())
    assert {"base", "final", "wall_time_s", "reward_queries"} <= set(s) and s["reward_queries"] == 8
    assert 0 <= s["final"]["reward_mean"] <= 1 and "strict_accuracy" in s["final"]
    assert (a / "transformer").is_dir()
    # resume in the middle of the epoch: 1 iteration, then continue to 2 -> same critic and actor as the straight run
    # (critic, buffer and pool restored; the pool of 2 minibatches is scored once: 8 queries)
    b = tmp_path / "b"
    _run("--num-iterations", "1", "--critic-warmup", "1", *EPOCH, "--output-dir", str(b))
    _run("--num-iterations", "2", "--critic-warmup", "1", *EPOCH, "--resume", str(b),
         "--output-dir", str(b))
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (a, b))
    assert cb["iteration"] == 2 and json.loads((b / "summary.json").read_text())["reward_queries"] == 8
    for k, v in ca["critic"].items():
        assert torch.allclose(v, cb["critic"][k], atol=1e-5), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ca["critic"].items() if k.startswith("head.6"))
    for k in list(ca["policy"])[:20]:
        assert torch.allclose(ca["policy"][k], cb["policy"][k], atol=1e-5), k


def test_smoke_tiny_sd3_lora(tmp_path):
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    model = build_tiny_sd3(tmp_path / "sd3")
    out = tmp_path / "run"
    _run("--model", str(model), "--resolution", "32", "--lora-rank", "4", "--num-iterations", "2", "--reward",
         "jpeg_compressibility", "--epoch-iters", "2", "--pool-reuse", "1", "--shaping", "group",
         "--output-dir", str(out))
    s = json.loads((out / "summary.json").read_text())
    assert {"base", "final", "wall_time_s", "reward_queries"} <= set(s) and s["reward_queries"] == 8
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert "critic" in ck and ck["critic"]["c_proj.weight"].shape[1] == 64  # SD3 pooled projection width


# The named variant `--weights centered` (32 prompts x 1 image, each batch used twice per 20-iteration epoch, alpha 3,
# tau 3) for 100 iterations (1,600 reward queries) against its own base, evaluated on the same held-out noise (what
# `--lr 0` gives). The default (AC-Flow's reconstructed positive weights) does not learn on this world (docs/acflow.md,
# Results), so this test pins the variant that does. One thread pins the trajectory (the thread count changes float
# rounding). Measured at 100 iterations over seeds 0 / 1 / 2: strict +0.039 / +0.031 / +0.012, partial +0.047 /
# +0.019 / +0.023 (docs/acflow.md); seed 0 with the fast CPU kernels (another rounding) +0.051 / +0.064. The test
# runs seed 0; the 0.01 margins are what a broken update misses (ignored
# weights, centered: all 0, leave only the W2 pull; inverted ones lose), not the seed spread.
CENTERED = ["--weights", "centered", "--alpha", "3", "--tau", "3", "--pool-reuse", "2"]


@pytest.mark.slow
def test_centered_variant_beats_lr_zero(tmp_path):
    """The named variant (`--weights centered`, alpha 3, tau 3, each batch used twice), 40 iterations with the critic
    warm-up of the default 100-iteration run (10), must raise strict accuracy and partial credit on the train prompts
    (85 x 4 samples, the same noise before and after: tests/helpers/learning.py) by 0.02 over the run's base
    evaluation, where the same run with --lr 0 ends. One thread pins the trajectory (the thread count changes float
    rounding). Measured with exactly these flags, strict / partial gain at 40 iterations: seed 0 (the test) +0.038 /
    +0.027, seed 1 +0.062 / +0.046, seed 2 +0.035 / +0.026 (at 20: +0.012 to +0.044, at 100: +0.050 to +0.079
    strict); the margins hold for every seed."""
    cmd = [ROOT / "acflow.py", *CENTERED, "--num-iterations", "40", "--critic-warmup", "10",
           *train_eval_flags(tmp_path), "--output-dir", tmp_path / "run"]
    p = prewarmed.run(cmd, cwd=ROOT, env=ENV, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    strict, partial = gains(s)
    assert strict > 0.02 and partial > 0.02, (strict, partial, s["base"], s["final"])


# Where the value is learnable the critic takes part. On the embedded world's JPEG-compressibility reward most of
# the variance is the prompt's (how many shapes it asks for), so after one epoch of the 16 prompts x 2 images,
# 5-minibatch-pool configuration (the default until 2026-12-06; the measurements below are of it) the
# critic explains the next epoch's fresh pool with EV 0.62 / 0.50 / 0.68 (seeds 0 / 1 / 2 of 100-iteration runs),
# the gate (EV > 0.3) opens at the second epoch, and the critic changes the actor's weights (critic_weight_change
# 0.76 / 0.65 / 0.70 on its first iteration, >= 0.30 on every later one). A critic that does not learn (or a broken
# gate) stays below 0.3 and leaves the weights as with --no-critic (change 0).
@pytest.mark.slow
def test_critic_learns_jpeg_value_and_opens_gate(tmp_path):
    out = tmp_path / "run"
    cmd = [ROOT / "acflow.py", "--threads", "1", "--reward", "jpeg_compressibility",
           "--prompts-per-iter", "16", "--group-size", "2", "--pool-reuse", "4", "--num-iterations", "22",
           "--alpha", "3", "--tau", "3", "--weights", "centered", "--weight-norm", "minibatch",  # as measured
           "--eval-samples-per-prompt", "1", "--eval-every", "1000", "--checkpoint-every", "1000", "--no-save-model",
           "--output-dir", str(out)]
    p = prewarmed.run(cmd, cwd=ROOT, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    from tests.helpers.run_logs import scalars

    ev, warm = scalars(out, "losses/critic_explained_variance"), scalars(out, "charts/critic_warmup")
    change = scalars(out, "losses/critic_weight_change")
    assert ev[21] > 0.4 and ev[1] < 0.3, ev  # learned during the first epoch, measured out of sample
    assert warm[20] == 1.0 and warm[21] == 0.0 and change[20] == 0.0, (warm, change)
    assert change[21] > 0.3 and change[22] > 0.3, change
