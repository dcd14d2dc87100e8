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



def check_settings(budgets_per_pair: object, num_resamples: object) -> None:
    """ValueError naming the setting unless ``budgets_per_pair`` and ``num_resamples`` are integers
    >= 1 (the CLI's rule; 0 would leave no budget or no bootstrap resample)."""
    for name, value in (("budgets_per_pair", budgets_per_pair), ("num_resamples", num_resamples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_names(names: object, known: tuple[str, ...], what: str) -> None:
    """ValueError unless ``names`` is a non-empty sequence of names from ``known`` (not one string,
    which would be read letter by letter); ``what`` names the setting (``strategies``, ...)."""
    if isinstance(names, str):
        raise ValueError(f"{what} must be a sequence of names, got the single string {names!r} "
                         f"(for one: ({names!r},))")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown} (choose from {list(known)})")
    if not list(names):
        raise ValueError(f"{what} is empty (choose from {list(known)})")
