"""How close the embedded transformer's passes come to the machine's matmul peak, per precision and compilation.

    python benchmark/compute.py [--threads 2] [--batch-size 64] [--reps 10] [--compile]

Prints, for the same threads: the peak of one large matmul (fp32 and bf16; 2048^3), and the embedded transformer's
sampling pass (forward under no_grad) and training pass (forward + backward, every weight trainable, as the embedded
default fine-tunes) in GFLOP/s (FLOPs counted by torch.utils.flop_counter; backward = 2x forward) and as a fraction
of that peak, for fp32 and for bf16 autocast as a run sets it up (`common.models.load_model` + `Policy`: trainable
weights in fp32, the forward under torch.autocast, attention with the math kernel in passes that take gradients).
Each precision twice: with the embedded model's fast CPU kernels (the runs' default: attention as two matmuls,
tanh-GELU via sigmoid; common/world/model.py) and with diffusers' own ("torch kernels", `--no-fast-cpu-kernels`).
`--compile` adds torch.compile of the sampling pass (its one-off compile time printed; inductor caches it on disk).
Timings are medians over --reps, the variants interleaved so that a slow minute hits all of them; run it alone.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import models  # noqa: E402
from common import reward_models, world  # noqa: E402,F401 (they register the real rewards and the embedded world)


def matmul_peak(dtype, n=2048, reps=10):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="images per pass (the methods' sampling and training "
                   "micro-batch on the embedded world)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd sampling passes")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    peak = {"no": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"{a.threads} threads, CPU bf16 native: {models.cpu_has_bf16()}; matmul peak fp32 {peak['no']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    variants = {}
    for mp in ("no", "bf16"):
        for fast in (False, True):
            model = models.load_model("embedded", mixed_precision=mp, fast_cpu_kernels=fast)
            models.Policy(model.transformer)  # trainable weights in fp32, as in a run
            variants[mp + ("" if fast else " torch-kernels")] = model.transformer
        if a.compile:
            variants[mp + "+compile"] = torch.compile(model.transformer)
    pe, pooled = model.encode_prompt(["a red circle above a blue square"] * a.batch_size)
    pe, pooled = pe.float(), pooled.float()
    x, t = torch.randn(a.batch_size, *model.latent_shape), torch.rand(a.batch_size) * 1000

    def sample_pass(tr):
        with torch.no_grad():
            tr(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)

    def train_pass(tr):
        out = tr(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)[0]
        out.pow(2).mean().backward()
        tr.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        sample_pass(variants["no"])
    flops = fc.get_total_flops()
    passes = {(name, "sample"): (sample_pass, tr) for name, tr in variants.items()}
    passes.update({(name, "train"): (train_pass, tr) for name, tr in variants.items() if "compile" not in name})
    for (name, kind), (fn, tr) in passes.items():
        t0 = time.perf_counter()
        fn(tr)
        if "compile" in name:
            print(f"{name}: first call (compiles) {time.perf_counter() - t0:.1f} s")
        fn(tr)
    times = {k: [] for k in passes}
    for _ in range(a.reps):
        for k, (fn, tr) in passes.items():
            t0 = time.perf_counter()
            fn(tr)
            times[k].append(time.perf_counter() - t0)
    print(f"\nembedded transformer, batch {a.batch_size}: {flops / 1e9:.1f} GFLOP per forward\n")
    print("| pass | variant | ms | GFLOP/s | of the matmul peak (same dtype) | speed-up vs fp32 torch-kernels |")
    print("|---|---|---|---|---|---|")
    for kind, mult in (("sample", 1), ("train", 3)):
        base = statistics.median(times[("no torch-kernels", kind)])
        for (name, k), ts in times.items():
            if k != kind:
                continue
            med = statistics.median(ts)
            gflops = mult * flops / med / 1e9
            dtype = "bf16" if "bf16" in name else "no"
            label = name.replace("no", "fp32")
            print(f"| {kind} | {label} | {med * 1e3:.0f} | {gflops:.0f} | {gflops / peak[dtype]:.0%} | "
                  f"{base / med:.2f}x |")


if __name__ == "__main__":
    main()
