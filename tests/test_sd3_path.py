"""The SD3.5 path as a GPU user meets it, tested without a GPU: every method page's SD3.5-M command line,
sizes swapped for tiny ones, on the tiny random SD3 pipeline with T5, with `--mixed-precision bf16` on CPU; trainable
weights must stay fp32; plus unit tests of the precision and memory plumbing in common/.

What the CPU bf16 matrix proves: no dtype mismatch between bf16 frozen weights, fp32 trainable weights and fp32
latents on any documented code path (T5, LoRA, CFG, gradient checkpointing, EMA / old adapters, evaluation), the
trainable weights and AdamW state stay fp32, and every path runs end to end. What it does not prove: CPU autocast is
not CUDA autocast - on the CPU layer_norm, group_norm, softmax, pow and exp return bf16 under autocast, on CUDA they
run in fp32 - so it says nothing of the casts, the numerics or the speed of a CUDA run, nor of its device placement
(every tensor is on the CPU) or its memory; benchmark/gpu_smoke.sh checks those on a GPU."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import models, rewards
from tests.helpers import prewarmed

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
METHODS = ["advantageflow", "diffusion_nft", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    d = tmp_path_factory.mktemp("sd3")
    (d / "prompts.txt").write_text("a red cat\na blue dog on a bench\na green bird\na yellow car\n")
    return build_tiny_sd3(d / "sd3", t5=True), d / "prompts.txt"


def documented_command(method):
    """The SD3.5-M command line of docs/<method>.md, as a list of flags (the first code line that runs the script
    with --model stabilityai/stable-diffusion-3.5-medium, joined over its backslash continuations)."""
    text = (ROOT / "docs" / f"{method}.md").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if f"{method}.py" in l and "stable-diffusion-3.5-medium" in l)
    line = re.sub(r"<[^>]*>", "PLACEHOLDER", line)  # e.g. --reward <geneval-type reward>
    argv = shlex.split(line.split(f"{method}.py", 1)[1].split("```")[0])
    assert argv and argv[0].startswith("--"), line
    return argv


def tiny_sizes(argv, method, model, prompts):
    """Swap every size in a documented command for a tiny one; keep every other flag as documented."""
    swap = {"--model": str(model), "--resolution": "32", "--prompts-file": str(prompts),
            "--eval-prompts-file": str(prompts), "--num-steps": "3", "--eval-num-steps": "2", "--num-iterations": "2",
            "--eval-every": "1", "--checkpoint-every": "1", "--prompts-per-iter": "2", "--lora-rank": "4",
            "--lora-alpha": "8", "--critic-warmup": "1", "--critic-width": "8", "--ema-every": "1",
            "--group-size": {"flow_grpo": "2", "advantageflow": "2", "diffusion_nft": "2", "acflow": "2"},
            "--train-batch-size": {"flow_grpo": "1", "fdfo": "2", "orw_cfm_w2": "2", "advantageflow": "2",
                                   "diffusion_nft": "2", "acflow": "2"},
            "--num-minibatches": {"fdfo": "2"}}
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        value = argv[i + 1] if has_value else None
        if flag == "--reward":  # real reward models need weights: same weighted form, embedded rewards
            names = ["jpeg_compressibility", "jpeg_incompressibility"]
            value = ",".join(re.sub(r"^[^=]+", names[k % 2], p) for k, p in enumerate(value.split(",")))
        elif flag in swap and has_value:
            s = swap[flag]
            value = s.get(method, value) if isinstance(s, dict) else s
        out += [flag] + ([value] if has_value else [])
        i += 2 if has_value else 1
    return out + ([] if "--resolution" in out else ["--resolution", "32"])


def run_script(method, argv, out_dir, torchrun=0):
    argv = [f"{method}.py", "--output-dir", str(out_dir), "--threads", "1", *argv]
    if torchrun:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                              "--standalone", *argv], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    else:
        out = prewarmed.run(argv, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((out_dir / "summary.json").read_text())


def assert_trainables_fp32(ckpt):
    lora = {k: v for k, v in ckpt["policy"].items() if "lora_" in k}
    assert lora and any(".old." in k for k in lora) == ("old" in str(list(lora)))
    bad = {k: v.dtype for k, v in lora.items() if v.dtype != torch.float32}
    assert not bad, f"trainable LoRA tensors not fp32: {list(bad.items())[:3]}"
    for state in ckpt["optimizer"]["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            assert state[k].dtype == torch.float32


# + Flow-GRPO without KL (its zero KL was a CPU tensor stacked with CUDA ones: the device mismatch itself needs a
# GPU, benchmark/gpu_smoke.sh; here the path runs)
CASES = [(m, []) for m in METHODS] + [("flow_grpo", ["--kl-coef", "0"])]


@pytest.mark.parametrize("method,extra", CASES, ids=[m + "".join(e) for m, e in CASES])
def test_documented_sd35_command_runs_in_bf16(tiny, tmp_path, method, extra):
    """Each method page's SD3.5-M command (tiny sizes, T5, LoRA, CFG where documented) + --mixed-precision bf16
    --gradient-checkpointing runs 2 iterations with a mid-run evaluation; trainable weights and AdamW state are fp32.
    Before this was fixed, advantageflow (and DiffusionNFT) crashed at the first update: 'Input type (float) and bias
    type (c10::BFloat16) should be the same'."""
    model, prompts = tiny
    argv = tiny_sizes(documented_command(method), method, model, prompts)
    argv += extra
    argv += ["--mixed-precision", "bf16", "--gradient-checkpointing", "--eval-samples-per-prompt", "1",
             "--decode-batch-size", "2", "--eval-batch-size", "3"]
    summary = run_script(method, argv, tmp_path / "run")
    assert summary["reward_queries"] > 0 and "reward_mean" in summary["final"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 2
    assert_trainables_fp32(ckpt)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_documented_commands_are_all_covered():
    """Every method page has an SD3.5-M command for the matrix above to run; it evaluates one sample per held-out
    prompt, as the official Flow-GRPO code does (8 per prompt on 2,048-2,212 prompts would be 8x the generation)."""
    for m in METHODS:
        argv = documented_command(m)
        assert "--lora-rank" in argv and "--model" in argv
        assert argv[argv.index("--eval-samples-per-prompt") + 1] == "1", m


# ----------------------------------------------------------------------------------- precision plumbing (unit)
@pytest.fixture(scope="module")
def tiny_no_t5(tmp_path_factory):
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3")


@pytest.mark.parametrize("rank", [4, 0])
def test_trainable_weights_fp32_and_small_updates_survive(tiny_no_t5, rank):
    """Under bf16 the LoRA adapters (learner and rollout "old") / the full learner and its old copy are fp32, the
    reference stays bf16, and AdamW steps at FDFO's lr 3e-5 change every trained entry. Before: LoRA was created in
    bf16 (diffusers' add_adapter does not upcast) and ~80 % of LoRA-A entries never changed in 10 steps."""
    torch.manual_seed(0)
    model = models.load_model(str(tiny_no_t5), "cpu", resolution=32, mixed_precision="bf16")
    policy = models.Policy(model.transformer, rank, with_old=True)
    params = policy.parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    if rank:  # both adapters
        assert all(v.dtype == torch.float32 for v in policy.trainable_state().values())
    else:  # the old copy is updated (EMA) too; the reference is frozen
        assert all(p.dtype == torch.float32 for p in policy.old_model.parameters())
        assert all(p.dtype == torch.bfloat16 for p in policy.ref_model.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0)
    pe, pooled = model.encode_prompt(["a red cat", "a blue dog"])
    x = torch.randn(2, *model.latent_shape)  # fp32 latents into the bf16 model (autocast)
    for _ in range(3):
        opt.zero_grad()
        v = model.transformer(hidden_states=x, timestep=torch.full((2,), 500.0), encoder_hidden_states=pe,
                              pooled_projections=pooled, return_dict=False)[0]
        assert v.dtype == torch.float32  # outputs converted to fp32, as accelerate does
        v.pow(2).mean().backward()
        opt.step()
    changed = torch.cat([(p.detach() != b).flatten() for p, b in zip(params, before)
                         if p.grad is not None and p.grad.abs().min() > 0])
    assert changed.float().mean() > 0.99
    policy.update_old(0.9)
    with policy.old() as old:
        assert all(p.dtype == torch.float32 for n, p in old.named_parameters() if ".old." in n or rank == 0)
        assert old(hidden_states=x, timestep=torch.full((2,), 500.0), encoder_hidden_states=pe,
                   pooled_projections=pooled, return_dict=False)[0].dtype == torch.float32


def test_decode_in_chunks(tiny_no_t5):
    """The VAE decodes at most decode_batch_size latents at once (before: the whole batch - ~0.75 GB of fp32
    activations per 512-px image) and the images equal a one-shot decode."""
    model = models.load_model(str(tiny_no_t5), "cpu", resolution=32, decode_batch_size=2)
    latents = torch.randn(5, *model.latent_shape)
    sizes = []
    hook = model.vae.decoder.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    images = model.decode(latents)
    hook.remove()
    assert sizes == [2, 2, 1]
    model.decode_batch_size = 5
    assert torch.allclose(images, model.decode(latents), atol=1e-5)


def test_mixed_precision_choices_fail_before_loading():
    from tests.helpers.cli_check import check_flags

    code, err = check_flags("fdfo", ["--mixed-precision", "fp8"])
    assert code == 2 and "--mixed-precision" in err[-1] and "bf16" in err[-1]
    code, err = check_flags("flow_grpo", ["--decode-batch-size", "0"])
    assert code == 2 and "--decode-batch-size" in err[-1]
    # fp16 training would need loss scaling (a GradScaler; LoRA gradients underflow in fp16): refused in one line
    code, err = check_flags("acflow", ["--mixed-precision", "fp16"])
    assert code == 2 and err == ["error: --mixed-precision fp16 is not supported for training (no loss scaling); "
                                 "choose from: no, bf16"]
    assert check_flags("acflow", ["--mixed-precision", "bf16"])[0] == 0


def test_reward_models_load_in_the_requested_dtype(tmp_path):
    """Reward models load in the dtype asked for (the scripts' --reward-dtype: fp32 by default, bf16 / fp16 to save
    memory, ~33 GB in fp32 for the 7B VLM), scoring in chunks of batch_size."""
    from tests.helpers import tiny_rewards

    clip = str(tiny_rewards.build_tiny_clip(tmp_path / "clip"))
    fn = rewards.build_reward("pickscore", "cpu", paths={"pickscore": f"{clip}|{clip}"}, dtype=torch.bfloat16, batch_size=2)
    assert fn.fns["pickscore"].model.dtype == torch.bfloat16 and fn.fns["pickscore"].batch_size == 2
    r, _ = fn(torch.rand(3, 3, 32, 32), ["a red cat"] * 3)
    assert r.shape == (3,) and torch.isfinite(r).all()


# ----------------------------------------------------------------------------------- multi-process
SYNC_SCRIPT = '''
import torch, torch.distributed as dist
from common import utils
rank, world, _ = utils.setup_distributed("cpu")
shapes = [(3, 5), (7,), (2, 2, 2), (11, 1), (4,)]
params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes] + [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 3))]
for i, p in enumerate(params):
    p.grad = torch.full(p.shape, float(10 * i + rank + 1))
params[-1].grad = None  # no gradient: skipped
calls = []
real = dist.all_reduce
dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
utils.sync_gradients(params, bucket_mb=40 * 4 / 2**20)  # buckets of >= 40 fp32 elements
for i, p in enumerate(params[:-1]):
    assert torch.equal(p.grad, torch.full(p.shape, 10 * i + 1.5)), (i, p.grad)
assert calls == [41, 7], calls  # 15+7+8+11 = 41 >= 40 closes the first bucket; 4 + 3 the second
print("ok", rank)
utils.cleanup_distributed()
'''


@pytest.mark.slow
def test_bucketed_gradient_sync_averages_in_few_calls(tmp_path):
    """utils.sync_gradients: the rank mean of every gradient, in fp32 buckets (one all-reduce each; before: one per
    tensor, 382 per step for SD3.5-M LoRA r32, in the parameters' dtype)."""
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(script)], capture_output=True, text=True, cwd=ROOT,
                         env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0 and out.stdout.count("ok") == 2, out.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_bf16_sd3_two_processes_match_one(tiny, tmp_path):
    """advantageflow's documented SD3.5-M command (tiny sizes, bf16, LoRA, T5): 2 processes x per-process batch 2 ==
    1 process x batch 4 (noise drawn for the global batch); trained LoRA weights agree up to bf16 rounding."""
    from safetensors.torch import load_file

    model, prompts = tiny
    argv = tiny_sizes(documented_command("advantageflow"), "advantageflow", model, prompts)
    argv += ["--mixed-precision", "bf16", "--eval-samples-per-prompt", "1", "--eval-every", "100", "--lr", "1e-2"]
    one = run_script("advantageflow", argv, tmp_path / "one")
    two = run_script("advantageflow", argv, tmp_path / "two", torchrun=2)
    assert one["reward_queries"] == two["reward_queries"]
    w1, w2 = (load_file(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors") for d in ("one", "two"))
    dist = sum(((w1[k].float() - w2[k].float()) ** 2).sum() for k in w1).sqrt()
    moved = sum((w1[k].float() ** 2).sum() for k in w1 if "lora_B" in k).sqrt()  # lora_B starts at zero
    assert moved > 0 and dist < 0.01 * moved, (dist.item(), moved.item())


# ----------------------------------------------------------------------------------- evaluation at scale
def test_evaluation_returns_the_picked_samples(tiny_no_t5):
    """evaluate_model(return_images=<indices>) gives exactly those samples of the full evaluation (what the sample
    grid shows under sharding, where no rank holds all images)."""
    from common.evaluate import evaluate_model

    model = models.load_model(str(tiny_no_t5), "cpu", resolution=32)
    caps = ["a red cat", "a blue dog", "a green bird"]
    fn = rewards.build_reward("jpeg_compressibility")
    res, images, rep_caps, values = evaluate_model(model, model.transformer, [None] * 3, 2, 0, 1.0, 2, fn, caps, True)
    res2, picked, pcaps, pvalues = evaluate_model(model, model.transformer, [None] * 3, 2, 0, 1.0, 2, fn, caps,
                                                  [0, 4], batch_size=4)
    assert res2.pop("rewards") == {"jpeg_compressibility": pytest.approx(res.pop("rewards")["jpeg_compressibility"],
                                                                        rel=1e-5)}
    assert res2 == pytest.approx(res, rel=1e-5) and pcaps == [caps[0], caps[2]]  # other batch: float rounding
    assert torch.allclose(pvalues, values[[0, 4]], atol=1e-3)
    assert picked.dtype == images.dtype == torch.uint8 and (picked.int() - images[[0, 4]].int()).abs().max() <= 1
    # a rank's slice (samples 2..3 of 6) is generated on the noise one process gives those samples
    from common.evaluate import generate

    part = generate(model, model.transformer, [caps[1]] * 2, 0, 1.0, 2, offset=2, total=6)
    assert (rewards.uint8_images(part).int() - images[2:4].int()).abs().max() <= 1


@pytest.mark.slow
def test_sharded_evaluation_matches_one_process(tiny, tmp_path):
    """`torchrun --nproc_per_node 2 -m common.tools.evaluate`: each rank generates its slice of the prompts (5 prompts:
    3 + 2) on the noise one process would use; the gathered metrics equal the one-process ones, and the GenEval
    layout holds every prompt. Earlier, evaluation ran on rank 0 while the other ranks waited."""
    model, _ = tiny
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\na yellow car\na white house\n")
    common = ["-m", "common.tools.evaluate", "--model", str(model), "--resolution", "32", "--use-t5", "--prompts-file",
              str(prompts), "--reward", "jpeg_compressibility", "--samples-per-prompt", "2", "--num-steps", "2",
              "--mixed-precision", "bf16", "--batch-size", "3"]
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--standalone"])):
        args = [*common, "--json", str(tmp_path / f"{name}.json"), "--save-images", str(tmp_path / name)]
        out = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.count("overall") == 1  # one table: rank 0 reports the gathered results
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["n"] == two["n"] == 10
    for k in ("reward_mean", "train_reward_mean", "diversity"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-4), k
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"{i:05d}" for i in range(5)]
    assert len(list((tmp_path / "two").glob("*/samples/*.png"))) == 10


@pytest.mark.slow  # ~20-50 s: in the full suite, not the fast tier
def test_documented_sd35_commands_fit_80gb():
    """benchmark/gpu_memory.py (meta-device trace of SD3.5-M, no weights): every method page's command, as written
    there, must fit an 80 GB GPU under the margin rule of docs/gpu.md (`gpu_memory.fits`: 1.15 x the allocated peak
    for fragmentation + 1 GiB CUDA context < 78 GiB usable); and the traced VAE decode must be the ~0.75 GiB per
    512-px image measured (the tracer counts what it should)."""
    import gpu_memory

    sd = gpu_memory.SD35M()
    assert sd.phase("vae", 1) / 2**30 == pytest.approx(0.75, rel=0.1)
    for m in METHODS:
        e = gpu_memory.estimate(sd, m)
        assert gpu_memory.fits(e["total"]), (m, e["total"] / 2**30, (e["reserved"] + gpu_memory.CONTEXT) / 2**30,
                                             e["worst"])
