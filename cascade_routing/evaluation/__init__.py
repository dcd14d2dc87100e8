"""Simulation of policies on known outcomes, budget sweeps, AUC, plots, the paper's reproduction."""

from cascade_routing.evaluation.simulate import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]
