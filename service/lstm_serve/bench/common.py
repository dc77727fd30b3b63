"""Shared pieces of the benchmark: the benchmark model, /proc readings and summary statistics."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class BenchModel:
    """The model every server runs: a repository holding only that model version."""

    repository: Path  # a repository directory with exactly this one model version
    name: str
    version: str
    kind: str
    input_dim: int
    output_dim: int
    layers: int
    hidden: int
    source: str  # where it came from (the shipped model, or a freshly built stand-in)

    @property
    def version_dir(self) -> Path:
        return self.repository / self.name / self.version

    @property
    def state_bytes_per_session(self) -> int:
        """Raw bytes of one session's state: h and c, layers x hidden float32 each."""
        return 2 * self.layers * self.hidden * 4

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["repository"] = str(self.repository)
        return d


def prepare_model(repository: Path, name: str, version: str, workdir: Path) -> BenchModel:
    """Copy the benchmark model into workdir/models (so servers load only it)."""
    from lstm_serve.core.repository import load_repository

    repo = load_repository(repository, check_graph=True)
    if name not in repo.models:
        have = ", ".join(sorted(repo.models)) or "none"
        raise RuntimeError(
            f"model {name!r} not found in {repository} (it has: {have}); "
            "pass --model-repository or --model"
        )
    mv = repo.get(name, version)
    m = mv.manifest
    target = workdir / "models"
    shutil.copytree(mv.directory, target / m.name / m.version)
    return BenchModel(
        target, m.name, m.version, m.kind.value, m.input_dim, m.output_dim, m.layers,
        m.hidden_size, f"{mv.directory} (sha256 {m.sha256[:12]})",
    )  # fmt: skip


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lstm-serve-bench-"))


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy (not idle, not iowait) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the peak RSS since the process started or since reset_peak_rss()."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


# -- statistics -------------------------------------------------------------------------------


def latency_summary(seconds: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50/p95/p99/mean/max in milliseconds (NaN when there are no samples)."""
    a = np.asarray(seconds, np.float64)
    if a.size == 0:
        nan = float("nan")
        return {"p50": nan, "p95": nan, "p99": nan, "mean": nan, "max": nan}
    p50, p95, p99 = np.percentile(a, [50, 95, 99]) * 1e3
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(a.mean() * 1e3),
        "max": float(a.max() * 1e3),
    }


def mib(n: float) -> float:
    return n / (1024 * 1024)
