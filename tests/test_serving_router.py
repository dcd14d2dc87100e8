"""CascadeRouter: step API, batch API and the async loop agree with the offline simulation."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import torch

from cascade_routing.evaluation import simulate
from cascade_routing.policies import CascadeRouting, FittedLambda, Routing, ThresholdCascade, fit_lambda, query_uniforms
from cascade_routing.serving import Answer, BackendError, CascadeRouter, NoModelAvailableError, RouterError
from tests.serving_helpers import FEATURE_NAMES, MODELS, bind, offline_features

POLICIES = {
    "routing": Routing,
    "threshold_cascade": ThresholdCascade,
    "cascade_routing": lambda: CascadeRouting(num_samples=64),
}


SERVING_ROWS = 40  # queries of the conftest's ``ds``


def _fitted(ds, policy, budget):
    qe, ce = bind(ds.queries, ds.responses, offline_features(ds), ds.tasks)
    return fit_lambda(policy, qe, ce, ds.quality, ds.cost, budget, queries=ds.queries)


def _offline(ds, policy, fitted):
    qe, ce = bind(ds.queries, ds.responses, offline_features(ds), ds.tasks)
    return simulate(policy, qe, ce, ds.quality, ds.cost, fitted, query_uniforms(ds.queries))


def _answer(ds, i, j):
    m = ds.models[j]
    return Answer(model=m, text=ds.responses[i, j], cost=float(ds.cost[i, j]),
                  features={k: float(v[i, j]) for k, v in ds.features.items()})


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_step_api_matches_simulation(ds, name):
    policy = POLICIES[name]()
    budget = float(ds.cost.mean(0)[1])
    fitted = _fitted(ds, policy, budget)
    sim = _offline(ds, policy, fitted)
    assert len(set(sim.answer.tolist())) > 1, "the budget should make the policy use several models"
    if name != "routing":
        assert int(sim.num_run.max()) > 1, "some query should run more than one model"
    _assert_router_follows(ds, policy, fitted, sim)


def test_threshold_cascade_with_a_stricter_later_threshold_matches_simulation(ds):
    """A per-step λ (λ, λ, 4λ) reaches the server as fitted: its orders and answers are the simulation's
    and differ from those of the constant λ (the last step's threshold is read)."""
    policy = ThresholdCascade()
    lam = 0.5 * float(_fitted(ds, policy, float(ds.cost.mean(0)[1])).lam_high[0]) + 0.05
    shaped = FittedLambda(torch.tensor([lam, lam, 4 * lam]), torch.tensor([lam, lam, 4 * lam]), 0.0)
    sim = _offline(ds, policy, shaped)
    constant = _offline(ds, policy, FittedLambda(torch.tensor([lam]), torch.tensor([lam]), 0.0))
    assert int(sim.num_run.max()) == 3 or int(constant.num_run.max()) == 3
    assert not torch.equal(sim.num_run, constant.num_run), "the later threshold should change some query"
    _assert_router_follows(ds, policy, shaped, sim)


def _assert_router_follows(ds, policy, fitted, sim) -> None:
    router = CascadeRouter(policy, bind, fitted, ds.models, feature_names=FEATURE_NAMES)
    for i, q in enumerate(ds.queries):
        answers: dict = {}
        order = []
        while (model := router.next_model(q, answers)) is not None:
            j = ds.model_index(model)
            assert model not in answers
            answers[model] = _answer(ds, i, j)
            order.append(j)
        expected = [j for j in sim.order[i].tolist() if j >= 0]
        assert order == expected, f"query {i}: router ran {order}, simulation {expected}"
        assert ds.model_index(router.select(q, answers)) == int(sim.answer[i])


def test_batch_equals_single(ds):
    policy = CascadeRouting(num_samples=64)
    fitted = _fitted(ds, policy, float(ds.cost.mean(0)[1]))
    router = CascadeRouter(policy, bind, fitted, ds.models, feature_names=FEATURE_NAMES)
    answers_list = [{ds.models[0]: _answer(ds, i, 0)} if i % 2 else {} for i in range(len(ds.queries))]
    batch = router.next_models(ds.queries, answers_list)
    single = [router.next_model(q, a) for q, a in zip(ds.queries, answers_list)]
    assert batch == single
    ran = [a if a else {ds.models[2]: _answer(ds, i, 2)} for i, a in enumerate(answers_list)]
    assert router.select_batch(ds.queries, ran) == [router.select(q, a) for q, a in zip(ds.queries, ran)]


def test_the_step_api_refuses_a_single_string_for_a_batch(ds):
    """``next_models("text")`` would route one query per character; a task list given as one string
    likewise."""
    policy = Routing()
    router = CascadeRouter(policy, bind, _fitted(ds, policy, float(ds.cost.mean(0)[1])), ds.models,
                           feature_names=FEATURE_NAMES)
    with pytest.raises(TypeError, match="queries must be a sequence of strings, one per query, got a single str"):
        router.next_models(str(ds.queries[0]))
    with pytest.raises(TypeError, match=r"queries\[0\] is of type int, not str"):
        router.select_batch([7], [{}])
    with pytest.raises(TypeError, match="tasks must be a sequence of strings"):
        router.next_models([str(ds.queries[0])], tasks=str(ds.tasks[0]))
    assert router.next_models([str(ds.queries[0])]) == [router.next_model(str(ds.queries[0]))]


def test_an_answer_without_the_confidence_the_estimators_read_is_read_as_none_and_warned(ds):
    """Estimators trained with ``logprob_confidence`` (rational-llm-cascades): an answer given as a
    plain string, or from a backend without ``logprobs: true``, has none. It used to read as log p = 0
    (an answer the model was certain of); now the cell is NaN, which the estimators read as "no
    confidence" (``has_confidence`` 0), and the router warns."""
    import warnings

    from cascade_routing.estimators.features import static_features
    from cascade_routing.serving.router import MissingConfidenceWarning, _State

    policy = Routing()
    router = CascadeRouter(policy, bind, _fitted(ds, policy, float(ds.cost.mean(0)[1])), ds.models,
                           feature_names=FEATURE_NAMES)
    state = _State(router, [str(ds.queries[0])], None)
    with pytest.warns(MissingConfidenceWarning, match=f"an answer of '{ds.models[1]}' came without 'logprob_confidence'"):
        state.record(0, 1, "B")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingConfidenceWarning)
        state.record(0, 2, Answer(model=ds.models[2], text="C", cost=0.1, features={"logprob_confidence": -0.25}))
    conf = state.features["logprob_confidence"]
    assert np.isnan(conf[0, 1]) and conf[0, 2] == -0.25 and np.isnan(conf[0, 0])
    static = static_features(np.array([0]), state.ran.numpy(), state.responses, state.features)
    assert static[0, 1, 1:].tolist() == [0.0, 0.0] and static[0, 2, 1:].tolist() == [-0.25, 1.0]


