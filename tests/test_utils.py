"""common/utils.py: the prompt sampler (groups, shards, torchrun), checkpoints, sample grids, prompts files."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import utils
from common.world import shapes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_prompt_sampler_groups_and_shards():
    prompts = [f"p{i}" for i in range(20)]
    full = utils.PromptSampler(prompts, prompts, 4, 3, seed=1)
    caps, meta, idx = full.sample(7)
    assert len(caps) == 12 and idx.view(4, 3).eq(idx.view(4, 3)[:, :1]).all()  # groups contiguous
    assert caps == [prompts[i] for i in idx]
    shards = [utils.PromptSampler(prompts, prompts, 4, 3, seed=1, rank=r, world_size=2).sample(7)[2] for r in (0, 1)]
    assert torch.equal(torch.cat(shards), idx)
    assert not torch.equal(full.sample(8)[2], idx) and torch.equal(full.sample(7)[2], idx)


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    state = {**{k: {} for k in utils.CHECKPOINT_KEYS}, "a": torch.arange(5), "rng": utils.rng_state()}
    utils.save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint.pt"]  # no temporary file left behind
    assert torch.equal(utils.load_checkpoint(tmp_path)["a"], state["a"])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        utils.load_checkpoint(tmp_path / "bad.pt")


def test_image_grid_has_captions():
    grid = utils.image_grid(torch.rand(3, 3, 32, 32), ["a red circle"] * 3, torch.tensor([0.1, 0.2, 0.3]))
    assert grid.shape == (128 + 36, 3 * 128, 3) and grid.dtype.name == "uint8"
    assert (grid[128:] != 40).any(axis=-1).sum() > 50  # text drawn in the caption strip
    big = utils.image_grid(torch.rand(2, 3, 512, 512), ["a cat"] * 2)  # SD3-size images become thumbnails
    assert big.shape == (128 + 36, 2 * 128, 3)


def rewards_to_uint8(img):
    return img.permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()


def test_sample_grid_keeps_the_base_row():
    specs = shapes.split_specs("test")
    caps = [s["caption"] for s in specs for _ in range(2)]
    base = shapes.render_batch([s for s in specs for _ in range(2)], seed=0)
    now = shapes.render_batch([s for s in specs for _ in range(2)], seed=1)
    g = utils.SampleGrid(samples_per_prompt=2, n=16)
    g.add(None, 0, base, caps, torch.zeros(len(caps)))
    g.add(None, 1, now, caps, torch.ones(len(caps)))
    restored = utils.SampleGrid(samples_per_prompt=2, n=16)
    restored.base = g.base  # a resume restores the base row (Run keeps it in checkpoints): still the base
    restored.add(None, 2, now, caps, torch.ones(len(caps)))
    assert g.grid.shape == (4 * (128 + 36), 8 * 128, 3) and (g.grid == restored.grid).all()
    first_base, first_now = g.grid[:128, :128], g.grid[164:164 + 128, :128]
    assert (first_base != first_now).any()  # row 1 base, row 2 current (different renders)
    from PIL import Image
    expected = Image.fromarray(rewards_to_uint8(base[0])).resize((128, 128), Image.NEAREST)
    assert (np.asarray(expected) == first_base).all()


def test_prompts_file_errors(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\nan octagon\n")
    with pytest.raises(SystemExit):
        utils.load_prompts(str(f))
    assert "line 3" in capsys.readouterr().err
    f.write_text("a red circle\ntwo squares\n")
    caps, meta = utils.load_prompts(str(f))
    assert caps == ["a red circle", "two squares"] and meta[1]["objects"][0]["count"] == 2


def test_torchrun_prompt_sampler_and_gathers(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import torch
from common import utils
rank, world, device = utils.setup_distributed("cpu")
s = utils.PromptSampler([f"p{{i}}" for i in range(10)], list(range(10)), 3, 4, seed=0, rank=rank, world_size=world)
caps, meta, idx = s.sample(5)
full = utils.PromptSampler([f"p{{i}}" for i in range(10)], list(range(10)), 3, 4, seed=0).sample(5)[2]
assert torch.equal(utils.all_gather_cat(idx), full)
x = torch.full((2,), float(rank))
assert utils.all_gather_cat(x).tolist() == [0.0, 0.0, 1.0, 1.0]
p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.full((3,), float(rank + 1))
utils.sync_gradients([p]); assert p.grad.tolist() == [1.5, 1.5, 1.5]
open({str(tmp_path)!r} + f"/rank{{rank}}.ok", "w").write("ok")
utils.cleanup_distributed()
""")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)],
                         capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # each rank leaves a file (two processes printing to one pipe can interleave their lines)
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


@pytest.mark.parametrize("script", ["advantageflow", "diffusion_nft", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"])
def test_help_lists_the_methods_flags_before_the_shared_ones(script, capsys):
    """`--help` reads method-first, as the file does: every flag the method's Args declares (its own and the shared
    ones it re-defaults) comes before every flag it only inherits from RunArgs; parsing is unchanged."""
    import dataclasses
    import importlib
    import re

    from common.run import RunArgs

    args_cls = importlib.import_module(script).Args
    with pytest.raises(SystemExit):
        utils.parse_args(args_cls, ["--help"])
    text = capsys.readouterr().out  # each flag starts a line of the box
    own = list(vars(args_cls)["__annotations__"])
    inherited = [f.name for f in dataclasses.fields(RunArgs) if f.name not in own]
    pos = {n: re.search(rf"^\W+--{n.replace('_', '-')}(?![\w-])", text, re.M).start() for n in own + inherited}
    assert max(pos[n] for n in own) < min(pos[n] for n in inherited), script
    assert [pos[n] for n in own] == sorted(pos[n] for n in own)  # in the file's order
    parsed = utils.parse_args(args_cls, ["--seed", "3"])
    assert parsed == dataclasses.replace(args_cls(), seed=3)
