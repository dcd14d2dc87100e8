"""Decision policies, pure torch and batched over queries: routing, cascades, cascade routing."""

from cascade_routing.policies.base import BudgetUnreachable, Policy, PolicyError, select_best_ran
from cascade_routing.policies.cascade_routing import CascadeRouting
from cascade_routing.policies.cascades import OptimalCascade, ThresholdCascade
from cascade_routing.policies.fitting import FittedLambda, fit_lambda, query_uniforms
from cascade_routing.policies.registry import STRATEGIES, make_policy
from cascade_routing.policies.routing import Routing
from cascade_routing.policies.supermodels import expected_max, normal_draws, supermodel_table

__all__ = [
    "STRATEGIES", "BudgetUnreachable", "CascadeRouting", "FittedLambda", "OptimalCascade", "Policy", "PolicyError",
    "Routing", "ThresholdCascade", "expected_max", "fit_lambda", "make_policy", "normal_draws", "query_uniforms",
    "select_best_ran", "supermodel_table",
]
