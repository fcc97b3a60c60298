"""Model loading: a registered base (BASES; common/world registers "embedded", the tiny SD3 transformer in pixel
space + word-level text encoder) or a diffusers pipeline (id or local path) of a family in common/pipelines/ (SD3,
FLUX.1), behind one small interface, plus LoRA via peft.

    model = load_model("embedded")            # or "stabilityai/stable-diffusion-3.5-medium"
    prompt_embeds, pooled_prompt_embeds = model.encode_prompt(["a red circle"])
    images = model.decode(latents)            # (N, 3, H, W) in [0, 1]
    sigmas = model.sigmas(num_steps)          # (num_steps + 1,), 1 -> 0, shift from the scheduler config

Precision (`--mixed-precision no|bf16`, diffusers' names; default bf16 on CUDA GPUs with native bf16, else no;
bf16 runs on CPU the same way; fp16 only in evaluation - training in fp16 would need loss scaling): frozen weights
(transformer base, text encoders) are stored in that dtype (reward models: `--reward-dtype`, fp32 by default); the
transformer's forward runs under torch.autocast with fp32 outputs (what accelerate's `prepare` does), so fp32
inputs and fp32 trainable weights meet low-precision frozen weights; `Policy` keeps every weight it updates (LoRA
adapters incl. the rollout/EMA adapter, or the full learner and its old copy) in fp32 (diffusers'
`cast_training_params`); the full fine-tuning reference copy stays in the low precision. The VAE is fp32 and
decodes `decode_batch_size` latents at a time.
"""

import contextlib
import importlib
import os
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler

from common import pipelines
from common.pipelines import PIPELINES

EMBEDDED = "embedded"
# a base registered by name -> namespace(check() -> SystemExit with one line, load(device, dtype) -> Model);
# common/world registers EMBEDDED when imported
BASES = {}
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_PRECISIONS = ("no", "bf16")  # fp16 training would need a GradScaler; evaluation (no gradients) takes fp16 too
# the 8 attention projections of every SD3 joint block (Flow-GRPO and diffusers' SD3 LoRA example; the embedded
# transformer is an SD3 one too)
LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


@dataclass
class Model:
    """What the method scripts use. `encode_prompt`/`decode` run without gradients."""

    name: str
    transformer: nn.Module
    text_encoders: list
    tokenizers: list
    vae: nn.Module | None
    scheduler: FlowMatchEulerDiscreteScheduler
    latent_shape: tuple  # (C, H, W)
    device: torch.device
    dtype: torch.dtype
    max_t5_length: int = 128  # T5 prompt tokens (SD3 with T5); NFT and Flow-GRPO code use 128, diffusers 256
    decode_batch_size: int = 16  # latents the VAE decodes at once (~0.75 GB of fp32 activations per 512-px image)
    encode_fn: Callable | None = None  # a pipeline's (model, prompts) -> (prompt_embeds, pooled_prompt_embeds)
    lora_targets: tuple = LORA_TARGETS  # the modules peft wraps
    sigmas_fn: Callable | None = None  # a pipeline's (model, num_steps) -> sigmas, where set_timesteps(n) is not it

    @property
    def is_embedded(self):
        return self.vae is None

    @torch.no_grad()
    def encode_prompt(self, prompts):
        if self.is_embedded:
            pe, pooled = self.text_encoders[0](list(prompts))
            return pe.to(self.dtype), pooled.to(self.dtype)
        return self.encode_fn(self, list(prompts))

    @torch.no_grad()
    def decode(self, latents):
        """latents -> images (N, 3, H, W) float32 in [0, 1]. Embedded: pixels are latents in [-1, 1]."""
        if not self.is_embedded:
            c = self.vae.config
            latents = torch.cat([self.vae.decode(x.to(self.vae.dtype) / c.scaling_factor + c.shift_factor).sample
                                 for x in latents.split(self.decode_batch_size)])
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def sigmas(self, num_steps):
        """Sigma schedule (num_steps + 1,), from 1 to 0, with the scheduler config's shift (FLUX: its pipeline's
        dynamic shift, `sigmas_fn`)."""
        if self.sigmas_fn is not None:
            return self.sigmas_fn(self, num_steps)
        self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.float().clone()


def cpu_has_bf16():
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: Intel Cooper Lake / Sapphire Rapids on, AMD
    Zen 4 on); elsewhere bf16 on CPU is emulated and slower than fp32. CLEANFLOW_CPU_BF16=0 / 1 overrides the
    detection (the test suite sets 0: its learning margins were measured in fp32 and must hold on any CI CPU)."""
    if os.environ.get("CLEANFLOW_CPU_BF16") in ("0", "1"):
        return os.environ["CLEANFLOW_CPU_BF16"] == "1"
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def default_dtype(device, capability=None, cpu_bf16=None):
    """bf16 where the hardware multiplies it natively: CUDA GPUs of compute capability >= 8.0 (A100, H100, RTX 30xx
    on) and CPUs with AVX512-BF16 / AMX (`cpu_has_bf16`); fp32 elsewhere (V100, T4, older CPUs). Not
    torch.cuda.is_bf16_supported(), which is also true where bf16 is only emulated. `capability`: (major, minor),
    `cpu_bf16`: bool, default the device's own."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if (cpu_has_bf16() if cpu_bf16 is None else cpu_bf16) else torch.float32
    if device.type != "cuda":
        return torch.float32
    capability = capability or torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float32


