"""Did B improve on A? Two commands run at equal reward queries on the same seeds, compared seed by seed.

    python benchmark/compare.py "advantageflow.py" "advantageflow.py --gamma 0" --seeds 5
    python benchmark/compare.py "orw_cfm_w2.py" "acflow.py" --seeds 0 1 2 --budget 2560 --dry-run

A command is a method script (a top-level file of this repository, a fork included) and its flags. Each runs as
`python <script> <flags> --seed S --num-iterations N [--eval-every N] --eval-samples-per-prompt E --threads 1` with
OMP_NUM_THREADS=1 (--eval-every N unless the command sets it: the base and the final model are evaluated, nothing
between). N is set per command so that both make the same number of reward queries, counted as the script counts
them. The two runs of a seed evaluate their base on the same held-out noise; they must report the same base
(checked). Gain = final - base on the held-out prompts, in strict accuracy and in partial credit (summary.json's
`strict_accuracy`, `reward_mean`; and the trained reward, `train_reward_mean`, where it is another reward); the
effect of a seed = B's gain - A's gain. Printed: every seed's gains and effect, then the mean effect with its 95 %
bootstrap interval (percentile, seeds resampled in pairs, scipy.stats.bootstrap) and the probability of improvement
P(B > A), the interval estimates of rliable (Agarwal et al. 2021), then each command's mean gain with its own
interval (does it learn at all?). Runs are stored under --out keyed by the hash of their code and resolved arguments
(as benchmark/run.py keys its runs): a command run again prints its table from the stored runs.
"""

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import shlex
import shutil
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import METHODS, ROOT, code_hash, effective, execute, script_cmd, scoring_block, stored  # noqa: E402

# the flags compare.py sets itself, the same for A and B, and how to choose their values
OWN_FLAGS = {"--seed": "give --seeds", "--num-iterations": "give --budget (reward queries per run)",
             "--eval-samples-per-prompt": "give compare.py's --eval-samples-per-prompt", "--threads": "always 1",
             "--output-dir": "give --out", "--resume": "every run starts from the base model"}
# standard deviation of a held-out strict-accuracy number from the evaluation noise alone, measured at 32 prompts
# x 8 samples per prompt; it falls as 1 / sqrt(samples per prompt)
EVAL_SD_AT_8 = 0.02
METRICS = (("strict", "strict_accuracy", "strict accuracy"), ("partial", "reward_mean", "partial credit"))
# the held-out mean of the reward the runs train on (summary.json's `train_reward_mean`): a third metric where it is
# not the scene scorer's partial credit (e.g. --reward jpeg_compressibility)
TRAINED = ("reward", "train_reward_mean", "trained reward")


