"""The FLUX.1 path (common/pipelines/flux.py) tested without a GPU and without FLUX weights, on tiny random FLUX.1-dev
(guidance embedding) and FLUX.1-schnell (none) pipelines built in code (tests/helpers/tiny_flux.py):

- against diffusers' own FLUX pieces, independently of our code: the prompt encoding equals
  `FluxPipeline.encode_prompt`, our transformer call equals `FluxPipeline`'s transformer on the inputs the pipeline
  builds (`_pack_latents`, `_prepare_latent_image_ids`, zero text ids, timestep / 1000, the guidance tensor), our
  sigmas equal the pipeline's (linspace(1, 1/n, n), `calculate_shift`, `retrieve_timesteps`) and a hand computation of
  the dynamic shift, one Euler step equals the scheduler's step, and a whole `FluxPipeline.__call__` from the same
  noise gives our sampler's latents and images;
- LoRA on diffusers' FLUX example targets, fp32 trainable over a bf16 base, saved in a form `FluxPipeline.load_lora_weights`
  and `common.tools.evaluate`'s `load_finetuned` read back to the same predictions (full fine-tuning too);
- every method page's FLUX.1-dev command (sizes swapped for tiny ones, as tests/test_sd3_path.py does for SD3.5-M)
  runs 2 iterations with `--mixed-precision bf16` on the CPU, and `python -m common.tools.evaluate --checkpoint` of
  the run reproduces the run's own final evaluation;
- the FLUX flag rules fail in one line before anything loads.

What this cannot prove (as for SD3, docs/gpu.md): CPU autocast is not CUDA autocast (on the CPU layer_norm, softmax,
pow, exp and FLUX's RMSNorm return bf16 under autocast, on CUDA fp32), so nothing here speaks for the numerics,
speed, device placement or memory of a CUDA run on the real 12B FLUX.1-dev; nor that the tiny random pipeline's
configuration choices (one block of each kind, a 2-level VAE) behave like the released weights beyond the code path.
benchmark/gpu_smoke.sh runs FLUX.1-dev on a GPU when its weights are in the local Hugging Face cache."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from common import models, sampling
from common.pipelines import flux
from tests.helpers import prewarmed
from tests.test_sd3_path import ENV, METHODS, assert_trainables_fp32, run_script, tiny_sizes

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog on a bench", "a green bird"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"dev": path, "schnell": path, "prompts": a prompts file}."""
    from tests.helpers.tiny_flux import build_tiny_flux

    d = tmp_path_factory.mktemp("flux")
    (d / "prompts.txt").write_text("a red cat\na blue dog on a bench\na green bird\na yellow car\n")
    return {"dev": build_tiny_flux(d / "dev", guidance=True), "schnell": build_tiny_flux(d / "schnell", guidance=False),
            "prompts": d / "prompts.txt"}


def pipeline(path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(path))


