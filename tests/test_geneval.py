"""`python -m common.tools.geneval` (common/tools/geneval.py): the embedded model's samples of a few GenEval prompts go
to a fake GenEval reward server on 127.0.0.1 (tests/helpers/reward_server.py `geneval_answer`, the official answer
format); the reported numbers are recomputed here from what the server answered. Bad input: one line, no model."""

import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import prewarmed
from tests.helpers.reward_server import FakeRewardServer, geneval_answer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# lines of GenEval's evaluation_metadata.jsonl (djghosh13/geneval): counting twice, not in a row
RECORDS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "orange", "count": 3}], "exclude": [{"class": "orange", "count": 4}],
     "prompt": "a photo of three oranges"},
    {"tag": "two_object", "include": [{"class": "toothbrush", "count": 1}, {"class": "carrot", "count": 1}],
     "prompt": "a photo of a toothbrush and a carrot"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "position", "include": [{"class": "sink", "count": 1},
                                    {"class": "tie", "count": 1, "position": ["above", 0]}],
     "prompt": "a photo of a tie above a sink"},
]


@pytest.fixture
def server():
    s = FakeRewardServer(answer=geneval_answer)
    yield s
    s.close()


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "geneval.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n" + "".join(json.dumps(r) + "\n"
                                                                                 for r in RECORDS[2:]))
    return f


def mean(xs):
    return sum(xs) / len(xs)


def test_geneval_reports_what_the_server_computed(server, prompts_file, tmp_path):
    k = 2
    out = prewarmed.run(["-m", "common.tools.geneval", "--model", "embedded", "--server", server.url,
                         "--prompts", str(prompts_file), "--samples-per-prompt", str(k), "--num-steps", "2",
                         "--batch-size", "4", "--json", str(tmp_path / "g.json"), "--save-images",
                         str(tmp_path / "imgs")], env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "g.json").read_text())
    # what was sent: every image with its prompt's GenEval metadata, only_strict False, in the prompts' order
    assert [len(r["images"]) for r in server.requests] == [4, 4, 2]  # generated 4 at a time, each batch posted
    assert all(r["only_strict"] is False for r in server.requests)
    sent = [m for r in server.requests for m in r["meta_datas"]]
    assert sent == [r for r in RECORDS for _ in range(k)]
    assert [p for r in server.requests for p in r["prompts"]] == [r["prompt"] for r in RECORDS for _ in range(k)]
    # the numbers, recomputed from the answers: Flow-GRPO's way (concatenate each field; a tag's accuracy is the mean
    # of its group list without the -10 entries) and GenEval's (the mean over tags, in first-appearance order)
    field = {key: [v for a in server.answers for v in a[key]] for key in ("scores", "rewards", "strict_rewards")}
    groups = {g: {t: [v for a in server.answers for v in a[g][t]] for t in server.answers[0][g]}
              for g in ("group_rewards", "group_strict_rewards")}
    tags = ["single_object", "counting", "two_object", "position"]
    per_tag = {t: mean([v for v in groups["group_rewards"][t] if v != -10]) for t in tags}
    per_tag_strict = {t: mean([v for v in groups["group_strict_rewards"][t] if v != -10]) for t in tags}
    assert all(all(v == -10 for v in groups["group_rewards"][t]) for t in ("colors", "color_attr"))
    # the same per tag from "rewards" and the metadata the server got (the fake server is consistent)
    assert per_tag == {t: mean([c for c, m in zip(field["rewards"], sent) if m["tag"] == t]) for t in tags}
    expected = {"overall": mean(list(per_tag.values())), "strict_overall": mean(list(per_tag_strict.values())),
                "accuracy": mean(field["rewards"]), "strict_accuracy": mean(field["strict_rewards"]),
                "score": mean(field["scores"]), "per_tag": per_tag, "per_tag_strict": per_tag_strict,
                "images_per_tag": {"single_object": 2, "counting": 4, "two_object": 2, "position": 2},
                "correct_prompts": mean([float(max(field["rewards"][i:i + k])) for i in range(0, 10, k)]),
                "n_images": 10, "n_prompts": 5, "samples_per_prompt": k}
    for key, value in expected.items():
        assert res[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value), key
    assert list(res["per_tag"]) == tags  # first appearance
    # the test can tell the fields apart: mean over tags != over images, strict != GenEval's correct
    assert abs(res["overall"] - res["accuracy"]) > 0.01 and res["per_tag"] != res["per_tag_strict"]
    # the printed table holds the same numbers
    rows = {line.split()[0]: line.split()[1:4] for line in out.stdout.splitlines() if line.split()[:1]}
    for t in tags:
        assert rows[t] == [f"{per_tag[t]:.4f}", f"{per_tag_strict[t]:.4f}", str(expected["images_per_tag"][t])]
    assert rows["overall"] == [f"{expected['overall']:.4f}", f"{expected['strict_overall']:.4f}", "10"]
    # --save-images: GenEval's layout; each sample's PNG, JPEG-encoded as the client does, is what the server got
    dirs = sorted((tmp_path / "imgs").iterdir())
    assert [json.loads((d / "metadata.jsonl").read_text()) for d in dirs] == RECORDS
    jpegs = [j for r in server.requests for j in r["images"]]
    for i, d in enumerate(dirs):
        for j in range(k):
            png, buf = Image.open(d / "samples" / f"{j:04d}.png"), io.BytesIO()
            png.save(buf, format="JPEG")
            assert png.size == (32, 32) and buf.getvalue() == jpegs[i * k + j]
    assert len(set(jpegs)) == len(jpegs)


