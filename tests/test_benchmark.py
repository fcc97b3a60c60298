"""benchmark/run.py: which stored runs it may reuse."""

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
