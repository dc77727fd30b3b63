"""Forecast evaluation and baselines: origins, rules, statsmodels agreement, no test leakage."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("statsmodels")

from statsmodels.tsa.api import VAR
from statsmodels.tsa.holtwinters import ExponentialSmoothing

from lstm_serve.training import data as D
from lstm_serve.training import forecast_eval as FE


def _series(n: int = 1200, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    a = 10 + 3 * np.sin(2 * np.pi * t / 24) + np.cumsum(rng.normal(0, 0.2, n))
    b = 0.5 * a + 2 * np.cos(2 * np.pi * t / 24) + rng.normal(0, 0.3, n)
    return np.stack([a, b], axis=1)


def test_origins_and_targets_stay_inside_the_segment() -> None:
    orig = FE.origins(100, 130, 24)
    assert (orig[0], orig[-1]) == (99, 105)  # targets 100..123 up to 106..129
    series = np.arange(200, dtype=np.float64)[:, None]
    tgt = FE.targets(series, orig, 24)
    assert tgt.shape == (7, 24, 1)
    assert tgt[0, 0, 0] == 100 and tgt[-1, -1, 0] == 129
    with pytest.raises(ValueError):
        FE.origins(100, 110, 24)


def test_persistence_and_seasonal_naive_rules() -> None:
    series = np.arange(100, dtype=np.float64)[:, None]
    orig = np.array([50, 60])
    np.testing.assert_array_equal(
        FE.Persistence().forecast(series, orig, 3)[:, :, 0], [[50] * 3, [60] * 3]
    )
    sn = FE.SeasonalNaive(24).forecast(series, orig, 30)[:, :, 0]
    # Step k is the value one period before (two for k > 24): always already observed at o.
    np.testing.assert_array_equal(sn[0, :24], np.arange(51, 75) - 24)
    np.testing.assert_array_equal(sn[0, 24:], np.arange(75, 81) - 48)
    assert FE.SeasonalNaive(24).name == "seasonal_naive_24"


def test_score_is_mae_and_rmse_per_column_and_mean() -> None:
    pred = np.zeros((2, 1, 2))
    tgt = np.array([[[1.0, 3.0]], [[-1.0, 0.0]]])
    s = FE.score(pred, tgt, ["a", "b"])
    assert s["per_column"]["a"] == {"mae": 1.0, "rmse": 1.0}
    assert s["per_column"]["b"]["mae"] == 1.5
    assert s["per_column"]["b"]["rmse"] == pytest.approx(np.sqrt(4.5), abs=1e-5)
    assert s["mae"] == 1.25


@pytest.mark.parametrize("trend", [False, True])
def test_holt_winters_origin_forecast_is_statsmodels_forecast(trend: bool) -> None:
    """From the end of the training data, the frozen-parameter filter gives statsmodels' own forecast."""
    x = _series()
    train = x[:800]
    hw = FE.HoltWinters.fit(train, 24, trend)
    mine = hw.forecast(x, np.array([799]), 24)[0]
    for j in range(2):
        ref = (
            ExponentialSmoothing(
                train[:, j],
                trend="add" if trend else None,
                damped_trend=trend,
                seasonal="add",
                seasonal_periods=24,
                initialization_method="estimated",
            )
            .fit()
            .forecast(24)
        )
        np.testing.assert_allclose(mine[:, j], ref, atol=1e-6)


def test_var_origin_forecast_is_statsmodels_forecast() -> None:
    x = _series()
    var = FE.VectorAR.fit(x[:800], 5)
    ref = VAR(x[:800]).fit(5).forecast(x[795:800], 24)
    np.testing.assert_allclose(var.forecast(x, np.array([799]), 24)[0], ref, atol=1e-9)


def _fitted(models: dict[int, list[FE.Forecaster]]) -> list[object]:
    out: list[object] = []
    for h in sorted(models):
        for m in models[h]:
            if isinstance(m, FE.VectorAR):
                out += [m.lags, m.intercept.tolist(), m.coefs.tolist()]
            elif isinstance(m, FE.HoltWinters):
                out += [m.trend, m.params]
            else:
                out.append(m.describe())
    return out