def test_failed_model_is_removed_from_candidates(ds):
    policy = Routing()
    # λ = 0: routing picks the model with the highest ex-ante mean (the large model mostly)
    router = CascadeRouter(policy, bind, FittedLambda(torch.zeros(1), torch.zeros(1)), ds.models,
                           feature_names=FEATURE_NAMES)
    for q in ds.queries[:10]:
        first = router.next_model(q, {})
        second = router.next_model(q, {first: None})
        assert second is not None and second != first
        third = router.next_model(q, {first: None, second: None})
        assert third not in (first, second, None)
        assert router.next_model(q, {m: None for m in MODELS}) is None
        with pytest.raises(NoModelAvailableError):
            router.select(q, {m: None for m in MODELS})
        # routing after a fallback answered: stop, answer from the model that answered
        assert router.next_model(q, {first: None, second: "medium says CORRECT"}) is None
        assert router.select(q, {first: None, second: "x CORRECT"}) == second


def test_a_single_model_fit_runs_that_model_alone_and_falls_back_when_it_fails(ds):
    """A budget where the single-model guard fired (``FittedLambda.models``): every query runs that
    model and stops; if its backend failed, cascade routing decides among the others at depth 1."""
    only = FittedLambda(torch.zeros(1), torch.zeros(1), max_depth=1, models=(1,))
    router = CascadeRouter(CascadeRouting(num_samples=64), bind, only, ds.models, feature_names=FEATURE_NAMES)
    sim = _offline(ds, CascadeRouting(num_samples=64), only)
    assert bool(sim.ran[:, 1].all()) and int(sim.num_run.max()) == 1
    for i, q in enumerate(ds.queries[:10]):
        assert router.next_model(q, {}) == ds.models[1]
        assert router.next_model(q, {ds.models[1]: _answer(ds, i, 1)}) is None
        fallback = router.next_model(q, {ds.models[1]: None})
        assert fallback in ds.models and fallback != ds.models[1]
        assert router.next_model(q, {ds.models[1]: None, fallback: _answer(ds, i, ds.model_index(fallback))}) is None