def autocast_forward(module, dtype):
    """Run `module`'s forward under torch.autocast(dtype) and return fp32 outputs - as accelerate's `prepare` wraps
    a model for mixed precision. Copies made later (copy.deepcopy) keep the wrapper. On CPU, passes that take
    gradients run attention with PyTorch's math kernel: its bf16 flash-attention backward is ~5x slower than fp32
    (torch 2.13, `benchmark/compute.py`), the math kernel's is a few bf16 matmuls."""
    from accelerate.utils import convert_outputs_to_fp32
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if dtype == torch.float32:
        return module
    device_type = next(module.parameters()).device.type
    forward = torch.autocast(device_type, dtype=dtype)(type(module).forward)
    if device_type == "cpu":
        autocast = forward

        def forward(self, *args, **kwargs):  # not under gradient checkpointing: its recomputation (in the backward
            # pass, outside this context) would run the other kernel and fail torch.utils.checkpoint's metadata check
            if not torch.is_grad_enabled() or getattr(self, "gradient_checkpointing", False):
                return autocast(self, *args, **kwargs)
            with sdpa_kernel(SDPBackend.MATH):
                return autocast(self, *args, **kwargs)
    module.forward = types.MethodType(convert_outputs_to_fp32(forward), module)
    return module


def check_model_available(name):
    """Fail with one line (no hub is reachable) before any loading. Returns the family of a pipeline (a key of
    common.pipelines.PIPELINES, `pipelines.check_available`)."""
    if name in BASES:
        return BASES[name].check()
    return pipelines.check_available(name)


def check_model_flags(name, guidance_scale=1.0, flux_guidance=None):
    """The flags whose rules depend on --model's family (a pipelines/ module's `check_flags`; --flux-guidance is
    FLUX.1-dev's alone), before any loading: SystemExit with one line. Returns the family (`check_model_available`)."""
    kind = check_model_available(name)
    module = importlib.import_module(PIPELINES[kind]) if name not in BASES else None
    if hasattr(module, "check_flags"):
        module.check_flags(name, guidance_scale, flux_guidance)
    elif flux_guidance is not None:
        raise SystemExit(f"error: --flux-guidance is the guidance-embedding value of FLUX.1-dev; --model {name!r} "
                         f"({'the ' + name + ' model' if name in BASES else kind}) has none: drop it")
    return kind


def load_model(name=EMBEDDED, device="cpu", dtype=None, resolution=512, use_t5=False, max_t5_length=128,
               mixed_precision=None, decode_batch_size=16, gradient_checkpointing=False, flux_guidance=None,
               fast_cpu_kernels=True):
    """`dtype` (the frozen weights' dtype) overrides `mixed_precision` (no|bf16|fp16, None = per device).
    `fast_cpu_kernels`: a registered base's own faster CPU kernels (the embedded model's: common/world/model.py).
    `flux_guidance`: FLUX.1-dev's guidance-embedding value (default 3.5; refused for other models)."""
    kind = check_model_flags(name, flux_guidance=flux_guidance)
    dtype = dtype or (default_dtype(device) if mixed_precision is None else PRECISIONS[mixed_precision])
    if name in BASES:
        model = BASES[name].load(device, dtype, fast_cpu_kernels=fast_cpu_kernels)
    else:
        options = {} if flux_guidance is None else {"guidance": flux_guidance}  # only FLUX accepts it (checked)
        model = importlib.import_module(PIPELINES[kind]).load(name, device, dtype, resolution, use_t5, max_t5_length,
                                                              **options)
    model.decode_batch_size = decode_batch_size
    if gradient_checkpointing:  # recompute each block's activations in the backward pass (diffusers' helper)
        model.transformer.enable_gradient_checkpointing()
    autocast_forward(model.transformer, dtype)
    return model


