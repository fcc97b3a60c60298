"""GPU acceptance test of the SD3.5-M and FLUX.1-dev paths, run by `bash benchmark/gpu_smoke.sh` (which sets
HF_HUB_OFFLINE=1).

    bash benchmark/gpu_smoke.sh                      # ~10 min on one H100; more checks with 2 GPUs
    bash benchmark/gpu_smoke.sh --dry-run            # no GPU needed: what it would run
    bash benchmark/gpu_smoke.sh --dry-run --estimates   # ... plus the memory estimate of each run (~1 min of CPU)

Each method runs its docs page's SD3.5-M command (docs/<method>.md) on one GPU at the page's micro-batch per GPU,
with CFG, T5, LoRA r32, its --kl-coef / --ema / reward dtype, for a few iterations: ORW-CFM-W2 and AC-Flow with short
epochs (two pool samplings each, the page's pool-to-iteration ratio), Flow-GRPO and FDFO with fewer images per GPU
(`--full-batch`: the page's 144 / 108). The real reward model when the local Hugging Face cache has it, otherwise
a named fallback (Flow-GRPO's GenEval server: GENEVAL_URL with prompts/geneval_*.jsonl; else the VLM judge the page
names, else PickScore, else jpeg_compressibility). Checks, in order of priority within the time budget (`--budget`,
600 s):

- fp16: `--mixed-precision fp16` is refused in one line before loading (or, if the scripts train it with a
  GradScaler, its losses are finite);
- per method: the run finishes; peak torch.cuda.max_memory_reserved <= 1.15 x the estimate of benchmark/gpu_memory.py
  for the same flags (the docs/gpu.md margin rule; the docs row is printed beside it); dtypes (trained weights
  fp32, frozen transformer and text encoders bf16, VAE fp32, reward models in --reward-dtype); s / iteration;
  Flow-GRPO's on-policy ratio error of the first inner step (<= 1e-3);
- resume: ORW-CFM-W2 killed (SIGKILL) after its first checkpoint, mid-epoch, then `--resume`d to the end (AC-Flow too
  if time is left); `--gradient-checkpointing` (Flow-GRPO); a saved run evaluated by `python -m common.tools.evaluate
  --checkpoint` (bf16, then fp16); with 2 GPUs a torchrun (nccl) Flow-GRPO run.

FLUX.1-dev (after the SD3.5-M checks, within `--budget` + `--flux-budget`, 900 s more): when
black-forest-labs/FLUX.1-dev is in the local Hugging Face cache (or `--flux-model` / FLUX_MODEL names a local copy),
each page's FLUX.1-dev command runs the same way (`flux_<method>`: run, memory against the FLUX.1-dev estimate, dtypes,
s / iteration, Flow-GRPO's ratio), and the saved AdvantageFlow LoRA is evaluated back (`flux_evaluate_bf16`);
otherwise one SKIPPED line says so. `--only flux` runs the FLUX checks alone.

Prints a one-screen table of PASS / FAIL / SKIPPED (with the reason) and writes OUT/summary.json. Without SD3.5-M in
the cache (and no --model) it runs the tiny random SD3 pipeline of tests/helpers/tiny_sd3.py: code paths only, memory
checks skipped; with `--device cpu` the FLUX checks likewise run tests/helpers/tiny_flux.py's tiny FLUX.1-dev. `exec` is the in-process runner each run goes through (runpy): it records peak GPU memory and dtypes.
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["advantageflow", "diffusion_nft", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"]
SD35M = "stabilityai/stable-diffusion-3.5-medium"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
MARKERS = {False: "stable-diffusion-3.5-medium", True: "FLUX.1-dev"}  # how a page's command names its --model
GENEVAL_PROMPTS = ROOT / "prompts" / "geneval_train.jsonl"  # python -m common.tools.prompts --sets geneval
PROMPTS = ["a photo of a red bicycle leaning against a blue wall", "two cats sleeping on a wooden bench",
           "a bowl of oranges on a kitchen table, morning light", "a lighthouse on a cliff at sunset",
           "three yellow balloons above a green field", "a dog wearing sunglasses on a beach",
           "a chess board with a single white queen", "an astronaut riding a horse in a desert"]
# one GPU, the page's micro-batch; fewer images per GPU for Flow-GRPO / FDFO, short epochs for ORW / AC-Flow
SHORT = {
    "advantageflow": {"--num-iterations": 3},  # --prompts-per-iter: the page's per-GPU share (set below)
    "diffusion_nft": {"--num-iterations": 2, "--prompts-per-iter": 2, "--timestep-fraction": 0.3},  # 16 images x 3 sigmas
    "orw_cfm_w2": {"--pool-reuse": 1, "--epoch-iters": 2, "--num-iterations": 4},  # 1 pool batch / iteration
    "acflow": {"--pool-reuse": 4, "--epoch-iters": 4, "--num-iterations": 8, "--critic-warmup": 1,
               "--warmup-ev": 0},  # the page's 1 pool batch per 4 iterations
    "fdfo": {"--prompts-per-iter": 9, "--num-minibatches": 2, "--num-iterations": 2},  # 18 images (9 pairs)
    "flow_grpo": {"--prompts-per-iter": 3, "--group-size": 6, "--num-minibatches": 2, "--num-iterations": 2},
}
GC = {"--gradient-checkpointing": True, "--num-iterations": 1}  # Flow-GRPO: the step it shrinks most
RATIO_TOL, MARGIN = 1e-3, 1.15
GiB = 2**30


# ----------------------------------------------------------------------------------- flags
def to_argv(flags):
    return [x for k, v in flags.items() if v is not None and v is not False
            for x in ([k] if v is True else [k, str(v)])]


def documented(method, flux=False):
    sys.path.insert(0, str(ROOT / "benchmark"))
    from gpu_memory import documented as doc  # the docs command's flags (a placeholder like <reward> becomes X)

    return doc(method, MARKERS[flux])


def cached(repo, filename="config.json"):
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def reward_available(name):
    sys.path.insert(0, str(ROOT))
    from common.reward_models import REAL_DEFAULT_PATHS

    if name not in REAL_DEFAULT_PATHS:
        return True  # embedded rewards (jpeg_compressibility, ...) need nothing
    model, processor = REAL_DEFAULT_PATHS[name]
    return all(cached(r, f) for r, f in ((model, "config.json"), (processor, "preprocessor_config.json")) if r)


def pick_reward(method, spec, forced=None, flux=False):
    """(reward spec to run, note): the page's reward where the cache has it, else a named fallback."""
    if forced:
        return forced, f"{forced} (--reward)"
    if method == "flow_grpo" and not flux:  # the page's SD3.5-M command: a GenEval-type reward server
        if os.environ.get("GENEVAL_URL") and GENEVAL_PROMPTS.exists():  # the server needs GenEval metadata
            return f"remote:{os.environ['GENEVAL_URL']}", "the GenEval server at GENEVAL_URL"
        for r in ("vlm", "pickscore"):
            if reward_available(r):
                return r, f"FALLBACK {r} (no GENEVAL_URL for the page's GenEval server)"
        return "jpeg_compressibility", "FALLBACK jpeg_compressibility (no GENEVAL_URL, no VLM / PickScore cached)"
    parts = [p for p in spec.split(",") if p]
    have = [p for p in parts if reward_available(p.split("=")[0])]
    if have == parts:
        return spec, f"{spec} (as documented)"
    if have:
        return ",".join(have), f"FALLBACK {','.join(have)} ({', '.join(sorted(set(parts) - set(have)))} not cached)"
    return "jpeg_compressibility", f"FALLBACK jpeg_compressibility ({spec} not cached)"


