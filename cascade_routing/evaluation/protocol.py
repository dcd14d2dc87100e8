"""The evaluation protocol shared by ``train-eval``, ``evaluate`` and ``benchmarks/bench_estimators.py``.

One place, so one artifact gets one table whichever entry point evaluates it: budgets are
``BUDGETS_PER_PAIR`` evenly spaced between each pair of consecutive non-dominated models
(:func:`cascade_routing.evaluation.metrics.sweep_budgets`) on the test split, plus the most
expensive non-dominated model's calibration cost when it is higher (λ is fitted on calibration
costs), and the AUC's 95% CI is the percentile
bootstrap over ``NUM_RESAMPLES`` resamples of the test queries (seed ``SEED``). The paper's own
synthetic-estimator protocol (``reproduce``) keeps its 10 budgets per pair and 500 resamples.
"""

BUDGETS_PER_PAIR = 5
NUM_RESAMPLES = 200
SEED = 0
