"""What every test compares the server with: one pass of the NumPy reference over a whole
sequence, from a zero state.

The only code in the tests that computes expected outputs and states is `reference.py`; this
module only reads a model version directory into a `ReferenceModel` and runs one sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.oracle.reference import F32, ReferenceModel


class OnePass:
    """OnePass(repo / "tiny" / "1").run(x): one pass over x from a zero state."""

    def __init__(self, model_dir: Path) -> None:
        self.model = ReferenceModel.from_onnx(model_dir / "model.onnx")

    def run(self, x: np.ndarray) -> tuple[F32, F32, F32]:
        """x: [T, F] float32 or [T] int64 token ids -> y [T, out], hn, cn [layers, hidden]."""
        h0, c0 = self.model.zero_state(1)
        y, hn, cn = self.model.run(x[None], h0, c0)
        return y[0], hn[:, 0], cn[:, 0]
