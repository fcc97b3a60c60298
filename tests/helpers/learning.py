"""What the learning tests share: an evaluation on the training prompts, and the gain of a run over its own base.

A learning test asks whether a method optimises its objective: the reward on the prompts it trains on. So its run
evaluates on the shapes grammar's train split (85 prompts x 4 samples, fixed noise) instead of the 32 held-out
prompts, whose gains are the benchmark's question: on the train prompts the gains are larger and vary less from seed
to seed. The run's own base evaluation, on the same noise, is its --lr 0 control
(tests/test_reliability.py::test_lr_zero_run_ends_at_its_base_evaluation)."""

from pathlib import Path


def train_eval_flags(tmp_path, samples_per_prompt=4):
    """Flags that make a method script evaluate (base and final, same noise) on the train split's prompts."""
    from common.world import shapes

    path = Path(tmp_path) / "train_prompts.txt"
    path.write_text("".join(s["caption"] + "\n" for s in shapes.split_specs("train")))
    return ["--eval-prompts-file", str(path), "--eval-samples-per-prompt", str(samples_per_prompt), "--eval-every",
            "1000", "--checkpoint-every", "1000", "--no-save-model", "--threads", "1"]


def gains(summary, samples_per_prompt=4):
    """(strict accuracy gain, partial credit gain) of a run's final evaluation over its base evaluation."""
    base, final = summary["base"], summary["final"]
    assert final["n"] == base["n"] == 85 * samples_per_prompt, (base["n"], final["n"])  # the train split's images
    return final["strict_accuracy"] - base["strict_accuracy"], final["reward_mean"] - base["reward_mean"]
