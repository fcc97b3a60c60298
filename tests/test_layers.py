"""The core (common/*.py, common/pipelines/) imports nothing from its leaves (common/world, common/reward_models,
common/tools): they import it and register what they hold. Checked on the source, every import statement and
every module-name string handed to importlib."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ("common.world", "common.reward_models", "common.tools")


def imported_names(path):
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names += [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("common."):
            names.append(node.value)  # importlib.import_module("common....")
        elif isinstance(node, ast.JoinedStr):  # f"common.reward_models.{module}"
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and str(head.value).startswith("common."):
                names.append(head.value)
    return names


def core_files():
    return sorted([*ROOT.glob("common/*.py"), *ROOT.glob("common/pipelines/*.py")])


def test_core_imports_no_leaf():
    bad = {str(p.relative_to(ROOT)): [n for n in imported_names(p) if n.startswith(LEAVES)] for p in core_files()}
    assert {p: n for p, n in bad.items() if n} == {}


def test_the_check_sees_an_import(tmp_path):
    """The scan itself: each way of importing a leaf is caught."""
    for line in ("from common.world import shapes", "import common.tools.hub", "from common import world",
                 "importlib.import_module(f'common.reward_models.{m}')"):
        f = tmp_path / "m.py"
        f.write_text(line + "\n")
        names = imported_names(f)
        assert any(n.startswith(LEAVES) for n in names), line
