"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.server import OnePass


@pytest.fixture(scope="module")
def oracle(tiny_repo: Path) -> OnePass:
    """One ONNX Runtime pass of the tiny real model (3 -> 3)."""
    return OnePass(tiny_repo / "tiny" / "1")


@pytest.fixture(scope="module")
def tok_oracle(tiny_repo: Path) -> OnePass:
    """One ONNX Runtime pass of the tiny token model (vocabulary 12)."""
    return OnePass(tiny_repo / "tinytok" / "1")
