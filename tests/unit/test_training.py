"""Training pipeline: TBPTT data helpers, baselines, tiny train-and-export runs, reproducibility."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from lstm_serve.core.repository import load_repository  # noqa: E402
from lstm_serve.training import data as D  # noqa: E402
from lstm_serve.training import export as E  # noqa: E402
from lstm_serve.training import text_eval as TE  # noqa: E402
from lstm_serve.training import train as T  # noqa: E402

REAL_RECIPE = """
name = "sine"
kind = "real"
description = "test: two noisy sines"
seed = 7
threads = 1
[data]
source = "csv"
path = "sine.csv"
columns = ["a", "b"]
seasonal_periods = [24]
horizon = 12
val_fraction = 0.1
test_fraction = 0.1
[data.provenance]
source = "synthetic (tests/unit/test_training.py)"
licence = "CC0"
[model]
layers = 2
hidden_size = 12
[train]
batch = 8
bptt = 24
epochs = 4
lr = 0.01
level_shift = 0.1
"""

TOKEN_RECIPE = """
name = "chars"
kind = "token"
seed = 7
threads = 1
[data]
source = "text"
root = "."
files = ["a.txt", "b.txt"]
val_fraction = 0.1
test_fraction = 0.1
[data.provenance]
source = "synthetic (tests/unit/test_training.py)"
licence = "CC0"
[model]
layers = 1
hidden_size = 24
embed_dim = 8
[train]
batch = 4
bptt = 32
epochs = 3
lr = 0.01
lr_schedule = "cosine"
eval_streams = 2
"""


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # On a busy 2-core CI box two OpenMP threads stall each other; one is faster and steadier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_real(root: Path) -> Path:
    t = np.arange(1500)
    rng = np.random.default_rng(0)
    a = 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(len(t))
    b = 5 * np.cos(2 * np.pi * t / 24) + 0.5 * np.sin(t / 50)
    rows = "\n".join(f"{i},{x:.4f},{y:.4f}" for i, x, y in zip(t, a, b, strict=True))
    (root / "sine.csv").write_text("t,a,b\n" + rows + "\n")
    (root / "train.toml").write_text(REAL_RECIPE)
    return root / "train.toml"


def _write_token(root: Path) -> Path:
    (root / "a.txt").write_text("def add(a, b):\n    return a + b\n\n" * 60)
    (root / "b.txt").write_text("for i in range(10):\n\tprint(i)  # é\n" * 60)
    (root / "train.toml").write_text(TOKEN_RECIPE)
    return root / "train.toml"


# --------------------------------------------------------------------------- data helpers


def test_streams_are_contiguous_slices_of_the_sequence() -> None:
    seq = np.arange(103)
    s = D.to_streams(seq, 4)
    assert s.shape == (4, 25)
    for b in range(4):
        np.testing.assert_array_equal(s[b], seq[b * 25 : (b + 1) * 25])


@pytest.mark.parametrize("offset", [0, 3])
def test_bptt_chunks_continue_where_the_previous_stopped(offset: int) -> None:
    streams = D.to_streams(np.arange(200), 4)  # 4 x 50
    chunks = list(D.bptt_chunks(streams, 8, offset))
    assert len(chunks) > 2
    for x, y in chunks:
        np.testing.assert_array_equal(y, x + 1)  # targets are the next step
        assert x.shape[1] <= 8
    xs = np.concatenate([x for x, _ in chunks], axis=1)
    # Chunks tile each stream without gaps or overlap, from offset to the last input step.
    np.testing.assert_array_equal(xs, streams[:, offset:-1])
    for (x0, _), (x1, _) in itertools.pairwise(chunks):
        np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)


def test_train_epoch_carries_detached_state_across_chunks() -> None:
    from lstm_serve.training.model import RealLSTM

    torch.manual_seed(0)
    model = RealLSTM(1, 1, hidden_size=6, layers=2)
    streams = D.to_streams(np.sin(np.arange(300) / 5).astype(np.float32)[:, None], 3)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):  # type: ignore[no-untyped-def]
        out, hn, cn = model.forward_normalised(x, h, c)
        seen.append((h, c, hn.detach().clone(), cn.detach().clone()))
        return out, hn, cn

    spec = T.TrainSpec(batch=3, bptt=10, epochs=1, lr=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    chunk_loss = T.plain_chunk_loss(forward, torch.nn.functional.mse_loss)
    loss, finished = T.train_epoch(model, chunk_loss, streams, spec, opt, 0, float("inf"))
    assert finished and math.isfinite(loss)
    assert len(seen) == 10  # 99 input steps per stream in chunks of 10
    assert torch.count_nonzero(seen[0][0]) == 0 and torch.count_nonzero(seen[0][1]) == 0
    for (_, _, hn, cn), (h_next, c_next, _, _) in itertools.pairwise(seen):
        assert not h_next.requires_grad and not c_next.requires_grad  # truncated: detached
        assert torch.equal(h_next, hn) and torch.equal(c_next, cn)  # ... but carried
        assert torch.count_nonzero(h_next) > 0


def test_cosine_schedule_steps_once_per_chunk_down_to_zero() -> None:
    from lstm_serve.training.model import RealLSTM

    torch.manual_seed(0)
    model = RealLSTM(1, 1, hidden_size=4, layers=1)
    streams = D.to_streams(np.sin(np.arange(300) / 5).astype(np.float32)[:, None], 3)
    n = D.chunks_per_epoch(streams.shape[1], 10)
    assert n == len(list(D.bptt_chunks(streams, 10))) == 10
    spec = T.TrainSpec(batch=3, bptt=10, epochs=2, lr=0.01, lr_schedule="cosine")
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = T.cosine_schedule(opt, spec.epochs * n)
    seen: list[float] = []
    plain = T.plain_chunk_loss(model.forward_normalised, torch.nn.functional.mse_loss)

    def chunk_loss(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, c: torch.Tensor):  # type: ignore[no-untyped-def]
        seen.append(opt.param_groups[0]["lr"])
        return plain(x, y, h, c)

    for _ in range(3):  # one epoch more than planned: the lr stays at 0
        T.train_epoch(model, chunk_loss, streams, spec, opt, 0, float("inf"), sched)
    assert len(seen) == 3 * n
    assert seen[0] == 0.01 and seen[n] == pytest.approx(0.005)
    assert all(a > b for a, b in itertools.pairwise(seen[: 2 * n]))
    assert seen[2 * n :] == [0.0] * n


def test_chronological_split_keeps_the_tail_for_test() -> None:
    s = D.chronological_split(1000, 0.15, 0.1)
    assert (s.train_end, s.val_end, s.n) == (750, 900, 1000)
    with pytest.raises(ValueError):
        D.chronological_split(1000, 0.6, 0.5)


def test_split_by_steps_holds_out_whole_years() -> None:
    s = D.split_by_steps(43824, 8760, 8760)
    assert (s.train_end, s.val_end, s.n) == (26304, 35064, 43824)
    with pytest.raises(ValueError, match="cannot hold"):
        D.split_by_steps(100, 60, 40)


def test_beijing_csv_is_written_hour_after_hour_and_read_as_a_calendar(tmp_path: Path) -> None:
    src = tmp_path / "src.csv"
    head = "No,year,month,day,hour,pm2.5,DEWP,TEMP,PRES,cbwd,Iws,Is,Ir\n"
    rows = [f"{i + 1},2012,12,31,{22 + i},NA,-{5 + i},{i},1020,NW,1,0,0\n" for i in range(2)]
    rows.append("3,2013,1,1,0,NA,-7,2,1020,NW,1,0,0\n")
    src.write_text(head + "".join(rows))
    out = tmp_path / "out.csv"
    assert D.write_beijing_csv(out, src) == 3
    assert out.read_text().splitlines() == [
        "time,temp_c,dew_point_c", "2012-12-31 22:00,0,-5", "2012-12-31 23:00,1,-6",
        "2013-01-01 00:00,2,-7",
    ]  # fmt: skip
    cal = D.load_csv_calendar(out, "time")
    assert cal.hour.tolist() == [22, 23, 0] and cal.day.tolist() == [366, 366, 1]
    # an hour missing is refused, naming the row
    src.write_text(head + rows[0] + rows[2])
    with pytest.raises(ValueError, match="row 2"):
        D.write_beijing_csv(out, src)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,temp_c\n2013-01-01 25:00,1\n")
    with pytest.raises(ValueError, match="line 2"):
        D.load_csv_calendar(bad, "time")


def test_mae_rmse() -> None:
    mae, rmse = D.mae_rmse(np.array([1.0, 3.0]), np.array([0.0, 0.0]))
    assert (mae, rmse) == (2.0, math.sqrt(5.0))


def test_vocab_and_ngram_baselines() -> None:
    vocab = D.char_vocab()
    assert vocab[0] == D.UNK and len(vocab) == len(set(vocab)) == 98
    ids = D.encode("a\tb\né", vocab)
    assert ids.tolist() == [vocab.index("a"), 1, vocab.index("b"), 2, 0]
    # A periodic text is perfectly predictable from the previous char: bigram << unigram.
    text = D.encode("abcd" * 500, vocab)
    train, test = text[:1600], text[1600:]
    uni = D.unigram_bits(train, test, len(vocab))
    bi = D.bigram_bits(train, test, len(vocab), 0.01, previous=int(train[-1]))
    assert uni == pytest.approx(2.0, abs=0.1)
    assert bi < 0.1
    assert D.best_bigram_alpha(train, test, len(vocab)) == 0.01


def test_recipe_validation() -> None:
    bad = TOKEN_RECIPE.replace("embed_dim = 8\n", "")
    import tomllib

    with pytest.raises(ValueError, match="embed_dim"):
        T.Recipe.model_validate(tomllib.loads(bad))
    with pytest.raises(ValueError):
        T.Recipe.model_validate(tomllib.loads(REAL_RECIPE.replace("lr = 0.01", "lr = -1")))


# --------------------------------------------------------------------------- tiny runs


def test_train_and_export_both_kinds(tmp_path: Path) -> None:
    repo, runs = tmp_path / "repo", tmp_path / "runs"
    (tmp_path / "r").mkdir()
    (tmp_path / "t").mkdir()
    results = {
        "sine": T.train(_write_real(tmp_path / "r"), out=repo, runs=runs),
        "chars": T.train(_write_token(tmp_path / "t"), out=repo, runs=runs),
    }
    for name, res in results.items():
        assert res.history[-1].train_loss < 0.7 * res.history[0].train_loss, name
        assert res.checkpoint == runs / name / "checkpoint.pt" and res.checkpoint.is_file()
        assert res.export_dir == repo / name / "1"
        manifest = json.loads((repo / name / "1" / "manifest.json").read_text())
        assert manifest["training"]["epochs_run"] == len(res.history)
        assert manifest["training"]["seed"] == 7
        assert manifest["metrics"]["model"] and manifest["metrics"]["baselines"]
    loaded = load_repository(repo)
    assert loaded.errors == []
    assert sorted(loaded.models) == ["chars", "sine"]
    sine = loaded.get("sine").manifest
    assert (sine.input_dim, sine.output_dim, sine.layers, sine.hidden_size) == (2, 2, 2, 12)
    assert sine.normalisation is not None and sine.normalisation.in_graph
    assert set(sine.metrics["baselines"]) == {  # type: ignore[arg-type]
        "persistence",
        "seasonal_naive_24",
        "holt_winters",
        "linear_ar",
        "direct_linear",  # no time column in this recipe: no calendar baselines
    }
    assert sine.metrics["horizons"] == [1, 12]
    for h in ("h1", "h12"):
        assert set(sine.metrics["model"][h]["per_column"]) == {"a", "b"}  # type: ignore[index]
    chars = loaded.get("chars").manifest
    assert chars.output == "probabilities" and chars.vocab == D.char_vocab()
    assert chars.data.files == ["a.txt", "b.txt"]
    # Training scores the test tail and held-out code, beside every baseline, on both.
    assert chars.metrics["held_out_code"]["files"] == list(TE.HELD_OUT_FILES)
    for key in ("test_bits_per_char", "held_out_code_bits_per_char"):
        assert chars.metrics["model"][key] > 0, key
        for name in ("unigram", "bigram", "kn5", "xz_9"):
            assert chars.metrics["baselines"][name][key] > 0, (name, key)
    # No staging directories left behind.
    assert sorted(p.name for p in repo.iterdir()) == ["chars", "sine"]


def test_existing_version_is_refused_before_training(tmp_path: Path) -> None:
    recipe = _write_real(tmp_path)
    (tmp_path / "repo" / "sine" / "1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--force"):
        T.train(recipe, out=tmp_path / "repo", runs=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    recipe = _write_real(tmp_path)

    def weights(seed_text: str, run: str) -> dict[str, torch.Tensor]:
        recipe.write_text(REAL_RECIPE.replace("seed = 7", seed_text))
        res = T.train(recipe, runs=tmp_path / run, export=False)
        state: dict[str, torch.Tensor] = E.load_checkpoint(res.checkpoint)["state_dict"]
        return state

    first, second = weights("seed = 7", "a"), weights("seed = 7", "b")
    other = weights("seed = 8", "c")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_export_command_reexports_a_checkpoint(tmp_path: Path) -> None:
    res = T.train(_write_token(tmp_path), runs=tmp_path / "runs", export=False)
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(res.checkpoint), "--out", str(tmp_path / "m")])
    assert E.run(args) == 0
    assert load_repository(tmp_path / "m").get("chars", "1").manifest.kind.value == "token"
    assert E.run(args) == 1  # the version exists now: refused without --force
    args.force = True
    assert E.run(args) == 0


def test_merged_ensemble_is_the_mean_of_its_members() -> None:
    from lstm_serve.training.model import RealLSTM, merge_real_ensemble

    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(
            RealLSTM(2, 2, 8, 2, 0.0, [1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0], [0.1, 0.2])
        )
    merged = merge_real_ensemble(members).eval()
    x = torch.randn(4, 9, 2) * 3
    h = torch.randn(2, 4, 8) * 0.1
    c = torch.randn(2, 4, 8) * 0.1
    with torch.no_grad():
        outs = [m.eval()(x, h, c) for m in members]
        y, hn, cn = merged(x, torch.cat([h] * 3, dim=2), torch.cat([c] * 3, dim=2))
    torch.testing.assert_close(y, torch.stack([o[0] for o in outs]).mean(0), atol=1e-5, rtol=0)
    # Each member's state is a block of the merged state.
    torch.testing.assert_close(hn[:, :, 8:16], outs[1][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(cn[:, :, 16:], outs[2][2], atol=1e-6, rtol=0)


def test_residual_ensemble_with_rollout_loss_trains_and_exports(tmp_path: Path) -> None:
    recipe = _write_real(tmp_path)
    recipe.write_text(
        REAL_RECIPE.replace("hidden_size = 12", "hidden_size = 12\nresidual = true")
        .replace("epochs = 4", "epochs = 2\nensemble = 2\nrollout_weight = 0.1")
        .replace("level_shift = 0.1", "")
    )
    res = T.train(recipe, out=tmp_path / "repo", runs=tmp_path / "runs")
    m = load_repository(tmp_path / "repo").get("sine").manifest
    assert m.hidden_size == 24 and m.training["ensemble"] == 2  # type: ignore[index]
    assert len(res.history) == 4  # two members, two epochs each
    assert all(math.isfinite(e.train_loss) for e in res.history)
    # The export's parity check passed on the merged, residual graph, and it was scored.
    assert set(m.metrics["model"]["h12"]["per_column"]) == {"a", "b"}  # type: ignore[index]


def test_test_values_change_no_trained_weight(tmp_path: Path) -> None:
    """Training, early stopping and normalisation read train and validation only."""
    recipe = _write_real(tmp_path)
    res_a = T.train(recipe, runs=tmp_path / "a", export=False)
    csv_path = tmp_path / "sine.csv"
    lines = csv_path.read_text().splitlines()
    split = D.chronological_split(len(lines) - 1, 0.1, 0.1)
    rng = np.random.default_rng(5)
    for i in range(1 + split.val_end, len(lines)):
        lines[i] = f"{i - 1},{rng.normal(40, 9):.4f},{rng.normal(-30, 9):.4f}"
    csv_path.write_text("\n".join(lines) + "\n")
    res_b = T.train(recipe, runs=tmp_path / "b", export=False)
    a = E.load_checkpoint(res_a.checkpoint)
    b = E.load_checkpoint(res_b.checkpoint)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["model"]["args"] == b["model"]["args"]  # normalisation and residual scale
    assert [e.val for e in res_a.history] == [e.val for e in res_b.history]
    # The test split itself did change: the scores on it differ.
    assert res_a.metrics["model"]["h1"]["mae"] != res_b.metrics["model"]["h1"]["mae"]


# --------------------------------------------------------------------------- univariate series


def _write_one_column(root: Path, rows: int = 700) -> Path:
    t = np.arange(rows)
    rng = np.random.default_rng(1)
    a = 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.2 * rng.standard_normal(rows)
    (root / "one.csv").write_text(
        "t,a\n" + "".join(f"{i},{v:.4f}\n" for i, v in zip(t, a, strict=True))
    )
    recipe = (
        REAL_RECIPE.replace('path = "sine.csv"', 'path = "one.csv"')
        .replace('columns = ["a", "b"]', 'columns = ["a"]')
        .replace("layers = 2", "layers = 1")
        .replace("hidden_size = 12", "hidden_size = 6")
        .replace("batch = 8", "batch = 4")
        .replace("epochs = 4", "epochs = 2")
    )
    (root / "train.toml").write_text(recipe)
    return root / "train.toml"


def test_a_one_column_series_trains_with_its_baselines_fitted_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lstm_serve")
    res = T.train(_write_one_column(tmp_path), out=tmp_path / "repo", runs=tmp_path / "runs")
    assert res.checkpoint.is_file() and res.export_dir == tmp_path / "repo" / "sine" / "1"
    m = load_repository(tmp_path / "repo").get("sine").manifest
    assert (m.input_dim, m.output_dim) == (1, 1)
    baselines = m.metrics["baselines"]
    assert set(baselines) == {
        "persistence",
        "seasonal_naive_24",
        "holt_winters",
        "linear_ar",
        "direct_linear",
    }  # type: ignore[arg-type]
    for h in ("h1", "h12"):
        assert baselines["linear_ar"][h]["model"].startswith("AR(")  # type: ignore[index]
        assert math.isfinite(baselines["linear_ar"][h]["mae"])  # type: ignore[index]
    # The baselines were fitted before the first epoch: one that cannot be fails early.
    messages = [r.getMessage() for r in caplog.records]
    fitted = messages.index("fitting the baselines on the training split")
    first_epoch = next(i for i, msg in enumerate(messages) if msg.startswith("epoch "))
    assert fitted < first_epoch


def test_univariate_ar_is_statsmodels_autoreg() -> None:
    from statsmodels.tsa.ar_model import AutoReg

    from lstm_serve.training.univariate_ar import UnivariateAR

    rng = np.random.default_rng(3)
    y = np.cumsum(rng.standard_normal(400)) + np.sin(np.arange(400) / 4)
    ar = UnivariateAR.fit(y[:, None], 5)
    ref = AutoReg(y, lags=5, trend="c").fit().params  # [const, lag 1, ..., lag 5]
    np.testing.assert_allclose(np.r_[ar.intercept, ar.coefs.ravel()], ref, rtol=1e-9, atol=1e-9)
    # Its forecasts are the AR recursion: one step from origin o is const + sum(phi_j y[o-j+1]).
    orig = np.array([50, 200], np.int64)
    one = ar.forecast(y[:, None], orig, 1)[:, 0, 0]
    expected = [ref[0] + sum(ref[j] * y[o - j + 1] for j in range(1, 6)) for o in orig]
    np.testing.assert_allclose(one, expected, rtol=1e-12)


def test_a_series_that_cannot_be_scored_fails_before_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lstm_serve")
    recipe = _write_one_column(tmp_path)
    # 5% of 700 steps is 35, shorter than a 48-step horizon: nothing could score the model.
    recipe.write_text(
        recipe.read_text()
        .replace("horizon = 12", "horizon = 48")
        .replace("val_fraction = 0.1", "val_fraction = 0.2")
        .replace("test_fraction = 0.1", "test_fraction = 0.05")
    )
    with pytest.raises(ValueError, match="test split is shorter than the horizon 48"):
        T.train(recipe, out=tmp_path / "repo", runs=tmp_path / "runs")
    assert not any(r.getMessage().startswith("epoch ") for r in caplog.records)


@pytest.mark.parametrize(
    "cell,what",
    [
        ("", "'', not a number"),
        ("n/a", "'n/a', not a number"),
        ("nan", "nan, not a finite float32"),
        ("1e39", "1e+39, not a finite float32"),
    ],
)
def test_a_bad_csv_cell_is_named_by_file_line_and_column(
    tmp_path: Path, cell: str, what: str
) -> None:
    path = tmp_path / "s.csv"
    path.write_text(f"t,a,b\n0,1.5,2\n1,2.5,3\n2,{cell},4\n3,4.5,5\n")
    with pytest.raises(ValueError) as err:
        D.load_csv_series(path, ["b", "a"])
    assert str(err.value).startswith(f"{path}, line 4, column 'a': {what}")


def test_a_short_csv_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("t,a,b\n0,1.5,2\n\n1,2.5\n")
    with pytest.raises(ValueError, match=r"s\.csv, line 4, column 'b': no cell$"):
        D.load_csv_series(path, ["a", "b"])
    path.write_text("t,a,b\n0,1.5,2\n\n1,2.5,3\n")
    np.testing.assert_array_equal(D.load_csv_series(path, ["b", "a"]), [[2, 1.5], [3, 2.5]])
