"""Held-out evaluation of a character model and the baselines it must beat.

Two test texts: the tail of the training corpus (its test split) and Python code that is
certainly not in training (files of the installed torch package, which training needs anyway).
Baselines are fitted on the training split only: add-alpha unigram and bigram models and an
interpolated Kneser-Ney 5-gram. `xz -9` compresses each test text on its own: it adapts to the
text it scores, so it is a reference, not a baseline.

NumPy and the standard library only, so the test suite can recompute every figure.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import lzma
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.training import data as D

KN_ORDER = 5
HELD_OUT_PACKAGE = "torch"
HELD_OUT_FILES = ("nn/modules/rnn.py", "optim/adam.py", "functional.py", "nn/modules/conv.py")


@dataclass(frozen=True)
class HeldOutCode:
    text: str
    source: str
    files: list[str]


def held_out_code(
    package: str = HELD_OUT_PACKAGE, files: Sequence[str] = HELD_OUT_FILES
) -> HeldOutCode:
    """Files of an installed package, concatenated like the corpus (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed")
    corpus = D.read_corpus(Path(spec.origin).parent, files)
    version = importlib.metadata.version(package)
    return HeldOutCode(text=corpus.text, source=f"{package} {version} package", files=list(files))


class KneserNey:
    """Interpolated Kneser-Ney with one count-of-counts discount per order (Chen & Goodman)."""

    def __init__(self, text: str, order: int, vocab_size: int) -> None:
        self.order, self.v = order, vocab_size
        top = Counter(text[i : i + order] for i in range(len(text) - order + 1))
        # Lower orders count the distinct characters that precede each n-gram (continuations).
        self.counts: dict[int, Counter[str]] = {order: top}
        for n in range(order - 1, 0, -1):
            c: Counter[str] = Counter()
            for g in self.counts[n + 1]:
                c[g[1:]] += 1
            self.counts[n] = c
        self.total: dict[int, dict[str, int]] = {}
        self.types: dict[int, dict[str, int]] = {}
        self.discount: dict[int, float] = {}
        for n, c in self.counts.items():
            tot: defaultdict[str, int] = defaultdict(int)
            typ: defaultdict[str, int] = defaultdict(int)
            for g, k in c.items():
                tot[g[:-1]] += k
                typ[g[:-1]] += 1
            self.total[n], self.types[n] = dict(tot), dict(typ)
            cc = Counter(c.values())
            self.discount[n] = cc[1] / (cc[1] + 2 * cc[2]) if cc[1] + 2 * cc[2] else 0.5

    def prob(self, history: str, ch: str) -> float:
        p = 1.0 / self.v
        for n in range(1, self.order + 1):
            ctx = history[len(history) - (n - 1) :] if n > 1 else ""
            if len(ctx) < n - 1:
                break
            tot = self.total[n].get(ctx, 0)
            if tot:
                d = self.discount[n]
                k = self.counts[n].get(ctx + ch, 0)
                p = max(k - d, 0.0) / tot + d * self.types[n][ctx] / tot * p
        return p

    def bits(self, text: str, history: str = "") -> float:
        """Bits per character of `text`, its first characters conditioned on `history`."""
        full, start = history + text, len(history)
        nats = sum(
            -math.log(self.prob(full[max(0, i - self.order + 1) : i], full[i]))
            for i in range(start, len(full))
        )
        return D.bits(nats / len(text))


def graph_bits(sess: Any, hidden: int, ids: D.IntArray, warm: D.IntArray) -> float:
    """Bits/char of ids[1:] given the ids before each, through an exported one-layer graph (an
    ONNX Runtime session: inputs x, h0, c0), its state first run over `warm`."""
    h = np.zeros((1, 1, hidden), np.float32)
    c = h.copy()
    if len(warm):
        _, h, c = sess.run(None, {"x": warm[None], "h0": h, "c0": c})
    total = 0.0
    for i in range(0, len(ids) - 1, 4096):
        x = ids[i : i + 4097]
        y, h, c = sess.run(None, {"x": x[None, :-1], "h0": h, "c0": c})
        total -= float(np.log2(y[0][np.arange(len(x) - 1), x[1:]]).sum())
    return total / (len(ids) - 1)


def as_text(ids: D.IntArray) -> str:
    """Ids as characters, so that <unk> is one symbol for the n-gram model too."""
    return "".join(chr(33 + int(i)) for i in ids)


def xz_bits(text: str) -> float:
    """Bits per character of `xz -9` (the .xz format, preset 9) of the UTF-8 text."""
    return len(lzma.compress(text.encode("utf-8"), preset=9)) * 8 / len(text)


def metrics(
    ids: D.IntArray,
    text: str,
    split: D.Split,
    vocab_size: int,
    code: HeldOutCode,
    code_ids: D.IntArray,
    lstm_test: float,
    lstm_code: float,
) -> dict[str, Any]:
    """The manifest's `metrics`: the LSTM's bits/char beside every baseline's, on both texts.

    `ids` encode `text` (one id per character); the baselines see only ids[:split.train_end]
    when fitted and ids[train_end:val_end] when choosing their smoothing.
    """
    train, val, test = (
        ids[: split.train_end],
        ids[split.train_end : split.val_end],
        ids[split.val_end :],
    )
    alpha = D.best_bigram_alpha(train, val, vocab_size)
    kn = KneserNey(as_text(train), KN_ORDER, vocab_size)
    discounts = ", ".join(f"{kn.discount[n]:.3f}" for n in range(1, KN_ORDER + 1))
    test_key, code_key = "test_bits_per_char", "held_out_code_bits_per_char"
    return {
        "held_out": (
            f"test split = last {len(test)} of {len(ids)} chars (the LSTM's state warmed on the "
            f"validation text before it), and held-out code = {len(code_ids)} chars of "
            f"{code.source} files (scored from a zero state); bits per character; baselines "
            "fitted on the training split; xz -9 compresses each test text on its own "
            "(a reference, not a baseline)"
        ),
        "split": split.as_dict(),
        "held_out_code": {"source": code.source, "files": code.files, "chars": len(code_ids)},
        "model": {test_key: round(lstm_test, 4), code_key: round(lstm_code, 4)},
        "baselines": {
            "unigram": {
                test_key: round(D.unigram_bits(train, test, vocab_size, 1.0), 4),
                code_key: round(D.unigram_bits(train, code_ids, vocab_size, 1.0), 4),
                "smoothing": "add-1",
            },
            "bigram": {
                test_key: round(
                    D.bigram_bits(train, test, vocab_size, alpha, previous=int(val[-1])), 4
                ),
                code_key: round(D.bigram_bits(train, code_ids, vocab_size, alpha), 4),
                "smoothing": f"add-{alpha:g} (chosen on the validation split)",
            },
            "kn5": {
                test_key: round(kn.bits(as_text(test), as_text(val[-(KN_ORDER - 1) :])), 4),
                code_key: round(kn.bits(as_text(code_ids)), 4),
                "smoothing": f"interpolated Kneser-Ney, order {KN_ORDER}, discounts {discounts}",
            },
            "xz_9": {
                test_key: round(xz_bits(text[split.val_end :]), 4),
                code_key: round(xz_bits(code.text), 4),
                "smoothing": "none: xz -9 of each test text alone (a reference)",
            },
        },
    }
