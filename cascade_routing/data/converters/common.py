"""Helpers shared by the converters: the conversion report and strict cell parsers."""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cascade_routing.data.errors import DatasetError

logger = logging.getLogger("cascade_routing.data")


@dataclass
class DroppedRow:
    """One source row a converter did not keep, and why."""

    file: str
    row: int  # 0-based data row in the file (header excluded)
    query_id: str
    reason: str  # "incomplete" | "duplicate" | "conflicting-duplicate"
    detail: str = ""


@dataclass
class ConversionReport:
    """What a converter read, kept and dropped. Stored as ``metadata["conversion_report"]``.

    Converters never fill missing outcomes and never drop a row silently: every dropped row is
    listed here (file, row, id, reason) and summarised in one logged warning.
    """

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: list[DroppedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, dict[str, int]] = field(default_factory=dict)

    def drop(self, file: str, row: int, query_id: str, reason: str, detail: str = "") -> None:
        self.dropped.append(DroppedRow(file, row, query_id, reason, detail))

    def count(self, reason: str) -> int:
        return sum(d.reason == reason for d in self.dropped)

    def summary(self) -> str:
        reasons = sorted({d.reason for d in self.dropped})
        parts = ", ".join(f"{self.count(r)} {r}" for r in reasons) or "none"
        return f"{self.source}: read {self.rows_read} rows, kept {self.rows_kept}, dropped: {parts}"

    def log(self) -> None:
        """Log a warning when anything was dropped (ids listed), else an info line."""
        if not self.dropped:
            logger.info(self.summary())
            return
        ids = ", ".join(f"{d.file}[{d.row}]={d.query_id} ({d.reason})" for d in self.dropped[:20])
        more = f" and {len(self.dropped) - 20} more" if len(self.dropped) > 20 else ""
        logger.warning("%s. Dropped rows: %s%s. Full list in metadata['conversion_report'].",
                       self.summary(), ids, more)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


def parse_list_literal(text: str, where: str) -> list[str]:
    """Parse a Python list-of-strings literal such as ``"['A']"`` with ``ast.literal_eval`` only."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
        snippet = text[:60].replace("\n", "\\n")
        raise DatasetError(f"{where}: malformed list literal ({type(err).__name__}): {snippet!r}...") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"{where}: expected a list of strings, got {type(value).__name__}")
    return list(value)


def parse_number(text: Any, where: str, *, low: float | None = None, high: float | None = None,
                 booleans: bool = True) -> float | None:
    """A finite float from a cell; ``None`` for an empty cell; a clear error otherwise.

    ``booleans``: a boolean cell (``True``/``False``, or the text true/false in any case) reads 1/0;
    without it a boolean is an error (a boolean cost or feature is a mapping mistake). Text with an
    underscore (Python's ``float`` reads ``1_000`` as 1000) is not a number.
    """
    if text is None:
        return None
    if isinstance(text, str):
        text = text.strip()
        if text == "":
            return None
        if text.lower() in ("true", "false"):
            if not booleans:
                raise DatasetError(f"{where}: not a number: {text!r} (a boolean)")
            return 1.0 if text.lower() == "true" else 0.0
        if "_" in text:
            raise DatasetError(f"{where}: not a number: {text!r}")
    if isinstance(text, bool):
        if not booleans:
            raise DatasetError(f"{where}: not a number: {text!r} (a boolean)")
        return 1.0 if text else 0.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: not a number: {text!r}") from None
    except OverflowError:
        raise DatasetError(f"{where}: number too large for a float: {str(text)[:40]}...") from None
    if math.isnan(value):
        return None if isinstance(text, float) else _bad(where, value)
    if not math.isfinite(value):
        _bad(where, value)
    if low is not None and value < low:
        raise DatasetError(f"{where}: value {value!r} is below {low}")
    if high is not None and value > high:
        raise DatasetError(f"{where}: value {value!r} is above {high}")
    return value


def _bad(where: str, value: float) -> float:
    raise DatasetError(f"{where}: non-finite value {value!r}")
