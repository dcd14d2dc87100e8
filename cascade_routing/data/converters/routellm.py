"""RouteLLM evaluation outcomes (MMLU, GSM8K, MT-Bench; 2 models) -> :class:`RoutingDataset`.

Source: github.com/lm-sys/RouteLLM ``routellm/evals``. Models: ``mistralai/Mixtral-8x7B-Instruct-v0.1``
(short name ``mixtral-8x7b-instruct-v0.1``) and ``gpt-4-1106-preview``; full names are kept in
``metadata["original_model_names"]``.

Costs. The files have none, so ``cost = (tokens_in * price_in + tokens_out * price_out) / 1e6`` with
prices in USD per 1M tokens from the shipped ``cascade_routing/configs/prices.yaml``
(:data:`DEFAULT_PRICES`; pass ``prices=`` to override) and token counts *estimated from text length*:
``tokens(text) = ceil(len(text) / 4)`` (:func:`estimate_tokens`). ``metadata["cost_source"]`` says
so. Token estimates are stored as features ``tokens_in``/``tokens_out``.

- **MMLU** (``evals/mmlu/responses/mmlu_<subject>.csv``, 57 files, 14,042 rows): ``prompt`` and one
  True/False column per model. Quality 0/1; task = subject; no responses; ``tokens_in`` = prompt,
  ``tokens_out`` = 1 (the answer is one letter).
- **GSM8K** (``evals/gsm8k/gsm8k_responses.csv``, 1,319 rows): True/False columns and
  ``<model>_response`` texts. Quality 0/1; ``tokens_in`` = question, ``tokens_out`` = response.
- **MT-Bench** (``evals/mt_bench/judgements.jsonl`` + ``question.jsonl``): one query per
  (question, turn) = 160 queries; quality = ``(score - 1) / 9`` (GPT-4 judge score 1-10 mapped
  linearly onto [0, 1]; 10 -> 1, 1 -> 0); the response is the model's answer for that turn,
  extracted from the judge prompt. Query text: turn 1 = the first user message; turn 2 = the first
  user message, then ``"\\n\\n[follow-up] "`` and the second message (the model also saw its own
  first answer). ``tokens_in`` counts the whole conversation so far (for turn 2: question 1, the
  model's own answer 1, question 2), ``tokens_out`` the answer. Task = MT-Bench category.

Prompts that RouteLLM lists in ``contaminated_prompts.jsonl`` (overlap with its router training
data) are kept and their ids listed in ``metadata["contaminated_query_ids"]``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.converters.common import ConversionReport, parse_number
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError

CHARS_PER_TOKEN = 4
COST_SOURCE = (
    "prices (USD per 1M tokens, cascade_routing/configs/prices.yaml) x token counts estimated from text length: "
    "tokens = ceil(characters / 4)"
)

MMLU_DIR = "routellm/evals/mmlu/responses"
GSM8K_FILE = "routellm/evals/gsm8k/gsm8k_responses.csv"
MT_JUDGEMENTS = "routellm/evals/mt_bench/judgements.jsonl"
MT_QUESTIONS = "routellm/evals/mt_bench/question.jsonl"
CONTAMINATED = {
    "mmlu": "routellm/evals/mmlu/contaminated_prompts.jsonl",
    "gsm8k": "routellm/evals/gsm8k/contaminated_prompts.jsonl",
    "mt-bench": "routellm/evals/mt_bench/contaminated_prompts.jsonl",
}


def estimate_tokens(text: str | None) -> int:
    """``ceil(len(text) / 4)``; 0 for ``None``."""
    return 0 if not text else math.ceil(len(text) / CHARS_PER_TOKEN)


def prices_path() -> Path:
    """The price table shipped in the package (``cascade_routing/configs/prices.yaml``)."""
    from cascade_routing.configs import CONFIG_DIR

    return CONFIG_DIR / "prices.yaml"


def load_prices(prices: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Prices as ``{full model name: {"name", "input", "output"}}``, validated.

    ``None`` reads the shipped table (:func:`prices_path`).
    """
    source = "prices"
    if prices is None:
        prices = prices_path()
    if isinstance(prices, (str, os.PathLike)):
        import yaml

        source = str(prices)
        try:
            loaded = yaml.safe_load(Path(prices).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise DatasetError(f"{prices}: cannot read prices: {err}") from None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("models"), dict):
            raise DatasetError(f"{prices}: expected a mapping with a 'models' mapping")
        prices = loaded["models"]
    out: dict[str, dict[str, Any]] = {}
    for full, entry in dict(prices).items():
        if not isinstance(entry, Mapping):
            raise DatasetError(f"{source}: price entry for {full!r} is not a mapping")
        item = {"name": str(entry.get("name", full))}
        for key in ("input", "output"):
            value = entry.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DatasetError(f"{source}: model {full!r} field {key!r} must be a number >= 0, got {value!r}")
            item[key] = float(value)
        out[str(full)] = item
    return out


