"""The package's dependency arrows point one way, and no module outside the registry compares method names."""

import ast
import os
from typing import Dict, List, Set

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memcom_torchrec")
METHOD_NAMES = ("uncompressed", "hashing", "memcom", "qr", "memcom_qr", "memcom_2hash", "memcom_freq", "memcom_clustered", "memcom_clustered_2hash")

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


def _method_constants(node: ast.AST) -> List[str]:
    """Method names written as string constants in ``node`` (or in a tuple/list/set literal it is)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in METHOD_NAMES]


def test_no_method_name_comparisons_outside_the_registry() -> None:
    """No ``x == "memcom"``, ``"qr" != x``, ``x in ("qr", "memcom_qr")`` or ``x.startswith("memcom")``."""
    hits = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or path.endswith(os.path.join("modules", "methods.py")):
                continue
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    found = [c for side in [node.left, *node.comparators] for c in _method_constants(side)]
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
                    found = [c for arg in node.args for c in _method_constants(arg)]
                else:
                    continue
                if found:
                    hits.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}: compares {found}")
    assert not hits, "\n".join(hits)
