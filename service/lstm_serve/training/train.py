"""`lstm-serve train models/<name>/train.toml`: train an LSTM with truncated BPTT, then export it.

The recipe (TOML, validated by `Recipe`) fixes data, model, optimiser and seed, so the same
command on the same machine reproduces the shipped artifact. Training splits the series into
[batch] parallel streams and walks them in chunks of `bptt` steps, carrying (h, c) from chunk to
chunk (detached), so the model learns from context far longer than one chunk.

torch is imported inside functions: the serving install has no torch and cli.py imports this
module to build its parser.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import random
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lstm_serve.core.repository import Kind
from lstm_serve.training import data as D
from lstm_serve.training.export import CHECKPOINT_FORMAT, ExportError, export_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

State = tuple["torch.Tensor", "torch.Tensor"]
PROGRESS_EVERY_S = 30.0


# --------------------------------------------------------------------------- the recipe


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    licence: str
    description: str = ""


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["csv", "text"]
    path: str | None = Field(None, description="csv: the file, relative to the recipe")
    columns: list[str] = Field(default_factory=list, description="csv: feature columns")
    root: str = Field("stdlib", description="text: 'stdlib' or a directory relative to the recipe")
    files: list[str] = Field(default_factory=list, description="text: files, in this order")
    sha256: str | None = Field(None, description="text: expected sha256 of the concatenation")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seasonal_period: int | None = Field(None, ge=1, description="real: seasonal-naive period")
    provenance: Provenance


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: int = Field(1, ge=1)
    hidden_size: int = Field(ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    embed_dim: int | None = Field(None, ge=1, description="token models only")


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch: int = Field(ge=1, description="parallel streams the training split is cut into")
    bptt: int = Field(ge=1, description="steps per chunk; (h, c) is carried across chunks")
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, gt=0, description="max gradient norm")
    patience: int = Field(5, ge=1, description="epochs without val improvement before stopping")
    lr_patience: int = Field(2, ge=0, description="epochs without improvement before lr decays")
    lr_factor: float = Field(0.5, gt=0, le=1)
    max_minutes: float = Field(10.0, gt=0, description="wall-clock guard (breaks reproducibility)")
    eval_streams: int = Field(8, ge=1, description="token models: streams for validation")
    level_shift: float = Field(
        0.0,
        ge=0,
        description="real models: std (normalised units) of a random per-stream, per-epoch "
        "offset added to inputs and targets",
    )


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Kind
    description: str = ""
    seed: int = 0
    threads: int = Field(2, ge=1, description="torch threads; results depend on it")
    data: DataSpec
    model: ModelSpec
    train: TrainSpec

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.kind is Kind.real:
            if self.data.source != "csv" or not self.data.path or not self.data.columns:
                raise ValueError("real models need data.source = 'csv', data.path, data.columns")
        else:
            if self.data.source != "text" or not self.data.files:
                raise ValueError("token models need data.source = 'text' and data.files")
            if self.model.embed_dim is None:
                raise ValueError("token models need model.embed_dim")
        return self


def load_recipe(path: Path) -> Recipe:
    with path.open("rb") as f:
        return Recipe.model_validate(tomllib.load(f))


# --------------------------------------------------------------------------- results


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val: float
    seconds: float


@dataclass
class TrainResult:
    checkpoint: Path
    export_dir: Path | None
    history: list[EpochStats] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared machinery


def seed_everything(seed: int, threads: int) -> None:
    """Same seed, same threads, same machine -> bit-identical weights."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Thread count changes reduction order in matmuls, so it is part of the recipe.
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def zero_state(layers: int, batch: int, hidden: int) -> State:
    import torch

    return torch.zeros(layers, batch, hidden), torch.zeros(layers, batch, hidden)


