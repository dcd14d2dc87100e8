"""API keys: bearer authentication on every endpoint (docs and stats included), per-key budget
caps that a request can only lower, per-key spend accounts and spend limits; the server-wide
account holds each request to the budget it was routed at."""

from __future__ import annotations

import httpx
import pytest

from cascade_routing.serving.keys import KeysConfigError, load_keys, parse_keys
from tests.serving_helpers import ServingStack, stand_in_router

NAME = "cascade-routing"
A, B, ADMIN = "sk-team-a-0001", "sk-team-b-0002", "sk-admin-0003"


SERVING_ROWS = 24  # queries of the conftest's ``ds``


@pytest.fixture(scope="module")
def budgets(ds):
    mean = ds.cost.mean(0)
    return [float(mean[0]) * 1.2, float(mean[1]), float(mean[2])]


@pytest.fixture(scope="module")
def router(ds, budgets):
    return stand_in_router(ds, budgets)[0]


@pytest.fixture
def stack(ds, router, budgets):
    keys = parse_keys({"keys": [
        {"name": "team-a", "key": A, "budget": budgets[0]},
        {"name": "team-b", "key": B, "max_spend": 1e-9},
        {"name": "ops", "key": ADMIN, "admin": True},
    ]}, "test")
    with ServingStack(ds, router, budget=budgets[1], keys=keys) as s:
        yield s


def _chat(url, key, query, **extra):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=20,
                      json={"model": NAME, "messages": [{"role": "user", "content": query}], **extra})


def test_every_endpoint_needs_a_key(stack, ds):
    for path in ("/v1/routing/stats", "/v1/models", "/docs", "/openapi.json"):
        resp = httpx.get(stack.url + path, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(stack.url + path, headers={"Authorization": f"Bearer {A}"}, timeout=10).status_code == 200
    assert _chat(stack.url, None, ds.queries[0]).status_code == 401
    assert _chat(stack.url, "sk-wrong-key-000", ds.queries[0]).status_code == 401
    assert httpx.get(stack.url + "/health", timeout=10).json() == {"status": "ok"}  # liveness only
    assert sum(stack.replay_app.state.requests.values()) == 0


def test_a_request_can_only_lower_its_budget(stack, ds, budgets):
    server, key_cap = budgets[1], budgets[0]
    r = _chat(stack.url, ADMIN, ds.queries[0], routing={"budget": 1e308}).json()["routing"]
    assert r["budget"] == server  # 1e308 does not raise the server's cap
    r = _chat(stack.url, A, ds.queries[0], routing={"budget": budgets[2]}).json()["routing"]
    assert r["budget"] == key_cap  # nor a key's
    r = _chat(stack.url, A, ds.queries[0]).json()["routing"]
    assert r["budget"] == key_cap


def test_per_key_accounts_and_spend_limit(stack, ds, budgets):
    costs = {"team-a": 0.0, "ops": 0.0}
    for i in range(4):
        costs["team-a"] += _chat(stack.url, A, ds.queries[i]).json()["routing"]["total_cost"]
        costs["ops"] += _chat(stack.url, ADMIN, ds.queries[i], routing={"budget": budgets[0]}).json()[
            "routing"]["total_cost"]
    first = _chat(stack.url, B, ds.queries[0])
    assert first.status_code == 200
    refused = _chat(stack.url, B, ds.queries[1])
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    costs["team-b"] = first.json()["routing"]["total_cost"]

    mine = httpx.get(stack.url + "/v1/routing/stats", headers={"Authorization": f"Bearer {A}"}, timeout=10).json()
    assert mine["key"] == "team-a" and mine["requests"] == 4 and "keys" not in mine
    assert mine["total_cost"] == pytest.approx(costs["team-a"])
    assert mine["budget"] == budgets[0]
    everything = httpx.get(stack.url + "/v1/routing/stats", headers={"Authorization": f"Bearer {ADMIN}"},
                           timeout=10).json()
    assert everything["key"] == "ops"  # an admin key sees the server-wide account and every key's
    assert everything["requests"] == 9 and everything["total_cost"] == pytest.approx(sum(costs.values()))
    assert {k: v["requests"] for k, v in everything["keys"].items()} == {"team-a": 4, "team-b": 1, "ops": 4}
    assert everything["keys"]["team-b"]["total_cost"] == pytest.approx(costs["team-b"])
    total = stack.app.state.ledger.snapshot()
    # requests routed at a lower budget are held to that budget, not mixed into the server's
    assert set(total["by_budget"]) == {repr(budgets[0]), repr(budgets[1])}
    assert total["by_budget"][repr(budgets[0])]["requests"] == 8


def test_keys_document_errors_name_the_entry(tmp_path, monkeypatch):
    with pytest.raises(KeysConfigError, match=r"keys\[1\].*duplicate name"):
        parse_keys({"keys": [{"name": "a", "key": "k" * 10}, {"name": "a", "key": "j" * 10}]}, "f.yaml")
    with pytest.raises(KeysConfigError, match=r"keys\[0\].*'budget' must be a finite number"):
        parse_keys({"keys": [{"name": "a", "key": "k" * 10, "budget": float("inf")}]}, "f.yaml")
    with pytest.raises(KeysConfigError, match="does not exist"):
        load_keys(tmp_path / "missing.yaml")
    monkeypatch.setenv("TEAM_KEY", "sk-from-env-123")
    monkeypatch.setenv("CASCADE_ROUTING_API_KEYS", '{"keys": [{"name": "env", "key_env": "TEAM_KEY"}]}')
    keys = load_keys()
    assert [k.name for k in keys.values()] == ["env"]


def test_a_key_budget_below_every_fitted_one_is_refused_at_start_naming_the_key(router, budgets):
    from cascade_routing.serving.router import RouterError
    from cascade_routing.serving.server import create_app

    keys = parse_keys({"keys": [{"name": "team-a", "key": A, "budget": budgets[0]},
                                {"name": "tiny", "key": B, "budget": min(budgets) * 1e-6}]}, "test")
    with pytest.raises(RouterError, match=r"API key 'tiny': budget .*no fitted λ"):
        create_app(router, {m: None for m in router.models}, budgets[1], keys=keys)
