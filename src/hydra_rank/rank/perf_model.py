"""The lightweight performance model: predicts how much loss each module's adapter removes at a given rank.

What it predicts. For module m at rank r, the loss reduction it will contribute over the next interval,
    ĝ_m(r) = exp(b + w · x_m(r)),   x_m(r) = [log E_m(r), log r, depth_m, one-hot(kind_m)],
where E_m(r) is the gradient energy the best r directions capture (from the current gradient sketch, `signals.py`),
depth_m ∈ [0, 1] is the layer's relative depth and kind_m is q_proj, ..., down_proj. The prior is w = (1, 0, ...):
gain proportional to captured energy, which is exactly the static allocation's first-order estimate.

What it learns from. Over each interval between decisions the scheduler measures what every module actually
contributed: the first-order loss change of its own parameter updates, −Σ_steps ⟨∇_θ L, Δθ⟩ over its A and B
(an exact attribution to first order that sums to the first-order change of the training loss). Each interval gives
one (features at the rank the module had, realised gain) pair per module, a few hundred points. Ridge regression on
log gains, with each interval centred on its own mean (gradients shrink as training goes on, and only *relative*
gains matter for allocation), pulls w away from the prior only as far as the data support. The intercept b is then
set from the latest interval so that predictions are in loss units.

How good it is. Before refitting, the predictions made at the previous decision are compared with what was realised:
the Spearman rank correlation across modules is logged at every decision.

It is cheap: a (modules x ~10) least-squares solve per decision.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .budget import Target

ENERGY_FLOOR = 1e-30


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by order; they do not occur with real-valued gains)."""
    if len(a) < 3:
        return float("nan")
    ranks_a = np.argsort(np.argsort(a)).astype(np.float64)
    ranks_b = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


@dataclass
class PerfModel:
    """Per-module gain model, refitted online. `kinds` and `depths` come from the targets (fixed for a run)."""

    targets: list[Target]
    ridge: float = 0.1  # per data point, towards the prior
    history: int = 4  # intervals kept for fitting
    weights: np.ndarray = field(init=False)
    intercept: float = field(init=False, default=0.0)
    _intervals: deque = field(init=False)

    def __post_init__(self) -> None:
        self.kinds = sorted({t.kind for t in self.targets})
        last = {
            tower: max(t.layer for t in self.targets if t.tower == tower) or 1
            for tower in {t.tower for t in self.targets}
        }
        self.depths = np.array([t.layer / last[t.tower] for t in self.targets])  # 0..1 within each tower
        self.kind_onehot = np.array([[t.kind == k for k in self.kinds] for t in self.targets], dtype=np.float64)
        self.weights = self.prior()
        self._intervals = deque(maxlen=self.history)

    @property
    def feature_names(self) -> list[str]:
        return ["log_energy", "log_rank", "depth", *(f"kind:{k}" for k in self.kinds)]

    def prior(self) -> np.ndarray:
        weights = np.zeros(3 + len(self.kinds))
        weights[0] = 1.0
        return weights

    def features(self, energy: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Rows of x_m(r) for one rank per module: `energy[m]` = E_m(r_m), `ranks[m]` = r_m."""
        log_energy = np.log(np.maximum(energy, ENERGY_FLOOR))  # rank 0 (no adapter) is never predicted from these
        return np.column_stack([log_energy, np.log(np.maximum(ranks, 1)), self.depths, self.kind_onehot])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.intercept + x @ self.weights)

    def fit(self, x: np.ndarray, realised: np.ndarray, active: np.ndarray | None = None) -> None:
        """Add one interval (features at decision time, realised gains since) and refit on the kept intervals. Only
        `active` modules count (default: all): one at rank 0 had no parameters, so it could not realise anything."""
        if active is not None:
            x, realised = x[active], realised[active]
        floor = max(1e-12, 1e-3 * float(np.median(np.abs(realised))))
        y = np.log(np.maximum(realised, floor))  # a module that did not help is "tiny", not undefined
        self._intervals.append((x, y))
        xs = np.concatenate([xi - xi.mean(axis=0) for xi, _ in self._intervals])
        ys = np.concatenate([yi - yi.mean() for _, yi in self._intervals])
        penalty = self.ridge * len(ys) * np.eye(xs.shape[1])
        self.weights = np.linalg.solve(xs.T @ xs + penalty, xs.T @ ys + penalty @ self.prior())
        self.intercept = float(y.mean() - (x @ self.weights).mean())

    def utilities(self, curves: np.ndarray) -> np.ndarray:
        """Predicted gain of every module at every rank: `curves[m, r]` = E_m(r) for r = 0..R gives u[m, r] with
        u[m, 0] = 0, made non-decreasing and concave (non-increasing increments), as the allocator expects."""
        modules, width = curves.shape
        gains = np.zeros((modules, width))
        for rank in range(1, width):
            gains[:, rank] = self.predict(self.features(curves[:, rank], np.full(modules, float(rank))))
        increments = np.maximum(np.diff(gains, axis=1), 0.0)
        increments = np.minimum.accumulate(increments, axis=1)
        return np.concatenate([np.zeros((modules, 1)), np.cumsum(increments, axis=1)], axis=1)

    def state_dict(self) -> dict:
        as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
        return {
            "weights": as_tensor(self.weights),
            "intercept": self.intercept,
            "intervals": [(as_tensor(x), as_tensor(y)) for x, y in self._intervals],
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].numpy()
        self.intercept = float(state["intercept"])
        self._intervals.clear()
        self._intervals.extend((x.numpy(), y.numpy()) for x, y in state["intervals"])

    def describe(self) -> dict[str, float]:
        return {"intercept": self.intercept, **dict(zip(self.feature_names, map(float, self.weights), strict=True))}
