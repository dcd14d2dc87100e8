"""Quality and cost estimators (pure torch interface in ``base``)."""

from cascade_routing.estimators.base import CostEstimator, QualityEstimate, QualityEstimator

__all__ = ["CostEstimator", "QualityEstimate", "QualityEstimator"]
