#!/usr/bin/env python
"""The shipped charlm's held-out metrics, recomputed from the shipped files with ONNX Runtime.

Scores, in bits per character, the LSTM, the unigram/bigram/Kneser-Ney 5-gram baselines and
`xz -9` on the stdlib test tail of the charlm recipe and on held-out code (files of the pinned
torch package), as `lstm-serve train` does at the end of training (lstm_serve.training.text_eval).
With --write, stores them in models/charlm/1/manifest.json (the model itself is unchanged).

    .venv/bin/python scripts/charlm_baselines.py [--write]
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import onnxruntime as ort

from lstm_serve.training import data as D
from lstm_serve.training import text_eval as TE

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models/charlm/1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the metrics in the manifest")
    args = parser.parse_args()
    d = tomllib.loads((ROOT / "models/charlm/train.toml").read_text())["data"]
    corpus = D.read_corpus(D.stdlib_dir(), d["files"])
    if corpus.sha256 != d["sha256"]:
        raise SystemExit("this Python's stdlib differs from the one charlm was trained on")
    vocab = D.char_vocab()
    ids = D.encode(corpus.text, vocab)
    s = D.chronological_split(len(ids), d["val_fraction"], d["test_fraction"])
    code = TE.held_out_code()
    code_ids = D.encode(code.text, vocab)
    sess = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = sess.get_inputs()[1].shape[2]
    test = TE.graph_bits(sess, hidden, ids[s.val_end - 1 :], ids[s.train_end : s.val_end - 1])
    metrics = TE.metrics(
        ids,
        corpus.text,
        s,
        len(vocab),
        code,
        code_ids,
        test,
        TE.graph_bits(sess, hidden, code_ids, code_ids[:0]),
    )
    print(json.dumps(metrics, indent=2))
    if args.write:
        path = MODEL_DIR / "manifest.json"
        manifest = json.loads(path.read_text())
        metrics["val"] = manifest["metrics"].get("val")
        manifest["metrics"] = metrics
        path.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
