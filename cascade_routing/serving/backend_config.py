"""The backends YAML: one OpenAI-compatible chat-completions endpoint per model, with its prices.

YAML layout (see ``configs/backends.example.yaml``)::

    defaults:                 # optional; every key may be overridden per model
      timeout_s: 60           # per attempt, the whole of it: connect, send, and the answer's last byte
                              # (a backend trickling its answer fails at this limit like a silent one)
      max_response_bytes: 8388608  # an answer body (or a stream's bytes) larger than this (8 MiB) is that
                              # model's failure (bad_response): it is never read past the limit
      max_retries: 2          # extra attempts after the first, on 5xx / 429 / timeout / connection error
      backoff_s: 0.5          # wait before retry k (k = 0, 1, ...): backoff_s * 2**k * U(0.5, 1.5), or the
                              # endpoint's Retry-After (seconds) when it is longer (capped at 60 s)
      breaker_failures: 5     # circuit breaker: open after this many consecutive failed attempts
      breaker_reset_s: 10     # ... stay open this long, then let ONE probe through (half-open)
      max_concurrency: 32     # requests in flight to this model at once (an asyncio semaphore)
      logprobs: false         # ask the endpoint for token log-probs (feature ``logprob_confidence``)
    models:
      - name: gpt-4o-mini                     # the model's name in the checkpoint / router
        base_url: https://api.openai.com/v1   # POST {base_url}/chat/completions
        model_id: gpt-4o-mini                 # the ``model`` field sent to the endpoint
        api_key_env: OPENAI_API_KEY           # name of the env var holding the key (optional)
        price_per_1m_input_tokens: 0.15       # USD; or price_per_input_token
        price_per_1m_output_tokens: 0.60      # USD; or price_per_output_token

:func:`load_backend_configs` / :func:`parse_backends` check every field and raise
:class:`BackendConfigError` naming the file, model and field. :func:`check_backends_match` checks
the file against a checkpoint when a server starts: every model of the checkpoint needs an entry
(an error naming the file, the missing models and the file's nearest other names); entries the
checkpoint lacks are never called (:class:`UnusedBackendWarning`); the order of the entries does not
matter. Prices far from the checkpoint's cost model warn (:class:`PriceMismatchWarning`).
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class BackendConfigError(ValueError):
    """The backends YAML is malformed; the message names the file, model and field."""


class UnusedBackendWarning(UserWarning):
    """The backends YAML configures models the checkpoint does not have: they are never called."""


class PriceMismatchWarning(UserWarning):
    """A model's prices in the backends YAML make every request cost far more, or far less, than the
    checkpoint's cost model (fitted on its training data) estimates: spend will not meet the budget."""


#: :func:`price_mismatches` flags a model when every request costs more than this many times, or
#: less than 1 / this of, what the checkpoint's per-token prices say
PRICE_MISMATCH_FACTOR = 2.0


@dataclass(frozen=True)
class BackendConfig:
    """One model's endpoint. Prices are USD per token."""

    name: str
    base_url: str
    model_id: str
    price_in: float
    price_out: float
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_response_bytes: int = 8 << 20
    max_retries: int = 2
    backoff_s: float = 0.5
    max_concurrency: int = 32
    logprobs: bool = False
    trust_reported_cost: bool = False
    breaker_failures: int = 5
    breaker_reset_s: float = 10.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file (or document name) the entry was read from, for messages

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


_DEFAULTS: dict[str, Any] = {
    "timeout_s": 60.0,
    "max_response_bytes": 8 << 20,
    "max_retries": 2,
    "backoff_s": 0.5,
    "max_concurrency": 32,
    "logprobs": False,
    "trust_reported_cost": False,
    "breaker_failures": 5,
    "breaker_reset_s": 10.0,
}
_KNOWN = {
    "name", "base_url", "model_id", "api_key_env", "price_per_input_token", "price_per_output_token",
    "price_per_1m_input_tokens", "price_per_1m_output_tokens", "extra_body", *_DEFAULTS,
}


