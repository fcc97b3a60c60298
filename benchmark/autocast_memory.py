"""How much more activation memory the scripts' mixed-precision path saves than a pure bf16 model, measured on a
2-block SD3.5-M-width transformer on the CPU (real tensors, batch 1 at 512 px: 1,024 image + 205 text tokens).

    python benchmark/autocast_memory.py            # ~1-2 min on one core

Configurations (LoRA r32 on the 8 attention projections of each joint block, as `models.Policy`):
- bf16: every weight bf16, no autocast (what `benchmark/gpu_memory.py` traced before);
- autocast (CPU): the scripts' path (`models.load_model` + `Policy`): frozen weights bf16, LoRA fp32, the
  forward under torch.autocast("cpu", bf16) with fp32 outputs;
- emulated CPU / CUDA policy: the same model without torch.autocast, the casts made by `AutocastPolicy` with
  CPU's or CUDA's op lists. The CPU emulation must match the real CPU autocast (checks the emulation); the CUDA
  one is what a GPU would save (CUDA runs layer_norm, pow, exp, softmax, sum in fp32, CPU in the input dtype).

Counted: the bytes of the distinct tensors autograd saves for the backward pass (saved_tensors_hooks; frozen
weights excluded), and the high-water mark of forward + backward (`gpu_memory.traced`: the bytes the ops allocate,
attention counted as a fused kernel).
"""

import contextlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmark"))
from common import models  # noqa: E402
from gpu_memory import SD35M_TRANSFORMER, AutocastPolicy, traced  # noqa: E402


def build(config):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    cfg = dict(SD35M_TRANSFORMER, num_layers=2, dual_attention_layers=(0,))  # one dual-attention block, one plain
    tr = SD3Transformer2DModel(**cfg).to(torch.bfloat16)
    if config == "autocast":
        models.autocast_forward(tr, torch.bfloat16)
    policy = models.Policy(tr, 32, 64)  # LoRA fp32 (cast_training_params)
    if config == "bf16":
        for p in policy.parameters():
            p.data = p.data.to(torch.bfloat16)
    return tr, policy


def inputs(b=1, res=512, text_len=77 + 128):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(b, 16, res // 8, res // 8, generator=g).bfloat16(),
                timestep=torch.full((b,), 500.0), return_dict=False,
                encoder_hidden_states=torch.randn(b, text_len, 4096, generator=g).bfloat16(),
                pooled_projections=torch.randn(b, 2048, generator=g).bfloat16())


def measure(config):
    tr, policy = build(config)
    frozen = {p.untyped_storage().data_ptr() for p in tr.parameters()}
    saved, by_dtype = {}, {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen and ptr not in saved:
            saved[ptr] = t.untyped_storage().nbytes()
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + saved[ptr]
        return t

    policy_name = config.split()[-1] if config.startswith("emulated") else None
    mode = AutocastPolicy(policy_name) if policy_name else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode:
            with mode:
                out = tr(**inputs())[0].float()
        else:
            out = tr(**inputs())[0].float()
    del out

    def step():
        with mode or contextlib.nullcontext():
            tr(**inputs())[0].float().pow(2).mean().backward()

    return sum(saved.values()), by_dtype, traced(step)  # forward + backward high-water mark, fused attention


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", 1)))
    MiB = 2**20
    rows = {}
    for config in ("bf16", "autocast", "emulated cpu", "emulated cuda"):
        rows[config] = measure(config)
        s, d, p = rows[config]
        dt = ", ".join(f"{str(k)[6:]} {v / MiB:.0f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
        print(f"{config:14s} saved {s / MiB:7.1f} MiB ({dt})   fwd+bwd peak {p / MiB:7.1f} MiB", flush=True)
    base = rows["bf16"]
    for config in ("autocast", "emulated cpu", "emulated cuda"):
        print(f"{config} / bf16: saved x{rows[config][0] / base[0]:.3f}, peak x{rows[config][2] / base[2]:.3f}")


if __name__ == "__main__":
    main()