Forward = Callable[
    ["torch.Tensor", "torch.Tensor", "torch.Tensor"],
    tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"],
]
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def train_epoch(
    model: nn.Module,
    forward: Forward,
    loss_fn: LossFn,
    streams: np.ndarray[Any, Any],
    spec: TrainSpec,
    opt: torch.optim.Optimizer,
    offset: int,
    deadline: float,
) -> tuple[float, bool]:
    """One pass of truncated BPTT over streams [batch, L, ...]; (mean loss, finished in time)."""
    import torch

    lstm: torch.nn.LSTM = model.lstm  # type: ignore[assignment]
    state = zero_state(lstm.num_layers, streams.shape[0], lstm.hidden_size)
    model.train()
    total, count = 0.0, 0
    n_chunks = -(-(streams.shape[1] - 1 - offset) // spec.bptt)
    next_note = time.monotonic() + PROGRESS_EVERY_S
    for x, y in D.bptt_chunks(streams, spec.bptt, offset):
        # Carry the state's value but not its history: gradients stop at the chunk boundary.
        h, c = state[0].detach(), state[1].detach()
        out, hn, cn = forward(torch.from_numpy(np.ascontiguousarray(x)), h, c)
        loss = loss_fn(out, torch.from_numpy(np.ascontiguousarray(y)))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        state = (hn, cn)
        total += float(loss.item())
        count += 1
        now = time.monotonic()
        if now > next_note:  # long epochs (text) still show signs of life
            logger.info("  chunk %d/%d  train_loss %.5f", count, n_chunks, total / count)
            next_note = now + PROGRESS_EVERY_S
        if now > deadline:
            return total / count, False
    return total / max(count, 1), True


# --------------------------------------------------------------------------- tasks


class RealTask:
    """Next-step forecasting of a multivariate series; targets are the next step's features."""

    def __init__(self, recipe: Recipe, base: Path) -> None:
        assert recipe.data.path is not None
        self.recipe = recipe
        self.path = base / recipe.data.path
        self.series = D.load_csv_series(self.path, recipe.data.columns)
        self.split = D.chronological_split(
            len(self.series), recipe.data.val_fraction, recipe.data.test_fraction
        )
        train = self.series[: self.split.train_end].astype(np.float64)
        # Statistics of the training split only: nothing from the held-out tail leaks in.
        self.mean = train.mean(axis=0).astype(np.float32)
        self.std = np.maximum(train.std(axis=0), 1e-6).astype(np.float32)
        z = (self.series - self.mean) / self.std
        self.streams = D.to_streams(z[: self.split.train_end], recipe.train.batch)
        period = recipe.data.seasonal_period
        if period is not None and self.split.val_end < period:
            raise ValueError(f"seasonal period {period} is longer than the history before test")

    def epoch_streams(self, rng: np.random.Generator) -> np.ndarray[Any, Any]:
        """Training streams for one epoch, shifted by a random level per stream when asked.

        The dynamics of a temperature curve do not depend on its level; without this the model
        keys its forecasts on the level, and a held-out season at levels seen only in another
        season's shape is forecast badly.
        """
        shift = self.recipe.train.level_shift
        if shift == 0:
            return self.streams
        b, _, f = self.streams.shape
        offsets = rng.normal(0.0, shift, size=(b, 1, f)).astype(np.float32)
        shifted: np.ndarray[Any, Any] = self.streams + offsets
        return shifted

    def build_model(self) -> nn.Module:
        from lstm_serve.training.model import RealLSTM

        return RealLSTM(**self.model_args())

    def model_args(self) -> dict[str, Any]:
        m = self.recipe.model
        f = len(self.recipe.data.columns)
        return {
            "input_dim": f,
            "output_dim": f,
            "hidden_size": m.hidden_size,
            "layers": m.layers,
            "dropout": m.dropout,
            "in_mean": self.mean.tolist(),
            "in_std": self.std.tolist(),
            "out_mean": self.mean.tolist(),
            "out_std": self.std.tolist(),
        }

    def forward(self, model: nn.Module) -> Forward:
        fn: Forward = model.forward_normalised  # type: ignore[assignment]
        return fn

    @staticmethod
    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.mse_loss(out, y)

    def predict(self, model: nn.Module, end: int) -> np.ndarray[Any, Any]:
        """One sequential pass over series[:end] from a zero state, in raw units, as served.

        Row t is the forecast of series[t + 1]; the state is warmed on everything before.
        """
        import torch

        model.eval()
        lstm: torch.nn.LSTM = model.lstm  # type: ignore[assignment]
        h, c = zero_state(lstm.num_layers, 1, lstm.hidden_size)
        with torch.no_grad():
            y, _, _ = model(torch.from_numpy(self.series[None, :end]), h, c)
        out: np.ndarray[Any, Any] = y[0].numpy()
        return out

    def validate(self, model: nn.Module) -> float:
        """Mean absolute error (raw units, mean over features) on the validation split."""
        s = self.split
        pred = self.predict(model, s.val_end)[s.train_end - 1 : s.val_end - 1]
        return D.mae_rmse(pred, self.series[s.train_end : s.val_end])[0]

    def test_metrics(self, model: nn.Module) -> dict[str, Any]:
        s, n = self.split, len(self.series)
        target = self.series[s.val_end :]
        forecasts = {"model": self.predict(model, n)[s.val_end - 1 : n - 1]}
        forecasts["persistence"] = D.persistence_forecast(self.series, s.val_end, n)
        period = self.recipe.data.seasonal_period
        if period is not None:
            forecasts["seasonal_naive"] = D.seasonal_naive_forecast(
                self.series, s.val_end, n, period
            )

        def scores(pred: np.ndarray[Any, Any]) -> dict[str, Any]:
            mae, rmse = D.mae_rmse(pred, target)
            per = D.per_feature_mae_rmse(pred, target)
            return {
                "test_mae": round(mae, 5),
                "test_rmse": round(rmse, 5),
                "per_feature": {
                    col: {"test_mae": round(a, 5), "test_rmse": round(b, 5)}
                    for col, (a, b) in zip(self.recipe.data.columns, per, strict=True)
                },
            }

        baselines = {k: scores(v) for k, v in forecasts.items() if k != "model"}
        if period is not None:
            baselines["seasonal_naive"]["period"] = period
        return {
            "held_out": (
                f"test split = last {n - s.val_end} of {n} steps, one-step-ahead forecasts, "
                "state warmed on all earlier steps; MAE/RMSE in raw units, mean over features"
            ),
            "split": s.as_dict(),
            "model": scores(forecasts["model"]),
            "baselines": baselines,
        }

    def manifest_fields(self) -> dict[str, Any]:
        f = len(self.recipe.data.columns)
        return {
            "input_dim": f,
            "output_dim": f,
            "output": "values",
            "normalisation": {
                "in_graph": True,
                "input_mean": self.mean.tolist(),
                "input_std": self.std.tolist(),
                "output_mean": self.mean.tolist(),
                "output_std": self.std.tolist(),
            },
        }

    def provenance(self) -> dict[str, Any]:
        p = self.recipe.data.provenance
        digest = D.sha256_of_file(self.path)
        desc = (
            f"{p.description} Columns {self.recipe.data.columns}; {len(self.series)} steps; "
            f"file sha256 {digest}."
        ).strip()
        return {
            "source": p.source,
            "licence": p.licence,
            "description": desc,
            "files": [_display_path(self.path)],
        }


class TokenTask:
    """Next-character modelling of a text corpus; ids in, logits out (softmax added at export)."""

    def __init__(self, recipe: Recipe, base: Path) -> None:
        self.recipe = recipe
        d = recipe.data
        root = D.stdlib_dir() if d.root == "stdlib" else base / d.root
        self.corpus = D.read_corpus(root, d.files)
        if d.sha256 and d.sha256 != self.corpus.sha256:
            # A different Python build ships different stdlib files: say so, don't hide it.
            logger.warning(
                "corpus sha256 %s differs from the recipe's %s: metrics will differ",
                self.corpus.sha256,
                d.sha256,
            )
        self.vocab = D.char_vocab()
        self.ids = D.encode(self.corpus.text, self.vocab)
        self.split = D.chronological_split(len(self.ids), d.val_fraction, d.test_fraction)
        self.streams = D.to_streams(self.ids[: self.split.train_end], recipe.train.batch)
        unk = float(np.mean(self.ids == 0))
        logger.info(
            "corpus: %d files, %d chars, <unk> rate %.5f, sha256 %s",
            len(d.files),
            len(self.ids),
            unk,
            self.corpus.sha256[:16],
        )

    def model_args(self) -> dict[str, Any]:
        m = self.recipe.model
        assert m.embed_dim is not None
        return {
            "vocab_size": len(self.vocab),
            "embed_dim": m.embed_dim,
            "hidden_size": m.hidden_size,
            "layers": m.layers,
            "dropout": m.dropout,
        }

    def epoch_streams(self, rng: np.random.Generator) -> np.ndarray[Any, Any]:
        return self.streams

    def build_model(self) -> nn.Module:
        from lstm_serve.training.model import TokenLSTM

        return TokenLSTM(**self.model_args())

    def forward(self, model: nn.Module) -> Forward:
        fn: Forward = model.forward
        return fn

    @staticmethod
    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def _bits(self, model: nn.Module, ids: np.ndarray[Any, Any], streams: int, skip: int) -> float:
        """Bits per char of next-char predictions over `streams` contiguous streams of ids,
        state carried across chunks; the first `skip` targets of each stream only warm it."""
        import torch

        model.eval()
        lstm: torch.nn.LSTM = model.lstm  # type: ignore[assignment]
        arr = D.to_streams(ids, streams)
        h, c = zero_state(lstm.num_layers, streams, lstm.hidden_size)
        nats, count, pos = 0.0, 0, 0
        with torch.no_grad():
            for x, y in D.bptt_chunks(arr, 4096):
                logits, h, c = model(torch.from_numpy(np.ascontiguousarray(x)), h, c)
                logp = torch.log_softmax(logits, dim=-1)
                tgt = torch.from_numpy(np.ascontiguousarray(y))
                nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                keep = max(0, skip - pos)
                nats += float(nll[:, keep:].sum())
                count += int(nll[:, keep:].numel())
                pos += x.shape[1]
        return D.bits(nats / count)

    def validate(self, model: nn.Module) -> float:
        s = self.split
        return self._bits(
            model, self.ids[s.train_end : s.val_end], self.recipe.train.eval_streams, 0
        )

    def test_metrics(self, model: nn.Module) -> dict[str, Any]:
        s, v = self.split, len(self.vocab)
        train, val, test = (
            self.ids[: s.train_end],
            self.ids[s.train_end : s.val_end],
            self.ids[s.val_end :],
        )
        # One stream over val + test, scoring only test: the state is warmed on the text before
        # the test part, as a served session would be.
        model_bits = self._bits(model, self.ids[s.train_end - 1 :], 1, s.val_end - s.train_end)
        alpha = D.best_bigram_alpha(train, val, v)
        return {
            "held_out": (
                f"test split = last {len(test)} of {len(self.ids)} chars; bits per character; "
                "baselines fitted on the training split"
            ),
            "split": s.as_dict(),
            "model": {"test_bits_per_char": round(model_bits, 4)},
            "baselines": {
                "unigram": {
                    "test_bits_per_char": round(D.unigram_bits(train, test, v, 1.0), 4),
                    "smoothing": "add-1",
                },
                "bigram": {
                    "test_bits_per_char": round(
                        D.bigram_bits(train, test, v, alpha, previous=int(val[-1])), 4
                    ),
                    "smoothing": f"add-{alpha:g} (chosen on the validation split)",
                },
            },
        }

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "input_dim": 1,
            "output_dim": len(self.vocab),
            "vocab": self.vocab,
            "output": "probabilities",
        }

    def provenance(self) -> dict[str, Any]:
        p = self.recipe.data.provenance
        desc = (
            f"{p.description} {len(self.corpus.files)} files, {len(self.corpus.text)} chars, "
            f"sha256 of the concatenation {self.corpus.sha256}."
        ).strip()
        return {
            "source": p.source,
            "licence": p.licence,
            "description": desc,
            "files": self.corpus.files,
        }


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- the run