# ----------------------------------------------------------------------------------- the plan
class Ctx:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out).resolve()
        self.t0, self.results, self.runs = time.monotonic(), [], {}
        self.log = self.out / "logs"

    def elapsed(self):
        return time.monotonic() - self.t0

    def record(self, check, status, detail=""):
        self.results.append(dict(check=check, status=status, detail=detail))
        print(f"  {status:7s} {check}: {detail}", flush=True)


def run_argv(ctx, method, extra=None, world=1, save=False, flux=False):
    """The page's command (its FLUX.1-dev one with `flux`) for one GPU at its per-GPU batch, shortened (SHORT), with
    the smoke's prompts / reward."""
    doc_world, f = documented(method, flux)
    f = {k: v for k, v in f.items() if not str(v).startswith("X")}  # drop placeholders
    if method == "advantageflow":
        f["--prompts-per-iter"] = int(f["--prompts-per-iter"]) // doc_world
    f.update(SHORT[method])
    if ctx.a.full_batch and method in ("fdfo", "flow_grpo"):
        doc = documented(method, flux)[1]
        f.update({k: doc[k] for k in ("--group-size", "--num-minibatches")})
        f["--prompts-per-iter"] = int(doc["--prompts-per-iter"]) // doc_world
    if world > 1:
        f["--prompts-per-iter"] = int(f["--prompts-per-iter"]) * world  # the same batch per GPU
    f["--reward"], note = pick_reward(method, str(documented(method, flux)[1].get("--reward", "")), ctx.a.reward, flux)
    f.update({"--model": ctx.flux_model if flux else ctx.model, "--prompts-file": str(ctx.prompts),
              "--eval-prompts-file": str(ctx.prompts),
              "--eval-samples-per-prompt": 1, "--eval-every": 1000, "--checkpoint-every": 1000,
              "--log-images-every": 1000, "--no-save-model": not save})
    if f["--reward"].startswith("remote:"):
        f["--prompts-file"] = str(GENEVAL_PROMPTS)
        f["--eval-prompts-file"] = str(GENEVAL_PROMPTS.with_name("geneval_test.jsonl"))
    if (ctx.flux_tiny if flux else ctx.tiny):
        f["--resolution"] = ctx.a.tiny_resolution
    if ctx.a.device != "auto":
        f.update({"--device": ctx.a.device, "--threads": 1})
    f.update(extra or {})
    return f, note


