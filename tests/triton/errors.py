"""What the Triton-client scripts beside this file record of a refused call (they run as
scripts in the tritonclient venv, so this directory is on their import path)."""

from __future__ import annotations

from typing import Any

from tritonclient.utils import InferenceServerException


def error_of(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": None, "message": None}
