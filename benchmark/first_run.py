"""The user's first command, timed: `python advantageflow.py --lr 1e-4` on the embedded world (2-core CPU target:
<= ~6 s per iteration, <= 15 min in all).

    python benchmark/first_run.py                       # runs it once and prints the figures
    python benchmark/first_run.py --extra --num-iterations 20

Prints wall time, seconds per iteration (sample / reward / train, from the run's perf/ scalars), the number of
iterations, and held-out strict accuracy / partial credit / extra-object rate, base -> final, from summary.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmark.run import scalars  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", default="runs/first_run")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for advantageflow.py")
    a = p.parse_args()
    out = ROOT / a.output_dir
    cmd = [sys.executable, "advantageflow.py", "--lr", "1e-4", "--output-dir", str(out), *a.extra]
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {rc}")
    summary = json.loads((out / "summary.json").read_text())
    split = {k: statistics.mean(v for st, _, v in scalars(out, f"perf/{k}_s") if st > 1) for k in ("sample", "reward", "train")}
    iters = len(scalars(out, "perf/train_s"))
    print(f"\ncommand: {' '.join(cmd[1:])}")
    print(f"wall time {wall / 60:.1f} min for {iters} iterations (summary.json: {summary['wall_time_s'] / 60:.1f} min)")
    print(f"s / iteration: {sum(split.values()):.2f} (sample {split['sample']:.2f}, reward {split['reward']:.2f}, "
          f"train {split['train']:.2f})")
    for k in ("strict_accuracy", "reward_mean", "clean_fraction"):
        print(f"held-out {k}: {summary['base'].get(k, float('nan')):.3f} -> {summary['final'].get(k, float('nan')):.3f}")


if __name__ == "__main__":
    main()
