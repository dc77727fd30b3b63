"""Multi-horizon forecast evaluation and the classical baselines a forecaster must beat.

Every forecaster here answers the same question: standing at origin o, having seen series[:o+1]
and nothing after, what are series[o+1 .. o+H]? Baselines are fitted on the training split,
their options (lags, trend) chosen on the validation split, and only then run on the test
split with everything frozen. statsmodels is a training-only dependency (imported lazily).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from lstm_serve.training.data import Split

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]

AR_LAGS = (1, 2, 3, 6, 12, 24, 25, 26, 36, 48, 72)


# --------------------------------------------------------------------------- origins and scores


def origins(start: int, end: int, horizon: int) -> npt.NDArray[np.int64]:
    """Origins o whose targets o+1 .. o+horizon all lie in [start, end)."""
    if start < 1 or end - start < horizon:
        raise ValueError(f"segment [{start}, {end}) cannot hold a {horizon}-step target")
    return np.arange(start - 1, end - horizon, dtype=np.int64)


def targets(series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int) -> Array:
    """[N, horizon, F]: row i holds series[orig[i]+1 .. orig[i]+horizon]."""
    idx = orig[:, None] + np.arange(1, horizon + 1)[None, :]
    out: Array = np.asarray(series, np.float64)[idx]
    return out


def score(pred: Array, target: Array, columns: Sequence[str]) -> dict[str, Any]:
    """MAE and RMSE over all origins and steps: the mean over columns, and per column."""
    err = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    mae = np.abs(err).mean(axis=(0, 1))
    rmse = np.sqrt((err**2).mean(axis=(0, 1)))
    return {
        "mae": round(float(mae.mean()), 5),
        "rmse": round(float(rmse.mean()), 5),
        "per_column": {
            c: {"mae": round(float(a), 5), "rmse": round(float(b), 5)}
            for c, a, b in zip(columns, mae, rmse, strict=True)
        },
    }


def mean_mae(pred: npt.NDArray[Any], target: npt.NDArray[Any]) -> float:
    return float(np.abs(np.asarray(pred, np.float64) - target).mean())


# --------------------------------------------------------------------------- baselines


class Forecaster(Protocol):
    name: str

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        """[N, horizon, F] forecasts, row i reading series[: orig[i] + 1] only."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Persistence:
    name: str = "persistence"

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        out: Array = np.repeat(np.asarray(series, np.float64)[orig][:, None], horizon, axis=1)
        return out

    def describe(self) -> dict[str, Any]:
        return {"rule": "y[o+k] = x[o]"}


@dataclass
class SeasonalNaive:
    period: int
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"seasonal_naive_{self.period}"

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        k = np.arange(1, horizon + 1)
        # The latest observed value at the same phase of the cycle.
        back = self.period * np.ceil(k / self.period).astype(np.int64)
        idx = orig[:, None] + (k - back)[None, :]
        if int(idx.min()) < 0:
            raise ValueError(f"seasonal-naive needs {self.period} steps before the first origin")
        out: Array = np.asarray(series, np.float64)[idx]
        return out

    def describe(self) -> dict[str, Any]:
        return {"rule": f"y[o+k] = x[o+k-{self.period}*ceil(k/{self.period})]"}


@dataclass
class VectorAR:
    """VAR(p) with intercept over all columns, least squares on the training split (statsmodels)."""

    lags: int
    intercept: Array = field(default_factory=lambda: np.zeros(0))
    coefs: Array = field(default_factory=lambda: np.zeros(0))  # [lags, F, F]
    name: str = "linear_ar"

    @classmethod
    def fit(cls, train: Array, lags: int) -> VectorAR:
        from statsmodels.tsa.api import VAR

        res = VAR(np.asarray(train, np.float64)).fit(lags, trend="c")
        return cls(lags=lags, intercept=np.asarray(res.intercept), coefs=np.asarray(res.coefs))

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        x = np.asarray(series, np.float64)
        p = self.lags
        if int(orig.min()) < p - 1:
            raise ValueError(f"VAR({p}) needs {p} steps up to the first origin")
        # hist[:, j] = x[o - j]: the most recent value first, as coefs[j] expects.
        hist = x[orig[:, None] - np.arange(p)[None, :]]
        preds = []
        for _ in range(horizon):
            y = self.intercept + np.einsum("jfg,njg->nf", self.coefs, hist)
            preds.append(y)
            hist = np.concatenate([y[:, None], hist[:, :-1]], axis=1)
        out: Array = np.stack(preds, axis=1)
        return out

    def describe(self) -> dict[str, Any]:
        return {"model": f"VAR({self.lags}) with intercept, least squares", "lags": self.lags}


