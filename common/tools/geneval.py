"""GenEval of a base model or a fine-tuned run, scored by a GenEval reward server: the benchmark's own numbers.

    python -m common.tools.prompts --sets geneval_bench     # once: prompts/geneval_bench_test.jsonl, the 553 prompts
    python -m common.tools.geneval --checkpoint runs/<run> --server http://127.0.0.1:18085   # SD3.5-M + the run
    python -m common.tools.geneval --model /path/to/stable-diffusion-3.5-medium --json base.json   # the base model
    torchrun --nproc_per_node 8 -m common.tools.geneval --checkpoint runs/<run>   # 8 GPUs share the prompts

Generates --samples-per-prompt (4) images per prompt with --num-steps 40 and CFG --guidance-scale 4.5 at 512 px
with T5, as Flow-GRPO evaluates SD3.5-M (config/grpo.py, train_sd3.py `eval`), through common.tools.evaluate's
code (its flag checks, `load_finetuned` and common.evaluate `evaluate_model`: same loading, paired noise,
sharding), and sends each batch with its prompts' GenEval metadata to the server (yifan123/reward-server
app_geneval.py; Flow-GRPO's protocol, common.reward_models.RemoteReward) with "only_strict": False, so that the
server also runs GenEval's own check. Reported from the server's answers (gen_eval.py `compute_geneval`'s lists):

    overall          GenEval's score: the mean over tags of each tag's accuracy (djghosh13/geneval
                     evaluation/summary_scores.py), a tag's accuracy being the mean of the server's
                     "group_rewards"[tag] without its -10 entries (the other tags' images), as Flow-GRPO's `eval`
                     logs eval_reward_<tag>_accuracy
    per_tag          those accuracies; per_tag_strict and strict_overall the same from "group_strict_rewards"
    accuracy         mean of "rewards" (GenEval's correct) over images; strict_accuracy: of "strict_rewards"
                     (exact counts; Flow-GRPO's eval_reward_strict_accuracy and its training reward)
    score            mean of "scores", the server's partial credit (Flow-GRPO's eval_reward_geneval)
    correct_prompts  prompts with at least one correct image (GenEval's "% correct prompts")

printed as a table and written to --json. --server takes the `remote:<url>` reward's query options (retries,
timeout, backoff; e.g. http://127.0.0.1:18085?retries=10). The server sees JPEGs (quality 75, as Flow-GRPO's client
sends them); --save-images DIR also writes the PNGs in GenEval's layout for GenEval's own evaluate_images.py.
Flags, prompts file and the server's port are checked before any model loads (one line naming the bad value).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.reward_models import remote
from common.tools import evaluate

# GenEval's tags: gen_eval.py `compute_geneval`'s required_keys, the group fields' keys
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FIELDS = ("scores", "rewards", "strict_rewards")  # one number per image
GROUPS = ("group_rewards", "group_strict_rewards")  # {tag: one number per image, -10 for an image of another tag}
OTHER_TAG = -10.0
# flags passed to common.tools.evaluate's checks
SHARED = ("checkpoint", "model", "resolution", "use_t5", "max_t5_length", "mixed_precision", "batch_size",
          "decode_batch_size", "samples_per_prompt", "seed", "guidance_scale", "num_steps", "json", "save_images",
          "device")


@dataclass
class Args:
    checkpoint: str | None = None
    """a method's run directory, its lora/ or transformer/ directory (None: the base model)"""
    model: str = "stabilityai/stable-diffusion-3.5-medium"
    """'embedded' or a diffusers SD3 id (in the local Hugging Face cache) / local path"""
    server: str = "http://127.0.0.1:18085"
    """the GenEval reward server, options in the query, e.g. http://127.0.0.1:18085?retries=10&timeout=300"""
    prompts: str = "prompts/geneval_bench_test.jsonl"
    """GenEval's JSON-lines metadata (`python -m common.tools.prompts --sets geneval_bench` writes its 553 prompts)"""
    samples_per_prompt: int = 4
    num_steps: int = 40
    guidance_scale: float = 4.5
    resolution: int = 512
    use_t5: bool = True
    """SD3: load the T5 text encoder, as Flow-GRPO trains and evaluates (--no-use-t5 for a run trained without)"""
    max_t5_length: int = 128
    mixed_precision: str | None = None
    """no | bf16 | fp16: weights in this dtype, forward under autocast (None: bf16 where the device has it, else no)"""
    seed: int = 0
    batch_size: int = 128
    """images generated at once (sent to the server 64 at a time, as Flow-GRPO's client)"""
    decode_batch_size: int = 16
    """images the VAE decodes at once"""
    json: str = "geneval.json"
    """write the numbers here"""
    save_images: str | None = None
    """also write every sample in GenEval's layout: DIR/<5-digit prompt>/metadata.jsonl and samples/<4-digit>.png"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda:N"""


