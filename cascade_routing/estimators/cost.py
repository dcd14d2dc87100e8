"""Cost estimator: prices × predicted tokens where token counts exist, per-model mean cost otherwise.

Fitted on the estimator-training split (:meth:`CostModel.fit`):

- ``tokens`` mode (the dataset has ``tokens_in`` and ``tokens_out``): per model m, non-negative
  least squares ``cost ≈ p_in,m · tokens_in + p_out,m · tokens_out`` (USD per token, recovering the
  provider's prices), input tokens predicted from the query's characters
  ``tokens_in ≈ a_m · chars + b_m``, output tokens the model's mean on the task (overall mean for an
  unseen or missing task). Prediction: ``p_in,m · t̂_in + p_out,m · t̂_out``.
- ``mean`` mode: the model's mean cost on the query's task (overall mean for an unseen task).

Once model m has run for a query the estimate is exact: ``features["cost"][i, m]`` if the bound
table has that column, else ``p_in·tokens_in + p_out·tokens_out`` from the run's own token counts
(tokens mode), read only where ``ran``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.prices import nonneg_lstsq
from cascade_routing.interfaces import checked_row_ids


@dataclass
class CostModel:
    """Per-model cost predictor (see module docstring); JSON-serialisable via ``to_dict``."""

    models: list[str]
    mode: str  # "tokens" or "mean"
    mean_cost: list[float]
    mean_cost_by_task: dict[str, list[float]] = field(default_factory=dict)
    price_in: list[float] = field(default_factory=list)
    price_out: list[float] = field(default_factory=list)
    tokens_in_coef: list[list[float]] = field(default_factory=list)  # [M, 2] (per char, intercept)
    tokens_out_mean: list[float] = field(default_factory=list)
    tokens_out_by_task: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit(cls, data: RoutingDataset) -> "CostModel":
        m = data.num_models
        mean_cost = data.cost.mean(0).tolist()
        by_task: dict[str, list[float]] = {}
        tasks = np.asarray(data.tasks) if data.tasks is not None else None
        if tasks is not None:
            for t in sorted(set(data.tasks)):
                by_task[t] = data.cost[tasks == t].mean(0).tolist()
        if "tokens_in" not in data.features or "tokens_out" not in data.features:
            return cls(list(data.models), "mean", mean_cost, by_task)
        tin, tout = data.features["tokens_in"], data.features["tokens_out"]
        chars = np.asarray([len(q) for q in data.queries], dtype=np.float64)
        price_in, price_out, coef, out_mean = [], [], [], []
        for j in range(m):
            a, b = nonneg_lstsq(tin[:, j], tout[:, j], data.cost[:, j])
            price_in.append(a)
            price_out.append(b)
            design = np.stack([chars, np.ones_like(chars)], 1)
            sol, *_ = np.linalg.lstsq(design, tin[:, j], rcond=None)
            coef.append([float(sol[0]), float(sol[1])])
            out_mean.append(float(tout[:, j].mean()))
        out_by_task: dict[str, list[float]] = {}
        if tasks is not None:
            for t in sorted(set(data.tasks)):
                out_by_task[t] = tout[tasks == t].mean(0).tolist()
        return cls(list(data.models), "tokens", mean_cost, by_task, price_in, price_out, coef, out_mean, out_by_task)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CostModel":
        return cls(**dict(d))

    def prices(self) -> dict[str, dict[str, float]]:
        """Per model: USD per input/output token (tokens mode) and the mean cost per query."""
        out = {}
        for j, name in enumerate(self.models):
            entry = {"mean_cost": float(self.mean_cost[j])}
            if self.mode == "tokens":
                entry.update(input_per_token=float(self.price_in[j]), output_per_token=float(self.price_out[j]))
            out[name] = entry
        return out

    def predict(self, queries: list[str], tasks: list[str] | None = None) -> np.ndarray:
        """Ex-ante cost [N, M] in USD."""
        n, m = len(queries), len(self.models)
        task_list = list(tasks) if tasks is not None else [None] * n
        if self.mode == "mean":
            rows = [self.mean_cost_by_task.get(t, self.mean_cost) if t is not None else self.mean_cost for t in task_list]
            return np.asarray(rows, dtype=np.float64).reshape(n, m)
        chars = np.asarray([len(q) for q in queries], dtype=np.float64)
        coef = np.asarray(self.tokens_in_coef)
        t_in = np.clip(chars[:, None] * coef[:, 0] + coef[:, 1], 1.0, None)
        t_out = np.asarray(
            [self.tokens_out_by_task.get(t, self.tokens_out_mean) if t is not None else self.tokens_out_mean for t in task_list],
            dtype=np.float64,
        ).reshape(n, m)
        return t_in * np.asarray(self.price_in) + t_out * np.asarray(self.price_out)

    def exact(self, features: Mapping[str, np.ndarray], rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        """Recorded cost of run cells (rows[k], cols[k]), or None if the table cannot tell."""
        if "cost" in features:
            return np.asarray(features["cost"][rows, cols], dtype=np.float64)
        if self.mode == "tokens" and "tokens_in" in features and "tokens_out" in features:
            pi, po = np.asarray(self.price_in)[cols], np.asarray(self.price_out)[cols]
            return pi * features["tokens_in"][rows, cols] + po * features["tokens_out"][rows, cols]
        return None


class BoundCostEstimator:
    """A :class:`CostModel` bound to a table of queries; implements ``CostEstimator``."""

    def __init__(
        self,
        cost_model: CostModel,
        queries: list[str],
        features: Mapping[str, np.ndarray] | None = None,
        tasks: list[str] | None = None,
    ) -> None:
        self.models = list(cost_model.models)
        self.cost_model = cost_model
        self.features = features if features is not None else {}
        self.predicted = torch.as_tensor(cost_model.predict(queries, tasks), dtype=torch.float32)

    def estimate(self, queries: Tensor, ran: Tensor) -> Tensor:
        """[B, M]: predicted cost, replaced by the recorded cost where ``ran``. ``queries``: row ids
        in [0, N) of the bound table (``IndexError`` otherwise); ``ran``: [B, M] (``ValueError``)."""
        rows = torch.from_numpy(checked_row_ids(queries, self.predicted.shape[0], out_of_range=IndexError))
        ran_cpu = torch.as_tensor(ran, dtype=torch.bool).cpu()
        if tuple(ran_cpu.shape) != (rows.numel(), len(self.models)):
            raise ValueError(f"ran must be [{rows.numel()}, {len(self.models)}], got {tuple(ran_cpu.shape)}")
        out = self.predicted[rows].clone()
        b, c = torch.nonzero(ran_cpu, as_tuple=True)
        if b.numel():
            exact = self.cost_model.exact(self.features, rows[b].numpy(), c.numpy())
            if exact is not None:
                out[b, c] = torch.as_tensor(exact, dtype=out.dtype)
        return out.to(torch.as_tensor(ran).device)
