"""--upload-model / --hf-entity / --wandb-entity, offline: the upload goes to a stand-in for
huggingface_hub.HfApi that resolves `allow_patterns` with huggingface_hub's own filter; nothing is pushed."""

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tyro
from huggingface_hub.utils import filter_repo_objects

from common import utils
from common.tools import hub as hub_tools

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["advantageflow", "diffusion_nft", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"]
SD35 = "stabilityai/stable-diffusion-3.5-medium"


class FakeHub:
    """whoami / create_repo / upload_folder as HfApi has them; records what would be pushed."""

    def __init__(self, user="alice", fail=None):
        self.user, self.fail, self.calls, self.pushed = user, fail, [], {}

    def whoami(self):
        self.calls.append("whoami")
        if self.user is None:
            raise AssertionError("whoami called although --hf-entity was given")
        return {"name": self.user, "type": "user"}

    def create_repo(self, repo_id, exist_ok=False):
        self.calls.append(("create_repo", repo_id, exist_ok))
        if self.fail:
            raise ConnectionError(self.fail)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id))
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        self.pushed = {f: (root / f).read_bytes() for f in filter_repo_objects(files, allow_patterns=allow_patterns)}


def run_dir_with(tmp_path, weights="lora"):
    """A finished run's directory as the scripts leave it (weights, checkpoint, events, summary, sample grid)."""
    d = tmp_path / "run"
    files = {f"{weights}/pytorch_lora_weights.safetensors" if weights == "lora" else f"{weights}/config.json": b"w",
             "checkpoint.pt": b"ckpt", "events.out.tfevents.1.host": b"ev", "samples.png": b"png"}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def write_summary(d, args):
    summary = {"base": {"n": 64, "diversity": 0.1, "reward_mean": 0.2, "strict_accuracy": 0.125,
                        "accuracy": {"colors": 0.25}, "rewards": {"pickscore": {"weight": 1.0, "mean": 21.5}}},
               "final": {"n": 64, "diversity": 0.09, "reward_mean": 0.3, "strict_accuracy": 0.25,
                         "accuracy": {"colors": 0.5}, "rewards": {"pickscore": {"weight": 1.0, "mean": 22.75}}},
               "wall_time_s": 5400.0, "reward_queries": 12345, "skipped_updates": 0, "args": vars(args)}
    (d / "summary.json").write_text(json.dumps(summary))


def test_upload_pushes_the_lora_summary_and_a_model_card(tmp_path, monkeypatch):
    mod = importlib.import_module("flow_grpo")
    args = tyro.cli(mod.Args, args=["--model", SD35, "--lora-rank", "32", "--reward", "pickscore", "--upload-model"])
    d = run_dir_with(tmp_path)
    write_summary(d, args)
    monkeypatch.setattr(sys, "argv", ["flow_grpo.py", "--model", SD35, "--reward", "pickscore", "--upload-model"])
    hub = FakeHub()
    repo = hub_tools.upload_to_hub(d, args, api=hub)
    assert repo == "alice/stable-diffusion-3.5-medium-flow_grpo-seed0"
    assert hub.calls == ["whoami", ("create_repo", repo, True), ("upload_folder", repo)]
    # the run's weights, summary, grid and card; never the optimizer checkpoint or the event files
    assert set(hub.pushed) == {"lora/pytorch_lora_weights.safetensors", "summary.json", "samples.png", "README.md"}
    card = hub.pushed["README.md"].decode()
    assert card == (d / "README.md").read_text()  # the card stays with the run as well
    assert card.startswith("---\nlibrary_name: diffusers\n") and f"base_model: {SD35}\n" in card
    assert "- flow_grpo\n" in card and "- lora\n" in card
    for row in ("| reward_mean | 0.2000 | 0.3000 |", "| strict_accuracy | 0.1250 | 0.2500 |",
                "| accuracy colors | 0.2500 | 0.5000 |", "| reward pickscore (mean) | 21.5000 | 22.7500 |",
                f"| lr | {args.lr} |", "| hf_entity | None |"):  # hyperparameters as given, not rounded
        assert row in card, row
    assert "Wall time 90.0 min, 12345 reward queries" in card
    assert "python flow_grpo.py --model stabilityai/stable-diffusion-3.5-medium --reward pickscore --upload-model" in card
    assert f'load_lora_weights("{repo}", subfolder="lora")' in card


