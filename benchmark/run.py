"""Side-by-side benchmark of the method scripts on the embedded shapes world at an equal reward-query budget.

    python benchmark/run.py                                   # every method, 3 seeds, 2 workers
    python benchmark/run.py --methods advantageflow flow_grpo --budget 3200 --seeds 0 1 2

Each run is the method's own script with its own defaults (only --num-iterations is set, from the budget and
the script's batch), `--threads 1`, evaluation every ~10% of the budget. Results are read back from each run's
summary.json and TensorBoard events; nothing is reimplemented here. Writes docs/benchmark.md and PNG plots.
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("advantageflow", "flow_grpo", "orw_cfm_w2", "acflow", "fdfo")


def batch_size(method):
    """Reward queries per iteration of a method with its default Args."""
    a = importlib.import_module(method).Args()
    return a.prompts_per_iter * a.group_size


def run_one(method, seed, budget, out, eval_points):
    it = max(1, budget // batch_size(method))
    run_dir = out / method / f"seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    # the wrapper records the process's peak resident memory next to summary.json
    wrapper = ("import resource, runpy, sys, json; sys.argv = sys.argv[1:]; "
               "exec('try:\\n runpy.run_path(sys.argv[0], run_name=\"__main__\")\\nfinally:\\n "
               "open(sys.argv[sys.argv.index(\"--output-dir\") + 1] + \"/peak_rss_mb.json\", \"w\")"
               ".write(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))')")
    cmd = [sys.executable, "-c", wrapper, f"{method}.py", "--seed", str(seed), "--num-iterations", str(it),
           "--eval-every", str(max(1, it // eval_points)), "--threads", "1", "--output-dir", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with open(run_dir / "stdout.txt", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    print(f"{method} seed {seed}: exit {rc} after {time.time() - t:.0f} s", flush=True)
    return run_dir


def scalars(run_dir, tag):
    """[(step, wall_time, value)] of one TensorBoard tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def collect(out, methods, seeds):
    res = {}
    for m in methods:
        bs = batch_size(m)
        runs = []
        for s in seeds:
            d = out / m / f"seed{s}"
            if not (d / "summary.json").is_file():
                continue
            summ = json.loads((d / "summary.json").read_text())
            ev = scalars(d, "eval/reward_mean")
            start = min((w for _, w, _ in scalars(d, "charts/reward_mean")), default=0)
            curve = [(0, 0.0, summ["base"]["reward_mean"])] + [(st * bs, w - start, v) for st, w, v in ev]
            perf = {k: statistics.mean(v for _, _, v in scalars(d, f"perf/{k}_s") or [(0, 0, float("nan"))])
                    for k in ("sample", "reward", "train")}
            rss = json.loads((d / "peak_rss_mb.json").read_text()) if (d / "peak_rss_mb.json").is_file() else None
            runs.append(dict(summary=summ, curve=curve, perf=perf, peak_rss_mb=rss))
        res[m] = runs
    return res


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def queries_to_reach(curve, target):
    return next((q for q, _, v in curve if v >= target), None)


def report(res, out, budget, seeds, docs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    grpo = [r["summary"]["final"]["reward_mean"] for r in res.get("flow_grpo", [])]
    target = statistics.mean(grpo) if grpo else None
    rows = ["| method | seeds | final partial credit | final strict accuracy | diversity | queries to Flow-GRPO's final | "
            "wall time (min) | s/iter: sample / reward / train | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for m, runs in res.items():
        if not runs:
            continue
        f = [r["summary"]["final"]["reward_mean"] for r in runs]
        st = [r["summary"]["final"]["strict_accuracy"] for r in runs]
        dv = [r["summary"]["final"]["diversity"] for r in runs]
        wt = [r["summary"]["wall_time_s"] / 60 for r in runs]
        reach = [queries_to_reach(r["curve"], target) for r in runs] if target is not None else []
        reach_s = (f"{statistics.mean([q for q in reach if q is not None]):.0f} ({sum(q is not None for q in reach)}/{len(reach)} seeds)"
                   if any(q is not None for q in reach) else "not reached")
        p = runs[0]["perf"]
        rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"]]
        rows.append(f"| {m} | {len(runs)} | {mean_std(f)[0]:.3f} ± {mean_std(f)[1]:.3f} | {mean_std(st)[0]:.3f} ± "
                    f"{mean_std(st)[1]:.3f} | {mean_std(dv)[0]:.3f} | {reach_s} | {mean_std(wt)[0]:.1f} | "
                    f"{p['sample']:.2f} / {p['reward']:.2f} / {p['train']:.2f} | {max(rss) if rss else float('nan'):.0f} |")
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
    fig.savefig(img / "benchmark.png", dpi=90)
    text = f"""# Benchmark: all methods on the embedded shapes world

Budget: {budget} reward queries per run, seeds {', '.join(map(str, seeds))}, each method's own defaults
(`--num-iterations` = budget / its batch), one CPU thread per run. Held-out = shapes test split (32 prompts x
8 samples, CFG-free 10-step Euler, fixed noise). Machine: {platform.machine()}, {os.cpu_count()} cores,
{time.strftime('%Y-%m-%d')}. Command: `python benchmark/run.py --budget {budget} --seeds {' '.join(map(str, seeds))}`.

{chr(10).join(rows)}

![curves](img/benchmark.png)

"Queries to Flow-GRPO's final" is the first evaluation at which a run's held-out partial credit reaches the
mean final value of the flow_grpo runs (evaluations are spaced ~10% of the budget apart). The s/iter split
comes from each script's `perf/` scalars (rank 0, first seed).
"""
    (docs / "benchmark.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if (ROOT / f"{m}.py").is_file()])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=6400, help="reward queries per run")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--eval-points", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    out = Path(a.out)
    if not a.report_only:
        jobs = [(m, s) for s in a.seeds for m in a.methods]
        with ThreadPoolExecutor(a.workers) as ex:
            list(ex.map(lambda j: run_one(j[0], j[1], a.budget, out, a.eval_points), jobs))
    report(collect(out, a.methods, a.seeds), out, a.budget, a.seeds, Path(a.docs))


if __name__ == "__main__":
    main()
