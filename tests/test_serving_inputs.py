"""Silent-wrong inputs on the way to a served router get clear errors: an artifact whose stored
tensors' dtype or shape disagrees with its network config, unknown network config keys; data
import with duplicate YAML keys, a missing mapping file, non-UTF-8 input; λ = inf."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from cascade_routing.data.errors import DatasetError
from cascade_routing.data.importer import import_table, load_mapping
from cascade_routing.estimators.artifact import ArtifactError, load_artifact
from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import CascadeRouting, Routing
from cascade_routing.policies.base import PolicyError
from tests.serving_helpers import make_tiny_artifact, synthetic_dataset


@pytest.fixture(scope="module")
def artifact_path(tmp_path_factory):
    path, _ = make_tiny_artifact(synthetic_dataset(24), tmp_path_factory.mktemp("art"), strategies=("routing",))
    return path


def _edit_header(src, dst, edit):
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_tensor_dtype_edited_in_the_header_is_refused(artifact_path, tmp_path):
    load_artifact(artifact_path)  # the original loads

    def to_i32(header):
        name = next(k for k, v in header.items() if k.startswith("net.") and v.get("dtype") == "F32")
        header[name]["dtype"] = "I32"  # same byte size: safetensors itself accepts it

    bad = tmp_path / "i32.safetensors"
    _edit_header(artifact_path, bad, to_i32)
    with pytest.raises(ArtifactError, match=r"tensor net\..* is torch.int32 .* needs torch.float32"):
        load_artifact(bad)


def test_unknown_network_config_key_is_an_artifact_error(artifact_path, tmp_path):
    def add_key(header):
        payload = json.loads(header["__metadata__"]["payload"])
        payload["network_config"]["bogus_width"] = 3
        header["__metadata__"]["payload"] = json.dumps(payload)

    bad = tmp_path / "key.safetensors"
    _edit_header(artifact_path, bad, add_key)
    with pytest.raises(ArtifactError, match=r"unknown network config key\(s\) \['bogus_width'\]"):
        load_artifact(bad)

    def bad_value(header):
        payload = json.loads(header["__metadata__"]["payload"])
        payload["network_config"]["hidden"] = "wide"
        header["__metadata__"]["payload"] = json.dumps(payload)

    _edit_header(artifact_path, bad, bad_value)
    with pytest.raises(ArtifactError, match="unusable network config"):
        load_artifact(bad)


def _table(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("question,a_ok,a_usd,b_ok,b_usd\nwhat?,1,0.1,0,0.2\nwhy?,0,0.1,1,0.2\n", encoding="utf-8")
    return path


def test_duplicate_model_key_in_the_mapping_is_an_error(tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("query: question\nmodels:\n  a: {quality: a_ok, cost: a_usd}\n"
                       "  a: {quality: b_ok, cost: b_usd}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"mapping.yaml.*duplicate key 'a' \(line 4; first on line 3\)"):
        import_table(_table(tmp_path), mapping)


def test_missing_mapping_file_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"mapping file .*nope.yaml does not exist"):
        load_mapping(str(tmp_path / "nope.yaml"))
    assert load_mapping("{query: q, models: [a]}")["query"] == "q"  # inline YAML still works


def test_non_utf8_input_names_the_file_and_line(tmp_path):
    table = _table(tmp_path)
    table.write_bytes(table.read_bytes().replace(b"why?", b"why\xff?"))
    mapping = {"query": "question", "models": ["a", "b"], "quality": "{model}_ok", "cost": "{model}_usd"}
    with pytest.raises(DatasetError, match=r"runs.csv: line 3 is not valid UTF-8"):
        import_table(table, mapping)
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"runs.jsonl: line 2 is not valid UTF-8"):
        import_table(jsonl, mapping)
    bad_mapping = tmp_path / "m.yaml"
    bad_mapping.write_bytes(b"query: q\xff\n")
    with pytest.raises(DatasetError, match=r"m.yaml: line 1 is not valid UTF-8"):
        load_mapping(bad_mapping)


@pytest.mark.parametrize("policy", [Routing(), CascadeRouting(num_samples=16)])
def test_infinite_lambda_is_refused(policy):
    est = QualityEstimate(torch.tensor([[0.5, 0.9]]), torch.tensor([[0.1, 0.1]]))
    cost = torch.tensor([[0.0, 1.0]])
    with pytest.raises(PolicyError, match="finite"):
        policy.decide(est, cost, torch.zeros(1, 2, dtype=torch.bool), float("inf"))
