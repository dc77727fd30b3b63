"""Multi-horizon forecast evaluation and the classical baselines a forecaster must beat.

Every forecaster here answers the same question: standing at origin o, having seen series[:o+1]
and nothing after, what are series[o+1 .. o+H]? Baselines are fitted on the training split,
their options (lags, trend) chosen on the validation split, and only then run on the test
split with everything frozen. statsmodels is a training-only dependency (imported lazily).

A fit is not reproducible to the last digit across CPUs: the Holt-Winters optimiser sits on a
flat error surface, and BLAS kernels that differ between CPUs move where it stops (by up to
about 5e-4 °C in a score of the bundled forecaster). So every fitted baseline records its
parameters (`to_params`, written to the manifest) and `baseline_from_record` rebuilds it from
them: a recorded baseline runs no optimiser, and gives its recorded scores on any CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from lstm_serve.training.data import Calendar, Split

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]

AR_LAGS = (1, 2, 3, 6, 12, 24, 25, 26, 36, 48, 72)
DIRECT_LAGS = (24, 48, 72)  # the direct linear models' lags, chosen on validation
RIDGE = 1e-3  # the direct linear models' ridge: keeps the normal equations well posed


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


def score(
    pred: Array, target: Array, columns: Sequence[str], ndigits: int | None = 5
) -> dict[str, Any]:
    """MAE and RMSE over all origins and steps: the mean over columns, and per column.

    Rounded to ndigits decimals (the manifest's figures); None keeps full precision, for
    comparing a recomputation with a rounded figure without a rounding step of its own.
    """
    err = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    mae = np.abs(err).mean(axis=(0, 1))
    rmse = np.sqrt((err**2).mean(axis=(0, 1)))

    def r(v: Any) -> float:
        return float(v) if ndigits is None else round(float(v), ndigits)

    return {
        "mae": r(mae.mean()),
        "rmse": r(rmse.mean()),
        "per_column": {
            c: {"mae": r(a), "rmse": r(b)} for c, a, b in zip(columns, mae, rmse, strict=True)
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

    def to_params(self) -> dict[str, Any]:
        """Everything fitted or chosen, JSON-ready at full precision (floats survive JSON
        exactly): baseline_from_record rebuilds the same forecaster from it."""
        ...


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

    def to_params(self) -> dict[str, Any]:
        return {}


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

    def to_params(self) -> dict[str, Any]:
        return {"period": self.period}


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

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> VectorAR:
        """The VAR that to_params recorded (least squares is not run again)."""
        lags = int(params["lags"])
        intercept = np.array(params["intercept"], dtype=np.float64)
        coefs = np.array(params["coefs"], dtype=np.float64)
        f = intercept.shape[0] if intercept.ndim == 1 else -1
        if lags < 1 or f < 1 or coefs.shape != (lags, f, f):
            raise ValueError(
                f"VAR({lags}) params need intercept [F] and coefs [{lags}, F, F]; "
                f"got {intercept.shape} and {coefs.shape}"
            )
        return cls(lags=lags, intercept=intercept, coefs=coefs)

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

    def to_params(self) -> dict[str, Any]:
        return {
            "lags": self.lags,
            "intercept": self.intercept.tolist(),
            "coefs": self.coefs.tolist(),
        }


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

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> HoltWinters:
        """The Holt-Winters that to_params recorded: no optimiser runs, only the filter."""
        period, trend = int(params["period"]), bool(params["trend"])
        columns = [dict(c) for c in params["columns"]]
        if not columns:
            raise ValueError("Holt-Winters params name no column")
        need = {"smoothing_level", "smoothing_seasonal", "initial_level", "initial_seasons"}
        if trend:
            need |= {"smoothing_trend", "damping_trend", "initial_trend"}
        for j, c in enumerate(columns):
            if need - set(c) or len(c["initial_seasons"]) != period:
                raise ValueError(
                    f"Holt-Winters column {j}: needs {sorted(need)} and {period} initial seasons"
                )
        return cls(period=period, trend=trend, params=columns)

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

    def to_params(self) -> dict[str, Any]:
        # statsmodels' estimates per column, as fit keeps them (a list: the data's column order).
        return {
            "period": self.period,
            "trend": self.trend,
            "columns": [dict(p) for p in self.params],
        }


def calendar_features(cal: Calendar, idx: npt.NDArray[np.int64]) -> Array:
    """[N, 8]: sine and cosine of the hour of day and of the day of year, two harmonics each."""
    hour = 2 * np.pi * cal.hour[idx] / 24
    day = 2 * np.pi * (cal.day[idx] - 1) / 365.25
    cols = [f(m * a) for a in (hour, day) for m in (1, 2) for f in (np.sin, np.cos)]
    out: Array = np.stack(cols, axis=1)
    return out


def lag_features(x: Array, orig: npt.NDArray[np.int64], lags: int) -> Array:
    """[N, lags * F]: x[o], x[o - 1], ..., x[o - lags + 1] of every column."""
    if int(orig.min()) < lags - 1:
        raise ValueError(f"{lags} lags need {lags} steps up to the first origin")
    out: Array = x[orig[:, None] - np.arange(lags)[None, :]].reshape(len(orig), -1)
    return out


def _need_calendar(cal: Calendar | None, n: int, name: str) -> Calendar:
    if cal is None:
        raise ValueError(f"{name} needs the series' calendar (data.time_column)")
    if len(cal.hour) < n:
        raise ValueError(f"{name}: the calendar has {len(cal.hour)} steps, the series {n}")
    return cal


@dataclass
class DirectLinear:
    """One least-squares model per step ahead k (1..steps): y[o + k] from the last `lags`
    values of every column at the origin and, with `calendar`, the hour of day and day of year
    of the origin (the target's follow from it). Ridge RIDGE on the normal equations. Direct,
    not rolled out: no step feeds a prediction back."""

    lags: int
    calendar: bool
    steps: int
    coefs: Array = field(default_factory=lambda: np.zeros(0))  # [steps, features, F]
    cal: Calendar | None = field(default=None, repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or ("direct_linear_calendar" if self.calendar else "direct_linear")

    def _features(self, x: Array, orig: npt.NDArray[np.int64]) -> Array:
        parts = [lag_features(x, orig, self.lags)]
        if self.calendar:
            parts.append(calendar_features(_need_calendar(self.cal, len(x), self.name), orig))
        parts.append(np.ones((len(orig), 1)))
        return np.concatenate(parts, axis=1)

    @classmethod
    def fit(
        cls, train: Array, lags: int, steps: int, cal: Calendar | None, calendar: bool
    ) -> DirectLinear:
        m = cls(lags=lags, calendar=calendar, steps=steps, cal=cal)
        x = np.asarray(train, np.float64)
        orig = np.arange(lags - 1, len(x) - steps, dtype=np.int64)
        f = m._features(x, orig)
        a = f.T @ f + RIDGE * np.eye(f.shape[1])
        rhs = np.stack([f.T @ x[orig + k] for k in range(1, steps + 1)])  # [steps, nf, F]
        m.coefs = np.stack([np.linalg.solve(a, r) for r in rhs])
        return m

    @classmethod
    def from_params(cls, params: Mapping[str, Any], cal: Calendar | None) -> DirectLinear:
        lags, calendar = int(params["lags"]), bool(params["calendar"])
        coefs = np.array(params["coefs"], dtype=np.float64)
        if coefs.ndim != 3 or lags < 1:
            raise ValueError(
                f"direct linear params need coefs [steps, features, F]; got {coefs.shape}"
            )
        return cls(lags=lags, calendar=calendar, steps=coefs.shape[0], coefs=coefs, cal=cal)

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        if horizon > self.steps:
            raise ValueError(f"{self.name} was fitted for {self.steps} steps, not {horizon}")
        f = self._features(np.asarray(series, np.float64), orig)
        out: Array = np.einsum("nf,kfc->nkc", f, self.coefs[:horizon])
        return out

    def describe(self) -> dict[str, Any]:
        what = " + hour-of-day and day-of-year harmonics" if self.calendar else ""
        return {
            "model": f"linear, one per step ahead, lags 1-{self.lags}{what}, least squares",
            "lags": self.lags,
        }

    def to_params(self) -> dict[str, Any]:
        return {
            "lags": self.lags,
            "calendar": self.calendar,
            "ridge": RIDGE,
            "coefs": self.coefs.tolist(),
        }


@dataclass
class GradientBoosting:
    """Histogram gradient boosting (scikit-learn), one model per column for the next step's
    change, from the last `lags` values of every column and the calendar of the step it
    predicts; multi-step forecasts roll out, each prediction fed back as the Forecast call feeds
    the LSTM's. Hyperparameters fixed, not tuned; its trees are not recorded, so its scores
    reproduce by refitting (deterministic for a given scikit-learn)."""

    lags: int = 24
    max_iter: int = 200
    learning_rate: float = 0.1
    models: list[Any] = field(default_factory=list, repr=False)
    cal: Calendar | None = field(default=None, repr=False)
    name: str = "gradient_boosting"

    def _features(self, hist: Array, cal: Calendar, step: npt.NDArray[np.int64]) -> Array:
        """hist [N, lags, F] (latest first) and the calendar of the steps predicted."""
        return np.concatenate([hist.reshape(len(hist), -1), calendar_features(cal, step)], axis=1)

    @classmethod
    def fit(cls, train: Array, cal: Calendar | None, lags: int = 24) -> GradientBoosting:
        from sklearn.ensemble import HistGradientBoostingRegressor

        g = cls(lags=lags, cal=cal)
        x = np.asarray(train, np.float64)
        c = _need_calendar(cal, len(x), g.name)
        orig = np.arange(lags - 1, len(x) - 1, dtype=np.int64)
        hist = x[orig[:, None] - np.arange(lags)[None, :]]
        f = g._features(hist, c, orig + 1)
        for j in range(x.shape[1]):
            model = HistGradientBoostingRegressor(
                max_iter=g.max_iter, learning_rate=g.learning_rate, early_stopping=False,
                random_state=0,
            )  # fmt: skip
            g.models.append(model.fit(f, x[orig + 1, j] - x[orig, j]))
        return g

    def forecast(
        self, series: npt.NDArray[Any], orig: npt.NDArray[np.int64], horizon: int
    ) -> Array:
        x = np.asarray(series, np.float64)
        c = _need_calendar(self.cal, len(x), self.name)
        if int(orig.min()) < self.lags - 1:
            raise ValueError(f"{self.name} needs {self.lags} steps up to the first origin")
        hist = x[orig[:, None] - np.arange(self.lags)[None, :]]
        preds = []
        for k in range(1, horizon + 1):
            f = self._features(hist, c, orig + k)
            y = hist[:, 0] + np.stack([m.predict(f) for m in self.models], axis=1)
            preds.append(y)
            hist = np.concatenate([y[:, None], hist[:, :-1]], axis=1)
        out: Array = np.stack(preds, axis=1)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "model": f"scikit-learn HistGradientBoostingRegressor per column, next-step change "
            f"from lags 1-{self.lags} + the step's hour-of-day and day-of-year harmonics, "
            f"rolled out; max_iter {self.max_iter}, learning_rate {self.learning_rate}",
        }

    def to_params(self) -> dict[str, Any]:
        return {"lags": self.lags, "max_iter": self.max_iter, "learning_rate": self.learning_rate}


def baseline_from_record(
    name: str, record: Mapping[str, Any], cal: Calendar | None = None
) -> Forecaster:
    """Rebuild a baseline from its manifest entry (metrics.baselines.<name>.h<k>), whose
    "params" holds what to_params recorded (cal: the series' calendar, for the models that
    use it). Raises ValueError for an unknown or bad record; gradient boosting records no
    trees and is rebuilt by refitting (fit_baselines), not here."""
    params = record.get("params")
    if not isinstance(params, Mapping):
        raise ValueError(f"baseline {name!r}: the record has no params")
    try:
        if name == "persistence":
            return Persistence()
        if name.startswith("seasonal_naive_"):
            sn = SeasonalNaive(int(params["period"]))
            if sn.name != name:
                raise ValueError(f"baseline {name!r} records period {sn.period}")
            return sn
        if name == "linear_ar":
            return VectorAR.from_params(params)
        if name == "holt_winters":
            return HoltWinters.from_params(params)
        if name in ("direct_linear", "direct_linear_calendar"):
            d = DirectLinear.from_params(params, cal)
            if d.name != name:
                raise ValueError(f"baseline {name!r} records calendar={d.calendar}")
            return d
    except (KeyError, TypeError) as e:  # a missing or mistyped field
        raise ValueError(f"baseline {name!r}: bad params ({e!r})") from e
    raise ValueError(f"unknown baseline {name!r}")


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
    if isinstance(c, DirectLinear):
        return f"lags={c.lags}"
    return c.name


def fit_baselines(
    series: npt.NDArray[Any],
    split: Split,
    horizons: Sequence[int],
    periods: Sequence[int],
    cal: Calendar | None = None,
    validation: dict[int, dict[str, dict[str, float]]] | None = None,
) -> dict[int, list[Forecaster]]:
    """Per horizon, each baseline fitted on train and (where it has options) chosen on validation.

    Only series[: split.val_end] is ever passed to fitting or choosing: the test tail cannot
    change any parameter. With the series' calendar (cal) the direct linear model with calendar
    features and gradient boosting join. validation, when given, receives per horizon and
    baseline the validation MAE of each option compared (one entry where there is no choice).
    """
    seen = np.asarray(series[: split.val_end], np.float64)
    train = seen[: split.train_end]
    # statsmodels' VAR needs two series or more; one column gets AR(p) by least squares.
    from lstm_serve.training.univariate_ar import UnivariateAR

    fit_ar = VectorAR.fit if train.shape[1] >= 2 else UnivariateAR.fit
    ars = [fit_ar(train, p) for p in AR_LAGS if p * 4 < len(train)]
    hws = [HoltWinters.fit(train, periods[0], trend) for trend in (False, True)] if periods else []
    steps = max(horizons)
    lags = [p for p in DIRECT_LAGS if p * 4 < len(train) - steps]
    directs = [DirectLinear.fit(train, p, steps, cal, False) for p in lags]
    directs_cal = [DirectLinear.fit(train, p, steps, cal, True) for p in lags] if cal else []
    fixed: list[Forecaster] = [Persistence(), *(SeasonalNaive(p) for p in periods)]
    if cal is not None and len(train) > 4 * GradientBoosting.lags:
        logger.info("fitting gradient boosting (one model per column)")
        fixed.append(GradientBoosting.fit(train, cal))
    chosen: dict[int, list[Forecaster]] = {}
    for h in horizons:
        picks: list[Forecaster] = []
        for b in fixed:
            _, val = choose([b], seen, split, h)
            picks.append(b)
            if validation is not None:
                validation.setdefault(h, {})[b.name] = val
        for family in (hws, ars, directs, directs_cal):
            if family:
                best, val = choose(family, seen, split, h)
                if validation is not None:
                    validation.setdefault(h, {})[best.name] = val
                logger.info(
                    "horizon %d: %s chose %s (validation MAE: %s)",
                    h,
                    best.name,
                    _label(best),
                    ", ".join(f"{k} {v:.4f}" for k, v in val.items()),
                )
                picks.append(best)
        chosen[h] = picks
    return chosen
