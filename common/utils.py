"""Training utilities shared by the method scripts: argument checks, TensorBoard, image grids, prompt groups sharded
over ranks, DDP helpers, atomic checkpoints, summary.json, the non-finite and stop guards."""

import atexit
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import signal
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import models, rewards
from common.text import fail, quote, read_text  # noqa: F401 (utils.fail is the scripts' one-line error)


# --upload-model's two steps, registered by common/tools/hub.py: "check_upload"(args) before any loading (one-line
# SystemExit), "upload"(run_dir, args) at the end of a run
HOOKS = {}


# ----------------------------------------------------------------------------------- argument checks
def why(e):
    """An exception as a short clause: its type and the first line of its message, cut to 120 characters."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def exit_on_ctrl_c(what):
    """From now on Ctrl-C (while `what`, e.g. loading the models, before a run saves anything) is one line and exit
    130, not a KeyboardInterrupt traceback; a run's StopSignal takes it over once the models are loaded."""
    def handle(signum, frame):
        print(f"interrupted while {what}; nothing was saved", file=sys.stderr, flush=True)
        raise SystemExit(130)

    signal.signal(signal.SIGINT, handle)


def load_weights(path):
    """Every weight file the tools read, behind one check: {name: tensor} of a .safetensors file (else a torch
    .pt / .pth state dict), or one line naming the file and what is wrong with it: missing, empty, truncated or not
    a weights file (`match_weights`: another model's names or sizes)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        fail(f"{p} {'is empty (0 bytes)' if p.is_file() else 'does not exist'}; save or download it again")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(p)
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{p} is truncated or not a weights file ({why(e)}); save or download it again")
    return sd


def match_weights(sd, expected, where, model):
    """`sd` if its names and shapes are `expected`'s ({name: shape} of `model`), else one line naming `where`."""
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        fail(f"{where} holds the weights of another model than {model}: {len(missing)} of its tensors missing (e.g. "
             f"{(missing or ['-'])[0]!r}), {len(extra)} unknown (e.g. {(extra or ['-'])[0]!r})")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            fail(f"{where} holds the weights of another model size than {model}: {k!r} is {tuple(sd[k].shape)} "
                 f"there, {tuple(shape)} in {model}")
    return sd


def _cli(cls, args, default=None):
    """tyro.cli(cls), with tyro's boxed message for a flag it cannot parse (a wrong type, an unknown flag, a missing
    value) reported as one line: the message and the flag's expected form. --help lists a method's own flags first."""
    import tyro

    own = {k: i for i, k in enumerate(vars(cls).get("__annotations__", {}))}  # then the inherited (RunArgs) ones
    cls.__dataclass_fields__ = dict(sorted(cls.__dataclass_fields__.items(), key=lambda f: own.get(f[0], len(own))))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = tyro.cli(cls, args=args, default=default)
    except SystemExit as e:
        rows = [r.strip("│ ") for r in err.getvalue().splitlines()[1:]]  # inside the box, under its title
        rule = next((i for i, r in enumerate(rows) if r and set(r) <= set("─╰╯")), len(rows))
        msg = " ".join(r for r in rows[:rule] if r)
        if not e.code or not msg:
            sys.stderr.write(err.getvalue())
            raise
        text = " ".join(err.getvalue().replace("│", " ").split())  # the box unicode or ASCII, lines joined
        choice = re.search(r"invalid choice (.+?) for argument '(--[\w-]+)'\. Expected one of \((.*?)\)\.", text)
        if choice:  # a Literal[...] flag: the house form of the message
            fail(f"unknown {choice[2]} {choice[1]}; choose from: {choice[3].replace(chr(39), '')}")
        forms = "; ".join(r for r in rows[rule:] if r.startswith("--"))  # the flag's helptext / close matches
        fail(msg + (f" ({'did you mean' if 'Perhaps you meant:' in rows else 'expected'} {forms})" if forms else ""))
    sys.stderr.write(err.getvalue())
    return parsed


