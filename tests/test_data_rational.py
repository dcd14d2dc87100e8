"""rational-llm-cascades converter and the restricted unpickler (hostile pickles refused)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cascade_routing.data import DatasetError, load_dataset
from cascade_routing.data.converters.rational import LOGPROB_FLOOR, convert_rational
from cascade_routing.data.safe_pickle import InertChainResponse, UnsafePickleError, safe_load, safe_loads

MMLU_TEST = {  # SOURCE.txt: per-model MMLU test accuracy
    "llama3.2-1b": 0.425, "llama3.2-3b": 0.572, "llama3.1-8b": 0.634, "llama3.1-70b": 0.815,
    "llama3.1-405b": 0.852, "gpt-4o-mini": 0.749, "qwen2.5-32b-coder-instruct": 0.753,
    "qwen2.5-72b-instruct": 0.820, "gpt-4o": 0.836,
}


@pytest.fixture(scope="module")
def rational():
    return load_dataset("rational-llm-cascades", progress=False)


def test_counts_and_mmlu_accuracies(rational) -> None:
    ds = rational
    assert ds.num_queries == 5533 and ds.num_models == 9
    split = [q.split("/")[1] for q in ds.query_ids]
    assert split.count("train") == 1485 and split.count("test") == 4048
    assert {t: ds.tasks.count(t) for t in set(ds.tasks)} == {
        "mmlu": 1816, "medmcqa": 1300, "triviaqa": 1300, "truthfulqa": 817, "gsm8k": 300}
    rows = [i for i, q in enumerate(ds.query_ids) if q.startswith("mmlu/test/")]
    assert len(rows) == 1531
    for model, acc in MMLU_TEST.items():
        assert round(ds.quality[rows, ds.model_index(model)].mean(), 3) == acc, model
    assert set(ds.features) == {"tokens_in", "tokens_out", "latency_ms", "logprob_confidence"}
    assert (ds.features["tokens_in"] > 0).all() and (ds.features["logprob_confidence"] <= 0).all()
    assert int((ds.features["logprob_confidence"] == LOGPROB_FLOOR).sum()) == 56
    assert ds.responses is not None and all(isinstance(r, str) for r in ds.responses[:5].ravel())
    assert round(ds.cost[rows, ds.model_index("gpt-4o")].mean(), 6) == pytest.approx(4.75e-4, abs=1e-6)


def test_every_split_numbers_the_models_like_the_dataset(rational) -> None:
    """llama3.2-1b/3b (and gpt-4o/llama3.1-405b) cost nearly the same on average: the training splits
    must still all use the dataset's column order (the calibration and test parts of seed 0 used to
    swap the two llama3.2 columns, so the estimator read 3b's outcomes as 1b's)."""
    from cascade_routing.training.datamodule import DEFAULT_SPLIT

    for seed in (0, 3):
        for name, part in rational.split(DEFAULT_SPLIT, seed=seed).items():
            assert part.models == rational.models, (seed, name)
            rows = [i for i, q in enumerate(part.query_ids) if q.startswith("mmlu/test/")]
            mmlu = part.quality[rows]
            # on every part's MMLU test rows the 3b model is the better of the two (0.572 vs 0.425 overall)
            assert mmlu[:, part.model_index("llama3.2-3b")].mean() > mmlu[:, part.model_index("llama3.2-1b")].mean()


def test_chain_file_loads_with_inert_stand_in(raw_data_dir: Path) -> None:
    path = raw_data_dir / "rational_llm_cascades/benchmarks/data/mmlu/chain_results/mmlu_full_llama_chain_results_train.pkl"
    data = safe_load(path)
    assert len(data["user_prompts"]) == 285
    assert isinstance(data["chain_responses"][0], InertChainResponse)
    assert isinstance(data["raw_confidences"]["llama3.2-1b"][0], np.floating)


class _Hostile:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_hostile_pickle_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"user_prompts": ["x"], "evil": _Hostile(f"touch {marker}")})
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refusing to load global (posix|nt|os)\.system"):
        safe_load(path)
    assert not marker.exists()
    # Also refused through the converter.
    folder = tmp_path / "benchmarks/data/mmlu/chain_results"
    folder.mkdir(parents=True)
    for chain in ("llama", "qwen_oai"):
        (folder / f"mmlu_full_{chain}_chain_results_test.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickleError):
        convert_rational(tmp_path)
    assert not marker.exists()


def test_other_dangerous_globals_refused() -> None:
    for module, name in (("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"), ("builtins", "getattr")):
        data = f"c{module}\n{name}\n.".encode()  # protocol-0 GLOBAL opcode, then STOP
        with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
            safe_loads(data, source="crafted")


def test_corrupt_pickle_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pkl"
    path.write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(DatasetError, match=r"broken\.pkl: corrupt or unsupported pickle"):
        safe_load(path)


def test_mismatched_prompts_refused(tmp_path: Path) -> None:
    folder = tmp_path / "benchmarks/data/mmlu/chain_results"
    folder.mkdir(parents=True)

    def chain(models, prompts):
        return {"user_prompts": prompts, **{k: {m: [0.0] * len(prompts) for m in models} for k in (
            "model_answers", "model_costs", "model_latencies", "model_tokens", "model_correctness", "raw_confidences")}}

    (folder / "mmlu_full_llama_chain_results_test.pkl").write_bytes(pickle.dumps(chain(["a"], ["p1", "p2"])))
    (folder / "mmlu_full_qwen_oai_chain_results_test.pkl").write_bytes(pickle.dumps(chain(["b"], ["p1", "pX"])))
    with pytest.raises(DatasetError, match="user_prompts differ; cannot join"):
        convert_rational(tmp_path)