def exec_cmd(ctx, script, flags, report, world=1):
    runner = [str(ROOT / "benchmark" / "gpu_check.py"), "exec", "--report", str(report), script, *to_argv(flags)]
    if world > 1:
        return ["torchrun", "--standalone", "--nproc_per_node", str(world), *runner]
    return [sys.executable, *runner]


def launch(ctx, name, cmd, timeout, wait=True):
    ctx.log.mkdir(parents=True, exist_ok=True)
    log = open(ctx.log / f"{name}.log", "w")
    print(f"$ {shlex.join(cmd)}", file=log, flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return p
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = "timeout"
    return rc


def tail(ctx, name, n=3):
    lines = [l for l in (ctx.log / f"{name}.log").read_text(errors="replace").splitlines() if l.strip()]
    return " | ".join(l.strip()[:160] for l in lines[-n:])


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def seconds_per_iter(run_dir, method, flags):
    """Wall seconds of one iteration (perf/sample_s + reward_s + train_s): the last epoch's mean for ORW / AC-Flow
    (pool sampling included, in the page's proportion), else the iterations after the first (warm-up)."""
    parts = [dict(scalars(run_dir, f"perf/{k}_s")) for k in ("sample", "reward", "train")]
    steps = sorted(parts[0])
    t = {s: sum(p.get(s, 0.0) for p in parts) for s in steps}
    if not t:
        return float("nan")
    if method in ("orw_cfm_w2", "acflow"):
        k = int(flags["--epoch-iters"])
        keep = [s for s in steps if s > len(steps) - k] if len(steps) >= 2 * k else steps
    else:
        keep = steps[1:] or steps
    return sum(t[s] for s in keep) / len(keep)


# ----------------------------------------------------------------------------------- checks
def memory_check(ctx, label, rep, est, doc_row, flux=False):
    if (ctx.flux_tiny if flux else ctx.tiny) or ctx.a.device == "cpu":
        return ctx.record(f"{label} memory", "SKIPPED", "tiny model / CPU: not comparable with the "
                                                         f"{'FLUX.1-dev' if flux else 'SD3.5-M'} estimate")
    if est is None:
        return ctx.record(f"{label} memory", "SKIPPED", "no estimate (benchmark/gpu_memory.py failed, see logs)")
    r, a, e = rep["max_memory_reserved"] / GiB, rep["max_memory_allocated"] / GiB, est / GiB
    ok = r <= MARGIN * e
    ctx.record(f"{label} memory", "PASS" if ok else "FAIL",
               f"reserved {r:.1f} / allocated {a:.1f} GiB vs estimate {e:.1f} (limit {MARGIN * e:.1f}; "
               f"allocated / estimate {a / e:.2f}){f'; docs/gpu.md: {doc_row}' if doc_row else ''}")


def dtype_check(ctx, label, rep, reward_dtype, low):
    want = {"trainable": "float32", "lora": "float32", "frozen transformer": low, "text encoders": low,
            "vae": "float32", "critic": "float32"}
    bad = []
    for k, got in rep.get("dtypes", {}).items():
        w = reward_dtype if k.startswith("reward ") else want.get(k)
        if w and got != [w]:
            bad.append(f"{k} {got} (want {w})")
    if not rep.get("dtypes"):
        return ctx.record(f"{label} dtypes", "FAIL", "no dtype report")
    ctx.record(f"{label} dtypes", "FAIL" if bad else "PASS",
               "; ".join(bad) or ", ".join(f"{k} {v[0]}" for k, v in rep["dtypes"].items()))


def read_report(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def method_run(ctx, method, name=None, extra=None, world=1, save=False, memory=True, flux=False):
    """One run through the runner (`flux`: the page's FLUX.1-dev command); records run / memory / dtype / speed
    (/ ratio) results. Returns the run dir."""
    name = name or ("flux_" + method if flux else method)
    flags, note = run_argv(ctx, method, extra, world, save, flux)
    run_dir = ctx.out / name
    flags["--output-dir"] = str(run_dir)
    report = ctx.out / f"{name}.report{{rank}}.json"
    cmd = exec_cmd(ctx, f"{method}.py", flags, report, world)
    est_key = f"{name}"
    ctx.plan.append(dict(key=est_key, method=method, model="flux" if flux else "sd3",
                         flags={**flags, "world": world, "eval_images": len(PROMPTS) // world}))
    if ctx.a.dry_run:
        print(f"[{name}] reward: {note}\n  {shlex.join(cmd)}")
        return None
    rc = launch(ctx, name, cmd, ctx.timeout(300))
    reps = [read_report(str(report).format(rank=r)) for r in range(world)]
    if rc != 0 or any(r is None or r.get("error") for r in reps):
        err = next((r["error"] for r in reps if r and r.get("error")), tail(ctx, name))
        ctx.record(f"{name} run", "FAIL", f"rc {rc}: {err}")
        return None
    s = seconds_per_iter(run_dir, method, flags)
    n = int(flags["--prompts-per-iter"]) * int(flags.get("--group-size", 1)) // world
    doc_world, doc = documented(method, flux)
    n_doc = int(doc["--prompts-per-iter"]) * int(doc.get("--group-size", 1)) // doc_world
    scaled = f" (page's {n_doc}: ~{s * n_doc / n:.0f} s/iter scaled)" if n != n_doc else ""
    ctx.record(f"{name} run", "PASS", f"{s:.1f} s/iter at {n} images/GPU{scaled}; reward {note}")
    ctx.runs[name] = dict(method=method, flags=flags, reports=reps, run_dir=str(run_dir), s_iter=s)
    if memory:
        for r, rep in enumerate(reps):
            est = ctx.estimate(est_key)
            memory_check(ctx, f"{name}{f' rank {r}' if world > 1 else ''}", rep, est,
                         ctx.doc_rows.get(f"{method} (FLUX.1-dev)" if flux else method), flux)
    low = {"bf16": "bfloat16", "no": "float32"}.get(flags.get("--mixed-precision"), ctx.low)
    dtype_check(ctx, name, reps[0], {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[
        flags.get("--reward-dtype", "fp32")], low)
    if method in ("flow_grpo", "fdfo"):
        errs = [v for _, v in scalars(run_dir, "losses/onpolicy_ratio_err")]
        if not errs:
            ctx.record(f"{name} on-policy ratio", "FAIL", "losses/onpolicy_ratio_err not logged")
        elif method == "flow_grpo":
            ok = max(errs) <= RATIO_TOL
            ctx.record(f"{name} on-policy ratio", "PASS" if ok else "FAIL",
                       f"max |ratio - 1| of the first inner step {max(errs):.2e} (limit {RATIO_TOL:g})")
        else:
            ctx.record(f"{name} on-policy ratio", "INFO", f"max |rho - 1| of the first chunk {max(errs):.2e}")
    return run_dir


def fp16_check(ctx):
    flags, _ = run_argv(ctx, "advantageflow", {"--mixed-precision": "fp16", "--num-iterations": 1})
    flags["--output-dir"] = str(ctx.out / "fp16")
    cmd = exec_cmd(ctx, "advantageflow.py", flags, ctx.out / "fp16.report{rank}.json")
    if ctx.a.dry_run:
        return print(f"[fp16] refused in one line, or trained with finite losses\n  {shlex.join(cmd)}")
    t = time.monotonic()
    rc = launch(ctx, "fp16", cmd, ctx.timeout(300))
    dt, text = time.monotonic() - t, (ctx.log / "fp16.log").read_text(errors="replace")
    lines = [l for l in text.splitlines()[1:] if l.strip() and not l.startswith("[gpu_check]")] or [""]
    if rc == 0:
        loss = [v for _, v in scalars(ctx.out / "fp16", "losses/loss")]
        ok = loss and all(math.isfinite(v) for v in loss)
        return ctx.record("fp16", "PASS" if ok else "FAIL", f"trained in fp16 (GradScaler?), losses {loss}")
    one_line = "Traceback" not in text and lines[-1].startswith("error:") and "fp16" in lines[-1]
    ctx.record("fp16", "PASS" if one_line and dt < 60 else "FAIL",
               f"refused (rc {rc}) after {dt:.0f} s: {lines[-1][:200]}")


def resume_check(ctx, method):
    name = f"resume_{method}"
    extra = {"--checkpoint-every": 1, "--num-iterations": 6, "--epoch-iters": 4, "--pool-reuse": 2}
    flags, _ = run_argv(ctx, method, extra)
    run_dir = ctx.out / name
    flags["--output-dir"] = str(run_dir)
    cmd = exec_cmd(ctx, f"{method}.py", flags, ctx.out / f"{name}.report{{rank}}.json")
    resume = exec_cmd(ctx, f"{method}.py", {**flags, "--resume": str(run_dir)},
                      ctx.out / f"{name}_resumed.report{{rank}}.json")
    if ctx.a.dry_run:
        return print(f"[{name}] kill -9 after the first checkpoint, then resume\n  {shlex.join(cmd)}\n"
                     f"  {shlex.join(resume)}")
    import torch

    p, deadline = launch(ctx, name, cmd, None, wait=False), time.monotonic() + ctx.timeout(300)
    ckpt = run_dir / "checkpoint.pt"
    while not ckpt.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if p.poll() is not None or not ckpt.exists():
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
        return ctx.record(name, "FAIL", f"no checkpoint before the run ended (rc {p.poll()}): {tail(ctx, name)}")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["iteration"]
    rc = launch(ctx, name + "_resumed", resume, ctx.timeout(300))
    end = torch.load(ckpt, map_location="cpu", weights_only=False)["iteration"] if ckpt.exists() else None
    ok = rc == 0 and end == extra["--num-iterations"] and (run_dir / "summary.json").exists()
    where = "mid-epoch" if killed_at % extra["--epoch-iters"] else "at an epoch end"
    ctx.record(name, "PASS" if ok else "FAIL", f"killed at iteration {killed_at} ({where}), resumed: rc {rc}, "
               f"final iteration {end}{'' if ok else ': ' + tail(ctx, name + '_resumed')}")


def evaluate_check(ctx, precision, flux=False):
    prefix = "flux_" if flux else ""
    run = ctx.runs.get(prefix + "advantageflow")
    name = f"{prefix}evaluate_{precision}"
    tiny = ctx.flux_tiny if flux else ctx.tiny
    flags = {"--checkpoint": run["run_dir"] if run else str(ctx.out / (prefix + "advantageflow")),
             "--model": ctx.flux_model if flux else ctx.model,
             "--prompts-file": str(ctx.prompts), "--samples-per-prompt": 1, "--num-steps": 10,
             "--reward": (run or {}).get("flags", {}).get("--reward", "jpeg_compressibility"),
             "--json": str(ctx.out / f"{name}.json"), "--mixed-precision": precision,
             "--resolution": ctx.a.tiny_resolution if tiny else 512}
    if flux:  # the run's guidance-embedding value; T5 always loads for FLUX
        flags["--flux-guidance"] = (run or {}).get("flags", {}).get("--flux-guidance", 3.5)
    else:
        flags["--use-t5"] = True
    if ctx.a.device != "auto":
        flags["--device"] = ctx.a.device
    cmd = [sys.executable, "-m", "common.tools.evaluate", *to_argv(flags)]
    if ctx.a.dry_run:
        return print(f"[{name}] the saved advantageflow run\n  {shlex.join(cmd)}")
    if run is None:
        return ctx.record(name, "SKIPPED", "the advantageflow run (which saves the model) failed or did not run")
    rc = launch(ctx, name, cmd, ctx.timeout(200))
    res = read_report(ctx.out / f"{name}.json") or {}
    ok = rc == 0 and math.isfinite(res.get("reward_mean", float("nan")))
    ctx.record(name, "PASS" if ok else "FAIL", f"rc {rc}, reward_mean {res.get('reward_mean')}"
               f"{'' if ok else ': ' + tail(ctx, name)}")


# ----------------------------------------------------------------------------------- estimates
def doc_rows(flux=False):
    """method -> 'peak allocated X GiB, reserved + context Y GiB' from docs/gpu.md's table (`flux`: its FLUX.1-dev
    rows, keyed 'method (FLUX.1-dev)')."""
    out = {}
    labels = [f"{m} (FLUX.1-dev)" if flux else m for m in METHODS]
    for line in (ROOT / "docs" / "gpu.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 14 and cells[1] in labels and cells[1] not in out:
            out[cells[1]] = f"{cells[12].replace('*', '')}, with margin {cells[13]} GiB"
    return out


def estimate_main(plan_path, out_path):
    """Worker: the gpu_memory estimate of every planned run (bytes), written as {key: total}."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmark"))
    import gpu_memory

    torch.set_num_threads(1)
    built, out = {}, {}
    for p in json.loads(Path(plan_path).read_text()):
        kind = p.get("model", "sd3")
        if kind not in built:  # FLUX.1-dev's meta model only when the plan has FLUX runs
            built[kind] = gpu_memory.FluxDev() if kind == "flux" else gpu_memory.SD35M()
        f = {k: v for k, v in p["flags"].items() if v is not False}
        out[p["key"]] = gpu_memory.estimate(built[kind], p["method"], flags=f)["total"]
        Path(out_path).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------- the in-process runner
def dtypes(g):
    import torch.nn as nn

    def kinds(params):
        return sorted({str(p.dtype).replace("torch.", "") for p in params})

    out, model, policy, reward_fn = {}, g.get("model"), g.get("policy"), g.get("reward_fn")
    if policy is not None:
        out["trainable"] = kinds(policy.parameters())
    if model is not None:
        named = list(model.transformer.named_parameters())
        out["lora"] = kinds(p for k, p in named if "lora_" in k)
        out["frozen transformer"] = kinds(p for k, p in named if "lora_" not in k)
        out["text encoders"] = kinds(p for e in model.text_encoders for p in e.parameters())
        if model.vae is not None:
            out["vae"] = kinds(model.vae.parameters())
    for name, fn in getattr(reward_fn, "fns", {}).items():
        mods = [v for v in getattr(fn, "__dict__", {}).values() if isinstance(v, nn.Module)]
        if mods:
            out[f"reward {name}"] = kinds(p for m in mods for p in m.parameters())
    if isinstance(g.get("critic"), nn.Module):
        out["critic"] = kinds(g["critic"].parameters())
    return {k: v for k, v in out.items() if v}


def exec_main(report, script, argv):
    """Run `script` (a method script) in this process; write peak GPU memory, dtypes and any error to `report`."""
    import runpy
    import traceback

    import torch

    rank = int(os.environ.get("RANK", 0))
    sys.argv = [script, *argv]
    sys.path[0] = str(ROOT)  # as `python <script>` would have it (not benchmark/)
    rep, g = dict(rank=rank), {}
    try:
        g = runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            rep["error"] = f"exit {e.code}"
            raise
    except BaseException as e:
        rep["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        if torch.cuda.is_available():
            dev = g.get("device", torch.device("cuda", torch.cuda.current_device()))
            rep.update(max_memory_reserved=torch.cuda.max_memory_reserved(dev),
                       max_memory_allocated=torch.cuda.max_memory_allocated(dev), gpu=torch.cuda.get_device_name(dev))
            print(f"[gpu_check] peak reserved {rep['max_memory_reserved'] / GiB:.2f} GiB, allocated "
                  f"{rep['max_memory_allocated'] / GiB:.2f} GiB", flush=True)
        else:
            rep.update(max_memory_reserved=0, max_memory_allocated=0, gpu=None)
        if g:
            rep["dtypes"] = dtypes(g)
        Path(report.format(rank=rank)).write_text(json.dumps(rep, indent=1))


# ----------------------------------------------------------------------------------- main
def main():
    if len(sys.argv) > 1 and sys.argv[1] == "exec":
        ap = argparse.ArgumentParser()
        ap.add_argument("--report", required=True)
        ap.add_argument("script")
        a, rest = ap.parse_known_args(sys.argv[2:])
        return exec_main(a.report, a.script, rest)
    if len(sys.argv) > 1 and sys.argv[1] == "estimate":
        return estimate_main(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing (no GPU needed)")
    ap.add_argument("--estimates", action="store_true", help="with --dry-run: also the memory estimate of each run")
    ap.add_argument("--model", default=os.environ.get("MODEL"), help="SD3 pipeline (default: SD3.5-M from the cache)")
    ap.add_argument("--flux-model", default=os.environ.get("FLUX_MODEL"),
                    help="FLUX.1-dev pipeline (default: black-forest-labs/FLUX.1-dev from the cache, else skipped)")
    ap.add_argument("--flux-budget", type=float, default=float(os.environ.get("FLUX_BUDGET", 900)),
                    help="seconds the FLUX checks may add to --budget")
    ap.add_argument("--reward", default=os.environ.get("REWARD"), help="one reward spec for every method")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_smoke"))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", 600)),
                    help="seconds; checks that would start past it are skipped")
    ap.add_argument("--full-batch", action="store_true", help="Flow-GRPO / FDFO at the page's 144 / 108 images per GPU")
    ap.add_argument("--device", default="auto", help="cpu: run the plan on the CPU (tiny model; tests this script)")
    ap.add_argument("--tiny-resolution", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="run only the checks whose name starts with one of these")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx = Ctx(a)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.plan, ctx.doc_rows = [], {**doc_rows(), **doc_rows(flux=True)}
    ctx.prompts = ctx.out / "prompts.txt"
    ctx.prompts.write_text("\n".join(PROMPTS) + "\n")
    ctx.timeout = lambda s: max(30.0, min(s, a.budget + 60 - ctx.elapsed()))

    import torch

    gpus = torch.cuda.device_count() if a.device == "auto" else 0
    ctx.tiny, ctx.low = False, "float32"
    ctx.model = a.model or SD35M
    if not a.model and not cached(SD35M, "model_index.json") and (a.device == "cpu" or not a.dry_run):
        ctx.tiny, ctx.model = True, str(ctx.out / "tiny_sd3")
        if not (ctx.out / "tiny_sd3" / "model_index.json").exists():
            sys.path.insert(0, str(ROOT))
            from tests.helpers.tiny_sd3 import build_tiny_sd3

            build_tiny_sd3(ctx.model, t5=True, pos_embed_max_size=max(16, a.tiny_resolution // 4))
    # FLUX.1-dev: --flux-model, else the cache's; on the CPU (--device cpu) the tiny random one; else skipped
    ctx.flux_tiny, ctx.flux_model = False, a.flux_model or FLUX_DEV
    flux_note = ""
    if not a.flux_model and not cached(FLUX_DEV, "model_index.json"):
        if a.device == "cpu":
            ctx.flux_tiny, ctx.flux_model = True, str(ctx.out / "tiny_flux")
            if not (ctx.out / "tiny_flux" / "model_index.json").exists():
                sys.path.insert(0, str(ROOT))
                from tests.helpers.tiny_flux import build_tiny_flux

                build_tiny_flux(ctx.flux_model, guidance=True)
            flux_note = " (tiny random FLUX.1-dev)"
        elif a.dry_run:
            flux_note = " (not in this cache: planned as a GPU with it would run)"
        else:
            ctx.flux_model = None
            flux_note = " (not in the local Hugging Face cache: the FLUX checks are skipped)"
    cap = torch.cuda.get_device_capability(0) if gpus else None
    ctx.low = "bfloat16" if cap and cap >= (8, 0) else "float32"  # the scripts' default frozen-weight dtype
    bf16 = f", compute capability {cap[0]}.{cap[1]}: bf16 {'native' if cap >= (8, 0) else 'emulated'}" if cap else ""
    note = " (tiny random SD3: SD3.5-M is not in the local cache)" if ctx.tiny else ""
    if a.dry_run and not ctx.tiny and not a.model and not cached(SD35M, "model_index.json"):
        note = " (not in this cache: planned as a GPU with it would run)"
    print(f"GPUs: {gpus} ({torch.cuda.get_device_name(0) if gpus else 'none'}{bf16}); model: {ctx.model}{note}; "
          f"FLUX: {ctx.flux_model or FLUX_DEV}{flux_note}; HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}; budget "
          f"{a.budget:.0f} s (+ {a.flux_budget:.0f} s for FLUX)")
    if not gpus and a.device == "auto" and not a.dry_run:
        raise SystemExit("no CUDA GPU: nothing to accept here (use --dry-run, or --device cpu to test the plan)")

    est_proc, est_path = None, ctx.out / "estimates.json"
    ctx.estimates = {}

    def estimate(key):
        if est_proc is not None and est_proc.poll() is None:
            try:
                est_proc.wait(timeout=max(1.0, 300 - ctx.elapsed()))
            except subprocess.TimeoutExpired:
                return None  # no estimate within the budget: the memory check reports that, it does not wait
        return (read_report(est_path) or {}).get(key)

    ctx.estimate = estimate
    checks = [("fp16", lambda: fp16_check(ctx), 20),
              ("flow_grpo", lambda: method_run(ctx, "flow_grpo"), 90),
              ("fdfo", lambda: method_run(ctx, "fdfo"), 130),
              ("advantageflow", lambda: method_run(ctx, "advantageflow", save=True), 60),
              ("diffusion_nft", lambda: method_run(ctx, "diffusion_nft"), 60),
              ("evaluate_bf16", lambda: evaluate_check(ctx, "bf16"), 30),
              ("orw_cfm_w2", lambda: method_run(ctx, "orw_cfm_w2"), 90),
              ("resume_orw_cfm_w2", lambda: resume_check(ctx, "orw_cfm_w2"), 90),
              ("acflow", lambda: method_run(ctx, "acflow"), 80),
              ("torchrun_2gpu", lambda: method_run(ctx, "flow_grpo", "torchrun_2gpu", world=2), 100),
              ("gradient_checkpointing", lambda: method_run(ctx, "flow_grpo", "gradient_checkpointing", GC), 60),
              ("evaluate_fp16", lambda: evaluate_check(ctx, "fp16"), 30),
              ("resume_acflow", lambda: resume_check(ctx, "acflow"), 80)]
    # FLUX.1-dev: each run loads the 12B transformer and T5-XXL (~34 GB of bf16 weights) before its iterations
    checks += [("flux_flow_grpo", lambda: method_run(ctx, "flow_grpo", flux=True), 240),
               ("flux_advantageflow", lambda: method_run(ctx, "advantageflow", save=True, flux=True), 180),
               ("flux_evaluate_bf16", lambda: evaluate_check(ctx, "bf16", flux=True), 120),
               ("flux_fdfo", lambda: method_run(ctx, "fdfo", flux=True), 240),
               ("flux_orw_cfm_w2", lambda: method_run(ctx, "orw_cfm_w2", flux=True), 200),
               ("flux_acflow", lambda: method_run(ctx, "acflow", flux=True), 200)]
    if a.only:
        checks = [c for c in checks if c[0].startswith(tuple(a.only))]
    if ctx.flux_model is None:
        if any(c[0].startswith("flux_") for c in checks):
            ctx.record("flux", "SKIPPED", f"{FLUX_DEV} is not in the local Hugging Face cache (model_index.json); "
                                          "FLUX_MODEL=/path/to/FLUX.1-dev (or --flux-model) runs its checks")
        checks = [c for c in checks if not c[0].startswith("flux_")]
    if gpus < 2 and a.device == "auto" and not a.dry_run:
        checks = [c for c in checks if c[0] != "torchrun_2gpu"]
        ctx.record("torchrun_2gpu", "SKIPPED", f"{gpus} GPU(s): the 2-process nccl run needs 2")
    # the estimator runs on the CPU beside the GPU runs: the plan is built by a dry pass over the checks
    dry, a.dry_run = a.dry_run, True
    saved = sys.stdout
    sys.stdout = open(os.devnull, "w") if not dry else saved
    for _, fn, _ in checks:
        fn()
    sys.stdout, a.dry_run = saved, dry
    (ctx.out / "plan.json").write_text(json.dumps(ctx.plan, indent=1))
    real_runs = not ctx.tiny or (ctx.flux_model is not None and not ctx.flux_tiny)  # something to estimate
    if real_runs and a.device == "auto" and (not dry or a.estimates):
        est_proc = subprocess.Popen([sys.executable, __file__, "estimate", str(ctx.out / "plan.json"), str(est_path)],
                                    cwd=ROOT, stdout=open(ctx.out / "estimates.log", "w"), stderr=subprocess.STDOUT,
                                    env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    if dry:
        if est_proc:
            est_proc.wait()
            for key, v in (read_report(est_path) or {}).items():
                print(f"estimate {key}: {v / GiB:.1f} GiB allocated, limit {MARGIN * v / GiB:.1f} GiB reserved")
        return
    ctx.plan = []
    for name, fn, expect in checks:
        limit = a.budget + (a.flux_budget if name.startswith("flux_") else 0)
        if ctx.elapsed() + expect > limit:
            ctx.record(name, "SKIPPED", f"time budget ({ctx.elapsed():.0f} s used, ~{expect} s needed, --budget "
                                        f"{a.budget:.0f}{' + --flux-budget' if name.startswith('flux_') else ''})")
            continue
        print(f"[{ctx.elapsed():5.0f} s] {name}", flush=True)
        fn()
    if est_proc is not None and est_proc.poll() is None:
        est_proc.kill()
    summary(ctx)


def summary(ctx):
    print(f"\n{'check':38s} {'result':7s} detail ({ctx.elapsed():.0f} s in all; logs in {ctx.log})")
    for r in ctx.results:
        print(f"{r['check'][:38]:38s} {r['status']:7s} {r['detail'][:150]}")
    counts = {s: sum(r["status"] == s for r in ctx.results) for s in ("PASS", "FAIL", "SKIPPED", "INFO")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v))
    (ctx.out / "summary.json").write_text(json.dumps(dict(results=ctx.results, runs=ctx.runs), indent=1, default=str))
    raise SystemExit(1 if counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
