"""ORW-CFM-W2's main claim as a figure: the W2 coefficient alpha trades reward for closeness to the base model and
for diversity. Reads finished runs (their summary.json) and plots final held-out reward against the W2 bound to the
base (`w2_integral`, paper Thm. 3 without its e^{2L}) and against diversity, one point per run, labelled by alpha.

    python orw_cfm_w2.py --alpha 0 --output-dir runs/a0     # ... and --alpha 0.3, 1, 3
    python benchmark/alpha_tradeoff.py runs/a0 runs/a0.3 runs/a1 runs/a3 --out docs/img/orw_alpha_tradeoff.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("runs", nargs="+", help="run directories of orw_cfm_w2.py")
p.add_argument("--out", default="alpha_tradeoff.png")
a = p.parse_args()

rows = []
for run in a.runs:
    f = Path(run) / "summary.json"
    if not f.is_file():
        raise SystemExit(f"error: {str(f)!r} does not exist (a finished orw_cfm_w2.py run directory is expected)")
    s = json.loads(f.read_text())
    rows.append((s["args"]["alpha"], s["base"], s["final"]))
rows.sort(key=lambda r: r[0])
base = rows[0][1]
print("alpha | held-out partial | strict | W2 bound | W2 coupling | diversity | texture")
print(f"base  | {base['reward_mean']:.3f} | {base['strict_accuracy']:.3f} | 0 | 0 | {base['diversity']:.3f} | "
      f"{base.get('texture', float('nan')):.4f}")
for alpha, _, f in rows:
    print(f"{alpha:<5g} | {f['reward_mean']:.3f} | {f['strict_accuracy']:.3f} | {f['w2_integral']:.4f} | "
          f"{f['w2_coupling']:.4f} | {f['diversity']:.3f} | {f.get('texture', float('nan')):.4f}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
for ax, key, label in ((axes[0], "w2_integral", "W2 bound to the base (per element)"),
                       (axes[1], "diversity", "diversity (pairwise RMS distance)")):
    xs = [0.0 if key == "w2_integral" else base[key]] + [f[key] for _, _, f in rows]
    ys = [base["reward_mean"]] + [f["reward_mean"] for _, _, f in rows]
    ax.plot(xs[1:], ys[1:], "o-")
    ax.plot(xs[:1], ys[:1], "k*", markersize=10, label="base")
    for (alpha, _, _), x, y in zip(rows, xs[1:], ys[1:]):
        ax.annotate(f"alpha {alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out partial credit")
    ax.legend(loc="best", fontsize=8)
fig.tight_layout()
fig.savefig(a.out, dpi=110)
print(f"wrote {a.out}")
