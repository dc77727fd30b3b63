"""An ONNX Runtime session for one model version: device choice, warm-up, run."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Any

import numpy as np
import onnxruntime as ort

from lstm_serve.core.device_arrays import HOST, StateArrays, cuda_arrays
from lstm_serve.core.repository import Kind, ModelVersion

logger = logging.getLogger(__name__)


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _cuda_device_count() -> int:
    """GPUs the CUDA driver sees, asked of libcuda directly so that no ORT error lines appear."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda" or "cpu"
    providers: tuple[str, ...]
    reason: str


@cache
def choose_device(wanted: Device) -> DeviceChoice:
    """Decide once per process where models run, and log it once."""
    available = ort.get_available_providers()
    if wanted is Device.cpu:
        choice = DeviceChoice("cpu", (CPU,), "device=cpu was asked for")
    elif CUDA not in available:
        choice = DeviceChoice("cpu", (CPU,), "this ONNX Runtime build has no CUDA provider")
    elif _cuda_device_count() == 0:
        choice = DeviceChoice("cpu", (CPU,), "no CUDA driver or GPU is visible")
    else:
        choice = DeviceChoice("cuda", (CUDA, CPU), "a GPU is visible")
    if wanted is Device.cuda and choice.device != "cuda":
        raise RuntimeError(f"device=cuda was asked for, but {choice.reason}")
    logger.info("inference device: %s (%s)", choice.device, choice.reason)
    return choice


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """ONNX Runtime options for serving (the benchmarks' ceilings use the same)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # The inference thread shares the machine with the event loop: spinning threads would
    # take the cores the gRPC server needs between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    if intra_op_threads > 0:
        opts.intra_op_num_threads = intra_op_threads
    return opts


def run_bound(
    session: ort.InferenceSession, feeds: dict[str, Any], out_names: list[str]
) -> list[np.ndarray]:
    """One CUDA call through IOBinding: one host-to-device copy per input, outputs copied
    back once (the raw benchmark's "host" ceiling calls this too)."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name in out_names:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    out: list[np.ndarray] = binding.copy_outputs_to_cpu()
    return out


class ModelRuntime:
    """Runs one model version: run(x, h0, c0) -> (y, hn, cn) with the graph contract in docs/architecture.md.

    On CUDA, batches of at most `cpu_max_steps` session-steps run on a CPU session instead:
    for them the GPU's copies and kernel launches cost more than the CPU's arithmetic
    (docs/benchmarks.md, "The CUDA path"), so one-step streams keep CPU latency while gateway
    frames get the GPU. Both sessions run the same graph in float32.

    State lives in `arrays` (device_arrays.py): on CUDA with CuPy, h and c stay in GPU memory
    and are bound by pointer (state_on_device); otherwise NumPy arrays on the host. h0 and c0
    passed to run() and the hn and cn it returns are arrays of that module; x and y are NumPy.
    """

    def __init__(
        self,
        mv: ModelVersion,
        choice: DeviceChoice,
        intra_op_threads: int = 1,
        cpu_max_steps: int = 0,
        state_on_device: bool = True,
        arrays: StateArrays | None = None,
    ) -> None:
        self.mv = mv
        m = mv.manifest
        self.names = m.tensors
        self.session = ort.InferenceSession(
            str(mv.onnx_path), session_options(intra_op_threads), providers=list(choice.providers)
        )
        active = self.session.get_providers()
        self.device = "cuda" if active and active[0] == CUDA else "cpu"
        if choice.device == "cuda" and self.device != "cuda":
            logger.warning("%s: CUDA provider did not load; running on the CPU", m.name)
        if arrays is None:
            cuda = self.device == "cuda" and state_on_device
            arrays = (cuda_arrays() if cuda else None) or HOST
        if arrays.where != self.device and arrays.resident:
            raise ValueError(f"state arrays on {arrays.where}, model on {self.device}")
        self.arrays = arrays
        self.cpu_max_steps = cpu_max_steps if self.device == "cuda" else 0
        self.cpu_session: ort.InferenceSession | None = None
        if self.cpu_max_steps > 0:
            self.cpu_session = ort.InferenceSession(
                str(mv.onnx_path), session_options(intra_op_threads), providers=[CPU]
            )
            logger.info(
                "%s: batches of up to %d steps run on the CPU, larger ones on CUDA",
                m.name, self.cpu_max_steps,
            )  # fmt: skip
        self.x_dtype = np.int64 if m.kind is Kind.token else np.float32
        self._out_names = [self.names.y, self.names.hn, self.names.cn]
        self.calls = {"cpu": 0, "cuda": 0}  # inference calls per device, for tests and logs

    def run(self, x: np.ndarray, h0: Any, c0: Any) -> tuple[np.ndarray, Any, Any]:
        if self.cpu_session is not None and x.shape[0] * x.shape[1] <= self.cpu_max_steps:
            self.calls["cpu"] += 1
            a = self.arrays
            feeds = {self.names.x: x, self.names.h0: a.to_host(h0), self.names.c0: a.to_host(c0)}
            y, hn, cn = self.cpu_session.run(self._out_names, feeds)
            return y, a.to_device(hn), a.to_device(cn)
        self.calls[self.device] += 1
        if self.arrays.resident:
            return self._run_resident(x, h0, c0)
        feeds = {self.names.x: x, self.names.h0: h0, self.names.c0: c0}
        if self.device == "cuda":
            y, hn, cn = run_bound(self.session, feeds, self._out_names)
        else:
            y, hn, cn = self.session.run(self._out_names, feeds)
        return y, hn, cn

    def _run_resident(self, x: np.ndarray, h0: Any, c0: Any) -> tuple[np.ndarray, Any, Any]:
        """State bound by pointer where it lives: x goes in, y comes out, h and c stay."""
        a, n = self.arrays, self.names
        xp = a.xp
        hn, cn = xp.empty_like(h0), xp.empty_like(c0)
        binding = self.session.io_binding()
        binding.bind_cpu_input(n.x, x)
        binding.bind_output(n.y, "cpu")  # first: get_outputs() keeps the order of binding
        for name, arr in ((n.h0, h0), (n.c0, c0), (n.hn, hn), (n.cn, cn)):
            bind = binding.bind_input if arr is h0 or arr is c0 else binding.bind_output
            bind(name, a.where, 0, np.float32, arr.shape, a.ptr(arr))
        a.synchronize()  # the gather that made h0 and c0 is done before ONNX Runtime reads them
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # hn and cn are written before anything reads them
        y: np.ndarray = binding.get_outputs()[0].numpy()
        return y, hn, cn

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run once per batch size so the first requests don't pay for lazy initialisation
        (with a CPU session for small batches, once more with a batch that reaches the GPU)."""
        m = self.mv.manifest
        if self.cpu_session is not None:
            batch_sizes = (*batch_sizes, self.cpu_max_steps + 1)
        for b in batch_sizes:
            x = (
                np.zeros((b, 1), np.int64)
                if m.kind is Kind.token
                else np.zeros((b, 1, m.input_dim), np.float32)
            )
            h = self.arrays.xp.zeros((m.layers, b, m.hidden_size), np.float32)
            self.run(x, h, h)
