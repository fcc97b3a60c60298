"""The prompt sets the papers train and evaluate SD3.5 on, built into prompts/ as JSON-lines files.

    python -m common.tools.prompts                         # every set, downloaded (needs a network)
    python -m common.tools.prompts --sets geneval,pickapic       # some of them
    python -m common.tools.prompts --source-dir path/to/flow_grpo/dataset --sets geneval,pickapic,ocr   # offline

Each set becomes prompts/<set>_train.jsonl and/or prompts/<set>_test.jsonl, one {"prompt": ..., "tag": ...,
<metadata>} object per line: the format `--prompts-file` / `--eval-prompts-file` of every method and
`python -m common.tools.evaluate --prompts-file` read (common/utils.py `load_prompts`), whose metadata reaches the reward.

    geneval        Flow-GRPO's GenEval-style train / test prompts; tag = GenEval category, plus GenEval's
                   "include" / "exclude" object lists (what a detector-based GenEval reward checks)
    geneval_bench  the GenEval benchmark's 553 evaluation prompts (djghosh13/geneval), same fields; test only
    pickapic       Flow-GRPO's train / test split of the unique Pick-a-Pic v1 captions (PickScore runs)
    ocr            Flow-GRPO's text-rendering prompts; "text" = the quoted string the image must show
    drawbench      the 200 DrawBench prompts of the Imagen paper; tag = DrawBench category; test only

Nothing is shipped in the repository: the files are fetched when this runs (URLs and licences: SOURCES below;
README "Prompt sets"). Without a network, fetch them elsewhere, lay them out under one folder DIR (Flow-GRPO's
dataset/ folder already is one for geneval, pickapic and ocr) and pass --source-dir DIR:

    DIR/geneval/{train,test}_metadata.jsonl        yifan123/flow_grpo  dataset/geneval/
    DIR/geneval_bench/evaluation_metadata.jsonl    djghosh13/geneval   prompts/
    DIR/pickscore/{train,test}.txt                 yifan123/flow_grpo  dataset/pickscore/
    DIR/ocr/{train,test}.txt                       yifan123/flow_grpo  dataset/ocr/
    DIR/drawbench/drawbench.csv                    the DrawBench sheet, downloaded as CSV
"""

import csv
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import tyro

from common.text import fail, quote, read_text

FLOW_GRPO = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/"  # MIT licence
GENEVAL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/"  # MIT licence
DRAWBENCH = ("https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY/"
             "export?format=csv")  # the DrawBench sheet linked from the Imagen paper / project page

# set -> split -> (path under --source-dir, URL); the file's extension says how to read it
SOURCES = {
    "geneval": {"train": ("geneval/train_metadata.jsonl", FLOW_GRPO + "geneval/train_metadata.jsonl"),
                "test": ("geneval/test_metadata.jsonl", FLOW_GRPO + "geneval/test_metadata.jsonl")},
    "geneval_bench": {"test": ("geneval_bench/evaluation_metadata.jsonl", GENEVAL + "evaluation_metadata.jsonl")},
    "pickapic": {"train": ("pickscore/train.txt", FLOW_GRPO + "pickscore/train.txt"),
                 "test": ("pickscore/test.txt", FLOW_GRPO + "pickscore/test.txt")},
    "ocr": {"train": ("ocr/train.txt", FLOW_GRPO + "ocr/train.txt"),
            "test": ("ocr/test.txt", FLOW_GRPO + "ocr/test.txt")},
    "drawbench": {"test": ("drawbench/drawbench.csv", DRAWBENCH)},
}


