"""benchmark/compare.py: the paired statistics, the equal-queries arithmetic, bad commands, and one tiny comparison
end to end (its table, and its runs reused when it is run again)."""

import json
import math
import time
from itertools import product
from types import SimpleNamespace

import numpy as np
import pytest


def test_paired_statistics_against_a_direct_computation():
    """Mean difference, P(B > A) over every pair of runs (ties 1/2) and a win count, each computed by hand; the
    interval holds the mean and lies inside the range of the differences."""
    import compare

    a, b = np.array([0.10, 0.20, 0.30, 0.40]), np.array([0.15, 0.20, 0.25, 0.60])
    s = compare.paired_stats(a, b)
    d = b - a  # +0.05, 0, -0.05, +0.2
    assert math.isclose(s["mean"], 0.05) and s["wins"] == 2 and s["n"] == 4
    # pairs (a_j, b_i): b=0.15 beats a=0.10; b=0.20 beats 0.10, ties 0.20; b=0.25 beats 0.10, 0.20; b=0.60 beats all
    assert math.isclose(s["p"], (1 + 1.5 + 2 + 4) / 16)
    by_hand = np.mean([(np.sign(y - x) + 1) / 2 for x, y in product(a, b)])
    assert math.isclose(s["p"], by_hand)
    lo, hi = s["ci"]
    assert d.min() <= lo <= s["mean"] <= hi <= d.max()
    idx = np.random.default_rng(1).integers(0, len(d), (20_000, len(d)))  # seeds resampled with replacement
    lo2, hi2 = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    assert abs(lo - lo2) <= 0.0126 and abs(hi - hi2) <= 0.0126, (lo, hi, lo2, hi2)  # one step of the 4-seed grid
    assert 0 <= s["p_ci"][0] <= s["p"] <= s["p_ci"][1] <= 1
    assert compare.paired_stats(a, b) == s  # a fixed resampling seed: the same printed numbers every time


def test_gain_statistics_against_a_direct_computation():
    """One command's mean gain, its interval (against resampling the seeds by hand) and its positive-seed count."""
    import compare

    g = np.array([0.04, -0.01, 0.06, 0.03, 0.05])
    s = compare.gain_stats(g)
    assert math.isclose(s["mean"], 0.034) and s["wins"] == 4 and s["n"] == 5
    idx = np.random.default_rng(1).integers(0, len(g), (20_000, len(g)))
    lo2, hi2 = np.percentile(g[idx].mean(axis=1), [2.5, 97.5])
    assert g.min() <= s["ci"][0] <= s["mean"] <= s["ci"][1] <= g.max()
    assert abs(s["ci"][0] - lo2) <= 0.004 and abs(s["ci"][1] - hi2) <= 0.004, (s["ci"], lo2, hi2)
    assert s["ci"][0] > 0  # every resampled mean of these gains is positive except all -0.01: (1/5)^5
    assert math.isnan(compare.gain_stats([0.1])["ci"][0])


def test_interval_shrinks_with_seeds_and_decides():
    """The same effect (+0.02, differences with sd 0.03) is not decidable at 4 seeds and decided at 64; the
    interval narrows as ~1/sqrt(seeds); the seed estimate is (1.96 sd / mean)^2."""
    import compare

    rng = np.random.default_rng(0)
    widths = {}
    for n in (4, 16, 64):
        a = rng.normal(0.04, 0.02, n)
        noise = rng.normal(0, 1, n)
        b = a + 0.02 + 0.03 * (noise - noise.mean()) / noise.std(ddof=1)  # mean difference exactly 0.02, sd 0.03
        s = compare.paired_stats(a, b)
        assert math.isclose(s["mean"], 0.02) and math.isclose(s["sd"], 0.03)
        widths[n] = s["ci"][1] - s["ci"][0]
        v = compare.verdict(s)
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
        if n == 4:
            assert s["ci"][0] < 0 < s["ci"][1] and v.startswith("not decidable at 4 seeds"), v
            assert f"~{math.ceil((1.96 * 0.03 / 0.02) ** 2)} seeds" in v, v  # 9
        if n == 64:
            assert s["ci"][0] > 0 and v.startswith("B > A at 64 seeds"), v
    assert widths[4] > widths[16] > widths[64] and 1.5 < widths[16] / widths[64] < 2.7, widths
    assert compare.verdict(compare.paired_stats([0.1], [0.2])) == "one seed: no interval"
    assert compare.seeds_needed(0.0, 0.03) is None


def test_equal_queries_for_methods_with_different_batches():
    """Iterations per command so that both make the budget's reward queries, counted as the scripts count them:
    one batch per iteration, or ceil(epoch_iters / pool_reuse) batches at the start of each epoch."""
    import compare

    plain = SimpleNamespace(prompts_per_iter=2, group_size=4, num_iterations=50)  # 8 queries per iteration
    epochs = SimpleNamespace(prompts_per_iter=2, group_size=3, epoch_iters=4, pool_reuse=2,
                             num_iterations=10)  # 2 batches of 6 = 12 queries per 4-iteration epoch
    assert compare.equal_queries(48, plain) == (6, 48)
    assert compare.equal_queries(48, epochs) == (16, 48)  # 4 whole epochs
    assert compare.default_queries(epochs) == 36  # 10 iterations start 3 epochs
    assert compare.equal_queries(40, plain) == (5, 40)
    assert compare.equal_queries(40, epochs) == (12, 36)  # 40 / 12 = 3.3 epochs: the nearest whole number, 3
    assert compare.equal_queries(42, epochs) == (12, 36)  # 3.5: ties to fewer
    assert compare.equal_queries(1, plain) == (1, 8)  # at least one


