"""rational-llm-cascades result pickles -> :class:`RoutingDataset` (9 models joined per query).

Source: github.com/mzelling/rational-llm-cascades (Zellinger & Thomson 2025), files
``benchmarks/data/<bench>/chain_results/<bench>_full_{llama,qwen_oai}_chain_results_{train,test}.pkl``.
Each pickle is read with :func:`cascade_routing.data.safe_pickle.safe_load` (allow-list only; the
unpublished ``hcma.chain.ChainResponse`` becomes an inert stand-in; nothing else is executed).

Per (benchmark, split) the "llama" file (5 models) and the "qwen_oai" file (4 models) hold the same
``user_prompts`` list in the same order (checked: a mismatch raises), so row ``i`` of both is one
query with 9 models. Mapping:

- ``queries``: ``user_prompts[i]``; ``tasks``: the benchmark (``mmlu``, ``medmcqa``, ``triviaqa``,
  ``truthfulqa``, ``gsm8k``); ``query_ids``: ``"<bench>/<split>/<i>"``;
- ``quality``: ``model_correctness`` (bool -> 0/1; open-form answers were graded by the authors'
  LLM judge); ``cost``: ``model_costs`` (USD per query); ``responses``: ``model_answers``;
- features: ``tokens_in``/``tokens_out`` (``model_tokens``), ``latency_ms`` (``model_latencies``),
  ``logprob_confidence`` (``raw_confidences``: the answer token's log-probability for MMLU/MedMCQA,
  the log-probability of the model's stated confidence for the open-form benchmarks).
  A confidence of ``-inf`` (probability exactly 0; 56 cells, only gpt-4o-mini and qwen2.5-72b on
  TriviaQA/TruthfulQA) is stored as :data:`LOGPROB_FLOOR` and counted per model in
  ``metadata["conversion_report"]["notes"]``; any other non-finite or missing value raises.

Some benchmarks repeat a prompt text (MMLU test 2, train 1; TriviaQA test 24): those rows are kept
(they are distinct rows upstream) and counted in the notes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.converters.common import ConversionReport
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError
from cascade_routing.data.safe_pickle import safe_load

#: Stored in place of a log-probability confidence of -inf (log of a probability of exactly 0).
LOGPROB_FLOOR = -30.0

BENCHMARKS = ("mmlu", "medmcqa", "triviaqa", "truthfulqa", "gsm8k")
CHAINS = ("llama", "qwen_oai")
SPLITS = ("train", "test")
FEATURES = ("tokens_in", "tokens_out", "latency_ms", "logprob_confidence")
REQUIRED_KEYS = ("user_prompts", "model_answers", "model_costs", "model_latencies", "model_tokens",
                 "model_correctness", "raw_confidences")


def chain_file(bench: str, chain: str, split: str) -> str:
    """Upstream path of one chain-result pickle."""
    return f"benchmarks/data/{bench}/chain_results/{bench}_full_{chain}_chain_results_{split}.pkl"


def _load_chain(path: Path) -> dict[str, Any]:
    data = safe_load(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a dict at the top level, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise DatasetError(f"{path}: missing key {key!r}")
    n = len(data["user_prompts"])
    for key in REQUIRED_KEYS[1:]:
        if not isinstance(data[key], dict):
            raise DatasetError(f"{path}: {key!r} is not a dict model -> list")
        for model, values in data[key].items():
            if len(values) != n:
                raise DatasetError(f"{path}: {key}[{model!r}] has {len(values)} entries for {n} prompts")
    return data


def _number(value: Any, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: not a number: {value!r}") from None
    if not math.isfinite(x):
        raise DatasetError(f"{where}: non-finite value {x!r}")
    return x


def _load_pair(root: Path, bench: str, split: str, models: list[str] | None
               ) -> tuple[list[str], dict[str, tuple[Path, dict[str, Any]]], list[tuple[Path, dict[str, Any]]]]:
    """Read both chains' files of one ``(benchmark, split)`` pair and check they join per query.

    Returns the pair's model names (the first chain's, then the second's), the file each model's
    columns come from (``model -> (path, data)``), and the two ``(path, data)``; raises if the
    prompts differ, a model name repeats, or the models differ from ``models`` (earlier pairs').
    """
    datas = []
    for chain in CHAINS:
        path = root / chain_file(bench, chain, split)
        if not path.is_file():
            raise DatasetError(f"{path}: file not found")
        datas.append((path, _load_chain(path)))
    (p0, d0), (p1, d1) = datas
    if list(d0["user_prompts"]) != list(d1["user_prompts"]):
        raise DatasetError(f"{p0.name} and {p1.name}: user_prompts differ; cannot join per query")
    pair_models = list(d0["model_answers"]) + list(d1["model_answers"])
    if len(set(pair_models)) != len(pair_models):
        raise DatasetError(f"{p0.name} and {p1.name}: duplicate model names {pair_models}")
    if models is not None and sorted(models) != sorted(pair_models):
        raise DatasetError(f"{p0.name}: models {pair_models} differ from earlier files' {models}")
    order = pair_models if models is None else models
    owner = {m: (p0, d0) if m in d0["model_answers"] else (p1, d1) for m in order}
    return pair_models, owner, datas


def _query_cells(owner: dict[str, tuple[Path, dict[str, Any]]], models: list[str], i: int, floored: dict[str, int]
                 ) -> tuple[list[float], list[float], list[str | None], dict[str, list[float]]]:
    """Row ``i``'s quality, cost, response and feature cells across ``models``, each checked (module
    docstring); a ``-inf`` confidence becomes :data:`LOGPROB_FLOOR`, counted in ``floored``."""
    q_row, c_row, r_row = [], [], []
    f_row: dict[str, list[float]] = {k: [] for k in FEATURES}
    for m in models:
        path, d = owner[m]
        where = f"{path.name} row {i}, model {m!r}"
        correct = d["model_correctness"][m][i]
        if not isinstance(correct, (bool, np.bool_)):
            raise DatasetError(f"{where}, field 'model_correctness': expected a bool, got {correct!r}")
        q_row.append(float(correct))
        c = _number(d["model_costs"][m][i], f"{where}, field 'model_costs'")
        if c < 0:
            raise DatasetError(f"{where}, field 'model_costs': negative cost {c!r}")
        c_row.append(c)
        answer = d["model_answers"][m][i]
        r_row.append(None if answer is None else str(answer))
        tokens = d["model_tokens"][m][i]
        if not isinstance(tokens, dict) or "in" not in tokens or "out" not in tokens:
            raise DatasetError(f"{where}, field 'model_tokens': expected {{'in', 'out'}}, got {tokens!r}")
        f_row["tokens_in"].append(_number(tokens["in"], f"{where}, field 'model_tokens.in'"))
        f_row["tokens_out"].append(_number(tokens["out"], f"{where}, field 'model_tokens.out'"))
        f_row["latency_ms"].append(_number(d["model_latencies"][m][i], f"{where}, field 'model_latencies'"))
        conf = float(d["raw_confidences"][m][i])
        if conf == -math.inf:
            floored[m] = floored.get(m, 0) + 1
            conf = LOGPROB_FLOOR
        f_row["logprob_confidence"].append(_number(conf, f"{where}, field 'raw_confidences'"))
    return q_row, c_row, r_row, f_row


def _metadata(pairs: Sequence[tuple[str, str]], system_prompts: dict[str, list[str]], report: ConversionReport
              ) -> dict[str, Any]:
    """The dataset's ``metadata``: source, pairs read, field provenance, system prompts, report."""
    return {
        "source": "rational-llm-cascades",
        "pairs": [f"{b}/{s}" for b, s in pairs],
        "quality": "model_correctness (0/1; open-form graded by the authors' LLM judge)",
        "cost_source": "model_costs from the pickles (USD per query, provider prices)",
        "features": {
            "tokens_in": "model_tokens['in']", "tokens_out": "model_tokens['out']",
            "latency_ms": "model_latencies (ms)",
            "logprob_confidence": f"raw_confidences (log-prob; -inf stored as {LOGPROB_FLOOR})",
        },
        "query_id_format": "<benchmark>/<split>/<row in the upstream files>",
        "system_prompts": system_prompts,
        "conversion_report": report.to_dict(),
    }