# ----------------------------------------------------------------------------------- policies
class Policy:
    """The learner and the two frozen views every method needs, over one transformer.

    LoRA (rank > 0, peft): learner = adapter "default"; `ref()` = adapters disabled (the base model);
    `old()` = a second adapter "old" (created with `with_old=True`) for a rollout / old policy.
    Full fine-tuning (rank 0, the embedded default): learner = the transformer itself; `ref()` = a frozen
    copy of the base; `old()` = a frozen copy updated by `update_old`.
    `ref()` / `old()` are context managers yielding a module to call under torch.no_grad()."""

    def __init__(self, transformer, lora_rank=0, lora_alpha=None, target_modules=LORA_TARGETS, with_old=False):
        import copy

        from diffusers.training_utils import cast_training_params

        # every weight that is updated (learner, old adapter / old copy) is fp32, whatever the base's dtype: AdamW
        # steps and EMA lerps in bf16 lose most small updates; the forward runs under autocast (`autocast_forward`)
        self.transformer, self.lora_rank = transformer, lora_rank
        if lora_rank > 0:
            from peft import LoraConfig

            transformer.requires_grad_(False)
            self.lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                                          init_lora_weights="gaussian", target_modules=list(target_modules))
            transformer.add_adapter(self.lora_config, adapter_name="default")  # created in the base's dtype
            cast_training_params(transformer, torch.float32)
            if with_old:
                transformer.add_adapter(self.lora_config, adapter_name="old")
                transformer.set_adapter("old")  # makes "old" the trainable adapter, for the cast
                cast_training_params(transformer, torch.float32)
                self._copy_adapter("default", "old")
            transformer.set_adapter("default")
            self.ref_model = self.old_model = None
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():  # as DDP at construction: rank 0's random LoRA init
                for k, p in transformer.named_parameters():    # on every rank (each rank seeds seed + rank)
                    if "lora_" in k:
                        dist.broadcast(p.data, 0)
        else:
            self.ref_model = copy.deepcopy(transformer).requires_grad_(False).eval()  # frozen: base's dtype
            transformer.requires_grad_(True)
            cast_training_params(transformer, torch.float32)
            self.old_model = copy.deepcopy(transformer).requires_grad_(False).eval() if with_old else None
        self.has_old = with_old

    def parameters(self):
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def _adapter_params(self, name):
        return {k: p for k, p in self.transformer.named_parameters() if f".{name}." in k and "lora_" in k}

    @torch.no_grad()
    def _copy_adapter(self, src, dst):
        d = self._adapter_params(dst)
        for k, p in self._adapter_params(src).items():
            d[k.replace(f".{src}.", f".{dst}.")].copy_(p)

    @contextlib.contextmanager
    def ref(self):
        if self.lora_rank > 0:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
                self.transformer.set_adapter("default")
        else:
            yield self.ref_model

    @contextlib.contextmanager
    def old(self):
        assert self.has_old, "Policy(with_old=True) is needed for old()"
        if self.lora_rank > 0:
            self.transformer.set_adapter("old")
            try:
                yield self.transformer
            finally:
                self.transformer.set_adapter("default")  # also makes "default" trainable again
        else:
            yield self.old_model

    @torch.no_grad()
    def update_old(self, decay):
        """old <- decay * old + (1 - decay) * learner (decay 0 = copy)."""
        if self.lora_rank > 0:
            d = self._adapter_params("default")
            for k, p in self._adapter_params("old").items():
                p.lerp_(d[k.replace(".old.", ".default.")], 1 - decay)
        else:
            for p, q in zip(self.old_model.parameters(), self.transformer.parameters()):
                p.lerp_(q, 1 - decay)

    def trainable_state(self):
        """What a checkpoint must hold: LoRA tensors (both adapters) or full weights (+ old copy)."""
        if self.lora_rank > 0:
            return {k: v.detach().clone() for k, v in self.transformer.state_dict().items() if "lora_" in k}
        sd = {"learner." + k: v for k, v in self.transformer.state_dict().items()}
        if self.old_model is not None:
            sd.update({"old." + k: v for k, v in self.old_model.state_dict().items()})
        return sd

    def load_trainable_state(self, sd):
        if self.lora_rank > 0:
            missing = set(k for k in self.transformer.state_dict() if "lora_" in k) - set(sd)
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} LoRA tensors (e.g. {sorted(missing)[0]})")
            self.transformer.load_state_dict(sd, strict=False)
        else:
            self.transformer.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("learner.")})
            if self.old_model is not None:
                self.old_model.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("old.")})

    def save_pretrained(self, run_dir):
        """LoRA -> run_dir/lora (diffusers format, `StableDiffusion3Pipeline.load_lora_weights` reads it; FLUX:
        `FluxPipeline.load_lora_weights`, the transformer class's `lora_pipeline`); full fine-tuning ->
        run_dir/transformer (diffusers `save_pretrained`)."""
        if self.lora_rank > 0:
            import diffusers  # a pipeline class imports transformers' image processors: LoRA only
            from peft.utils import get_peft_model_state_dict

            pipeline = getattr(diffusers, getattr(type(self.transformer), "lora_pipeline", "StableDiffusion3Pipeline"))
            sd = get_peft_model_state_dict(self.transformer, adapter_name="default")
            pipeline.save_lora_weights(os.path.join(run_dir, "lora"), transformer_lora_layers=sd,
                                       transformer_lora_adapter_metadata=self.lora_config.to_dict())
        else:
            self.transformer.save_pretrained(os.path.join(run_dir, "transformer"))