def parse_args(cls, args=None, recorded=None):
    """The command line as a `cls`, one line on a flag tyro cannot parse or an empty value (an unset shell variable
    is not "not given"). The flags not given take the values a run recorded: with --resume the checkpoint's (so a
    resume needs no flags; `check_resume` then refuses or applies the ones given), or `recorded(parsed)`'s."""
    parsed = _cli(cls, args)
    for k, v in vars(parsed).items():
        if isinstance(v, str) and not v.strip():
            fail(f"--{k.replace('_', '-')} is empty; give a value or drop the flag")
    if recorded is None and getattr(parsed, "resume", None):
        saved = load_checkpoint(parsed.resume)["args"]
        if saved.get("exp_name", parsed.exp_name) != parsed.exp_name:  # another script's state
            fail(f"--resume {parsed.resume!r} was saved with --exp-name {saved['exp_name']}, this run has "
                 f"{parsed.exp_name}; resume with the script that saved it")
        recorded = lambda _: {k: v for k, v in saved.items() if k not in RESUME_OWN}  # noqa: E731
    fields = {f for f in cls.__dataclass_fields__}
    saved = {k: v for k, v in (recorded(parsed) if recorded else {}).items() if k in fields}
    return _cli(cls, args, dataclasses.replace(cls(), **saved)) if saved else parsed


def check_device(flag, value):
    """A --device / --reward-device value this machine has: auto, cpu, cuda or cuda:N with N < the GPU count."""
    try:
        d = torch.device("cpu" if value in (None, "auto") else value)
    except (RuntimeError, ValueError):
        fail(f"{flag} {value!r} is not a device; choose from: auto, cpu, cuda, cuda:N")
    n = torch.cuda.device_count()
    if d.type not in ("cpu", "cuda"):
        fail(f"{flag} {value!r} is not supported; choose from: auto, cpu, cuda, cuda:N")
    if d.type == "cuda" and (d.index or 0) >= n:
        fail(f"{flag} {value!r}: this machine has no CUDA GPU; choose from: auto, cpu" if n == 0 else
             f"{flag} {value!r}: this machine has {n} CUDA GPU(s); choose from: auto, cpu, cuda, cuda:0 .. cuda:{n - 1}")


def check_reward_servers(spec):
    """Every `remote:<url>` reward must answer a connection now, not after the models have loaded."""
    for name in rewards.parse_reward_spec(spec) if spec else []:
        for prefix, scheme in rewards.SCHEMES.items():
            try:
                if name.startswith(prefix):
                    scheme.check(name)
            except ConnectionError as e:
                fail(f"--reward {name}: {e}; start the server or pick another reward")


def check_shared(a):
    """Checks shared by the method scripts and common.evaluate: every float flag finite (NaN / inf learning rates,
    weights, ...), devices, reward dtype, guidance scale, seed, image size, T5 length."""
    for name, v in vars(a).items():
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"--{name.replace('_', '-')} {v} must be a finite number")
    check_device("--device", a.device)
    check_device("--reward-device", a.reward_device)
    if getattr(a, "reward_dtype", "fp32") not in rewards.DTYPES:
        fail(f"unknown --reward-dtype {a.reward_dtype!r}; choose from: {', '.join(rewards.DTYPES)}")
    if a.guidance_scale < 1:
        fail(f"--guidance-scale {a.guidance_scale} must be >= 1 (1 = no classifier-free guidance)")
    if not 0 <= a.seed < 2**31:
        fail(f"--seed {a.seed} must be in [0, 2^31)")
    if a.resolution < 16 or a.resolution % 16:
        fail(f"--resolution {a.resolution} must be a positive multiple of 16 (SD3: VAE factor 8 x patch size 2)")
    if a.max_t5_length < 1:
        fail(f"--max-t5-length {a.max_t5_length} must be >= 1")


