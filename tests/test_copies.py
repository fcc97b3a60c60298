"""The method files' deliberate copies stay identical.

A single-file method repeats the few blocks two methods share (CleanRL's discipline), each between
`# copy: <name> (<files>)` and `# end copy: <name>`. Every declared copy must appear in each file it names, nowhere
else, and read the same, line for line, in all of them; a fix made in one place fails here until it is made in the
others."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = re.compile(r"^\s*# copy: (?P<name>[^(]+?) \((?P<files>[^)]*)\)")


def declared_copies():
    """{name: {file: block text}} over the top-level method files, and {name: the files each declaration names}."""
    blocks, named = {}, {}
    for path in sorted(ROOT.glob("*.py")):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = START.match(lines[i])
            if m:
                name = m["name"].strip()
                end = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == f"# end copy: {name}")
                blocks.setdefault(name, {})[path.name] = "\n".join(lines[i + 1:end])
                named.setdefault(name, set()).update(re.findall(r"(?<![/\w])(\w+\.py)", m["files"]))  # top-level files
                i = end
            i += 1
    return blocks, named


BLOCKS, NAMED = declared_copies()


def test_the_declared_copies_exist():
    assert {"pool sampler", "CFG negatives", "evaluation EMA", "saved EMA"} <= set(BLOCKS), sorted(BLOCKS)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_each_copy_is_identical_in_every_file_it_names(name):
    files = BLOCKS[name]
    assert set(files) == NAMED[name] and len(files) >= 2, (name, sorted(files), sorted(NAMED[name]))
    texts = {f: t for f, t in files.items()}
    first = next(iter(texts))
    for f, t in texts.items():
        assert t == texts[first], f"copy {name!r} differs between {first} and {f}"
        assert t.strip(), f"copy {name!r} is empty in {f}"