def convert_rational(
    folder: str | os.PathLike[str],
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    name: str = "rational-llm-cascades",
) -> RoutingDataset:
    """Join the two chains' files for each ``(benchmark, split)`` pair found under ``folder``.

    ``pairs`` defaults to every pair whose two files exist (the snapshot lacks GSM8K test).
    """
    root = Path(folder)
    if pairs is None:
        pairs = [(b, s) for b in BENCHMARKS for s in SPLITS
                 if all((root / chain_file(b, c, s)).is_file() for c in CHAINS)]
    if not pairs:
        raise DatasetError(f"{root}: no rational-llm-cascades chain-result files found")
    report = ConversionReport(source=name)
    models: list[str] | None = None
    queries, tasks, ids, system_prompts = [], [], [], {}
    qual, cost, resp = [], [], []
    feats: dict[str, list[list[float]]] = {k: [] for k in FEATURES}
    floored: dict[str, int] = {}
    for bench, split in pairs:
        pair_models, owner, ((p0, d0), (p1, _)) = _load_pair(root, bench, split, models)
        models = pair_models if models is None else models
        n = len(d0["user_prompts"])
        report.files[p0.name] = {"read": n, "kept": n}
        report.files[p1.name] = {"read": n, "kept": n}
        report.rows_read += n
        repeats = n - len(set(d0["user_prompts"]))
        if repeats:
            report.notes.append(f"{bench}/{split}: {repeats} prompt texts repeat (rows kept)")
        system_prompts.setdefault(bench, sorted(set(map(str, d0.get("system_prompts", []))))[:3])
        for i in range(n):
            q_row, c_row, r_row, f_row = _query_cells(owner, models, i, floored)
            queries.append(str(d0["user_prompts"][i]))
            tasks.append(bench)
            ids.append(f"{bench}/{split}/{i}")
            qual.append(q_row)
            cost.append(c_row)
            resp.append(r_row)
            for k in feats:
                feats[k].append(f_row[k])
    for m, k in sorted(floored.items()):
        report.notes.append(f"logprob_confidence of -inf stored as {LOGPROB_FLOOR} for {k} rows of model {m!r}")
    report.rows_kept = len(queries)
    report.log()
    assert models is not None
    return RoutingDataset(
        queries=queries,
        models=models,
        quality=np.array(qual, dtype=np.float64),
        cost=np.array(cost, dtype=np.float64),
        responses=np.array(resp, dtype=object),
        features={k: np.array(v, dtype=np.float64) for k, v in feats.items()},
        tasks=tasks,
        query_ids=ids,
        metadata=_metadata(pairs, system_prompts, report),
        name=name,
    )
