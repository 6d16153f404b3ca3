"""The README works as written: its Python blocks run, and every repository path it names exists.

The Python blocks run in order in one fresh interpreter, as a reader following the README
would run them (the second block uses the first block's ``tables`` and ``kjt``), in a
temporary directory. The DMP block starts its own world of one; the test only gives it a free
port. The docs index (``docs/README.md``) must name every file in ``docs/`` and ``benchmarks/``.
"""

import glob
import itertools
import os
import re
import socket
import subprocess
import sys
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# repository paths as the README writes them (outputs such as runs/ and data/ are not checked)
_PATH = re.compile(r"(?<![\w./-])((?:memcom_torchrec|scripts|docs|benchmarks|launch|tests|datasets|\.ci)/[\w./{},*-]*)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def python_blocks(text: str) -> List[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def expand_braces(path: str) -> List[str]:
    """``docs/a.{md,csv}`` -> ``["docs/a.md", "docs/a.csv"]`` (any number of brace groups)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def named_paths(text: str) -> List[str]:
    """Every repository path a Markdown text names, braces expanded, trailing punctuation dropped."""
    out = []
    for raw in _PATH.findall(text):
        for path in expand_braces(raw.rstrip(".,:;")):
            out.append(path.rstrip("/"))
    return sorted(set(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks(_read(README))
    assert len(blocks) >= 2, "the README's API example and its DMP block"
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["MASTER_PORT"] = str(_free_port())
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the README's Python blocks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "compression_ratio=16.0" in proc.stdout  # the first block's table_memory line
    assert "_entity_weights.item" in proc.stdout    # the DMP block's sharded state dict


def test_readme_paths_exist():
    missing = []
    for path in named_paths(_read(README)):
        hits = glob.glob(os.path.join(ROOT, path)) if "*" in path else [os.path.join(ROOT, path)]
        if not any(os.path.exists(h) for h in hits):
            missing.append(path)
    assert not missing, f"README.md names paths that are not in the repository: {missing}"


def test_docs_index_names_every_file():
    index = _read(os.path.join(ROOT, "docs", "README.md"))
    named = {os.path.basename(p) for raw in re.findall(r"`([^`]+)`", index) for p in expand_braces(raw)}
    files = [p for d in ("docs", "benchmarks") for p in glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True)
             if os.path.isfile(p) and "__pycache__" not in p and os.path.basename(p) != "README.md"]
    unnamed = sorted(os.path.relpath(p, ROOT) for p in files if os.path.basename(p) not in named)
    assert not unnamed, f"docs/README.md does not index: {unnamed}"


def test_readers_of_this_file():
    """The helpers above on the forms the README uses."""
    assert expand_braces("docs/ml1m_pareto.{md,csv,png}") == [
        "docs/ml1m_pareto.md", "docs/ml1m_pareto.csv", "docs/ml1m_pareto.png"]
    text = "see `docs/RESULTS.md`, (`scripts/main_job.sh`.) and ![x](docs/a.{md,png}) but not runs/main/x"
    assert named_paths(text) == ["docs/RESULTS.md", "docs/a.md", "docs/a.png", "scripts/main_job.sh"]
    assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n") == [
        "x = 1\n", "y = 2\n"]
