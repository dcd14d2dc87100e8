"""API keys for the server: bearer tokens, each with its own budget cap and spend account.

Keys document (YAML or JSON; a file given to ``serve --api-keys``, or the text of the environment
variable ``CASCADE_ROUTING_API_KEYS``)::

    keys:
      - name: team-a            # the account name in the stats (unique)
        key: sk-team-a-...      # the bearer token; or key_env: NAME_OF_ENV_VAR holding it
        budget: 0.0002          # optional: mean USD per query this key may route at (<= the server's)
        max_spend: 5.0          # optional: total USD after which the key's requests get 429
        admin: false            # optional: true = /v1/routing/stats shows every key's account

A request's effective budget is ``min(server budget, key budget, routing.budget)``: the client can
only lower it. Tokens are compared by their SHA-256 digest (no token is kept in memory in clear
beyond loading; a timing difference in the lookup can only reveal digests, not tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "CASCADE_ROUTING_API_KEYS"


class KeysConfigError(ValueError):
    """The keys document is malformed; the message names the source, entry and field."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str
    budget: float | None = None
    max_spend: float | None = None
    admin: bool = False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _limit(entry: dict[str, Any], field: str, where: str) -> float | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise KeysConfigError(f"{where}: '{field}' must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_keys(data: Any, source: str) -> dict[str, ApiKey]:
    """Validate a keys document; returns digest -> :class:`ApiKey`."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise KeysConfigError(f"{source}: expected a mapping with a non-empty list 'keys'")
    out: dict[str, ApiKey] = {}
    names: set[str] = set()
    for i, entry in enumerate(data["keys"]):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeysConfigError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "key", "key_env", "budget", "max_spend", "admin"}
        if unknown:
            raise KeysConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or name == "*":
            raise KeysConfigError(f"{where}: 'name' must be a non-empty string other than '*'")
        if name in names:
            raise KeysConfigError(f"{where}: duplicate name {name!r}")
        names.add(name)
        token = entry.get("key")
        if "key_env" in entry:
            token = os.environ.get(str(entry["key_env"]))
            if not token:
                raise KeysConfigError(f"{where} ({name}): environment variable {entry['key_env']!r} is not set")
        if not isinstance(token, str) or len(token) < 8:
            raise KeysConfigError(f"{where} ({name}): 'key' (or key_env) must give a token of >= 8 characters")
        digest = _digest(token)
        if digest in out:
            raise KeysConfigError(f"{where} ({name}): the same token is already used by {out[digest].name!r}")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise KeysConfigError(f"{where} ({name}): 'admin' must be true or false")
        out[digest] = ApiKey(name, digest, _limit(entry, "budget", where), _limit(entry, "max_spend", where), admin)
    return out


def load_keys(path: "str | os.PathLike[str] | None" = None) -> dict[str, ApiKey] | None:
    """Keys from ``path``, else from ``$CASCADE_ROUTING_API_KEYS``; None when neither is given."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KeysConfigError(f"API keys file {p} does not exist")
        text, source = p.read_text(encoding="utf-8"), str(p)
    elif os.environ.get(ENV_VAR):
        text, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise KeysConfigError(f"{source}: not valid YAML/JSON: {err}") from None
    return parse_keys(data, source)


def lookup(keys: dict[str, ApiKey], authorization: str | None) -> ApiKey | None:
    """The key of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return keys.get(_digest(token.strip()))


def keys_document(keys: list[dict[str, Any]]) -> str:
    """A keys document as JSON text (for ``CASCADE_ROUTING_API_KEYS`` or a file)."""
    return json.dumps({"keys": keys})
