"""Session state "on a device" that is the host: the CUDA path's code, run on the CPU.

`device_arrays()` is StateArrays with a stand-in for CuPy: every array of its `xp` is a
`DeviceArray`, which NumPy's functions refuse (as they refuse CuPy arrays), and the store,
batch, commit, roll-out and runtime code takes its device branches (`xp is not numpy`). ONNX
Runtime binds these arrays by pointer on the CPU provider, as it binds CuPy's on CUDA. So a
test sees any place where device state would reach NumPy, or cross to the host, on the way.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from lstm_serve.core.device_arrays import StateArrays

_inside = threading.local()


class DeviceArray(np.ndarray):
    """An array that NumPy functions refuse unless called through `DeviceModule`."""

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if not getattr(_inside, "on", False):
            raise TypeError(f"numpy.{func.__name__} was given device state")
        return super().__array_function__(func, types, args, kwargs)


def _device(a: Any) -> Any:
    return a.view(DeviceArray) if isinstance(a, np.ndarray) else a


class DeviceModule:
    """The slice of CuPy's API that lstm-serve uses, over NumPy, returning DeviceArrays."""

    def __getattr__(self, name: str) -> Any:
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type):
            return f

        def call(*args: Any, **kwargs: Any) -> Any:
            _inside.on = True
            try:
                return _device(f(*args, **kwargs))
            finally:
                _inside.on = False

        return call

    def asarray(self, a: Any) -> Any:
        return np.array(a).view(DeviceArray)  # a copy, as a host -> device copy is

    def asnumpy(self, a: Any) -> np.ndarray:
        return np.array(a.view(np.ndarray))  # a copy, as a device -> host copy is


def device_arrays() -> StateArrays:
    return StateArrays(DeviceModule(), "cpu", resident=True)


def host(a: Any) -> np.ndarray:
    """A device array's values, for a test's own checks."""
    return np.array(a.view(np.ndarray))


class OnDevice:
    """A NumPy runtime (a test's model) given device state: reads it as ONNX Runtime would
    read device memory, and hands its new state back as device arrays."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def run(self, x: np.ndarray, h0: Any, c0: Any) -> Any:
        y, hn, cn = self.runtime.run(x, host(h0), host(c0))
        return y, _device(np.array(hn)), _device(np.array(cn))
