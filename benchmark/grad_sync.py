"""Per-step gradient communication of SD3.5-M LoRA r32 (the 382 LoRA tensors of the 24 joint blocks' attention
projections, 18.8 M parameters): one all-reduce per tensor in bf16 (cleanflow's earlier sync) against
`utils.sync_gradients` (fp32 buckets of 25 MB, DDP's default size). Both results are checked against each other.

    torchrun --nproc_per_node 2 benchmark/grad_sync.py            # gloo on CPU; nccl when run on GPUs
"""

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import utils  # noqa: E402

INNER, LAYERS, RANK = 1536, 24, 32  # SD3.5-M: 24 heads x 64, 24 joint blocks; LoRA rank 32


def per_tensor(params):
    """cleanflow's earlier sync: one all-reduce per parameter, in the parameters' dtype."""
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def lora_params(dtype):
    shapes = []
    for layer in range(LAYERS):
        n = 7 if layer == LAYERS - 1 else 8  # the last block is context_pre_only: no to_add_out
        shapes += [(RANK, INNER), (INNER, RANK)] * n
    g = torch.Generator().manual_seed(dist.get_rank())
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return params


def timed(fn, params, repeats):
    grads = [p.grad.clone() for p in params]
    times = []
    for _ in range(repeats):
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        dist.barrier()
        t = time.perf_counter()
        fn(params)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    rank, world, device = utils.setup_distributed("cpu" if not torch.cuda.is_available() else None)
    repeats = int(os.environ.get("REPEATS", 5))
    old, new = lora_params(torch.bfloat16), lora_params(torch.float32)
    t_old = timed(per_tensor, old, repeats)
    t_fp32 = timed(per_tensor, lora_params(torch.float32), repeats)
    t_new = timed(utils.sync_gradients, new, repeats)
    err = max((a.grad.float() - b.grad).abs().max().item() for a, b in zip(old, new))
    if rank == 0:
        n = sum(p.numel() for p in new)
        print(f"{len(new)} LoRA tensors, {n / 1e6:.1f} M params, {world} processes ({dist.get_backend()}), "
              f"median of {repeats}")
        print(f"per-tensor bf16 all-reduce (before): {t_old * 1e3:8.1f} ms/step, {len(old)} calls")
        print(f"per-tensor fp32 all-reduce:          {t_fp32 * 1e3:8.1f} ms/step, {len(old)} calls")
        print(f"bucketed fp32 (utils.sync_gradients): {t_new * 1e3:8.1f} ms/step, "
              f"{-(-n * 4 // (25 * 2**20))} calls; max |difference| {err:.3g} (bf16 rounding of the old sum)")
    utils.cleanup_distributed()
