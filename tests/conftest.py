"""Shared fixtures. Keep this small and generic; model factories live in tests/helpers/models.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.oracle.one_pass import OnePass

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def shipped_models_dir() -> Path:
    """The model repository shipped with the project (models/)."""
    return PROJECT_ROOT / "models"


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only model repository built once per session: `tiny` (real, 3 -> 3, 2 layers,
    hidden 16) and `tinytok` (token, vocab 12, 2 layers, hidden 16), each at version 1.
    Tests that change files must use `tiny_repo_copy`."""
    from tests.helpers.models import make_model_repo

    root = tmp_path_factory.mktemp("tiny_repo")
    make_model_repo(root, name="tiny", kind="real")
    make_model_repo(root, name="tinytok", kind="token", output_dim=12, seed=1)
    return root


@pytest.fixture
def tiny_repo_copy(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private, writable copy of `tiny_repo`."""
    dst = tmp_path / "models"
    shutil.copytree(tiny_repo, dst)
    return dst


@pytest.fixture(scope="module")
def oracle(tiny_repo: Path) -> OnePass:
    """One pass of the NumPy reference (tests/oracle) over the tiny real model (3 -> 3)."""
    return OnePass(tiny_repo / "tiny" / "1")


@pytest.fixture(scope="module")
def tok_oracle(tiny_repo: Path) -> OnePass:
    """One pass of the NumPy reference (tests/oracle) over the tiny token model (vocabulary 12)."""
    return OnePass(tiny_repo / "tinytok" / "1")
