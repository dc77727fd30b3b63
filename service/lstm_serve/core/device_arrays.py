"""Where session state lives: NumPy arrays on the host, or CuPy arrays in GPU memory.

The store's h and c columns, a tick's gathered state and the model's new state are arrays of
`xp` (numpy or cupy): one code path for both devices, the difference only where arrays live.
With state on the device (`resident`), ONNX Runtime reads h0 and c0 from device memory and
writes hn and cn there (IOBinding by pointer): only inputs, outputs and slot indices cross the
bus. Everything that needs state on the host (snapshots, the shared store, roll-out starts on
the CPU session) asks for it in one batched copy, counted in `moved`.

CuPy was chosen over ONNX Runtime OrtValues with gather/scatter graphs because a scatter must
write into the arena in place: an ONNX ScatterND returns a new tensor, so each tick would copy
the whole [layers, capacity, hidden] arena; and over torch because torch is never needed to
serve. CuPy comes with the `gpu` extra.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StateArrays:
    """An array module and where its arrays live.

    where: "cpu" or "cuda" (the IOBinding device type); resident: ONNX Runtime is bound to
    these arrays by pointer (state never goes through the host on the hot path). The host
    default (numpy, not resident) is the CPU path as it always was.
    """

    xp: Any = np
    where: str = "cpu"
    resident: bool = False
    # Bytes copied host -> device ("in") and device -> host ("out") for state, and the calls.
    moved: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0, "calls": 0})

    @property
    def on_host(self) -> bool:
        """NumPy itself: the host path, with its NumPy-only shortcuts."""
        return self.xp is np

    def to_device(self, a: np.ndarray) -> Any:
        if not self.resident:
            return a
        self.moved["in"] += a.nbytes
        self.moved["calls"] += 1
        return self.xp.asarray(a)

    def to_host(self, a: Any) -> np.ndarray:
        if not self.resident:
            return np.asarray(a)
        self.moved["out"] += int(a.nbytes)
        self.moved["calls"] += 1
        if self.on_host:
            return np.array(a)  # a copy, as a device -> host copy is
        out: np.ndarray = self.xp.asnumpy(a)  # CuPy's copy to the host
        return out

    def index(self, slots: np.ndarray) -> Any:
        """Slot indices where the state is (a small copy; not counted as state)."""
        if self.on_host:
            return slots
        return self.xp.asarray(slots)

    def ptr(self, a: Any) -> int:
        """The address ONNX Runtime binds: host memory (NumPy) or device memory (CuPy)."""
        return int(a.ctypes.data) if self.where == "cpu" else int(a.data.ptr)

    def synchronize(self) -> None:
        """Wait for device work launched so far: CuPy launches on the default stream and
        ONNX Runtime on its own, so a gather must be done before a run reads it."""
        if self.where == "cuda":
            self.xp.cuda.get_current_stream().synchronize()


HOST = StateArrays()


def cuda_arrays() -> StateArrays | None:
    """State in GPU memory through CuPy, or None (logged) when CuPy is missing or unusable."""
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        logger.warning(
            "session state stays on the host: CuPy is not installed (pip install "
            "'lstm-serve[gpu]' keeps h and c in GPU memory)"
        )
        return None
    try:
        cupy.zeros(1, cupy.float32).sum().item()
    except Exception as exc:  # no usable device for CuPy (driver or toolkit mismatch)
        logger.warning("session state stays on the host: CuPy cannot use the GPU (%s)", exc)
        return None
    return StateArrays(cupy, "cuda", resident=True)
