"""Held-out evaluation of the base model or a fine-tuned checkpoint.

    python -m common.tools.evaluate                            # embedded base, test split
    python -m common.tools.evaluate --checkpoint runs/<run>    # a method's run dir (or its lora/ dir)
    python -m common.tools.evaluate --prompts-file my_prompts.txt --samples-per-prompt 8 --json out.json
    python -m common.tools.evaluate --save-images samples/ --samples-per-prompt 4   # GenEval's folder layout

    python -m common.tools.evaluate --reward shapes,shapes_strict,jpeg_compressibility   # one row per reward

Prints a per-category table and, with --reward, one row (mean, std) per named reward, so a held-out "gold" reward
beside the trained one shows reward hacking; --json writes {reward_mean, strict_accuracy, accuracy (per category),
partial (per category), clean_fraction (images with no extra object), texture (fraction of speckled pixels,
common.world.shapes.texture), diversity, n, rewards ({name: {weight, mean, std}})}; --grid saves a PNG of samples
with their prompts.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common import rewards
from common.evaluate import evaluate_model
from common import reward_models, world  # noqa: F401 (they register the real rewards and the embedded world)
from common.world import shapes


def finetuned_weights(checkpoint):
    """("lora" | "transformer", directory) of a method's output: a LoRA dir, a full `transformer/` dir, or a run dir
    holding either; None if there is neither."""
    path = Path(checkpoint)
    for cand in (path, path / "lora", path / "transformer"):
        if (cand / "pytorch_lora_weights.safetensors").is_file():
            return "lora", cand
        if (cand / "config.json").is_file() and any((cand / f"diffusion_pytorch_model.safetensors{ext}").is_file()
                                                    for ext in ("", ".index.json")):  # one file, or shards + index
            return "transformer", cand
    return None


def load_finetuned(model, checkpoint, model_name=None):
    """Apply a method's output (see `finetuned_weights`) to a loaded Model, each weight file read behind
    `utils.load_weights` (one line naming a damaged file or one of another model). Returns the transformer."""
    from common import utils

    model_name, (kind, cand) = model_name or model.name, finetuned_weights(checkpoint) or (None, None)
    if kind == "lora":
        path, modules = cand / "pytorch_lora_weights.safetensors", dict(model.transformer.named_modules())
        for k, v in utils.load_weights(path).items():  # (rank, in) lora_A and (out, rank) lora_B of a Linear
            lora = re.fullmatch(r"(?:transformer\.)?(.+)\.lora_([AB])\.weight", k)
            name, ab = lora.groups() if lora else (k, None)
            m = modules.get(name)
            if ab is None or not hasattr(m, "in_features"):
                utils.fail(f"{path} holds a LoRA for other modules than {model_name}'s ({k!r})")
            want = (v.shape[0], m.in_features) if ab == "A" else (m.out_features, v.shape[1])
            if tuple(v.shape) != want:
                utils.fail(f"{path} holds a LoRA of another model size than {model_name}: {k!r} is "
                           f"{tuple(v.shape)} there, {model_name} needs {want}")
        model.transformer.load_lora_adapter(str(cand), prefix="transformer", adapter_name="default",
                                            weight_name="pytorch_lora_weights.safetensors")
        return model.transformer
    if kind == "transformer":  # into the loaded model (any family: SD3, FLUX), in its dtype, strictly
        index = cand / "diffusion_pytorch_model.safetensors.index.json"  # save_pretrained shards past 10 GB
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["diffusion_pytorch_model.safetensors"]
        sd = {k: v for f in files for k, v in utils.load_weights(cand / f).items()}
        want = {k: v.shape for k, v in model.transformer.state_dict().items()}
        where = cand / files[0] if len(files) == 1 else cand
        model.transformer.load_state_dict(utils.match_weights(sd, want, where, model_name))
        return model.transformer
    raise SystemExit(f"error: --checkpoint {checkpoint!r} holds no LoRA (pytorch_lora_weights.safetensors) and no "
                     "transformer/ weights; pass a run directory, its lora/ or its transformer/ directory")


def recorded_model(a):
    """{flag: value} of the model a run was trained with (its summary.json's args): what --checkpoint of a run is
    evaluated with unless its flags are given."""
    from common import utils

    for d in (Path(a.checkpoint), Path(a.checkpoint).parent) if a.checkpoint else ():
        if (d / "summary.json").is_file():
            try:
                saved = json.loads((d / "summary.json").read_text(encoding="utf-8"))["args"]
            except (ValueError, KeyError, TypeError) as e:
                utils.fail(f"{d / 'summary.json'} is damaged ({utils.why(e)}); give --model and its flags")
            return {k: saved[k] for k in ("model", "resolution", "use_t5", "max_t5_length", "flux_guidance")
                    if k in saved}
    return {}


def save_geneval_layout(out_dir, images, captions, specs, samples_per_prompt, start=0):
    """GenEval's layout: <out_dir>/<5-digit prompt index>/metadata.jsonl (one JSON line: prompt, tag (the
    category) and, for shapes prompts, the spec's fields; a prompts file's own JSON line as it was) and
    <index>/samples/<4-digit sample>.png at the model's resolution. `images` holds samples_per_prompt consecutive
    samples per caption; the first caption is prompt `start` (a rank's slice)."""
    from PIL import Image

    out_dir = Path(out_dir)
    for k, (caption, spec) in enumerate(zip(captions, specs)):
        d = out_dir / f"{k + start:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        if shapes.is_spec(spec):
            meta = {"prompt": caption, "tag": spec["category"], **{f: spec[f] for f in ("objects", "relation")}}
        else:
            meta = spec or {"prompt": caption, "tag": None}
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j, img in enumerate(rewards.to_uint8(images[k * samples_per_prompt:(k + 1) * samples_per_prompt])):
            Image.fromarray(img).save(d / "samples" / f"{j:04d}.png")


def format_table(res):
    lines = [f"{'category':<15}{'strict acc':>12}{'partial':>10}"]
    for c in res.get("accuracy", {}):
        lines.append(f"{c:<15}{res['accuracy'][c]:>12.3f}{res['partial'][c]:>10.3f}")
    lines.append(f"{'overall':<15}{res.get('strict_accuracy', float('nan')):>12.3f}{res['reward_mean']:>10.3f}")
    lines.append(f"diversity {res['diversity']:.4f}   clean scenes {res.get('clean_fraction', float('nan')):.3f}   "
                 f"texture {res.get('texture', float('nan')):.4f}   n = {res['n']}")
    return "\n".join(lines)


def format_rewards(res):
    """One row per named reward of --reward (mean, std over every sample); the weighted sum below when several."""
    rows = res.get("rewards", {})
    lines = [f"{'reward':<26}{'weight':>8}{'mean':>12}{'std':>12}"]
    lines += [f"{name:<26}{r['weight']:>8.3g}{r['mean']:>12.4f}{r['std']:>12.4f}" for name, r in rows.items()]
    if len(rows) > 1:
        lines.append(f"{'weighted sum':<26}{'':>8}{res['train_reward_mean']:>12.4f}")
    return "\n".join(lines)


@dataclass
class Args:
    checkpoint: str | None = None
    """a method's run directory, its lora/ or transformer/ directory (None: the base model)"""
    model: str = "embedded"
    """'embedded' or a diffusers SD3 / FLUX.1 id or local path (with --checkpoint of a run: the run's, and its flags)"""
    resolution: int = 512
    """SD3 image size"""
    use_t5: bool = False
    """SD3: also load the T5 text encoder (as the run did)"""
    max_t5_length: int = 128
    flux_guidance: float | None = None
    """FLUX.1-dev's guidance-embedding value (None: 3.5, or the run's)"""
    mixed_precision: str | None = None
    """no | bf16 | fp16: weights in this dtype, forward under autocast (None: bf16 where the device has it, else no)"""
    fast_cpu_kernels: bool = True
    """embedded model on a CPU: its faster kernels for the same functions (common/world/model.py); False: diffusers'"""
    batch_size: int = 128
    """images generated at once"""
    decode_batch_size: int = 16
    """images the VAE decodes and a reward model scores at once"""
    reward_device: str | None = None
    """device of the reward models (None: the model's device)"""
    reward_dtype: str = "fp32"
    """fp32 | bf16 | fp16: dtype of the reward models (fp32 as the official Flow-GRPO code scores)"""
    reward_paths: str | None = None
    """local weights of real rewards: name=path[|processor],... e.g. aesthetic=sac+logos+ava1-l14-linearMSE.pth"""
    split: str = "test"
    """train | test (shapes grammar prompts), ignored with --prompts-file"""
    prompts_file: str | None = None
    """one prompt per line, or GenEval's JSON-lines metadata ({"prompt": ..., "tag": ...} per line)"""
    samples_per_prompt: int = 4
    seed: int = 0
    guidance_scale: float = 1.0
    num_steps: int = 10
    reward: str | None = None
    """also score with these rewards, e.g. shapes,jpeg_compressibility (needed for prompts outside the grammar)"""
    json: str | None = None
    """write the metrics here"""
    grid: str | None = None
    """save a PNG grid of samples with prompts and scores here"""
    save_images: str | None = None
    """write every sample in GenEval's layout: DIR/<5-digit prompt>/metadata.jsonl and samples/<4-digit>.png"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda:N"""


def check_args(a):
    """Every flag, before any model loads (one line and exit 2 on a bad one). Returns (captions, specs)."""
    from common import models, utils

    if a.split not in ("train", "test"):
        utils.fail(f"unknown --split {a.split!r}; choose from: train, test")
    if a.mixed_precision not in (None, *models.PRECISIONS):  # fp16 too: evaluation takes no gradients
        utils.fail(f"unknown --mixed-precision {a.mixed_precision!r}; choose from: {', '.join(models.PRECISIONS)}")
    for name in ("samples_per_prompt", "num_steps", "batch_size", "decode_batch_size"):
        if getattr(a, name) < 1:
            utils.fail(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    utils.check_shared(a)
    if a.reward:
        try:
            rewards.parse_reward_spec(a.reward)
            rewards.parse_reward_paths(a.reward_paths, a.reward)
        except ValueError as e:
            utils.fail(str(e))
        utils.check_reward_servers(a.reward)
    if a.checkpoint and not os.path.exists(a.checkpoint):
        utils.fail(f"--checkpoint {a.checkpoint!r} does not exist")
    if a.checkpoint and finetuned_weights(a.checkpoint) is None:
        utils.fail(f"--checkpoint {a.checkpoint!r} holds no LoRA (pytorch_lora_weights.safetensors) and no "
                   "transformer/ weights; pass a run directory, its lora/ or its transformer/ directory")
    for flag, path in (("--json", a.json), ("--grid", a.grid)):
        if path and os.path.isdir(path):
            utils.fail(f"{flag} {path!r} is a directory; give a file name")
        if path:
            utils.check_writable_dir(flag, Path(path).absolute().parent)
    if a.save_images:
        utils.check_writable_dir("--save-images", a.save_images)
    try:
        models.check_model_flags(a.model, a.guidance_scale, a.flux_guidance)
    except SystemExit as e:
        if not isinstance(e.code, str):  # Ctrl-C: exit 130
            raise
        utils.fail(str(e).removeprefix("error: "))
    captions, specs = utils.load_prompts(a.prompts_file, a.model, a.split)
    if not all(shapes.is_spec(s) for s in specs) and not a.reward:
        utils.fail("prompts outside the shapes grammar need --reward (e.g. --reward pickscore)")
    return captions, specs


def main(args: Args):
    from common import models, utils

    captions, specs = check_args(args)
    utils.exit_on_ctrl_c("evaluating")
    rank, world, device = utils.setup_distributed(args.device)  # torchrun: each rank evaluates a slice
    model = models.load_model(args.model, device, resolution=args.resolution, use_t5=args.use_t5,
                              max_t5_length=args.max_t5_length, mixed_precision=args.mixed_precision,
                              decode_batch_size=args.decode_batch_size, flux_guidance=args.flux_guidance,
                              fast_cpu_kernels=args.fast_cpu_kernels)
    transformer = load_finetuned(model, args.checkpoint, args.model) if args.checkpoint else model.transformer
    reward_fn = None if not args.reward else rewards.build_reward(
        args.reward, args.reward_device or device, args.reward_paths, rewards.DTYPES[args.reward_dtype],
        args.decode_batch_size)
    res, images, caps, values = evaluate_model(model, transformer, specs, args.samples_per_prompt, args.seed,
                                               args.guidance_scale, args.num_steps, reward_fn, captions, True,
                                               args.batch_size, rank, world)
    if args.save_images:  # every rank writes its own prompts
        lo = min(rank * -(-len(captions) // world), len(captions))
        hi = lo + len(caps) // args.samples_per_prompt
        save_geneval_layout(args.save_images, images, captions[lo:hi], specs[lo:hi], args.samples_per_prompt, lo)
    if rank == 0:
        print(f"{args.checkpoint or args.model}: {len(captions)} prompts x {args.samples_per_prompt} samples"
              f"{f' on {world} processes' if world > 1 else ''}")
        print(format_table(res))
        if args.reward:
            print(format_rewards(res))
        if args.save_images:
            print(f"wrote {res['n']} samples of {len(captions)} prompts to {args.save_images}")
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.grid and rank == 0:
        from PIL import Image

        Image.fromarray(utils.image_grid(images[:64], caps[:64], values[:64])).save(args.grid)
    utils.cleanup_distributed()


def cli():
    from common import utils

    main(utils.parse_args(Args, recorded=recorded_model))


if __name__ == "__main__":
    cli()