def test_geneval_sd3_pipeline_and_a_runs_lora(server, prompts_file, tmp_path):
    """An SD3 pipeline directory (the tiny random one, with T5) alone and with a run's LoRA (--checkpoint): the server
    gets exactly the images common.evaluate generates from freshly loaded weights (JPEG bytes equal), and the LoRA's
    differ from the base model's."""
    from common import models, rewards
    from common.evaluate import generate
    from common.tools import evaluate, geneval
    from tests.helpers.tiny_sd3 import build_tiny_sd3

    sd3 = str(build_tiny_sd3(tmp_path / "sd3", t5=True))
    model = models.load_model(sd3, "cpu", resolution=32, use_t5=True)
    policy = models.Policy(model.transformer, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking LoRA (B starts at zero)
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    policy.save_pretrained(str(tmp_path / "run"))
    args = dict(model=sd3, server=server.url, prompts=str(prompts_file), resolution=32, samples_per_prompt=2,
                num_steps=2, batch_size=4, device="cpu")
    sent = {}
    for ckpt in (None, str(tmp_path / "run")):
        start = len(server.requests)
        geneval.main(geneval.Args(**args, checkpoint=ckpt, json=str(tmp_path / "g.json")))
        sent[ckpt] = [j for r in server.requests[start:] for j in r["images"]]
        m = models.load_model(sd3, "cpu", resolution=32, use_t5=True)
        images = generate(m, evaluate.load_finetuned(m, ckpt) if ckpt else m.transformer,
                          [r["prompt"] for r in RECORDS for _ in range(2)], 0, 4.5, 2, 4)
        expected = []
        for a in rewards.to_uint8(images):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG")
            expected.append(buf.getvalue())
        assert sent[ckpt] == expected, ckpt
        assert json.loads((tmp_path / "g.json").read_text())["checkpoint"] == ckpt
    assert all(a != b for a, b in zip(sent[None], sent[str(tmp_path / "run")]))


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nobody listens there now
    return port


@pytest.mark.parametrize("case,expected", [
    ({"server": "localhost:18085"}, "--server 'localhost:18085' needs the http(s) URL of a reward server, e.g. http"),
    ({"server": "SERVER?retry=3"}, "unknown option 'retry'; choose from: retries, timeout, backoff"),
    ({"server": "SERVER?timeout=0"}, "option timeout='0' must be a number > 0"),
    ({"server": "DOWN"}, "--server: reward server http://127.0.0.1:"),
    ({"prompts": "/nonexistent/geneval.jsonl"}, "--prompts '/nonexistent/geneval.jsonl' does not exist; "
                                                "`python -m common.tools.prompts --sets geneval_bench`"),
    ({"prompts": "a red circle\n"}, "line 1: not a JSON object with a \"prompt\" string"),
    ({"prompts": json.dumps(RECORDS[0]) + "\n" + json.dumps({**RECORDS[1], "tag": "colour"})},
     "line 2: tag 'colour' is not GenEval's; choose from: single_object, two_object, counting, colors, position"),
    ({"prompts": json.dumps({**RECORDS[0], "include": [{"class": "bench"}]})}, "\"include\" must list the objects"),
    ({"prompts": "\n\n"}, "holds no prompts"),
    ({"model": "stabilityai/stable-diffusion-3.5-medium"}, "no network/hub is reachable"),
    ({"checkpoint": "/nonexistent/run"}, "--checkpoint '/nonexistent/run' does not exist"),
    ({"num_steps": 0}, "--num-steps 0 must be >= 1"),
    ({"guidance_scale": 0.5}, "--guidance-scale 0.5 must be >= 1"),
    ({"mixed_precision": "fp8"}, "unknown --mixed-precision 'fp8'"),
])
def test_geneval_bad_input_one_line_before_loading(case, expected, server, prompts_file, tmp_path, capsys,
                                                   monkeypatch):
    from common import models
    from common.tools import geneval

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    kw = {"model": "embedded", "server": server.url, "prompts": str(prompts_file), "json": str(tmp_path / "g.json"),
          **case}
    if kw["server"] == "DOWN":
        kw["server"] = f"http://127.0.0.1:{free_port()}"
    kw["server"] = kw["server"].replace("SERVER", server.url)
    if case.get("prompts", "").endswith("\n") or case.get("prompts", "").startswith("{"):
        (tmp_path / "bad.jsonl").write_text(case["prompts"])
        kw["prompts"] = str(tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit) as e:
        geneval.main(geneval.Args(**kw))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert server.requests == []


def test_bad_server_answer_names_itself():
    """An answer without the group fields (e.g. a server that drops them), a list of the wrong length, or group
    fields that do not hold the image's own tag: a ValueError naming what is wrong, not a silent number."""
    from common.tools import geneval

    meta = [RECORDS[0], RECORDS[1]]
    good = geneval_answer({"images": [b"a", b"b"], "meta_datas": meta, "only_strict": False}, 0)
    assert [a["correct"] for a in geneval.split_answer(good, meta, "U")] == good["rewards"] == [1.0, 1.0]
    assert [a["group_strict_rewards"] for a in geneval.split_answer(good, meta, "U")] == [{"single_object": 1.0},
                                                                                        {"counting": 0.0}]
    with pytest.raises(ValueError, match=r"GenEval server U answered \['rewards', 'scores', 'strict_rewards'\]; "
                                         "expected a dict with scores, rewards, strict_rewards, group_rewards"):
        geneval.split_answer({k: good[k] for k in ("scores", "rewards", "strict_rewards")}, meta, "U")
    with pytest.raises(ValueError, match="answered 1 values in strict_rewards for 2 images"):
        geneval.split_answer({**good, "strict_rewards": [1.0]}, meta, "U")
    with pytest.raises(ValueError, match=r"answered 3 values in group_rewards\['counting'\] for 2 images"):
        geneval.split_answer({**good, "group_rewards": {**good["group_rewards"], "counting": [0.0] * 3}}, meta, "U")
    with pytest.raises(ValueError, match="the group fields of the image of 'a photo of three oranges' "
                                         r"\(tag 'counting'\) hold \{'colors': 1.0\}"):
        geneval.split_answer({**good, "group_rewards": {**good["group_rewards"], "counting": [-10.0, -10.0],
                                                        "colors": [-10.0, 1.0]}}, meta, "U")
