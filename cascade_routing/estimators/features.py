"""Hand-made features of run answers, shared by the learned network and the paper-style baseline.

Every function here takes the ``ran`` mask and reads a (query, model) cell only where
``ran[i, m]`` is true; cells of unrun models come out as exactly 0. This is the first line of the
no-leakage guarantee (the network masks again before any computation).

Per-answer features (``ANSWER_FEATURES``, in this order, float [B, M, F]):

- ``log_length``: ``log1p(len(response chars)) / 8`` (0 when the response is missing);
- ``confidence``: the dataset's ``logprob_confidence`` feature as given (0 where absent); the network
  also reads its log surprise (:func:`encode_confidence`, the network's ``confidence_encoding``);
- ``has_confidence``: 1 where a log-prob confidence exists for the cell, else 0 (no such feature,
  or NaN in its cell: an answer served without one);
- ``agreement``: mean token-set Jaccard similarity of this answer with the *other run* answers of
  the same query, ``(1/|R\\{m}|) Σ_{k∈R\\{m}} |T_m ∩ T_k| / |T_m ∪ T_k|`` (0 when no other model ran).

:func:`compose_features` appends the M pairwise similarities with each run model (0 where unrun).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np
import torch

from cascade_routing.estimators.agreement import masked_agreement

ANSWER_FEATURES: tuple[str, ...] = ("log_length", "confidence", "has_confidence", "agreement")
CONFIDENCE_FEATURE = "logprob_confidence"
CONFIDENCE_ENCODINGS: tuple[str, ...] = ("logprob", "logprob_and_surprise")
SURPRISE_FLOOR = 1e-9  # −log p below this counts as certain: the log surprise's top, 1.0
_TOKEN = re.compile(r"[a-z0-9]+")


def answer_tokens(text: object) -> frozenset[str]:
    """Lower-cased alphanumeric tokens of an answer (empty for ``None``)."""
    if text is None:
        return frozenset()
    return frozenset(_TOKEN.findall(str(text).lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """``|a ∩ b| / |a ∪ b|``; 1.0 for two empty sets."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class AgreementCache:
    """Memoised pairwise answer similarity, computed only for pairs where both models have run.

    Keys are (row, model_a, model_b); a cell's response never changes once the model has run, so
    memoising is safe for a live server that fills responses in place.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[int, int], frozenset[str]] = {}
        self._pairs: dict[tuple[int, int, int], float] = {}

    def tokens(self, responses: np.ndarray, row: int, model: int) -> frozenset[str]:
        key = (row, model)
        if key not in self._tokens:
            self._tokens[key] = answer_tokens(responses[row, model])
        return self._tokens[key]

    def pair(self, responses: np.ndarray, row: int, a: int, b: int) -> float:
        key = (row, min(a, b), max(a, b))
        if key not in self._pairs:
            self._pairs[key] = jaccard(self.tokens(responses, row, a), self.tokens(responses, row, b))
        return self._pairs[key]


def static_features(
    rows: np.ndarray,
    ran: np.ndarray | None,
    responses: np.ndarray | None,
    features: Mapping[str, np.ndarray] | None,
) -> np.ndarray:
    """Float32 [B, M, 3]: (log_length, confidence, has_confidence) of each cell, 0 where not ran.

    ``ran=None`` means every cell (training time, where all answers are known).
    """
    rows = np.asarray(rows, dtype=np.int64)
    conf = None if features is None else features.get(CONFIDENCE_FEATURE)
    if ran is None:
        source = responses if responses is not None else conf
        if source is None:
            raise ValueError("static_features: ran=None needs responses or a confidence feature")
        ran = np.ones((rows.size, source.shape[1]), dtype=bool)
    ran = np.asarray(ran, dtype=bool)
    out = np.zeros((rows.size, ran.shape[1], 3), dtype=np.float32)
    bi, mi = np.nonzero(ran)
    if bi.size == 0:
        return out
    qi = rows[bi]
    if responses is not None:
        texts = responses[qi, mi]
        out[bi, mi, 0] = [np.log1p(len(str(t))) / 8.0 if t is not None else 0.0 for t in texts]
    if conf is not None:  # NaN: this answer came without a confidence (has_confidence 0, confidence 0)
        values = np.asarray(conf[qi, mi], dtype=np.float64)
        present = np.isfinite(values)
        out[bi, mi, 1] = np.where(present, values, 0.0)
        out[bi, mi, 2] = present
    return out


def encode_confidence(answer_feat: torch.Tensor, encoding: str) -> torch.Tensor:
    """The network's view of the answer features ``answer_feat`` [..., K] (``ANSWER_FEATURES`` first).

    - ``logprob``: unchanged; the confidence column is the log-probability ℓ ≤ 0 itself.
    - ``logprob_and_surprise``: the same K columns and one more, the log surprise
      ``has_confidence · log10(max(−ℓ, 0) + 1e-9) / log10(1e-9)`` [..., K + 1] (÷ −9, so the floor
      maps to 1): 1 for ℓ = 0, about 0.56 for ℓ = −1e-5, 0.22 for −0.01, 0 for −1, −0.16 for −30,
      and 0 where the cell has no confidence.

    Why both: a strong model's answer log-probabilities lie between about −1e-7 and −1e-2
    (rational-llm-cascades: gpt-4o's median −7.5e-6), where ℓ is 0 to a network whose inputs span
    [−30, 0], yet their order predicts correctness (AUROC 0.84 for gpt-4o); the log of the surprise −ℓ
    spreads those orders of magnitude evenly. A weak model's ℓ varies between about −10 and −0.1, where
    ℓ itself separates better than its log.
    """
    if encoding not in CONFIDENCE_ENCODINGS:
        raise ValueError(f"confidence encoding must be one of {CONFIDENCE_ENCODINGS}, got {encoding!r}")
    if encoding == "logprob":
        return answer_feat
    col, has = ANSWER_FEATURES.index("confidence"), ANSWER_FEATURES.index("has_confidence")
    surprise = (-answer_feat[..., col]).clamp_min(0.0)
    encoded = answer_feat[..., has] * (torch.log10(surprise + SURPRISE_FLOOR) / math.log10(SURPRISE_FLOOR))
    return torch.cat([answer_feat, encoded.unsqueeze(-1)], dim=-1)


def encoded_width(encoding: str) -> int:
    """Columns :func:`encode_confidence` adds under ``encoding``."""
    return 0 if encoding == "logprob" else 1


def pair_similarity(
    rows: np.ndarray,
    ran: np.ndarray | None,
    responses: np.ndarray | None,
    cache: AgreementCache | None = None,
    num_models: int | None = None,
) -> np.ndarray:
    """Float32 [B, M, M]: Jaccard similarity of the answers of models a and b, only where both ran.

    The diagonal is 0. ``ran=None`` means every cell.
    """
    rows = np.asarray(rows, dtype=np.int64)
    m = responses.shape[1] if responses is not None else int(num_models or 0)
    if ran is None:
        ran = np.ones((rows.size, m), dtype=bool)
    ran = np.asarray(ran, dtype=bool)
    out = np.zeros((rows.size, ran.shape[1], ran.shape[1]), dtype=np.float32)
    if responses is None:
        return out
    cache = cache if cache is not None else AgreementCache()
    for b, i in enumerate(rows):
        run_models = np.flatnonzero(ran[b])
        for x in range(run_models.size):
            for y in range(x + 1, run_models.size):
                a, c = int(run_models[x]), int(run_models[y])
                out[b, a, c] = out[b, c, a] = cache.pair(responses, int(i), a, c)
    return out


def compose_features(static: torch.Tensor, pair_sim: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
    """[B, M, 4 + M] answer features under mask ``ran``: the static three, the agreement, and the
    masked similarity row ``(ran_m ran_k S_mk)_{k}`` (agreement with each other run model).

    ``agreement_m = Σ_{k≠m} ran_k · S_mk / max(1, Σ_{k≠m} ran_k)`` for run m, 0 otherwise. Cells and
    pairs of unrun models are zeroed here, whatever the inputs hold.
    """
    ran = ran.bool()
    static = torch.where(ran.unsqueeze(-1), static, torch.zeros((), dtype=static.dtype))
    sim, agree = masked_agreement(pair_sim, ran, static.dtype)
    return torch.cat([static, agree.unsqueeze(-1), sim], dim=-1)


def answer_features(
    rows: np.ndarray,
    ran: np.ndarray,
    responses: np.ndarray | None,
    features: Mapping[str, np.ndarray] | None,
    cache: AgreementCache | None = None,
) -> np.ndarray:
    """Float32 [B, M, len(ANSWER_FEATURES) + M] for table rows ``rows`` under mask ``ran`` [B, M].

    Reads ``responses[rows[b], m]`` and ``features[k][rows[b], m]`` only where ``ran[b, m]``.
    """
    ran = np.asarray(ran, dtype=bool)
    static = static_features(rows, ran, responses, features)
    pair = pair_similarity(rows, ran, responses, cache, num_models=ran.shape[1])
    return compose_features(torch.from_numpy(static), torch.from_numpy(pair), torch.from_numpy(ran)).numpy()


class UnseenTaskWarning(UserWarning):
    """Queries without a task, or with one the estimator was not trained on, read an all-zero task input."""


def unseen_task_message(tasks: list | None, vocabulary: list[str]) -> str | None:
    """Why :func:`task_onehot` will give some rows an all-zero task input, or None when every row has a
    task of ``vocabulary`` (or the estimator reads no task)."""
    if not vocabulary:
        return None
    if tasks is None:
        return (f"the estimator reads each query's task (one of {vocabulary}) and got none: every query's task "
                "input is all zero, which it was never trained on (pass the tasks: tasks=[...] for a batch of queries, "
                "task=... for one query)")
    known = set(vocabulary)
    unseen = sorted({str(t) for t in tasks if t is None or str(t) not in known})
    if not unseen:
        return None
    # no counts in the text: Python shows a warning once per distinct message, and a server binds
    # batch after batch
    return (f"queries with no task or one the estimator was not trained on ({unseen[:5]}"
            f"{' ...' if len(unseen) > 5 else ''}; it knows {vocabulary}) read an all-zero task input")


def task_onehot(tasks: list[str] | None, vocabulary: list[str], n: int) -> np.ndarray:
    """Float32 [n, len(vocabulary)] one-hot of each query's task (all-zero for an unseen task)."""
    out = np.zeros((n, len(vocabulary)), dtype=np.float32)
    if tasks is None or not vocabulary:
        return out
    index = {t: j for j, t in enumerate(vocabulary)}
    for i, t in enumerate(tasks):
        j = index.get(str(t))
        if j is not None:
            out[i, j] = 1.0
    return out


TEXT_STATISTICS: tuple[str, ...] = ("chars", "words", "lines", "digits")
_DIGIT = re.compile(r"\d")


def text_statistics(queries: list[str]) -> np.ndarray:
    """Float32 [n, 4] query statistics, each ``log1p(count)`` scaled to roughly [0, 1]:
    characters / 8, whitespace-separated words / 6, newlines / 4, digits / 4.

    Cheap difficulty cues (long, multi-line, number-heavy questions are harder for every model).
    """
    out = np.zeros((len(queries), len(TEXT_STATISTICS)), dtype=np.float32)
    for i, q in enumerate(queries):
        q = str(q)
        out[i] = (
            np.log1p(len(q)) / 8.0,
            np.log1p(len(q.split())) / 6.0,
            np.log1p(q.count("\n")) / 4.0,
            np.log1p(len(_DIGIT.findall(q))) / 4.0,
        )
    return out


def length_features(queries: list[str]) -> np.ndarray:
    """Float32 [n] ``log1p(len(query chars))`` (used by the cost estimator for input tokens)."""
    return np.asarray([np.log1p(len(q)) for q in queries], dtype=np.float32)
