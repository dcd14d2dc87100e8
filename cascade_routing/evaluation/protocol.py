"""The evaluation protocol shared by ``train-eval``, ``evaluate`` and ``benchmarks/bench_estimators.py``.

One place, so one artifact gets one table whichever entry point evaluates it: budgets are
``BUDGETS_PER_PAIR`` evenly spaced between each pair of consecutive non-dominated models
(:func:`cascade_routing.evaluation.metrics.sweep_budgets`) on the test split, plus the most
expensive non-dominated model's calibration cost when it is higher (λ is fitted on calibration
costs), and the AUC's 95% CI is the percentile
bootstrap over ``NUM_RESAMPLES`` resamples of the test queries (seed ``SEED``). The paper's own
synthetic-estimator protocol (``reproduce``) keeps its ``PAPER_BUDGETS_PER_PAIR`` (10) budgets per
pair and ``PAPER_NUM_RESAMPLES`` (500) resamples; an artifact's stored λ tables are fitted at
``EXPORT_BUDGETS_PER_PAIR`` (3) budgets per pair. The CLI's flags take their defaults from here.
"""

BUDGETS_PER_PAIR = 5
NUM_RESAMPLES = 200
SEED = 0
ESTIMATORS = ("learned", "baseline")  # the learned estimator and the paper-style baseline it is compared with
PAPER_BUDGETS_PER_PAIR = 10
PAPER_NUM_RESAMPLES = 500
EXPORT_BUDGETS_PER_PAIR = 3


def check_count(name: str, value: object) -> None:
    """ValueError naming the setting ``name`` unless ``value`` is an integer >= 1 (the CLI's rule
    for counts such as budgets per pair or bootstrap resamples)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_settings(budgets_per_pair: object, num_resamples: object) -> None:
    """ValueError naming the setting unless ``budgets_per_pair`` and ``num_resamples`` are integers
    >= 1 (the CLI's rule; 0 would leave no budget or no bootstrap resample): :func:`check_count`."""
    check_count("budgets_per_pair", budgets_per_pair)
    check_count("num_resamples", num_resamples)


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
