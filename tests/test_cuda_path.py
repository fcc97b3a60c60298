"""What a CUDA run needs that a CPU run does not show by itself, checked on the CPU: restored checkpoint state moved to
the run's device and, under torchrun, each rank's own sample pool restored (ORW-CFM-W2, AC-Flow); the default
precision (bf16 only where the GPU has it natively; fp16 refused for training); reward models in fp32 unless
--reward-dtype says otherwise; TF32 and synchronised timers on CUDA; noise and evaluation memory. What only a GPU
can show (the device mismatch itself, CUDA autocast, peak memory) is benchmark/gpu_smoke.sh's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import evaluate, models, rewards, utils

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
METHODS = ["advantageflow", "diffusion_nft", "flow_grpo", "orw_cfm_w2", "acflow", "fdfo"]


def tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)


# ----------------------------------------------------------------------------------- restored state (resume)
def test_restored_pool_is_this_ranks_part_on_the_run_device():
    """A checkpoint's pool (global minibatches, loaded on the CPU) -> rank r's slice of every per-rank entry, and every
    tensor in it on the run's device ("meta" stands in for a GPU). Before, the pool stayed on the CPU, where CUDA
    latents met it in x_t = (1 - s) x0 + s eps."""
    g = torch.Generator().manual_seed(0)
    pool = {"latents": [torch.randn(6, 3, 4, 4, generator=g) for _ in range(2)],
            "prompt_idx": [torch.arange(6), torch.arange(6, 12)], "rewards": [torch.rand(6), torch.rand(6)],
            "parts": {"shapes": [0.5, 0.25]}, "order": torch.tensor([1, 0]), "epoch": 3}
    mine = utils.rank_pool(pool, ("latents", "prompt_idx"), 1, 2, "meta")
    assert all(t.device.type == "meta" for t in tensors(mine)) and len(list(tensors(mine))) == 7
    assert [t.shape[0] for t in mine["latents"] + mine["prompt_idx"]] == [3] * 4
    assert mine["epoch"] == 3 and mine["parts"] == pool["parts"]
    ranks = [utils.rank_pool(pool, ("latents", "prompt_idx"), r, 2, "cpu") for r in range(2)]
    assert torch.equal(torch.cat([r["latents"][1] for r in ranks]), pool["latents"][1])
    assert torch.equal(ranks[1]["prompt_idx"][0], torch.arange(3, 6))
    assert utils.to_device((torch.ones(1), [torch.ones(1)], 2.0), "meta")[1][0].device.type == "meta"


SPY = '''
import json, os, runpy, sys
import torch
from common import utils

def tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (dict, list, tuple)):
        for v in (x.values() if isinstance(x, dict) else x):
            yield from tensors(v)

real, seen = utils.rank_pool, []
def spy(pool, keys, rank, world, device):  # the restored pool as the script gets it
    out = real(pool, keys, rank, world, device)
    seen.append(dict(device=str(device), on=sorted({str(t.device) for t in tensors(out)}),
                     latents=[t.sum().item() for t in out["latents"]], n=len(out["latents"][0])))
    return out
utils.rank_pool = spy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
with open(os.environ["SPY_OUT"] + os.environ.get("RANK", "0"), "w") as f:
    json.dump(seen, f)
'''


def _torchrun(args, tmp_path, spy=False):
    if spy:
        (tmp_path / "spy.py").write_text(SPY)
        args = [str(tmp_path / "spy.py"), *args]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          *args], capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**ENV, "SPY_OUT": str(tmp_path / "spy")})
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orw_cfm_w2", "acflow"])
def test_two_process_resume_keeps_each_ranks_pool(method, tmp_path):
    """2 processes (gloo): run 3 iterations, resume to 4 in the middle of an epoch (the pool / the critic's buffer of
    two epochs is restored) == an uninterrupted 4-iteration run. The checkpoint holds the global pool and each rank
    gets its own part, on its device. Before, only rank 0's pool was saved and rank 1 trained on rank 0's images
    after a resume."""
    from safetensors.torch import load_file

    (tmp_path / "eval.txt").write_text("a red circle\na blue square\n")
    common = [f"{method}.py", "--prompts-per-iter", "2", "--group-size", "3", "--train-batch-size", "3",
              "--num-steps", "3", "--epoch-iters", "2", "--pool-reuse", "1", "--eval-every", "1000",
              "--eval-samples-per-prompt", "1", "--eval-prompts-file", str(tmp_path / "eval.txt"), "--threads", "1",
              *(["--w2-eval-samples", "0"] if method == "orw_cfm_w2" else
                ["--critic-warmup", "0", "--critic-steps", "1", "--critic-width", "8"])]
    _torchrun([*common, "--output-dir", str(tmp_path / "ref"), "--num-iterations", "4"], tmp_path)
    run = tmp_path / "run"
    _torchrun([*common, "--output-dir", str(run), "--num-iterations", "3"], tmp_path)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    pools = [ckpt["pool"]] if method == "orw_cfm_w2" else ckpt["buffer"]
    assert len(pools) == (1 if method == "orw_cfm_w2" else 2)
    assert all(len(t) == 6 for p in pools for t in p["latents"] + p["prompt_idx"])  # both ranks' 3 images each
    _torchrun([*common, "--output-dir", str(run), "--num-iterations", "4", "--resume", str(run)], tmp_path, spy=True)
    seen = [json.loads((tmp_path / f"spy{r}").read_text()) for r in range(2)]
    for r in range(2):  # every restored pool: this rank's 3 images, every tensor on the run's device
        assert len(seen[r]) == len(pools) and all(s["n"] == 3 and s["on"] == [s["device"]] == ["cpu"] for s in seen[r])
        assert [s["latents"] for s in seen[r]] == [[t[3 * r:3 * r + 3].sum().item() for t in p["latents"]]
                                                   for p in pools]
    w_ref, w_run = (load_file(d / "transformer" / "diffusion_pytorch_model.safetensors") for d in (tmp_path / "ref", run))
    base = load_file(ROOT / "common/world/assets/transformer.safetensors")
    dist = sum(((w_ref[k].float() - w_run[k].float()) ** 2).sum() for k in w_ref).sqrt()
    moved = sum(((w_ref[k].float() - base[k].float()) ** 2).sum() for k in w_ref).sqrt()
    assert moved > 0 and dist <= 1e-6 * moved, (dist.item(), moved.item())


# ----------------------------------------------------------------------------------- precision
def test_default_precision_bf16_only_where_native():
    """bf16 by default on GPUs with native bf16 (compute capability >= 8.0), fp32 elsewhere: V100 (7.0) and T4 (7.5)
    only emulate bf16 (torch.cuda.is_bf16_supported() says yes there), and fp16 needs loss scaling the scripts do not
    have. Before, the default went by is_bf16_supported() and fell back to fp16."""
    assert models.default_dtype("cuda", (7, 0)) == models.default_dtype("cuda:1", (7, 5)) == torch.float32
    assert models.default_dtype("cuda", (8, 0)) == models.default_dtype("cuda", (9, 0)) == torch.bfloat16
    # CPUs: bf16 where they multiply it natively (AVX512-BF16 / AMX), fp32 elsewhere; the suite pins fp32
    # (CLEANFLOW_CPU_BF16=0 in conftest.py) so that its learning margins hold on any CI CPU
    assert models.default_dtype("cpu", cpu_bf16=True) == torch.bfloat16
    assert models.default_dtype("cpu", cpu_bf16=False) == models.default_dtype("cpu") == torch.float32
    assert models.load_model(mixed_precision="bf16").dtype == torch.bfloat16  # the flag wins
    assert models.load_model(mixed_precision=None).dtype == torch.float32  # the device's default (pinned: fp32)


def test_cpu_bf16_detection_and_override(monkeypatch):
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    monkeypatch.delenv("CLEANFLOW_CPU_BF16", raising=False)
    assert models.cpu_has_bf16() == native
    assert models.default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    for value, expected in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("CLEANFLOW_CPU_BF16", value)
        assert models.default_dtype("cpu") == expected


def test_cpu_bf16_training_pass_matches_fp32():
    """On CPU the bf16 passes that take gradients run attention with the math kernel (its bf16 flash backward is ~5x
    slower): forward and gradients stay those of fp32 within bf16 rounding, and the no-grad (flash) forward agrees."""
    torch.manual_seed(0)
    out, grads = {}, {}
    for mp in ("no", "bf16"):
        tr = models.load_model(mixed_precision=mp).transformer
        models.Policy(tr)  # trainable weights in fp32, as in a run
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(8, 3, 32, 32, generator=g), torch.rand(8, generator=g) * 1000
        pe, pooled = torch.randn(8, 10, 64, generator=g), torch.randn(8, 64, generator=g)
        kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)
        with torch.no_grad():
            out[mp, "no_grad"] = tr(**kw)[0]
        out[mp, "grad"] = tr(**kw)[0]
        assert out[mp, "grad"].dtype == torch.float32  # outputs back in fp32, as accelerate's prepare
        out[mp, "grad"].pow(2).mean().backward()
        grads[mp] = torch.cat([p.grad.flatten() for p in tr.parameters() if p.grad is not None])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(out["no", "grad"], out["no", "no_grad"]) < 1e-5
    assert 0 < rel(out["bf16", "grad"], out["no", "grad"]) < 0.03  # bf16 rounding, not another function
    assert rel(out["bf16", "no_grad"], out["bf16", "grad"]) < 0.03
    assert torch.nn.functional.cosine_similarity(grads["bf16"], grads["no"], dim=0) > 0.99


DTYPE_SPY = '''
import json, runpy, sys
from common import rewards

class Built(Exception):
    pass

real = rewards.build_reward
def spy(*a, **k):  # the reward the script builds, then stop before any training
    raise Built(str(real(*a, **k).fns["pickscore"].model.dtype))
rewards.build_reward = spy
clip, out, seen = sys.argv[1], sys.argv[2], {}
for name, extra in [(m, []) for m in ("advantageflow", "diffusion_nft", "flow_grpo", "orw_cfm_w2", "acflow", "fdfo",
                                        "common.tools.evaluate")] + [("fdfo", ["--reward-dtype", "bf16"]),
                                                               ("common.tools.evaluate", ["--reward-dtype", "bf16"])]:
    sys.argv = [name, "--reward", "pickscore", "--reward-paths", f"pickscore={clip}|{clip}", "--mixed-precision",
                "bf16", *extra, *([] if name == "common.tools.evaluate" else ["--output-dir", out + "_" + name])]
    try:
        if name == "common.tools.evaluate":
            runpy.run_module(name, run_name="__main__")
        else:
            runpy.run_path(name + ".py", run_name="__main__")
    except Built as e:
        seen[" ".join([name, *extra])] = str(e)
with open(out, "w") as f:
    json.dump(seen, f)
'''


def test_reward_models_fp32_by_default_whatever_the_generator_dtype(tmp_path):
    """Every script and common.tools.evaluate build their reward models in fp32 under --mixed-precision bf16 (the official
    Flow-GRPO code scores PickScore, ImageReward and the aesthetic predictor in fp32; in bf16 PickScore's logit scale
    exp(ln 100) is 99.0), and in bf16 with --reward-dtype bf16. Before, they ran in the generator's dtype."""
    from tests.helpers import tiny_rewards

    clip = str(tiny_rewards.build_tiny_clip(tmp_path / "clip"))
    assert rewards.build_reward("pickscore", paths={"pickscore": f"{clip}|{clip}"}).fns["pickscore"].model.dtype == \
        torch.float32
    (tmp_path / "spy.py").write_text(DTYPE_SPY)
    out = subprocess.run([sys.executable, str(tmp_path / "spy.py"), clip, str(tmp_path / "seen.json")], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {**{m: "torch.float32" for m in [*METHODS, "common.tools.evaluate"]},
                    "fdfo --reward-dtype bf16": "torch.bfloat16",
                    "common.tools.evaluate --reward-dtype bf16": "torch.bfloat16"}


# ----------------------------------------------------------------------------------- CUDA settings, timers, noise
def test_cuda_setup_enables_tf32(monkeypatch):
    """setup_distributed on a CUDA device turns TF32 on for fp32 matmuls and convolutions (official Flow-GRPO)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert utils.setup_distributed("cuda:0")[2] == torch.device("cuda:0")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        utils.setup_distributed("cpu")
        assert not torch.backends.cuda.matmul.allow_tf32  # the CPU path leaves the flags alone
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_timers_wait_for_the_gpu(monkeypatch):
    """perf/* timers: on CUDA the queued kernels finish before the clock is read; on the CPU nothing to wait for."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append(str(d)))
    utils.now("cpu")
    assert waited == []
    utils.now(torch.device("cuda:1"))
    assert waited == ["cuda:1"]


def test_rank_noise_on_the_cpu_is_the_global_draw():
    """On the CPU the per-rank noise is still the slice of one global draw from the iteration's generator (the
    numbers every result so far was computed with; 2 processes == 1 process), and the generator moves on as before."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = utils.randn_for_rank(g1, 6, (3, 4, 4), slice(3, 6), "cpu", torch.bfloat16)
    assert torch.equal(x, torch.randn(6, 3, 4, 4, generator=g2)[3:6].bfloat16())
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("shape,total,offset,n", [((3, 32, 32), 700, 300, 257), ((16, 8, 8), 20, 0, 20),
                                                  ((16, 8, 8), 9, 8, 1), ((3, 5, 5), 9, 4, 3)])
def test_evaluation_noise_is_a_slice_of_one_draw_without_drawing_it_all(shape, total, offset, n):
    """Each rank's evaluation noise equals its slice of the one-process draw (paired base / fine-tuned noise, and
    the evaluation numbers so far), drawn in chunks so that no rank holds every sample's noise (8 samples x 2,212
    GenEval prompts of SD3.5-M latents: 4.6 GB)."""
    ref = torch.randn(total, *shape, generator=torch.Generator().manual_seed(7))[offset:offset + n]
    assert torch.equal(evaluate.eval_noise(shape, 7, total, offset, n, chunk=256), ref)
    assert torch.equal(evaluate.eval_noise(shape, 7, total, offset, n, chunk=3), ref)


def test_evaluation_keeps_uint8_images_and_scores_the_float_ones():
    """evaluate_model keeps the images it returns as uint8 (a quarter of fp32 host memory), and scores the float
    images batch by batch: the metrics equal those of scoring all float images at once."""
    from common.world import shapes

    model = models.load_model("embedded")
    specs = shapes.split_specs("test")[:5]
    res, images, caps, values = evaluate.evaluate_model(model, model.transformer, specs, 3, num_steps=3, batch_size=4,
                                                        return_images=True, reward_fn=rewards.build_reward("shapes"))
    floats = evaluate.generate(model, model.transformer, caps, num_steps=3, batch_size=4)
    assert images.dtype == torch.uint8 and torch.equal(images, rewards.uint8_images(floats))
    partial, strict, _ = shapes.score(floats, [s for s in specs for _ in range(3)])
    assert torch.equal(values, partial) and res["strict_accuracy"] == pytest.approx(strict.float().mean().item())
    assert res["diversity"] == pytest.approx(
        torch.tensor([evaluate.diversity(floats, [list(range(i, i + 3))]) for i in range(0, 15, 3)]).mean().item())
