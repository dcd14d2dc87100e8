"""Does the encoder see what distinguishes the queries? Two checks on a dataset's query texts.

- :func:`shared_prefixes` (text only, no tokenizer): groups of queries that start with the same long
  text, e.g. a few-shot prompt. Over the sorted distinct queries ``u``, with
  ``lcp_i = len(common prefix of u_i and u_{i+1})``, a group is a maximal run of neighbours with
  ``lcp_i >= min_chars``; its members all share exactly ``min_i lcp_i`` leading characters.
  Groups holding at least ``min_share`` of the distinct queries are reported.
- :func:`input_distinctness` (needs the encoder inputs, e.g. ``encoding.tokenize``): how many
  distinct encoder inputs (token-id sequences after truncation) the distinct queries became.

:func:`input_warnings` turns both into messages with the numbers; :func:`warn_inputs` also emits
them as :class:`InputCollapseWarning`. Both leave the data unchanged.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

#: Query truncation modes (implemented by ``cascade_routing.estimators.encoding.tokenize``; named
#: here so the data CLI can offer them without importing torch) and the default, measured best
#: in ``benchmarks/bench_truncation.py``.
TRUNCATIONS = ("right", "left", "head_tail")
DEFAULT_QUERY_TRUNCATION = "left"

MIN_PREFIX_CHARS = 500  # ~128 word-piece tokens of English: a shared opening this long fills the default window
MIN_PREFIX_SHARE = 0.05  # ... when it opens at least this share of the distinct queries
MIN_DISTINCT_RATIO = 0.9  # warn when fewer than this share of distinct queries stay distinct inputs


class InputCollapseWarning(UserWarning):
    """The encoder's inputs are much less distinct than the queries, or queries share a long prefix."""


@dataclass(frozen=True)
class PrefixGroup:
    """``count`` distinct queries that all start with the same ``length`` characters (``prefix``)."""

    count: int
    length: int
    prefix: str


@dataclass(frozen=True)
class Distinctness:
    """``queries`` distinct query texts became ``inputs`` distinct encoder inputs."""

    queries: int
    inputs: int

    @property
    def ratio(self) -> float:
        return self.inputs / max(self.queries, 1)


def shared_prefixes(
    queries: Sequence[str], min_chars: int = MIN_PREFIX_CHARS, min_share: float = MIN_PREFIX_SHARE
) -> list[PrefixGroup]:
    """Groups of distinct queries sharing a prefix of at least ``min_chars`` characters (module
    docstring), largest group first; only groups with ``count >= max(2, min_share · #distinct)``."""
    unique = sorted(set(map(str, queries)))
    if len(unique) < 2:
        return []
    lcp = [len(os.path.commonprefix([a, b])) for a, b in zip(unique, unique[1:])]
    min_count = max(2, int(min_share * len(unique) + 0.999999))
    groups: list[PrefixGroup] = []
    i = 0
    while i < len(lcp):
        if lcp[i] < min_chars:
            i += 1
            continue
        j = i
        while j + 1 < len(lcp) and lcp[j + 1] >= min_chars:
            j += 1
        length = min(lcp[i : j + 1])
        count = j - i + 2
        if count >= min_count:
            groups.append(PrefixGroup(count, length, unique[i][:length]))
        i = j + 1
    return sorted(groups, key=lambda g: (-g.count, -g.length))


def input_distinctness(queries: Sequence[str], inputs: Sequence[Sequence[int]]) -> Distinctness:
    """Distinct queries vs distinct encoder ``inputs`` (``inputs[i]`` encodes ``queries[i]``)."""
    if len(queries) != len(inputs):
        raise ValueError(f"{len(inputs)} encoder inputs for {len(queries)} queries")
    return Distinctness(len(set(map(str, queries))), len({tuple(x) for x in inputs}))


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat[:width] + ("…" if len(flat) > width else ""))


def prefix_messages(queries: Sequence[str], min_chars: int = MIN_PREFIX_CHARS,
                    min_share: float = MIN_PREFIX_SHARE, truncation: str | None = None) -> list[str]:
    """One message per :func:`shared_prefixes` group, with counts, share and prefix length; the advice
    fits ``truncation`` (the one in use, when known)."""
    total = len(set(map(str, queries)))
    advice = ("data.truncation: left keeps the end of a long prompt, so the encoder sees past it; map a column "
              "without it to drop it" if truncation == "left" else
              "an encoder that keeps the start of a long prompt sees mostly this shared text (use "
              "data.truncation: left, or map a column without it)")
    return [
        f"long common prefix: {g.count:,} of {total:,} distinct queries ({g.count / total:.0%}) start with the "
        f"same {g.length:,} characters ({_preview(g.prefix)}); {advice}"
        for g in shared_prefixes(queries, min_chars, min_share)
    ]


def collapse_message(d: Distinctness, max_length: int, truncation: str,
                     min_ratio: float = MIN_DISTINCT_RATIO) -> str | None:
    """A message when ``d.inputs < min_ratio · d.queries``, else ``None``."""
    if d.inputs >= min_ratio * d.queries:
        return None
    noun = "input" if d.inputs == 1 else "inputs"
    others = " or ".join(t for t in ("left", "head_tail") if t != truncation)
    return (
        f"{d.queries:,} distinct queries became {d.inputs:,} distinct encoder {noun} after {truncation} "
        f"truncation to {max_length} tokens: the estimator cannot tell the others apart (try "
        f"data.truncation: {others}, a larger data.max_length, or map the distinctive column as the query)"
    )


def input_warnings(
    queries: Sequence[str],
    inputs: Sequence[Sequence[int]] | None = None,
    max_length: int | None = None,
    truncation: str | None = None,
    *,
    prefixes: bool = True,
) -> list[str]:
    """Messages of both checks: input collapse (when ``inputs`` are given) and shared prefixes."""
    out: list[str] = []
    if inputs is not None:
        msg = collapse_message(input_distinctness(queries, inputs), int(max_length or 0), str(truncation))
        if msg:
            out.append(msg)
    if prefixes:
        out.extend(prefix_messages(queries, truncation=truncation))
    return out


def warn_inputs(messages: Sequence[str], where: str) -> None:
    """Emit each message as an :class:`InputCollapseWarning` prefixed with ``where`` (e.g. the dataset)."""
    for msg in messages:
        warnings.warn(f"{where}: {msg}", InputCollapseWarning, stacklevel=2)
