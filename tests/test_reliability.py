"""Reliability of every method script: bad input fails with one clear line before any model loads;
SIGKILL or Ctrl-C + --resume reproduces an uninterrupted run; non-finite updates are skipped and stop the run
without writing a bad checkpoint; a failing reward names itself and the prompts; torchrun with 2 processes
matches 1 process. Bad input covers every flag by class: type, range (a divisor or an interval at 0), finiteness,
choice, availability (a device this machine lacks, another diffusers pipeline, a reward server that is down)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file

from common import rewards, utils
from tests.helpers import prewarmed
from tests.helpers.cli_check import check_flags

ROOT = Path(__file__).resolve().parents[1]
METHODS = [m for m in ("advantageflow", "diffusion_nft", "flow_grpo", "orw_cfm_w2", "acflow", "fdfo")
           if (ROOT / f"{m}.py").is_file()]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# per method: the batch flags of a tiny run (fdfo needs pairs), and one method option with a bad value
TINY = {m: ["--prompts-per-iter", "2", "--group-size", "2" if m == "fdfo" else "3", "--train-batch-size",
            "2" if m == "fdfo" else "3", "--eval-samples-per-prompt", "1", "--num-steps", "4", "--threads", "1",
            *(["--num-minibatches", "1"] if m == "flow_grpo" else [])]  # one minibatch: divides a 3-image shard
        for m in METHODS}
BAD_OPTION = {"advantageflow": ("--gamma-mode", "big"), "diffusion_nft": ("--adaptive-weight", "big"),
              "flow_grpo": ("--noise-level", "-1"),
              "orw_cfm_w2": ("--epoch-iters", "0"), "acflow": ("--shaping", "wild"), "fdfo": ("--group-size", "3")}


def _check(method, argv, world_size=1):
    """Run the script's argument checks in-process as its __main__ does; return the exit code."""
    mod = importlib.import_module(method)
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # as torchrun sets it; some method checks read it
    try:
        with pytest.raises(SystemExit) as e:
            args = utils.parse_args(mod.Args, argv)  # a Literal choice fails here, in one line
            utils.check_args(args, world_size)  # the generic checks (a script may run its own first; both fail
            if hasattr(mod, "check_method_args"):  # with one line - this order makes the expected line definite)
                mod.check_method_args(args)
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.__setitem__("WORLD_SIZE", old)
    return e.value.code