#: The shipped prices (USD per 1M tokens): full name -> {"name": short name, "input", "output"}.
DEFAULT_PRICES: dict[str, dict[str, Any]] = load_prices()


def _price(prices: dict[str, dict[str, Any]], model: str, where: str) -> dict[str, Any]:
    if model not in prices:
        raise DatasetError(f"{where}: no price for model {model!r}; add it to the prices (known: {sorted(prices)})")
    return prices[model]


def _cost(price: dict[str, Any], tin: float, tout: float) -> float:
    return (tin * price["input"] + tout * price["output"]) / 1e6


def _contaminated(root: Path, key: str) -> set[str]:
    path = root / CONTAMINATED[key]
    if not path.is_file():
        return set()
    prompts = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompts.add(str(json.loads(line).get("eval_prompt", "")).strip())
    return prompts


def _read_outcome_csv(path: Path, with_responses: bool) -> tuple[list[str], list[dict[str, str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if "prompt" not in header:
        raise DatasetError(f"{path}: missing column 'prompt'")
    models = [c for c in header if c != "prompt" and not c.endswith("_response")]
    if not models:
        raise DatasetError(f"{path}: no model outcome columns")
    for m in models if with_responses else []:
        if f"{m}_response" not in header:
            raise DatasetError(f"{path}: missing column {m + '_response'!r} for model {m!r}")
    for i, row in enumerate(rows):
        if None in row or any(v is None for v in row.values()):
            raise DatasetError(f"{path}: data row {i} has a different number of cells than the header")
    return models, rows


_TABLE_COLUMNS = ("queries", "quality", "cost", "responses", "tokens_in", "tokens_out", "tasks", "ids")


def _new_table() -> dict[str, list[Any]]:
    """Column lists that :func:`_add_query` fills row by row and :func:`_finish` turns into a dataset."""
    return {k: [] for k in _TABLE_COLUMNS}


def _add_query(data: dict[str, list[Any]], **row: Any) -> None:
    """Append one query (a value for every column of :data:`_TABLE_COLUMNS`)."""
    for key in _TABLE_COLUMNS:
        data[key].append(row[key])


def _finish(
    name: str, models_full: list[str], prices: dict[str, dict[str, Any]], data: dict[str, Any],
    report: ConversionReport, extra_meta: dict[str, Any],
) -> RoutingDataset:
    report.rows_kept = len(data["queries"])
    report.log()
    short = [prices[m]["name"] for m in models_full]
    return RoutingDataset(
        queries=data["queries"],
        models=short,
        quality=np.array(data["quality"], dtype=np.float64),
        cost=np.array(data["cost"], dtype=np.float64),
        responses=np.array(data["responses"], dtype=object) if data.get("responses") else None,
        features={"tokens_in": np.array(data["tokens_in"], float), "tokens_out": np.array(data["tokens_out"], float)},
        tasks=data["tasks"],
        query_ids=data["ids"],
        metadata={
            "source": "routellm",
            "original_model_names": dict(zip(short, models_full)),
            "prices_usd_per_1m_tokens": {prices[m]["name"]: {"input": prices[m]["input"], "output": prices[m]["output"]} for m in models_full},
            "cost_source": COST_SOURCE,
            "conversion_report": report.to_dict(),
            **extra_meta,
        },
        name=name,
    )


def _outcome_tables(
    root: Path, files: Sequence[tuple[Path, str, str]], prices: dict[str, dict[str, Any]],
    name: str, contaminated_key: str, with_responses: bool,
) -> RoutingDataset:
    report = ConversionReport(source=name)
    bad_prompts = _contaminated(root, contaminated_key)
    data = _new_table()
    contaminated_ids: list[str] = []
    models_full: list[str] | None = None
    for path, task, id_prefix in files:
        models, rows = _read_outcome_csv(path, with_responses)
        if models_full is None:
            models_full = models
            for m in models:
                _price(prices, m, str(path))
        elif models != models_full:
            raise DatasetError(f"{path}: model columns {models} differ from {models_full}")
        for i, row in enumerate(rows):
            where = f"{path.name} data row {i}"
            prompt = row["prompt"]
            q, c, r, tin, tout = [], [], [], [], []
            for m in models:
                value = parse_number(row[m], f"{where}, model {m!r}, column {m!r}", low=0.0, high=1.0)
                if value is None:
                    raise DatasetError(f"{where}, model {m!r}, column {m!r}: empty outcome cell")
                response = row[f"{m}_response"] if with_responses else None
                t_in = estimate_tokens(prompt)
                t_out = estimate_tokens(response) if with_responses else 1
                q.append(value)
                c.append(_cost(prices[m], t_in, t_out))
                r.append(response)
                tin.append(t_in)
                tout.append(t_out)
            qid = f"{id_prefix}/{i}"
            _add_query(data, queries=prompt, quality=q, cost=c, responses=r, tokens_in=tin, tokens_out=tout,
                       tasks=task, ids=qid)
            if prompt.strip() in bad_prompts:
                contaminated_ids.append(qid)
        report.files[path.name] = {"read": len(rows), "kept": len(rows)}
        report.rows_read += len(rows)
    if not with_responses:
        data["responses"] = []
    assert models_full is not None
    return _finish(name, models_full, prices, data, report, {"contaminated_query_ids": contaminated_ids})


def convert_routellm_mmlu(folder: str | os.PathLike[str], *, prices: Any = None, name: str = "routellm-mmlu") -> RoutingDataset:
    """The 57 MMLU subject files under ``<folder>/routellm/evals/mmlu/responses``."""
    root = Path(folder)
    files = sorted((root / MMLU_DIR).glob("mmlu_*.csv"))
    if not files:
        raise DatasetError(f"{root / MMLU_DIR}: no mmlu_<subject>.csv files")
    spec = [(p, p.stem[len("mmlu_"):], f"mmlu/{p.stem[len('mmlu_'):]}") for p in files]
    ds = _outcome_tables(root, spec, load_prices(prices), name, "mmlu", with_responses=False)
    ds.metadata["quality"] = "True/False correctness of the 0-shot MMLU answer"
    ds.metadata["tokens"] = "tokens_in = ceil(len(prompt)/4), tokens_out = 1 (one answer letter)"
    return ds


def convert_routellm_gsm8k(folder: str | os.PathLike[str], *, prices: Any = None, name: str = "routellm-gsm8k") -> RoutingDataset:
    """``<folder>/routellm/evals/gsm8k/gsm8k_responses.csv`` (1,319 rows with responses)."""
    root = Path(folder)
    ds = _outcome_tables(root, [(root / GSM8K_FILE, "gsm8k", "gsm8k")], load_prices(prices), name, "gsm8k", with_responses=True)
    ds.metadata["quality"] = "True/False correctness of the final GSM8K answer"
    ds.metadata["tokens"] = "tokens_in = ceil(len(question)/4), tokens_out = ceil(len(response)/4)"
    return ds


_ANSWER_1 = re.compile(r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.S)
_CONVERSATION = re.compile(
    r"<\|The Start of Assistant A's Conversation with User\|>\n(.*?)<\|The End of Assistant A's Conversation with User\|>", re.S
)


def _mt_answers(judgement: dict[str, Any], where: str) -> tuple[str | None, str]:
    """(the model's turn-1 answer if in this prompt, the judged answer) from a judge prompt."""
    text = str(judgement.get("user_prompt", ""))
    if judgement.get("turn") == 1:
        match = _ANSWER_1.search(text)
        if not match:
            raise DatasetError(f"{where}: judge prompt lacks \"[The Start of Assistant's Answer]\" markers")
        return None, match.group(1).strip()
    match = _CONVERSATION.search(text)
    parts = match.group(1).split("### Assistant A:\n") if match else []
    if len(parts) != 3:
        raise DatasetError(f"{where}: cannot find the two '### Assistant A:' turns in the judge prompt")
    first = parts[1].split("### User:\n")[0].strip()
    return first, parts[2].strip()


def _mt_questions(qpath: Path) -> dict[int, dict[str, Any]]:
    """``question_id -> question record`` from the MT-Bench questions JSONL (malformed line: error)."""
    questions: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(qpath.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                q = json.loads(line)
                questions[int(q["question_id"])] = q
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{qpath.name} line {i + 1}: malformed question record: {err}") from None
    return questions


def _mt_judgements(jpath: Path, questions: dict[int, dict[str, Any]], prices: dict[str, Any], report: ConversionReport
                   ) -> tuple[dict[tuple[int, int], dict[str, dict[str, Any]]], list[str]]:
    """``(question_id, turn) -> model -> {score, answer, first}`` from the judgements JSONL, and the
    models in order of appearance (each checked to have a price). A score outside [1, 10], an unknown
    question or a second judgement of the same (question, turn, model) is an error naming the line."""
    cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    models_full: list[str] = []
    for i, line in enumerate(jpath.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{jpath.name} line {i + 1}"
        try:
            j = json.loads(line)
            key = (int(j["question_id"]), int(j["turn"]))
            model = str(j["model"])
            score = j["score"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{where}: malformed judgement record: {err}") from None
        report.rows_read += 1
        if not isinstance(score, (int, float)) or not 1 <= score <= 10:
            raise DatasetError(f"{where}, model {model!r}, field 'score': expected a number in [1, 10], got {score!r}")
        if key[0] not in questions:
            raise DatasetError(f"{where}: question_id {key[0]} not in {Path(MT_QUESTIONS).name}")
        if model not in models_full:
            _price(prices, model, where)
            models_full.append(model)
        slot = cells.setdefault(key, {})
        if model in slot:
            raise DatasetError(f"{where}: second judgement for question {key[0]} turn {key[1]} model {model!r}")
        first, answer = _mt_answers(j, where)
        slot[model] = {"score": float(score), "answer": answer, "first": first}
    return cells, models_full


def convert_routellm_mt_bench(folder: str | os.PathLike[str], *, prices: Any = None, name: str = "routellm-mt-bench") -> RoutingDataset:
    """MT-Bench judgements -> one query per (question, turn); quality = (score - 1) / 9."""
    root = Path(folder)
    prices_t = load_prices(prices)
    qpath, jpath = root / MT_QUESTIONS, root / MT_JUDGEMENTS
    for path in (qpath, jpath):
        if not path.is_file():
            raise DatasetError(f"{path}: file not found")
    questions = _mt_questions(qpath)
    report = ConversionReport(source=name)
    cells, models_full = _mt_judgements(jpath, questions, prices_t, report)
    models_full = sorted(models_full)
    data = _new_table()
    for (qid, turn) in sorted(cells):
        slot = cells[(qid, turn)]
        missing = [m for m in models_full if m not in slot]
        if missing:
            raise DatasetError(f"{jpath.name}: question {qid} turn {turn} has no judgement for {missing}")
        turns = [str(t) for t in questions[qid]["turns"]]
        text = turns[0] if turn == 1 else f"{turns[0]}\n\n[follow-up] {turns[1]}"
        q, c, r, tin, tout = [], [], [], [], []
        for m in models_full:
            cell = slot[m]
            context = turns[0] if turn == 1 else turns[0] + (cell["first"] or "") + turns[1]
            t_in, t_out = estimate_tokens(context), estimate_tokens(cell["answer"])
            q.append((cell["score"] - 1.0) / 9.0)
            c.append(_cost(prices_t[m], t_in, t_out))
            r.append(cell["answer"])
            tin.append(t_in)
            tout.append(t_out)
        _add_query(data, queries=text, quality=q, cost=c, responses=r, tokens_in=tin, tokens_out=tout,
                   tasks=str(questions[qid].get("category", "mt-bench")), ids=f"mt-bench/{qid}/turn{turn}")
    bad = _contaminated(root, "mt-bench")
    contaminated_ids = [qid for qid, text in zip(data["ids"], data["queries"]) if text.split("\n\n[follow-up] ")[0].strip() in bad]
    ds = _finish(name, models_full, prices_t, data, report, {"contaminated_query_ids": contaminated_ids})
    ds.metadata["quality"] = "GPT-4 judge score s in [1, 10] per turn, mapped to (s - 1) / 9"
    ds.metadata["tokens"] = "tokens_in = ceil(len(conversation so far)/4), tokens_out = ceil(len(answer)/4)"
    return ds
