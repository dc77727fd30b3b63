"""The linear AR baseline of a one-column series.

statsmodels' VAR refuses a single series ("Only gave one variable to VAR"), yet a univariate
series is the commonest case. AR(p) is VAR(p) with one variable: the same least squares, fitted
here with NumPy, and forecast by VectorAR's own recursion with 1x1 coefficient matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_serve.training.forecast_eval import Array, VectorAR


@dataclass
class UnivariateAR(VectorAR):
    """AR(p) with intercept on one column, least squares on the training split."""

    @classmethod
    def fit(cls, train: Array, lags: int) -> UnivariateAR:
        x = np.asarray(train, np.float64)
        if x.ndim != 2 or x.shape[1] != 1:
            raise ValueError(f"UnivariateAR fits one column, not an array of shape {x.shape}")
        y, n = x[:, 0], len(x)
        if n - lags <= lags + 1:
            raise ValueError(f"AR({lags}) needs more than {2 * lags + 1} steps, not {n}")
        # Row t: [1, y[t-1], ..., y[t-p]] -> y[t], for every t with p steps before it.
        design = np.column_stack(
            [np.ones(n - lags), *(y[lags - j : n - j] for j in range(1, lags + 1))]
        )
        solution, *_ = np.linalg.lstsq(design, y[lags:], rcond=None)
        beta: Array = np.asarray(solution, np.float64)
        return cls(lags=lags, intercept=beta[:1], coefs=beta[1:].reshape(lags, 1, 1))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": f"AR({self.lags}) with intercept, least squares"}