def test_a_cascade_guard_fit_is_served_as_the_cascade_it_runs(ds):
    """A budget where the cascade guard fired (``FittedLambda.cascade``): the server runs the optimal
    cascade over the policy's pool, step for step as the simulation does."""
    import dataclasses

    policy = CascadeRouting(num_samples=64)
    fitted = dataclasses.replace(_fitted(ds, policy.cascade_policy(), float(ds.cost.mean(0)[1])), cascade=True)
    sim = _offline(ds, policy, fitted)
    assert bool(sim.ran[:, 0].all()) and int(sim.num_run.max()) > 1  # the chain's head first, some escalate
    _assert_router_follows(ds, policy, fitted, sim)


def test_threshold_cascade_skips_failed_model_and_never_answers_with_it(ds):
    router = CascadeRouter(ThresholdCascade(), bind, FittedLambda(torch.zeros(1), torch.zeros(1)), ds.models,
                           feature_names=FEATURE_NAMES)
    q = ds.queries[0]
    assert router.next_model(q, {}) == "small"
    assert router.next_model(q, {"small": None}) == "medium"  # the cascade goes on without "small"
    assert router.select(q, {"small": None, "medium": "WRONG", "large": None}) == "medium"


def test_server_and_artifact_pick_the_same_fitted_lambda(ds):
    """One budget-lookup rule: the router (server) and the artifact (simulation) agree on every budget,
    including a budget read back with float rounding just below a fitted one."""
    from cascade_routing.estimators.artifact import ArtifactError, EstimatorArtifact
    from cascade_routing.estimators.cost import CostModel
    from cascade_routing.policies.lambda_table import lookup_fitted

    budgets = [1e-4, 3e-4, 1e-3]
    table = {b: FittedLambda(torch.tensor([1.0 / b]), torch.tensor([1.0 / b])) for b in budgets}
    router = CascadeRouter(Routing(), bind, table, ds.models, budget=1e-3)
    art = EstimatorArtifact(models=list(ds.models), network_config={}, state_dict={},
                            cost_model=CostModel.fit(ds), encoder={}, fitted={"routing": table})
    for requested in [1e-4, 1e-4 * (1 - 1e-12), 2e-4, 3e-4, 5e-4, 1e-3, 2.0]:
        used, fitted = router.fitted_for(requested)
        assert fitted is art.fitted_lambda("routing", requested)
        assert (used, fitted) == lookup_fitted(table, requested)
        assert used == max(b for b in budgets if b <= requested * (1 + 1e-9))
    assert lookup_fitted(table, 9e-5) is None
    with pytest.raises(ArtifactError, match="below the smallest fitted budget"):
        art.fitted_lambda("routing", 9e-5)
    with pytest.raises(RouterError, match="smallest fitted budget"):
        router.fitted_for(9e-5)


def test_budget_table_lookup(ds):
    policy = Routing()
    table = {1e-4: FittedLambda(torch.tensor([5.0]), torch.tensor([5.0])),
             1e-3: FittedLambda(torch.tensor([1.0]), torch.tensor([1.0]))}
    router = CascadeRouter(policy, bind, table, ds.models, budget=1e-3)
    assert router.fitted_for(None)[0] == 1e-3
    assert router.fitted_for(5e-4)[0] == 1e-4  # largest fitted budget <= requested
    assert router.fitted_for(1.0)[0] == 1e-3
    with pytest.raises(RouterError, match="smallest fitted budget"):
        router.fitted_for(1e-6)
    for bad, shown in ((float("nan"), "nan"), (True, "True (bool)"), ("1e-3", "'1e-3' (str)")):
        with pytest.raises(RouterError, match=rf"budget must be a finite number >= 0, got {re.escape(shown)}"):
            router.fitted_for(bad)
    with pytest.raises(RouterError, match="pass budget"):
        CascadeRouter(policy, bind, table, ds.models)
    with pytest.raises(RouterError, match="unknown model"):
        router.next_model(ds.queries[0], {"nope": "x"})


def test_a_budget_as_the_library_displays_it_finds_the_budget_it_names():
    """Budgets are shown to 6 significant digits (metrics labels, stats, errors) and may arrive as
    float32: fed back, each finds the fitted entry it names, not the one below it."""
    from cascade_routing.policies.lambda_table import checked_budget, lookup_fitted

    table = {b: b for b in (8.128983050847466e-05, 0.000164260142, 0.000328104567, 0.00501986543)}
    for b in table:
        for shown in (float(f"{b:.6g}"), float(np.float32(b)), torch.tensor(b, dtype=torch.float32)):
            assert lookup_fitted(table, shown) == (b, b), (b, shown)
    assert lookup_fitted(table, 8.1e-05) is None and checked_budget(np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match="got inf"):
        checked_budget(float("inf"))


