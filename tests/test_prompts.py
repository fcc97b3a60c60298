"""`python -m common.tools.prompts`, offline: builds every prompt set from small source files written
here in the sources' own formats, from a folder (--source-dir) and over HTTP from a local server (the download
path); the files it writes are what --prompts-file reads, with their metadata reaching the reward; every method
page's SD3.5-M command names files it builds."""

import functools
import http.server
import json
import os
import re
import shlex
import threading
from pathlib import Path

import pytest
import torch

from common import models, rewards, utils
from common.evaluate import evaluate_model
from common.tools.evaluate import save_geneval_layout
from common.tools import prompts
from common.world import shapes
from tests.helpers import prewarmed

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
METHODS = ["advantageflow", "diffusion_nft", "orw_cfm_w2", "acflow", "fdfo", "flow_grpo"]

# small sources in each upstream format: GenEval metadata lines (field order as upstream: tag first), one prompt
# per line (blank lines and surrounding spaces are dropped), and the DrawBench sheet as CSV (quoted commas)
GENEVAL_LINES = [
    {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
     "prompt": "a photo of two cups"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "dog", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red car and a blue dog"},
]
SOURCES = {
    "geneval/train_metadata.jsonl": "".join(json.dumps(r) + "\n" for r in GENEVAL_LINES) + "\n",
    "geneval/test_metadata.jsonl": json.dumps(GENEVAL_LINES[0]) + "\n",
    "geneval_bench/evaluation_metadata.jsonl": json.dumps(GENEVAL_LINES[1]),  # no final newline
    "pickscore/train.txt": "a castle on a hill, oil painting\n\n  a cat astronaut, digital art  \n",
    "pickscore/test.txt": "portrait of an old fisherman\n",
    "ocr/train.txt": 'A neon sign that reads "Open Late" above a diner door\nA mug printed with "Hello" and "World"\n',
    "ocr/test.txt": 'A chalkboard saying "Menu of the Day"\n',
    "drawbench/drawbench.csv": 'Prompts,Category\nA red colored car.,Colors\n'
                               '"A sign that says ""Hi, there"".",Text\n,Colors\n',
}
EXPECTED = {  # (set, split) -> records of prompts/<set>_<split>.jsonl
    ("geneval", "train"): [{"prompt": r["prompt"], **r} for r in GENEVAL_LINES],
    ("geneval", "test"): [{"prompt": GENEVAL_LINES[0]["prompt"], **GENEVAL_LINES[0]}],
    ("geneval_bench", "test"): [{"prompt": GENEVAL_LINES[1]["prompt"], **GENEVAL_LINES[1]}],
    ("pickapic", "train"): [{"prompt": "a castle on a hill, oil painting", "tag": "pickapic"},
                            {"prompt": "a cat astronaut, digital art", "tag": "pickapic"}],
    ("pickapic", "test"): [{"prompt": "portrait of an old fisherman", "tag": "pickapic"}],
    ("ocr", "train"): [{"prompt": 'A neon sign that reads "Open Late" above a diner door', "tag": "ocr",
                        "text": "Open Late"},
                       {"prompt": 'A mug printed with "Hello" and "World"', "tag": "ocr", "text": "Hello"}],
    ("ocr", "test"): [{"prompt": 'A chalkboard saying "Menu of the Day"', "tag": "ocr", "text": "Menu of the Day"}],
    ("drawbench", "test"): [{"prompt": "A red colored car.", "tag": "Colors"},
                            {"prompt": 'A sign that says "Hi, there".', "tag": "Text"}],
}


@pytest.fixture
def source_dir(tmp_path):
    d = tmp_path / "sources"
    for rel, text in SOURCES.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_cli(*argv):
    return prewarmed.run(["-m", "common.tools.prompts", *argv], cwd=ROOT, env=ENV, timeout=300)


def test_builds_every_set_from_a_source_dir(source_dir, tmp_path):
    out = run_cli("--source-dir", str(source_dir), "--out-dir", str(tmp_path / "prompts"))
    assert out.returncode == 0, out.stderr
    built = sorted(p.name for p in (tmp_path / "prompts").iterdir())
    assert built == sorted(f"{s}_{split}.jsonl" for s, split in EXPECTED)  # nothing else (no temporary files)
    for (name, split), records in EXPECTED.items():
        got = read_jsonl(tmp_path / "prompts" / f"{name}_{split}.jsonl")
        assert got == records, (name, split)
        assert all(list(r)[:2] == ["prompt", "tag"] for r in got)  # prompt and tag lead every line
        assert re.search(rf"{name}\s+{split}\s+{len(records)}\s", out.stdout), out.stdout  # the summary table


def test_downloads_and_fails_with_one_line_when_offline(source_dir, tmp_path, monkeypatch, capsys):
    """The download path against a local HTTP server holding the same files: identical output. A server that
    cannot be reached: exit 2 with one line naming the URL and --source-dir."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(source_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        local = {n: {s: (p, url + p) for s, (p, _) in splits.items()} for n, splits in prompts.SOURCES.items()}
        monkeypatch.setattr(prompts, "SOURCES", local)
        built = prompts.build(["ocr", "drawbench"], tmp_path / "dl", timeout=10)
        assert [(b[0], b[1], b[2], b[4]) for b in built] == [("ocr", "train", 2, url + "ocr/train.txt"),
                                                             ("ocr", "test", 1, url + "ocr/test.txt"),
                                                             ("drawbench", "test", 2, url + "drawbench/drawbench.csv")]
        for name, split, *_ in built:
            assert read_jsonl(tmp_path / "dl" / f"{name}_{split}.jsonl") == EXPECTED[name, split]
    finally:
        server.shutdown()
        server.server_close()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the server is gone: connection refused
        prompts.build(["pickapic"], tmp_path / "off", timeout=5)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert f"cannot download {url}pickscore/train.txt" in err[0] and "--source-dir" in err[0]
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("argv,files,expected", [
    (["--sets", "geneval,pickscor"], {}, "unknown prompt set 'pickscor'; choose from: geneval, geneval_bench"),
    (["--sets", "ocr"], {"ocr/test.txt": None}, "ocr/test.txt' does not exist (the ocr test prompts; download it "
                                               "from https://raw.githubusercontent.com/yifan123/flow_grpo/"),
    (["--sets", "geneval"], {"geneval/test_metadata.jsonl": '{"tag": "x", "prompt": "ok"}\n[1, 2]\n'},
     'test_metadata.jsonl line 2: not a JSON object with a "prompt" string'),
    (["--sets", "drawbench"], {"drawbench/drawbench.csv": "Text,Kind\na,b\n"},
     "expected the DrawBench columns 'Prompts' and 'Category', found ['kind', 'text']"),
    (["--sets", "pickapic"], {"pickscore/train.txt": "\n\n"}, "train.txt holds no prompts"),
])
def test_bad_input_one_clear_line(argv, files, expected, source_dir, tmp_path):
    for rel, text in files.items():
        (source_dir / rel).unlink() if text is None else (source_dir / rel).write_text(text)
    out = run_cli(*argv, "--source-dir", str(source_dir), "--out-dir", str(tmp_path / "prompts"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr


def test_built_files_feed_the_scripts_with_their_metadata(source_dir, tmp_path):
    """--prompts-file reads what the builder writes; each prompt's metadata is its JSON line (a shapes caption's is
    its shapes spec), and evaluation hands exactly that to the reward and back to GenEval's layout."""
    prompts.build(list(prompts.SOURCES), tmp_path / "prompts", source_dir)
    caps, meta = utils.load_prompts(str(tmp_path / "prompts" / "geneval_train.jsonl"), "some/sd3-model")
    assert caps == [r["prompt"] for r in GENEVAL_LINES] and meta == EXPECTED["geneval", "train"]
    caps, meta = utils.load_prompts(str(tmp_path / "prompts" / "ocr_test.jsonl"), "some/sd3-model")
    assert meta[0]["text"] == "Menu of the Day"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "two squares", "tag": "counting"}\n{"prompt": "a photo of a cat", "tag": "x"}\n'
                     "a blue dog\n")
    caps, meta = utils.load_prompts(str(mixed), "some/sd3-model")
    assert meta[0]["objects"][0]["count"] == 2 and meta[1] == {"prompt": "a photo of a cat", "tag": "x"}
    assert meta[2] is None
    with pytest.raises(ValueError, match="cannot parse prompt 'a photo of a cat'"):  # not a KeyError on the dict
        shapes.reward_partial(torch.rand(1, 3, 32, 32), caps[1:2], meta[1:2])

    seen = []

    def recording_reward(images, prompts_, metadata):
        seen.extend(metadata)
        return torch.zeros(len(prompts_)), {}

    model = models.load_model("embedded")
    caps, meta = utils.load_prompts(str(tmp_path / "prompts" / "drawbench_test.jsonl"), "some/sd3-model")
    res = evaluate_model(model, model.transformer, meta, 2, reward_fn=recording_reward, captions=caps, num_steps=2)
    assert seen == [m for m in meta for _ in range(2)] and res["n"] == 4 and "strict_accuracy" not in res
    save_geneval_layout(tmp_path / "geneval", torch.rand(4, 3, 32, 32), caps, meta, 2)
    written = [json.loads((tmp_path / "geneval" / f"{i:05d}" / "metadata.jsonl").read_text()) for i in range(2)]
    assert written == EXPECTED["drawbench", "test"]


def test_method_pages_sd35_commands_use_buildable_prompt_files():
    """Every method page's SD3.5-M command names prompts/<set>_<split>.jsonl files `python -m common.tools.prompts`
    builds, and the page says how to build them."""
    buildable = {f"prompts/{name}_{split}.jsonl" for name, splits in prompts.SOURCES.items() for split in splits}
    for m in METHODS:
        text = (ROOT / "docs" / f"{m}.md").read_text()
        cmd = next(l for l in text.replace("\\\n", " ").splitlines()
                   if f"{m}.py" in l and "stable-diffusion-3.5-medium" in l)
        argv = shlex.split(re.sub(r"<[^>]*>", "X", cmd).split(f"{m}.py", 1)[1])
        files = {argv[i + 1] for i, a in enumerate(argv) if a in ("--prompts-file", "--eval-prompts-file")}
        assert files and files <= buildable, (m, files)
        sets = {re.match(r"prompts/(.+)_(train|test)\.jsonl", f).group(1) for f in files}
        build = re.search(r"python -m common\.tools\.prompts --sets ([\w,]+)", text)
        assert build and sets <= set(build.group(1).split(",")), (m, sets)
