"""Training progress: a line per epoch with the pace and the ETA, and lines within an epoch."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lstm_serve.training import train as T  # noqa: E402

RECIPE = """
name = "progress"
kind = "real"
seed = 3
threads = 1
[data]
source = "csv"
path = "s.csv"
columns = ["a"]
horizon = 6
[data.provenance]
source = "synthetic (tests/unit/test_train_progress.py)"
licence = "CC0-1.0"
[model]
hidden_size = 8
[train]
batch = 4
bptt = 16
epochs = 4
lr = 0.01
patience = 10
"""

ETA = r"ETA (\d+s|\d+m\d\ds|\d+h\d\dm)( \(time limit\))?"
EPOCH = re.compile(
    rf"^epoch (\d+)/4  train \d+\.\d{{5}}  val_mae \d+\.\d{{5}}( \*)?  lr \S+  "
    rf"\d+\.\ds/epoch  {ETA}$"
)
CHUNK = re.compile(rf"^  epoch (\d+)/4  chunk (\d+)/(\d+)  train \d+\.\d{{5}}  {ETA}$")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _recipe(root: Path) -> Path:
    t = np.arange(400)
    a = 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.1 * np.random.default_rng(0).standard_normal(400)
    (root / "s.csv").write_text(
        "t,a\n" + "".join(f"{i},{v:.4f}\n" for i, v in zip(t, a, strict=True))
    )
    (root / "train.toml").write_text(RECIPE)
    return root / "train.toml"


def test_each_epoch_logs_its_pace_and_eta(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(T, "PROGRESS_EVERY_S", 0.0)  # a line within the epoch after every chunk
    caplog.set_level(logging.INFO, logger="lstm_serve.training.train")
    res = T.train(_recipe(tmp_path), runs=tmp_path / "runs", export=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "lstm_serve.training.train"]
    epochs = [m for line in messages if (m := EPOCH.match(line))]
    assert [int(m[1]) for m in epochs] == [1, 2, 3, 4] == [e.epoch for e in res.history]
    assert epochs[-1][3] == "0s"  # nothing left after the last planned epoch
    chunks = [m for line in messages if (m := CHUNK.match(line))]
    assert chunks, messages
    # Every chunk of every epoch reports, in order, between its epoch's line and the last one
    # (an epoch's chunk count depends on where its truncation points start).
    for e, line in enumerate(epochs, start=1):
        mine = [m for m in chunks if int(m[1]) == e]
        assert [int(m[2]) for m in mine] == list(range(1, int(mine[0][3]) + 1))
        before = messages.index(epochs[e - 2].string) if e > 1 else -1
        assert all(before < messages.index(m.string) < messages.index(line.string) for m in mine)
    # The 10-minute guard is far away.
    assert not any(m[4] for m in epochs) and not any(m[5] for m in chunks)


def test_eta_and_durations() -> None:
    assert [T.format_duration(s) for s in (0, 0.4, 45, 59.6, 60, 185, 3599, 3600, 7620)] == [
        "0s", "0s", "45s", "1m00s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m",
    ]  # fmt: skip
    assert T.eta(185, 1000) == "ETA 3m05s"
    # The wall-clock guard comes first: it is the ETA, and the line says so.
    assert T.eta(185, 30) == "ETA 30s (time limit)"
    assert T.eta(0, 0) == "ETA 0s"
