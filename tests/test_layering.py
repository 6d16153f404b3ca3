"""The package's dependency arrows point one way, and no module outside the registry compares method names.

Every way one module can reach another counts as an import here: ``import`` and
``from ... import`` (absolute or relative, at module level or inside a function),
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name, and
the registry's ``"module:Class"`` strings, which ``modules.methods`` resolves on use.
"""

import ast
import importlib
import os
import re
from typing import Dict, Iterator, List, Optional, Set, Tuple

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

# A registry string "package.module:Class"; its role is the keyword or constant it is given as.
_CLASS_PATH = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+):([A-Za-z_]\w*)$")
# The registry's sharder strings name the sharding layer. modules/methods.py only stores them;
# they are resolved by these functions, which only a layer that may import `distributed` calls.
SHARDER_RESOLVERS = ("sharder_class", "method_sharders")


def _files() -> Iterator[Tuple[str, str, ast.AST]]:
    """(subpackage, path, parsed tree) of every file of the package below the top level."""
    for root, _, names in os.walk(PACKAGE):
        rel = os.path.relpath(root, PACKAGE)
        if rel == "." or rel.startswith("__"):
            continue
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    yield rel.split(os.sep)[0], path, ast.parse(f.read())


def _package_of(path: str) -> List[str]:
    """``memcom_torchrec/modules/memory.py`` -> ``["memcom_torchrec", "modules"]``."""
    rel = os.path.relpath(os.path.dirname(path), os.path.dirname(PACKAGE))
    return rel.split(os.sep)


def _from_package(names: List[str]) -> List[str]:
    """``from memcom_torchrec import X``: the module that defines X (the package's lazy public names)."""
    import memcom_torchrec

    return [memcom_torchrec._PUBLIC.get(n, f"memcom_torchrec.{n}") for n in names]


def _imported_modules(path: str, node: ast.AST) -> List[str]:
    """The absolute module names ``node`` imports, relative forms and literal importlib calls included."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        names = [a.name for a in node.names]
        if node.level == 0:
            base = node.module or ""
        else:
            package = _package_of(path)
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        if base == "memcom_torchrec":
            return _from_package(names)
        return [base] if node.module else [f"{base}.{n}" for n in names]  # from . import methods
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
        node.args[0].value, str
    ):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def _subpackage(module: str) -> Optional[str]:
    parts = module.split(".")
    return parts[1] if parts[0] == "memcom_torchrec" and len(parts) > 1 else None


def _registry_strings(tree: ast.AST) -> Iterator[Tuple[ast.Constant, str]]:
    """Every ``"module:Class"`` string constant in ``tree`` with its role: the keyword or name it is given to."""
    roles: Dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg:
            roles[id(node.value)] = node.arg
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            roles[id(node.value)] = node.targets[0].id
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _CLASS_PATH.match(node.value):
            yield node, roles.get(id(node), "")


def _is_sharder_role(role: str) -> bool:
    return role == "sharder" or role.endswith("_SHARDER")


def _imports() -> Dict[str, Set[str]]:
    """Subpackage -> the memcom_torchrec subpackages its files reach, each way above."""
    out: Dict[str, Set[str]] = {sub: set() for sub in FORBIDDEN}
    for sub, path, tree in _files():
        found = out.setdefault(sub, set())
        for node in ast.walk(tree):
            for m in _imported_modules(path, node):
                target = _subpackage(m)
                if target is not None and target != sub:
                    found.add(target)
        for const, role in _registry_strings(tree):
            target = _subpackage(const.value.partition(":")[0])
            if target is not None and target != sub and not _is_sharder_role(role):
                found.add(target)
    return out


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_dependency_arrows_point_one_way(sub: str) -> None:
    wrong = _imports()[sub] & FORBIDDEN[sub]
    assert not wrong, f"memcom_torchrec.{sub} imports memcom_torchrec.{sorted(wrong)}"


def test_nothing_imports_the_experiment_grid() -> None:
    users = [sub for sub, deps in _imports().items() if "experiment" in deps]
    assert not users, users


def test_relative_and_dynamic_imports_are_read() -> None:
    """The reader itself: each form of import below resolves to the module it names."""
    path = os.path.join(PACKAGE, "modules", "memory.py")
    cases = {
        "from ..train import config": "memcom_torchrec.train",
        "from . import methods": "memcom_torchrec.modules.methods",
        "from .. import export": "memcom_torchrec.export",
        "from .qr_configs import X": "memcom_torchrec.modules.qr_configs",
        "import importlib\nimportlib.import_module('memcom_torchrec.experiment.grid')": "memcom_torchrec.experiment.grid",
        "__import__('memcom_torchrec.eval')": "memcom_torchrec.eval",
        "from memcom_torchrec import ShardedQREmbeddingBagCollection": "memcom_torchrec.distributed.qr_embeddingbag",
        "from .. import ShardedMEmComEmbeddingBagCollection": "memcom_torchrec.distributed.memcom_embeddingbag",
    }
    for source, expected in cases.items():
        found = [m for node in ast.walk(ast.parse(source)) for m in _imported_modules(path, node)]
        assert expected in found, (source, found)


def test_registry_strings_resolve_and_sharders_are_resolved_only_above_distributed() -> None:
    """Every ``"module:Class"`` string names a real class; a sharder string names the sharding layer,
    and the functions that resolve sharder strings are called only where ``distributed`` may be imported."""
    problems = []
    n_strings = 0
    for sub, path, tree in _files():
        where = os.path.relpath(path, PACKAGE)
        for const, role in _registry_strings(tree):
            n_strings += 1
            module, _, name = const.value.partition(":")
            try:
                getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                problems.append(f"{where}:{const.lineno}: '{const.value}' does not resolve ({e})")
            in_sharding_layer = _subpackage(module) == "distributed" or module.startswith("torchrec.distributed.")
            if _is_sharder_role(role) and not in_sharding_layer:
                problems.append(f"{where}:{const.lineno}: sharder '{const.value}' is not in a distributed package")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in SHARDER_RESOLVERS and not where.endswith(os.path.join("modules", "methods.py")) and \
                        "distributed" in FORBIDDEN.get(sub, set()):
                    problems.append(f"{where}:{node.lineno}: calls {name}() but {sub} may not import distributed")
    assert n_strings >= 6, f"found only {n_strings} registry strings: the reader is broken"
    assert not problems, "\n".join(problems)


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