@pytest.mark.parametrize("cmd_a, cmd_b, msg", [
    ("advantagflow.py", "advantageflow.py", "command A: no method script 'advantagflow.py'"),
    ("advantageflow.py", "advantageflow.py --gama 0", "command B ('advantageflow.py --gama 0'): Unrecognized"),
    ("advantageflow.py", "orw_cfm_w2.py --epoch-iters 0", "--epoch-iters 0 must be >= 1"),
    ("advantageflow.py --seed 3", "advantageflow.py", "command A sets --seed"),
])
def test_bad_commands_fail_in_one_line_before_anything_runs(tmp_path, capfd, cmd_a, cmd_b, msg):
    import compare

    with pytest.raises(SystemExit) as e:
        compare.main([cmd_a, cmd_b, "--seeds", "2", "--out", str(tmp_path)])
    err = capfd.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("compare.py: error: ") and msg in err[0], err
    assert not any(tmp_path.iterdir())


def test_runs_of_a_seed_with_different_bases_are_refused(tmp_path):
    """A seed's two runs must report the same base (the same evaluation on the same noise): else one error."""
    import compare

    jobs = []
    for name, base in (("A", 0.25), ("B", 0.28125)):
        d = tmp_path / name
        d.mkdir()
        ev = lambda x: dict(strict_accuracy=x, reward_mean=x + 0.1, n=32)  # noqa: E731
        (d / "summary.json").write_text(json.dumps(dict(base=ev(base), final=ev(base + 0.03), reward_queries=8)))
        jobs.append(dict(name=name, seed=0, dir=d))
    with pytest.raises(SystemExit, match="seed 0: A's base strict accuracy is 0.250000, B's 0.281250"):
        compare.report(jobs, 1)
    (tmp_path / "B" / "summary.json").write_text((tmp_path / "A" / "summary.json").read_text())
    out = compare.report(jobs, 1)
    assert "| 0 | 0.250 | +0.030 | +0.030 | +0.000 |" in out
    assert "| A | strict accuracy | +0.0300 | [+nan, +nan] | 1 of 1 seeds | one seed: no interval |" in out, out
    assert "trained reward" not in out  # the trained reward is the scene scorer's partial credit: two metrics
    for name, gain in (("A", 0.05), ("B", 0.02)):  # trained on another reward (e.g. JPEG): its gain is a third metric
        d = json.loads((tmp_path / name / "summary.json").read_text())
        d["base"]["train_reward_mean"], d["final"]["train_reward_mean"] = -1.13, -1.13 + gain
        (tmp_path / name / "summary.json").write_text(json.dumps(d))
    out = compare.report(jobs, 1)
    assert "| 0 | 0.250 | +0.030 | +0.030 | +0.000 | 0.350 | +0.030 | +0.030 | +0.000 | -1.130 | +0.050 | +0.020 | -0.030 |" in out, out
    assert "| trained reward | -0.0300 |" in out and "| B | trained reward | +0.0200 |" in out, out


TINY = "--prompts-per-iter 2 --group-size 2 --train-batch-size 2 --num-steps 3"
ORW = f"orw_cfm_w2.py {TINY} --epoch-iters 1 --pool-reuse 1 --w2-eval-samples 4 --warmup-iters 1"


@pytest.mark.slow  # ~20-50 s: in the full suite, not the fast tier
def test_compare_end_to_end_and_reuses_stored_runs(tmp_path, capsys):
    """Two tiny commands, 2 seeds: the dry run lists the 4 commands; the run prints a per-seed table whose B - A is
    gain B - gain A, and a summary row per metric; run again, it reuses the 4 stored runs (no new run directory)."""
    import compare

    args = [ORW, f"advantageflow.py {TINY}", "--seeds", "0", "1", "--budget", "8", "--eval-samples-per-prompt", "1",
            "--workers", "1", "--out", str(tmp_path)]
    compare.main([*args, "--dry-run"])
    cmds = [line for line in capsys.readouterr().out.splitlines() if "OMP_NUM_THREADS=1 python" in line]
    assert len(cmds) == 4 and not any(tmp_path.iterdir()), cmds
    assert "--seed 1 --num-iterations 2 --eval-every 2 --eval-samples-per-prompt 1 --threads 1" in cmds[-1], cmds
    compare.main(args)
    first = capsys.readouterr().out
    dirs = sorted(tmp_path.glob("*/seed*"))
    assert len(dirs) == 4 and first.count(": exit 0 after") == 4, first
    lines = first.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| seed |")))
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))) for line in lines[head + 2:head + 4]]
    assert [r["seed"] for r in rows] == ["0", "1"]
    for r in rows:
        for m in ("strict", "partial"):
            diff = float(r[f"{m}: gain B"]) - float(r[f"{m}: gain A"])
            assert abs(float(r[f"{m}: B - A"]) - diff) <= 0.0011
    summary = [line for line in lines if line.startswith(("| strict accuracy |", "| partial credit |"))]
    assert len(summary) == 2 and all(len(line.strip("|").split("|")) == 6 for line in summary), summary
    assert "Reward queries per run (summary.json): A 8, B 8." in first
    t = time.time()
    compare.main(args)
    again = capsys.readouterr().out
    assert again.count("stored run reused") == 4 and ": exit" not in again, again
    assert sorted(tmp_path.glob("*/seed*")) == dirs and time.time() - t < 10
    assert again[again.index("| seed |"):] == first[first.index("| seed |"):]
