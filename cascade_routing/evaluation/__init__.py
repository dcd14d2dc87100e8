"""Simulation of policies on known outcomes, budget sweeps, AUC, plots, the paper's reproduction.

Pure torch/numpy (plus matplotlib for plots); no Lightning, no transformers.
"""

from cascade_routing.evaluation.metrics import (
    auc,
    bootstrap_auc,
    linear_interpolation_curve,
    nondominated_models,
    sweep_budgets,
)
from cascade_routing.evaluation.simulate import SimulationResult, simulate
from cascade_routing.evaluation.sweep import SweepResult, budget_sweep, linear_interpolation_sweep

__all__ = [
    "SimulationResult", "SweepResult", "auc", "bootstrap_auc", "budget_sweep", "linear_interpolation_curve",
    "linear_interpolation_sweep", "nondominated_models", "simulate", "sweep_budgets",
]
