"""Replay backend (in-process ASGI: sockets are not the point here), its backends YAML, the CLI."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cascade_routing.cli import build_parser
from cascade_routing.serving.backends import load_backend_configs
from cascade_routing.serving.replay import create_replay_app, estimate_tokens, write_backends_yaml
from tests.serving_helpers import synthetic_dataset


SERVING_ROWS = 12  # queries of the conftest's ``ds``


def _post(app, path, body=None, content=None):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replay") as client:
            if content is not None:
                return await client.post(path, content=content)
            return await client.post(path, json=body)

    return asyncio.run(go())


def test_answers_with_recorded_response_usage_cost_and_features(ds):
    app = create_replay_app(ds)
    i, j = 5, 1
    model = ds.models[j]
    resp = _post(app, f"/{model}/v1/chat/completions",
                 {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": ds.queries[i]}]})
    assert resp.status_code == 200
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == ds.responses[i, j]
    assert body["usage"]["prompt_tokens"] == int(ds.features["tokens_in"][i, j])
    assert body["usage"]["completion_tokens"] == int(ds.features["tokens_out"][i, j])
    assert body["x_cost_usd"] == pytest.approx(ds.cost[i, j])
    assert body["x_recorded_features"]["logprob_confidence"] == pytest.approx(ds.features["logprob_confidence"][i, j])


def test_token_usage_estimated_without_recorded_tokens(ds):
    bare = synthetic_dataset(4)
    bare.features = {}
    app = create_replay_app(bare)
    body = _post(app, f"/{bare.models[0]}/v1/chat/completions",
                 {"messages": [{"role": "user", "content": bare.queries[0]}]}).json()
    assert body["usage"]["prompt_tokens"] == estimate_tokens(bare.queries[0])
    assert body["usage"]["completion_tokens"] == estimate_tokens(bare.responses[0, 0])


def test_replay_errors(ds):
    app = create_replay_app(ds, failures={ds.models[2]: "500", ds.models[1]: "down"})
    m0 = ds.models[0]
    assert _post(app, "/nope/v1/chat/completions", {"messages": []}).status_code == 404
    r = _post(app, f"/{m0}/v1/chat/completions", {"messages": [{"role": "user", "content": "never recorded"}]})
    assert r.status_code == 404 and "not in the recorded dataset" in r.json()["error"]["message"]
    assert _post(app, f"/{m0}/v1/chat/completions", content=b"{oops").status_code == 400
    assert _post(app, f"/{m0}/v1/chat/completions", {"messages": []}).status_code == 400
    ok = {"messages": [{"role": "user", "content": ds.queries[0]}]}
    assert _post(app, f"/{ds.models[2]}/v1/chat/completions", ok).status_code == 500
    assert _post(app, f"/{ds.models[1]}/v1/chat/completions", ok).status_code == 503
    app.state.failures.clear()  # failures are switchable at run time
    assert _post(app, f"/{ds.models[2]}/v1/chat/completions", ok).status_code == 200
    with pytest.raises(ValueError, match="unknown failure mode"):
        create_replay_app(ds, failures={m0: "flaky"})
    with pytest.raises(ValueError, match="unknown model"):
        create_replay_app(ds, failures={"x": "500"})


def test_written_backends_yaml_is_valid_and_points_at_replay(ds, tmp_path):
    path = write_backends_yaml(ds, "http://127.0.0.1:9999", tmp_path / "b.yaml", failures={ds.models[0]: "down"})
    configs = load_backend_configs(path)
    assert list(configs) == ds.models
    assert configs[ds.models[1]].url == f"http://127.0.0.1:9999/{ds.models[1]}/v1/chat/completions"
    assert "9999" not in configs[ds.models[0]].base_url  # a down model points at a closed port
    assert all(c.trust_reported_cost for c in configs.values())
    # fitted prices reproduce the synthetic costs (cost = tokens x prices exactly)
    c = configs[ds.models[2]]
    i = 3
    predicted = c.price_in * ds.features["tokens_in"][i, 2] + c.price_out * ds.features["tokens_out"][i, 2]
    assert predicted == pytest.approx(ds.cost[i, 2], rel=1e-6)


def test_cli_parses_serving_commands():
    parser = build_parser()
    args = parser.parse_args(["serve", "--checkpoint", "c.safetensors", "--backends", "b.yaml", "--budget", "0.001",
                              "--port", "8123", "--max-batch", "8"])
    assert args.func.__name__ == "_serve" and args.budget == 0.001 and args.max_batch == 8
    assert args.upstream_pools == 8
    args = parser.parse_args(["replay-backend", "--dataset", "routerbench-subset", "--split", "test",
                              "--split-fractions", "train=0.6,calibration=0.2,test=0.2", "--fail", "gpt-4=slow",
                              "--fail", "a=b=500", "--write-backends", "b.yaml"])
    assert args.func.__name__ == "_replay" and args.fail == [("gpt-4", "slow"), ("a=b", "500")]
    assert args.split_fractions == {"train": 0.6, "calibration": 0.2, "test": 0.2}
    with pytest.raises(SystemExit):
        parser.parse_args(["replay-backend", "--dataset", "x", "--fail", "gpt-4=flaky"])


def test_serve_hands_its_upstream_pools_to_the_backend_pool(monkeypatch, tmp_path):
    """`serve --upstream-pools K` reaches ``serve`` and the BackendPool it builds holds K HTTP pools."""
    import cascade_routing.serving.runner as server_module
    from cascade_routing.serving.backends import BackendPool

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda *a, **kw: seen.update(kw) or 0)
    args = build_parser().parse_args(["serve", "--checkpoint", "c", "--backends", "b", "--budget", "1",
                                      "--upstream-pools", "3"])
    assert args.func(args) == 0
    assert seen["upstream_pools"] == 3 and seen["bind_thread"] is True
    args = build_parser().parse_args(["serve", "--checkpoint", "c", "--backends", "b", "--budget", "1",
                                      "--no-bind-thread"])
    assert args.func(args) == 0 and seen["bind_thread"] is False
    doc = tmp_path / "b.yaml"
    doc.write_text("models:\n  - {name: m, base_url: 'http://127.0.0.1:1/v1', price_per_input_token: 0, "
                   "price_per_output_token: 0}\n")
    pool = BackendPool.from_yaml(doc, connection_pools=3)
    assert len(pool._client.clients) == 3
    asyncio.run(pool.aclose())
    with pytest.raises(ValueError, match="connection_pools"):
        BackendPool.from_yaml(doc, connection_pools=0)


def test_replay_prices_are_the_cost_models_fit(ds):
    """One price fit: the replay backend's per-token prices are the cost model's non-negative fit."""
    from cascade_routing.estimators.cost import CostModel
    from cascade_routing.serving.replay import _fit_prices

    model = CostModel.fit(ds)
    assert model.mode == "tokens"
    for j in range(ds.num_models):
        assert _fit_prices(ds, j) == (model.price_in[j], model.price_out[j])
        assert min(_fit_prices(ds, j)) >= 0.0


def test_replay_backend_keeps_idle_connections_longer_than_httpx_expires_them(monkeypatch, tmp_path):
    """uvicorn's default keep-alive (5 s) equals httpx's idle expiry: a client may send a request on a
    connection the server is closing. The replay backend keeps them as long as ``serve`` does."""
    import uvicorn

    from cascade_routing.serving.replay import replay_backend
    from cascade_routing.serving.server import KEEP_ALIVE_S

    seen = {}

    def run(server, sockets=None):
        seen.update(keep_alive=server.config.timeout_keep_alive, address=sockets[0].getsockname())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    folder = synthetic_dataset(20, seed=1).save(tmp_path / "ds")
    replay_backend(str(folder), port=0, log_level="warning")
    assert seen["keep_alive"] == int(KEEP_ALIVE_S) > 5 and seen["address"][0] == "127.0.0.1"


def test_replay_backend_writes_its_backends_file_only_once_it_has_its_port(monkeypatch, tmp_path):
    """A taken port fails the start with a message naming it, and leaves no ``--write-backends`` file
    pointing at the other process's port; on a free port the file names the port actually bound."""
    import socket

    import uvicorn
    import yaml

    from cascade_routing.serving.replay import replay_backend

    folder = synthetic_dataset(20, seed=1).save(tmp_path / "ds")
    written = tmp_path / "backends.yaml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            replay_backend(str(folder), port=port, write_backends=written, log_level="warning")
    assert not written.exists()
    bound = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: bound.update(port=sockets[0].getsockname()[1]))
    replay_backend(str(folder), port=0, write_backends=written, log_level="warning")
    urls = {m["base_url"] for m in yaml.safe_load(written.read_text())["models"]}
    assert bound["port"] > 0 and all(u.startswith(f"http://127.0.0.1:{bound['port']}/") for u in urls)
