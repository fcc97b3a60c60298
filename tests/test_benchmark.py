"""benchmark/run.py: which stored runs it may reuse; the table it writes."""

import json


def test_benchmark_never_reuses_runs_of_other_code_or_arguments(tmp_path):
    """benchmark/run.py reuses a stored run only when its key (code hash + script arguments) matches exactly."""
    import run as bench

    key = dict(code=bench.code_hash("advantageflow"), args=bench.run_cmd("advantageflow", 0, 3200, 4))
    assert key["args"][:5] == ["advantageflow.py", "--seed", "0", "--num-iterations", "50"]  # 3200 / 64 per it.
    assert bench.code_hash("advantageflow") != bench.code_hash("fdfo")
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text("{}")
    assert not bench.stored(d, key)  # no key: a run of unknown provenance is never reused
    (d / "run_key.json").write_text(json.dumps(key))
    assert bench.stored(d, key)
    assert not bench.stored(d, {**key, "code": "0" * 16})  # other code state
    assert not bench.stored(d, dict(key, args=bench.run_cmd("advantageflow", 0, 6400, 4)))  # other budget
    # budget 0 (the script's defaults) leaves --num-iterations out: the same run as spelling out the default ...
    default = dict(key, args=bench.run_cmd("fdfo", 0, 0, 4))
    spelled = dict(key, args=bench.run_cmd("fdfo", 0, 100 * 32, 4))
    assert "--num-iterations" not in default["args"] and "--num-iterations" in spelled["args"]
    assert bench.effective(default["args"]) == bench.effective(spelled["args"])
    (d / "run_key.json").write_text(json.dumps(spelled))
    assert bench.stored(d, default)
    # ... but not as another value
    assert not bench.stored(d, dict(key, args=bench.run_cmd("fdfo", 0, 90 * 32, 4)))
    (d / "run_key.json").write_text(json.dumps(key))
    (d / "summary.json").unlink()
    assert not bench.stored(d, key)  # unfinished


def _fake_run(texture=None, seed=0):
    """What `collect` returns for one run, with made-up numbers; texture=None: a run stored before the metric."""
    def ev(strict, texture):
        d = dict(strict_accuracy=strict, reward_mean=strict + 0.1, clean_fraction=0.9, diversity=0.25)
        return d if texture is None else dict(d, texture=texture)

    base, final = (None, None) if texture is None else texture
    return dict(summary=dict(base=ev(0.25, base), final=ev(0.3 + 0.01 * seed, final), wall_time_s=300.0),
                curve=[(0, 0.0, 0.35), (1600, 150.0, 0.38), (3200, 300.0, 0.4)],
                perf=dict(sample=1.0, reward=0.2, train=0.5), peak_rss_mb=900, train_base=dict(strict_accuracy=0.5),
                train_final=dict(strict_accuracy=0.55))


def test_benchmark_table_has_a_texture_column(tmp_path):
    """The table's texture column is base -> final, each the mean over seeds, of the runs' held-out `texture`;
    a run stored before the metric existed shows n/a (no crash). The gain column: mean, 95 % interval, per seed."""
    import run as bench

    res = {"flow_grpo": [_fake_run((0.001, 0.1), 0), _fake_run((0.002, 0.06), 1)], "advantageflow": [_fake_run()]}
    bench.report(res, tmp_path, 3200, [0, 1], tmp_path / "docs", page="benchmark_fake")
    lines = (tmp_path / "docs" / "benchmark_fake.md").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head:head + 4]]
    assert len({len(c) for c in cells}) == 1  # header, separator and both rows: the same number of columns
    col = cells[0].index("texture: base -> final")
    rows = {c[0]: c[col] for c in cells[2:]}
    assert rows == {"flow_grpo": "0.002 -> 0.080", "advantageflow": "n/a"}, rows
    gain = {c[0]: c[3].split("(", 1)[1] for c in cells[2:]}  # held-out gains 0.05 and 0.06: mean, interval, seeds
    assert gain == {"flow_grpo": "**+0.055** [+0.050, +0.060]; +0.050, +0.060)", "advantageflow": "**+0.050**; +0.050)"}


def test_rekey_compares_every_number_the_old_code_computed():
    """benchmark/rekey.py carries runs over only when the old and new runs agree on every number the old one
    reports: a metric only the new code adds is listed, not compared; a changed or dropped number is a difference."""
    import rekey

    old = {"base": {"strict_accuracy": 0.25, "accuracy": {"colors": 0.5}}, "final": {"strict_accuracy": 0.3}}
    added = {"base": {"strict_accuracy": 0.25, "accuracy": {"colors": 0.5}, "texture": 0.001},
             "final": {"strict_accuracy": 0.3, "texture": 0.004}}
    (o, n), new_keys = rekey.common_part(old, added)
    assert o == n == old and sorted(new_keys) == ["base.texture", "final.texture"]
    changed = {"base": {"strict_accuracy": 0.25, "accuracy": {"colors": 0.53125}}, "final": {"strict_accuracy": 0.3}}
    (o, n), _ = rekey.common_part(old, changed)
    assert o != n
    dropped = {"base": {"strict_accuracy": 0.25, "accuracy": {}}, "final": {"strict_accuracy": 0.3}}
    assert rekey.common_part(dropped, old)[1] == ["base.accuracy.colors"]  # what rekey reads as removed
