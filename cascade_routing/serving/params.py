"""What the server does with each OpenAI chat-completions parameter. Nothing is silently dropped:
a body key is used by the server, forwarded to every backend the router calls, or rejected with
HTTP 400 naming it.

- used by the server: ``model``, ``messages`` (also forwarded), ``stream``, ``stream_options``
  (``include_usage``), ``routing`` (the cascade-routing extension);
- forwarded as given (:data:`FORWARDED`): sampling (``temperature``, ``top_p``, ``max_tokens``,
  ``max_completion_tokens``, ``stop``, ``seed``, ``frequency_penalty``, ``presence_penalty``,
  ``logit_bias``), ``n``, ``logprobs``/``top_logprobs``, tools (``tools``, ``tool_choice``,
  ``parallel_tool_calls``, legacy ``functions``/``function_call``), ``response_format``, ``user``,
  ``metadata``, ``store``, ``service_tier``, ``reasoning_effort``, ``verbosity``, ``prediction``,
  ``prompt_cache_key``, ``safety_identifier``;
- rejected (:data:`REJECTED`): ``audio``, ``modalities`` other than ``["text"]``,
  ``web_search_options``: the quality estimators read text answers only; and any other key.

Types and ranges are checked by the request schema (:mod:`cascade_routing.serving.schema`).

How the estimators read what comes back: the answer text they see is the first choice's content
followed by one line ``tool_call NAME ARGUMENTS`` per tool call
(:func:`cascade_routing.serving.backends.answer_text`); so a tool-call answer is scored like a
text answer whose text is the call (estimators trained on text answers have not seen calls: treat
their post-hoc estimate of a call as uninformed). With ``n > 1`` the estimators read the first
choice; the client receives all ``n`` choices of the selected model, and the cost is the
backend's usage for all of them. ``logprobs: true`` also feeds the ``logprob_confidence`` feature.
"""

from __future__ import annotations

FORWARDED: tuple[str, ...] = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "frequency_penalty",
    "presence_penalty", "logit_bias", "n", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "response_format", "user", "metadata", "store",
    "service_tier", "reasoning_effort", "verbosity", "prediction", "prompt_cache_key", "safety_identifier",
)
"""Body keys sent on to every backend exactly as the client set them."""

LOCAL: tuple[str, ...] = ("model", "messages", "stream", "stream_options", "routing")
"""Body keys the server itself reads (``messages`` is forwarded too)."""

REJECTED: dict[str, str] = {
    "audio": "audio output is not supported: the quality estimators read text answers",
    "modalities": "only modalities [\"text\"] is supported: the quality estimators read text answers",
    "web_search_options": "web search is not supported by the cascade-routing server",
}
"""Body keys refused with 400 and why (``modalities: ["text"]`` is accepted and not forwarded)."""