@dataclass
class HoltWinters:
    """Additive Holt-Winters per column (statsmodels), parameters estimated on the training split.

    On later data the smoothing recursion runs with those parameters frozen (the filter, not a
    refit), so the state at each origin has seen only the data up to it.
    """

    period: int
    trend: bool
    params: list[dict[str, Any]] = field(default_factory=list)  # one per column
    name: str = "holt_winters"

    def _model(self, col: Array, **known: Any) -> Any:
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        return ExponentialSmoothing(
            col,
            trend="add" if self.trend else None,
            damped_trend=self.trend,
            seasonal="add",
            seasonal_periods=self.period,
            **known,
        )

    @classmethod
    def fit(cls, train: Array, period: int, trend: bool) -> HoltWinters:
        hw = cls(period=period, trend=trend)
        for j in range(train.shape[1]):
            res = hw._model(np.asarray(train[:, j], np.float64), initialization_method="estimated")
            fitted = res.fit()
            p = {k: v for k, v in fitted.params.items() if v is not None}
            hw.params.append(
                {
                    k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else float(v))
                    for k, v in p.items()
                    if not (isinstance(v, float) and np.isnan(v))
                }
            )
        return hw

    def states(self, col: Array, j: int) -> tuple[Array, Array, Array]:
        """(level, trend, season) after each step of col, parameters frozen."""
        p = self.params[j]
        known: dict[str, Any] = {
            "initialization_method": "known",
            "initial_level": p["initial_level"],
            "initial_seasonal": np.asarray(p["initial_seasons"]),
        }
        if self.trend:
            known["initial_trend"] = p["initial_trend"]
        smoothing = {
            k: p[k]
            for k in ("smoothing_level", "smoothing_trend", "smoothing_seasonal", "damping_trend")
            if k in p
        }
        res = self._model(col, **known).fit(**smoothing, optimized=False)
        trend = np.asarray(res.trend) if self.trend else np.zeros(len(col))
        return np.asarray(res.level), trend, np.asarray(res.season)

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        x = np.asarray(series, np.float64)
        last = int(orig.max()) + 1  # the filter never reads past the last origin
        k = np.arange(1, horizon + 1)
        m = self.period
        out = np.empty((len(orig), horizon, x.shape[1]))
        for j in range(x.shape[1]):
            level, trend, season = self.states(x[:last, j], j)
            phi = self.params[j].get("damping_trend", 1.0) if self.trend else 0.0
            damp = np.cumsum(phi ** k.astype(np.float64))
            s_idx = orig[:, None] + k[None, :] - m * np.ceil(k / m).astype(np.int64)[None, :]
            out[:, :, j] = (
                level[orig][:, None] + damp[None, :] * trend[orig][:, None] + season[s_idx]
            )
        return out

    def describe(self) -> dict[str, Any]:
        kind = "damped additive trend, " if self.trend else "no trend, "
        return {"model": f"Holt-Winters, {kind}additive seasonality, period {self.period}"}


# --------------------------------------------------------------------------- fit and choose


def choose(
    candidates: Sequence[Forecaster], series: npt.NDArray[Any], split: Split, horizon: int
) -> tuple[Forecaster, dict[str, float]]:
    """The candidate with the lowest mean MAE on the validation split at this horizon."""
    orig = origins(split.train_end, split.val_end, horizon)
    tgt = targets(series, orig, horizon)
    val = {_label(c): mean_mae(c.forecast(series, orig, horizon), tgt) for c in candidates}
    best = min(candidates, key=lambda c: val[_label(c)])
    return best, val


def _label(c: Forecaster) -> str:
    if isinstance(c, VectorAR):
        return f"lags={c.lags}"
    if isinstance(c, HoltWinters):
        return f"trend={c.trend}"
    return c.name


def fit_baselines(
    series: npt.NDArray[Any], split: Split, horizons: Sequence[int], periods: Sequence[int]
) -> dict[int, list[Forecaster]]:
    """Per horizon, each baseline fitted on train and (where it has options) chosen on validation.

    Only series[: split.val_end] is ever passed to fitting or choosing: the test tail cannot
    change any parameter.
    """
    seen = np.asarray(series[: split.val_end], np.float64)
    train = seen[: split.train_end]
    ars = [VectorAR.fit(train, p) for p in AR_LAGS if p * 4 < len(train)]
    hws = [HoltWinters.fit(train, periods[0], trend) for trend in (False, True)] if periods else []
    chosen: dict[int, list[Forecaster]] = {}
    for h in horizons:
        picks: list[Forecaster] = [Persistence(), *(SeasonalNaive(p) for p in periods)]
        for family in (hws, ars):
            if family:
                best, val = choose(family, seen, split, h)
                logger.info("horizon %d: %s chose %s (val MAE %s)", h, best.name, _label(best), val)
                picks.append(best)
        chosen[h] = picks
    return chosen
