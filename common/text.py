"""Text the run reads and the errors it writes, without torch (the prompts tool imports it too): one-line errors,
text files read as UTF-8 with the file's name in every error, long quotes cut."""

import sys
from pathlib import Path


def fail(msg):
    """One clear line on stderr and exit 2 (used before any model is loaded)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_text(path, flag=None):
    """A text file's contents, for every tool: UTF-8 with or without a byte-order mark, else one line naming the file
    (and `flag`) and the line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(f"{flag + ' ' if flag else ''}{str(path)!r} is not UTF-8 text (line {data[:e.start].count(10) + 1}: "
             f"{e.reason} at byte {e.start}); save it as UTF-8")


def quote(text, n=80):
    """`text` quoted for an error message, cut to `n` characters."""
    return repr(text if len(text) <= n else text[:n] + "...")
