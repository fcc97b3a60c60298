"""FLUX.1 [dev] and [schnell] (diffusers `FluxPipeline`, hub id in the local cache or a local directory): loading,
prompt encoding, the sigma schedule with FLUX's dynamic shift, and `FluxTransformer`, FLUX's transformer behind the
SD3 transformer's call, so that every method file and `common.sampling.predict` run FLUX unchanged.

How FLUX differs from SD3, and where each difference is handled (checked against diffusers' `FluxPipeline.__call__`,
`FluxTransformer2DModel.forward` and `FlowMatchEulerDiscreteScheduler.set_timesteps`, diffusers 0.42):

- Text: CLIP-L's pooled output (`pooler_output`, 768 wide) -> `pooled_projections`; T5-XXL's last hidden states
  (4096 wide, `max_t5_length` tokens, padded) -> `encoder_hidden_states`; no CLIP sequence, no zero padding
  (`encode_prompt`, as `FluxPipeline.encode_prompt`). T5 is always loaded: it is FLUX's only sequence encoder.
- Latents: 16 channels at resolution / 8 (`Model.latent_shape` stays unpacked (C, H, W)); the transformer sees them
  packed 2x2 into (B, H/2 * W/2, 4C) tokens with position ids (`FluxPipeline._pack_latents`,
  `_prepare_latent_image_ids`: (0, row, col) per token; text ids all zero) and returns packed predictions, which
  `FluxTransformer.forward` unpacks (`_unpack_latents`).
- Time: the transformer takes sigma = timestep / 1000 and multiplies by 1000 itself; the scripts pass
  timestep = 1000 sigma as for SD3, `FluxTransformer.forward` divides.
- Prediction: v = noise - x0 as SD3 (FluxPipeline steps x <- x + (sigma_next - sigma) v with the same
  `FlowMatchEulerDiscreteScheduler.step`; tests/test_flux_path.py runs FluxPipeline itself against our sampler).
- Guidance: FLUX.1-dev is guidance-distilled: the guidance value (3.5 by default, FluxPipeline's `guidance_scale`
  default and Flow-GRPO's FLUX configs' `sample.guidance_scale`) goes into the transformer's guidance embedding
  (`guidance_embeds` in its config) on every call, there is no classifier-free guidance (no negative branch;
  Flow-GRPO's `train_flux.py` never runs one). FLUX.1-schnell has no guidance embedding. `check_flags` refuses
  `--guidance-scale > 1` for both and `--flux-guidance` for schnell.
- Schedule: sigmas = linspace(1, 1/n, n) shifted by the scheduler with `mu` from the packed image sequence length
  (`calculate_shift`: 0.5 at 256 tokens to 1.15 at 4096, linear; 512 px = 1024 tokens -> mu = 0.63), then a final 0:
  what `FluxPipeline.__call__` hands `retrieve_timesteps` (`sigmas`). schnell's scheduler has no dynamic shifting and
  shift 1: the plain linspace.
- Decoding: the FLUX VAE has scaling_factor 0.3611 and shift_factor 0.1159, used as SD3's are (`Model.decode`).
- LoRA: diffusers' FLUX LoRA example's default target modules (see LORA_TARGETS), saved in diffusers' format
  (`FluxPipeline.save_lora_weights`), which `FluxPipeline.load_lora_weights` and `common.tools.evaluate --checkpoint`
  load.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from common.models import Model, default_dtype

# diffusers examples/dreambooth/train_dreambooth_lora_flux.py (default when --lora_layers is not given) and
# Flow-GRPO's scripts/train_flux.py: every attention projection of the double-stream blocks, to_q / to_k / to_v of
# the single-stream blocks (which have no to_out), and both feed-forwards of the double-stream blocks
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")
DEFAULT_GUIDANCE = 3.5


class FluxTransformer(FluxTransformer2DModel):
    """diffusers' FluxTransformer2DModel (same weights, same state-dict keys, same peft adapters) called like
    SD3Transformer2DModel: forward(hidden_states (B, C, H, W), timestep = 1000 sigma (B,), encoder_hidden_states
    (B, L, 4096), pooled_projections (B, 768), return_dict) -> v (B, C, H, W). It packs the latents, builds the
    position ids, divides the timestep by 1000, adds the guidance embedding's value (`guidance`, FLUX.1-dev) and
    unpacks the prediction. A subclass rather than a wrapper: Policy, peft (add_adapter, set_adapter,
    disable_adapters, get_peft_model_state_dict), gradient checkpointing, deepcopy and `load_lora_adapter` see the
    diffusers model itself."""

    lora_pipeline = "FluxPipeline"  # whose save_lora_weights writes the LoRA (common.models.Policy.save_pretrained)
    guidance = DEFAULT_GUIDANCE  # the guidance embedding's value (FLUX.1-dev); ignored without guidance_embeds

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=True):
        b, c, h, w = hidden_states.shape
        x = pack_latents(hidden_states)
        img_ids = image_ids(h // 2, w // 2, hidden_states.device)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=hidden_states.device)
        guidance = None
        if self.config.guidance_embeds:  # FluxPipeline: torch.full([1], guidance_scale).expand(batch), fp32
            guidance = torch.full((b,), float(self.guidance), device=hidden_states.device, dtype=torch.float32)
        out = super().forward(hidden_states=x, encoder_hidden_states=encoder_hidden_states,
                              pooled_projections=pooled_projections, timestep=timestep / 1000, img_ids=img_ids,
                              txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        v = unpack_latents(out, h, w)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, with config.json naming FluxTransformer2DModel, so that a fully fine-tuned transformer/
        loads into FluxPipeline as any FLUX transformer does."""
        super().save_pretrained(save_directory, *args, **kwargs)
        cfg = Path(save_directory) / "config.json"
        if cfg.is_file():
            d = json.loads(cfg.read_text())
            d["_class_name"] = FluxTransformer2DModel.__name__
            cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def pack_latents(x):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, channels first within a patch (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x, h, w):
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of `pack_latents` (FluxPipeline._unpack_latents)."""
    b, n, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(rows, cols, device=None):
    """(rows * cols, 3) position ids of the packed tokens, row-major: (0, row, col)
    (FluxPipeline._prepare_latent_image_ids)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(rows * cols, 3).float().to(device)