def train(
    recipe_path: Path,
    *,
    out: Path = Path("models"),
    version: str = "1",
    runs: Path = Path("runs"),
    max_minutes: float | None = None,
    force: bool = False,
    export: bool = True,
) -> TrainResult:
    """Train from a recipe, save runs/<name>/checkpoint.pt, and export to out/<name>/<version>."""
    import torch

    recipe = load_recipe(recipe_path)
    target = out / recipe.name / version
    if export and target.exists() and not force:
        # Fail before minutes of training, not after.
        raise FileExistsError(f"{target} exists (pass --force to replace it)")
    spec = recipe.train
    budget_s = 60.0 * (max_minutes if max_minutes is not None else spec.max_minutes)
    seed_everything(recipe.seed, recipe.threads)
    rng = np.random.default_rng(recipe.seed)
    base = recipe_path.parent
    task: RealTask | TokenTask = (
        RealTask(recipe, base) if recipe.kind is Kind.real else TokenTask(recipe, base)
    )
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "training %s (%s): %d parameters, streams %s, bptt %d, threads %d",
        recipe.name,
        recipe.kind.value,
        n_params,
        "x".join(str(d) for d in task.streams.shape[:2]),
        spec.bptt,
        recipe.threads,
    )
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=spec.lr_factor, patience=spec.lr_patience
    )
    val_name = "val_mae" if recipe.kind is Kind.real else "val_bpc"
    start = time.monotonic()
    cpu_start = time.process_time()  # wall time on a shared machine says little about cost
    deadline = start + budget_s
    history: list[EpochStats] = []
    best_val, best_epoch = float("inf"), 0
    best_state = copy.deepcopy(model.state_dict())
    stopped = "epochs"
    for epoch in range(1, spec.epochs + 1):
        # Move the truncation points each epoch so no step is always at a chunk edge.
        offset = 0 if epoch == 1 else int(rng.integers(0, spec.bptt))
        streams = task.epoch_streams(rng)
        loss, finished = train_epoch(
            model, task.forward(model), task.loss_fn, streams, spec, opt, offset, deadline
        )
        val = task.validate(model)
        sched.step(val)
        elapsed = time.monotonic() - start
        history.append(EpochStats(epoch, loss, val, elapsed))
        improved = val < best_val
        if improved:
            best_val, best_epoch = val, epoch
            best_state = copy.deepcopy(model.state_dict())
        logger.info(
            "epoch %3d/%d  train_loss %.5f  %s %.5f%s  lr %.2g  elapsed %.1fs",
            epoch,
            spec.epochs,
            loss,
            val_name,
            val,
            " *" if improved else "",
            opt.param_groups[0]["lr"],
            elapsed,
        )
        if not finished or time.monotonic() > deadline:
            stopped = "time_limit"
            logger.warning(
                "stopped at the %.1f-minute limit: this run is not reproducible", budget_s / 60
            )
            break
        if epoch - best_epoch >= spec.patience:
            stopped = "early_stopping"
            logger.info("early stopping: no %s improvement for %d epochs", val_name, spec.patience)
            break
    seconds = time.monotonic() - start
    cpu_seconds = time.process_time() - cpu_start
    model.load_state_dict(best_state)
    metrics = task.test_metrics(model)
    metrics["val"] = {val_name: round(best_val, 5)}
    logger.info("held-out: %s", {k: metrics[k] for k in ("model", "baselines")})
    training = {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": _display_path(recipe_path),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "stopped": stopped,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "seed": recipe.seed,
        "threads": recipe.threads,
        "parameters": n_params,
        "final_train_loss": round(history[-1].train_loss, 6),
        "torch_version": str(torch.__version__),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    checkpoint: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": {
            "class": "RealLSTM" if recipe.kind is Kind.real else "TokenLSTM",
            "args": task.model_args(),
        },
        "state_dict": model.state_dict(),
        "manifest": {
            "name": recipe.name,
            "kind": recipe.kind.value,
            "description": recipe.description,
            "layers": recipe.model.layers,
            "hidden_size": recipe.model.hidden_size,
            **task.manifest_fields(),
            "data": task.provenance(),
            "training": training,
            "metrics": metrics,
        },
    }
    ckpt_path = runs / recipe.name / "checkpoint.pt"
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, ckpt_path)
    logger.info("saved %s (training took %.1f s wall, %.1f s CPU)", ckpt_path, seconds, cpu_seconds)
    export_dir = export_checkpoint(checkpoint, out, version, overwrite=force) if export else None
    return TrainResult(ckpt_path, export_dir, history, metrics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="models/<name>/train.toml")
    parser.add_argument("--out", type=Path, default=Path("models"), help="repository root")
    parser.add_argument("--version", default="1", help="version directory to write (default 1)")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="wall-clock limit (default: the recipe's)"
    )
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), help="where runs/<name>/checkpoint.pt goes"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing version")


def run(args: argparse.Namespace) -> int:
    try:
        result = train(
            args.recipe,
            out=args.out,
            version=str(args.version),
            runs=args.runs,
            max_minutes=args.max_minutes,
            force=args.force,
        )
    except (ExportError, OSError, ValueError) as exc:
        logger.error("train failed: %s", exc)
        return 1
    print(result.export_dir)
    return 0