def test_upload_full_fine_tune_entity_and_failure(tmp_path, monkeypatch):
    mod = importlib.import_module("acflow")
    args = tyro.cli(mod.Args, args=["--upload-model", "--hf-entity", "my-org", "--seed", "3"])  # embedded, rank 0
    d = run_dir_with(tmp_path, "transformer")
    write_summary(d, args)
    monkeypatch.setattr(sys, "argv", ["acflow.py", "--upload-model"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # the card's command is the torchrun one
    hub = FakeHub(user=None)  # --hf-entity given: whoami must not be needed
    assert hub_tools.upload_to_hub(d, args, api=hub) == "my-org/shapes-acflow-seed3"
    assert set(hub.pushed) == {"transformer/config.json", "summary.json", "samples.png", "README.md"}
    card = hub.pushed["README.md"].decode()
    assert "base_model:" not in card and "- lora\n" not in card and "torchrun --nproc_per_node 2 acflow.py" in card
    assert 'from_pretrained("my-org/shapes-acflow-seed3", subfolder="transformer")' in card
    # a failing hub ends the script with one line that says the run itself is complete
    with pytest.raises(SystemExit, match=r"--upload-model failed \(ConnectionError: no route\); the run itself is "
                                         r"complete in .*run"):
        hub_tools.upload_to_hub(d, args, api=FakeHub(user=None, fail="no route"))
    # without --upload-model nothing happens
    quiet = FakeHub()
    assert hub_tools.upload_to_hub(d, tyro.cli(mod.Args, args=[]), api=quiet) is None and quiet.calls == []


def test_upload_checks_before_any_model_loads(monkeypatch, capsys):
    import huggingface_hub

    mod = importlib.import_module("fdfo")

    def check(*argv):
        with pytest.raises(SystemExit) as e:
            hub_tools.check_upload(tyro.cli(mod.Args, args=["--upload-model", *argv]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        return err[0]

    assert "--upload-model needs --save-model" in check("--no-save-model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "cannot upload with HF_HUB_OFFLINE set" in check()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "needs a Hugging Face token with write access" in check()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    assert "'bad--org/shapes-fdfo-seed0' is not a valid Hugging Face repo id" in check("--hf-entity", "bad--org")
    hub_tools.check_upload(tyro.cli(mod.Args, args=["--upload-model", "--hf-entity", "my-org"]))  # passes


def test_wandb_entity_reaches_wandb_init(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: seen.update(kw)))
    mod = importlib.import_module("orw_cfm_w2")
    args = tyro.cli(mod.Args, args=["--track", "--wandb-entity", "my-team", "--wandb-project-name", "p"])
    utils.make_writer(tmp_path / "run", args).close()
    assert seen["entity"] == "my-team" and seen["project"] == "p" and seen["sync_tensorboard"] is True


@pytest.mark.parametrize("method", METHODS)
def test_every_script_has_the_flags(method):
    args = tyro.cli(importlib.import_module(method).Args, args=[])
    assert (args.upload_model, args.hf_entity, args.wandb_entity) == (False, None, None)
    src = (ROOT / f"{method}.py").read_text()
    assert src.count("r.finish(") == 1  # the run's end (common/run.py), which uploads under --upload-model
    assert "from common.tools import hub" in src  # which registers the upload with the core (utils.HOOKS)
    assert (ROOT / "common" / "run.py").read_text().count('utils.HOOKS["upload"](self.dir, a)') == 1


def test_a_real_run_ends_by_uploading(tmp_path):
    """The script's last line calls the upload with the finished run: against a hub that refuses connections the
    run completes (summary, weights, model card) and exits with the one-line upload error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: connection refused
    out = subprocess.run([sys.executable, "advantageflow.py", "--output-dir", str(tmp_path / "run"),
                          "--num-iterations", "1", "--prompts-per-iter", "2", "--group-size", "2",
                          "--train-batch-size", "2", "--eval-samples-per-prompt", "1", "--num-steps", "2",
                          "--threads", "1", "--upload-model", "--hf-entity", "alice"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("error: --upload-model failed ("), \
        out.stderr[-2000:]
    d = tmp_path / "run"
    assert (d / "summary.json").is_file() and (d / "transformer").is_dir()
    card = (d / "README.md").read_text()
    assert "# advantageflow: embedded" in card and "| reward_mean |" in card


def test_model_card_names_the_runs_pipeline_family(tmp_path):
    """A FLUX.1 run's card loads its LoRA through FluxPipeline and its full weights as FluxTransformer2DModel; an
    SD3 run's through the SD3 classes."""
    from tests.helpers.tiny_flux import build_tiny_flux
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    flux, sd3 = build_tiny_flux(tmp_path / "flux"), build_tiny_sd3(tmp_path / "sd3")
    for model, pipe, transformer in ((flux, "FluxPipeline", "FluxTransformer2DModel"),
                                     (sd3, "StableDiffusion3Pipeline", "SD3Transformer2DModel")):
        summary = {"base": {}, "final": {}, "args": {"exp_name": "acflow", "model": str(model)}}
        lora = hub_tools.model_card(summary, "alice/x", "lora", "python acflow.py")
        full = hub_tools.model_card(summary, "alice/x", "transformer", "python acflow.py")
        assert f"from diffusers import {pipe}\n" in lora and f"pipe = {pipe}.from_pretrained(" in lora
        assert f'transformer = {transformer}.from_pretrained("alice/x", subfolder="transformer")' in full
