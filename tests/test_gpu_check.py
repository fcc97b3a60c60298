"""The CPU-testable parts of the GPU acceptance test (benchmark/gpu_smoke.sh -> benchmark/gpu_check.py) and of the
memory estimate (benchmark/gpu_memory.py): the autocast emulation the estimate traces with, the byte counting, the
plan of runs, the reading of TensorBoard scalars and of the docs table."""

import contextlib
from pathlib import Path

import pytest
import torch

import gpu_check
import gpu_memory
from common import models

ROOT = Path(__file__).resolve().parents[1]


def tiny_transformer(autocast):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                               qk_norm="rms_norm", dual_attention_layers=(0,)).to(torch.bfloat16)
    if autocast:
        models.autocast_forward(tr, torch.bfloat16)
    models.Policy(tr, 4, 8)  # fp32 LoRA
    return tr


def saved_bytes(tr, mode=None):
    frozen = {p.untyped_storage().data_ptr() for p in tr.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in frozen:
            saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    x = dict(hidden_states=torch.randn(2, 4, 8, 8).bfloat16(), timestep=torch.full((2,), 500.0),
             encoder_hidden_states=torch.randn(2, 5, 32).bfloat16(), pooled_projections=torch.randn(2, 32).bfloat16())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode or contextlib.nullcontext():
        tr(**x, return_dict=False)[0].float().sum().backward()
    return sorted(saved.values(), key=lambda v: (v[0], str(v[1])))


def test_emulated_cpu_autocast_saves_what_torch_autocast_saves():
    """gpu_memory traces with AutocastPolicy (meta tensors have no autocast): given CPU's op lists it must save the
    same tensors, in the same dtypes, as the scripts' real CPU autocast path; CUDA's lists save more fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    real = saved_bytes(tiny_transformer(autocast=True))
    with sdpa_kernel(SDPBackend.MATH):  # the real CPU path's attention kernel in passes with gradients (models.py)
        cpu = saved_bytes(tiny_transformer(autocast=False), gpu_memory.AutocastPolicy("cpu"))
        cuda = saved_bytes(tiny_transformer(autocast=False), gpu_memory.AutocastPolicy("cuda"))
    assert real and cpu == real
    fp32 = lambda s: sum(n for n, d in s if d == torch.float32)  # noqa: E731
    assert fp32(cuda) > fp32(cpu)


def test_peak_memory_counts_new_storages_not_views_of_weights():
    w = torch.randn(64, 64, device="meta")
    with gpu_memory.PeakMemory() as pm:
        v = w.t()  # a view of a tensor made outside: no new memory
        y = torch.empty(8, 64, device="meta") @ v
        del v, y
    assert pm.peak == 8 * 64 * 4 * 2  # the input made inside and the product


def test_plan_keeps_each_pages_micro_batch_and_shortens_epochs(capsys):
    class A:
        dry_run, full_batch, reward, device, tiny_resolution = True, False, "jpeg_compressibility", "auto", 64
        out = "unused"

    ctx = gpu_check.Ctx(A)
    ctx.plan, ctx.model, ctx.tiny, ctx.prompts = [], "stabilityai/stable-diffusion-3.5-medium", False, "p.txt"
    for m in gpu_check.METHODS:
        gpu_check.method_run(ctx, m)
    plan = {p["method"]: p["flags"] for p in ctx.plan}
    for m in gpu_check.METHODS:
        world, doc = gpu_check.documented(m)
        f = plan[m]
        assert f["--train-batch-size"] == doc["--train-batch-size"] and f["--no-save-model"] is True
        for k in ("--guidance-scale", "--lora-rank", "--num-steps", "--kl-coef", "--ema", "--use-t5"):
            assert f.get(k) == doc.get(k), (m, k)
    assert int(plan["advantageflow"]["--prompts-per-iter"]) * 4 == 16  # the page's 16 images per GPU
    assert plan["orw_cfm_w2"]["--num-iterations"] == 2 * plan["orw_cfm_w2"]["--epoch-iters"]  # two pool samplings
    assert plan["acflow"]["--num-iterations"] == 2 * plan["acflow"]["--epoch-iters"]
    assert "flow_grpo.py" in capsys.readouterr().out
    big = gpu_memory.estimate(gpu_memory.SD35M(), "flow_grpo", flags=plan["flow_grpo"])
    assert big["worst"] == "train"  # the smoke run reaches the page's peak phase


def test_seconds_per_iter_reads_perf_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(tmp_path)
    for step in range(1, 5):  # ORW-like: a pool sampled at iterations 1 and 3 (epochs of 2)
        w.add_scalar("perf/sample_s", 10.0 if step in (1, 3) else 0.0, step)
        w.add_scalar("perf/reward_s", 1.0, step)
        w.add_scalar("perf/train_s", 2.0, step)
    w.close()
    assert gpu_check.seconds_per_iter(tmp_path, "orw_cfm_w2", {"--epoch-iters": 2}) == pytest.approx(8.0)
    assert gpu_check.seconds_per_iter(tmp_path, "flow_grpo", {}) == pytest.approx((13 + 3 + 3) / 3)


def test_docs_table_has_a_row_per_method_and_states_the_margin_rule():
    rows = gpu_check.doc_rows()
    assert set(rows) == set(gpu_check.METHODS)
    text = (ROOT / "docs" / "gpu.md").read_text()
    assert "1.15 x peak + 1 GiB < 78 GiB" in text
    assert gpu_memory.fits(60 * 2**30) and not gpu_memory.fits(70 * 2**30)


def test_dtype_check_flags_a_bf16_trainable(capsys):
    class A:
        out = "unused"

    ctx = gpu_check.Ctx(A)
    gpu_check.dtype_check(ctx, "x", {"dtypes": {"trainable": ["bfloat16"], "reward pickscore": ["float32"]}},
                          "float32", "bfloat16")
    gpu_check.dtype_check(ctx, "y", {"dtypes": {"trainable": ["float32"], "frozen transformer": ["bfloat16"],
                                                "reward pickscore": ["float32"]}}, "float32", "bfloat16")
    assert [r["status"] for r in ctx.results] == ["FAIL", "PASS"]


def test_flux_plan_runs_each_pages_flux_command_and_reads_its_docs_row(capsys):
    """The FLUX checks run each page's FLUX.1-dev command (its micro-batch, LoRA rank, guidance embedding value, no
    CFG, gradient checkpointing where the page has it) on the FLUX model, and docs/gpu.md has a FLUX row per method
    for the memory check to print beside the measurement."""
    class A:
        dry_run, full_batch, reward, device, tiny_resolution = True, False, "jpeg_compressibility", "auto", 64
        out = "unused"

    ctx = gpu_check.Ctx(A)
    ctx.plan, ctx.model, ctx.tiny, ctx.prompts = [], "sd3", False, "p.txt"
    ctx.flux_model, ctx.flux_tiny = gpu_check.FLUX_DEV, False
    for m in gpu_check.METHODS:
        gpu_check.method_run(ctx, m, flux=True)
    plan = {p["method"]: p for p in ctx.plan}
    for m in gpu_check.METHODS:
        _, doc = gpu_check.documented(m, flux=True)
        p = plan[m]
        assert p["key"] == f"flux_{m}" and p["model"] == "flux" and p["flags"]["--model"] == gpu_check.FLUX_DEV
        for k in ("--train-batch-size", "--lora-rank", "--flux-guidance", "--num-steps", "--gradient-checkpointing",
                  "--eval-batch-size"):
            assert p["flags"].get(k) == doc.get(k), (m, k)
        assert "--guidance-scale" not in p["flags"] or float(p["flags"]["--guidance-scale"]) == 1
    assert "flux_flow_grpo" in capsys.readouterr().out
    assert set(gpu_check.doc_rows(flux=True)) == {f"{m} (FLUX.1-dev)" for m in gpu_check.METHODS}
