"""The package's dependency arrows point one way, and no module outside a registry compares
method names (``modules.methods``) or scorer names (``models.scorers``).

Every way one module can reach another counts as an import here: ``import`` and
``from ... import`` (absolute or relative, at module level or inside a function),
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name, and
the registries' ``"module:Class"`` strings, which they resolve on use. Two kinds of
registry string name a layer above the registry (``UPWARD_ROLES``): only the layer
that may import it resolves them.
"""

import ast
import importlib
import os
import re
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memcom_torchrec")
METHOD_NAMES = ("uncompressed", "hashing", "memcom", "qr", "memcom_qr", "memcom_2hash", "memcom_freq", "memcom_clustered",
                "memcom_clustered_2hash", "lowrank", "mixed_dim")
SCORER_NAMES = ("linear", "tied", "dot", "mlp")
# The registry's constants of its entries (``models.scorers.LINEAR``...): comparing with them is comparing names.
SCORER_CONSTANTS = ("LINEAR", "TIED", "DOT", "MLP")
METHODS_REGISTRY = os.path.join("modules", "methods.py")
SCORERS_REGISTRY = os.path.join("models", "scorers.py")

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
# Registry strings that name a layer above their registry, by role (the keyword or constant they are
# given as): the layer they must name, and the functions that resolve them, which only a layer that
# may import that one calls. modules/methods.py stores sharders (the sharding layer);
# models/scorers.py stores each scorer's slim parts (the export).
UPWARD_ROLES = {
    "sharder": ("distributed", ("sharder_class", "method_sharders")),
    "slim_parts": ("export", ("slim_parts_builder",)),
}


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


def _upward_role(role: str) -> Optional[str]:
    """The ``UPWARD_ROLES`` key of a registry string's role (``sharder``, ``_MEMCOM_SHARDER``...), or None."""
    return next((r for r in UPWARD_ROLES if role == r or role.endswith("_" + r.upper())), None)


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
            if target is not None and target != sub and _upward_role(role) is None:
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


def test_registry_strings_resolve_and_upward_strings_are_resolved_only_above_their_registry() -> None:
    """Every ``"module:Class"`` string names a real class; a sharder string names the sharding layer and
    a slim-parts string the export, and the functions that resolve them are called only where that
    layer may be imported."""
    problems = []
    n_strings, n_upward = 0, {role: 0 for role in UPWARD_ROLES}
    resolvers = {fn: layer for layer, fns in UPWARD_ROLES.values() for fn in fns}
    for sub, path, tree in _files():
        where = os.path.relpath(path, PACKAGE)
        for const, role in _registry_strings(tree):
            n_strings += 1
            module, _, name = const.value.partition(":")
            try:
                getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                problems.append(f"{where}:{const.lineno}: '{const.value}' does not resolve ({e})")
            upward = _upward_role(role)
            if upward is None:
                continue
            n_upward[upward] += 1
            layer = UPWARD_ROLES[upward][0]
            if _subpackage(module) != layer and not module.startswith(f"torchrec.{layer}."):
                problems.append(f"{where}:{const.lineno}: {upward} '{const.value}' is not in a {layer} package")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                layer = resolvers.get(name)
                in_registry = where in (METHODS_REGISTRY, SCORERS_REGISTRY)
                if layer is not None and not in_registry and layer in FORBIDDEN.get(sub, set()):
                    problems.append(f"{where}:{node.lineno}: calls {name}() but {sub} may not import {layer}")
    assert n_strings >= 10, f"found only {n_strings} registry strings: the reader is broken"
    assert all(n_upward.values()), f"registry strings by upward role {n_upward}: the reader is broken"
    assert not problems, "\n".join(problems)


def _package_files(skip: str) -> Iterator[Tuple[str, ast.AST]]:
    """(path relative to the package, parsed tree) of every file of the package but ``skip``."""
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(".py") and os.path.relpath(path, PACKAGE) != skip:
                with open(path) as f:
                    yield os.path.relpath(path, PACKAGE), ast.parse(f.read())


