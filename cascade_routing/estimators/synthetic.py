"""Former location of the synthetic estimators, kept for existing imports: see :mod:`cascade_routing.evaluation.synthetic`."""

from cascade_routing.evaluation.synthetic import (  # noqa: F401
    NOISE_PRESETS,
    NoiseLevel,
    OracleCostEstimator,
    OracleQualityEstimator,
    SyntheticCostEstimator,
    SyntheticQualityEstimator,
    oracle_estimators,
    synthetic_estimators,
)