def fail(msg):
    print(f"compare.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------------------ statistics
def probability_of_improvement(a, b, axis=-1):
    """rliable's P(B > A): the chance that a run of B has a larger value than a run of A, over every pair of one
    run of each (Mann-Whitney U / (n m)), ties counted 1/2. a, b: (..., n) with the runs on `axis`."""
    a, b = np.moveaxis(np.asarray(a, float), axis, -1), np.moveaxis(np.asarray(b, float), axis, -1)
    return ((np.sign(b[..., :, None] - a[..., None, :]) + 1) / 2).mean(axis=(-2, -1))


def paired_stats(gain_a, gain_b, resamples=10_000, seed=0):
    """Mean of B - A over the seeds with its 95 % bootstrap interval, and P(B > A) with its interval; both
    percentile intervals (as rliable's) over resampled seeds, each seed keeping its pair (scipy.stats.bootstrap,
    paired=True). Fewer than 2 seeds: no intervals (nan)."""
    a, b = np.asarray(gain_a, float), np.asarray(gain_b, float)
    d = b - a
    res = dict(n=len(d), mean=float(d.mean()), sd=float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
               wins=int((d > 0).sum()), p=float(probability_of_improvement(a, b)), ci=(math.nan,) * 2,
               p_ci=(math.nan,) * 2)
    if len(d) > 1:
        for name, stat in (("ci", lambda x, y, axis: (y - x).mean(axis=axis)), ("p_ci", probability_of_improvement)):
            res[name] = percentile_interval((a, b), stat, True, resamples, seed)
    return res


def percentile_interval(data, stat, paired, resamples, seed):
    """95 % percentile bootstrap interval of `stat` over the seeds (scipy.stats.bootstrap) -> (low, high)."""
    from scipy import stats

    with warnings.catch_warnings():  # all values equal: a degenerate, zero-width interval is right
        warnings.simplefilter("ignore")
        ci = stats.bootstrap(data, stat, paired=paired, vectorized=True, n_resamples=resamples, confidence_level=0.95,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(ci.confidence_interval.low), float(ci.confidence_interval.high)


def gain_stats(gains, resamples=10_000, seed=0):
    """Mean of one command's gains over the seeds with its 95 % percentile bootstrap interval (seeds resampled,
    scipy.stats.bootstrap) and the number of seeds with a positive gain. Fewer than 2 seeds: no interval (nan)."""
    g = np.asarray(gains, float)
    res = dict(n=len(g), mean=float(g.mean()), sd=float(g.std(ddof=1)) if len(g) > 1 else float("nan"),
               wins=int((g > 0).sum()), ci=(math.nan,) * 2)
    if len(g) > 1:
        res["ci"] = percentile_interval((g,), np.mean, False, resamples, seed)
    return res


def seeds_needed(mean, sd):
    """Estimated seeds at which a 95 % interval of the mean paired difference excludes 0: n ~ (1.96 sd / |mean|)^2
    (normal approximation, the observed sd and mean taken as the truth); None if the mean is 0 or sd unknown."""
    if mean == 0 or not sd >= 0:
        return None
    return max(2, math.ceil((1.96 * sd / abs(mean)) ** 2))


def verdict(s):
    if s["n"] < 2:
        return "one seed: no interval"
    lo, hi = s["ci"]
    if lo > 0 or hi < 0:
        return f"B {'>' if lo > 0 else '<'} A at {s['n']} seeds (the interval excludes 0)"
    n = seeds_needed(s["mean"], s["sd"])
    more = (f"; ~{n} seeds might decide it (estimate: n ~ (1.96 sd / mean)^2, sd {s['sd']:.3f} of the paired "
            f"differences)" if n else "; the mean difference is 0")
    return f"not decidable at {s['n']} seeds (the interval contains 0){more}"


def gain_verdict(s):
    if s["n"] < 2:
        return "one seed: no interval"
    lo, hi = s["ci"]
    if lo > 0 or hi < 0:
        return f"{'gains' if lo > 0 else 'loses'} at {s['n']} seeds (the interval excludes 0)"
    return f"not decidable at {s['n']} seeds"


# -------------------------------------------------------------------------------------------------------- the plan
def parse_command(text, name):
    """'script.py --flag v ...' -> (module name, flags), with one line on a script that is not there or a flag
    compare.py sets itself."""
    words = shlex.split(text)
    if not words:
        fail(f"command {name} is empty")
    script, flags = words[0], words[1:]
    path = (ROOT / script).resolve()
    if not (script.endswith(".py") and path.is_file() and path.parent == ROOT):
        fail(f"command {name}: no method script {script!r} in {ROOT}; e.g. {', '.join(m + '.py' for m in METHODS)}")
    own = sorted({f.split("=")[0] for f in flags if f.split("=")[0] in OWN_FLAGS})
    if own:
        fail(f"command {name} sets {own[0]}, which compare.py sets for both commands: {OWN_FLAGS[own[0]]}")
    return path.stem, flags


def check_flags(module, argv):
    """The script's own checks of `argv` in this process (what its __main__ runs before loading anything) ->
    the resolved Args, or the first line of the script's error."""
    from common import utils

    mod = importlib.import_module(module)
    if not hasattr(mod, "Args"):
        return None, f"{module}.py has no Args: not a method script"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = utils.parse_args(mod.Args, argv)
            if hasattr(mod, "check_method_args"):
                mod.check_method_args(args)
            utils.check_args(args)
    except SystemExit:
        return None, (err.getvalue().strip().splitlines() or ["rejected"])[0].removeprefix("error: ")
    return args, None


def equal_queries(budget, a):
    """-> (iterations, reward queries) of resolved Args `a` for a budget of reward queries: the whole number of
    scoring blocks whose queries come nearest the budget (ties to fewer, at least one), each block run to its end
    (every scored sample trained on). Exact when the budget is a multiple of the block's queries."""
    k, q = scoring_block(a)
    n = max(1, math.ceil(budget / q - 0.5))
    return n * k, n * q


def default_queries(a):
    """Reward queries of `a` run for its own --num-iterations."""
    k, q = scoring_block(a)
    return math.ceil(a.num_iterations / k) * q


def run_key(module, flags, seed, iterations, eval_samples, eval_every):
    args = [f"{module}.py", *flags, "--seed", str(seed), "--num-iterations", str(iterations),
            *([] if eval_every else ["--eval-every", str(iterations)]),
            "--eval-samples-per-prompt", str(eval_samples), "--threads", "1"]
    return dict(code=code_hash(module), args=args)


def run_dir(out, module, seed, key):
    """out/<script>/seed<S>__<hash of the code and the resolved arguments>: a command that spells out a default
    shares the directory of one that leaves it out; another code state or other arguments get their own."""
    h = hashlib.sha256(json.dumps([key["code"], effective(key["args"])], sort_keys=True, default=str).encode())
    return out / module / f"seed{seed}__{h.hexdigest()[:12]}"


def rel(p):
    """A path inside the repository relative to its root (where the commands run), others as they are."""
    return os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else str(p)


def plan(cmd_a, cmd_b, seeds, budget, eval_samples, out):
    """Check both commands and lay out every run before anything runs: -> (header lines, jobs), a job
    dict(name, seed, key, dir)."""
    cmds = {}
    for name, text in (("A", cmd_a), ("B", cmd_b)):
        module, flags = parse_command(text, name)
        args, err = check_flags(module, [*flags, "--eval-samples-per-prompt", str(eval_samples)])
        if err:
            fail(f"command {name} ({text!r}): {err}")
        cmds[name] = dict(text=text, module=module, flags=flags, args=args,
                          eval_every=any(f.split("=")[0] == "--eval-every" for f in flags))
    budget = budget or default_queries(cmds["A"]["args"])
    lines = []
    for name, c in cmds.items():
        c["iterations"], c["queries"] = equal_queries(budget, c["args"])
        k, q = scoring_block(c["args"])
        unit = f"{q} per iteration" if k == 1 else f"{q} per {k}-iteration epoch"
        lines.append(f"{name}: {c['text']}  ({c['iterations']} iterations, {c['queries']} reward queries at {unit})")
    qa, qb = cmds["A"]["queries"], cmds["B"]["queries"]
    if qa != qb or qa != budget:
        lines.append(f"note: {budget} reward queries is not a whole number of both commands' scoring blocks; each "
                     f"runs the nearest whole number of blocks: A {qa}, B {qb} queries"
                     f"{'' if qa == qb else ' (not equal; choose a --budget both divide for an exact match)'}")
    jobs = []
    for s in seeds:
        for name, c in cmds.items():
            key = run_key(c["module"], c["flags"], s, c["iterations"], eval_samples, c["eval_every"])
            jobs.append(dict(name=name, seed=s, key=key, dir=run_dir(out, c["module"], s, key)))
    return lines, jobs


def launch(job):
    """Run one job unless its run is stored; a stored run is never touched, an unfinished one is started over."""
    d, label = job["dir"], f"{job['name']} seed {job['seed']}"
    if stored(d, job["key"]):
        print(f"{label}: stored run reused ({rel(d)})", flush=True)
        return 0
    if (d / "run_key.json").exists():
        fail(f"{rel(d)} holds a finished run of other arguments; remove it or choose another --out")
    shutil.rmtree(d, ignore_errors=True)  # an unfinished run of these arguments
    rc = execute(d, job["key"], label, trace=False)
    if rc:
        tail = (d / "stdout.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        print(f"{label} failed (exit {rc}): {tail[0]}; its output: {rel(d / 'stdout.txt')}", file=sys.stderr)
    return rc


# ---------------------------------------------------------------------------------------------------------- report
def report(jobs, eval_samples, own_base=False):
    """The per-seed table and the summary table (markdown) of the finished jobs; raises if a seed's two runs report
    different base numbers (then their evaluations differ and the gains are not paired), unless `own_base`: two
    commands that evaluate differently by design (e.g. --mixed-precision), each gain against its own base."""
    runs = {}
    for j in jobs:
        runs.setdefault(j["seed"], {})[j["name"]] = json.loads((j["dir"] / "summary.json").read_text())
    seeds = sorted(runs)
    trained = any(abs(r[e].get("train_reward_mean", r[e]["reward_mean"]) - r[e]["reward_mean"]) > 1e-9
                  for s in seeds for r in runs[s].values() for e in ("base", "final"))
    metrics = (*METRICS, TRAINED) if trained else METRICS
    for s in seeds if not own_base else ():
        a, b = runs[s]["A"]["base"], runs[s]["B"]["base"]
        for _, k, label in metrics:
            if abs(a[k] - b[k]) > 1e-9:
                raise SystemExit(f"compare.py: error: seed {s}: A's base {label} is {a[k]:.6f}, B's {b[k]:.6f}: the "
                                 f"two commands evaluate differently (e.g. another --num-steps, --eval-num-steps or "
                                 f"prompts), so their gains are not paired; compare commands that evaluate alike "
                                 f"(or pass --own-base where they differ by design)")
    gain = {(s, n, k): runs[s][n]["final"][k] - runs[s][n]["base"][k]
            for s in seeds for n in "AB" for _, k, _ in metrics}
    head = ["seed"]
    for short, _, _ in metrics:
        head += [f"{short}: base", f"{short}: gain A", f"{short}: gain B", f"{short}: B - A"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in seeds:
        cells = [str(s)]
        for _, k, _ in metrics:
            ga, gb = gain[s, "A", k], gain[s, "B", k]
            cells += [f"{runs[s]['A']['base'][k]:.3f}", f"{ga:+.3f}", f"{gb:+.3f}", f"{gb - ga:+.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    summary = ["| metric | mean B - A | 95 % interval | P(B > A) [95 % interval] | B > A in | verdict |",
               "|---|---|---|---|---|---|"]
    for _, k, label in metrics:
        st = paired_stats([gain[s, "A", k] for s in seeds], [gain[s, "B", k] for s in seeds])
        summary.append(f"| {label} | {st['mean']:+.4f} | [{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}] | {st['p']:.2f} "
                       f"[{st['p_ci'][0]:.2f}, {st['p_ci'][1]:.2f}] | {st['wins']} of {st['n']} seeds | "
                       f"{verdict(st)} |")
    gains = ["| command | metric | mean gain | 95 % interval | gain > 0 in | verdict |", "|---|---|---|---|---|---|"]
    for n in "AB":
        for _, k, label in metrics:
            st = gain_stats([gain[s, n, k] for s in seeds])
            gains.append(f"| {n} | {label} | {st['mean']:+.4f} | [{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}] | "
                         f"{st['wins']} of {st['n']} seeds | {gain_verdict(st)} |")
    queries = {n: {runs[s][n].get("reward_queries") for s in seeds} for n in "AB"}
    sd = EVAL_SD_AT_8 * math.sqrt(8 / eval_samples)
    n_prompts = runs[seeds[0]]["A"]["base"].get("n", 0) // eval_samples
    notes = [f"Reward queries per run (summary.json): A {', '.join(map(str, sorted(queries['A'], key=str)))}, "
             f"B {', '.join(map(str, sorted(queries['B'], key=str)))}.",
             f"Held-out evaluation: {n_prompts} prompts x {eval_samples} samples, each seed's base on the same noise "
             f"({'each run against its own base (--own-base)' if own_base else 'the same base in A and B: checked'}); evaluation noise alone ~{sd:.3f} sd per strict-accuracy number "
             f"(~{EVAL_SD_AT_8} at 8 samples, measured; 1 / sqrt(samples)).",
             "Gain = final - base; intervals: 95 % percentile bootstrap over seeds resampled in pairs "
             "(scipy.stats.bootstrap, 10,000 resamples); P(B > A): rliable's probability of improvement (every pair of "
             "one A and one B run, ties 1/2)."]
    return "\n".join([*rows, "", *summary, "", *gains, "", *(textwrap.fill(n, 116) for n in notes)])


def parse_seeds(values):
    """One number = that many seeds from 0; several = those seeds."""
    if len(values) == 1:
        if values[0] < 1:
            fail(f"--seeds {values[0]}: give a count >= 1 (seeds 0 .. N-1) or a list of seeds")
        return list(range(values[0]))
    if len(set(values)) != len(values):
        fail(f"--seeds {' '.join(map(str, values))} repeats a seed")
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help='the baseline command, e.g. "advantageflow.py"')
    p.add_argument("b", help='the changed command, e.g. "advantageflow.py --gamma 0"')
    p.add_argument("--seeds", nargs="+", type=int, default=[5],
                   help="a count N (seeds 0 .. N-1) or a list of seeds (default 5)")
    p.add_argument("--budget", type=int, default=None,
                   help="reward queries per run (default: what command A makes at its own --num-iterations)")
    p.add_argument("--eval-samples-per-prompt", type=int, default=32,
                   help="held-out samples per prompt in both commands' evaluations (default 32: the evaluation alone "
                        "then has a strict-accuracy sd of ~0.01, against ~0.02 measured at the scripts' default 8)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results_compare"), help="where the runs are stored")
    p.add_argument("--own-base", action="store_true", help="the two commands evaluate differently by design (e.g. "
                   "--mixed-precision no vs bf16): each gain is taken against its own base, not checked to be equal")
    p.add_argument("--dry-run", action="store_true", help="print the commands (and which runs are stored) only")
    a = p.parse_args(argv)
    if a.budget is not None and a.budget < 1:
        fail(f"--budget {a.budget} must be >= 1")
    if a.eval_samples_per_prompt < 1 or a.workers < 1:
        fail("--eval-samples-per-prompt and --workers must be >= 1")
    seeds = parse_seeds(a.seeds)
    lines, jobs = plan(a.a, a.b, seeds, a.budget, a.eval_samples_per_prompt, Path(a.out).resolve())
    print("\n".join(lines), flush=True)
    if a.dry_run:
        print(f"commands (run from {ROOT}):")
        for j in jobs:
            cmd = shlex.join(["python", *[rel(w) for w in script_cmd(j["dir"], j["key"]["args"], trace=False)[1:]]])
            print(f"{j['name']} seed {j['seed']}{' (stored)' if stored(j['dir'], j['key']) else ''}: "
                  f"OMP_NUM_THREADS=1 {cmd}")
        return
    with ThreadPoolExecutor(a.workers) as ex:
        codes = list(ex.map(launch, jobs))
    if any(codes):
        raise SystemExit(f"compare.py: {sum(c != 0 for c in codes)} of {len(jobs)} runs failed; nothing compared")
    print(report(jobs, a.eval_samples_per_prompt, a.own_base))


if __name__ == "__main__":
    main()
