"""Estimated peak GPU memory per process of each method page's SD3.5-M and FLUX.1-dev commands (docs/<method>.md),
without a GPU and without weights: the real SD3.5-M / FLUX.1-dev transformer, VAE and text-encoder configs (written
below, from the models' config.json files) are built on the meta device, and each phase of an iteration is run there at the command's
batch sizes while a dispatch mode adds up the bytes of every tensor the ops allocate and frees them when the last
reference dies (peak = high-water mark). Weights and trainable state are counted from parameter numbers.

    python benchmark/gpu_memory.py                 # table (markdown) on stdout; ~3 min on one core
    python benchmark/gpu_memory.py --json out.json # also every number, for benchmark/gpu_check.py

What the table adds up, per process: frozen weights in bf16 (--mixed-precision bf16, the CUDA default), VAE in fp32,
reward models in --reward-dtype (fp32 by default; parameter counts of the released checkpoints); LoRA learner
(+ rollout / EMA adapter) in fp32 with fp32 gradients and AdamW moments; the iteration's stored tensors (prompt
embeddings, latents, trajectories, ORW / AC-Flow's pool) as the scripts keep them; plus the largest transient phase:
a training micro-step, a no-grad rollout / evaluation forward (--eval-batch-size, doubled under CFG), a VAE decode
(--decode-batch-size, plus the images decoded so far) or the prompt encoding.

The transformer phases run as the scripts run them on CUDA: fp32 LoRA weights, the forward under an emulation of
CUDA's torch.autocast(bf16) (`AutocastPolicy`: CUDA keeps layer_norm, pow, softmax, sum in fp32, CPU autocast does
not; checked against the real CPU autocast by benchmark/autocast_memory.py), fp32 outputs. A training micro-step is
forward + backward at --train-batch-size (doubled under CFG when the method trains through CFG); Flow-GRPO's
reference forward (--kl-coef > 0) runs while the learner's graph is alive, so it is traced inside the step. Attention
is counted as a fused kernel (flash / memory-efficient, what SDPA picks on CUDA).

Not counted: the CUDA context (~0.5-1 GiB, outside PyTorch's allocator), allocator fragmentation, reward-model
activations (< 1 GiB at batch 16), cuBLAS / attention workspaces (tens of MiB). The margin rule: reserved ~= 1.15 x
the allocated peak (fragmentation), and a command fits a GPU when 1.15 x peak + 1 GiB (context) < its usable memory
(H100 80 GB: 78 GiB). `benchmark/gpu_smoke.sh` measures both on a GPU.
"""

