"""Estimated peak GPU memory per process of each method page's SD3.5-M command (docs/<method>.md), without a GPU and
without weights: the real SD3.5-M transformer, VAE and text-encoder configs (written below, from the model's
config.json files) are built on the meta device, and each phase of an iteration is run there at the command's
batch sizes while a dispatch mode adds up the bytes of every tensor the ops allocate and frees them when the last
reference dies (peak = high-water mark). Weights and trainable state are counted from parameter numbers.

    python benchmark/gpu_memory.py                 # table (markdown) on stdout; ~1 min on one core

What the table adds up, per process: frozen weights in bf16 (--mixed-precision bf16, the CUDA default), VAE in fp32,
reward models in bf16 (parameter counts of the released checkpoints); LoRA learner (+ rollout / EMA adapter) in fp32
with fp32 gradients and AdamW moments; the iteration's stored tensors (prompt embeddings, latents, trajectories);
plus the largest transient phase: a training micro-step (forward + backward at --train-batch-size, doubled under CFG
when the method trains through CFG), a no-grad rollout / evaluation forward (--eval-batch-size, doubled under CFG),
a VAE decode (--decode-batch-size) or the prompt encoding. Attention is counted as a fused kernel (flash / memory-
efficient, what SDPA picks on CUDA). Not counted: the CUDA context (~0.5-1 GB), allocator fragmentation (allow
~10 %), reward-model activations (< 1 GB at batch 16). `benchmark/gpu_smoke.sh` measures the real peak on a GPU.
"""

import re
import shlex
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import models  # noqa: E402

GiB = 2**30
# stabilityai/stable-diffusion-3.5-medium: transformer/config.json, vae/config.json, text_encoder{,_2,_3}/config.json
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# reward models (parameters of the released checkpoints): PickScore_v1 = CLIP-H/14, CLIP ViT-L/14, Qwen2.5-VL-7B
REWARD_PARAMS = {"pickscore": 0.986e9, "clipscore": 0.428e9, "vlm": 8.29e9}
METHODS = ["advantageflow", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"]
CFG_ROLLOUTS = {"flow_grpo", "fdfo"}  # sample (and train) with --guidance-scale; the others roll out CFG-free
MICRO_BATCHED_ROLLOUTS = {"flow_grpo", "fdfo"}  # rollouts in --train-batch-size chunks; the others: whole batch


class PeakMemory(TorchDispatchMode):
    """Bytes of the storages that ops allocate inside the context (inputs made outside and views are not counted),
    released when their last tensor dies; `peak` is the high-water mark."""

    def __init__(self):
        super().__init__()
        self.size, self.refs, self.now, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.size:
                    self.size[key], self.refs[key] = s.nbytes(), 0
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """The memory of a fused attention kernel (output + log-sum-exp; no (L, L) matrix), on meta tensors."""
    if attn_mask is not None:
        return _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]


_sdpa = F.scaled_dot_product_attention


def meta(build):
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return build()
    finally:
        torch.set_default_dtype(torch.float32)


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def traced(fn):
    F.scaled_dot_product_attention = fused_sdpa  # diffusers' attention processors call F.scaled_dot_product_attention
    try:
        with PeakMemory() as pm:
            fn()
    finally:
        F.scaled_dot_product_attention = _sdpa
    return pm.peak


def documented(method):
    text = (ROOT / "docs" / f"{method}.md").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if f"{method}.py" in l and "stable-diffusion-3.5-medium" in l)
    world = int(m.group(1)) if (m := re.search(r"--nproc_per_node[ =](\d+)", line)) else 1
    argv = shlex.split(re.sub(r"<[^>]*>", "X", line).split(f"{method}.py", 1)[1])
    flags, i = {}, 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[argv[i]], i = argv[i + 1], i + 2
        else:
            flags[argv[i]], i = True, i + 1
    return world, flags