def reference_prediction(pipe, x, sigma, prompt_embeds, pooled, text_ids, guidance):
    """diffusers' FLUX transformer called as FluxPipeline.__call__ calls it, on unpacked latents x (B, C, H, W)."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    g = torch.full([1], guidance, dtype=torch.float32).expand(b) if pipe.transformer.config.guidance_embeds else None
    t = torch.full((b,), sigma * 1000.0)  # the scheduler's timestep
    out = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=g, pooled_projections=pooled,
                           encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids,
                           return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)


# ----------------------------------------------------------------------------------- against diffusers' FluxPipeline
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_encoding_and_transformer_call_match_flux_pipeline(tiny, variant):
    """Same prompt encoding (T5 sequence of max_t5_length tokens, CLIP-L pooled) and the same velocity as the
    pipeline's own transformer call on packed latents; FLUX.1-dev's guidance value reaches the guidance embedding
    (--flux-guidance 2 gives the pipeline's guidance 2, not its 3.5); schnell has none."""
    model = models.load_model(str(tiny[variant]), "cpu", resolution=32)
    assert isinstance(model.transformer, flux.FluxTransformer) and model.latent_shape == (16, 16, 16)
    assert model.lora_targets == flux.LORA_TARGETS and model.max_t5_length == 128
    pipe = pipeline(tiny[variant])
    pe, pooled = model.encode_prompt(PROMPTS)
    with torch.no_grad():  # as the pipeline runs it (with gradients on, attention takes another kernel: ~1e-6 apart)
        pe2, pooled2, text_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=128)
    assert pe.shape == (3, 128, 64) and pooled.shape == (3, 32)
    assert torch.equal(pe, pe2) and torch.equal(pooled, pooled2) and not text_ids.any()
    x = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = sampling.predict(model.transformer, x, 0.63, pe, pooled)
        ref = reference_prediction(pipe, x, 0.63, pe2, pooled2, text_ids, 3.5)
        assert ours.shape == x.shape and torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()
        if variant == "dev":
            two = models.load_model(str(tiny[variant]), "cpu", resolution=32, flux_guidance=2.0)
            v2 = sampling.predict(two.transformer, x, 0.63, pe, pooled)
            assert torch.allclose(v2, reference_prediction(pipe, x, 0.63, pe2, pooled2, text_ids, 2.0), atol=1e-6)
            assert (v2 - ours).abs().max() > 1e-4  # the embedding sees the value
        else:
            assert not model.transformer.config.guidance_embeds


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_sigmas_euler_step_and_sampler_match_flux_pipeline(tiny, variant):
    """Our sigmas are FluxPipeline's (dev: linspace(1, 1/n, n) through the exponential time shift with mu from the
    64 packed tokens, by hand here; schnell: the plain linspace), one Euler step is the scheduler's `step`, and our
    whole CFG-free Euler sample from the same noise equals `FluxPipeline.__call__`'s latents and decoded images."""
    n = 4
    model = models.load_model(str(tiny[variant]), "cpu", resolution=32)
    pipe = pipeline(tiny[variant])
    sigmas = model.sigmas(n)
    base = np.linspace(1.0, 1 / n, n)
    if variant == "dev":  # calculate_shift at 8 x 8 = 64 tokens, then exp(mu) / (exp(mu) + 1 / s - 1)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
        expected = np.exp(mu) / (np.exp(mu) + 1 / base - 1)
    else:
        expected = base
    assert torch.allclose(sigmas, torch.tensor([*expected, 0.0], dtype=torch.float32), atol=1e-6)
    pe, pooled = model.encode_prompt(PROMPTS[:2])
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    packed = FluxPipeline._pack_latents(noise, 2, 16, 16, 16)
    with torch.no_grad():
        out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, latents=packed, num_inference_steps=n,
                   guidance_scale=3.5, height=32, width=32, output_type="latent", max_sequence_length=128).images
        assert torch.allclose(pipe.scheduler.sigmas, sigmas, atol=1e-7)  # what retrieve_timesteps set
        ours = sampling.sample(model.transformer, pe, pooled, sigmas, noise)["latents"]
        theirs = FluxPipeline._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
        # one step: x + (sigma_1 - sigma_0) v == scheduler.step(v, t_0, x)
        v = sampling.predict(model.transformer, noise, sigmas[0], pe, pooled)
        c = pipe.scheduler.config  # FluxPipeline's schedule again (this resets the scheduler's step index)
        pipe.scheduler.set_timesteps(sigmas=base, mu=calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len,
                                                                     c.base_shift, c.max_shift))
        stepped = pipe.scheduler.step(FluxPipeline._pack_latents(v, 2, 16, 16, 16), pipe.scheduler.timesteps[0],
                                      packed, return_dict=False)[0]
        one = sampling.sample(model.transformer, pe, pooled, sigmas[:2], noise)["latents"]
        assert torch.allclose(FluxPipeline._unpack_latents(stepped, 32, 32, 2), one, atol=1e-6)
        images = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, latents=packed, num_inference_steps=n,
                      height=32, width=32, output_type="pt", max_sequence_length=128).images
    assert torch.allclose(model.decode(ours), images, atol=1e-5)