def test_test_values_change_no_fitted_parameter_or_earlier_forecast() -> None:
    x = _series()
    split = D.chronological_split(len(x), 0.15, 0.15)
    changed = x.copy()
    changed[split.val_end :] = np.random.default_rng(1).normal(
        50, 20, changed[split.val_end :].shape
    )
    a = FE.fit_baselines(x, split, [1, 24], [24])
    b = FE.fit_baselines(changed, split, [1, 24], [24])
    assert _fitted(a) == _fitted(b)
    # And every forecast reads only the data up to its origin.
    orig = FE.origins(split.train_end, split.val_end, 24)
    for ma, mb in zip(a[24], b[24], strict=True):
        np.testing.assert_array_equal(ma.forecast(x, orig, 24), mb.forecast(changed, orig, 24))
    # ... while the training split does move them (the comparison can fail).
    moved = x.copy()
    moved[: split.train_end] *= 1.5
    assert _fitted(FE.fit_baselines(moved, split, [1, 24], [24])) != _fitted(a)


def test_forecasts_ignore_values_after_the_origin() -> None:
    x = _series()
    later = x.copy()
    later[901:] += 100.0
    orig = np.array([850, 900])
    for model in (
        FE.Persistence(),
        FE.SeasonalNaive(24),
        FE.VectorAR.fit(x[:800], 26),
        FE.HoltWinters.fit(x[:800], 24, True),
    ):
        np.testing.assert_array_equal(model.forecast(x, orig, 24), model.forecast(later, orig, 24))


def test_baselines_rebuild_from_their_recorded_params() -> None:
    """to_params through JSON and back (baseline_from_record) gives the same forecasts, bit for
    bit: the manifest's params reproduce its scores without refitting."""
    x = _series()
    split = D.chronological_split(len(x), 0.15, 0.15)
    fitted = FE.fit_baselines(x, split, [1, 24], [24])
    orig = FE.origins(split.val_end, len(x), 24)
    names = set()
    for m in fitted[24]:
        record = json.loads(json.dumps({**m.describe(), "params": m.to_params()}))
        rebuilt = FE.baseline_from_record(m.name, record)
        assert type(rebuilt) is type(m) and rebuilt.describe() == m.describe()
        np.testing.assert_array_equal(rebuilt.forecast(x, orig, 24), m.forecast(x, orig, 24))
        names.add(m.name)
    assert names == {
        "persistence", "seasonal_naive_24", "holt_winters", "linear_ar", "direct_linear"
    }  # fmt: skip


def test_a_bad_record_is_refused() -> None:
    var = FE.VectorAR.fit(_series()[:800], 3).to_params()
    hw = FE.HoltWinters.fit(_series()[:800], 24, True).to_params()
    bad = [
        ("linear_ar", {}),  # no params
        ("kalman", {"params": {}}),
        ("linear_ar", {"params": {}}),
        ("holt_winters", {"params": {**hw, "columns": None}}),
        ("seasonal_naive_24", {"params": {"period": 12}}),
        ("linear_ar", {"params": {**var, "lags": 2}}),  # coefs are [3, 2, 2]
        ("holt_winters", {"params": {**hw, "columns": []}}),
        ("holt_winters", {"params": {**hw, "period": 12}}),  # 24 initial seasons
        ("holt_winters", {"params": {**hw, "columns": [{"smoothing_level": 0.5}]}}),
    ]
    for name, record in bad:
        with pytest.raises(ValueError):
            FE.baseline_from_record(name, record)
    # ... while the same records, whole, are accepted.
    FE.baseline_from_record("linear_ar", {"params": var})
    FE.baseline_from_record("holt_winters", {"params": hw})