def test_route_matches_simulation_and_falls_back(ds):
    policy = CascadeRouting(num_samples=64)
    fitted = _fitted(ds, policy, float(ds.cost.mean(0)[1]))
    sim = _offline(ds, policy, fitted)
    router = CascadeRouter(policy, bind, fitted, ds.models, feature_names=FEATURE_NAMES)
    row = {q: i for i, q in enumerate(ds.queries)}
    down: set[str] = set()

    def backend(j):
        async def call(messages, **_):
            if ds.models[j] in down:
                raise BackendError(ds.models[j], "http_500", "simulated", 2)
            return _answer(ds, row[messages[-1]["content"]], j)
        return call

    backends = {m: backend(j) for j, m in enumerate(ds.models)}

    async def run_all():
        return [await router.route(q, backends) for q in ds.queries]

    results = asyncio.run(run_all())
    for i, res in enumerate(results):
        expected = [ds.models[j] for j in sim.order[i].tolist() if j >= 0]
        assert res.models_run == expected
        assert res.model == ds.models[int(sim.answer[i])]
        assert res.total_cost == pytest.approx(float(sim.cost[i]), rel=1e-12)
        assert res.text == ds.responses[i, int(sim.answer[i])]
        assert len(res.steps) == len(expected) + 1 and res.steps[-1].model is None
        assert set(res.steps[0].estimate_mean) == set(ds.models)
        assert res.routing_ms >= 0 and res.backend_ms >= 0

    # the model the policy wants first is down: it is recorded and another model answers
    first = results[0].models_run[0]
    down.add(first)
    res = asyncio.run(router.route(ds.queries[0], backends))
    assert res.failures and res.failures[0]["model"] == first and first not in res.models_run
    assert res.models_run and res.model != first and res.attempted[0] == first
    _assert_trace_is_the_result_without_answers(res)
    down.update(ds.models)
    with pytest.raises(NoModelAvailableError) as err:
        asyncio.run(router.route(ds.queries[0], backends))
    assert {f["model"] for f in err.value.failures} == set(ds.models)


def _assert_trace_is_the_result_without_answers(res) -> None:
    """``to_dict`` = every field of the dataclass (as ``asdict`` gives it) but the answers, the query
    and the text, plus the usage per model; JSON-ready, and a copy (editing it leaves the result)."""
    import dataclasses
    import json

    res.answers[res.model].raw = {"choices": [{"message": {"content": res.text}}], "big": list(range(100))}
    res.answers[res.model].usage = {"prompt_tokens": 3, "completion_tokens": 2}
    trace = res.to_dict()
    expected = {k: v for k, v in dataclasses.asdict(res).items() if k not in {"answers", "query", "text"}}
    expected["usage"] = {m: a.usage for m, a in res.answers.items()}
    assert trace == expected
    assert json.loads(json.dumps(trace)) == trace
    trace["steps"][0]["estimate_mean"].clear()
    trace["failures"][0]["model"] = "edited"
    trace["models_run"].append("edited")
    trace["usage"][res.model]["prompt_tokens"] = -1
    assert res.steps[0].estimate_mean and res.failures[0]["model"] != "edited"
    assert "edited" not in res.models_run and res.answers[res.model].usage["prompt_tokens"] == 3


def test_task_labels_are_checked_against_the_checkpoints():
    """An unknown ``task`` would read as "no task" (an all-zero one-hot): refused, naming the known ones;
    a checkpoint trained without tasks refuses every label; without a vocabulary nothing is checked."""
    from types import SimpleNamespace

    from cascade_routing.serving.checkpoint import artifact_tasks

    art = SimpleNamespace(task_vocabulary=["mbpp", "arc"],
                          cost_model=SimpleNamespace(mean_cost_by_task={"arc": [1.0]}, tokens_out_by_task={"wino": [2]}))
    assert artifact_tasks(art) == ["arc", "mbpp", "wino"]
    assert artifact_tasks(SimpleNamespace(task_vocabulary=[], cost_model=None)) == []
    router = CascadeRouter.__new__(CascadeRouter)
    for tasks, task, words in [(("arc", "mbpp"), "poetry", "knows ['arc', 'mbpp']"), ((), "arc", "without task labels")]:
        router.tasks = tasks
        with pytest.raises(RouterError, match=re.escape(words)):
            router.check_task(task)
        router.check_task(None)
    router.tasks = None
    router.check_task("anything")