def calculate_mu(image_seq_len, config):
    """FLUX's dynamic shift: mu linear in the packed image sequence length, from base_shift at base_image_seq_len
    to max_shift at max_image_seq_len (diffusers `calculate_shift`, with FluxPipeline's defaults for a config that
    lacks a key)."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return base + (top - base) * (image_seq_len - lo) / (hi - lo)


def sigmas(model, num_steps):
    """(num_steps + 1,) from 1 to 0 as FluxPipeline samples: linspace(1, 1/n, n) through the scheduler's shift
    (dynamic with mu from the image's token count when the config says so; schnell: shift 1), then 0."""
    c, h, w = model.latent_shape
    mu = calculate_mu((h // 2) * (w // 2), model.scheduler.config)
    model.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
    return model.scheduler.sigmas.float().clone()


def guidance_embeds(name):
    """Whether --model's transformer/config.json has a guidance embedding (FLUX.1-dev) or not (schnell); read
    without loading anything (None if the config is not there)."""
    if os.path.isdir(name):
        path = os.path.join(name, "transformer", "config.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "transformer/config.json")
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        return bool(json.loads(Path(path).read_text()).get("guidance_embeds", False))
    except (OSError, ValueError, AttributeError):
        return None


def check_flags(name, guidance_scale=1.0, flux_guidance=None):
    """The FLUX-only flag rules, before any loading (SystemExit with one line)."""
    if guidance_scale > 1:
        raise SystemExit(f"error: --guidance-scale {guidance_scale:g}: FLUX.1 is sampled without classifier-free "
                         "guidance (FLUX.1-dev is guidance-distilled: its guidance goes into the transformer's "
                         "guidance embedding, --flux-guidance, default 3.5; schnell has none); use --guidance-scale 1")
    embeds = guidance_embeds(name)
    if flux_guidance is not None and embeds is False:
        raise SystemExit(f"error: --flux-guidance {flux_guidance:g}: --model {name!r} has no guidance embedding "
                         "(FLUX.1-schnell); drop --flux-guidance")
    if flux_guidance is not None and not flux_guidance >= 1:
        raise SystemExit(f"error: --flux-guidance {flux_guidance:g} must be >= 1 (FluxPipeline's default: 3.5)")


def load(name, device="cpu", dtype=None, resolution=512, use_t5=True, max_t5_length=128, guidance=None):
    """`use_t5` is ignored: T5 is FLUX's only sequence encoder and always loads. `guidance`: the guidance
    embedding's value (FLUX.1-dev; default 3.5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    dtype = dtype or default_dtype(device)
    kw = dict(torch_dtype=dtype)
    transformer = FluxTransformer.from_pretrained(name, subfolder="transformer", **kw)
    transformer.guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=torch.float32)  # decode in fp32
    encoders = [CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kw),
                T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", **kw)]
    tokenizers = [CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
                  T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_2")]
    for m in [vae, *encoders]:
        m.requires_grad_(False).eval().to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8; --resolution % 16 == 0 keeps the latents even
    shape = (transformer.config.in_channels // 4, resolution // factor, resolution // factor)
    return Model(name, transformer.to(device), encoders, tokenizers, vae, scheduler, shape, torch.device(device), dtype,
                 max_t5_length, encode_fn=encode_prompt, sigmas_fn=sigmas, lora_targets=LORA_TARGETS)


def encode_prompt(model, prompts):
    """FLUX prompt encoding as in diffusers' FluxPipeline.encode_prompt: T5's last hidden states of the prompt
    padded / truncated to `max_t5_length` tokens (prompt_embeds) and CLIP-L's pooled output (pooled)."""
    (clip, t5), (clip_tok, t5_tok), device = model.text_encoders, model.tokenizers, model.device
    ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)
    pooled = clip(ids, output_hidden_states=False).pooler_output
    ids = t5_tok(prompts, padding="max_length", max_length=model.max_t5_length, truncation=True,
                 return_tensors="pt").input_ids.to(device)
    prompt_embeds = t5(ids, output_hidden_states=False)[0]
    return prompt_embeds.to(model.dtype), pooled.to(model.dtype)
