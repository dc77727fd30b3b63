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
import math
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
from lstm_serve.training import forecast_eval as FE
from lstm_serve.training import text_eval as TE
from lstm_serve.training.export import CHECKPOINT_FORMAT, ExportError, export_checkpoint
from lstm_serve.training.extra import MissingExtra, require_training_extra

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

State = tuple["torch.Tensor", "torch.Tensor"]
# Within an epoch, a progress line at most this often (an epoch of text takes minutes).
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
    val_steps: int | None = Field(
        None, ge=2, description="real: validation steps (with test_steps: instead of fractions)"
    )
    test_steps: int | None = Field(
        None, ge=2, description="real: test steps, the tail (e.g. the last year of hours)"
    )
    time_column: str | None = Field(
        None,
        description="real: a column of local times 'YYYY-MM-DD HH:MM', for the calendar "
        "features of the baselines (hour of day, day of year)",
    )
    seasonal_periods: list[int] = Field(
        default_factory=list, description="real: the series' seasonal periods, in steps"
    )
    horizon: int = Field(24, ge=1, description="real: the Forecast horizon scored besides 1 step")
    units: str = Field("", description="real: the columns' units, for reports")
    provenance: Provenance


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: int = Field(1, ge=1)
    hidden_size: int = Field(ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    embed_dim: int | None = Field(None, ge=1, description="token models only")
    residual: bool = Field(False, description="real models: predict the change from the input")


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
    lr_schedule: Literal["plateau", "cosine"] = Field(
        "plateau",
        description="plateau: lr decays by lr_factor when validation stalls; cosine: lr falls "
        "from lr to 0 over every step of the planned epochs",
    )
    max_minutes: float = Field(10.0, gt=0, description="wall-clock guard (breaks reproducibility)")
    eval_streams: int = Field(8, ge=1, description="token models: streams for validation")
    ensemble: int = Field(
        1,
        ge=1,
        description="real models: seeds trained (seed, seed+1, ...) and averaged in one graph",
    )
    loss: Literal["mse", "l1"] = Field(
        "mse", description="real models: squared or absolute error (the median minimises MAE)"
    )
    rollout_weight: float = Field(
        0.0,
        ge=0,
        description="real models: weight of the loss of free-running forecasts over the horizon",
    )
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
            if self.train.ensemble != 1:
                raise ValueError("ensembles are for real models only")
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


ChunkLoss = Callable[
    ["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"],
    tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"],
]


def plain_chunk_loss(forward: Forward, loss_fn: LossFn) -> ChunkLoss:
    """Teacher-forced next-step loss over one chunk: (loss, hn, cn)."""

    def chunk_loss(
        x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, hn, cn = forward(x, h, c)
        return loss_fn(out, y), hn, cn

    return chunk_loss


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """lr * (1 + cos(pi * step / steps)) / 2, then 0: a fixed budget ends on small steps.

    Clamped at `steps`: an epoch that starts at a nonzero offset may have a chunk fewer or more
    than planned, and the lr must not climb back up.
    """
    import torch

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def format_duration(seconds: float) -> str:
    """45s, 3m05s, 2h07m: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(seconds_left: float, time_left: float) -> str:
    """The ETA of the planned work, or of the wall-clock guard when that comes first."""
    if time_left < seconds_left:
        return f"ETA {format_duration(time_left)} (time limit)"
    return f"ETA {format_duration(seconds_left)}"


# Called every PROGRESS_EVERY_S within an epoch: (chunks done, chunks in the epoch, mean loss).
ChunkProgress = Callable[[int, int, float], None]


def train_epoch(
    model: nn.Module,
    chunk_loss: ChunkLoss,
    streams: np.ndarray[Any, Any],
    spec: TrainSpec,
    opt: torch.optim.Optimizer,
    offset: int,
    deadline: float,
    step_sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: ChunkProgress | None = None,
) -> tuple[float, bool]:
    """One pass of truncated BPTT over streams [batch, L, ...]; (mean loss, finished in time).

    `step_sched`, if given, steps after every optimiser step (a per-step lr schedule).
    `progress`, if given, is told how far the epoch is every PROGRESS_EVERY_S.
    """
    import torch

    lstm: torch.nn.LSTM = model.lstm  # type: ignore[assignment]
    state = zero_state(lstm.num_layers, streams.shape[0], lstm.hidden_size)
    model.train()
    total, count = 0.0, 0
    n_chunks = D.chunks_per_epoch(streams.shape[1] - offset, spec.bptt)
    next_note = time.monotonic() + PROGRESS_EVERY_S
    for x, y in D.bptt_chunks(streams, spec.bptt, offset):
        # Carry the state's value but not its history: gradients stop at the chunk boundary.
        h, c = state[0].detach(), state[1].detach()
        loss, hn, cn = chunk_loss(
            torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(np.ascontiguousarray(y)),
            h,
            c,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        if step_sched is not None:
            step_sched.step()
        state = (hn, cn)
        total += float(loss.item())
        count += 1
        now = time.monotonic()
        if now > next_note:  # long epochs (text) still show signs of life
            if progress is not None:
                progress(count, n_chunks, total / count)
            else:
                logger.info("  chunk %d/%d  train %.5f", count, n_chunks, total / count)
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
        d = recipe.data
        if (d.val_steps is None) != (d.test_steps is None):
            raise ValueError("data.val_steps and data.test_steps go together")
        self.split = (
            D.split_by_steps(len(self.series), d.val_steps, d.test_steps)
            if d.val_steps is not None and d.test_steps is not None
            else D.chronological_split(len(self.series), d.val_fraction, d.test_fraction)
        )
        self.calendar = D.load_csv_calendar(self.path, d.time_column) if d.time_column else None
        self.horizon = recipe.data.horizon
        train = self.series[: self.split.train_end].astype(np.float64)
        # Statistics of the training split only: nothing from the held-out tail leaks in.
        self.mean = train.mean(axis=0).astype(np.float32)
        self.std = np.maximum(train.std(axis=0), 1e-6).astype(np.float32)
        step_std = np.maximum(np.diff(train, axis=0).std(axis=0), 1e-6)
        self.residual_scale = (step_std / self.std).astype(np.float32)
        z = (self.series - self.mean) / self.std
        self.streams = D.to_streams(z[: self.split.train_end], recipe.train.batch)
        for period in recipe.data.seasonal_periods:
            if self.split.train_end < period:
                raise ValueError(f"seasonal period {period} is longer than the training split")
        if self.split.val_end - self.split.train_end < self.horizon + 1:
            raise ValueError(f"the validation split is shorter than the horizon {self.horizon}")
        if self.split.n - self.split.val_end < self.horizon:
            raise ValueError(f"the test split is shorter than the horizon {self.horizon}")
        self.baselines: dict[int, list[FE.Forecaster]] | None = None
        self.validation: dict[int, dict[str, dict[str, float]]] = {}

    def prepare(self) -> None:
        """Fit the baselines now, before training: they need no model, and one that cannot be
        fitted must fail before minutes of training rather than after them."""
        d = self.recipe.data
        logger.info("fitting the baselines on the training split")
        self.baselines = FE.fit_baselines(
            self.series.astype(np.float64), self.split, sorted({1, d.horizon}),
            d.seasonal_periods, self.calendar, self.validation,
        )  # fmt: skip

    def epoch_streams(self, rng: np.random.Generator) -> np.ndarray[Any, Any]:
        """Training streams for one epoch, shifted by a random level per stream when asked.

        Without it a model may key its forecasts on the level, and a held-out season at levels
        seen only in another season's shape is forecast badly.
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

    def model_args(self, members: int = 1) -> dict[str, Any]:
        m = self.recipe.model
        f = len(self.recipe.data.columns)
        return {
            "input_dim": f,
            "output_dim": f,
            "hidden_size": m.hidden_size * members,
            "layers": m.layers,
            "dropout": m.dropout,
            "in_mean": self.mean.tolist(),
            "in_std": self.std.tolist(),
            "out_mean": self.mean.tolist(),
            "out_std": self.std.tolist(),
            "residual_scale": self.residual_scale.tolist() if m.residual else None,
        }

    def forward(self, model: nn.Module) -> Forward:
        fn: Forward = model.forward_normalised  # type: ignore[assignment]
        return fn

    @property
    def loss_fn(self) -> LossFn:
        import torch

        # A residual model's error is weighed against the typical step, not the level's spread.
        scale = torch.from_numpy(self.residual_scale) if self.recipe.model.residual else None

        fn = (
            torch.nn.functional.l1_loss
            if self.recipe.train.loss == "l1"
            else torch.nn.functional.mse_loss
        )

        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if scale is None:
                return fn(out, y)
            return fn(out / scale, y / scale)

        return loss

    def chunk_loss(self, model: nn.Module) -> ChunkLoss:
        """Next-step loss, plus (rollout_weight > 0) the loss of free-running forecasts.

        Teacher forcing alone trains one-step forecasts; the Forecast call feeds predictions
        back for `horizon` steps, so the model also learns from its own rolled-out errors: the
        chunk runs in pieces of `horizon` steps and from the state after each piece the model
        rolls out on its own predictions, all pieces at once as one batch.
        """
        import torch

        forward, loss_fn = self.forward(model), self.loss_fn
        weight, h_len = self.recipe.train.rollout_weight, self.horizon
        plain = plain_chunk_loss(forward, loss_fn)

        def chunk_loss(
            x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, c: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t_len = x.shape[1]
            ends = list(range(h_len, t_len - h_len + 2, h_len))
            if weight == 0 or not ends:
                return plain(x, y, h, c)
            outs, starts_h, starts_c, firsts, tgts = [], [], [], [], []
            prev = 0
            for end in [*ends, t_len]:
                if end <= prev:
                    continue
                out, h, c = forward(x[:, prev:end], h, c)
                outs.append(out)
                if end in ends:
                    starts_h.append(h)
                    starts_c.append(c)
                    firsts.append(out[:, -1:])
                    tgts.append(y[:, end : end + h_len - 1])
                prev = end
            teacher = loss_fn(torch.cat(outs, dim=1), y)
            rh, rc = torch.cat(starts_h, dim=1), torch.cat(starts_c, dim=1)
            step, preds = torch.cat(firsts, dim=0), []
            for _ in range(h_len - 1):
                step, rh, rc = forward(step, rh, rc)
                preds.append(step)
            free = loss_fn(torch.cat(preds, dim=1), torch.cat(tgts, dim=0))
            return teacher + weight * free, h, c

        return chunk_loss

    def rollout(self, model: nn.Module, orig: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """[N, horizon, F] forecasts in raw units, as the Forecast call makes them.

        The state at origin o has consumed series[: o + 1] from a zero state; its output is the
        first step, and each prediction is fed back as the next input.
        """
        import torch

        model.eval()
        lstm: torch.nn.LSTM = model.lstm  # type: ignore[assignment]
        x = torch.from_numpy(self.series)
        first, last = int(orig[0]), int(orig[-1])
        h, c = zero_state(lstm.num_layers, 1, lstm.hidden_size)
        hs, cs, ys = [], [], []
        with torch.no_grad():
            y, h, c = model(x[None, :first], h, c)
            for t in range(first, last + 1):  # one step at a time to keep every state
                y, h, c = model(x[None, t : t + 1], h, c)
                hs.append(h)
                cs.append(c)
                ys.append(y[0, 0])
            take = torch.from_numpy(np.asarray(orig) - first)
            h = torch.cat(hs, dim=1)[:, take]
            c = torch.cat(cs, dim=1)[:, take]
            y = torch.stack(ys)[take][:, None]
            steps = [y]
            for _ in range(self.horizon - 1):
                y, h, c = model(y, h, c)
                steps.append(y)
        out: np.ndarray[Any, Any] = torch.cat(steps, dim=1).numpy().astype(np.float64)
        return out

    def _scores(self, model: nn.Module, start: int, end: int) -> dict[int, np.ndarray[Any, Any]]:
        """Model forecasts at horizon 1 and H over [start, end), keyed by horizon."""
        h = self.horizon
        orig = FE.origins(start, end, 1)
        full = self.rollout(model, orig)
        return {1: full[:, :1], h: full[: len(FE.origins(start, end, h)), :h]}

    def validate(self, model: nn.Module) -> float:
        """Mean of the one-step and H-step MAE (raw units, mean over features) on validation."""
        s, h = self.split, self.horizon
        fc = self._scores(model, s.train_end, s.val_end)
        one = FE.mean_mae(fc[1], FE.targets(self.series, FE.origins(s.train_end, s.val_end, 1), 1))
        many = FE.mean_mae(fc[h], FE.targets(self.series, FE.origins(s.train_end, s.val_end, h), h))
        return (one + many) / 2

    def test_metrics(self, model: nn.Module) -> dict[str, Any]:
        return evaluate_real(
            self.series,
            self.split,
            self.recipe,
            lambda start, end: self._scores(model, start, end),
            self.baselines,
            self.calendar,
            self.validation,
        )

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


ModelForecasts = Callable[[int, int], dict[int, np.ndarray[Any, Any]]]


def evaluate_real(
    series: np.ndarray[Any, Any],
    split: D.Split,
    recipe: Recipe,
    model_fc: ModelForecasts,
    chosen: dict[int, list[FE.Forecaster]] | None = None,
    cal: D.Calendar | None = None,
    validation: dict[int, dict[str, dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """Held-out scores of the model and of every baseline at horizon 1 and H, in raw units.

    Baselines are fitted on train and chosen on validation (forecast_eval.fit_baselines; or
    given as `chosen`, fitted so already); the test split is read only here, to score. Shared
    by training and by the test that recomputes the manifest from the shipped files.
    """
    d = recipe.data
    h, n, cols = d.horizon, len(series), d.columns
    x = np.asarray(series, np.float64)
    horizons = sorted({1, h})
    if chosen is None:
        validation = {}
        chosen = FE.fit_baselines(x, split, horizons, d.seasonal_periods, cal, validation)
    fc = model_fc(split.val_end, n)
    model: dict[str, Any] = {}
    baselines: dict[str, dict[str, Any]] = {}
    for k in horizons:
        orig = FE.origins(split.val_end, n, k)
        tgt = FE.targets(x, orig, k)
        model[f"h{k}"] = FE.score(fc[k], tgt, cols)
        for b in chosen[k]:
            entry = baselines.setdefault(b.name, {})
            # The fitted parameters too: a refit on another CPU can land elsewhere (see
            # forecast_eval), while these reproduce the scores beside them on any CPU.
            entry[f"h{k}"] = {
                **FE.score(b.forecast(x, orig, k), tgt, cols),
                **b.describe(),
                "params": b.to_params(),
            }
            if validation and b.name in validation.get(k, {}):
                # the validation MAE of each option compared; the lowest was kept
                entry[f"h{k}"]["validation_mae"] = {
                    o: round(v, 5) for o, v in validation[k][b.name].items()
                }
    units = f" ({d.units})" if d.units else ""
    return {
        "held_out": (
            f"test split = last {n - split.val_end} of {n} steps; forecasts from every origin "
            f"in it, 1 step and {h} steps ahead (the state at each origin has seen everything "
            f"before it; multi-step forecasts feed predictions back); MAE/RMSE in raw "
            f"units{units}, mean over columns and per column; baselines fitted on the training "
            "split, their options chosen on the validation split (validation_mae)"
        ),
        "split": split.as_dict(),
        "horizons": horizons,
        "units": d.units,
        "model": model,
        "baselines": baselines,
    }


class TokenTask:
    """Next-character modelling of a text corpus; ids in, logits out (softmax added at export)."""

    def chunk_loss(self, model: nn.Module) -> ChunkLoss:
        return plain_chunk_loss(self.forward(model), self.loss_fn)

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
        self.code: TE.HeldOutCode | None = None
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

    def model_args(self, members: int = 1) -> dict[str, Any]:
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

    def prepare(self) -> None:
        """Read the held-out code now: a missing package must fail before training, not after."""
        self.code = TE.held_out_code()

    def validate(self, model: nn.Module) -> float:
        s = self.split
        return self._bits(
            model, self.ids[s.train_end : s.val_end], self.recipe.train.eval_streams, 0
        )

    def test_metrics(self, model: nn.Module) -> dict[str, Any]:
        s = self.split
        # One stream over val + test, scoring only test: the state is warmed on the text before
        # the test part, as a served session would be.
        model_bits = self._bits(model, self.ids[s.train_end - 1 :], 1, s.val_end - s.train_end)
        code = self.code if self.code is not None else TE.held_out_code()
        code_ids = D.encode(code.text, self.vocab)
        code_bits = self._bits(model, code_ids, 1, 0)
        return TE.metrics(
            self.ids, self.corpus.text, s, len(self.vocab), code, code_ids, model_bits, code_bits
        )

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


@dataclass
class _Fit:
    model: nn.Module
    history: list[EpochStats]
    best_epoch: int
    best_val: float
    stopped: str


def _fit_one(
    task: RealTask | TokenTask,
    recipe: Recipe,
    seed: int,
    deadline: float,
    val_name: str,
    later_members: int = 0,
) -> _Fit:
    """Train one model from `seed` with early stopping on validation; the best epoch's weights.

    Each epoch logs a progress line with its ETA: the epochs still planned (this member's and
    `later_members` more ensemble members') at the mean time per epoch so far, or the time left
    to the wall-clock guard when that is sooner. Early stopping may end the run before it.
    """
    import torch

    spec = recipe.train
    seed_everything(seed, recipe.threads)
    rng = np.random.default_rng(seed)
    model = task.build_model()
    logger.info(
        "training %s (%s): %d parameters, streams %s, bptt %d, threads %d, seed %d",
        recipe.name,
        recipe.kind.value,
        sum(p.numel() for p in model.parameters()),
        "x".join(str(d) for d in task.streams.shape[:2]),
        spec.bptt,
        recipe.threads,
        seed,
    )
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=spec.lr_factor, patience=spec.lr_patience
    )
    step_sched = (
        cosine_schedule(opt, spec.epochs * D.chunks_per_epoch(task.streams.shape[1], spec.bptt))
        if spec.lr_schedule == "cosine"
        else None
    )
    start = time.monotonic()
    history: list[EpochStats] = []
    best_val, best_epoch = float("inf"), 0
    best_state = copy.deepcopy(model.state_dict())
    stopped = "epochs"
    epoch, epoch_start = 0, start

    def chunk_note(done: int, n_chunks: int, loss: float) -> None:
        """Mid-epoch progress: this epoch's pace so far, and the epochs after it."""
        now = time.monotonic()
        per_chunk = (now - epoch_start) / done
        per_epoch = (epoch_start - start) / (epoch - 1) if epoch > 1 else n_chunks * per_chunk
        later = spec.epochs - epoch + later_members * spec.epochs
        left = (n_chunks - done) * per_chunk + later * per_epoch
        logger.info(
            "  epoch %d/%d  chunk %d/%d  train %.5f  %s",
            epoch,
            spec.epochs,
            done,
            n_chunks,
            loss,
            eta(left, deadline - now),
        )

    for epoch in range(1, spec.epochs + 1):
        epoch_start = time.monotonic()
        # Move the truncation points each epoch so no step is always at a chunk edge.
        offset = 0 if epoch == 1 else int(rng.integers(0, spec.bptt))
        streams = task.epoch_streams(rng)
        loss, finished = train_epoch(
            model,
            task.chunk_loss(model),
            streams,
            spec,
            opt,
            offset,
            deadline,
            step_sched,
            chunk_note,
        )
        val = task.validate(model)
        if step_sched is None:
            sched.step(val)
        now = time.monotonic()
        elapsed = now - start
        history.append(EpochStats(epoch, loss, val, elapsed))
        improved = val < best_val
        if improved:
            best_val, best_epoch = val, epoch
            best_state = copy.deepcopy(model.state_dict())
        timed_out = not finished or now > deadline
        patient = epoch - best_epoch < spec.patience
        epochs_left = 0 if timed_out else later_members * spec.epochs
        if patient and not timed_out:
            epochs_left += spec.epochs - epoch
        logger.info(
            "epoch %d/%d  train %.5f  %s %.5f%s  lr %.2g  %.1fs/epoch  %s",
            epoch,
            spec.epochs,
            loss,
            val_name,
            val,
            " *" if improved else "",
            opt.param_groups[0]["lr"],
            elapsed / epoch,
            eta(epochs_left * elapsed / epoch, max(0.0, deadline - now)),
        )
        if timed_out:
            stopped = "time_limit"
            logger.warning("stopped at the time limit: this run is not reproducible")
            break
        if not patient:
            stopped = "early_stopping"
            logger.info("early stopping: no %s improvement for %d epochs", val_name, spec.patience)
            break
    model.load_state_dict(best_state)
    return _Fit(model, history, best_epoch, best_val, stopped)


def _log_held_out(metrics: dict[str, Any]) -> None:
    """The held-out scores as `lstm-serve models` shows them: the model's, then each baseline's
    (the fitted parameters stay in the manifest: a VAR's coefficients are no terminal reading)."""
    from lstm_serve.cli.commands import held_out_lines

    logger.info(
        "held-out scores, lower is better (how measured: metrics.held_out in manifest.json)"
    )
    for line in held_out_lines(metrics):
        logger.info("  %s", line)


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
    base = recipe_path.parent
    task: RealTask | TokenTask = (
        RealTask(recipe, base) if recipe.kind is Kind.real else TokenTask(recipe, base)
    )
    task.prepare()
    members = spec.ensemble
    val_name = "val_mae" if recipe.kind is Kind.real else "val_bpc"
    start = time.monotonic()
    cpu_start = time.process_time()  # wall time on a shared machine says little about cost
    deadline = start + budget_s
    fits: list[_Fit] = []
    for member in range(members):
        if members > 1:
            logger.info(
                "ensemble member %d/%d (seed %d)", member + 1, members, recipe.seed + member
            )
        fits.append(
            _fit_one(task, recipe, recipe.seed + member, deadline, val_name, members - member - 1)
        )
        if fits[-1].stopped == "time_limit":
            break
    stopped = fits[-1].stopped if len(fits) == members else "time_limit"
    model = fits[0].model
    if len(fits) > 1:
        from lstm_serve.training.model import merge_real_ensemble

        model = merge_real_ensemble([f.model for f in fits])  # type: ignore[misc]
    best_val = task.validate(model)
    n_params = sum(p.numel() for p in model.parameters())
    history = [e for f in fits for e in f.history]
    seconds = time.monotonic() - start
    cpu_seconds = time.process_time() - cpu_start
    metrics = task.test_metrics(model)
    metrics["val"] = {val_name: round(best_val, 5)}
    _log_held_out(metrics)
    training = {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": _display_path(recipe_path),
        "epochs_run": len(history),
        "best_epoch": [f.best_epoch for f in fits] if members > 1 else fits[0].best_epoch,
        "ensemble": len(fits),
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
            "args": task.model_args(members=len(fits)),
        },
        "state_dict": model.state_dict(),
        "manifest": {
            "name": recipe.name,
            "kind": recipe.kind.value,
            "description": recipe.description,
            "layers": recipe.model.layers,
            "hidden_size": recipe.model.hidden_size * len(fits),
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
        require_training_extra("train", ("torch", "onnx", "statsmodels", "sklearn"))
        result = train(
            args.recipe,
            out=args.out,
            version=str(args.version),
            runs=args.runs,
            max_minutes=args.max_minutes,
            force=args.force,
        )
    except (ExportError, MissingExtra, OSError, ValueError) as exc:
        logger.error("train failed: %s", exc)
        return 1
    print(result.export_dir)
    return 0
