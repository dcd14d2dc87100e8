"""Quality and cost estimators: the learned estimator and its artifact, the paper-style baseline, the cost model.

The estimator protocol lives in :mod:`cascade_routing.interfaces` (re-exported here).
"""

from cascade_routing.interfaces import CostEstimator, QualityEstimate, QualityEstimator  # the protocol, re-exported

__all__ = ["CostEstimator", "QualityEstimate", "QualityEstimator"]