import contextlib
import functools
import re
import shlex
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

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
# black-forest-labs/FLUX.1-dev: transformer/config.json = diffusers FluxTransformer2DModel's defaults plus
# guidance_embeds (19 double-stream + 38 single-stream blocks, 24 heads x 128, joint_attention_dim 4096 (T5-XXL),
# pooled 768 (CLIP-L), in_channels 64 = 16 latent channels packed 2x2, rotary axes 16 + 56 + 56; the same numbers as
# Black Forest Labs' own flux-dev params: hidden 3072, depth 19 / 38, vec_in_dim 768, context_in_dim 4096,
# guidance_embed true); vae/config.json: SD3's VAE layout (16 latent channels, 128-256-512-512, 2 blocks per level)
# with scaling 0.3611 / shift 0.1159 (BFL's ae_params); text_encoder = CLIP-L (CLIPTextModel, pooled output only),
# text_encoder_2 = T5-XXL's encoder, tokens --max-t5-length (128 here, as Flow-GRPO's train_flux.py)
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD35M_VAE, scaling_factor=0.3611, shift_factor=0.1159)
# reward models (parameters of the released checkpoints): PickScore_v1 = CLIP-H/14, CLIP ViT-L/14, Qwen2.5-VL-7B
REWARD_PARAMS = {"pickscore": 0.986e9, "clipscore": 0.428e9, "vlm": 8.29e9}
METHODS = ["advantageflow", "diffusion_nft", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"]
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
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key in inputs and key not in self.size:  # a view of a tensor made outside (a weight, a buffer)
                    continue
                if key not in self.size:
                    self.size[key], self.refs[key] = s.nbytes(), 0
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


# torch.autocast's op lists (ATen autocast_mode.cpp), as the names torch functions reach a TorchFunctionMode with:
# ops run in bf16, ops run in fp32 (CUDA only: CPU autocast runs these in the input dtype), ops run in the widest
# input dtype. Only the ops an SD3 transformer calls matter here.
AUTOCAST_LOW = {"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "einsum", "conv1d", "conv2d",
                "conv3d", "conv_transpose2d", "prelu", "scaled_dot_product_attention"}
AUTOCAST_FP32 = {"cuda": {"exp", "expm1", "log", "log1p", "log2", "log10", "reciprocal", "rsqrt", "pow", "__pow__",
                          "__rpow__", "softplus", "layer_norm", "group_norm", "norm", "cosine_similarity", "softmax",
                          "log_softmax", "logsumexp", "cumsum", "cumprod", "prod", "sum", "mse_loss", "l1_loss",
                          "cdist", "erfinv", "acos", "asin", "cosh", "sinh", "tan"},
                 "cpu": {"mse_loss", "l1_loss", "cdist", "prod"}}
AUTOCAST_PROMOTE = {"cat", "stack", "addcmul", "addcdiv", "index_put", "scatter_add", "dot", "cross", "atan2"}


class AutocastPolicy(TorchFunctionMode):
    """torch.autocast(device, bf16) emulated above autograd (so the casts are recorded and saved as autocast's are),
    on any device - the meta device included, where torch.autocast does not run. Casts of leaf tensors that
    require grad (the LoRA weights) are cached for the region, as autocast caches them."""

    def __init__(self, device="cuda", dtype=torch.bfloat16):
        super().__init__()
        self.fp32, self.dtype, self.cache = AUTOCAST_FP32[device], dtype, {}

    def __exit__(self, *exc):
        self.cache.clear()
        return super().__exit__(*exc)

    def _cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.dtype == dtype or t.dtype == torch.float64:
            return t
        if t.is_leaf and t.requires_grad:
            if id(t) not in self.cache:
                self.cache[id(t)] = (t, t.to(dtype))
            return self.cache[id(t)][1]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in AUTOCAST_LOW:
            dtype = self.dtype
        elif name in self.fp32 and kwargs.get("dtype") is None:
            dtype = torch.float32
        elif name in AUTOCAST_PROMOTE:
            floats = [t for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
            dtype = torch.float32 if any(t.dtype == torch.float32 for t in floats) else None
        else:
            dtype = None
        if dtype is not None:
            args, kwargs = tree_map(lambda t: self._cast(t, dtype), (args, kwargs))
        return func(*args, **kwargs)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """The memory of a fused attention kernel (output + log-sum-exp; no (L, L) matrix), on meta tensors. Takes
    query / key / value by position (SD3's processor) or by name (diffusers' attention dispatcher, FLUX's)."""
    q, k, v = query, key, value
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


def documented(method, marker="stable-diffusion-3.5-medium"):
    """(GPUs, {flag: value}) of the first code line of docs/<method>.md that runs the script with a --model
    containing `marker` (SD3.5-M by default; "FLUX.1-dev" for the FLUX command)."""
    text = (ROOT / "docs" / f"{method}.md").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if f"{method}.py" in l and marker in l)
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
    """Meta-device SD3.5-M with LoRA r32 in fp32 (the scripts' targets and dtypes) and the tracing of each phase."""

    name, marker = "SD3.5-M", "stable-diffusion-3.5-medium"  # marker: how its docs command names --model
    text_len, pooled_dim, t5_always = 77 + 128, 2048, False  # CLIP-L+G tokens + 128 T5 tokens (zeros without T5)

    def __init__(self, lora_rank=32):
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        self.transformer = meta(lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER))
        self._finish(lora_rank, models.LORA_TARGETS, SD35M_VAE)
        self.n_clip = sum(nparams(meta(lambda c=c: CLIPTextModelWithProjection(CLIPTextConfig(**c))))
                          for c in (CLIP_L, CLIP_G))

    def _finish(self, lora_rank, targets, vae):
        from diffusers import AutoencoderKL
        from transformers import T5Config, T5EncoderModel

        self.n_transformer = nparams(self.transformer)
        self.lora_rank = lora_rank  # fp32 LoRA (cast_training_params), the scripts' targets
        self.policy = models.Policy(self.transformer, lora_rank, 2 * lora_rank, target_modules=targets)
        self.n_lora = sum(p.numel() for p in self.policy.parameters())
        self.vae = meta(lambda: AutoencoderKL(**vae)).float()
        self.t5 = meta(lambda: T5EncoderModel(T5Config(**T5_XXL)))
        self.cache = {}

    def _inputs(self, b, res, text_len):
        lat = res // 8
        kw = dict(device="meta")
        return dict(hidden_states=torch.empty(b, 16, lat, lat, dtype=torch.bfloat16, **kw),
                    timestep=torch.empty(b, **kw), return_dict=False,
                    encoder_hidden_states=torch.empty(b, text_len, 4096, dtype=torch.bfloat16, **kw),
                    pooled_projections=torch.empty(b, self.pooled_dim, dtype=torch.bfloat16, **kw))

    def forward(self, b, res, text_len):
        """The scripts' transformer call, with an fp32 output (accelerate's convert_outputs_to_fp32)."""
        return self.transformer(**self._inputs(b, res, text_len))[0].float()

    def phase(self, name, b, res=512, text_len=None, checkpointing=False, ref=False, autocast=True):
        """Peak bytes of one phase. train: forward + backward at batch b (ref: plus a no-grad reference forward at
        batch b while the graph is alive, as Flow-GRPO's KL term); forward: a no-grad forward; vae: a decode of b
        latents; t5: T5 encoding of b prompts. autocast=False: pure bf16 (LoRA cast to bf16, no autocast)."""
        text_len = text_len or self.text_len
        key = (name, b, res, text_len, checkpointing, ref, autocast)
        if key in self.cache:
            return self.cache[key]
        tr = self.transformer
        if checkpointing and name == "train":  # the recomputation runs under the forward's autocast, as checkpoint
            recompute = (lambda: (contextlib.nullcontext(), AutocastPolicy("cuda"))) if autocast else None  # does
            tr.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                                               **({"context_fn": recompute} if recompute else {})))
        lora = self.policy.parameters()
        if not autocast:
            for p in lora:
                p.data = p.data.to(torch.bfloat16)
        mode = AutocastPolicy("cuda") if autocast else contextlib.nullcontext()
        if name == "train":
            def fn():
                with mode:  # backward too: checkpointed blocks recompute under it
                    v, v_ref = self.forward(b, res, text_len), 0
                    if ref:
                        with torch.no_grad():
                            tr.disable_adapters()
                            v_ref = self.forward(b, res, text_len)
                            tr.enable_adapters()
                    (v - v_ref).pow(2).mean().backward()
                for p in lora:
                    p.grad = None
        elif name == "forward":
            def fn():
                with torch.no_grad(), mode:
                    self.forward(b, res, text_len)
        elif name == "vae":
            def fn():
                with torch.no_grad():
                    self.vae.decode(torch.empty(b, 16, res // 8, res // 8, device="meta"))
        elif name == "t5":
            def fn():
                with torch.no_grad():
                    self.t5(torch.zeros(b, 128, dtype=torch.long, device="meta"))
        try:
            self.cache[key] = traced(fn)
        finally:
            tr.disable_gradient_checkpointing()
            for p in lora:
                p.data = p.data.float()
        return self.cache[key]


class FluxDev(SD35M):
    """Meta-device FLUX.1-dev, called as the scripts call it (common/pipelines/flux.py's FluxTransformer: packing,
    position ids, guidance embedding inside the traced forward), LoRA on diffusers' FLUX example targets."""

    name, marker = "FLUX.1-dev", "FLUX.1-dev"
    text_len, pooled_dim, t5_always = 128, 768, True  # T5 tokens (--max-t5-length); CLIP-L's pooled output

    def __init__(self, lora_rank=32):
        from transformers import CLIPTextConfig, CLIPTextModel

        from common.pipelines import flux

        self.transformer = meta(lambda: flux.FluxTransformer(**FLUX_DEV_TRANSFORMER))
        self._finish(lora_rank, flux.LORA_TARGETS, FLUX_VAE)
        self.n_clip = nparams(meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))))


