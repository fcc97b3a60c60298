"""`python -m common.tools.evaluate` (common/tools/evaluate.py around common/evaluate.py's `evaluate_model`): the table,
--json, --grid, prompts files, GenEval's folder layout, one row per named reward, bad flags."""

import json
import os
from pathlib import Path

import pytest
import torch

from common.world import shapes
from tests.helpers import prewarmed

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_evaluate_cli(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\ntwo squares\n")
    out = prewarmed.run(["-m", "common.tools.evaluate", "--prompts-file", str(f), "--samples-per-prompt", "2",
                         "--json", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")],
                        env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "colors" in out.stdout and "overall" in out.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert {"reward_mean", "strict_accuracy", "accuracy", "diversity", "clean_fraction", "texture", "n"} <= set(res)
    assert res["n"] == 4 and 0 <= res["texture"] < 0.05  # speckled-pixel fraction (the base: ~0.001)
    assert f"clean scenes {res['clean_fraction']:.3f}   texture {res['texture']:.4f}   n = 4" in out.stdout, out.stdout
    assert (tmp_path / "g.png").stat().st_size > 100
    # GenEval JSON-lines prompts in, GenEval's folder layout out; the saved PNGs score as the run reported
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "a red circle", "tag": "colors"}\n{"tag": "counting", "prompt": "three squares"}\n')
    out = prewarmed.run(["-m", "common.tools.evaluate", "--prompts-file", str(f), "--samples-per-prompt", "3",
                         "--json", str(tmp_path / "r2.json"), "--save-images", str(tmp_path / "geneval")],
                        env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    dirs = sorted((tmp_path / "geneval").iterdir())
    assert [d.name for d in dirs] == ["00000", "00001"]
    metas = [json.loads(d.joinpath("metadata.jsonl").read_text()) for d in dirs]
    assert [(m["prompt"], m["tag"]) for m in metas] == [("a red circle", "colors"), ("three squares", "counting")]
    assert metas[1]["objects"] == shapes.parse_caption("three squares")["objects"]
    from PIL import Image
    import numpy as np
    files = [sorted((d / "samples").iterdir()) for d in dirs]
    assert [[p.name for p in fs] for fs in files] == [["0000.png", "0001.png", "0002.png"]] * 2
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
                        for fs in files for p in fs])
    assert imgs.shape == (6, 3, 32, 32)
    specs = [shapes.parse_caption(m["prompt"]) for m in metas for _ in range(3)]
    res2 = json.loads((tmp_path / "r2.json").read_text())
    assert abs(float(shapes.score(imgs, specs)[0].mean()) - res2["reward_mean"]) < 0.02
    bad = prewarmed.run(["-m", "common.tools.evaluate", "--split", "val"], env=ENV, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "unknown --split 'val'; choose from: train, test" in bad.stderr


def test_evaluate_prints_one_row_per_reward(tmp_path):
    """`--reward a,b,c`: a row of mean and std per named reward and their weighted sum, the same
    numbers in the JSON; on shapes prompts the `shapes` row is the partial credit and `shapes_strict` the strict
    accuracy, so a gold reward sits beside the trained one."""
    out = prewarmed.run(["-m", "common.tools.evaluate", "--reward",
                         "shapes,shapes_strict,jpeg_compressibility=0.1", "--samples-per-prompt", "1",
                         "--json", str(tmp_path / "r.json")], env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    r = res["rewards"]
    assert list(r) == ["shapes", "shapes_strict", "jpeg_compressibility"] and res["n"] == 32
    assert [x["weight"] for x in r.values()] == [1.0, 1.0, 0.1]
    assert r["shapes"]["mean"] == pytest.approx(res["reward_mean"], abs=1e-6)
    assert r["shapes_strict"]["mean"] == pytest.approx(res["strict_accuracy"], abs=1e-6)
    p = res["strict_accuracy"]  # a 0/1 reward's sample std follows from its mean
    assert r["shapes_strict"]["std"] == pytest.approx((p * (1 - p) * 32 / 31) ** 0.5, abs=1e-5)
    assert r["jpeg_compressibility"]["mean"] < 0 < r["jpeg_compressibility"]["std"]
    weighted = r["shapes"]["mean"] + r["shapes_strict"]["mean"] + 0.1 * r["jpeg_compressibility"]["mean"]
    assert res["train_reward_mean"] == pytest.approx(weighted, abs=1e-5)
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[-5:]}
    assert list(rows) == ["reward", "shapes", "shapes_strict", "jpeg_compressibility", "weighted"], out.stdout
    for name, x in r.items():
        assert rows[name] == [f"{x['weight']:.3g}", f"{x['mean']:.4f}", f"{x['std']:.4f}"], out.stdout
    assert rows["weighted"] == ["sum", f"{res['train_reward_mean']:.4f}"]


def test_sharded_full_finetune_loads(tmp_path):
    """A full fine-tuning save that `save_pretrained` split into shards (it does past 10 GB: SD3.5-M in fp32, FLUX)
    loads as the single-file one does: the same weights, from the index's shards."""
    from common import models
    from common.tools import evaluate

    m = models.load_model("embedded", "cpu")
    with torch.no_grad():
        for p in m.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))  # something other than the base
    m.transformer.save_pretrained(tmp_path / "transformer", max_shard_size="2MB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    assert evaluate.finetuned_weights(tmp_path) == ("transformer", tmp_path / "transformer")
    fresh = models.load_model("embedded", "cpu")
    loaded = evaluate.load_finetuned(fresh, tmp_path).state_dict()
    for k, v in m.transformer.state_dict().items():
        assert torch.equal(loaded[k], v), k