BAD_INPUTS = [  # (argv, text the single error line must contain)
    (["--reward", "pickscor"], "unknown reward 'pickscor'; choose from: aesthetic, clipscore"),
    (["--reward", "shapes=abc"], "malformed reward weight 'abc'"),
    (["--reward-paths", "pikscore=/x"], "unknown reward 'pikscore' in --reward-paths 'pikscore=/x'; choose from: "),
    (["--reward-paths", "aesthetic=/nonexistent/head.pth"], "'/nonexistent/head.pth' does not exist"),
    (["--model", "stabilityai/stable-diffusion-3.5-medium"], "no network/hub is reachable"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file '/nonexistent/prompts.txt' does not exist"),
    (["--prompts-file", "EMPTY"], "holds no prompts"),
    (["--eval-prompts-file", "/nonexistent/eval.txt"], "--eval-prompts-file '/nonexistent/eval.txt' does not exist"),
    (["--prompts-file", "UNPARSEABLE"], "line 2: cannot parse prompt 'a purple octagon'"),
    (["--train-batch-size", "5"], "--train-batch-size 5 must divide"),
    (["--lr", "-0.001"], "--lr -0.001 must be >= 0"),
    (["--num-steps", "0"], "--num-steps 0 must be >= 1"),
    (["--num-iterations", "0"], "--num-iterations 0 must be >= 1"),
    (["--guidance-scale", "0.5"], "--guidance-scale 0.5 must be >= 1"),
    (["--lora-rank", "-1"], "--lora-rank -1 must be >= 0 (0 = full fine-tuning, >= 1 for LoRA)"),
    (["--output-dir", "/etc/hostname/run"], "--output-dir '/etc/hostname/run' is not writable"),
    (["--output-dir", "/proc/cleanflow/run"], "--output-dir '/proc/cleanflow/run' cannot be created"),
    (["--resume", "/nonexistent/run"], "--resume '/nonexistent/run': no checkpoint file there"),
    (["--resume", "CORRUPT"], "is not a readable checkpoint"),
    (["--resume", "OTHER_CKPT"], "was saved with --exp-name another_method, this run has "),
    (["--prompts-per-iter", "3", "--group-size", "1", "WORLD2"], "is not divisible by the world size 2"),
    (["--upload-model", "--no-save-model"], "--upload-model needs --save-model"),
    # finiteness: NaN / inf floats
    (["--lr", "nan"], "--lr nan must be a finite number"),
    (["--max-grad-norm", "inf"], "--max-grad-norm inf must be a finite number"),
    (["--guidance-scale", "nan"], "--guidance-scale nan must be a finite number"),
    # ranges: a divisor or an interval at 0, negative sizes and rates
    (["--eval-every", "0"], "--eval-every 0 must be >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0 must be >= 1"),
    (["--log-images-every", "0"], "--log-images-every 0 must be >= 1"),
    (["--eval-samples-per-prompt", "0"], "--eval-samples-per-prompt 0 must be >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0 must be >= 1"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0 must be > 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0 must be >= 0"),
    (["--threads", "-1"], "--threads -1 must be >= 0"),
    (["--seed", "-1"], "--seed -1 must be in [0, 2^31)"),
    (["--resolution", "500"], "--resolution 500 must be a positive multiple of 16"),
    (["--max-t5-length", "0"], "--max-t5-length 0 must be >= 1"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha 0 must be >= 1"),
    # choices
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 is not supported for training (no loss scaling); "
                                    "choose from: no, bf16"),
    (["--reward-dtype", "fp8"], "unknown --reward-dtype 'fp8'; choose from: fp32, bf16, fp16"),
    # availability: devices this machine lacks, another pipeline's folder, a reward server that is down
    (["--device", "cuda:99"], "--device 'cuda:99': this machine has "),
    (["--device", "mps"], "--device 'mps' is not supported; choose from: auto, cpu, cuda, cuda:N"),
    (["--device", "gpu"], "--device 'gpu' is not a device; choose from: auto, cpu, cuda, cuda:N"),
    (["--reward-device", "cuda:99"], "--reward-device 'cuda:99': this machine has "),
    (["--model", "OTHER_PIPELINE"], "holds a StableDiffusionXLPipeline pipeline; choose a StableDiffusion3Pipeline"),
    (["--reward", "REMOTE_DOWN"], "is down or unreachable"),
]


def _placeholders(argv, tmp_path):
    """BAD_INPUTS' stand-ins made real: files, another diffusers pipeline's folder, a closed port."""
    import socket

    files = {"EMPTY": "\n\n", "UNPARSEABLE": "a red circle\na purple octagon\n", "CORRUPT": "not a checkpoint"}
    real = []
    for a in argv:
        if a in files:
            (tmp_path / a).write_text(files[a])
            a = str(tmp_path / a)
        elif a == "OTHER_PIPELINE":  # an SDXL folder: model_index.json names its pipeline class
            (tmp_path / a / "unet").mkdir(parents=True, exist_ok=True)
            (tmp_path / a / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
            a = str(tmp_path / a)
        elif a == "OTHER_CKPT":  # another script's checkpoint
            utils.save_checkpoint(tmp_path / a, {**{k: {} for k in utils.CHECKPOINT_KEYS}, "iteration": 2,
                                                 "args": {"exp_name": "another_method", "model": "embedded"}})
            a = str(tmp_path / a)
        elif a == "REMOTE_DOWN":
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            a = f"remote:http://127.0.0.1:{sock.getsockname()[1]}"
            sock.close()  # nobody listens there now
        real.append(a)
    return real


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[c[1][:30] for c in BAD_INPUTS])
def test_bad_input_one_clear_line(method, argv, expected, tmp_path, capsys):
    world = 2 if "WORLD2" in argv else 1
    real = [a for a in _placeholders(argv, tmp_path) if a != "WORLD2"]
    if method == "fdfo" and world == 2:  # fdfo's groups are pairs: 1 pair cannot be split over 2 processes
        real = ["--prompts-per-iter", "1", "--group-size", "2", "--train-batch-size", "1"]
    code = _check(method, real, world)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert expected in err[0], err[0]


@pytest.mark.parametrize("method", METHODS)
def test_bad_method_option_and_subprocess_exit(method):
    """The script itself (subprocess): non-zero exit, one stderr line, before any model loads."""
    flag, value = BAD_OPTION[method]
    out = subprocess.run([sys.executable, f"{method}.py", flag, value], capture_output=True, text=True, cwd=ROOT,
                         env=ENV, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and value in lines[0] and flag in lines[0], out.stderr[-2000:]


def test_prewarmed_child_runs_a_script_as_a_fresh_interpreter(tmp_path):
    """tests/helpers/prewarmed.py (what most tests start scripts with) against a fresh `python script.py`: the same
    exit code and stderr for a bad flag, the same output and numbers for a 1-iteration run, and a timeout that
    kills the child and leaves the server usable."""
    bad = ["advantageflow.py", "--gamma-mode", "big"]
    fresh = subprocess.run([sys.executable, *bad], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    warm = prewarmed.run(bad, cwd=ROOT, env=ENV, timeout=300)
    assert (warm.returncode, warm.stderr, warm.stdout) == (fresh.returncode, fresh.stderr, fresh.stdout) != (0, "", "")
    summaries = []
    for name, run in (("fresh", None), ("warm", prewarmed.run)):
        argv = _cmd("advantageflow", tmp_path / name, n_it=1)
        out = run(argv, cwd=ROOT, env=ENV, timeout=300) if run else subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert out.returncode == 0 and "held-out reward" in out.stdout, out.stderr[-2000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert summaries[0]["final"] == summaries[1]["final"] and summaries[0]["base"] == summaries[1]["base"]
    (tmp_path / "sleep.py").write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        prewarmed.run([tmp_path / "sleep.py"], cwd=ROOT, env=ENV, timeout=1)
    assert prewarmed.run(bad, cwd=ROOT, env=ENV, timeout=300).stderr == fresh.stderr


FLOAT_FLAGS = {m: [f for f, v in vars(importlib.import_module(m).Args()).items() if isinstance(v, float)]
               for m in METHODS}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", METHODS)
def test_every_float_flag_must_be_finite(method, value):
    """Each float flag of each script at NaN / +-inf (in the order the script checks): one line naming the flag."""
    for name in FLOAT_FLAGS[method]:
        flag = "--" + name.replace("_", "-")
        code, err = check_flags(method, [flag, value])
        assert code == 2 and len(err) == 1 and flag in err[0], (flag, err)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("argv,expected", [(["--num-steps", "abc"], "Error parsing --num-steps: invalid literal "
                                                                    "for int() with base 10: 'abc' (expected --num-steps INT)"),
                                           (["--lr", "fast"], "Error parsing --lr: could not convert string to float: "
                                                              "'fast' (expected --lr FLOAT)"),
                                           (["--num-step", "3"], "Unrecognized options: --num-step, 3 (did you mean "),
                                           (["--reward"], "Missing value for argument '--reward'")],
                         ids=["int", "float", "unknown", "missing"])
def test_wrong_type_or_unknown_flag_one_line(method, argv, expected):
    """tyro's boxed message for a value of the wrong type, an unknown flag or a missing value becomes one line."""
    code, err = check_flags(method, argv)
    assert code == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("method,argv", [("flow_grpo", []), ("flow_grpo", ["--global-std"]), ("advantageflow", []),
                                         ("diffusion_nft", [])])
def test_group_size_one_fails_where_advantages_are_group_relative(method, argv):
    """Flow-GRPO's and AdvantageFlow's (and NFT's) advantages are centred per prompt: one image per prompt would
    make every advantage 0 and the run learn nothing."""
    code, err = check_flags(method, ["--group-size", "1", "--prompts-per-iter", "8", "--train-batch-size", "4",
                                     *argv])
    assert code == 2 and len(err) == 1 and "--group-size 1 must be >= 2" in err[0], err
    assert check_flags("orw_cfm_w2", ["--group-size", "1"])[0] == 0  # per-image weights: no groups needed


EVAL_BAD_INPUTS = [
    (["--guidance-scale", "nan"], "--guidance-scale nan must be a finite number"),
    (["--num-steps", "abc"], "Error parsing --num-steps"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt 0 must be >= 1"),
    (["--seed", "-1"], "--seed -1 must be in [0, 2^31)"),
    (["--resolution", "100"], "--resolution 100 must be a positive multiple of 16"),
    (["--mixed-precision", "fp8"], "unknown --mixed-precision 'fp8'; choose from: no, bf16, fp16"),
    (["--reward-dtype", "half"], "unknown --reward-dtype 'half'; choose from: fp32, bf16, fp16"),
    (["--device", "cuda:99"], "--device 'cuda:99': this machine has "),
    (["--reward", "shapes", "--reward-device", "mps"], "--reward-device 'mps' is not supported"),
    (["--model", "OTHER_PIPELINE"], "holds a StableDiffusionXLPipeline pipeline; choose a StableDiffusion3Pipeline"),
    (["--reward", "REMOTE_DOWN"], "is down or unreachable"),
    (["--checkpoint", "EMPTY_DIR"], "holds no LoRA (pytorch_lora_weights.safetensors) and no transformer/ weights"),
    (["--json", "EMPTY_DIR"], "--json"),
    (["--save-images", "/proc/cleanflow/images"], "--save-images '/proc/cleanflow/images' cannot be created"),
]


@pytest.mark.parametrize("argv,expected", EVAL_BAD_INPUTS, ids=[c[1][:30] for c in EVAL_BAD_INPUTS])
def test_evaluate_bad_input_one_clear_line(argv, expected, tmp_path, capsys):
    """`python -m common.tools.evaluate`: the same classes of bad input, one line before any model loads."""
    from common.tools import evaluate

    (tmp_path / "EMPTY_DIR").mkdir()
    argv = [str(tmp_path / a) if a == "EMPTY_DIR" else a for a in _placeholders(argv, tmp_path)]
    with pytest.raises(SystemExit) as e:
        evaluate.check_args(utils.parse_args(evaluate.Args, argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and expected in err[0], err


def test_evaluate_takes_fp16():
    """Evaluation has no gradients to underflow: fp16 is allowed there (training refuses it)."""
    from common.tools import evaluate

    captions, _ = evaluate.check_args(utils.parse_args(evaluate.Args, ["--mixed-precision", "fp16"]))
    assert len(captions) == 32


def test_lr_zero_is_allowed():
    mod = importlib.import_module("advantageflow")
    prompts, meta, eval_prompts, _ = utils.check_args(tyro.cli(mod.Args, args=["--lr", "0"]))
    assert len(prompts) == len(meta) > 10 and len(eval_prompts) == 32


def test_failing_reward_names_itself_and_the_prompts():
    def broken(images, prompts, metadata=None):
        raise ValueError("detector crashed")

    fn = rewards.RewardFn("shapes")
    fn.fns["shapes"] = broken
    with pytest.raises(RuntimeError, match=r"reward 'shapes' failed on prompts \['a red circle'.*detector crashed"):
        fn(torch.rand(2, 3, 32, 32), ["a red circle", "two squares"])


def test_non_finite_guard_counts_and_stops():
    g = utils.NonFiniteGuard(patience=3)
    assert g.ok(torch.tensor(1.0), iteration=0)
    assert not g.ok(torch.tensor(float("nan")), iteration=1) and g.total == 1
    assert g.ok(torch.tensor(2.0), iteration=2) and g.in_a_row == 0
    assert not g.ok(torch.tensor(float("inf")), iteration=3)
    assert not g.ok(torch.tensor(float("nan")), iteration=4)
    with pytest.raises(SystemExit, match="3 non-finite updates in a row, last at iteration 5"):
        g.ok(torch.tensor(float("nan")), iteration=5)


def _cmd(method, out_dir, *extra, n_it=6):
    """`python {_cmd(...)}`: a short run of `method`'s script."""
    return [f"{method}.py", "--output-dir", str(out_dir), "--num-iterations", str(n_it), "--checkpoint-every", "2",
            "--eval-every", "1000", *TINY[method], *extra]


def _final(out_dir):
    return json.loads((Path(out_dir) / "summary.json").read_text())["final"]


def _start_and_wait_for_checkpoint(cmd, ckpt, at_least):
    """Start a run; return it once its checkpoint.pt is at iteration >= at_least."""
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=False)["iteration"] >= at_least:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted; make it longer"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_and_kill_then_resume_match_uninterrupted_run(method, tmp_path):
    """Ctrl-C finishes the current iteration, saves and exits 130; the resumed run, SIGKILLed, leaves its last
    periodic checkpoint whole; resuming again reproduces the uninterrupted run exactly (CPU, same thread count,
    noise drawn from (seed, iteration))."""
    n_it, run = 12, tmp_path / "run"
    ref = prewarmed.run(_cmd(method, tmp_path / "ref", n_it=n_it), cwd=ROOT, env=ENV, timeout=900)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ckpt, cmd = run / "checkpoint.pt", _cmd(method, run, n_it=n_it)
    stopped = _start_and_wait_for_checkpoint(cmd, ckpt, 2)
    stopped.send_signal(signal.SIGINT)
    out, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 130, err[-2000:]
    saved = torch.load(ckpt, weights_only=False)["iteration"]
    assert 3 <= saved < n_it and f"checkpoint saved at iteration {saved} " in out, (saved, out[-500:])

    killed = _start_and_wait_for_checkpoint([*cmd, "--resume", str(run)], ckpt, saved + 1)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    again = torch.load(ckpt, weights_only=False)["iteration"]
    assert again > saved and again % 2 == 0, (saved, again)  # a whole periodic checkpoint, never half-written

    res = prewarmed.run([*cmd, "--resume", run], cwd=ROOT, env=ENV, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _final(tmp_path / "ref"), _final(run)
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6), (a, b)
    assert a["strict_accuracy"] == pytest.approx(b["strict_accuracy"], abs=1e-6), (a, b)
    # samples.png: base beside final on the same noise; the base row survives the resumes
    from PIL import Image
    import numpy as np
    ga, gb = (np.asarray(Image.open(d / "samples.png")) for d in (tmp_path / "ref", run))
    assert ga.shape == gb.shape and ga.shape[0] >= 2 * 128 and (ga == gb).all()


def test_stop_signal_defers_the_first_signal_and_stops_on_the_second():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = utils.StopSignal()
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop()
        os.kill(os.getpid(), signal.SIGINT)  # within a second: the same request delivered twice
        assert stop.requested
        time.sleep(1.1)
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert e.value.code == 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_exploding_updates_stop_with_a_message(method, tmp_path):
    """lr 1e30 blows the weights up within an iteration or two: the non-finite losses / rewards are skipped and
    counted, the run stops naming the iteration, and no checkpoint with non-finite weights is ever written."""
    out = prewarmed.run(_cmd(method, tmp_path / "run", "--lr", "1e30", "--max-grad-norm", "1e30",
                             "--checkpoint-every", "1", n_it=20), cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode != 0 and "non-finite updates in a row, last at iteration" in out.stderr, out.stderr[-2000:]
    assert "update skipped (1 in a row)" in out.stderr
    ckpt = tmp_path / "run" / "checkpoint.pt"
    if ckpt.is_file():  # the last good one, if any iteration ended cleanly
        state = torch.load(ckpt, weights_only=False)["policy"]
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_lr_zero_run_ends_at_its_base_evaluation(method, tmp_path):
    """With --lr 0 the policy never moves, so the final held-out evaluation repeats the base's on the same noise
    (Flow-GRPO's EMA copy re-rounds: 1e-6). That makes a run's own base evaluation its --lr 0 control, the one each
    method's learning test (tests/test_<method>.py) measures the learned run's gain against."""
    out = prewarmed.run(_cmd(method, tmp_path / "run", "--lr", "0", "--no-save-model", n_it=1), cwd=ROOT, env=ENV,
                        timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("reward_mean", "strict_accuracy"):
        assert s["final"][key] == pytest.approx(s["base"][key], abs=1e-6), (key, s["base"], s["final"])
    assert s["final"]["n"] == 32 and 0 < s["base"]["reward_mean"] < 1


def test_non_finite_images_get_a_nan_reward():
    images = torch.rand(3, 3, 32, 32)
    images[1, 0, 5, 5] = float("nan")
    total, parts = rewards.RewardFn("shapes")(images, ["a red circle"] * 3)
    assert torch.isnan(total[1]) and torch.isfinite(total[[0, 2]]).all() and torch.isfinite(parts["shapes"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_processes_match_one(method, tmp_path):
    """2 processes x per-process batch B == 1 process x batch 2B (same global batch and noise)."""
    one = prewarmed.run(_cmd(method, tmp_path / "one", n_it=2), cwd=ROOT, env=ENV, timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          *_cmd(method, tmp_path / "two", n_it=2)], capture_output=True, text=True, cwd=ROOT,
                         env=ENV, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _final(tmp_path / "one"), _final(tmp_path / "two")
    # every script draws its noise for the global batch (or per image) and slices it per rank, so both runs see
    # the same numbers; gradients are averaged over ranks instead of over micro-batches: equal up to float
    # rounding, which can flip a borderline scorer decision on a few of the 32 eval images
    assert abs(a["reward_mean"] - b["reward_mean"]) <= 0.05, (a, b)
    # and the trained weights agree: their distance is < 1% of how far training moved them from the base
    # (measured 1e-4 .. 4e-4 of it; a script drawing other noise per rank lands at ~1x)
    base = load_file(ROOT / "common/world/assets/transformer.safetensors")
    w1, w2 = (load_file(tmp_path / d / "transformer/diffusion_pytorch_model.safetensors") for d in ("one", "two"))
    dist = sum(((w1[k].float() - w2[k].float()) ** 2).sum() for k in w1).sqrt()
    moved = sum(((w1[k].float() - base[k].float()) ** 2).sum() for k in w1).sqrt()
    assert moved > 0 and dist < 0.01 * moved, (dist.item(), moved.item())
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["reward_queries"] == \
        json.loads((tmp_path / "one" / "summary.json").read_text())["reward_queries"]


# ----------------------------------------------------------------------------------- a run directory you can trust
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-iteration AdvantageFlow run (checkpoint.pt, summary.json, transformer/); tests copy it."""
    d = tmp_path_factory.mktemp("finished") / "run"
    out = prewarmed.run(_cmd("advantageflow", d, n_it=2), cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return d


def _copy(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def _script(argv, env=None, timeout=300, module=None):
    """(exit code, non-empty stderr lines) of `python advantageflow.py argv` (or `python -m module argv`)."""
    cmd = [*(["-m", module] if module else ["advantageflow.py"]), *map(str, argv)]
    out = prewarmed.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, timeout=timeout)
    return out.returncode, [l for l in out.stderr.splitlines() if l.strip()]


def test_resume_refuses_or_really_applies_a_changed_flag(finished_run, tmp_path):
    """--resume: a flag that would mix two runs (the seed, a method flag, fewer iterations than the checkpoint holds)
    is refused in one line naming the flag and both values; a new --lr is applied with one warning: the optimizer
    runs with it, and the checkpoint's args and summary.json record it."""
    run = _copy(finished_run, tmp_path)
    for argv, expected in ((["--seed", "3"], "was saved with --seed 0, this run has 3"),
                           (["--gamma-mode", "one-minus-a"], "was saved with --gamma-mode constant, this run has one-minus-a"),
                           (["--num-iterations", "1"], "--num-iterations 1 is below the 2 iterations")):
        code, err = check_flags("advantageflow", ["--resume", str(run), *argv])
        assert code == 2 and len(err) == 1 and expected in err[0], err
    code, err = _script(["--resume", run, "--num-iterations", "3", "--lr", "5e-4"])
    assert code == 0 and [l for l in err if "warning" in l and "--lr 0.0001 -> 0.0005" in l], err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    summary = json.loads((run / "summary.json").read_text())
    assert ckpt["iteration"] == 3 and ckpt["optimizer"]["param_groups"][0]["lr"] == 5e-4
    assert ckpt["args"]["lr"] == summary["args"]["lr"] == 5e-4 and summary["args"]["num_iterations"] == 3
    assert summary["resumes"] == [{"iteration": 2, "changed": {"num_iterations": [2, 3], "lr": [1e-4, 5e-4]}}]
    assert ckpt["args"]["group_size"] == 3  # the flags not given: the checkpoint's, not the script's defaults


def test_damaged_or_old_checkpoint_fails_before_any_model_loads(finished_run, tmp_path):
    """Bytes overwritten inside checkpoint.pt fail its checksums; an older layout (no 'rng') fails in one line."""
    run = _copy(finished_run, tmp_path)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (run / "checkpoint.pt").write_bytes(bytes(data))
    old = tmp_path / "old.pt"
    state = torch.load(finished_run / "checkpoint.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k not in ("rng", "grid")}, old)
    for path, expected in ((run, "does not match its checksum"), (old, "not a checkpoint of this cleanflow version "
                                                                       "(no rng, grid")):
        code, err = check_flags("advantageflow", ["--resume", str(path)])
        assert code == 2 and len(err) == 1 and expected in err[0], err


def test_a_run_never_overwrites_a_run(finished_run, tmp_path):
    """A new run pointed at a finished run's directory fails in one line naming --resume and --overwrite, and
    leaves the run as it was; a live run's lock keeps others out; a dead run's lock is taken over with a warning;
    --overwrite removes the old run's files."""
    run = _copy(finished_run, tmp_path)
    before = {f: (run / f).read_bytes() for f in ("checkpoint.pt", "summary.json")}
    code, err = _script(_cmd("advantageflow", run, n_it=2)[1:])
    assert code == 2 and len(err) == 1 and "holds a run" in err[0] and f"--resume {run}" in err[0] \
        and "--overwrite" in err[0], err
    assert {f: (run / f).read_bytes() for f in before} == before
    args = utils.parse_args(importlib.import_module("advantageflow").Args, ["--output-dir", str(run)])
    live = subprocess.Popen(["sleep", "60"])
    try:
        (run / "run.lock").write_text(f"{live.pid}\n")
        with pytest.raises(SystemExit):
            utils.claim_run_dir(run, dataclasses_replace(args, overwrite=True))
        assert (run / "checkpoint.pt").is_file()
    finally:
        live.kill()
        live.wait()
    utils.claim_run_dir(run, dataclasses_replace(args, overwrite=True))  # the lock's process has ended
    assert (run / "run.lock").read_text().split()[0] == str(os.getpid())
    assert not (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    assert not list(run.glob("events.out.tfevents.*")) and not (run / "transformer").exists()


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize("argv", [["--resume", ""], ["--output-dir", ""], ["--prompts-file", " "],
                                  ["--reward-paths", ""]])
def test_empty_values_are_refused(argv):
    """An unset shell variable (--resume "$RUN") is not "not given": one line naming the flag."""
    code, err = check_flags("advantageflow", argv)
    assert code == 2 and len(err) == 1 and f"{argv[0]} is empty" in err[0], err


def test_every_weight_file_is_read_behind_one_check(finished_run, tmp_path, capsys):
    """common.tools.evaluate on damaged or foreign weights: one line naming the file and what is wrong with it."""
    from safetensors.torch import save_file

    from common import models
    from common.tools import evaluate

    model = models.load_model("embedded")
    sd = load_file(finished_run / "transformer/diffusion_pytorch_model.safetensors")
    good = (finished_run / "transformer/diffusion_pytorch_model.safetensors").read_bytes()
    small = {k: v[..., :1].contiguous() if v.dim() > 1 else v for k, v in sd.items()}
    cases = {"empty": (b"", "is empty (0 bytes)"), "truncated": (good[:len(good) // 2], "is truncated or not a weights"),
             "garbage": (os.urandom(4096), "is truncated or not a weights file"),
             "other_size": (small, "holds the weights of another model size than embedded"),
             "other_model": ({"foo.weight": torch.zeros(2)}, "holds the weights of another model than embedded"),
             "lora_other_modules": ({"transformer.foo.to_q.lora_A.weight": torch.zeros(2, 4)},
                                    "holds a LoRA for other modules than embedded's"),
             "lora_other_size": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 5)},
                                 "holds a LoRA of another model size than embedded")}
    for name, (content, expected) in cases.items():
        lora = name.startswith("lora")
        d = tmp_path / name / ("lora" if lora else "transformer")
        d.mkdir(parents=True)
        f = d / ("pytorch_lora_weights.safetensors" if lora else "diffusion_pytorch_model.safetensors")
        if not lora:
            (d / "config.json").write_text((finished_run / "transformer/config.json").read_text())
        save_file(content, f) if isinstance(content, dict) else f.write_bytes(content)
        with pytest.raises(SystemExit) as e:
            evaluate.load_finetuned(model, tmp_path / name, "embedded")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and str(f) in err[0] and expected in err[0], (name, err)


def test_evaluating_a_run_uses_the_model_it_recorded(finished_run, tmp_path):
    """--checkpoint of a run: the run's model (and its resolution / text-encoder flags) unless --model is given."""
    from common.tools import evaluate

    run = _copy(finished_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["args"].update(model="org/another-model", resolution=1024)
    (run / "summary.json").write_text(json.dumps(summary))
    for where in (run, run / "transformer"):
        a = utils.parse_args(evaluate.Args, ["--checkpoint", str(where)], recorded=evaluate.recorded_model)
        assert (a.model, a.resolution) == ("org/another-model", 1024)
    a = utils.parse_args(evaluate.Args, ["--checkpoint", str(run), "--model", "embedded"],
                         recorded=evaluate.recorded_model)
    assert (a.model, a.resolution) == ("embedded", 1024)


def test_text_files_name_the_file_and_line(tmp_path, capsys):
    """A UTF-8 byte-order mark is accepted; a file that is not UTF-8 is one line naming it and the line; an error
    about a very long line quotes 80 characters of it."""
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red circle\nthree blue squares\n".encode("utf-8"))
    assert utils.load_prompts(str(bom))[0][0] == "a red circle"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a red circle\ntwo caf\u00e9 squares\n".encode("latin-1"))
    long = tmp_path / "long.txt"
    long.write_text("a red circle\n" + "x" * 1_000_000 + "\n")
    for f, expected in ((latin, f"{str(latin)!r} is not UTF-8 text (line 2"), (long, f"{long} line 2: cannot parse")):
        code, err = check_flags("advantageflow", ["--prompts-file", str(f)])
        assert code == 2 and len(err) == 1 and expected in err[0] and len(err[0]) < 400, err[0][:500]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_leftover_or_partial_torchrun_variables(tmp_path):
    """Leftover torchrun variables and no other process: the run says it waits (world size, address, port) and gives
    up after CLEANFLOW_RENDEZVOUS_TIMEOUT seconds in one line; WORLD_SIZE without RANK is one line at once."""
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "CLEANFLOW_RENDEZVOUS_TIMEOUT": "2"}
    code, err = _script(_cmd("advantageflow", tmp_path / "a", n_it=2)[1:], env, timeout=120)
    assert code == 2 and len(err) == 2, err
    assert f"process 0 of 2: waiting up to 2 s for the others at 127.0.0.1:{port}" in err[0]
    assert "did not join" in err[1] and "unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT" in err[1], err
    code, err = _script(_cmd("advantageflow", tmp_path / "b", n_it=2)[1:], {"WORLD_SIZE": "2"}, timeout=120)
    assert code == 2 and len(err) == 1 and "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT unset" in err[0], err


def test_resume_of_a_read_only_run_directory(finished_run):
    """One line, no TensorBoard traceback (run as an unprivileged user: root may write anywhere)."""
    import shutil
    import tempfile

    if os.getuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root without setpriv: no read-only directory to test with")
    top = Path(tempfile.mkdtemp())
    try:
        run = Path(shutil.copytree(finished_run, top / "run"))
        for p in [*run.rglob("*"), run]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        top.chmod(0o755)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
        probe = subprocess.run([*drop, sys.executable, "-c", f"open({str(ROOT / 'advantageflow.py')!r})"],
                               capture_output=True, cwd="/", timeout=60)
        if probe.returncode != 0:  # e.g. a checkout inside a private (0700) directory
            pytest.skip("the unprivileged user cannot read this checkout or its Python")
        out = subprocess.run([*drop, sys.executable, "advantageflow.py", "--resume", str(run)], capture_output=True,
                             text=True, cwd=ROOT, env={**ENV, "HOME": str(top)}, timeout=300)
        err = [l for l in out.stderr.splitlines() if l.strip()]
        assert out.returncode == 2 and len(err) == 1 and "cannot write in" in err[0], err[-20:]
    finally:
        for p in top.rglob("*"):
            p.chmod(0o755)
        shutil.rmtree(top)


def test_ctrl_c_while_the_model_loads_is_one_line(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *_cmd("advantageflow", run, n_it=2)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not run.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_hub_tool_does_not_exit_0_doing_nothing():
    code, err = _script(["--upload", "x"], module="common.tools.hub", timeout=120)
    assert code == 2 and len(err) == 1 and "--run-dir" in err[0], err


def test_ci_fails_when_no_test_ran(tmp_path):
    """.ci/run with pytest collecting nothing (exit 5) must fail: a CI that tests nothing passes nothing."""
    import shutil

    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci/run", tmp_path / ".ci/run")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in (("python3", "mkdir -p .ci/venv/bin && touch .ci/venv/bin/activate"), ("pip", "exit 0"),
                       ("python", "exit 5")):  # a venv, an install, and pytest collecting no tests
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    out = subprocess.run(["bash", str(tmp_path / ".ci/run")], capture_output=True, text=True,
                         env={**ENV, "PATH": f"{bin_}:{os.environ['PATH']}"}, timeout=60)
    assert out.returncode != 0, out.stdout + out.stderr