class SD35M:
    """Meta-device SD3.5-M with LoRA r32 (the scripts' targets) and the tracing of each phase."""

    def __init__(self):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        self.transformer = meta(lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER))
        self.n_transformer = nparams(self.transformer)
        self.policy = models.Policy(self.transformer, 32, 64, with_old=False)  # fp32 LoRA (cast_training_params)
        self.n_lora = sum(p.numel() for p in self.policy.parameters())
        for p in self.policy.parameters():  # meta tensors have no autocast: trace with the bf16 casts it would make
            p.data = p.data.to(torch.bfloat16)
        self.vae = meta(lambda: AutoencoderKL(**SD35M_VAE)).float()
        self.t5 = meta(lambda: T5EncoderModel(T5Config(**T5_XXL)))
        self.n_clip = sum(nparams(meta(lambda c=c: CLIPTextModelWithProjection(CLIPTextConfig(**c))))
                          for c in (CLIP_L, CLIP_G))
        self.cache = {}

    def _inputs(self, b, res, text_len):
        lat = res // 8
        kw = dict(device="meta")
        return dict(hidden_states=torch.empty(b, 16, lat, lat, dtype=torch.bfloat16, **kw),
                    timestep=torch.empty(b, **kw), return_dict=False,
                    encoder_hidden_states=torch.empty(b, text_len, 4096, dtype=torch.bfloat16, **kw),
                    pooled_projections=torch.empty(b, 2048, dtype=torch.bfloat16, **kw))

    def phase(self, name, b, res=512, text_len=77 + 128, checkpointing=False):
        key = (name, b, res, text_len, checkpointing)
        if key in self.cache:
            return self.cache[key]
        tr = self.transformer
        tr.enable_gradient_checkpointing() if checkpointing and name == "train" else tr.disable_gradient_checkpointing()
        if name == "train":
            def fn():
                v = tr(**self._inputs(b, res, text_len))[0]
                v.float().pow(2).mean().backward()
                for p in self.policy.parameters():
                    p.grad = None
        elif name == "forward":
            def fn():
                with torch.no_grad():
                    tr(**self._inputs(b, res, text_len))
        elif name == "vae":
            def fn():
                with torch.no_grad():
                    self.vae.decode(torch.empty(b, 16, res // 8, res // 8, device="meta"))
        elif name == "t5":
            def fn():
                with torch.no_grad():
                    self.t5(torch.zeros(b, 128, dtype=torch.long, device="meta"))
        self.cache[key] = traced(fn)
        tr.disable_gradient_checkpointing()
        return self.cache[key]


def estimate(sd, method, checkpointing=False):
    world, f = documented(method)
    res = int(f.get("--resolution", 512))
    n = int(f["--prompts-per-iter"]) * int(f.get("--group-size", 1)) // world  # images per process
    tbs, steps = int(f["--train-batch-size"]), int(f.get("--num-steps", 10))
    cfg = float(f.get("--guidance-scale", 1.0)) > 1
    t5 = "--use-t5" in f
    rewards = [p.split("=")[0] for p in f.get("--reward", "").split(",")]
    with_old = method != "fdfo" and (method != "flow_grpo" or "--ema" in f)
    lat = 16 * (res // 8) ** 2
    weights = (sd.n_transformer + sd.n_clip + (nparams(sd.t5) if t5 else 0)) * 2 + nparams(sd.vae) * 4
    weights += sum(REWARD_PARAMS.get(r, 0) * 2 for r in rewards)
    trainable = sd.n_lora * 4 * (4 + with_old)  # fp32 params, grads, 2 AdamW moments (+ old adapter)
    text = n * (77 + 128) * 4096 * 2 + n * 2048 * 2  # prompt_embeds + pooled, bf16
    stored = {"flow_grpo": n * (steps + 1) * lat * 4,  # fp32 SDE trajectory
              "fdfo": n * steps * lat * 2 * 2 + n * lat * 4,  # bf16 states + velocities, fp32 finals
              }.get(method, n * lat * 2) + text
    roll_b = tbs if method in MICRO_BATCHED_ROLLOUTS else n
    eval_b = 128
    phases = {
        "train": sd.phase("train", tbs * (2 if cfg and method == "flow_grpo" else 1), res, checkpointing=checkpointing),
        "rollout": sd.phase("forward", roll_b * (2 if cfg and method in CFG_ROLLOUTS else 1), res),
        "eval": sd.phase("forward", eval_b * (2 if cfg else 1), res),
        "vae": sd.phase("vae", 16, res),
        "text": sd.phase("t5", min(n, 128)) if t5 else 0,
    }
    worst = max(phases, key=phases.get)
    total = weights + trainable + stored + phases[worst]
    return dict(method=method, world=world, images=n, tbs=tbs, weights=weights, trainable=trainable, stored=stored,
                phases=phases, worst=worst, total=total)


def main():
    torch.set_num_threads(1)
    sd = SD35M()
    print(f"SD3.5-M transformer {sd.n_transformer / 1e9:.2f} B params, LoRA r32 {sd.n_lora / 1e6:.1f} M, "
          f"CLIP-L+G {sd.n_clip / 1e9:.2f} B, T5-XXL encoder {nparams(sd.t5) / 1e9:.2f} B, VAE {nparams(sd.vae) / 1e6:.0f} M\n")
    print("| method (docs command) | GPUs | images / GPU | train micro-batch | weights | LoRA + AdamW | stored "
          "| train step | rollout fwd | eval fwd (128) | VAE decode (16) | **peak / GPU** | with `--gradient-checkpointing` |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        e, g = estimate(sd, m), estimate(sd, m, checkpointing=True)
        p = e["phases"]
        g_total = g["total"] if g["worst"] == "train" else max(g["total"], e["total"] - p["train"] + g["phases"]["train"])
        print(f"| {m} | {e['world']} | {e['images']} | {e['tbs']} | {e['weights'] / GiB:.1f} | "
              f"{e['trainable'] / GiB:.2f} | {e['stored'] / GiB:.1f} | {p['train'] / GiB:.1f} | {p['rollout'] / GiB:.1f} | "
              f"{p['eval'] / GiB:.1f} | {p['vae'] / GiB:.1f} | **{e['total'] / GiB:.1f} GiB** ({e['worst']}) | "
              f"{g_total / GiB:.1f} GiB |")
    print("\nGiB; peak = weights + LoRA/AdamW + stored + the largest phase (named). Add ~1 GiB CUDA context and ~10 % "
          "fragmentation before comparing with 80 GB.")


if __name__ == "__main__":
    main()
