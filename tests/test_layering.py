"""The package's dependency arrows point one way, and no module outside the registry compares method names."""

import ast
import os
import re
from typing import Dict, Set

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memcom_torchrec")
METHOD_NAMES = ("uncompressed", "hashing", "memcom", "qr", "memcom_qr")

# subpackage -> subpackages it must never import (directly or lazily inside a function)
FORBIDDEN = {
    "modules": {"distributed", "data", "models", "eval", "train", "export", "experiment"},
    "optim": {"modules", "distributed", "data", "models", "eval", "train", "export", "experiment"},
    "distributed": {"data", "models", "eval", "train", "export", "experiment"},
    "data": {"modules", "distributed", "models", "eval", "train", "export", "experiment"},
    "models": {"distributed", "data", "eval", "train", "export", "experiment"},
    "eval": {"distributed", "models", "train", "export", "experiment"},
    "export": {"train", "distributed", "eval", "experiment", "data"},
    "train": {"export", "experiment"},
}


def _imports() -> Dict[str, Set[str]]:
    """Subpackage -> the memcom_torchrec subpackages its files import."""
    out: Dict[str, Set[str]] = {}
    for sub in sorted(os.listdir(PACKAGE)):
        path = os.path.join(PACKAGE, sub)
        if not os.path.isdir(path) or sub.startswith("__"):
            continue
        found: Set[str] = set()
        for name in os.listdir(path):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(path, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for m in mods:
                    parts = m.split(".")
                    if parts[0] == "memcom_torchrec" and len(parts) > 1 and parts[1] != sub:
                        found.add(parts[1])
        out[sub] = found
    return out


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_dependency_arrows_point_one_way(sub: str) -> None:
    wrong = _imports()[sub] & FORBIDDEN[sub]
    assert not wrong, f"memcom_torchrec.{sub} imports memcom_torchrec.{sorted(wrong)}"


def test_nothing_imports_the_experiment_grid() -> None:
    users = [sub for sub, deps in _imports().items() if "experiment" in deps]
    assert not users, users


def test_no_method_name_comparisons_outside_the_registry() -> None:
    names = "|".join(METHOD_NAMES)
    pattern = re.compile(rf"""(==|!=|\bin\s*[\(\[\{{]|startswith\()\s*["']({names})["']""")
    hits = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or path.endswith(os.path.join("modules", "methods.py")):
                continue
            with open(path) as f:
                for i, line in enumerate(f, 1):
                    if pattern.search(line):
                        hits.append(f"{os.path.relpath(path, PACKAGE)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