def test_packing_round_trip_and_position_ids():
    """Our 2x2 packing and ids are FluxPipeline's (channels first within a patch; ids (0, row, col) row-major)."""
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(flux.pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(flux.unpack_latents(flux.pack_latents(x), 6, 8), x)
    assert torch.equal(flux.image_ids(3, 4), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    mu = flux.calculate_mu(1024, {})  # 512 px: 64 x 64 latents = 32 x 32 tokens; FluxPipeline's defaults
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert mu == pytest.approx(calculate_shift(1024)) and mu == pytest.approx(0.63)


# ----------------------------------------------------------------------------------- LoRA, dtypes, save / load
def test_lora_targets_and_bf16_dtypes(tiny):
    """--mixed-precision bf16: the frozen FLUX base and text encoders bf16, the VAE fp32, both LoRA adapters fp32;
    peft wraps exactly the modules diffusers' FLUX LoRA example names - both streams' attention and feed-forwards of
    the double blocks, q / k / v of the single blocks - and the bf16 forward returns fp32."""
    model = models.load_model(str(tiny["dev"]), "cpu", resolution=32, mixed_precision="bf16")
    policy = models.Policy(model.transformer, 4, target_modules=model.lora_targets, with_old=True)
    named = dict(model.transformer.named_parameters())
    lora = {k: p for k, p in named.items() if "lora_" in k}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for k, p in named.items() if "lora_" not in k)
    assert all(p.dtype == torch.bfloat16 for e in model.text_encoders for p in e.parameters())
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    wrapped = {k.split(".lora_A")[0].split(".base_layer")[0] for k in lora if ".lora_A.default." in k}
    expected = {n for n, _ in model.transformer.named_modules()
                if any(n.endswith("." + t) for t in flux.LORA_TARGETS) and "lora_" not in n and "base_layer" not in n}
    assert wrapped == expected
    assert {"single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff_context.net.2"} <= wrapped
    pe, pooled = model.encode_prompt(PROMPTS[:2])
    v = sampling.predict(model.transformer, torch.randn(2, *model.latent_shape), 0.5, pe, pooled)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("rank", [4, 0])
def test_saved_weights_load_into_flux_pipeline_and_evaluate(tiny, tmp_path, rank):
    """A trained (here: randomly moved) LoRA / full transformer saved by Policy.save_pretrained loads back to the same
    predictions through `FluxPipeline.load_lora_weights` (LoRA) or `FluxPipeline(transformer=
    FluxTransformer2DModel.from_pretrained(...))` (full), and through common.tools.evaluate's `load_finetuned`."""
    from diffusers import FluxTransformer2DModel

    from common.tools.evaluate import load_finetuned

    model = models.load_model(str(tiny["dev"]), "cpu", resolution=32)
    policy = models.Policy(model.transformer, rank, target_modules=model.lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pe, pooled = model.encode_prompt(PROMPTS)
    x = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = sampling.predict(model.transformer, x, 0.4, pe, pooled)
        with policy.ref() as ref:
            base = sampling.predict(ref, x, 0.4, pe, pooled)
    assert (trained - base).abs().max() > 1e-3
    policy.save_pretrained(tmp_path / "run")
    pipe = pipeline(tiny["dev"])
    if rank:
        assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    else:
        cfg = json.loads((tmp_path / "run" / "transformer" / "config.json").read_text())
        assert cfg["_class_name"] == "FluxTransformer2DModel"
        pipe.transformer = FluxTransformer2DModel.from_pretrained(str(tmp_path / "run" / "transformer"))
    with torch.no_grad():
        pe2, pooled2, ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=128)
        assert torch.allclose(reference_prediction(pipe, x, 0.4, pe2, pooled2, ids, 3.5), trained, atol=1e-5)
        fresh = models.load_model(str(tiny["dev"]), "cpu", resolution=32)
        t = load_finetuned(fresh, tmp_path / "run")
        assert isinstance(t, flux.FluxTransformer)
        assert torch.allclose(sampling.predict(t, x, 0.4, pe, pooled), trained, atol=1e-5)


# ----------------------------------------------------------------------------------- flags
def test_flux_flag_rules_fail_before_loading(tiny, tmp_path):
    """CFG (--guidance-scale > 1) is refused for FLUX (dev: its guidance goes into the guidance embedding; Flow-GRPO's
    FLUX training runs none); --flux-guidance for schnell, SD3 or the embedded model; one line, before any model
    loads: the script exits 2 in seconds and writes nothing to its run directory."""
    with pytest.raises(SystemExit, match="FLUX.1 is sampled without classifier-free guidance"):
        models.check_model_flags(str(tiny["dev"]), guidance_scale=4.5)
    with pytest.raises(SystemExit, match="has no guidance embedding"):
        models.check_model_flags(str(tiny["schnell"]), flux_guidance=3.5)
    with pytest.raises(SystemExit, match="must be >= 1"):
        models.check_model_flags(str(tiny["dev"]), flux_guidance=0.5)
    with pytest.raises(SystemExit, match="the embedded model"):
        models.check_model_flags("embedded", flux_guidance=3.5)
    assert models.check_model_flags(str(tiny["dev"]), 1.0, 3.5) == "FluxPipeline"
    assert models.check_model_flags(str(tiny["schnell"])) == "FluxPipeline"
    out = prewarmed.run(["flow_grpo.py", "--model", str(tiny["schnell"]), "--flux-guidance", "3.5",
                         "--lora-rank", "4", "--prompts-file", str(tiny["prompts"]), "--output-dir", str(tmp_path / "run")],
                        cwd=ROOT, env=ENV, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --flux-guidance 3.5"), out.stderr
    assert not any((tmp_path / "run").iterdir())  # created empty by the --output-dir check, nothing written
    out = prewarmed.run(["-m", "common.tools.evaluate", "--model", str(tiny["dev"]),
                         "--guidance-scale", "4.5", "--prompts-file", str(tiny["prompts"]), "--reward",
                         "jpeg_compressibility"], cwd=ROOT, env=ENV, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --guidance-scale 4.5")


# ----------------------------------------------------------------------------------- every page's FLUX command
def documented_flux_command(method):
    """The FLUX.1-dev command line of docs/<method>.md, as a list of flags (the first code line that runs the script
    with --model black-forest-labs/FLUX.1-dev, joined over its backslash continuations)."""
    text = (ROOT / "docs" / f"{method}.md").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if f"{method}.py" in l and "black-forest-labs/FLUX.1-dev" in l)
    line = re.sub(r"<[^>]*>", "PLACEHOLDER", line)
    argv = shlex.split(line.split(f"{method}.py", 1)[1].split("```")[0])
    assert argv and argv[0].startswith("--"), line
    return argv


def test_documented_flux_commands_are_all_covered():
    """Every method page has a FLUX.1-dev command: LoRA, FLUX's distilled guidance, no CFG, one held-out sample per
    prompt (as the SD3.5-M commands)."""
    for m in METHODS:
        argv = documented_flux_command(m)
        assert argv[argv.index("--model") + 1] == "black-forest-labs/FLUX.1-dev", m
        assert "--lora-rank" in argv and argv[argv.index("--flux-guidance") + 1] == "3.5", m
        assert float(argv[argv.index("--guidance-scale") + 1]) == 1 if "--guidance-scale" in argv else True, m
        assert argv[argv.index("--eval-samples-per-prompt") + 1] == "1", m


CASES = [(m, "dev") for m in METHODS] + [("flow_grpo", "schnell")]


@pytest.mark.parametrize("method,variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_documented_flux_command_runs_in_bf16_and_evaluates_back(tiny, tmp_path, method, variant):
    """Each method page's FLUX.1-dev command (tiny sizes, LoRA, guidance embedding) + --mixed-precision bf16
    --gradient-checkpointing runs 2 iterations with a mid-run evaluation; trainable weights and AdamW state are fp32
    (the frozen base is bf16: test_lora_targets_and_bf16_dtypes). Then `python -m common.tools.evaluate --checkpoint
    <run>` on the same prompts, noise and steps gives the run's own final held-out reward: the saved LoRA is the
    trained model (Flow-GRPO: its EMA, which the run evaluates and saves). schnell: the same command without
    --flux-guidance."""
    argv = tiny_sizes(documented_flux_command(method), method, tiny[variant], tiny["prompts"])
    if variant == "schnell":
        i = argv.index("--flux-guidance")
        argv = argv[:i] + argv[i + 2:]
    argv += ["--mixed-precision", "bf16", "--gradient-checkpointing", "--eval-samples-per-prompt", "1",
             "--decode-batch-size", "2", "--eval-batch-size", "3"]
    run = tmp_path / "run"
    summary = run_script(method, argv, run)
    assert summary["reward_queries"] > 0 and "reward_mean" in summary["final"]
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 2
    assert_trainables_fp32(ckpt)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    a = summary["args"]
    cmd = ["-m", "common.tools.evaluate", "--model", str(tiny[variant]), "--checkpoint", str(run),
           "--resolution", str(a["resolution"]), "--prompts-file", str(tiny["prompts"]), "--samples-per-prompt", "1",
           "--num-steps", str(a["eval_num_steps"] or a["num_steps"]), "--reward", a["reward"], "--mixed-precision",
           "bf16", "--batch-size", "3", "--decode-batch-size", "2", "--json", str(tmp_path / "eval.json")]
    cmd += ["--flux-guidance", str(a["flux_guidance"])] if a["flux_guidance"] is not None else []
    out = prewarmed.run(cmd, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n"] == 4
    assert res["reward_mean"] == pytest.approx(summary["final"]["reward_mean"], rel=1e-6, abs=1e-6)
    assert res["reward_mean"] != pytest.approx(summary["base"]["reward_mean"], rel=1e-9, abs=1e-9)


@pytest.mark.slow  # ~20-50 s: in the full suite, not the fast tier
def test_documented_flux_commands_fit_80gb():
    """benchmark/gpu_memory.py's meta-device FLUX.1-dev (the scripts' FluxTransformer, no weights): its size is the
    released model's (11.9 B transformer parameters; LoRA r 32 on diffusers' FLUX example targets = 2,801,664 x 32,
    counted by hand: 19 double blocks x (8 attention projections 3072 -> 3072 + 4 feed-forward layers 3072 <-> 12288)
    + 38 single blocks x q / k / v), and every method page's FLUX.1-dev command, as written there, fits an 80 GB GPU
    under the margin rule of docs/gpu.md (1.15 x the allocated peak + 1 GiB < 78 GiB)."""
    import gpu_memory

    fx = gpu_memory.FluxDev()
    assert round(fx.n_transformer / 1e9, 2) == 11.90
    per_rank = 19 * (8 * (3072 + 3072) + 4 * (3072 + 12288)) + 38 * 3 * (3072 + 3072)
    assert per_rank == 2_801_664 and fx.n_lora == 32 * per_rank
    for m in METHODS:
        e = gpu_memory.estimate(fx, m)
        assert gpu_memory.fits(e["total"]), (m, e["total"] / 2**30, (e["reserved"] + gpu_memory.CONTEXT) / 2**30,
                                             e["worst"])
