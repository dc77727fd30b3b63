"""charlm's held-out evaluation: the Kneser-Ney baseline, the test tail kept out of fitting, and
every figure in the shipped manifest recomputed from the shipped files."""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import string
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from lstm_serve.core.repository import load_repository
from lstm_serve.training import data as D
from lstm_serve.training import text_eval as TE

MODELS = Path(__file__).resolve().parents[2] / "models"
CODE = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20


def test_kneser_ney_is_a_distribution() -> None:
    text = TE.as_text(D.encode(CODE, D.char_vocab()))
    kn = TE.KneserNey(text, TE.KN_ORDER, len(D.char_vocab()))
    alphabet = [chr(33 + i) for i in range(len(D.char_vocab()))]
    for history in ("", text[:1], text[10:14], "zzzz", text[-4:]):
        assert math.fsum(kn.prob(history, ch) for ch in alphabet) == pytest.approx(1.0, abs=1e-9)
    # Seen continuations are likelier than unseen ones, and the text it was fitted on is cheap.
    assert kn.prob(text[:4], text[4]) > kn.prob(text[:4], "~")
    assert kn.bits(text[:200]) < 1.0 < kn.bits("~}|{" * 50)


def test_xz_bits_is_the_size_of_xz_9() -> None:
    rng = random.Random(0)
    noise = "".join(rng.choice(string.printable) for _ in range(5000))
    assert TE.xz_bits(CODE * 50) < 0.1 < 6.0 < TE.xz_bits(noise)  # repeats compress, noise not
    text = CODE * 50 + noise
    if shutil.which("xz") is None:
        pytest.skip("no xz program to compare with")
    out = subprocess.run(["xz", "-9", "-c"], input=text.encode(), capture_output=True, check=True)
    assert TE.xz_bits(text) == len(out.stdout) * 8 / len(text)


def _metrics(text: str, code_text: str) -> dict[str, Any]:
    vocab = D.char_vocab()
    ids = D.encode(text, vocab)
    split = D.chronological_split(len(ids), 0.1, 0.1)
    code = TE.HeldOutCode(text=code_text, source="test", files=["x.py"])
    return TE.metrics(ids, text, split, len(vocab), code, D.encode(code_text, vocab), 2.0, 3.0)


def test_the_test_texts_change_no_fitted_parameter() -> None:
    """Baselines are fitted on train and tuned on validation: new test values move only scores."""
    text = CODE * 3 + "import os\nprint(os.getcwd())\n" * 30
    n_test = len(text) - D.chronological_split(len(text), 0.1, 0.1).val_end
    other = text[: len(text) - n_test] + "".join(reversed(text[-n_test:])).upper()
    a = _metrics(text, "x = [1, 2, 3]\n")
    b = _metrics(other, "while True:\n    break\n")
    for name, baseline in a["baselines"].items():
        assert baseline["smoothing"] == b["baselines"][name]["smoothing"], name
    assert (
        a["baselines"]["kn5"]["test_bits_per_char"] != b["baselines"]["kn5"]["test_bits_per_char"]
    )
    assert (
        a["model"]
        == b["model"]
        == {
            "test_bits_per_char": 2.0,
            "held_out_code_bits_per_char": 3.0,
        }
    )


def test_charlm_held_out_metrics_reproduce_from_the_shipped_files() -> None:
    """LSTM (ONNX Runtime), unigram, bigram, 5-gram KN and xz -9 on the stdlib tail and on
    held-out torch code, against the manifest; the LSTM must beat the 5-gram on both."""
    ort = pytest.importorskip("onnxruntime")
    mv = load_repository(MODELS).get("charlm", "1")
    m = mv.manifest
    d = tomllib.loads((MODELS / "charlm" / "train.toml").read_text())["data"]
    corpus = D.read_corpus(D.stdlib_dir(), d["files"])
    if corpus.sha256 != d["sha256"]:
        pytest.skip("this Python's stdlib differs from the one charlm was trained on")
    if importlib.util.find_spec(TE.HELD_OUT_PACKAGE) is None:
        pytest.skip(f"{TE.HELD_OUT_PACKAGE} (the held-out code) is not installed")
    code = TE.held_out_code()
    if code.source != m.metrics["held_out_code"]["source"]:
        pytest.skip(f"held-out code is {code.source}, not {m.metrics['held_out_code']['source']}")
    vocab = m.vocab or []
    ids = D.encode(corpus.text, vocab)
    s = D.chronological_split(len(ids), d["val_fraction"], d["test_fraction"])
    code_ids = D.encode(code.text, vocab)
    sess = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    lstm_test = TE.graph_bits(
        sess, m.hidden_size, ids[s.val_end - 1 :], ids[s.train_end : s.val_end - 1]
    )
    lstm_code = TE.graph_bits(sess, m.hidden_size, code_ids, code_ids[:0])
    got = TE.metrics(ids, corpus.text, s, len(vocab), code, code_ids, lstm_test, lstm_code)
    want = m.metrics
    assert got["split"] == want["split"]
    assert got["held_out_code"] == want["held_out_code"]
    assert got["held_out"] == want["held_out"]
    # Training scored the LSTM with torch; ONNX Runtime agrees to rounding.
    for key, v in want["model"].items():
        assert got["model"][key] == pytest.approx(v, abs=2e-3), key
    assert got["baselines"] == want["baselines"]
    for key in ("test_bits_per_char", "held_out_code_bits_per_char"):
        assert want["model"][key] < want["baselines"]["kn5"][key], key