def read_prompts(path):
    """GenEval's JSON-lines metadata -> (captions, records). One line and exit 2 naming a bad line."""
    from common import utils

    if not os.path.isfile(path):
        utils.fail(f"--prompts {path!r} does not exist; `python -m common.tools.prompts --sets geneval_bench` "
                   "writes GenEval's 553 prompts to prompts/geneval_bench_test.jsonl")
    from common.tools.prompts import jsonl_records, read_text

    records = []
    for i, r in jsonl_records(read_text(path, "--prompts"), path):
        if r.get("tag") not in TAGS:
            utils.fail(f"{path} line {i}: tag {r.get('tag')!r} is not GenEval's; choose from: {', '.join(TAGS)}")
        include = r.get("include")
        if not (isinstance(include, list) and include and all(
                isinstance(q, dict) and isinstance(q.get("class"), str) and isinstance(q.get("count"), int)
                and q["count"] > 0 for q in include)):
            utils.fail(f"{path} line {i}: \"include\" must list the objects GenEval looks for, each a \"class\" "
                       f"and a \"count\" >= 1; got {include!r}")
        records.append(r)
    if not records:
        utils.fail(f"--prompts {path!r} holds no prompts")
    return [r["prompt"] for r in records], records


def check_args(a):
    """The server URL, the prompts, common.tools.evaluate's checks of the shared flags, then the server's port: one
    line and exit 2 on a bad one, before any model loads. Returns (captions, records, server URL, its options)."""
    from common import utils

    try:
        url, options = remote.remote_server(a.server, f"--server {a.server!r}")
    except ValueError as e:
        utils.fail(str(e))
    captions, records = read_prompts(a.prompts)
    evaluate.check_args(evaluate.Args(**{f: getattr(a, f) for f in SHARED}))
    try:
        remote.check_server(url)
    except ConnectionError as e:
        utils.fail(f"--server: {e}; start GenEval's reward server (yifan123/reward-server) or pass its URL")
    return captions, records, url, options


def split_answer(answer, metadata, url):
    """The server's answer for len(metadata) images -> one dict per image: score, correct, strict_correct and, for
    each group field, {the image's tag: its value} (the -10 entries dropped). ValueError naming a missing field, a
    list of the wrong length or an image whose tag has no group entry."""
    if not isinstance(answer, dict) or any(k not in answer for k in FIELDS + GROUPS):
        raise ValueError(f"GenEval server {url} answered {sorted(answer) if isinstance(answer, dict) else answer!r:.80}"
                         f"; expected a dict with {', '.join(FIELDS + GROUPS)} (yifan123/reward-server app_geneval.py)")
    n = len(metadata)
    lists = {**{k: answer[k] for k in FIELDS}, **{f"{g}[{t!r}]": v for g in GROUPS for t, v in answer[g].items()}}
    for k, v in lists.items():
        if len(v) != n:
            raise ValueError(f"GenEval server {url} answered {len(v)} values in {k} for {n} images")
    out = [{"score": float(answer["scores"][j]), "correct": float(answer["rewards"][j]),
            "strict_correct": float(answer["strict_rewards"][j]),
            **{g: {t: float(v[j]) for t, v in answer[g].items() if v[j] != OTHER_TAG} for g in GROUPS}}
           for j in range(n)]
    for a, m in zip(out, metadata):
        if any(list(a[g]) != [m["tag"]] for g in GROUPS):
            raise ValueError(f"GenEval server {url}: the group fields of the image of {m['prompt']!r} (tag "
                             f"{m['tag']!r}) hold {a['group_rewards']} / {a['group_strict_rewards']}")
    return out


class GenEvalClient:
    """`evaluate_model`'s reward function: each batch goes to the GenEval server with "only_strict": False; every
    image's answer is kept in `answers` (split_answer); the partial credit ("scores") is returned as the reward."""

    def __init__(self, url, **options):
        from common.reward_models import RemoteReward

        self.remote, self.answers = RemoteReward(url, only_strict=False, **options), []

    def __call__(self, images, prompts, metadata):
        start, metadata = len(self.answers), list(metadata)
        for n, answer in self.remote.answers(images, prompts, metadata):
            i = len(self.answers) - start
            self.answers += split_answer(answer, metadata[i:i + n], self.remote.url)
        return torch.tensor([a["score"] for a in self.answers[start:]]), {}


