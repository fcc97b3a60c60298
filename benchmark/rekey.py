"""Carry stored benchmark runs over a change of code that does not change what a CPU run computes.

    python benchmark/rekey.py --old <commit>                  # every method, results in benchmark/results
    python benchmark/rekey.py --old HEAD~3 --methods acflow --iterations 41
    python benchmark/rekey.py --old HEAD~1 --out benchmark/results benchmark/results_defaults

benchmark/run.py keys every stored run by the hash of its code (the method file, common/, benchmark/trace.py) and
re-runs it after any change there, even one that only moves code. This script checks that the change is
numerically invisible before it carries the runs over: for each method it runs the same short training
(`--seed 0 --num-iterations N --threads 1`, evaluated at the end) in a checkout of the old commit and in this one,
and compares the two runs' summary.json (wall time excluded; a metric only the new code reports is listed, not
compared) and the bytes of the saved weights; the held-out
evaluation of the base (`common.tools.evaluate --split train`) is compared the same way. Only where everything is
equal are the stored runs keyed to the old code (run_key.json under <out>/<method>/seed*, and the cached base
evaluations under <out>/base_train) re-keyed to the new one; every other run is left for benchmark/run.py to
redo. What this cannot see: a difference that first appears after N iterations (choose N past the first epoch
of ORW-CFM-W2 / AC-Flow, 20 iterations, as the default does) or only on another thread count. Cost and scaling
runs (timings) are never carried over. `--old-args` checks a change of a method's defaults instead (the old code
run with the new defaults spelled out against the new code's defaults) and re-keys nothing: runs made with those
flags are the new defaults' runs only once the check passes.
"""

import argparse
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
METHODS = ("advantageflow", "diffusion_nft", "flow_grpo", "orw_cfm_w2", "acflow", "fdfo")  # benchmark/run.py's


def code_hash(tree, method):
    """benchmark/run.py's code_hash as that checkout computes it."""
    return runpy.run_path(str(tree / "benchmark" / "run.py"), run_name="rekey")["code_hash"](method)


def fingerprint(tree, cmd, out):
    """Run `cmd` in `tree`; -> (summary without wall time or paths, sha256 of every saved weight file)."""
    subprocess.run([sys.executable, *cmd], cwd=tree, env=ENV, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    if out.is_dir():
        summary = json.loads((out / "summary.json").read_text())
        summary.pop("wall_time_s", None)
        summary.pop("args", None)  # holds the output directory
        weights = {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
                   for f in sorted(out.rglob("*.safetensors"))}
        return summary, weights
    return json.loads(out.read_text()), {}


def common_part(old, new, path=""):
    """(old and new restricted to the entries both have, the entries only the new one has): a metric the new code
    adds does not hide that every number the old code computed is unchanged."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return (old, new), []
    pairs, added = {}, [f"{path}{k}" for k in new if k not in old]
    for k in old.keys() & new.keys():
        pairs[k], more = common_part(old[k], new[k], f"{path}{k}.")
        added += more
    return ({k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}), added


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit whose stored runs to carry over")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--iterations", type=int, default=24, help="length of the comparison runs")
    p.add_argument("--old-args", nargs=argparse.REMAINDER, default=[],
                   help="flags for the old code's runs (last on the line): a change of defaults, spelled out in the "
                        "old code, e.g. --old-args --num-iterations 200 (then give --methods the one method)")
    p.add_argument("--out", nargs="+", default=[str(ROOT / "benchmark" / "results")],
                   help="results directories whose stored runs to re-key (one comparison serves them all)")
    a = p.parse_args()
    outs = [Path(o) for o in a.out]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), a.old], cwd=ROOT, check=True)
        try:
            for method in [None, *a.methods]:
                prints = []
                for name, tree in (("old", old_tree), ("new", ROOT)):
                    if method is None:  # the base's train-prompt evaluation (benchmark/run.py's train_eval)
                        dest = tmp / f"base_{name}.json"
                        cmd = ["-m", "common.tools.evaluate", "--split", "train", "--samples-per-prompt", "1",
                               "--json", str(dest)]
                    else:
                        dest = tmp / f"{method}_{name}"
                        cmd = [f"{method}.py", "--seed", "0", *(a.old_args if name == "old" else []),
                               "--num-iterations", str(a.iterations), "--eval-every", str(a.iterations), "--threads",
                               "1", "--eval-samples-per-prompt", "2", "--output-dir", str(dest)]
                    prints.append(fingerprint(tree, cmd, dest))
                old, new = code_hash(old_tree, method), code_hash(ROOT, method)
                label = method or "base evaluation"
                (old_summary, new_summary), added = common_part(prints[0][0], prints[1][0])
                removed = common_part(prints[1][0], prints[0][0])[1]
                note = f" (the new code adds {', '.join(sorted(added))})" if added else ""
                if (old_summary, prints[0][1]) != (new_summary, prints[1][1]) or removed:
                    print(f"{label}: the old and new code compute different numbers; its runs stay keyed to {old}")
                    continue
                if method is None:
                    for out in outs:
                        for cache in ("base_train", "base_heldout"):  # benchmark/run.py's cached base evaluations
                            src, dst = out / cache / old[:8], out / cache / new[:8]
                            if src.is_dir() and src != dst:
                                shutil.copytree(src, dst, dirs_exist_ok=True)
                    print(f"base evaluation: identical{note}; cached base evaluations {old[:8]} -> {new[:8]}")
                    continue
                moved = 0
                for f in sorted(f for out in outs for f in (out / method).glob("seed*/run_key.json")):
                    key = json.loads(f.read_text())
                    if key.get("code") == old and not a.old_args:
                        f.write_text(json.dumps({**key, "code": new}))
                        moved += 1
                print(f"{method}: identical after {a.iterations} iterations (summary and weights){note}; "
                      f"{moved} stored run(s) re-keyed {old} -> {new}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