def _price(entry: Mapping[str, Any], kind: str, where: str) -> float:
    per_token = entry.get(f"price_per_{kind}_token")
    per_million = entry.get(f"price_per_1m_{kind}_tokens")
    if (per_token is None) == (per_million is None):
        raise BackendConfigError(
            f"{where}: give exactly one of price_per_{kind}_token or price_per_1m_{kind}_tokens"
        )
    value = per_token if per_token is not None else per_million
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise BackendConfigError(f"{where}: {kind} price {value!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BackendConfigError(f"{where}: {kind} price must be a finite number >= 0, got {value}")
    return value if per_token is not None else value / 1e6


def _defaults(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The settings every model starts from: :data:`_DEFAULTS` updated by the document's ``defaults``."""
    defaults = dict(_DEFAULTS)
    user_defaults = data.get("defaults") or {}
    if not isinstance(user_defaults, Mapping):
        raise BackendConfigError(f"{source}: 'defaults' must be a mapping")
    unknown = set(user_defaults) - set(_DEFAULTS)
    if unknown:
        raise BackendConfigError(f"{source}: unknown key(s) in defaults: {sorted(unknown)}")
    defaults.update(user_defaults)
    return defaults


def _model_config(entry: Any, source: str, i: int, defaults: Mapping[str, Any], taken: Mapping[str, Any]
                  ) -> BackendConfig:
    """Entry ``i`` of ``models`` validated (name not in ``taken``, known keys, http(s) URL, numeric
    settings in range, prices) into a :class:`BackendConfig`; errors name ``source`` and the entry."""
    where = f"{source}: models[{i}]"
    if not isinstance(entry, Mapping):
        raise BackendConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise BackendConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"{source}: model {name!r}"
    unknown = set(entry) - _KNOWN
    if unknown:
        raise BackendConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    if name in taken:
        raise BackendConfigError(f"{where}: duplicate model name")
    base_url = entry.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise BackendConfigError(f"{where}: 'base_url' must be an http(s) URL, got {base_url!r}")
    settings = {k: entry.get(k, defaults[k]) for k in _DEFAULTS}
    try:
        timeout_s = float(settings["timeout_s"])
        max_response_bytes = settings["max_response_bytes"]
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int):
            raise ValueError(f"max_response_bytes must be an integer, got {max_response_bytes!r}")
        max_retries = int(settings["max_retries"])
        backoff_s = float(settings["backoff_s"])
        max_concurrency = int(settings["max_concurrency"])
        breaker_failures = int(settings["breaker_failures"])
        breaker_reset_s = float(settings["breaker_reset_s"])
    except (TypeError, ValueError) as err:
        raise BackendConfigError(f"{where}: bad numeric setting: {err}") from None
    if not 0 < timeout_s < math.inf or max_response_bytes < 1:
        raise BackendConfigError(f"{where}: need a finite timeout_s > 0 and max_response_bytes >= 1, got "
                                 f"{timeout_s} and {max_response_bytes}")
    if (timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_concurrency < 1 or breaker_failures < 1
            or breaker_reset_s < 0):
        raise BackendConfigError(
            f"{where}: need timeout_s > 0, max_retries >= 0, backoff_s >= 0, max_concurrency >= 1, "
            "breaker_failures >= 1, breaker_reset_s >= 0"
        )
    return BackendConfig(
        name=name,
        base_url=base_url,
        model_id=str(entry.get("model_id", name)),
        price_in=_price(entry, "input", where),
        price_out=_price(entry, "output", where),
        api_key_env=entry.get("api_key_env"),
        timeout_s=timeout_s,
        max_response_bytes=max_response_bytes,
        max_retries=max_retries,
        backoff_s=backoff_s,
        max_concurrency=max_concurrency,
        logprobs=bool(settings["logprobs"]),
        trust_reported_cost=bool(settings["trust_reported_cost"]),
        breaker_failures=breaker_failures,
        breaker_reset_s=breaker_reset_s,
        extra_body=dict(entry.get("extra_body") or {}),
        source=source,
    )


def parse_backends(data: Any, source: str = "<backends>") -> dict[str, BackendConfig]:
    """Validate a parsed backends document (see module docstring); returns name -> config."""
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), list) or not data["models"]:
        raise BackendConfigError(f"{source}: expected a mapping with a non-empty list 'models'")
    defaults = _defaults(data, source)
    configs: dict[str, BackendConfig] = {}
    for i, entry in enumerate(data["models"]):
        config = _model_config(entry, source, i, defaults, configs)
        configs[config.name] = config
    return configs


