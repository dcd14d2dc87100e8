"""Counter stores for the spend accounts: in memory, an embedded SQLite file, or Redis.

A store holds, per account name, a flat map ``field -> float`` that only ever grows by
increments: ``add(account, {field: amount, ...})`` applies all increments of one call atomically
(one SQLite transaction / one Redis MULTI), ``read(account)`` returns the map, ``accounts()`` the
names. Several server processes pointed at the same SQLite file or Redis share the accounts, and
the totals survive restarts (except :class:`MemoryStore`).

``open_store(url)``: ``memory://``, ``sqlite:///path/to/file.sqlite`` (or a bare path),
``redis://host:port/db`` (needs the ``redis`` package; Redis keys ``{prefix}:{account}`` are
hashes updated with ``HINCRBYFLOAT``).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Mapping, Protocol

DEFAULT_STORE = "sqlite:///cascade-routing-spend.sqlite"
"""What ``serve`` uses without ``--store``: a SQLite file in the working directory."""


class StoreError(RuntimeError):
    """The spend store cannot be opened or used (bad URL, unreachable Redis, unwritable file)."""


class CounterStore(Protocol):
    def add(self, account: str, increments: Mapping[str, float]) -> None: ...

    def read(self, account: str) -> dict[str, float]: ...

    def read_field(self, account: str, field: str) -> float: ...

    def accounts(self) -> list[str]: ...

    def close(self) -> None: ...


class MemoryStore:
    """Counters in this process only (lost on restart; for tests and ``--store memory://``)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def add(self, account: str, increments: Mapping[str, float]) -> None:
        with self._lock:
            row = self._data.setdefault(account, {})
            for key, amount in increments.items():
                row[key] = row.get(key, 0.0) + float(amount)

    def read(self, account: str) -> dict[str, float]:
        with self._lock:
            return dict(self._data.get(account, {}))

    def read_field(self, account: str, field: str) -> float:
        """One counter of ``account`` (0.0 if never added to)."""
        with self._lock:
            return self._data.get(account, {}).get(field, 0.0)

    def accounts(self) -> list[str]:
        with self._lock:
            return sorted(self._data)

    def close(self) -> None:
        pass


class SQLiteStore:
    """Counters in one SQLite file (WAL mode, so several processes on one host can share it)."""

    def __init__(self, path: "str | Path") -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS counters (account TEXT NOT NULL, field TEXT NOT NULL, "
                               "value REAL NOT NULL, PRIMARY KEY (account, field))")
        except (sqlite3.Error, OSError) as err:
            raise StoreError(f"cannot open the SQLite spend store {self.path!r}: {err}") from None
        self._lock = threading.Lock()

    def add(self, account: str, increments: Mapping[str, float]) -> None:
        rows = [(account, key, float(amount)) for key, amount in increments.items()]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO counters (account, field, value) VALUES (?, ?, ?) "
                    "ON CONFLICT(account, field) DO UPDATE SET value = value + excluded.value", rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def read(self, account: str) -> dict[str, float]:
        with self._lock:
            cur = self._conn.execute("SELECT field, value FROM counters WHERE account = ?", (account,))
            return {k: float(v) for k, v in cur.fetchall()}

    def read_field(self, account: str, field: str) -> float:
        """One counter of ``account`` (0.0 if never added to): one row, not the account's every field."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM counters WHERE account = ? AND field = ?",
                                     (account, field)).fetchone()
            return 0.0 if row is None else float(row[0])

    def accounts(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT DISTINCT account FROM counters ORDER BY account")]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class RedisStore:
    """Counters in Redis hashes ``{prefix}:{account}`` (shared by every replica using the same Redis)."""

    def __init__(self, url: str, prefix: str = "cascade-routing:spend") -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - depends on the environment
            raise StoreError("--store redis://... needs the 'redis' package: pip install redis") from None
        self.url = url
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            self._client.ping()
        except redis.RedisError as err:
            raise StoreError(f"cannot reach the Redis spend store at {url}: {err}") from None

    def _key(self, account: str) -> str:
        return f"{self.prefix}:{account}"

    def add(self, account: str, increments: Mapping[str, float]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for key, amount in increments.items():
            pipe.hincrbyfloat(self._key(account), key, float(amount))
        pipe.sadd(f"{self.prefix}:accounts", account)
        pipe.execute()

    def read(self, account: str) -> dict[str, float]:
        raw = self._client.hgetall(self._key(account))
        return {k.decode(): float(v) for k, v in raw.items()}

    def read_field(self, account: str, field: str) -> float:
        """One counter of ``account`` (0.0 if never added to): HGET, not the whole hash."""
        value = self._client.hget(self._key(account), field)
        return 0.0 if value is None else float(value)

    def accounts(self) -> list[str]:
        return sorted(a.decode() for a in self._client.smembers(f"{self.prefix}:accounts"))

    def close(self) -> None:
        self._client.close()


def open_store(url: str | None) -> CounterStore:
    """A store from a URL (see module docstring); None or ``memory://`` -> :class:`MemoryStore`."""
    if url is None or url == "memory://":
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):] or ":memory:")
    if "://" in url:
        raise StoreError(f"unknown spend store URL {url!r}; use sqlite:///PATH, redis://HOST:PORT/DB or memory://")
    return SQLiteStore(url)