def estimate(sd, method, checkpointing=None, flags=None, autocast=True, extra=None):
    """Peak memory per process of `method` with the docs page's flags for `sd`'s model (or `flags`: {--flag: value,
    world: n}, e.g. the smoke test's; `extra` overrides some), in bytes: dict with the parts, the phases, `total`
    (allocated peak) and `reserved` (the margin rule). `checkpointing`: None = as the flags say, True / False
    forces --gradient-checkpointing on / off."""
    world, f = documented(method, sd.marker) if flags is None else (int(flags.get("world", 1)), flags)
    f = {**f, **(extra or {})}
    if checkpointing is None:
        checkpointing = bool(f.get("--gradient-checkpointing", False))
    res = int(f.get("--resolution", 512))
    n = int(f["--prompts-per-iter"]) * int(f.get("--group-size", 1)) // world  # images per process
    tbs, steps = int(f["--train-batch-size"]), int(f.get("--num-steps", 10))
    cfg = float(f.get("--guidance-scale", 1.0)) > 1
    t5 = "--use-t5" in f or sd.t5_always
    rewards = [p.split("=")[0] for p in str(f.get("--reward", "")).split(",")]
    reward_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[f.get("--reward-dtype", "fp32")]
    ema = f.get("--ema", True) is not False and "--no-ema" not in f  # flow_grpo: on by default
    with_old = method != "fdfo" and (method != "flow_grpo" or ema)  # flow_grpo: run.EMA's fp32 shadow, same size
    kl_coef = float(f.get("--kl-coef", 0.5)) if method == "flow_grpo" else 0.0
    lat = 16 * (res // 8) ** 2  # latent elements per image
    img = 3 * res * res * 4  # a decoded fp32 image
    weights = (sd.n_transformer + sd.n_clip + (nparams(sd.t5) if t5 else 0)) * 2 + nparams(sd.vae) * 4
    weights += sum(REWARD_PARAMS.get(r, 0) * reward_bytes for r in rewards)
    # fp32 params, grads, 2 AdamW moments (+ old adapter or EMA shadow); LoRA parameters scale with the rank (the
    # trace's r-wide LoRA activations are the built rank's: a few MiB apart)
    n_lora = sd.n_lora * int(f.get("--lora-rank", sd.lora_rank)) / sd.lora_rank
    trainable = n_lora * 4 * (4 + with_old)
    text = n * sd.text_len * 4096 * 2 + n * sd.pooled_dim * 2  # prompt_embeds + pooled, bf16
    pool = -(-int(f.get("--epoch-iters", 20)) // int(f.get("--pool-reuse", 1))) * n * (lat * 2 + sd.pooled_dim * 2)  # ORW / AC-Flow: bf16 latents (+ pooled)
    stored = {"flow_grpo": n * (steps + 1) * lat * 4,  # fp32 SDE trajectory
              "fdfo": n * steps * lat * (2 + 4) + 2 * n * lat * 4,  # bf16 states, fp32 velocities; fp32 finals, dbar
              "orw_cfm_w2": pool, "acflow": pool,
              "advantageflow": 2 * n * lat * 2, "diffusion_nft": 2 * n * lat * 2,  # x0, eps
              }[method] + text
    roll_b = tbs if method in MICRO_BATCHED_ROLLOUTS else n
    eval_b = min(int(f.get("--eval-batch-size", 128)), int(f.get("eval_images", 128)))
    decode_b = int(f.get("--decode-batch-size", 16))
    train_b = tbs * (2 if cfg and method == "flow_grpo" else 1)
    phases = {
        "train": sd.phase("train", train_b, res, checkpointing=checkpointing, ref=kl_coef > 0, autocast=autocast),
        "rollout": sd.phase("forward", roll_b * (2 if cfg and method in CFG_ROLLOUTS else 1), res, autocast=autocast),
        "eval": sd.phase("forward", eval_b * (2 if cfg else 1), res, autocast=autocast) + 3 * eval_b * img,
        "vae": sd.phase("vae", min(decode_b, n), res) + max(n - decode_b, 0) * img,  # + the chunks decoded so far
        "text": sd.phase("t5", min(n, 128)) if t5 else 0,
    }
    worst = max(phases, key=phases.get)
    total = weights + trainable + stored + phases[worst]
    return dict(method=method, world=world, images=n, tbs=tbs, weights=weights, trainable=trainable, stored=stored,
                phases=phases, worst=worst, total=total, reserved=reserved(total))


FRAGMENTATION, CONTEXT, H100_USABLE = 1.15, 1.0 * GiB, 78 * GiB


def reserved(allocated):
    """The margin rule: what the caching allocator reserves for an allocated peak (fragmentation)."""
    return allocated * FRAGMENTATION


def fits(allocated, usable=H100_USABLE):
    return reserved(allocated) + CONTEXT < usable


# the rows of the table: each docs command, plus variants
VARIANTS = [(m, {}) for m in METHODS] + [("fdfo", {"--reward-dtype": "fp32"})]  # FDFO's page: bf16 rewards
FLUX_VARIANTS = [(m, {}) for m in METHODS]  # each page's FLUX.1-dev command


def rows(sd, variants=VARIANTS):
    """Each command as documented, and its total with the other --gradient-checkpointing setting (with it, or,
    where the command has it, without it)."""
    out = []
    for m, extra in variants:
        gc_doc = "--gradient-checkpointing" in documented(m, sd.marker)[1]
        e, g = estimate(sd, m, extra=extra), estimate(sd, m, checkpointing=not gc_doc, extra=extra)
        e["bf16_train"] = estimate(sd, m, autocast=False, extra=extra)["phases"]["train"]
        e["other_gc_total"], e["gc_doc"], e["model"] = g["total"], gc_doc, sd.name
        e["label"] = m + ("" if sd.marker == SD35M.marker else f" ({sd.name})") + "".join(
            f" `{k} {v}`" for k, v in extra.items())
        out.append(e)
    return out


def table(rs):
    lines = ["| method (docs command) | GPUs | images / GPU | train micro-batch | weights | LoRA + AdamW | stored "
             "| train step: pure bf16 -> autocast | rollout fwd | eval fwd | VAE decode "
             "| **peak allocated** | reserved x1.15 + 1 GiB context | with `--gradient-checkpointing` | fits 78 GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in rs:
        p, o = e["phases"], e["other_gc_total"]
        other = f"{o / GiB:.1f} -> {(reserved(o) + CONTEXT) / GiB:.1f}"
        if e["gc_doc"]:  # the command has it: the column shows the run without it
            other = f"(has it) without: {other}"
            fit = "yes" if fits(e["total"]) else "**no**"
        else:
            fit = "yes" if fits(e["total"]) else ("with `--gradient-checkpointing`" if fits(o) else "**no**")
        lines.append(
            f"| {e['label']} | {e['world']} | {e['images']} | {e['tbs']} | {e['weights'] / GiB:.1f} | "
            f"{e['trainable'] / GiB:.2f} | {e['stored'] / GiB:.1f} | {e['bf16_train'] / GiB:.1f} -> "
            f"{p['train'] / GiB:.1f} | {p['rollout'] / GiB:.1f} | {p['eval'] / GiB:.1f} | {p['vae'] / GiB:.1f} | "
            f"**{e['total'] / GiB:.1f}** ({e['worst']}) | {(e['reserved'] + CONTEXT) / GiB:.1f} | {other} | {fit} |")
    return "\n".join(lines)


def main():
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write every number (bytes) to this file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    sd, fx = SD35M(), FluxDev()
    print(f"SD3.5-M transformer {sd.n_transformer / 1e9:.2f} B params, LoRA r32 {sd.n_lora / 1e6:.1f} M, "
          f"CLIP-L+G {sd.n_clip / 1e9:.2f} B, T5-XXL encoder {nparams(sd.t5) / 1e9:.2f} B, "
          f"VAE {nparams(sd.vae) / 1e6:.0f} M")
    print(f"FLUX.1-dev transformer {fx.n_transformer / 1e9:.2f} B params, LoRA r32 {fx.n_lora / 1e6:.1f} M, "
          f"CLIP-L {fx.n_clip / 1e9:.2f} B, T5-XXL encoder {nparams(fx.t5) / 1e9:.2f} B, "
          f"VAE {nparams(fx.vae) / 1e6:.0f} M\n")
    rs = rows(sd) + rows(fx, FLUX_VARIANTS)
    print(table(rs))
    print("\nGiB; peak allocated = weights + LoRA/AdamW + stored + the largest phase (named); reserved = 1.15 x peak; "
          "fits when reserved + 1 GiB context < 78 GiB (H100 80 GB).")
    if a.json:
        Path(a.json).write_text(json.dumps(rs, indent=1))


if __name__ == "__main__":
    main()