def load_backend_configs(path: "str | os.PathLike[str]") -> dict[str, BackendConfig]:
    """Read and validate a backends YAML file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backends file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BackendConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_backends(data, source=str(path))


def _sources(configs: Mapping[str, BackendConfig]) -> str:
    """The file(s) the entries were read from, for messages (``<backends>`` when built in code)."""
    return ", ".join(sorted({c.source or "<backends>" for c in configs.values()}))


def check_backends_match(configs: Mapping[str, BackendConfig], models: Sequence[str],
                         prices: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Check a backends file against a checkpoint's ``models`` (and ``prices``, as
    ``EstimatorArtifact.prices``) before a server starts.

    :class:`BackendConfigError` when a model of the checkpoint has no entry: the message names the
    file, the missing models, the checkpoint's models and, for each missing one, the closest name
    the file has that the checkpoint lacks (a likely typo). Entries are looked up by name, so their
    order does not matter. Entries for models the checkpoint does not have are never called:
    :class:`UnusedBackendWarning` naming them. :class:`PriceMismatchWarning` for each model of
    :func:`price_mismatches`.
    """
    where = _sources(configs)
    missing = [m for m in models if m not in configs]
    unused = [name for name in configs if name not in set(models)]
    if missing:
        hints = []
        for m in missing:
            close = difflib.get_close_matches(m, unused, n=1, cutoff=0.6)
            if close:
                hints.append(f"{close[0]!r} for {m!r}?")
        raise BackendConfigError(
            f"{where}: no entry for model(s) {missing} of the checkpoint (its models: {list(models)}; "
            f"a backend's 'name' must be the checkpoint's model name)"
            + (f"; the file has {unused}, which the checkpoint does not" if unused else "")
            + (f"; did you mean {' '.join(hints)}" if hints else "")
        )
    if unused:
        warnings.warn(UnusedBackendWarning(
            f"{where}: model(s) {unused} are not in the checkpoint (its models: {list(models)}); "
            "they are never called"), stacklevel=2)
    for message in price_mismatches(configs, prices or {}):
        warnings.warn(PriceMismatchWarning(message), stacklevel=2)


def price_mismatches(configs: Mapping[str, BackendConfig], prices: Mapping[str, Mapping[str, float]],
                     factor: float = PRICE_MISMATCH_FACTOR) -> list[str]:
    """One message per model whose YAML prices make EVERY request cost more than ``factor`` times, or
    less than ``1 / factor`` of, what the checkpoint prices it at.

    ``prices``: model -> ``{"input_per_token", "output_per_token"}`` (``EstimatorArtifact.prices``;
    a cost model fitted without token counts has neither, and its models are skipped: there is
    nothing per token to compare; so are backends with ``trust_reported_cost``, whose cost is the
    endpoint's own figure). A request's cost ratio (YAML / checkpoint) lies between the
    input and output price ratios, so a model is flagged only when both lie beyond ``factor`` on the
    same side (a price of 0 on one side: ratio 0 or infinity; 0 on both: that kind is ignored),
    which no mix of input and output tokens can explain.
    """
    out = []
    for name, config in configs.items():
        known = prices.get(name) or {}
        if config.trust_reported_cost or "input_per_token" not in known or "output_per_token" not in known:
            continue
        ratios = []
        pairs = ((config.price_in, known["input_per_token"]), (config.price_out, known["output_per_token"]))
        for ours, theirs in pairs:
            if theirs > 0:
                ratios.append(ours / theirs)
            elif ours > 0:
                ratios.append(math.inf)
        if not ratios:
            continue
        low, high = min(ratios), max(ratios)
        if low <= factor and high >= 1 / factor:
            continue
        span = f"{low:.3g}x" if low == high else f"{low:.3g}x to {high:.3g}x"
        hint = (" (a per-1M price given as price_per_input_token / price_per_output_token?)" if low >= 1e5 else
                " (a per-token price given as price_per_1m_input_tokens / price_per_1m_output_tokens?)"
                if high <= 1e-5 else "")
        out.append(
            f"{config.source or '<backends>'}: model {name!r} costs {config.price_in * 1e6:.4g} / "
            f"{config.price_out * 1e6:.4g} USD per 1M input / output tokens, the checkpoint's cost model "
            f"{known['input_per_token'] * 1e6:.4g} / {known['output_per_token'] * 1e6:.4g} (fitted on its "
            f"training data): every request costs {span} what the router estimates before running it, so "
            f"the spend will not meet the budget{hint}"
        )
    return out