def check_args(args, world_size=1):
    """Validate the flags every method shares. Runs before any model loading.
    Returns (captions, metadata) of the training pool, then of the held-out prompts."""
    a = args
    try:
        rewards.parse_reward_spec(a.reward)
        rewards.parse_reward_paths(getattr(a, "reward_paths", None), a.reward)
    except ValueError as e:
        fail(str(e))
    check_shared(a)
    for name, lo, why in (("lr", 0, " (0 is allowed as a no-learning control)"), ("weight_decay", 0, ""),
                          ("threads", 0, " (0 = torch's default)"),
                          ("lora_rank", 0, " (0 = full fine-tuning, >= 1 for LoRA)")):
        if getattr(a, name) < lo:
            fail(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= {lo}{why}")
    if a.max_grad_norm <= 0:
        fail(f"--max-grad-norm {a.max_grad_norm} must be > 0 (the gradient-norm clipping threshold)")
    for name in ("num_iterations", "num_steps", "group_size", "prompts_per_iter", "eval_samples_per_prompt",
                 "eval_every", "checkpoint_every", "log_images_every", "decode_batch_size", "eval_batch_size"):
        if getattr(a, name, 1) < 1:  # counts, divisors and intervals
            fail(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if a.mixed_precision == "fp16":  # training would need loss scaling (a GradScaler): fp16 LoRA gradients underflow
        fail(f"--mixed-precision fp16 is not supported for training (no loss scaling); choose from: "
             f"{', '.join(models.TRAIN_PRECISIONS)}")
    if a.mixed_precision not in (None, *models.TRAIN_PRECISIONS):
        fail(f"unknown --mixed-precision {a.mixed_precision!r}; choose from: {', '.join(models.TRAIN_PRECISIONS)}")
    if a.lora_alpha is not None and a.lora_alpha < 1:
        fail(f"--lora-alpha {a.lora_alpha} must be >= 1 (default: 2 * --lora-rank)")
    n = a.prompts_per_iter * a.group_size
    if n % world_size:
        fail(f"the prompt batch prompts_per_iter*group_size = {n} is not divisible by the world size {world_size}")
    if a.train_batch_size < 1 or (n // world_size) % a.train_batch_size:
        fail(f"--train-batch-size {a.train_batch_size} must divide the per-process batch {n // world_size} "
             f"(prompts_per_iter*group_size/world_size)")
    if a.resume:
        check_resume(a)
    if a.output_dir:
        check_writable_dir("--output-dir", a.output_dir)
    if getattr(a, "upload_model", False):
        if "check_upload" not in HOOKS:
            fail("--upload-model needs the Hub tool: import common.tools.hub (the method scripts do)")
        HOOKS["check_upload"](a)
    check_reward_servers(a.reward)
    prompts = load_prompts(a.prompts_file, a.model, "train")
    eval_file = getattr(a, "eval_prompts_file", None)
    if eval_file:
        eval_prompts = load_prompts(eval_file, a.model, flag="--eval-prompts-file")
    else:  # the shapes test split, or the first 32 training prompts of a --prompts-file
        eval_prompts = (prompts[0][:32], prompts[1][:32]) if a.prompts_file else load_prompts(None, split="test")
    try:  # the model and its family's own flag rules (FLUX: no CFG, --flux-guidance only with a guidance embedding)
        models.check_model_flags(a.model, a.guidance_scale, a.flux_guidance)
    except SystemExit as e:
        if not isinstance(e.code, str):  # Ctrl-C: exit 130
            raise
        fail(str(e).removeprefix("error: "))
    if a.model != models.EMBEDDED and a.lora_rank == 0:
        print(f"warning: --lora-rank 0 fully fine-tunes {a.model} (needs a full frozen copy)", file=sys.stderr)
    return (*prompts, *eval_prompts)


# --resume: a changed flag of these is applied (with a warning and a note in summary.json); a change of any other
# is refused, since the run would mix two settings (the README's resume table). `RESUME_OWN`: never compared.
RESUME_APPLIED = ("num_iterations", "lr", "device", "threads", "track", "wandb_project_name", "wandb_entity",
                  "save_model", "upload_model", "hf_entity", "checkpoint_every", "eval_every", "log_images_every",
                  "decode_batch_size", "eval_batch_size", "reward_device", "gradient_checkpointing")
RESUME_OWN = ("exp_name", "resume", "output_dir", "overwrite")


def resume_changes(saved, a):
    """{flag: (checkpoint's value, this run's)} of the flags `a` changes against a checkpoint's `saved` args."""
    return {k: (saved[k], v) for k, v in vars(a).items() if k in saved and k not in RESUME_OWN[1:] and saved[k] != v}


def check_resume(a):
    """--resume: each changed flag refused (one line: the flag, the checkpoint's value, this run's) or applied with a
    one-line warning (`RESUME_APPLIED`); --num-iterations never below the iterations the checkpoint holds."""
    ckpt = load_checkpoint(a.resume)
    for k, (old, new) in resume_changes(ckpt["args"], a).items():
        flag = f"--{k.replace('_', '-')}"
        if k not in RESUME_APPLIED:
            fail(f"--resume {a.resume!r} was saved with {flag} {old}, this run has {new}; a run cannot change it "
                 f"midway: drop {flag} (or give {old}), or start a fresh run in another --output-dir")
        if k == "num_iterations" and new < ckpt["iteration"]:
            fail(f"--num-iterations {new} is below the {ckpt['iteration']} iterations --resume {a.resume!r} holds; "
                 f"give at least {ckpt['iteration']}")
        print(f"warning: --resume: {flag} {old} -> {new} from iteration {ckpt['iteration']} on (recorded in "
              "summary.json's resumes)", file=sys.stderr)


def check_writable_dir(flag, path):
    """`path` is (or is now created as) a writable directory."""
    d = Path(path).absolute()
    parent = next(q for q in [d, *d.parents] if q.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        fail(f"{flag} {str(path)!r} is not writable ({parent} is not a writable directory)")
    try:  # e.g. under /proc, where access() says yes and mkdir says no
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {str(path)!r} cannot be created ({e.strerror}: {e.filename})")


def load_prompts(prompts_file, model=models.EMBEDDED, split="train", flag="--prompts-file"):
    """-> (captions, metadata). A prompts file has one prompt per line, or is GenEval's JSON-lines metadata (one
    object with "prompt" (and "tag", ...) per line; `.jsonl` files or lines starting with "{"; what
    `python -m common.tools.prompts` builds). For the embedded model every prompt must parse with the shapes grammar (the
    error names the line). metadata: the shapes spec of a prompt the grammar parses, else the line's JSON object
    (handed to the reward as is, e.g. GenEval's "include" or OCR's "text"), else None. No file: the shapes
    grammar's `split`."""
    scorer = rewards.SCORER
    if not prompts_file:
        if scorer is None:
            fail(f"no {flag} and no scene world to take prompts from: import common.world (the method scripts do)")
        specs = scorer.split_specs(split)
        return [s["caption"] for s in specs], specs
    if not os.path.isfile(prompts_file):
        fail(f"{flag} {prompts_file!r} does not exist")
    text = read_text(prompts_file, flag)
    lines = [(i, l.strip()) for i, l in enumerate(text.splitlines(), 1) if l.strip()]
    if not lines:
        fail(f"{flag} {prompts_file!r} holds no prompts (one prompt per line expected)")
    meta, prompts = [], []
    for i, line in lines:
        record = None
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = "invalid"  # reported just below
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                fail(f"{prompts_file} line {i}: not a JSON object with a \"prompt\" string: {quote(line)}")
            line = record["prompt"]
        prompts.append(line)
        try:
            if scorer is None:
                raise ValueError(f"no scene grammar parses {line!r}")
            meta.append(scorer.parse_caption(line))
        except ValueError as e:
            if model == models.EMBEDDED:  # the grammar's message, the prompt cut short
                fail(f"{prompts_file} line {i}: {str(e).replace(repr(line), quote(line))}")
            meta.append(record)
    return prompts, meta


# ----------------------------------------------------------------------------------- run set-up
def claim_run_dir(run_dir, a):
    """Rank 0, before any model loads. A directory holding a run (its checkpoint.pt or summary.json) takes no new
    run: only --resume of that run, or --overwrite (which deletes the old run's files first). A live run holds
    run.lock (its pid), which keeps every other run out; a lock whose process has ended is taken over with a warning.
    The lock goes when the process exits."""
    d, lock, src = Path(run_dir), Path(run_dir) / "run.lock", Path(a.resume or ".")
    resuming = bool(a.resume) and d.resolve() == (src if src.is_dir() else src.parent).resolve()
    flag = f"--resume {a.resume!r}" if resuming else f"--output-dir {str(d)!r}"
    pid = (lock.read_text().split() or [""])[0] if lock.is_file() else ""
    if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
        fail(f"{flag}: a live run uses that directory (pid {pid}, {lock}); wait for it to end or pick a fresh "
             "--output-dir")
    found = [f for f in ("checkpoint.pt", "summary.json") if (d / f).exists()]
    if found and not resuming and not a.overwrite:
        fail(f"--output-dir {str(d)!r} holds a run ({found[0]}); continue it with --resume {d}, pick a fresh "
             "--output-dir, or replace it with --overwrite")
    stale = lock.is_file()
    if stale:
        print(f"warning: {lock}: its run (pid {pid}) ended without removing it; taking it over", file=sys.stderr)
    if found and not resuming:  # --overwrite: none of the old run's files may pass for the new run's
        import shutil

        for f in [*found, "samples.png", "README.md", *d.glob("events.out.tfevents.*"), "lora", "transformer"]:
            f = d / f
            shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
    try:
        d.mkdir(parents=True, exist_ok=True)
        if stale:
            lock.unlink(missing_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        fail(f"{flag}: another run has just started in that directory ({lock}); pick a fresh --output-dir")
    except OSError as e:
        fail(f"{flag}: cannot write in {d} ({e.strerror}); resume a copy of the run, or give --output-dir a "
             "writable directory")
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    atexit.register(lambda: lock.unlink(missing_ok=True))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def make_writer(run_dir, args, rank=0):
    """TensorBoard writer (rank 0 only) whose first entry is a table of every hyperparameter."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=getattr(args, "wandb_entity", None), sync_tensorboard=True,
                   config=vars(args), name=run_dir.name)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def image_grid(images, captions, values=None, cell=128, ncol=8):
    """A uint8 (H, W, 3) grid of thumbnails `cell` px wide (32-px shapes scenes x4, 512-px SD3 images /4) with each
    image's caption (and value) written under it."""
    from PIL import Image, ImageDraw

    imgs = rewards.to_uint8(images)
    w, h, ncol = cell, round(imgs.shape[1] * cell / imgs.shape[2]), min(ncol, len(imgs))
    resample, cell_h = Image.NEAREST if imgs.shape[2] <= cell else Image.BILINEAR, h + 36  # 36 px of caption
    canvas = Image.new("RGB", (ncol * w, -(-len(imgs) // ncol) * cell_h), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, arr in enumerate(imgs):
        x, y = (i % ncol) * w, (i // ncol) * cell_h
        canvas.paste(Image.fromarray(arr).resize((w, h), resample), (x, y))
        text = textwrap.wrap(captions[i], w // 6)[:2] or [""]  # two lines of about 6 px per character
        draw.text((x + 2, y + h + 1), "\n".join(text), fill=(255, 255, 255), spacing=1)
        if values is not None:
            draw.text((x + 2, y + h + 24), f"{float(values[i]):.3f}", fill=(255, 220, 120))
    return np.asarray(canvas)


class SampleGrid:
    """Visible learning: base beside current on the same noise. Fed each held-out evaluation's images (prompt-major,
    `samples_per_prompt` each, fixed noise), it keeps the first sample of `n` prompts spread over the list; the
    first call (the base evaluation) fixes the base row (`base`, kept in checkpoints). `add` logs the grid to
    TensorBoard ("eval/samples": rows alternate base / current, reward under each image); `save` writes the latest as
    PNG (samples.png)."""

    def __init__(self, samples_per_prompt, n=16, ncol=8):
        self.k, self.n, self.ncol, self.base, self.grid = samples_per_prompt, n, ncol, None, None

    def pick(self, n_prompts):
        """Indices of the samples shown: the first sample of `n` prompts spread over the list."""
        return sorted({round(i * (n_prompts - 1) / max(1, self.n - 1)) * self.k for i in range(min(self.n, n_prompts))})

    def add(self, writer, step, images, captions, values, picked=False):
        """images / captions / values of every sample, or (picked=True) of the samples `pick` chose only."""
        pick = list(range(len(captions))) if picked else self.pick(len(captions) // self.k)
        now = (rewards.uint8_images(images[pick].cpu()), torch.as_tensor(values)[pick].cpu(),
               [captions[i] for i in pick])
        self.base = self.base or now
        imgs, caps, vals = [], [], []
        for k in range(0, len(pick), self.ncol):
            for tag, (im, v, c) in (("base", self.base), ("now", now)):
                imgs.append(im[k:k + self.ncol])
                vals.append(v[k:k + self.ncol])
                caps += [f"{tag}: {t}" for t in c[k:k + self.ncol]]
        self.grid = image_grid(torch.cat(imgs), caps, torch.cat(vals), ncol=min(self.ncol, len(pick)))
        if writer is not None:
            writer.add_image("eval/samples", self.grid, step, dataformats="HWC")

    def save(self, path):
        if self.grid is not None:
            from PIL import Image
            Image.fromarray(self.grid).save(path)


# ----------------------------------------------------------------------------------- prompts and DDP
def group_mean(x, groups):
    """Mean of x over the samples that share a group id, broadcast back to every sample."""
    _, inv = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1, dtype=x.dtype).index_add_(0, inv, x)
    counts = torch.zeros(int(inv.max()) + 1, dtype=x.dtype).index_add_(0, inv, torch.ones_like(x))
    return (sums / counts)[inv]


class PromptSampler:
    """Each iteration: `prompts_per_iter` prompt indices (same on every rank), each repeated `group_size` times,
    then this rank's contiguous shard. Indices, not token ids, identify the groups. Deterministic in
    (seed, iteration), so a resumed run draws the same prompts."""

    def __init__(self, prompts, metadata, prompts_per_iter, group_size, seed=0, rank=0, world_size=1):
        self.prompts, self.metadata = prompts, metadata
        self.L, self.K, self.seed, self.rank, self.world = prompts_per_iter, group_size, seed, rank, world_size

    def sample(self, iteration):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        n = len(self.prompts)
        idx = torch.randperm(n, generator=g)[: self.L] if self.L <= n else torch.randint(n, (self.L,), generator=g)
        full = idx.repeat_interleave(self.K)  # (L*K,) prompt index per sample, groups contiguous
        per = len(full) // self.world
        local = full[self.rank * per:(self.rank + 1) * per]
        return ([self.prompts[i] for i in local], [self.metadata[i] for i in local], local)


def setup_distributed(device=None):
    """torchrun -> (rank, world_size, device); one process otherwise. gloo on CPU, nccl on GPU."""
    rank, world = dist_env()
    if device is None or device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        # say that this process waits, and for whom; give up after RENDEZVOUS_TIMEOUT_S (torch's default: 30 min of
        # silence), e.g. when leftover torchrun variables make a plain `python` run wait for processes never started
        from datetime import timedelta
        from torch.distributed.constants import default_pg_timeout

        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        timeout = int(os.environ.get("CLEANFLOW_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT_S))
        print(f"process {rank} of {world}: waiting up to {timeout} s for the others at {where}", file=sys.stderr,
              flush=True)
        err, store = os.dup(2), None
        try:  # without c10d's C++ log of each failed connection attempt (dozens of lines)
            with open(os.devnull, "w") as null, contextlib.suppress(RuntimeError, OSError, ValueError):
                os.dup2(null.fileno(), 2)
                store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout)))
        finally:
            os.dup2(err, 2)
            os.close(err)
        if store is None:
            fail(f"process {rank} of {world}: the other processes did not join at {where} within {timeout} s; to "
                 "run one process, unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT (left over from torchrun?)")
        store.set_timeout(default_pg_timeout)  # later exchanges: torch's default
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store, rank=rank,
                                world_size=world)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        # TF32 tensor cores for the fp32 matmuls / convolutions (VAE decode, fp32 LoRA and critic paths), as the
        # official Flow-GRPO code enables it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, torch.device(device)


def now(device):
    """time.time() once the work queued on `device` has run: CUDA kernels run asynchronously, so without the wait
    the perf/* timers would count sampling time wherever the next synchronising call happens (e.g. as reward time)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def randn_for_rank(gen, n_global, shape, local, device, dtype):
    """Standard normal noise for a global batch of `n_global` samples, this rank's `local` slice of it, from the CPU
    generator `gen`: the same numbers for any number of processes and after a resume. On the CPU drawn as one tensor
    from `gen` (the numbers every CPU result was computed with); on CUDA drawn on the GPU from a CUDA generator seeded
    from `gen` (no CPU sampling of the whole batch and pageable copy per step; other numbers than the CPU's, the same
    on every GPU of a kind). The whole global batch either way: a seeded stream cannot jump to a rank's slice, and
    per-sample streams would change every result so far."""
    if torch.device(device).type == "cuda":
        g = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return torch.randn(n_global, *shape, generator=g, device=device, dtype=dtype)[local].clone()
    return torch.randn(n_global, *shape, generator=gen)[local].to(device, dtype)


RENDEZVOUS_TIMEOUT_S = 120  # how long a process of a multi-process run waits for the others to start


def dist_env():
    """(rank, world size) from torchrun's variables, one line on an incomplete or malformed set (e.g. WORLD_SIZE
    left over in a shell without RANK)."""
    env = {k: os.environ.get(k, "") for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    given = ", ".join(f"{k}={v}" for k, v in env.items() if v)
    if not all(env[k].isdigit() for k in ("WORLD_SIZE", "RANK", "MASTER_PORT") if env[k]):
        fail(f"torchrun's variables must be integers, found {given}")
    world, rank = int(env["WORLD_SIZE"] or 1), int(env["RANK"] or 0)
    missing = [k for k, v in env.items() if not v] if world > 1 else []
    if missing or not 0 <= rank < world:
        fail(f"an incomplete multi-process launch: {given} but {', '.join(missing) or 'RANK not below WORLD_SIZE'}"
             f"{' unset' if missing else ''}; launch with torchrun, or unset {', '.join(k for k in env if env[k])} "
             "to run one process")
    return rank, world


def world_size_from_env():
    """WORLD_SIZE, for the checks before the launch (`dist_env` checks the launch's variables as a whole)."""
    world = os.environ.get("WORLD_SIZE") or "1"
    if not world.isdigit():
        fail(f"torchrun's variables must be integers, found WORLD_SIZE={world}")
    return int(world)


def all_gather_cat(t):
    """Concatenate a tensor from every rank along dim 0 (same shape on every rank), in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def sync_gradients(params, bucket_mb=25):
    """Average gradients over ranks as DDP's reducer does - flattened into fp32 buckets of about `bucket_mb` MB (DDP's
    default bucket_cap_mb), one all-reduce per bucket instead of one per tensor (SD3.5-M LoRA r32: 3 instead of 382)
    - but explicit, so any forward pattern (several models, micro-batches, inner epochs) works. Every rank must hold
    gradients for the same parameters."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * 4
        if size >= bucket_mb * 2**20 or i == len(grads) - 1:
            flat = torch.cat([b.flatten().float() for b in bucket])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for b, f in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(f.view_as(b))
            bucket, size = [], 0


def gather_pool(pool, keys, device):
    """A sample pool as a checkpoint holds it (every rank calls this): each per-rank list `pool[k]` (this rank's
    slice of every minibatch) gathered over ranks into the global minibatches, on the CPU; the other entries (the
    same on every rank) as they are. Without it, a checkpoint would hold rank 0's samples only."""
    if pool is None:
        return None
    return {**pool, **{k: [all_gather_cat(t.to(device)).cpu() for t in pool[k]] for k in keys}}


def rank_pool(pool, keys, rank, world, device):
    """This rank's pool from a checkpoint's (gather_pool's) global one, every tensor on `device` (checkpoints load
    on the CPU). A one-process checkpoint holds the global pool too."""
    if pool is None:
        return None
    return to_device({**pool, **{k: [t[rank * (len(t) // world):(rank + 1) * (len(t) // world)] for t in pool[k]]
                                 for k in keys}}, device)


def to_device(obj, device):
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- checkpoints
def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path, state):
    """Atomic: write to a temporary file, fsync, then rename over the old checkpoint, so a kill while saving
    never leaves a corrupt latest checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("iteration", "args", "rng", "summary", "reward_queries", "wall_time_s", "grid", "policy",
                   "optimizer")
_checkpoints = {}


def load_checkpoint(path, forget=False):
    """A checkpoint.pt (or a run directory's), checked before any model loads, else one line: its records must match
    the CRC-32 checksums torch.save writes with them (zip format), so bytes overwritten in it fail here instead of
    resuming a corrupted optimizer; it must hold every key a resume reads (an older layout fails here, not after
    the model loads). Loaded once per process (`forget`: and dropped from the cache)."""
    p = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    if p not in _checkpoints:
        if not p.is_file():
            fail(f"--resume {str(path)!r}: no checkpoint file there (expected a checkpoint.pt or a run directory "
                 "holding one)")
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
            if bad:
                raise ValueError(f"record {bad} does not match its checksum: the file was damaged after saving")
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:
            fail(f"--resume {str(p)!r} is not a readable checkpoint ({why(e)})")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["iteration"]
        if missing:
            fail(f"--resume {str(p)!r} is not a checkpoint of this cleanflow version (no {', '.join(missing)}: an "
                 "older layout or another program's); start a fresh run")
        _checkpoints[p] = ckpt
    return _checkpoints.pop(p) if forget else _checkpoints[p]


def apply_resume_changes(ckpt, a):
    """A resumed run with changed flags (`check_resume` allowed them): a new --lr scales the learning rates of the
    checkpoint's optimizer and scheduler before the method loads them (so it is the lr that runs), and
    summary.json's "resumes" records each change at the iteration it took effect."""
    changes = resume_changes(ckpt["args"], a)
    if "lr" in changes:
        old, new = changes["lr"]
        scale = lambda v: v * new / old if old else new  # noqa: E731
        for g in ckpt["optimizer"]["param_groups"]:
            g.update({k: scale(g[k]) for k in ("lr", "initial_lr") if k in g})
        if ckpt.get("scheduler"):
            ckpt["scheduler"].update({k: [scale(v) for v in ckpt["scheduler"][k]] for k in ("base_lrs", "_last_lr")
                                      if k in ckpt["scheduler"]})
    if changes:
        ckpt["summary"].setdefault("resumes", []).append(
            {"iteration": ckpt["iteration"], "changed": {k: list(v) for k, v in changes.items()}})


def write_summary(run_dir, summary):
    tmp = Path(run_dir) / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, Path(run_dir) / "summary.json")


class NonFiniteGuard:
    """Skip updates whose loss or rewards are not finite; stop after `patience` in a row."""

    def __init__(self, patience=5):
        self.patience, self.in_a_row, self.total = patience, 0, 0

    def ok(self, *tensors, iteration=0, empty=False):
        """True if every tensor is finite. `empty`: an update without any gradient (e.g. every item inactive)
        neither ends nor extends a run of non-finite updates."""
        if all(torch.isfinite(t).all() for t in tensors):
            self.in_a_row = 0 if not empty else self.in_a_row
            return True
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        print(f"warning: non-finite loss/reward at iteration {iteration}; update skipped "
              f"({self.in_a_row} in a row)", file=sys.stderr)
        if self.in_a_row >= self.patience:
            raise SystemExit(f"error: {self.in_a_row} non-finite updates in a row, last at iteration {iteration}; "
                             "stopping (the last good checkpoint is kept)")
        return False


class StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM (pre-emption, torchrun shutting down its workers) asks the run to stop at the end
    of the current iteration, so the checkpoint saved then holds whole iterations only and resumes exactly.
    A second signal stops at once (the last checkpoint on disk is kept; checkpoints are written atomically); one
    within a second of the first is the same request delivered twice (under torchrun, a terminal's Ctrl-C reaches
    the workers both directly and forwarded by the launcher)."""

    def __init__(self, device="cpu"):
        self.requested, self.device, self.first = False, device, 0.0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            if time.time() - self.first > 1.0:
                print(f"\n{signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
                raise SystemExit(130)
            return
        self.requested, self.first = True, time.time()
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration (send it again to stop now)",
              file=sys.stderr, flush=True)

    def __call__(self):
        """True on every rank once any rank was signalled (one all-reduce, so all ranks stop together)."""
        flag = torch.tensor(float(self.requested), device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
