#!/usr/bin/env python
"""The shipped charlm against an interpolated Kneser-Ney 5-gram model and `xz -9`.

Scores, in bits per character: the stdlib test tail of the charlm recipe (the LSTM's state
warmed on the validation text before it, as in the manifest), and Python code that is certainly
not in training: four files of the pinned torch package. The 5-gram model is fitted on the same
training split, over the same 98-token vocabulary; xz compresses each test text on its own (it
adapts to the text, so it is a reference, not a baseline).

    .venv/bin/python scripts/charlm_baselines.py

Not part of CI; models/README.md quotes its output.
"""

from __future__ import annotations

import math
import subprocess
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstm_serve.training import data as D

ROOT = Path(__file__).resolve().parents[1]
ORDER = 5
HELD_OUT = ["nn/modules/rnn.py", "optim/adam.py", "functional.py", "nn/modules/conv.py"]


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
            self.total[n], self.types[n] = tot, typ
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
        full, start = history + text, len(history)
        nats = sum(
            -math.log(self.prob(full[max(0, i - self.order + 1) : i], full[i]))
            for i in range(start, len(full))
        )
        return D.bits(nats / len(text))


def as_text(ids: np.ndarray) -> str:
    """Ids as characters, so that <unk> is one symbol for the n-gram model too."""
    return "".join(chr(33 + int(i)) for i in ids)


def lstm_bits(sess: ort.InferenceSession, hidden: int, ids: np.ndarray, warm: np.ndarray) -> float:
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


def xz_bits(text: str) -> float:
    out = subprocess.run(["xz", "-9", "-c"], input=text.encode(), capture_output=True, check=True)
    return len(out.stdout) * 8 / len(text)


def main() -> None:
    recipe = tomllib.loads((ROOT / "models/charlm/train.toml").read_text())
    d = recipe["data"]
    corpus = D.read_corpus(D.stdlib_dir(), d["files"])
    if corpus.sha256 != d["sha256"]:
        print("warning: this Python's stdlib differs from the one charlm was trained on")
    vocab = D.char_vocab()
    ids = D.encode(corpus.text, vocab)
    s = D.chronological_split(len(ids), d["val_fraction"], d["test_fraction"])
    tdir = Path(torch.__file__).parent
    held_text = "".join((tdir / f).read_text() + "\n" for f in HELD_OUT)
    held = D.encode(held_text, vocab)
    kn = KneserNey(as_text(ids[: s.train_end]), ORDER, len(vocab))
    sess = ort.InferenceSession(
        str(ROOT / "models/charlm/1/model.onnx"), providers=["CPUExecutionProvider"]
    )
    hidden = sess.get_inputs()[1].shape[2]
    print(f"5-gram discounts: {[round(kn.discount[n], 3) for n in range(1, ORDER + 1)]}")
    stdlib_tail = ids[s.val_end :]
    print(
        f"stdlib tail ({len(stdlib_tail)} chars): LSTM "
        f"{lstm_bits(sess, hidden, ids[s.val_end - 1 :], ids[s.train_end : s.val_end - 1]):.3f}, "
        f"5-gram KN {kn.bits(as_text(stdlib_tail), as_text(ids[s.val_end - ORDER : s.val_end])):.3f}, "
        f"xz -9 {xz_bits(corpus.text[s.val_end :]):.3f} bits/char"
    )
    print(
        f"torch {torch.__version__} {HELD_OUT} ({len(held)} chars): LSTM "
        f"{lstm_bits(sess, hidden, held, held[:0]):.3f}, 5-gram KN {kn.bits(as_text(held)):.3f}, "
        f"xz -9 {xz_bits(held_text):.3f} bits/char"
    )


if __name__ == "__main__":
    main()