def _method_constants(node: ast.AST) -> List[str]:
    """Method names written as string constants in ``node`` (or in a tuple/list/set literal it is)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in METHOD_NAMES]


def test_no_method_name_comparisons_outside_the_registry() -> None:
    """No ``x == "memcom"``, ``"qr" != x``, ``x in ("qr", "memcom_qr")`` or ``x.startswith("memcom")``."""
    hits = []
    for where, tree in _package_files(skip=METHODS_REGISTRY):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                found = [c for side in [node.left, *node.comparators] for c in _method_constants(side)]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
                found = [c for arg in node.args for c in _method_constants(arg)]
            else:
                continue
            if found:
                hits.append(f"{where}:{node.lineno}: compares {found}")
    assert not hits, "\n".join(hits)


def _scorer_name_constants(node: ast.AST) -> List[str]:
    """Scorer names written as string constants in ``node`` (or a tuple/list/set literal it is): ``"tied"``,
    and the kinds and suffixes that end in one (``"next_item/tied"``, ``"/mlp"``)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)
            and i.value.rpartition("/")[2] in SCORER_NAMES]


def _names_a_scorer(node: ast.AST) -> bool:
    """``scorer``, ``self.scorer``, ``scorer_name``, ``cfg.scorer``; ``LINEAR``, ``scorers.MLP``, ``TIED.name``:
    an expression that is a scorer's name (or its registry entry), not its properties (``scorer_spec``)."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    if isinstance(name, str) and name.startswith("scorer") and not name.startswith("scorer_spec"):
        return True
    return any((n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)) in SCORER_CONSTANTS
               for n in ast.walk(node))


def _scorer_comparisons(tree: ast.AST) -> List[Tuple[int, str]]:
    """(line, what) of every comparison of a scorer's name in ``tree`` (see the test below)."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            found = [c for side in sides for c in _scorer_name_constants(side)]
            if not any(isinstance(side, ast.Constant) and side.value is None for side in sides):  # not `is None`
                found += [ast.unparse(side) for side in sides if _names_a_scorer(side)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
            found = [c for arg in node.args for c in _scorer_name_constants(arg)]
            if _names_a_scorer(node.func.value):
                found.append(ast.unparse(node.func.value))
        else:
            continue
        if found:
            hits.append((node.lineno, f"compares {found}"))
    return hits


def test_method_names_are_the_registry_s() -> None:
    """The names this test looks for are the registered ones (a new method is added here too)."""
    from memcom_torchrec.modules.methods import method_names

    assert sorted(method_names()) == sorted(METHOD_NAMES)


def test_scorer_names_are_the_registry_s() -> None:
    """The names this test looks for are the registered ones (a new scorer is added here too)."""
    from memcom_torchrec.models import scorers

    assert sorted({s.name for s in scorers.all_scorers()}) == sorted(SCORER_NAMES)
    assert all(getattr(scorers, c).name in SCORER_NAMES for c in SCORER_CONSTANTS)


def test_no_scorer_name_comparisons_outside_the_registry() -> None:
    """No ``scorer == "tied"``, ``self.scorer == LINEAR``, ``x in ("dot", "mlp")``, ``kind.endswith("/mlp")``
    or ``scorer not in SCORERS`` outside ``models/scorers.py``: callers ask the entry (``get_scorer``)."""
    hits = [f"{where}:{line}: {what}" for where, tree in _package_files(skip=SCORERS_REGISTRY)
            for line, what in _scorer_comparisons(tree)]
    assert not hits, "\n".join(hits)


def test_scorer_comparisons_are_read() -> None:
    """The reader itself: each form below is a scorer-name comparison, the registry's own use is not."""
    caught = ['scorer == "tied"', 'self.scorer != "linear"', 'cfg.scorer in ("dot", "mlp")', 'x == "mlp"',
              'slim.kind.endswith("/mlp")', 'kind == "next_item/tied"', 'self.scorer == LINEAR',
              'scorer not in NEXT_ITEM_SCORERS', 'spec is TIED', 'scorer_name.startswith("t")',
              'spec.name == TIED.name', 'spec == scorers.MLP']
    for source in caught:
        assert _scorer_comparisons(ast.parse(source)), source
    for source in ['self.scorer_spec.output_layer', 'spec.pair_network == True', 'scorer is None',
                   'cluster_vectors == "output"', 'get_scorer(model, name)']:
        assert not _scorer_comparisons(ast.parse(source)), source
