"""Upload a finished run to the Hugging Face Hub (--upload-model): the CleanRL-style repo name, the checks made
before any model loads, and the model card written from summary.json. A run finished without --upload-model:

    python -m common.tools.hub --run-dir runs/<run> [--hf-entity ORG]
"""

import json
import contextlib
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from common import models, utils

def hub_repo_name(args):
    """CleanRL-style model repo name: {task}-{exp_name}-seed{seed} (task: shapes or the base model's name)."""
    task = "shapes" if args.model == models.EMBEDDED else Path(args.model.rstrip("/")).name
    return f"{task}-{args.exp_name}-seed{args.seed}"


def check_upload(args):
    """--upload-model: fail before any model loads if the upload could not happen at the end of the run."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not args.save_model:
        utils.fail("--upload-model needs --save-model (it uploads the saved lora/ or transformer/); drop --no-save-model")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        utils.fail("--upload-model cannot upload with HF_HUB_OFFLINE set; unset it (or drop --upload-model)")
    if huggingface_hub.get_token() is None:
        utils.fail("--upload-model needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN")
    repo_id = f"{args.hf_entity or 'user'}/{hub_repo_name(args)}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        utils.fail(f"--hf-entity / model repo {repo_id!r} is not a valid Hugging Face repo id ({str(e).splitlines()[0]})")


def _cell(v, digits=None):
    """A markdown table cell, '|' escaped; floats rounded to `digits` decimals if given."""
    return (f"{v:.{digits}f}" if digits is not None and isinstance(v, float) else str(v)).replace("|", "\\|")


def model_card(summary, repo_id, weights, command):
    """README.md of an uploaded run, from its summary.json: what was trained from what, held-out base -> final
    metrics, wall time, reward queries, the command line and every hyperparameter."""
    a = summary.get("args", {})
    method, model = a.get("exp_name", "cleanflow"), a.get("model", models.EMBEDDED)
    embedded = model == models.EMBEDDED
    base = "the cleanflow embedded shapes base (common/world/assets)" if embedded else f"`{model}`"
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if not embedded and not os.path.exists(model):  # a hub id, not a local path
        front.append(f"base_model: {model}")
    front += ["tags:", *[f"- {t}" for t in ("cleanflow", method, "reinforcement-learning", "flow-matching",
                                            "text-to-image", *(["lora"] if weights == "lora" else []))], "---", ""]
    b, f = summary.get("base", {}), summary.get("final", {})
    rows = [k for k in ("reward_mean", "train_reward_mean", "strict_accuracy", "clean_fraction", "texture",
                        "diversity", "n") if k in f]
    table = ["| held-out metric | base | final |", "|---|---|---|"]
    table += [f"| {k} | {_cell(b.get(k, ''), 4)} | {_cell(f[k], 4)} |" for k in rows]
    table += [f"| accuracy {c} | {_cell(b.get('accuracy', {}).get(c, ''), 4)} | {_cell(v, 4)} |"
              for c, v in f.get("accuracy", {}).items()]
    table += [f"| reward {n} (mean) | {_cell(b.get('rewards', {}).get(n, {}).get('mean', ''), 4)} | "
              f"{_cell(r['mean'], 4)} |" for n, r in f.get("rewards", {}).items()]
    pipe, transformer = "StableDiffusion3Pipeline", "SD3Transformer2DModel"
    if not embedded:  # the family of the run's model (FLUX.1 or SD3; SD3 where its folder cannot be read here)
        from common import pipelines

        with contextlib.suppress(SystemExit):
            pipe = pipelines.check_available(model)
        transformer = {"FluxPipeline": "FluxTransformer2DModel"}.get(pipe, transformer)
    if weights == "lora" and embedded:
        use = ["```bash", f"hf download {repo_id} --local-dir {method}-run",
               f"python -m common.tools.evaluate --checkpoint {method}-run   # in a cleanflow checkout", "```"]
    elif weights == "lora":
        use = ["```python", "import torch", f"from diffusers import {pipe}", "",
               f'pipe = {pipe}.from_pretrained("{model}", torch_dtype=torch.bfloat16).to("cuda")',
               f'pipe.load_lora_weights("{repo_id}", subfolder="lora")', "```"]
    else:
        use = ["```python", f"from diffusers import {transformer}", "",
               f'transformer = {transformer}.from_pretrained("{repo_id}", subfolder="transformer")', "```",
               "(the full fine-tuned transformer; with the embedded base: `hf download` the repo and run "
               "`python -m common.tools.evaluate --checkpoint <dir>` in a cleanflow checkout)"]
    minutes = summary.get("wall_time_s", 0) / 60
    return "\n".join([
        *front, f"# {method}: {model}, fine-tuned with reward `{a.get('reward', '?')}`", "",
        f"Trained with `{method}.py` of cleanflow (single-file RL fine-tuning of flow-matching text-to-image models) "
        f"from {base}. The repository holds the run's `{weights}/` (diffusers format), "
        "`summary.json` and, when written, `samples.png` (base beside fine-tuned on the same noise).", "",
        "## Held-out evaluation, base -> final", "", *table, "",
        f"Wall time {minutes:.1f} min, {summary.get('reward_queries', '?')} reward queries, "
        f"{summary.get('skipped_updates', 0)} skipped updates.", "",
        "## Use", "", *use, "", "## Command", "", "```bash", command, "```", "",
        "## Hyperparameters", "", "| param | value |", "|---|---|",
        *[f"| {k} | {_cell(v)} |" for k, v in a.items()], ""])


def upload_to_hub(run_dir, args, api=None):
    """--upload-model (rank 0, end of a run): push the saved lora/ (or transformer/), summary.json, samples.png and
    a model card README.md (also written to run_dir) to the model repo {--hf-entity}/{hub_repo_name}, created if
    needed. `api`: a huggingface_hub.HfApi (default) or a stand-in with whoami / create_repo / upload_folder.
    Returns the repo id (None without --upload-model)."""
    if not getattr(args, "upload_model", False):
        return None
    import shlex

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    run_dir = Path(run_dir)
    weights = "lora" if args.lora_rank > 0 else "transformer"
    world = utils.world_size_from_env()
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    command = " ".join([launcher, Path(sys.argv[0]).name, *map(shlex.quote, sys.argv[1:])])
    try:
        repo_id = f"{args.hf_entity or api.whoami()['name']}/{hub_repo_name(args)}"
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "README.md").write_text(model_card(summary, repo_id, weights, command), encoding="utf-8")
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), commit_message=f"{args.exp_name}: {run_dir.name}",
                          allow_patterns=[f"{weights}/*", "summary.json", "samples.png", "README.md"])
    except Exception as e:
        why = (str(e).splitlines() or [""])[0][:200]
        raise SystemExit(f"error: --upload-model failed ({type(e).__name__}: {why}); the run itself is complete in "
                         f"{run_dir}") from e
    print(f"uploaded {weights}/, summary.json and a model card to {url}")
    return repo_id


utils.HOOKS.update(check_upload=check_upload, upload=upload_to_hub)  # what --upload-model runs


@dataclass
class Args:
    run_dir: str
    """a finished run's directory: its summary.json and lora/ (or transformer/)"""
    hf_entity: str | None = None
    """user or organisation of the model repo (default: the run's --hf-entity, else your account)"""


def main(a: Args):
    """Upload a finished run (the checks of --upload-model first, one line each)."""
    summary = Path(a.run_dir) / "summary.json"
    if not summary.is_file():
        utils.fail(f"--run-dir {a.run_dir!r} holds no summary.json: not a finished run")
    try:
        saved = json.loads(summary.read_text(encoding="utf-8"))["args"]
    except (ValueError, KeyError, TypeError) as e:
        utils.fail(f"{summary} is damaged ({utils.why(e)})")
    args = types.SimpleNamespace(**{**saved, "upload_model": True, "save_model": True,
                                    "hf_entity": a.hf_entity or saved.get("hf_entity")})
    weights = "lora" if args.lora_rank > 0 else "transformer"
    if not (Path(a.run_dir) / weights).is_dir():
        utils.fail(f"--run-dir {a.run_dir!r} holds no {weights}/ (the run was saved with --no-save-model)")
    check_upload(args)
    upload_to_hub(a.run_dir, args)


if __name__ == "__main__":
    main(utils.parse_args(Args))