def summarize(answers, samples_per_prompt):
    """GenEval's numbers (see the module docstring) from every image's answer, prompt by prompt in order."""
    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    per = {}
    for g, key in (("group_rewards", "per_tag"), ("group_strict_rewards", "per_tag_strict")):
        tags = list(dict.fromkeys(t for a in answers for t in a[g]))  # first appearance (summary_scores.py's order)
        per[key] = {t: mean(a[g][t] for a in answers if t in a[g]) for t in tags}
    prompts = [answers[i:i + samples_per_prompt] for i in range(0, len(answers), samples_per_prompt)]
    return {"overall": mean(per["per_tag"].values()), "strict_overall": mean(per["per_tag_strict"].values()),
            "accuracy": mean(a["correct"] for a in answers),
            "strict_accuracy": mean(a["strict_correct"] for a in answers), "score": mean(a["score"] for a in answers),
            "correct_prompts": mean(float(any(a["correct"] for a in p)) for p in prompts),
            **per, "images_per_tag": {t: sum(t in a["group_rewards"] for a in answers) for t in per["per_tag"]}}


def format_table(res):
    lines = [f"{'tag':<16}{'accuracy':>10}{'strict':>10}{'images':>8}"]
    for t, acc in res["per_tag"].items():
        lines.append(f"{t:<16}{acc:>10.4f}{res['per_tag_strict'][t]:>10.4f}{res['images_per_tag'][t]:>8}")
    lines.append(f"{'overall':<16}{res['overall']:>10.4f}{res['strict_overall']:>10.4f}{res['n_images']:>8}"
                 "   (mean over tags: GenEval's score)")
    lines.append(f"images correct {res['accuracy']:.4f}, strict {res['strict_accuracy']:.4f}; prompts with a correct "
                 f"image {res['correct_prompts']:.4f}; partial credit {res['score']:.4f}")
    return "\n".join(lines)


def main(args: Args):
    from common import models, utils
    from common.evaluate import _gather, evaluate_model

    a = args
    captions, records, url, options = check_args(a)
    rank, world, device = utils.setup_distributed(a.device)  # torchrun: each rank generates a slice of the prompts
    model = models.load_model(a.model, device, resolution=a.resolution, use_t5=a.use_t5,
                              max_t5_length=a.max_t5_length, mixed_precision=a.mixed_precision,
                              decode_batch_size=a.decode_batch_size)
    transformer = evaluate.load_finetuned(model, a.checkpoint) if a.checkpoint else model.transformer
    client = GenEvalClient(url, **options)
    res, images, _, _ = evaluate_model(model, transformer, records, a.samples_per_prompt, a.seed, a.guidance_scale,
                                       a.num_steps, client, captions, True, a.batch_size, rank, world)
    answers = _gather({"answers": client.answers}, world)["answers"]
    if a.save_images:  # every rank writes its own prompts
        lo = min(rank * -(-len(captions) // world), len(captions))
        hi = lo + len(images) // a.samples_per_prompt
        evaluate.save_geneval_layout(a.save_images, images, captions[lo:hi], records[lo:hi], a.samples_per_prompt, lo)
    if rank == 0:
        out = {**summarize(answers, a.samples_per_prompt), "n_images": len(answers), "n_prompts": len(captions),
               "samples_per_prompt": a.samples_per_prompt, "diversity": res["diversity"], "model": a.model,
               "checkpoint": a.checkpoint, "server": url, "prompts": a.prompts, "num_steps": a.num_steps,
               "guidance_scale": a.guidance_scale, "resolution": a.resolution, "seed": a.seed}
        print(f"GenEval of {a.model}{f' + {a.checkpoint}' if a.checkpoint else ''}: {len(captions)} prompts x "
              f"{a.samples_per_prompt} samples, {a.num_steps} steps, CFG {a.guidance_scale:g}, server {url}"
              f"{f', {world} processes' if world > 1 else ''}")
        print(format_table(out))
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}" + (f" and the samples to {a.save_images}" if a.save_images else ""))
    utils.cleanup_distributed()


def cli():
    from common import utils

    main(utils.parse_args(Args))


if __name__ == "__main__":
    cli()