def fetch(url, timeout=30.0):
    """The text at `url` (UTF-8); one clear line and exit 2 when it cannot be downloaded."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "cleanflow"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode("utf-8")
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "reason", None) or e
        fail(f"cannot download {url} ({reason}); without a network, download the source files elsewhere and pass "
             "--source-dir DIR (its layout: python -m common.tools.prompts --help)")


def read_source(name, split, source_dir=None, timeout=30.0):
    """(text, where it came from) of one source file: DIR/<path> with --source-dir, else downloaded."""
    path, url = SOURCES[name][split]
    if source_dir is None:
        return fetch(url, timeout), url
    f = Path(source_dir) / path
    if not f.is_file():
        fail(f"--source-dir: {str(f)!r} does not exist (the {name} {split} prompts; download it from {url})")
    return read_text(f, "--source-dir"), str(f)


def jsonl_records(text, where):
    """[(line number, object)] of the non-blank lines of JSON-lines `text` (GenEval's metadata); one line and exit 2
    on a line that is not a JSON object with a "prompt" string (`where` names the file or URL)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            fail(f"{where} line {i}: not a JSON object with a \"prompt\" string: {quote(line)}")
        out.append((i, r))
    return out


def convert(name, split, text, where):
    """Source text -> list of {"prompt", "tag", ...} records (the source's order, blank lines dropped). The
    format is the extension of the set's path in SOURCES; `where` (file or URL) names the source in errors."""
    kind = Path(SOURCES[name][split][0]).suffix
    if kind == ".jsonl":  # GenEval metadata: keep every field, prompt and tag first
        records = []
        for _, r in jsonl_records(text, where):
            rec = {"prompt": r["prompt"].strip(), "tag": r.get("tag")}
            rec.update((k, v) for k, v in r.items() if k not in rec)
            records.append(rec)
        return records
    if kind == ".csv":  # DrawBench sheet: columns Prompts, Category (names matched without case)
        rows = list(csv.DictReader(io.StringIO(text)))
        cols = {c.strip().lower(): c for c in (rows[0] if rows else {}) if c}
        if "prompts" not in cols or "category" not in cols:
            fail(f"{where}: expected the DrawBench columns 'Prompts' and 'Category', found {sorted(cols)}")
        return [{"prompt": r[cols["prompts"]].strip(), "tag": r[cols["category"]].strip()}
                for r in rows if (r[cols["prompts"]] or "").strip()]
    records = [{"prompt": line.strip(), "tag": name} for line in text.splitlines() if line.strip()]
    if name == "ocr":  # the text to render is the prompt's first "quoted" span (what an OCR reward compares)
        for r in records:
            m = re.search(r'"([^"]+)"', r["prompt"])
            if m:
                r["text"] = m.group(1)
    return records


def write_jsonl(path, records):
    """Atomically: a half-written prompts file never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def build(names, out_dir="prompts", source_dir=None, timeout=30.0):
    """Build prompts/<set>_<split>.jsonl for every named set. Returns [(set, split, n prompts, path, source)]."""
    built = []
    for name in names:
        for split in SOURCES[name]:
            text, where = read_source(name, split, source_dir, timeout)
            records = convert(name, split, text, where)
            if not records:
                fail(f"{where} holds no prompts")
            path = Path(out_dir) / f"{name}_{split}.jsonl"
            write_jsonl(path, records)
            built.append((name, split, len(records), path, where))
    return built


@dataclass
class Args:
    sets: str = ",".join(SOURCES)
    """comma list of prompt sets to build: geneval, geneval_bench, pickapic, ocr, drawbench"""
    out_dir: str = "prompts"
    """where <set>_<split>.jsonl are written"""
    source_dir: str | None = None
    """build from source files already on disk in DIR (layout above) instead of downloading them"""
    timeout: float = 30.0
    """seconds to wait for each download"""


def main(args: Args):
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    for name in names:
        if name not in SOURCES:
            fail(f"unknown prompt set {name!r}; choose from: {', '.join(SOURCES)}")
    if not names:
        fail(f"empty --sets; choose from: {', '.join(SOURCES)}")
    if args.source_dir is not None and not Path(args.source_dir).is_dir():
        fail(f"--source-dir {args.source_dir!r} is not a directory")
    built = build(names, args.out_dir, args.source_dir, args.timeout)
    print(f"{'set':<15}{'split':<7}{'prompts':>8}  file (source)")
    for name, split, n, path, where in built:
        print(f"{name:<15}{split:<7}{n:>8}  {path} ({where})")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
