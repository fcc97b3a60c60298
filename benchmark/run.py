"""Side-by-side benchmark of the method scripts on the embedded shapes world at an equal reward-query budget.

    python benchmark/run.py                                   # every method, 3 seeds, 2 workers
    python benchmark/run.py --methods advantageflow flow_grpo --budget 3200 --seeds 0 1 2

Each run is the method's own script with its own defaults (only --num-iterations is set, from the budget and
the script's batch), `--threads 1`, evaluation every ~10% of the budget. Results are read back from each run's
summary.json and TensorBoard events; nothing is reimplemented here. Writes docs/benchmark.md and PNG plots.
"""

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import statistics
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("advantageflow", "diffusion_nft", "flow_grpo", "orw_cfm_w2", "acflow", "fdfo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def batch_size(method):
    """Reward queries per iteration of a method with its default Args (averaged over a scoring block)."""
    k, q = scoring_block(importlib.import_module(method).Args())
    return q / k


def scoring_block(a):
    """(iterations, reward queries) of one scoring block of a method's resolved Args `a`, as the scripts count
    queries: epoch-structured methods score ceil(--epoch-iters / --pool-reuse) batches at the start of each
    --epoch-iters iterations, the others one batch per iteration."""
    k, reuse = getattr(a, "epoch_iters", 1), getattr(a, "pool_reuse", 1)
    return k, math.ceil(k / reuse) * a.prompts_per_iter * a.group_size


def code_hash(method):
    """sha256 of everything a run's result depends on: the method file (None: no method, the base model's
    evaluation), common/ and the committed base model."""
    h = hashlib.sha256()
    for f in [*([ROOT / f"{method}.py"] if method else []), *sorted((ROOT / "common").rglob("*")), ROOT / "benchmark" / "trace.py"]:
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def run_cmd(method, seed, budget, eval_points):
    """The script arguments of one benchmark run (the run directory's --output-dir excluded); budget 0 = the
    script's own default number of iterations (what `python <method>.py` runs)."""
    it = max(1, round(budget / batch_size(method))) if budget else importlib.import_module(method).Args().num_iterations
    return [f"{method}.py", "--seed", str(seed), *(["--num-iterations", str(it)] if budget else []),
            "--eval-every", str(max(1, it // eval_points)), "--threads", "1"]


def effective(args):
    """The resolved Args of a script command (defaults filled in, --output-dir dropped): a command that spells out
    a default is the same run as one that leaves it out."""
    import tyro

    a = vars(tyro.cli(importlib.import_module(args[0].removesuffix(".py")).Args, args=list(args[1:])))
    a.pop("output_dir", None)
    return a


def stored(run_dir, key, done="summary.json", any_eval_every=False):
    """True if run_dir holds a finished run (its `done` file) made by exactly this code and these (resolved)
    arguments (never reuse others). any_eval_every: also one evaluated at other intervals (--eval-every changes
    when the held-out evaluation runs, not the training: the same seed's final numbers are identical, checked on
    AC-Flow at 25 and 50); its curve keeps its own evaluation points."""
    f = run_dir / "run_key.json"
    if not ((run_dir / done).is_file() and f.is_file()):
        return False
    old = json.loads(f.read_text())
    if old == key:
        return True
    if not ("args" in key and old.keys() == key.keys() and old["code"] == key["code"]):
        return False
    a, b = effective(old["args"]), effective(key["args"])
    if any_eval_every:
        a.pop("eval_every"), b.pop("eval_every")
    return a == b


def run_one(method, seed, budget, out, eval_points, reuse=()):
    run_dir = out / method / f"seed{seed}"
    key = dict(code=code_hash(method), args=run_cmd(method, seed, budget, eval_points))
    if stored(run_dir, key):
        train_eval(out, run_dir, seed)
        return run_dir
    if run_dir.exists():  # another code state or other arguments: start over
        shutil.rmtree(run_dir)
    for other in reuse:  # the same run (same code, same resolved arguments) stored under another --out
        if stored(Path(other) / method / f"seed{seed}", key, any_eval_every=True):
            shutil.copytree(Path(other) / method / f"seed{seed}", run_dir)
            (run_dir / "run_key.json").write_text(json.dumps(key))
            print(f"{method} seed {seed}: the same run (evaluated at its own intervals) is stored in {other}; copied",
                  flush=True)
            return run_dir
    if execute(run_dir, key, f"{method} seed {seed}") == 0:
        train_eval(out, run_dir, seed)
    return run_dir


def script_cmd(run_dir, args, trace=True):
    """The command line of one run: the script with its arguments and --output-dir run_dir; trace: through
    benchmark/trace.py, which records the run's peak memory in run_dir/record.json."""
    tracer = [str(ROOT / "benchmark" / "trace.py"), str(run_dir / "record.json")] if trace else []
    return [sys.executable, *tracer, *args, "--output-dir", str(run_dir)]


def execute(run_dir, key, label, trace=True):
    """Run the script arguments key["args"] into the new directory run_dir (one thread, its output in stdout.txt);
    a run that finished gets run_key.json, which `stored` reads. -> the exit code."""
    run_dir.mkdir(parents=True)
    t = time.time()
    with open(run_dir / "stdout.txt", "w") as f:
        rc = subprocess.run(script_cmd(run_dir, key["args"], trace), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=ENV).returncode
    print(f"{label}: exit {rc} after {time.time() - t:.0f} s", flush=True)
    if rc == 0:
        (run_dir / "run_key.json").write_text(json.dumps(key))
    return rc


def train_eval(out, run_dir, seed, samples_per_prompt=16):
    """Strict accuracy on the train prompts (the 85 the methods optimise, 16 samples each, the seed's noise) of the
    base and of a finished run's saved model, by `python -m common.tools.evaluate --split train`: what a run
    learns, beside the held-out numbers (how far it generalises). 16 samples: 1,360 images, a strict-accuracy
    standard deviation of ~0.013 from the noise alone (4 samples: ~0.027, as large as the gains it measures).
    Cached next to the run (and the base per seed and code state)."""
    def evaluate(json_path, *extra):
        if not json_path.is_file():
            cmd = [sys.executable, "-m", "common.tools.evaluate", "--split", "train", "--samples-per-prompt",
                   str(samples_per_prompt), "--seed", str(seed), "--json", str(json_path), *extra]
            subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
        return json.loads(json_path.read_text())

    base_dir = out / "base_train" / code_hash(None)[:8]  # the base depends only on common/
    base_dir.mkdir(parents=True, exist_ok=True)
    return (evaluate(base_dir / f"seed{seed}_n{samples_per_prompt}.json"),
            evaluate(run_dir / f"train_eval_n{samples_per_prompt}.json", "--checkpoint", str(run_dir)))


def with_texture(out, run_dir, seed, summary):
    """summary.json with the held-out texture of base and final filled in for a run stored before the metric
    existed (a run carried over by benchmark/rekey.py): the saved model re-evaluated on the same held-out prompts
    and noise by `python -m common.tools.evaluate` (which reproduces the run's own final evaluation), cached."""
    if "texture" in summary["final"]:
        return summary
    n = summary["final"]["n"] // len(load_test_specs())

    def evaluate(json_path, *extra):
        if not json_path.is_file():
            cmd = [sys.executable, "-m", "common.tools.evaluate", "--split", "test", "--samples-per-prompt", str(n),
                   "--seed", str(seed), "--json", str(json_path), *extra]
            subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
        return json.loads(json_path.read_text())

    base_dir = out / "base_heldout" / code_hash(None)[:8]
    base_dir.mkdir(parents=True, exist_ok=True)
    base, final = evaluate(base_dir / f"seed{seed}_n{n}.json"), evaluate(run_dir / "heldout_eval.json", "--checkpoint",
                                                                         str(run_dir))
    for name, stored_, again in (("base", summary["base"], base), ("final", summary["final"], final)):
        if abs(again["strict_accuracy"] - stored_["strict_accuracy"]) > 1e-9:
            raise RuntimeError(f"{run_dir}: re-evaluating the {name} model gives strict accuracy "
                               f"{again['strict_accuracy']}, the run's own evaluation {stored_['strict_accuracy']}")
    return {**summary, "base": {**summary["base"], "texture": base["texture"]},
            "final": {**summary["final"], "texture": final["texture"]}}


def load_test_specs():
    from common.world import shapes

    return shapes.split_specs("test")


# ----------------------------------------------------------------------------------- cost breakdown and scaling
NO_EVAL = ["--eval-every", "100000", "--checkpoint-every", "100000", "--eval-samples-per-prompt", "1", "--threads", "1"]


def iteration_times(run_dir, skip=1):
    """Mean measured seconds per iteration, {sample, reward, train}, skipping the first `skip` iterations."""
    return {k: statistics.mean(v for st, _, v in scalars(run_dir, f"perf/{k}_s") if st > skip)
            for k in ("sample", "reward", "train")}


def time_passes(calls, reps=3):
    """(seconds, FLOPs) of each recorded transformer pass timed alone on the embedded model, one thread, in the
    runs' precision (`common.models.load_model`'s default: bf16 autocast on CPUs with native bf16): forward under
    no_grad, or forward + backward (all parameters trainable, as in the default full fine-tuning). FLOPs:
    torch.utils.flop_counter of the forward, x3 with the backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from common.models import Policy, load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tr = load_model("embedded", "cpu").transformer
    Policy(tr)  # trainable weights in fp32, as in a run
    cache, flops = {}, {}
    for hs, ehs, pp, grad, _ in calls:
        key = (tuple(hs), tuple(ehs), tuple(pp), grad)
        if key in cache:
            continue
        x, e, p, t = torch.randn(hs), torch.randn(ehs), torch.randn(pp), torch.rand(hs[0]) * 1000

        def once():
            with torch.set_grad_enabled(grad):
                out = tr(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t).sample
                if grad:
                    out.pow(2).mean().backward()
                    tr.zero_grad(set_to_none=True)

        once()  # warm-up
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            tr(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t)
        flops[key] = fc.get_total_flops() * (3 if grad else 1)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            once()
            ts.append(time.perf_counter() - t0)
        cache[key] = statistics.median(ts)
    keys = [(tuple(hs), tuple(ehs), tuple(pp), grad) for hs, ehs, pp, grad, _ in calls]
    return [cache[k] for k in keys], [flops[k] for k in keys]


def matmul_peaks():
    """GFLOP/s of one 2048^3 matmul on one thread, fp32 and bf16 (benchmark/compute.py's yardstick)."""
    import torch

    from compute import matmul_peak

    torch.set_num_threads(1)
    return {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}


def cost_one(method, out, iterations=4):
    """Trace a short run of `method` (alone on the machine), then time the passes it made alone."""
    d = out / "cost" / method
    key = dict(code=code_hash(method), iterations=iterations)
    if not stored(d, key, "cost.json"):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cmd = [sys.executable, str(ROOT / "benchmark" / "trace.py"), str(d / "record.json"), "--calls", f"{method}.py",
               "--num-iterations", str(iterations), "--output-dir", str(d / "run"), *NO_EVAL]
        subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=True)
        rec = json.loads((d / "record.json").read_text())
        secs, flops = time_passes(rec["calls"])
        n = rec["iterations"]
        pure = {ph: sum(s for s, c in zip(secs, rec["calls"]) if c[4] == ph) / n for ph in ("sample", "train")}
        gflop = {ph: sum(f for f, c in zip(flops, rec["calls"]) if c[4] == ph) / n / 1e9 for ph in ("sample", "train")}
        passes = {k: sum(c[3] == g for c in rec["calls"]) / n for k, g in (("forward", False), ("forward_backward", True))}
        measured = iteration_times(d / "run")
        from common.models import default_dtype

        (d / "cost.json").write_text(json.dumps(dict(measured=measured, pure=pure, passes=passes, iterations=n,
                                                     gflop=gflop, dtype=str(default_dtype("cpu")), peak=matmul_peaks())))
        (d / "run_key.json").write_text(json.dumps(key))
    c = json.loads((d / "cost.json").read_text())
    print(f"{method} cost: {c}", flush=True)
    return c


def scaling(method, out, prompts_per_process, iterations=6):
    """images/s of `torchrun --nproc_per_node 2` against one process, the same per-process batch, 1 thread each."""
    res = {}
    for nproc in (1, 2):
        d = out / "scaling" / method / f"nproc{nproc}"
        key = dict(code=code_hash(method), nproc=nproc, prompts=prompts_per_process, iterations=iterations)
        if not stored(d, key):
            shutil.rmtree(d, ignore_errors=True)
            launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                          "--nproc_per_node", str(nproc), "--standalone"]
            per_process = prompts_per_process * importlib.import_module(method).Args().group_size
            subprocess.run([*launch, f"{method}.py", "--prompts-per-iter", str(prompts_per_process * nproc),
                            "--train-batch-size", str(per_process), "--num-iterations", str(iterations),
                            "--output-dir", str(d), *NO_EVAL], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=True)
            (d / "run_key.json").write_text(json.dumps(key))
        res[nproc] = statistics.mean(v for st, _, v in scalars(d, "charts/images_per_sec") if st > 1)
    print(f"{method} scaling: {res}", flush=True)
    return res


def scalars(run_dir, tag):
    """[(step, wall_time, value)] of one TensorBoard tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def collect(out, methods, seeds, budget, eval_points):
    res = {}
    for m in methods:
        bs = batch_size(m)
        runs = []
        for s in seeds:
            d = out / m / f"seed{s}"
            if not stored(d, dict(code=code_hash(m), args=run_cmd(m, s, budget, eval_points))):
                print(f"{m} seed {s}: no run of this code state and budget in {d}; left out", flush=True)
                continue
            summ = with_texture(out, d, s, json.loads((d / "summary.json").read_text()))
            ev = scalars(d, "eval/reward_mean")
            start = min((w for _, w, _ in scalars(d, "charts/reward_mean")), default=0)
            curve = [(0, 0.0, summ["base"]["reward_mean"])] + [(st * bs, w - start, v) for st, w, v in ev]
            perf = {k: statistics.mean(v for _, _, v in scalars(d, f"perf/{k}_s") or [(0, 0, float("nan"))])
                    for k in ("sample", "reward", "train")}
            rec = d / "record.json"
            rss = json.loads(rec.read_text())["peak_rss_mb"] if rec.is_file() else None
            train_base, train_final = train_eval(out, d, s)
            runs.append(dict(summary=summ, curve=curve, perf=perf, peak_rss_mb=rss, train_base=train_base,
                             train_final=train_final))
        res[m] = runs
    return res


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def gain_cell(gains):
    """"**mean** [95 % interval]; per seed" of a list of per-seed gains (the interval: compare.py's percentile
    bootstrap over seeds; one seed: none)."""
    from compare import gain_stats  # compare imports this module

    st = gain_stats(gains)
    ci = "" if st["n"] < 2 else f" [{st['ci'][0]:+.3f}, {st['ci'][1]:+.3f}]"
    return f"**{st['mean']:+.3f}**{ci}; {', '.join(f'{g:+.3f}' for g in gains)}"


def base_to_final(base, final, key):
    """"base -> final" of a held-out metric, each the mean over seeds; "n/a" when a run's results lack it (a run
    stored before the metric existed)."""
    b, f = [d.get(key) for d in base], [d.get(key) for d in final]
    return "n/a" if None in b + f else f"{mean_std(b)[0]:.3f} -> {mean_std(f)[0]:.3f}"


def queries_to_reach(curve, target):
    return next((q for q, _, v in curve if v >= target), None)


def cost_table(costs):
    rows = ["| method | measured s/iter: sample / reward / train (total) | pure model compute s/iter: sample / train "
            "(total) | ratio | passes per iter: forward / forward+backward | achieved GFLOP/s in the run: sample / "
            "train (of the matmul peak) |", "|---|---|---|---|---|---|"]
    notes = []
    for m, c in costs.items():
        me, pu, pa = c["measured"], c["pure"], c["passes"]
        tot_m, tot_p = sum(me.values()), sum(pu.values())
        ratio = tot_m / tot_p
        if "gflop" in c:  # FLOPs of the iteration's passes over the measured seconds, against one-thread matmul
            peak = c["peak"]["bf16" if "bfloat16" in c["dtype"] else "fp32"]
            g = {ph: c["gflop"][ph] / me[ph] if me[ph] > 0 else float("nan") for ph in ("sample", "train")}
            achieved = (f"{g['sample']:.0f} / {g['train']:.0f} ({g['sample'] / peak:.0%} / {g['train'] / peak:.0%} "
                        f"of {peak:.0f}, {'bf16' if 'bfloat16' in c['dtype'] else 'fp32'})")
        else:
            achieved = "-"
        rows.append(f"| {m} | {me['sample']:.2f} / {me['reward']:.2f} / {me['train']:.2f} ({tot_m:.2f}) | "
                    f"{pu['sample']:.2f} / {pu['train']:.2f} ({tot_p:.2f}) | {ratio:.2f} | "
                    f"{pa['forward']:.0f} / {pa['forward_backward']:.0f} | {achieved} |")
        if ratio > 1.15:
            notes.append(f"- **{m}** ({ratio:.2f}): of the {tot_m - tot_p:.2f} s per iteration above pure compute, "
                         f"{me['reward']:.2f} s is the reward (the programmatic scorer and the reward gathers; no "
                         f"model), {me['sample'] - pu['sample']:.2f} s is sampling outside the transformer "
                         f"(prompt encoding, scheduler / log-prob arithmetic, decoding) and "
                         f"{me['train'] - pu['train']:.2f} s is training outside the timed passes (loss "
                         f"arithmetic, gradient clipping, the optimizer step, EMA / copy updates).")
    return "\n".join(rows), "\n".join(notes)


def report(res, out, budget, seeds, docs, costs=None, scale=None, eval_points=8, page="benchmark"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    grpo = [r["summary"]["final"]["reward_mean"] for r in res.get("flow_grpo", [])]
    target = statistics.mean(grpo) if grpo else None
    rows = ["| method | seeds | reward queries | strict accuracy: base -> final (gain [95 % interval]; per seed) | "
            "train prompts' strict accuracy: base -> final (gain [95 % interval]; per seed) | partial credit: base -> "
            "final | best partial credit (queries) "
            "| extra-object rate: base -> final | texture: base -> final | diversity | queries to Flow-GRPO's final | "
            "wall time (min) | s/iter: sample / reward / train | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for m, runs in res.items():
        if not runs:
            continue
        fin = [r["summary"]["final"] for r in runs]
        base = [r["summary"]["base"] for r in runs]  # evaluation noise depends on the seed
        ms = lambda xs: f"{mean_std(xs)[0]:.3f} ± {mean_std(xs)[1]:.3f}"  # noqa: E731
        gains = [f["strict_accuracy"] - b["strict_accuracy"] for f, b in zip(fin, base)]
        tb, tf = [r["train_base"]["strict_accuracy"] for r in runs], [r["train_final"]["strict_accuracy"] for r in runs]
        tgains = [f - b for f, b in zip(tf, tb)]
        extra = lambda d: 1 - d["clean_fraction"]  # noqa: E731
        wt = [r["summary"]["wall_time_s"] / 60 for r in runs]
        reach = [queries_to_reach(r["curve"], target) for r in runs] if target is not None else []
        reach_s = (f"{statistics.mean([q for q in reach if q is not None]):.0f} ({sum(q is not None for q in reach)}/{len(reach)} seeds)"
                   if any(q is not None for q in reach) else "not reached")
        best = [max(r["curve"], key=lambda c: c[2]) for r in runs]  # (queries, wall, value) of each run's peak
        best_s = f"{mean_std([b[2] for b in best])[0]:.3f} ({statistics.mean(b[0] for b in best):.0f})"
        p = runs[0]["perf"]
        rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"]]
        rows.append(f"| {m} | {len(runs)} | {runs[0]['curve'][-1][0]:.0f} | {mean_std([b['strict_accuracy'] for b in base])[0]:.3f} -> "
                    f"{ms([f['strict_accuracy'] for f in fin])} ({gain_cell(gains)}) | {mean_std(tb)[0]:.3f} -> {ms(tf)} "
                    f"({gain_cell(tgains)}) | "
                    f"{mean_std([b['reward_mean'] for b in base])[0]:.3f} -> "
                    f"{ms([f['reward_mean'] for f in fin])} | {best_s} | {mean_std([extra(b) for b in base])[0]:.3f} -> "
                    f"{mean_std([extra(f) for f in fin])[0]:.3f} | {base_to_final(base, fin, 'texture')} | "
                    f"{mean_std([f['diversity'] for f in fin])[0]:.3f} | "
                    f"{reach_s} | {mean_std(wt)[0]:.1f} | {p['sample']:.2f} / {p['reward']:.2f} / {p['train']:.2f} | "
                    f"{max(rss) if rss else float('nan'):.0f} |")
        for i, r in enumerate(runs):
            q, w, v = zip(*r["curve"])
            kw = dict(color=f"C{list(res).index(m)}", alpha=0.8, label=m if i == 0 else None)
            ax[0].plot(q, v, **kw)
            ax[1].plot([x / 60 for x in w], v, **kw)
            ax[2].scatter([r["summary"]["final"]["reward_mean"]], [r["summary"]["final"]["diversity"]], **kw)
    ax[0].set(xlabel="reward queries", ylabel="held-out partial credit")
    ax[1].set(xlabel="wall time (min)", ylabel="held-out partial credit")
    ax[2].set(xlabel="final held-out partial credit", ylabel="diversity")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(img / f"{page}.png", dpi=90)
    budget_s = (f"{budget} reward queries per run (`--num-iterations` = budget / the script's batch)" if budget else
                "each script's own default number of iterations (exactly `python <method>.py --seed S`)")
    text = f"""# Benchmark: all methods on the embedded shapes world{'' if budget else ' at their defaults'}

Budget: {budget_s}, seeds {', '.join(map(str, seeds))}, each method's own defaults otherwise, one CPU thread per
run. Held-out = shapes test split (32 prompts x 8 samples, CFG-free 10-step Euler, fixed noise; the standard
deviation of a strict-accuracy mean from evaluation noise alone is ~0.02). Machine: {platform.machine()},
{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Command: `python benchmark/run.py --budget {budget} --seeds
{' '.join(map(str, seeds))} --eval-points {eval_points}{'' if page == 'benchmark' else ' --page ' + page}{'' if costs else ' --no-cost'}`.
Every run is keyed by the hash of its code and its resolved arguments; a stored run of another code state is re-run.

{chr(10).join(rows)}

![curves](img/{page}.png)

Strict accuracy = exact scenes (every object, count, colour and position right); the gain is final minus the
same seed's base (the base is evaluated on the run's own noise); "±" is the standard deviation of the finals over
seeds, "[ ]" the 95 % percentile bootstrap interval of the mean gain (seeds resampled, `scipy.stats.bootstrap`, as
`benchmark/compare.py`): with 3 seeds it spans at most the seeds' own range and undercovers, so a
statement that rests on it takes 5 seeds ([claims.md](claims.md)). The train prompts' column evaluates the saved
model on the 85 prompts the methods train on (16 samples each, the seed's noise, so a strict-accuracy standard
deviation of ~0.013 from the evaluation alone; `python -m common.tools.evaluate --split train`): what a method learns, where the held-out column shows how far it generalises. Extra-object rate = the fraction of images with
an object the prompt did not ask for (clutter, the reward-hacking signature of world v1). Texture = the fraction of
pixels that are speckle (more than 0.02 outside the range of their 4 neighbours in some channel,
`common.world.shapes.texture`; measured: renders 0, the base ~0.001, Flow-GRPO's visible speckle at 3,200 queries
0.07-0.12); "n/a" for runs stored before it was measured. "Best partial credit"
is the mean over seeds of each run's highest held-out evaluation (base included), with the mean number of reward
queries at which it came. "Queries to Flow-GRPO's final" is the first evaluation at which a run's held-out
partial credit reaches the mean final value of the flow_grpo runs (evaluations are spaced ~1/{eval_points} of
the run apart). The s/iter split comes from each script's `perf/` scalars (rank 0, first seed).
"""
    if costs:
        table, notes = cost_table(costs)
        text += f"""
## Cost breakdown

One short run per method (4 iterations of its default batch, one thread, nothing else running, no evaluation in
the loop; the first iteration is dropped). "Measured" comes from the script's `perf/` scalars. "Pure model
compute" replays every transformer pass the iteration made (recorded by `benchmark/trace.py`: input shapes and
whether it ran with gradients) alone on the same model with random inputs: forward under `no_grad`, or forward +
backward. Passes made before the iteration's reward call count as sampling, later ones as training. The
programmatic reward of the embedded world and AC-Flow's small critic are not model compute.

{table}

{notes}
"""
    if scale:
        for m, r in scale.items():
            text += f"""
## Scaling: `torchrun --nproc_per_node 2` on CPU

`{m}.py`, the same per-process batch ({r['prompts_per_process']} prompts per process), one thread per process,
gloo: one process {r[1]:.1f} images/s, two processes {r[2]:.1f} images/s, ratio **{r[2] / r[1]:.2f}** (ideal 2 on
the 2 cores). Mean of `charts/images_per_sec` over iterations 2-6.
"""
    notes = ROOT / "benchmark" / f"commentary{page[len('benchmark'):]}.md"  # hand-written reading, kept across re-runs
    if notes.is_file():
        text += "\n" + notes.read_text()
    (docs / f"{page}.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if (ROOT / f"{m}.py").is_file()])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=3200, help="reward queries per run; 0 = each script's defaults")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--eval-points", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--page", default="benchmark", help="writes <docs>/<page>.md and <docs>/img/<page>.png")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-cost", action="store_true", help="skip the cost breakdown and the scaling runs")
    p.add_argument("--reuse", nargs="*", default=[], help="other --out folders: a run stored there with the same "
                   "code and resolved arguments (--eval-every aside) is copied instead of re-run (e.g. the defaults "
                   "page from the budget one)")
    p.add_argument("--scaling-method", default="advantageflow")
    p.add_argument("--scaling-prompts", type=int, default=4, help="prompts per process in the scaling runs")
    a = p.parse_args()
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    out = Path(a.out)
    if not a.report_only:
        jobs = [(m, s) for s in a.seeds for m in a.methods]
        with ThreadPoolExecutor(a.workers) as ex:
            list(ex.map(lambda j: run_one(j[0], j[1], a.budget, out, a.eval_points, a.reuse), jobs))
    costs = scale = None
    if not a.no_cost:  # run alone, after the parallel runs, so the timings are not disturbed
        costs = {m: cost_one(m, out) for m in a.methods}
        r = scaling(a.scaling_method, out, a.scaling_prompts)
        scale = {a.scaling_method: {**r, "prompts_per_process": a.scaling_prompts}}
    report(collect(out, a.methods, a.seeds, a.budget, a.eval_points), out, a.budget, a.seeds, Path(a.docs), costs, scale,
           a.eval_points, a.page)


if __name__ == "__main__":
    main()
