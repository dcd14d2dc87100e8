"""The offline simulation of a policy (re-exported from the policy stage, where λ fitting needs it)."""

from cascade_routing.policies.rollout import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]