def _calendar(n: int, start_hour: int = 0) -> D.Calendar:
    t = np.arange(start_hour, start_hour + n)
    return D.Calendar((t % 24).astype(np.int64), (t // 24 % 365 + 1).astype(np.int64))


def test_direct_linear_with_calendar_finds_the_best_linear_forecast() -> None:
    """x[t] = 0.5 x[t-1] + sin(hour of t) + noise: the best forecast k steps ahead is linear in
    x[o] and the hour of day at o, so the direct model with calendar features reaches the noise
    floor at every step ahead; the one without must read the phase from noisy lags and does
    worse; neither reads past the origin."""
    n, sd = 6000, 0.3
    cal = _calendar(n)
    hour = 2 * np.pi * cal.hour / 24
    noise = np.random.default_rng(0).normal(0, sd, n)
    x = np.zeros((n, 1))
    for t in range(1, n):
        x[t] = 0.5 * x[t - 1] + np.sin(hour[t]) + noise[t]
    with_cal = FE.DirectLinear.fit(x[:4000], 24, 24, cal, True)
    without = FE.DirectLinear.fit(x[:4000], 24, 24, cal, False)
    orig = FE.origins(4500, 6000, 24)
    tgt = FE.targets(x, orig, 24)
    # the error k steps ahead has sd * sqrt(sum 0.25^j, j < k) < sd / sqrt(0.75); MAE = 0.8 sd
    floor = 0.8 * sd / np.sqrt(0.75)
    mae_cal = FE.mean_mae(with_cal.forecast(x, orig, 24), tgt)
    mae_plain = FE.mean_mae(without.forecast(x, orig, 24), tgt)
    assert mae_cal < floor * 1.1 and mae_cal < mae_plain, (mae_cal, mae_plain, floor)
    later = x.copy()
    later[int(orig[-1]) + 1 :] += 100.0
    np.testing.assert_array_equal(
        with_cal.forecast(x, orig, 24), with_cal.forecast(later, orig, 24)
    )


def test_gradient_boosting_reads_nothing_after_the_origin_and_refits_alike() -> None:
    pytest.importorskip("sklearn")
    x = _series(1500)
    cal = _calendar(len(x))
    a = FE.GradientBoosting.fit(x[:1000], cal)
    b = FE.GradientBoosting.fit(x[:1000], cal)
    orig = FE.origins(1100, 1400, 24)
    later = x.copy()
    later[int(orig[-1]) + 1 :] += 100.0
    fa = a.forecast(x, orig, 24)
    np.testing.assert_array_equal(fa, a.forecast(later, orig, 24))
    np.testing.assert_array_equal(fa, b.forecast(x, orig, 24))  # no randomness in the fit
    # it learnt something: better than persistence on this daily cycle
    tgt = FE.targets(x, orig, 24)
    assert FE.mean_mae(fa, tgt) < FE.mean_mae(FE.Persistence().forecast(x, orig, 24), tgt)


def test_calendar_baselines_join_with_a_calendar_and_record_their_validation() -> None:
    pytest.importorskip("sklearn")
    x = _series()
    split = D.chronological_split(len(x), 0.15, 0.15)
    validation: dict[int, dict[str, dict[str, float]]] = {}
    fitted = FE.fit_baselines(x, split, [1, 24], [24], _calendar(len(x)), validation)
    names = {m.name for m in fitted[24]}
    assert {"direct_linear", "direct_linear_calendar", "gradient_boosting"} <= names
    # direct_linear's lags were chosen on validation: the kept one scored lowest there
    for k in (1, 24):
        scores = validation[k]["direct_linear_calendar"]
        kept = next(m for m in fitted[k] if m.name == "direct_linear_calendar")
        assert isinstance(kept, FE.DirectLinear)
        assert min(scores, key=lambda o: scores[o]) == f"lags={kept.lags}"
    # without a calendar, neither calendar model is fitted
    plain = {m.name for m in FE.fit_baselines(x, split, [1, 24], [24])[24]}
    assert "direct_linear" in plain and not {"direct_linear_calendar", "gradient_boosting"} & plain
    # the direct models rebuild from their records, with the calendar
    cal = _calendar(len(x))
    orig = FE.origins(split.val_end, len(x), 24)
    for m in fitted[24]:
        if isinstance(m, FE.DirectLinear):
            record = json.loads(json.dumps({"params": m.to_params()}))
            rebuilt = FE.baseline_from_record(m.name, record, cal)
            np.testing.assert_array_equal(rebuilt.forecast(x, orig, 24), m.forecast(x, orig, 24))
    with pytest.raises(ValueError, match="calendar"):
        FE.DirectLinear.fit(x[:800], 24, 24, None, True)
